"""The training loop: outputs, exact resume, failure handling (tiny configs, CPU)."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from tr_align.training import checkpoint, loop
from tr_align.training.metrics import read_jsonl

TRL_METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "ref_logps/chosen",
    "ref_logps/rejected",
    "grad_norm",
    "learning_rate",
    "ref/updates",
    "ref/param_distance",
)


def _final_state(config, workdir):
    built = loop.build(config, devices=jax.devices()[:1])
    mngr = checkpoint.manager(workdir, max_to_keep=5)
    step, state, _, _ = checkpoint.restore_latest(mngr, built.abstract_state, built.state_shardings)
    return step, jax.tree.map(np.asarray, state)


def _train_losses(workdir):
    return {
        r["step"]: r["loss"]
        for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
        if "loss" in r
    }


def test_run_writes_all_outputs(tiny_config, tmp_path):
    config = tiny_config()
    summary = loop.run(config, str(tmp_path), progress=False, devices=jax.devices()[:1])
    records = read_jsonl(tmp_path / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 7))
    for r in train:
        assert set(TRL_METRICS) <= set(r), set(TRL_METRICS) - set(r)
    evals = [r for r in records if "eval/rewards/accuracies" in r]
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert "eval/init_rewards/accuracies" in evals[-1]
    assert (tmp_path / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))
    assert json.loads((tmp_path / "summary.json").read_text())["step"] == 6 == summary["step"]
    assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints")) == [3, 6]
    assert json.loads((tmp_path / "config.json").read_text())["loss"]["type"] == "sigmoid"


@pytest.mark.slow
def test_resume_is_exact(tiny_config, tmp_path):
    """2N steps straight == N steps, interrupted, then resumed to 2N: identical losses at
    every step and identical final parameters (CPU is deterministic)."""
    config = tiny_config(
        "tr-soft", **{"train.steps": 12, "checkpoint.every_steps": 4, "train.eval_every_steps": 6}
    )
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    loop.run(config, straight, progress=False, devices=jax.devices()[:1])

    loop.run(config, resumed, stop_at_step=6, progress=False, devices=jax.devices()[:1])
    assert max(_train_losses(resumed)) == 6
    # Simulate a crash after step 6 whose last checkpoint is step 4: steps 5-6 are
    # already in metrics.jsonl and must be recomputed, not duplicated.
    shutil.rmtree(os.path.join(resumed, "checkpoints", "6"))
    loop.run(config, resumed, progress=False, devices=jax.devices()[:1])

    a, b = _train_losses(straight), _train_losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert a == b  # exact equality, step by step
    records = read_jsonl(os.path.join(resumed, "metrics.jsonl"))
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 13))  # no duplicates
    sa, state_a = _final_state(config, straight)
    sb, state_b = _final_state(config, resumed)
    assert sa == sb == 12
    for x, y in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
        np.testing.assert_array_equal(x, y)


def test_rerun_of_finished_run_does_nothing(tiny_config, tmp_path):
    config = tiny_config()
    loop.run(config, str(tmp_path), progress=False, devices=jax.devices()[:1])
    before = _train_losses(str(tmp_path))
    summary = loop.run(config, str(tmp_path), progress=False, devices=jax.devices()[:1])
    assert summary["step"] == 6 and _train_losses(str(tmp_path)) == before


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tiny_config, tmp_path):
    config = tiny_config(
        **{
            "optimizer.learning_rate": 1e30,
            "optimizer.warmup_steps": 0,
            "optimizer.schedule": "constant",
            "optimizer.max_grad_norm": 0.0,
            "checkpoint.every_steps": 1,
            "train.steps": 20,
        }
    )
    # step 1 makes the weights ~1e30 (finite); every later step is non-finite and skipped,
    # and the run stops after train.max_bad_steps (10) of them: steps 2-11
    with pytest.raises(
        FloatingPointError,
        match=r"non-finite at 10 consecutive steps \(2-11; train.max_bad_steps=10\).*"
        r"last good checkpoint is step 1;",
    ):
        loop.run(config, str(tmp_path), progress=False, devices=jax.devices()[:1])
    # checkpoint.every_steps=1, but no checkpoint is written after a skipped step
    assert checkpoint.manager(str(tmp_path), max_to_keep=5).all_steps() == [1]
    assert not [
        d for d in os.listdir(tmp_path / "checkpoints") if "tmp" in d
    ]  # no half-written save
    _, state = _final_state(config, str(tmp_path))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))


def test_sigint_finishes_the_step_and_checkpoints(tiny_config, tmp_path, monkeypatch):
    """Ctrl-C / SIGTERM (e.g. a preempted TPU VM) stop cleanly after the current step."""
    import signal

    from tr_align import sharding

    calls = {"n": 0}
    real_put = sharding.put_batch

    def put_and_interrupt(batch, mesh):
        if ("rejected_loss_mask" in batch or "seq_ids" in batch) and "weight" not in batch:
            calls["n"] += 1
            if calls["n"] == 3:
                os.kill(os.getpid(), signal.SIGINT)
        return real_put(batch, mesh)

    monkeypatch.setattr(sharding, "put_batch", put_and_interrupt)
    config = tiny_config(**{"checkpoint.every_steps": 100})
    # the process's own handler (Python's default_int_handler; SIG_IGN in a background job)
    before = signal.getsignal(signal.SIGINT)
    summary = loop.run(config, str(tmp_path), progress=False, devices=jax.devices()[:1])
    assert summary["step"] == 3 and summary["signal"] == "SIGINT"  # the CLI exits 75
    assert checkpoint.manager(str(tmp_path), max_to_keep=5).all_steps() == [3]
    assert signal.getsignal(signal.SIGINT) is before  # handler restored


def test_nonfinite_before_any_checkpoint_says_there_is_none(tiny_config, tmp_path):
    config = tiny_config(
        **{
            "optimizer.learning_rate": 1e30,
            "optimizer.warmup_steps": 0,
            "optimizer.schedule": "constant",
            "optimizer.max_grad_norm": 0.0,
            "checkpoint.every_steps": 100,
            "train.steps": 20,
        }
    )
    with pytest.raises(FloatingPointError) as e:
        loop.run(config, str(tmp_path), progress=False, devices=jax.devices()[:1])
    assert "checkpoint is step" not in str(e.value)
    assert "there is no checkpoint yet (a rerun starts from step 0)" in str(e.value)
    assert checkpoint.saved_steps(str(tmp_path)) == []


def test_restart_without_checkpoint_and_rerun_of_finished_run_keep_metrics_and_summary(
    tiny_config, tmp_path
):
    """G: a run killed before its first checkpoint, rerun, has one step-0 eval row. E: a
    no-op rerun of the finished run, or one after a kill between the final checkpoint and
    summary.json, keeps the summary's last train / eval metrics."""
    config = tiny_config()
    loop.run(config, str(tmp_path), stop_at_step=2, progress=False, devices=jax.devices()[:1])
    shutil.rmtree(tmp_path / "checkpoints")  # as if killed before the first checkpoint
    loop.run(config, str(tmp_path), progress=False, devices=jax.devices()[:1])
    records = read_jsonl(tmp_path / "metrics.jsonl")
    steps = [(r["step"], "loss" in r) for r in records]
    assert len(steps) == len(set(steps))  # no row twice
    assert [r["step"] for r in records if "eval/loss" in r] == [0, 3, 6]
    first = json.loads((tmp_path / "summary.json").read_text())
    last_train = {k: v for k, v in records[-2].items() if k not in ("step", "time")}
    last_eval = {k: v for k, v in records[-1].items() if k not in ("step", "time")}
    assert first["train"] == last_train and first["eval"] == last_eval and last_eval

    for kill_before_summary in (False, True):
        if kill_before_summary:
            os.remove(tmp_path / "summary.json")
        again = loop.run(config, str(tmp_path), progress=False, devices=jax.devices()[:1])
        on_disk = json.loads((tmp_path / "summary.json").read_text())
        assert on_disk["step"] == again["step"] == 6
        assert on_disk["train"] == last_train and on_disk["eval"] == last_eval
        assert read_jsonl(tmp_path / "metrics.jsonl") == records  # untouched


def test_preemption_sync_point_checkpoints_and_stops(tiny_config, tmp_path, monkeypatch):
    """Cloud TPU: at the step JAX's preemption service agrees on, every host checkpoints and
    the run stops as for a signal (the CLI then exits 75)."""
    from tr_align.training import interrupt

    seen = []

    def reached(step):
        seen.append(step)
        return step == 2

    monkeypatch.setattr(interrupt, "preemption_reached", reached)
    config = tiny_config(**{"checkpoint.every_steps": 100})
    summary = loop.run(config, str(tmp_path), progress=False, devices=jax.devices()[:1])
    assert seen == [1, 2] and summary["step"] == 2 and summary["signal"] == "preemption"
    assert checkpoint.saved_steps(str(tmp_path)) == [2]
    assert json.loads((tmp_path / "summary.json").read_text())["signal"] == "preemption"


def test_batch_figures_count_every_computed_row(tiny_config, tmp_path):
    """data/rows x data/length = the positions the step computes: with padded pairs
    (data.packing=none) that is the chosen AND the rejected rows, 2 x batch_size."""
    config = tiny_config(**{"data.packing": "none"})
    loop.run(config, str(tmp_path), progress=False, devices=jax.devices()[:1])
    train = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
    assert train
    for r in train:
        assert r["data/rows"] == 2 * config.train.batch_size
        assert 0 < r["data/real_tokens"] <= r["data/rows"] * r["data/length"]
        assert r["data/padding_efficiency"] == pytest.approx(
            r["data/real_tokens"] / (r["data/rows"] * r["data/length"])
        )
