"""Tests for tr_align.models.llama against an independent float64 numpy reference."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import packing_checks
import pytest

from tr_align.models import LlamaConfig, count_params, llama, make_model

V, D, F, L, H, KV, HD = 50, 24, 40, 2, 4, 2, 8  # head_dim 8 != D // H = 6 on purpose


def llama_config(**kw) -> LlamaConfig:
    base = dict(
        vocab_size=V,
        hidden_size=D,
        intermediate_size=F,
        num_hidden_layers=L,
        num_attention_heads=H,
        num_key_value_heads=KV,
        head_dim=HD,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
    )
    base.update(kw)
    return LlamaConfig(**base)


@functools.cache
def jitted(cfg):
    """(init_fn, apply_fn) of make_model(cfg), jitted (eager dispatch is slow on CPU)."""
    init_fn, apply_fn = make_model(cfg)
    return jax.jit(init_fn), jax.jit(apply_fn)


@functools.cache
def _superset_params(cfg, seed):
    """Our init for the untied + qkv_bias variant of cfg (a superset of all variants)."""
    full = dataclasses.replace(cfg, tie_word_embeddings=False, qkv_bias=True)
    return jitted(full)[0](jax.random.PRNGKey(seed))


def init_params(cfg, seed=0, perturb=True):
    """Our init (pruned from the superset variant: one init compile per shape family),
    plus noise on norms/biases so that ones/zeros don't hide bugs."""
    params = jax.tree.map(
        lambda x: x,
        _superset_params(dataclasses.replace(cfg, tie_word_embeddings=False, qkv_bias=False), seed),
    )
    if cfg.tie_word_embeddings:
        del params["lm_head"]
    if not cfg.qkv_bias:
        for i in range(cfg.num_hidden_layers):
            for n in ("q_proj", "k_proj", "v_proj"):
                del params[f"layers_{i}"]["self_attn"][n]["bias"]
    assert jax.tree.structure(params) == jax.tree.structure(
        jax.eval_shape(make_model(cfg)[0], jax.random.PRNGKey(0))
    )
    if not perturb:
        return params
    leaves, treedef = jax.tree.flatten_with_path(params)
    rng = np.random.default_rng(seed + 100)
    out = []
    for path, x in leaves:
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            x = x + 0.3 * rng.standard_normal(x.shape).astype(np.float32)
        elif "bias" in name:
            x = x + 0.5 * rng.standard_normal(x.shape).astype(np.float32)
        else:
            # Bigger weights -> non-trivial attention patterns.
            x = x * 5.0
        out.append(jnp.asarray(x, jnp.float32))
    return jax.tree.unflatten(treedef, out)


# ---------------------------------------------------------------------------
# Independent numpy reference (float64), written from the HF formulas.


def np_rmsnorm(x, w, eps):
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def np_rope(x_TE, positions, theta):
    """x [T, E] for one head; HF rotate_half."""
    e = x_TE.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, e, 2) / e)
    ang = positions[:, None] * inv_freq[None, :]
    cos = np.cos(np.concatenate([ang, ang], -1))
    sin = np.sin(np.concatenate([ang, ang], -1))
    x1, x2 = x_TE[:, : e // 2], x_TE[:, e // 2 :]
    rot = np.concatenate([-x2, x1], -1)
    return x_TE * cos + rot * sin


def np_forward(p, cfg, ids, mask):
    """Reference forward for one sequence at a time; returns logits [B, T, V]."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    h, kv, e = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    group = h // kv
    out = []
    for b in range(ids.shape[0]):
        t = ids.shape[1]
        x = p["embed_tokens"]["embedding"][ids[b]]
        pos = np.arange(t, dtype=np.float64)
        allowed = np.tril(np.ones((t, t), bool)) & mask[b][None, :].astype(bool)
        for i in range(cfg.num_hidden_layers):
            lp = p[f"layers_{i}"]
            a = lp["self_attn"]
            y = np_rmsnorm(x, lp["input_layernorm"]["scale"], cfg.rms_norm_eps)
            proj = {}
            for n in ("q_proj", "k_proj", "v_proj"):
                proj[n] = y @ a[n]["kernel"] + (a[n]["bias"] if cfg.qkv_bias else 0.0)
            heads = []
            for qh in range(h):
                kh = qh // group  # contiguous groups (repeat_kv)
                q = np_rope(proj["q_proj"][:, qh * e : (qh + 1) * e], pos, cfg.rope_theta)
                k = np_rope(proj["k_proj"][:, kh * e : (kh + 1) * e], pos, cfg.rope_theta)
                v = proj["v_proj"][:, kh * e : (kh + 1) * e]
                s = q @ k.T / np.sqrt(e)
                s = np.where(allowed, s, -1e300)
                s = s - s.max(-1, keepdims=True)
                w = np.exp(s)
                w = w / w.sum(-1, keepdims=True)
                heads.append(w @ v)
            x = x + np.concatenate(heads, -1) @ a["o_proj"]["kernel"]
            m = lp["mlp"]
            y = np_rmsnorm(x, lp["post_attention_layernorm"]["scale"], cfg.rms_norm_eps)
            g = y @ m["gate_proj"]["kernel"]
            silu = g / (1.0 + np.exp(-g))
            x = x + (silu * (y @ m["up_proj"]["kernel"])) @ m["down_proj"]["kernel"]
        x = np_rmsnorm(x, p["norm"]["scale"], cfg.rms_norm_eps)
        if cfg.tie_word_embeddings:
            out.append(x @ p["embed_tokens"]["embedding"].T)
        else:
            out.append(x @ p["lm_head"]["kernel"])
    return np.stack(out)


def right_padded_batch(seed=0, t=7, lengths=(7, 4, 1)):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, size=(len(lengths), t)).astype(np.int32)
    mask = np.zeros((len(lengths), t), np.int32)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
        ids[b, n:] = 0  # pad token
    return ids, mask


# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tie,qkv_bias", [(False, False), (True, False), (False, True), (True, True)]
)
def test_matches_numpy_reference(tie, qkv_bias):
    cfg = llama_config(tie_word_embeddings=tie, qkv_bias=qkv_bias)
    params = init_params(cfg)
    ids, mask = right_padded_batch()
    _, apply_fn = jitted(cfg)
    got = np.asarray(apply_fn(params, jnp.asarray(ids), jnp.asarray(mask)))
    want = np_forward(params, cfg, ids, mask)
    assert got.dtype == np.float32 and got.shape == (3, 7, V)
    assert np.std(want) > 0.1  # non-degenerate logits
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=1e-4)


def test_key_mask_with_holes_matches_reference():
    """With right padding the key mask is implied by causality; a mask with holes
    checks that masked keys really are excluded (positions stay arange(T))."""
    cfg = llama_config(qkv_bias=True)
    params = init_params(cfg)
    ids, _ = right_padded_batch(seed=3)
    mask = np.array([[1, 1, 0, 1, 1, 1, 0], [1, 0, 0, 1, 0, 1, 1], [1] * 7], np.int32)
    got = np.asarray(jitted(cfg)[1](params, ids, mask))
    want = np_forward(params, cfg, ids, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=1e-4)


def test_reference_sensitive_to_gqa_grouping():
    """Guard that the reference comparison can fail: tile-style grouping differs."""
    cfg = llama_config()
    params = init_params(cfg)
    ids, mask = right_padded_batch()
    _, apply_fn = jitted(cfg)
    got = np.asarray(apply_fn(params, jnp.asarray(ids), jnp.asarray(mask)))
    # Swap the two kv heads in every layer: equivalent to a wrong head->kv map.
    swapped = jax.tree.map(np.array, params)
    for i in range(L):
        for n in ("k_proj", "v_proj"):
            k = swapped[f"layers_{i}"]["self_attn"][n]["kernel"]
            swapped[f"layers_{i}"]["self_attn"][n]["kernel"] = np.concatenate(
                [k[:, HD:], k[:, :HD]], axis=1
            )
    want = np_forward(swapped, cfg, ids, mask)
    assert np.max(np.abs(got - want)[mask.astype(bool)]) > 1e-2


def test_causality():
    cfg = llama_config()
    params = init_params(cfg)
    _, apply_fn = jitted(cfg)
    ids, mask = right_padded_batch(lengths=(7, 7, 7))
    base = np.asarray(apply_fn(params, ids, mask))
    ids2 = ids.copy()
    ids2[:, 4] = (ids2[:, 4] + 1) % V
    changed = np.asarray(apply_fn(params, ids2, mask))
    np.testing.assert_array_equal(base[:, :4], changed[:, :4])
    assert np.max(np.abs(base[:, 4:] - changed[:, 4:])) > 1e-3


def test_padding_matches_unpadded_and_no_nans():
    cfg = llama_config(qkv_bias=True)
    params = init_params(cfg)
    _, apply_fn = jitted(cfg)
    ids, mask = right_padded_batch(lengths=(7, 4, 0))
    # Garbage (non-zero) pad tokens must not matter either.
    ids[1, 4:] = [3, 5, 7]
    padded = np.asarray(apply_fn(params, ids, mask))
    assert np.all(np.isfinite(padded))  # including the fully padded row
    short = np.asarray(apply_fn(params, ids[1:2, :4], np.ones((1, 4), np.int32)))
    np.testing.assert_allclose(padded[1, :4], short[0], atol=1e-5, rtol=1e-5)


def test_fully_padded_row_does_not_leak():
    cfg = llama_config()
    params = init_params(cfg)
    _, apply_fn = jitted(cfg)
    ids, mask = right_padded_batch(lengths=(7, 0))
    both = np.asarray(apply_fn(params, ids, mask))
    alone = np.asarray(apply_fn(params, ids[:1], mask[:1]))
    np.testing.assert_allclose(both[0], alone[0], atol=1e-6)
    assert np.all(np.isfinite(both))


PACKING_VARIANTS = {
    "gqa": {},
    "tied,qkv_bias": {"tie_word_embeddings": True, "qkv_bias": True},
    "mha,sliding_window": {"num_key_value_heads": H, "sliding_window": 3},
}


@pytest.mark.parametrize("variant", sorted(PACKING_VARIANTS))
def test_packed_segments_match_sequences_alone(variant):
    cfg = llama_config(**PACKING_VARIANTS[variant])
    packing_checks.check_packed_segments(jitted(cfg)[1], init_params(cfg), V, atol=2e-5)


@pytest.mark.parametrize("variant", sorted(PACKING_VARIANTS))
def test_prefix_branches_match_plain_sequences(variant):
    cfg = llama_config(**PACKING_VARIANTS[variant])
    packing_checks.check_prefix_branches(jitted(cfg)[1], init_params(cfg), V, atol=2e-5)


def test_segment_ids_equal_attention_mask_and_numpy_reference():
    cfg = llama_config(qkv_bias=True, sliding_window=4)
    params = init_params(cfg)
    ids, mask = right_padded_batch(lengths=(7, 4, 0))
    packing_checks.check_segments_equal_attention_mask(jitted(cfg)[1], params, ids, mask)
    got = np.asarray(jitted(cfg)[1](params, ids, mask))
    want = np_forward(params, dataclasses.replace(cfg, sliding_window=None), ids, mask)
    real = mask.astype(bool)
    # The window (4 < 7) really cuts keys: the reference without it differs on row 0.
    assert np.abs(got[0] - want[0]).max() > 1e-3
    np.testing.assert_allclose(got[1, :4], want[1, :4], atol=1e-4, rtol=1e-4)
    assert real.sum() == 11


@pytest.mark.parametrize("t", [64, 65, 200])
def test_blocked_causal_attention_equals_full(t):
    """common.attention(causal=True) takes the queries in blocks (keys up to the block's end
    only); on a causal packed mask it equals the one-block computation, GQA included."""
    from tr_align.models import common

    rng = np.random.default_rng(0)
    b, h, kv, e = 2, 4, 2, 8
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, n, e)), jnp.float32) for n in (h, kv, kv))
    seg = np.sort(rng.integers(1, 4, (b, t)), axis=1)
    seg[1, -10:] = 0  # padding
    br = np.zeros((b, t), np.int32)
    br[0, t // 2 :] = 1 + (np.arange(t - t // 2) >= (t - t // 2) // 2)
    mask, _ = common.plain_mask((b, t), None, None, jnp.asarray(seg), jnp.asarray(br))
    full = np.asarray(common.attention(q, k, v, mask))
    blocked = np.asarray(jax.jit(functools.partial(common.attention, causal=True))(q, k, v, mask))
    np.testing.assert_allclose(blocked, full, atol=1e-5, rtol=1e-5)
    assert np.abs(full[:, 1:] - full[:, :-1]).max() > 0.1  # not a constant output


def test_gqa_equals_mha_with_repeated_kv():
    cfg_gqa = llama_config()
    cfg_mha = llama_config(num_key_value_heads=H)
    p_gqa = init_params(cfg_gqa, perturb=True)
    p_mha = jax.tree.map(np.array, p_gqa)
    for i in range(L):
        a = p_mha[f"layers_{i}"]["self_attn"]
        for n in ("k_proj", "v_proj"):
            k_DKE = a[n]["kernel"].reshape(D, KV, HD)
            a[n]["kernel"] = np.repeat(k_DKE, H // KV, axis=1).reshape(D, H * HD)
    ids, mask = right_padded_batch()
    out_gqa = np.asarray(jitted(cfg_gqa)[1](p_gqa, ids, mask))
    out_mha = np.asarray(jitted(cfg_mha)[1](p_mha, ids, mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(out_gqa[real], out_mha[real], atol=1e-5, rtol=1e-5)


def test_rope_matches_numpy_formula():
    t, e, theta = 11, 16, 500.0
    x = np.random.default_rng(0).standard_normal((2, t, 3, e)).astype(np.float32)
    cos, sin = llama.rope_cos_sin(jnp.arange(t), e, theta)
    got = np.asarray(llama.apply_rope(jnp.asarray(x), cos, sin))
    pos = np.arange(t, dtype=np.float64)
    for b in range(2):
        for n in range(3):
            want = np_rope(x[b, :, n].astype(np.float64), pos, theta)
            np.testing.assert_allclose(got[b, :, n], want, atol=1e-5)
    # Hand check: position 1, E=4, theta=100 -> inv_freq (1, 0.1); pairs (0,2), (1,3).
    cos, sin = llama.rope_cos_sin(jnp.array([1]), 4, 100.0)
    xr = np.asarray(llama.apply_rope(jnp.array([[[[1.0, 2.0, 3.0, 4.0]]]]), cos, sin))
    c1, s1, c2, s2 = np.cos(1), np.sin(1), np.cos(0.1), np.sin(0.1)
    np.testing.assert_allclose(
        xr[0, 0, 0], [1 * c1 - 3 * s1, 2 * c2 - 4 * s2, 3 * c1 + 1 * s1, 4 * c2 + 2 * s2], atol=1e-6
    )


def test_rope_scores_depend_on_relative_position_only():
    e = 8
    rng = np.random.default_rng(1)
    q = rng.standard_normal(e).astype(np.float32)
    k = rng.standard_normal(e).astype(np.float32)
    cos, sin = llama.rope_cos_sin(jnp.arange(20), e, 10000.0)
    rq = np.asarray(llama.apply_rope(jnp.broadcast_to(q, (1, 20, 1, e)), cos, sin))[0, :, 0]
    rk = np.asarray(llama.apply_rope(jnp.broadcast_to(k, (1, 20, 1, e)), cos, sin))[0, :, 0]
    np.testing.assert_allclose(rq[5] @ rk[2], rq[15] @ rk[12], atol=1e-4)
    np.testing.assert_allclose(rq[3] @ rk[3], q @ k, atol=1e-4)
    assert abs(rq[5] @ rk[2] - rq[5] @ rk[3]) > 1e-3


def test_jit_matches_eager():
    cfg = llama_config(qkv_bias=True)
    params = init_params(cfg)
    _, apply_fn = make_model(cfg)  # un-jitted
    ids, mask = right_padded_batch()
    eager = np.asarray(apply_fn(params, ids, mask))
    jitted = np.asarray(jax.jit(apply_fn)(params, ids, mask))
    np.testing.assert_allclose(eager, jitted, atol=1e-5, rtol=1e-5)


def test_bfloat16_close_to_float32():
    cfg32 = llama_config()
    cfg16 = dataclasses.replace(cfg32, dtype="bfloat16")
    params = init_params(cfg32, perturb=False)
    init16 = jax.eval_shape(make_model(cfg16)[0], jax.random.PRNGKey(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(init16))
    ids, mask = right_padded_batch()
    out32 = np.asarray(jitted(cfg32)[1](params, ids, mask))
    out16 = jitted(cfg16)[1](params, ids, mask)
    assert out16.dtype == jnp.float32
    out16 = np.asarray(out16)
    real = mask.astype(bool)
    assert np.all(np.isfinite(out16))
    scale = np.max(np.abs(out32[real]))
    assert np.max(np.abs(out16[real] - out32[real])) < 0.05 * scale + 0.02


def expected_shapes(cfg):
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    h, kv, e = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    shapes = {"embed_tokens/embedding": (v, d), "norm/scale": (d,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head/kernel"] = (d, v)
    for i in range(cfg.num_hidden_layers):
        pre = f"layers_{i}/"
        shapes[pre + "input_layernorm/scale"] = (d,)
        shapes[pre + "post_attention_layernorm/scale"] = (d,)
        shapes[pre + "self_attn/q_proj/kernel"] = (d, h * e)
        shapes[pre + "self_attn/k_proj/kernel"] = (d, kv * e)
        shapes[pre + "self_attn/v_proj/kernel"] = (d, kv * e)
        shapes[pre + "self_attn/o_proj/kernel"] = (h * e, d)
        if cfg.qkv_bias:
            shapes[pre + "self_attn/q_proj/bias"] = (h * e,)
            shapes[pre + "self_attn/k_proj/bias"] = (kv * e,)
            shapes[pre + "self_attn/v_proj/bias"] = (kv * e,)
        shapes[pre + "mlp/gate_proj/kernel"] = (d, f)
        shapes[pre + "mlp/up_proj/kernel"] = (d, f)
        shapes[pre + "mlp/down_proj/kernel"] = (f, d)
    return shapes


def flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        assert type(tree) is dict, type(tree)
        if isinstance(v, dict):
            out.update(flatten(v, prefix + k + "/"))
        else:
            out[prefix + k] = v
    return out


@pytest.mark.parametrize("tie,qkv_bias", [(False, False), (True, True)])
def test_param_tree_and_count(tie, qkv_bias):
    cfg = llama_config(tie_word_embeddings=tie, qkv_bias=qkv_bias)
    # Structure/shapes/dtypes from tracing our init (no compile needed) ...
    params = jax.eval_shape(make_model(cfg)[0], jax.random.PRNGKey(0))
    flat = flatten(params)
    assert {k: tuple(v.shape) for k, v in flat.items()} == expected_shapes(cfg)
    assert all(v.dtype == jnp.float32 for v in flat.values())
    # ... values from a concrete init of the superset (untied + qkv_bias) variant:
    # norms ones, biases zeros, kernels/embeddings ~ N(0, 0.02).
    for k, v in flatten(_superset_params(cfg, 0)).items():
        v = np.asarray(v)
        if k.endswith("scale"):
            np.testing.assert_array_equal(v, 1.0)
        elif k.endswith("bias"):
            np.testing.assert_array_equal(v, 0.0)
        else:
            assert abs(v.mean()) < 0.01 and 0.015 < v.std() < 0.025, k
    d, f, v, e = D, F, V, HD
    per_layer = (
        2 * d
        + d * H * e
        + 2 * d * KV * e
        + H * e * d
        + 3 * d * f
        + (H * e + 2 * KV * e if qkv_bias else 0)
    )
    want = v * d + L * per_layer + d + (0 if tie else d * v)
    assert count_params(params) == want


def test_config_defaults_and_validation():
    base = dict(
        vocab_size=10,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
    )
    cfg = LlamaConfig(**base)
    assert cfg.num_key_value_heads == 4 and cfg.head_dim == 8
    with pytest.raises(ValueError, match="hidden_size.*num_attention_heads"):
        LlamaConfig(**{**base, "hidden_size": 30})
    # Explicit head_dim lifts the divisibility requirement.
    assert LlamaConfig(**{**base, "hidden_size": 30, "head_dim": 8}).head_dim == 8
    with pytest.raises(ValueError, match="num_attention_heads.*num_key_value_heads"):
        LlamaConfig(**{**base, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="dtype"):
        llama_config(dtype="float16")


def test_config_from_dict():
    d = dataclasses.asdict(llama_config())
    assert LlamaConfig.from_dict(d) == llama_config()
    with pytest.raises(ValueError, match="torch_dtype"):
        LlamaConfig.from_dict({**d, "torch_dtype": "float32"})
