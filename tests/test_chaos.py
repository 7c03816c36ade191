"""Real ``tr-align train`` processes killed and signalled (subprocesses, one CPU device).

- Chaos: ``kill -9`` at random moments, at least two of them while a checkpoint is being
  written (orbax's temporary directory seen on disk, and left behind by the kill), each time
  followed by the same command; the final parameters, reference and every metrics row equal
  an uninterrupted run's, with no row twice.
- Signals: SIGTERM during start-up and during training exit with 75 ("rerun to resume"); a
  second SIGTERM aborts with one line, no traceback, no temporary directory left.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO
from tr_align.training import checkpoint
from tr_align.training.metrics import read_jsonl

STEPS = 24
TINY = [
    f"--config.train.steps={STEPS}",
    "--config.train.batch_size=8",
    "--config.train.eval_batch_size=32",
    "--config.train.eval_every_steps=6",
    "--config.checkpoint.every_steps=2",
    "--config.checkpoint.max_to_keep=3",
    "--config.optimizer.warmup_steps=2",
    "--config.data.num_train=128",
    "--config.data.num_eval=32",
]


def _env(cache_dir):
    return {
        **os.environ,
        "XLA_FLAGS": "--xla_backend_optimization_level=0",  # one CPU device
        # later processes reuse the first one's compiled steps (start-up dominates here)
        "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


class _Proc(subprocess.Popen):
    def stderr_text(self) -> str:
        with open(self.err_path, encoding="utf-8", errors="replace") as f:
            return f.read()


def _start(workdir, cache_dir, *extra):
    """``tr-align train`` on the tiny config; stdout and stderr to files (a pipe nobody reads
    would fill up and block the process)."""
    n = len([f for f in os.listdir(os.path.dirname(workdir)) if f.endswith(".err")])
    err_path = f"{workdir}.{n}.err"
    with open(f"{workdir}.log", "a") as out, open(err_path, "w") as err:
        proc = _Proc(
            [sys.executable, "-m", "tr_align", "train", f"--workdir={workdir}", *TINY, *extra],
            cwd=REPO,
            env=_env(cache_dir),
            stdout=out,
            stderr=err,
        )
    proc.err_path = err_path
    return proc


def _tmp_dirs(workdir):
    path = os.path.join(workdir, "checkpoints")
    try:
        return {n for n in os.listdir(path) if checkpoint.TMP_MARKER in n}
    except OSError:
        return set()


def _train_steps(workdir):
    try:
        return [
            r["step"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in r
        ]
    except (OSError, ValueError):
        return []


def _wait(proc, cond, timeout=120, poll=0.001):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    raise AssertionError("timed out waiting")


def _rows(workdir):
    return [
        {k: v for k, v in r.items() if k != "time"}
        for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    ]


def _final(workdir):
    steps = checkpoint.saved_steps(workdir)
    return steps[-1], [
        checkpoint.restore_host(workdir, steps[-1], k) for k in ("params", "ref_params")
    ]


@pytest.mark.slow
def test_random_kill_9_and_resume_equals_an_uninterrupted_run(tmp_path):
    rng = random.Random(1234)
    cache, straight, chaos = tmp_path / "cache", str(tmp_path / "straight"), str(tmp_path / "chaos")
    reference = _start(straight, cache)
    kills, during_write, attempts = 0, 0, 0
    while (kills < 5 or during_write < 2) and attempts < 12:
        attempts += 1
        proc = _start(chaos, cache)
        want_write = during_write < 2 and (attempts % 2 == 1 or kills >= 4)
        if want_write:
            leftover = _tmp_dirs(chaos)
            _wait(
                proc, lambda left=leftover: not (left & _tmp_dirs(chaos))
            )  # orbax's start-up clean-up
            hit = _wait(proc, lambda: bool(_tmp_dirs(chaos)))
        else:
            done = set(_train_steps(chaos))
            target = max(done, default=0) + rng.randint(1, 4)
            hit = _wait(proc, lambda t=target: max(_train_steps(chaos), default=0) >= t)
        if not hit:  # the run finished first
            assert proc.wait() == 0, proc.stderr_text()
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        err = proc.stderr_text()
        assert "Traceback" not in err, err
        kills += 1
        during_write += bool(want_write and _tmp_dirs(chaos))  # the kill cut a write short
    assert kills >= 5 and during_write >= 2, (kills, during_write, attempts)

    proc = _start(chaos, cache)
    assert proc.wait(timeout=300) == 0, proc.stderr_text()
    assert reference.wait(timeout=300) == 0, reference.stderr_text()

    rows_a, rows_b = _rows(straight), _rows(chaos)
    keys = [(r["step"], tuple(sorted(r))) for r in rows_b]
    assert len(keys) == len(set(keys))  # no duplicate row
    assert [r["step"] for r in rows_b if "loss" in r] == list(range(1, STEPS + 1))
    assert rows_a == rows_b  # every number of every row
    (sa, (pa, ra)), (sb, (pb, rb)) = _final(straight), _final(chaos)
    assert sa == sb == STEPS
    for tree_a, tree_b in ((pa, pb), (ra, rb)):
        for x, y in zip(_leaves(tree_a), _leaves(tree_b)):
            np.testing.assert_array_equal(x, y)
    assert not _tmp_dirs(chaos)
    summary = json.loads((tmp_path / "chaos" / "summary.json").read_text())
    assert summary["step"] == STEPS and summary["train"] and summary["eval"]


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


@pytest.mark.slow
def test_sigterm_exit_codes_and_second_signal(tmp_path):
    cache, workdir = tmp_path / "cache", str(tmp_path / "run")
    extra = ["--config.train.steps=100000", "--config.checkpoint.every_steps=50000"]

    # during start-up (before the first step): one line, exit 75, nothing written
    proc = _start(workdir, cache, *extra)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 75
    err = proc.stderr_text()
    assert "Traceback" not in err and "SIGTERM" in err and "rerun the same command" in err, err
    assert checkpoint.saved_steps(workdir) == []

    # during training: finishes the step, checkpoints, exit 75
    proc = _start(workdir, cache, *extra)
    _wait(proc, lambda: len(_train_steps(workdir)) >= 2, poll=0.01)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 75, proc.stderr_text()
    steps = checkpoint.saved_steps(workdir)
    assert len(steps) == 1 and steps[0] >= 2
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["signal"] == "SIGTERM" and summary["step"] == steps[0]

    # a second signal: aborts at once, one line, no traceback, no temporary directory.
    # (Two pending SIGTERMs would merge into one; a SIGTERM and a SIGINT do not.)
    proc = _start(workdir, cache, *extra)
    _wait(proc, lambda: max(_train_steps(workdir), default=0) > steps[0], poll=0.01)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=60)
    err = proc.stderr_text()
    assert rc in (128 + signal.SIGTERM, 128 + signal.SIGINT), (rc, err)
    assert "Traceback" not in err, err
    second = "SIGTERM" if rc == 128 + signal.SIGTERM else "SIGINT"
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"tr-align: second {second}: aborted") and last.endswith(
        "rerun to resume"
    ), err
    assert not _tmp_dirs(workdir)
    assert checkpoint.saved_steps(workdir)[0] >= steps[0]
