"""The compiled train step: reference updates on device, donation, metrics, data parallelism."""

import jax
import numpy as np
import pytest

from tr_align import losses, sharding
from tr_align.data import loader
from tr_align.training import loop


def _batches(built, config, n):
    it = loader.train_iterator(
        built.data.train, batch_size=config.train.batch_size, seed=config.train.seed
    )
    return [next(it) for _ in range(n)]


def _host(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def _run_recording(config, n_steps, devices=None):
    """Runs n steps, returning (initial params, policy params after each step, final state, metrics)."""
    built = loop.build(config, devices=devices or jax.devices()[:1])
    state = built.init()
    init_params = _host(state.params)
    policies, metrics = [], []
    for batch in _batches(built, config, n_steps):
        state, m = built.train_step(state, sharding.put_batch(batch, built.mesh))
        policies.append(_host(state.params))
        metrics.append(jax.device_get(m))
    return built, init_params, policies, state, metrics


@pytest.mark.parametrize(
    "preset,alpha,tau",
    [
        ("tr-soft", 0.6, 1),
        ("tr-soft", 0.3, 2),
        ("tr-hard", 1.0, 3),
    ],
)
def test_reference_follows_the_rule_inside_the_compiled_step(tiny_config, preset, alpha, tau):
    config = tiny_config(preset, **{"trust_region.alpha": alpha, "trust_region.tau": tau})
    _, ref, policies, state, metrics = _run_recording(config, 7)
    for step, pol in enumerate(policies, start=1):  # the paper's rule, applied by hand
        if step % tau == 0:
            ref = jax.tree.map(lambda p, r: alpha * p + (1 - alpha) * r, pol, ref)
    got = _host(state.ref_params)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
    if alpha == 1.0:  # hard update: an exact copy of the policy at the last sync step (6)
        for g, p in zip(jax.tree.leaves(got), jax.tree.leaves(policies[5])):
            np.testing.assert_array_equal(g, p)
    assert [int(m["ref/updates"]) for m in metrics] == [s // tau for s in range(1, 8)]


def test_vanilla_keeps_the_initial_reference(tiny_config):
    config = tiny_config("vanilla")
    _, init, policies, state, metrics = _run_recording(config, 4)
    for g, e in zip(jax.tree.leaves(_host(state.ref_params)), jax.tree.leaves(init)):
        np.testing.assert_array_equal(g, e)
    assert all(int(m["ref/updates"]) == 0 for m in metrics)
    dist = np.sqrt(
        sum(
            np.sum((p - r) ** 2)
            for p, r in zip(jax.tree.leaves(policies[-1]), jax.tree.leaves(init))
        )
    )
    np.testing.assert_allclose(metrics[-1]["ref/param_distance"], dist, rtol=1e-4)


def test_first_step_metrics_match_independent_values(tiny_config):
    """At step 1 policy == reference, so DPO's loss is log 2 and all rewards are 0; the
    log-probs equal a numpy log-softmax over the completion tokens."""
    config = tiny_config("tr-soft")
    built = loop.build(config, devices=jax.devices()[:1])
    state = built.init()
    params = _host(state.params)
    batch = _batches(built, config, 1)[0]
    new_state, m = built.train_step(state, sharding.put_batch(batch, built.mesh))
    m = jax.device_get(m)
    np.testing.assert_allclose(m["loss"], np.log(2.0), rtol=1e-6)
    np.testing.assert_allclose([m["rewards/chosen"], m["rewards/rejected"]], 0.0, atol=1e-6)

    def seq_logps(kind):
        ids, attn, mask = (
            batch[f"{kind}_{k}"] for k in ("input_ids", "attention_mask", "loss_mask")
        )
        logits = np.asarray(built.apply_fn(params, ids, attn), np.float64)
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        tok = np.take_along_axis(logits[:, :-1], ids[:, 1:, None], -1)[..., 0] - logz[:, :-1]
        return (tok * mask[:, 1:]).sum(-1)

    np.testing.assert_allclose(m["logps/chosen"], seq_logps("chosen").mean(), rtol=1e-5)
    np.testing.assert_allclose(m["logps/rejected"], seq_logps("rejected").mean(), rtol=1e-5)
    np.testing.assert_allclose(m["ref_logps/chosen"], m["logps/chosen"], rtol=1e-6)
    np.testing.assert_allclose(m["learning_rate"], 0.0)  # warmup starts at 0
    assert int(new_state.step) == 1


def test_state_is_donated_and_stays_on_device(tiny_config):
    config = tiny_config("tr-soft")
    built = loop.build(config, devices=jax.devices()[:1])
    state = built.init()
    batch = sharding.put_batch(_batches(built, config, 1)[0], built.mesh)
    old_leaves = jax.tree.leaves(state)
    with jax.transfer_guard("disallow"):  # any parameter moving through the host would raise
        new_state, _ = built.train_step(state, batch)
        jax.block_until_ready(new_state)
    assert all(leaf.is_deleted() for leaf in old_leaves)

    # The compiled step aliases the whole state (policy, reference, optimizer) in place.
    compiled = built.train_step.lower(new_state, batch).compile()
    mem = compiled.memory_analysis()
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(new_state))
    assert mem.alias_size_in_bytes >= state_bytes

    # The reference update needs no second copy of the model: compared with a frozen
    # reference, the step's scratch memory grows by less than one parameter set.
    vanilla = loop.build(tiny_config("vanilla"), devices=jax.devices()[:1])
    mem_vanilla = vanilla.train_step.lower(new_state, batch).compile().memory_analysis()
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(new_state.params))
    assert mem.temp_size_in_bytes - mem_vanilla.temp_size_in_bytes < 0.5 * param_bytes


def test_data_parallel_matches_single_device(tiny_config):
    config = tiny_config("tr-soft")
    assert len(jax.devices()) == 8
    _, _, _, s1, m1 = _run_recording(config, 3, devices=jax.devices()[:1])
    _, _, _, s8, m8 = _run_recording(config, 3, devices=jax.devices())
    for a, b in zip(m1, m8):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(_host(s1)), jax.tree.leaves(_host(s8))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert s8.params["embed_tokens"]["embedding"].sharding.mesh.shape["data"] == 8


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", losses.LOSS_TYPES)
def test_every_loss_type_trains_in_the_sharded_step(tiny_config, loss_type):
    """Each TRL loss (kto_pair: [2B] per-example losses) through the compiled step and the
    held-out eval on a 2-device data-parallel mesh."""
    config = tiny_config(**{"loss.type": loss_type})
    built = loop.build(config, devices=jax.devices()[:2])
    state = built.init()
    metrics = []
    for batch in _batches(built, config, 3):
        state, m = built.train_step(state, sharding.put_batch(batch, built.mesh))
        metrics.append(jax.device_get(m))
    assert all(np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]) for m in metrics)
    assert any(m["grad_norm"] > 0 for m in metrics)
    if loss_type == "sigmoid":  # first step: policy == reference
        np.testing.assert_allclose(metrics[0]["loss"], np.log(2.0), rtol=1e-6)
    zeros = tuple(np.zeros(config.data.num_eval, np.float32) for _ in range(2))
    evals, logps = loop._run_eval(
        built.eval_step, state, built.data, zeros, built.mesh, config.train.eval_batch_size
    )
    assert np.isfinite(evals["eval/loss"]) and logps[0].shape == (config.data.num_eval,)
