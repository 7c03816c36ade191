"""Non-finite steps: the train step skips them bitwise, the loop counts them, stops after
train.max_bad_steps in a row and never checkpoints inside them; a collapsed model warns."""

import logging
import os

import jax
import numpy as np
import pytest

from tr_align import errors, sharding
from tr_align.data import loader
from tr_align.training import checkpoint, loop, numerics
from tr_align.training.metrics import read_jsonl


def _host(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def _poison(batch, vocab_size):
    """One token id out of the vocabulary: the embedding lookup (jnp.take, mode fill) gives
    NaN, so the loss and the gradient of this batch are NaN."""
    batch = {k: np.array(v, copy=True) for k, v in batch.items()}
    key = "input_ids" if "seq_ids" in batch else "chosen_input_ids"
    batch[key][0, 1] = vocab_size
    return batch


def _assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("preset", ["tr-soft", "vanilla"])
def test_a_nan_batch_is_skipped_bitwise_and_training_continues_as_without_it(tiny_config, preset):
    """Constant lr, tau = 1: a run whose 2nd batch is poisoned equals, after it, the run on
    the same batches without that one (params, reference, AdamW moments and count)."""
    config = tiny_config(preset, **{"optimizer.warmup_steps": 0, "optimizer.schedule": "constant"})
    built = loop.build(config, devices=jax.devices()[:1])
    it = loader.train_iterator(
        built.data.train,
        batch_size=config.train.batch_size,
        seed=config.train.seed,
        **built.program.loader_kwargs(),
    )
    b = [next(it) for _ in range(4)]
    bad = _poison(b[1], config.model.vocab_size)

    def run(batches):
        state, states, metrics = built.init(), [], []
        for batch in batches:
            state, m = built.train_step(state, sharding.put_batch(batch, built.mesh))
            states.append(_host(state))
            metrics.append(jax.device_get(m))
        return states, metrics

    with_bad, m_bad = run([b[0], bad, b[2], b[3]])
    without, m_good = run([b[0], b[2], b[3]])

    assert not np.isfinite(m_bad[1]["loss"]) and not np.isfinite(m_bad[1]["grad_norm"])
    assert [int(m["train/step_skipped"]) for m in m_bad] == [0, 1, 0, 0]
    assert [int(m["train/step_skipped"]) for m in m_good] == [0, 0, 0]
    before, after = with_bad[0], with_bad[1]
    assert int(after.step) == 2  # the step counter (and the rng) still advance
    for field in ("params", "ref_params", "opt_state"):
        _assert_trees_equal(getattr(after, field), getattr(before, field))
    for field in ("params", "ref_params", "opt_state"):
        _assert_trees_equal(getattr(with_bad[3], field), getattr(without[2], field))
    np.testing.assert_array_equal(m_bad[3]["loss"], m_good[2]["loss"])
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(with_bad[3].params))


def test_guard_counts_stops_after_max_bad_steps_and_resets_on_a_good_step():
    g = numerics.StepGuard(3, last_checkpoint=None, extras={"skipped_steps": 5})
    flags = {1: 1, 2: 1, 3: 0, 4: 1, 5: 1}
    for step, bad in flags.items():
        g.watch(step, {"train/step_skipped": np.int32(bad)})
    g.resolve()
    assert g.skipped == 5 + 4 and g.streak == 2 and not g.checkpoint_ok
    assert g.extras() == {"skipped_steps": 9, "bad_streak": 2}
    g.watch(6, {"train/step_skipped": np.int32(1)})
    with pytest.raises(
        errors.NonFiniteError,
        match=r"non-finite at 3 consecutive steps \(4-6; train.max_bad_steps=3\).*"
        r"there is no checkpoint yet \(a rerun starts from step 0\)",
    ):
        g.resolve()


def test_guard_warns_once_when_grad_norm_stays_exactly_zero(caplog):
    g = numerics.StepGuard(10, last_checkpoint=0)
    n = numerics.ZERO_GRAD_NORM_STEPS
    with caplog.at_level(logging.WARNING):
        g.logged(1, {"grad_norm": 0.0})
        g.logged(2, {"grad_norm": 1e-30})  # not exactly zero: the count restarts
        for step in range(3, 3 + n - 1):
            g.logged(step, {"grad_norm": 0.0})
        assert not [r for r in caplog.records if "grad_norm" in r.getMessage()]
        for step in range(3 + n - 1, 3 + 2 * n):
            g.logged(step, {"grad_norm": 0.0})
    warnings = [r.getMessage() for r in caplog.records if "grad_norm" in r.getMessage()]
    assert len(warnings) == 1 and f"exactly 0 for {n} consecutive logged steps" in warnings[0]


@pytest.mark.slow
def test_loop_skips_a_bad_step_counts_it_and_defers_its_checkpoint(
    tiny_config, tmp_path, monkeypatch
):
    """Step 3's batch is poisoned: its row logs loss null and train/step_skipped 1, the
    cumulative train/skipped_steps is 1 from there, the checkpoint due at step 3 is written
    at step 4 instead, and the run finishes with finite parameters."""
    calls = {"n": 0}
    real_put = sharding.put_batch

    def put(batch, mesh):
        if ("rejected_loss_mask" in batch or "seq_ids" in batch) and "weight" not in batch:
            calls["n"] += 1
            if calls["n"] == 3:
                batch = _poison(batch, 32)
        return real_put(batch, mesh)

    monkeypatch.setattr(sharding, "put_batch", put)
    config = tiny_config()
    summary = loop.run(config, str(tmp_path), progress=False, devices=jax.devices()[:1])
    assert summary["step"] == 6
    rows = [r for r in read_jsonl(os.path.join(tmp_path, "metrics.jsonl")) if "loss" in r]
    assert [r["train/step_skipped"] for r in rows] == [0, 0, 1, 0, 0, 0]
    assert [r["train/skipped_steps"] for r in rows] == [0, 0, 1, 1, 1, 1]
    assert rows[2]["loss"] is None and rows[3]["loss"] is not None
    assert checkpoint.saved_steps(str(tmp_path)) == [4, 6]
    mngr = checkpoint.manager(str(tmp_path), max_to_keep=5)
    built = loop.build(config, devices=jax.devices()[:1])
    _, state, _, extras = checkpoint.restore_latest(
        mngr, built.abstract_state, built.state_shardings
    )
    assert extras["skipped_steps"] == 1 and extras["bad_streak"] == 0
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))


@pytest.mark.slow
def test_a_collapsed_model_warns_once(tiny_config, tmp_path, caplog):
    """lr=1e6: grad_norm is exactly 0 from step 2 on (the issue's 'collapsed model')."""
    config = tiny_config(
        **{
            "optimizer.learning_rate": 1e6,
            "optimizer.warmup_steps": 0,
            "train.steps": numerics.ZERO_GRAD_NORM_STEPS + 3,
            "train.eval_every_steps": 100,
            "checkpoint.every_steps": 100,
        }
    )
    with caplog.at_level(logging.WARNING):
        loop.run(config, str(tmp_path), progress=False, devices=jax.devices()[:1])
    rows = [r for r in read_jsonl(os.path.join(tmp_path, "metrics.jsonl")) if "loss" in r]
    assert [r["grad_norm"] == 0.0 for r in rows][1:] == [True] * (len(rows) - 1)
    warnings = [r.getMessage() for r in caplog.records if "collapsed" in r.getMessage()]
    assert len(warnings) == 1
