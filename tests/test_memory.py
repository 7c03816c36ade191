"""Memory levers: each one computes the same step as without it, and saves memory.

References are independent of the code under test: float64 numpy log-softmax, a plain
full-logits jax computation written here, numpy float32 arithmetic rounded to bfloat16
with ml_dtypes, a full-batch step against the accumulated one.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

from tr_align import hf, losses, sharding, trust_region
from tr_align.data import loader
from tr_align.models import gpt_neox, llama
from tr_align.tools import bench
from tr_align.training import loop
from tr_align.training import step as train

ONE_LAYER = {"model.num_hidden_layers": 1, "data.num_train": 64}  # faster to compile

# ----------------------------------------------------------------------------
# Chunked log-probs.


def _np_sequence_logps(logits, labels, mask, average):
    logits = logits.astype(np.float64)
    m = logits.max(-1, keepdims=True)
    logz = np.log(np.exp(logits - m).sum(-1)) + m[..., 0]
    safe = np.clip(labels, 0, logits.shape[-1] - 1)
    tok = np.take_along_axis(logits, safe[..., None], -1)[..., 0] - logz
    total = (tok * mask).sum(-1)
    return total / np.maximum(mask.sum(-1), 1) if average else total


def test_chunked_sequence_logps_values_and_gradients_match_full_logits():
    rng = np.random.default_rng(0)
    b, t, d, v = 3, 7, 5, 11
    hidden = rng.normal(size=(b, t, d)).astype(np.float32)
    w = rng.normal(size=(d, v)).astype(np.float32)
    labels = rng.integers(0, v, size=(b, t)).astype(np.int32)
    mask = (rng.random((b, t)) < 0.7).astype(np.int32)
    mask[2] = 0  # a row with no completion tokens
    labels[mask == 0] = -100  # arbitrary labels where masked
    row_w = rng.normal(size=b).astype(np.float32)

    def plain(h, w, average):  # full [B, T, V] logits, written independently of losses.py
        logp = jax.nn.log_softmax(h @ w, axis=-1)
        tok = jnp.take_along_axis(logp, jnp.clip(labels, 0, v - 1)[..., None], -1)[..., 0]
        total = jnp.sum(jnp.where(mask > 0, tok, 0.0), -1)
        return total / jnp.maximum(mask.sum(-1), 1) if average else total

    for average, chunk in ((False, 3), (True, 3), (False, 7)):  # 3 chunks (last padded) / 1
        expect = _np_sequence_logps(hidden @ w.astype(np.float64), labels, mask, average)
        g_expect = jax.grad(lambda h, w, a=average: jnp.sum(row_w * plain(h, w, a)), (0, 1))(
            hidden, w
        )

        @jax.jit
        def chunked(h, w, chunk=chunk, average=average):
            def weighted(h, w):
                logps = losses.chunked_sequence_logps(
                    h, lambda x: x @ w, labels, mask, chunk_size=chunk, average=average
                )
                return jnp.sum(row_w * logps), logps

            return jax.grad(weighted, (0, 1), has_aux=True)(h, w)

        g, got = chunked(hidden, w)
        np.testing.assert_allclose(got, expect, rtol=2e-5, atol=2e-5)
        assert got[2] == 0.0
        for a, e in zip(g, g_expect):
            np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
        losses.chunked_sequence_logps(hidden, lambda x: x @ w, labels, mask, chunk_size=0)


def _small(cls, **kw):
    base = dict(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
    )
    return cls(**{**base, **kw})


@pytest.mark.parametrize(
    "cfg",
    [
        _small(llama.LlamaConfig, dtype="bfloat16", num_hidden_layers=1),
        _small(gpt_neox.GPTNeoXConfig, tie_word_embeddings=True, num_hidden_layers=1),
    ],
    ids=["llama-untied-bf16", "neox-tied"],
)
def test_split_head_reproduces_the_logits(cfg):
    module = llama if isinstance(cfg, llama.LlamaConfig) else gpt_neox
    init_fn, apply_fn = module.make_model(cfg)
    params = init_fn(jax.random.PRNGKey(0))
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 6), 0, cfg.vocab_size)
    mask = jnp.asarray([[1] * 6, [1] * 4 + [0] * 2])

    @jax.jit
    def both(params):
        hidden, head = apply_fn(params, ids, mask, split_head=True)
        return apply_fn(params, ids, mask), hidden, head(hidden)

    logits, hidden, from_head = both(params)
    assert hidden.shape == (2, 6, cfg.hidden_size) and hidden.dtype == jnp.dtype(cfg.dtype)
    assert from_head.dtype == jnp.float32
    np.testing.assert_array_equal(from_head, logits)
    if cfg.dtype == "bfloat16" and module is llama:
        # A Llama computing in bf16 sees only bf16-rounded parameters, so a hard-copied bf16
        # reference gives the log-probs of a float32 one (trust_region module doc).
        params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
        np.testing.assert_array_equal(jax.jit(apply_fn)(params16, ids, mask), logits)


# ----------------------------------------------------------------------------
# Rematerialisation.


def test_remat_policies_give_the_same_gradients_with_less_memory():
    cfg = _small(llama.LlamaConfig, vocab_size=32, num_key_value_heads=2, num_hidden_layers=1)
    params = llama.make_model(cfg)[0](jax.random.PRNGKey(0))
    ids = jax.random.randint(jax.random.PRNGKey(1), (4, 32), 0, cfg.vocab_size)
    mask = jnp.ones_like(ids)
    out, kept = {}, {}
    for policy in ("none", "save_dots", "full"):
        apply_fn = llama.make_model(dataclasses.replace(cfg, remat=policy))[1]

        def loss(p, apply_fn=apply_fn):
            logits = apply_fn(p, ids, mask)
            return losses.sequence_logps(logits[:, :-1], ids[:, 1:], mask[:, 1:]).sum()

        compiled = jax.jit(jax.value_and_grad(loss)).lower(params).compile()
        out[policy] = (compiled.memory_analysis().temp_size_in_bytes, *compiled(params))
        kept[policy] = bench.saved_residual_bytes(loss, params)
    temp_none, value_none, grads_none = out["none"]
    for policy in ("save_dots", "full"):
        _, value, grads = out[policy]
        np.testing.assert_allclose(value, value_none, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_none)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # What autodiff keeps for the backward pass shrinks strictly; XLA:CPU's scratch memory
    # follows only weakly (it drops jax.checkpoint's barriers before scheduling).
    assert kept["full"] < kept["save_dots"] < kept["none"]
    assert out["full"][0] <= out["save_dots"][0] <= temp_none
    assert out["full"][0] < temp_none
    with pytest.raises(ValueError, match="LlamaConfig.remat must be one of"):
        dataclasses.replace(cfg, remat="some")


# ----------------------------------------------------------------------------
# Gradient accumulation.


def _host(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def _batch(built, config):
    it = loader.train_iterator(
        built.data.train, batch_size=config.train.batch_size, seed=config.train.seed
    )
    return sharding.put_batch(next(it), built.mesh)


@pytest.mark.slow
def test_grad_accumulation_and_chunked_logps_equal_the_plain_step(tiny_config):
    """One SGD(lr=1) step, so new params = params - grads. Against the plain full-batch
    step (8 pairs, one device): K=4 microbatches of 2 pairs on a 2-device mesh, and
    log-probs in chunks of 4 positions (T = 15: 4 chunks, the last padded), give the same
    gradient, loss and metrics."""
    config = tiny_config("tr-soft", **ONE_LAYER)
    built = loop.build(config, devices=jax.devices()[:1])
    state = built.init()
    # A reference away from the policy, so rewards, accuracies and margins are non-trivial.
    noise = jax.tree.map(
        lambda x: 0.05 * jnp.sin(jnp.arange(x.size).reshape(x.shape)), state.params
    )
    tx = optax.sgd(1.0)
    state = state.replace(
        ref_params=jax.tree.map(jnp.add, state.ref_params, noise), opt_state=tx.init(state.params)
    )
    host_state = _host(state)
    batch = jax.device_get(_batch(built, config))
    kw = dict(
        # the plain model: built.apply_fn pins activations to build's 1-device mesh
        apply_fn=hf.model_fns(built.model_config)[1],
        tx=tx,
        schedule=built.schedule,
        objective=built.program.objective,
        reference_update=built.program.reference_update,
    )
    full_state, full_m = jax.jit(lambda s, b: train.train_step(s, b, **kw))(host_state, batch)
    assert 0.0 < float(full_m["rewards/accuracies"]) < 1.0
    for n_dev, lever in ((2, dict(grad_accum_steps=4)), (1, dict(logps_chunk_size=4))):
        mesh = sharding.make_mesh(config.mesh, jax.devices()[:n_dev])
        shardings = jax.tree.map(lambda _, m=mesh: sharding.replicated(m), host_state)
        step = train.compile_train_step(mesh, shardings, **lever, **kw)
        new_state, m = step(jax.device_put(host_state, shardings), sharding.put_batch(batch, mesh))
        for key in full_m:
            np.testing.assert_allclose(m[key], full_m[key], rtol=1e-5, atol=1e-6, err_msg=key)
        for a, b in zip(jax.tree.leaves(_host(new_state)), jax.tree.leaves(_host(full_state))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_microbatches_are_strided_and_invert():
    x = np.arange(12).reshape(6, 2)
    mb = train.microbatches({"x": x}, 3)["x"]
    np.testing.assert_array_equal(mb[1], [[2, 3], [8, 9]])  # rows 1 and 4
    np.testing.assert_array_equal(train.unmicrobatch(mb), x)


# ----------------------------------------------------------------------------
# bfloat16 reference (and bfloat16 compute with float32 master state).


def _bf16_round(x32):
    return np.asarray(x32, np.float32).astype(ml_dtypes.bfloat16)


@pytest.mark.parametrize("alpha", [0.6, 0.01, 1.0])
def test_bf16_reference_update_is_float32_math_rounded_once(alpha):
    rng = np.random.default_rng(1)
    ref16 = _bf16_round(rng.normal(size=(64,)) * 0.05)
    pol = (ref16.astype(np.float32) + rng.normal(size=(64,)).astype(np.float32) * 0.01).astype(
        np.float32
    )
    out = jax.jit(lambda r, p: trust_region.update_reference(r, p, 1, alpha=alpha, tau=1))(
        {"w": ref16}, {"w": pol}
    )["w"]
    assert out.dtype == jnp.bfloat16
    a32 = np.float32(alpha)
    expect = _bf16_round(a32 * pol + np.float32(1.0 - alpha) * ref16.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(out).view(np.uint16), expect.view(np.uint16))


def test_bf16_reference_loses_updates_below_half_an_ulp():
    """The numbers of the trust_region module doc: ulp(1.0) = 2**-7 in bfloat16."""
    update = jax.jit(
        lambda r, p, a: trust_region.update_reference(r, p, 1, alpha=a, tau=1), static_argnums=2
    )
    for alpha, p, moves in ((0.01, 1.3, False), (0.6, 1.006, False), (0.6, 1.007, True)):
        r16, r32 = jnp.bfloat16(1.0), jnp.float32(1.0)
        for _ in range(20):
            r16 = update(r16, jnp.float32(p), alpha)
            r32 = update(r32, jnp.float32(p), alpha)
        assert (float(r16) != 1.0) == moves, (alpha, p, float(r16))
        assert float(r32) > 1.0  # float32 keeps converging to p
    np.testing.assert_allclose(float(r32), 1.0 + 0.007 * (1 - 0.4**20), rtol=1e-6)


@pytest.mark.slow
def test_all_levers_bf16_master_state_and_reference_rule(tiny_config):
    """Every lever on (bf16 compute, bf16 reference, remat, 2 microbatches, chunked
    log-probs) through loop.build's train and eval steps: the policy and Adam state stay
    float32, the reference is bfloat16 (half the bytes) and follows the rule computed in
    float32 and rounded once."""
    config = tiny_config(
        "tr-soft",
        **ONE_LAYER,
        **{
            "model.dtype": "bfloat16",
            "trust_region.ref_dtype": "bfloat16",
            "model.remat": "full",
            "train.grad_accum_steps": 2,
            "train.logps_chunk_size": 4,
        },
    )
    built = loop.build(config, devices=jax.devices()[:1])
    batch = _batch(built, config)
    state = built.init()
    compiled = built.train_step.lower(state, batch).compile()
    state, _ = compiled(state, batch)  # step 1 has learning rate 0 (warmup)
    ref0 = _host(state.ref_params)
    new_state, m = compiled(state, batch)
    assert np.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0
    assert {x.dtype for x in jax.tree.leaves(new_state.ref_params)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves((new_state.params, new_state.opt_state))} <= {
        jnp.dtype(jnp.float32),
        jnp.dtype(jnp.int32),
    }
    for r0, p, r in zip(
        *(jax.tree.leaves(t) for t in (ref0, new_state.params, new_state.ref_params))
    ):
        expect = _bf16_round(
            np.float32(0.6) * np.asarray(p) + np.float32(0.4) * r0.astype(np.float32)
        )
        np.testing.assert_array_equal(np.asarray(r).view(np.uint16), expect.view(np.uint16))
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(new_state.params))
    assert 2 * sum(x.nbytes for x in jax.tree.leaves(new_state.ref_params)) == param_bytes
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(new_state))
    assert compiled.memory_analysis().alias_size_in_bytes >= state_bytes  # still in place
    zeros = tuple(np.zeros(config.data.num_eval, np.float32) for _ in range(2))
    evals, logps = loop._run_eval(built.eval_step, new_state, built.data, zeros, built.mesh, 32)
    assert np.isfinite(evals["eval/loss"]) and np.all(np.isfinite(logps[0]))


# ----------------------------------------------------------------------------
# Benchmark.


@pytest.mark.slow
def test_bench_memory_reports_each_lever_against_the_baseline(tiny_config, tmp_path):
    out = str(tmp_path / "mem.json")
    config = tiny_config(**ONE_LAYER, **{"model.vocab_size": 256})
    report, table = bench.memory(
        config, out, chunk_size=4, levers=["logps chunk 4"], devices=jax.devices()[:1]
    )
    saved = json.loads(open(out).read())
    assert [r["lever"] for r in saved["results"]] == ["baseline", "logps chunk 4"]
    base, chunked = saved["results"]
    assert base["total_vs_baseline"] == 1.0 and base["total_saved_bytes"] == 0
    assert chunked["overrides"] == {"train.logps_chunk_size": 4}
    logits_bytes = 2 * 8 * 15 * 256 * 4  # one [2B, T, V] float32 array, B = 8, T = 15
    assert chunked["temp_saved_bytes"] == base["temp_bytes"] - chunked["temp_bytes"]
    assert chunked["temp_saved_bytes"] > logits_bytes / 2
    assert chunked["residual_saved_bytes"] > logits_bytes / 2
    assert base["total_bytes"] == (
        base["argument_bytes"] + base["output_bytes"] - base["alias_bytes"] + base["temp_bytes"]
    )
    assert base["params"] == saved["params"] > 0 and saved["seq_len"] == 16
    assert open(out + ".md").read().strip() == table
