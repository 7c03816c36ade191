"""Metric sinks: ``metrics.jsonl`` (one JSON object per logged step), TensorBoard and,
with ``logging.wandb=True``, Weights & Biases.

Every record carries ``time``: the wall-clock (``time.time()``) at which it was written.
The loop fetches a step's metrics from the device while the next step runs, so for train
records this is when that step's results reached the host (consecutive differences are
step intervals). Only process 0 writes. On resume, records past the restored step are dropped
from ``metrics.jsonl`` (and purged from TensorBoard) so the files read as one
uninterrupted run; a fresh start (``resume_step=-1``: no usable checkpoint) drops them all,
so step 0's eval is never written twice.

Weights & Biases is optional: ``wandb`` is imported only when enabled (``WandbSettings``), and
a missing package is a one-line ``MissingDependencyError`` (the config check raises it before
the run starts). The W&B run lives under ``WORKDIR/wandb`` (``WANDB_MODE=offline`` writes it
there only) and its id is kept in ``WORKDIR/wandb_id``, so a resumed run logs into the same
W&B run. W&B cannot drop logged steps: records past a resume point stay there (W&B ignores
re-logged steps), only ``metrics.jsonl`` and TensorBoard are rewound.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import time
import uuid

import numpy as np

from tr_align.errors import MissingDependencyError

METRICS_FILE = "metrics.jsonl"  # under the run directory (tr_align.io.rundir lists them all)
TB_DIR = "tb"
WANDB_ID_FILE = "wandb_id"  # the W&B run id of this run directory (resumes continue it)
WANDB_MISSING = (
    "logging.wandb=True: the wandb package is not installed; pip install wandb "
    "(or pip install 'tr_align[wandb]'), or set logging.wandb=False"
)


@dataclasses.dataclass(frozen=True)
class WandbSettings:
    """``logging.wandb_*``: the W&B run to log into (``name`` '' = the workdir's name) and
    the run's config to record with it."""

    project: str = "tr_align"
    name: str = ""
    config: dict | None = None


def check_wandb() -> None:
    """MissingDependencyError unless ``wandb`` can be imported (nothing is imported)."""
    if importlib.util.find_spec("wandb") is None:
        raise MissingDependencyError(WANDB_MISSING)


def _wandb_run(workdir: str, settings: WandbSettings):
    check_wandb()
    import wandb  # optional: only a run with logging.wandb=True imports it

    id_file = os.path.join(workdir, WANDB_ID_FILE)
    if os.path.exists(id_file):
        with open(id_file, encoding="utf-8") as f:
            run_id = f.read().strip()
    else:
        run_id = uuid.uuid4().hex[:12]
        with open(id_file, "w", encoding="utf-8") as f:
            f.write(run_id + "\n")
    return wandb.init(
        project=settings.project,
        name=settings.name or os.path.basename(os.path.abspath(workdir)),
        id=run_id,
        resume="allow",
        dir=workdir,
        config=settings.config,
        settings=wandb.Settings(quiet=True),  # the run's link, not wandb's run summary
    )


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
    """Appends step metrics to ``WORKDIR/metrics.jsonl`` and TensorBoard events in
    ``WORKDIR/tb``, and to a W&B run when given ``wandb`` settings."""

    def __init__(
        self,
        workdir: str,
        *,
        resume_step: int = 0,
        enabled: bool = True,
        wandb: WandbSettings | None = None,
    ):
        self.enabled = enabled
        self.path = os.path.join(workdir, METRICS_FILE)
        self._tb = None
        self._wandb = None
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
        if wandb is not None:
            self._wandb = _wandb_run(workdir, wandb)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        record["time"] = round(time.time(), 6)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        scalars = {
            k: v
            for k, v in record.items()
            if k not in ("step", "time") and isinstance(v, (int, float))
        }
        for k, v in scalars.items():
            self._tb.add_scalar(k, v, int(step))
        if self._wandb is not None:
            self._wandb.log(scalars, step=int(step))

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._tb.close()
            if self._wandb is not None:
                self._wandb.finish()
                self._wandb = None
