"""``logging.wandb=True``: Weights & Biases as one more metric sink, offline
(``WANDB_MODE=offline`` writes the run under ``WORKDIR/wandb`` only). Skipped only where the
optional ``wandb`` package is not installed (``pip install 'tr_align[wandb]'``)."""

import glob
import json
import os
import time

import jax
import pytest

from tr_align.training import loop, metrics

wandb = pytest.importorskip("wandb", reason="the optional wandb package is not installed")
from wandb.proto import wandb_internal_pb2  # noqa: E402


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))


def _records(path):
    """The protobuf records of a ``.wandb`` run file: a 7-byte header (``:W&B``, magic,
    version), then LevelDB-log records (crc32, length, type) in 32 KiB blocks."""
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, pending, out, block = 7, b"", [], 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is zero padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if kind == 0:
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def _history(run_dir):
    """{step: {key: value}} of the logged history of the (one) offline run in run_dir."""
    (path,) = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))
    deadline = time.time() + 120
    records = _records(path)
    # wandb's service process may still be writing when finish() returns: wait for the
    # run's exit record (the last one it writes)
    while not any(r.HasField("exit") for r in records) and time.time() < deadline:
        time.sleep(0.5)
        records = _records(path)
    rows = {}
    for r in records:
        if r.HasField("history"):
            items = {
                (i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item
            }
            rows[items["_step"]] = {k: v for k, v in items.items() if not k.startswith("_")}
    return path, rows


def test_metric_writer_logs_the_scalars_to_an_offline_wandb_run(tmp_path):
    w = metrics.MetricWriter(
        str(tmp_path),
        resume_step=-1,
        wandb=metrics.WandbSettings(project="proj", name="first", config={"loss": {"beta": 0.1}}),
    )
    w.write(1, {"loss": 0.5, "note": "text is not a scalar"})
    w.write(2, {"loss": 0.25, "eval/rewards/accuracies": 0.75})
    w.close()
    path, rows = _history(tmp_path)
    assert rows == {1: {"loss": 0.5}, 2: {"loss": 0.25, "eval/rewards/accuracies": 0.75}}
    run_id = (tmp_path / metrics.WANDB_ID_FILE).read_text().strip()
    assert path.endswith(f"-{run_id}{os.sep}run-{run_id}.wandb")
    runs = [r.run for r in _records(path) if r.HasField("run")]
    assert runs[0].project == "proj" and runs[0].display_name == "first"
    assert runs[0].run_id == run_id


@pytest.mark.slow
def test_a_run_with_logging_wandb_logs_what_metrics_jsonl_holds(tiny_config, tmp_path):
    config = tiny_config(**{"logging.wandb": True, "logging.wandb_project": "tr"})
    loop.run(config, str(tmp_path), progress=False, devices=jax.devices()[:1])
    _, rows = _history(tmp_path)
    jsonl = metrics.read_jsonl(str(tmp_path / metrics.METRICS_FILE))
    assert sorted(rows) == [0, 1, 2, 3, 4, 5, 6]  # step 0's eval, then every step
    for r in jsonl:
        for k, v in r.items():
            if k not in ("step", "time") and isinstance(v, (int, float)):
                assert rows[r["step"]][k] == pytest.approx(v), (r["step"], k)
    assert rows[6]["eval/init_rewards/accuracies"] == pytest.approx(
        json.loads((tmp_path / "summary.json").read_text())["eval"]["eval/init_rewards/accuracies"]
    )
