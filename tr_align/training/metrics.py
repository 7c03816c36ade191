"""Metric sinks: ``metrics.jsonl`` (one JSON object per logged step) and TensorBoard.

Every record carries ``time``: the wall-clock (``time.time()``) at which it was written.
The loop fetches a step's metrics from the device while the next step runs, so for train
records this is when that step's results reached the host (consecutive differences are
step intervals). Only process 0 writes. On resume, records past the restored step are dropped
from ``metrics.jsonl`` (and purged from TensorBoard) so the files read as one
uninterrupted run; a fresh start (``resume_step=-1``: no usable checkpoint) drops them all,
so step 0's eval is never written twice.
"""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np

METRICS_FILE = "metrics.jsonl"  # under the run directory (tr_align.io.rundir lists them all)
TB_DIR = "tb"


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSONL file; a last line cut short (the process was killed while
    writing it) is dropped."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    records = [json.loads(line) for line in lines[:-1]]
    if lines:
        try:
            records.append(json.loads(lines[-1]))
        except json.JSONDecodeError:
            if lines[-1].endswith("\n"):  # a complete line that is not JSON: not a cut
                raise
    return records


def _plain(v):
    v = np.asarray(v).item() if np.ndim(v) == 0 else np.asarray(v).tolist()
    return None if isinstance(v, float) and not math.isfinite(v) else v


class MetricWriter:
    """Appends step metrics to ``WORKDIR/metrics.jsonl`` and TensorBoard events in ``WORKDIR/tb``."""

    def __init__(self, workdir: str, *, resume_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, METRICS_FILE)
        self._tb = None
        if not enabled:
            return
        kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step]
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        self._file = open(self.path, "a", encoding="utf-8")
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(
            os.path.join(workdir, TB_DIR), purge_step=resume_step + 1 if resume_step else None
        )

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        record["time"] = round(time.time(), 6)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for k, v in record.items():
            if k not in ("step", "time") and isinstance(v, (int, float)):
                self._tb.add_scalar(k, v, int(step))

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._tb.close()
