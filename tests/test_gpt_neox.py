"""Tests for tr_align.models.gpt_neox.

References: transformers' own float32 eager logits for a tiny random GPTNeoXForCausalLM
(``tests/fixtures/hf/gpt_neox``, written by ``tests/fixtures/make_hf_fixtures.py``) and an
independent float64 numpy forward over the HF tensors. Imports neither torch nor
transformers.
"""

import dataclasses
import functools
import json
import math
import pathlib

import jax
import ml_dtypes
import numpy as np
import packing_checks
import pytest
from safetensors.numpy import load_file

from tr_align.models import gpt_neox as gx

FIXTURE = pathlib.Path(__file__).resolve().parent / "fixtures" / "hf" / "gpt_neox"


def fixture_config() -> dict:
    return json.loads((FIXTURE / "config.json").read_text())


def fixture_tensors() -> dict:
    return load_file(FIXTURE / "model.safetensors")


@functools.cache
def _reference():
    ref = np.load(FIXTURE / "reference.npz")
    return ref["input_ids"], ref["attention_mask"], ref["logits"]


@functools.cache
def jitted_apply(cfg):
    return jax.jit(gx.make_model(cfg)[1])


def fixture_logits(config: dict, tensors: dict | None = None, jit=True, **overrides):
    """Our logits on the fixture batch for an HF config dict (+ config field overrides)."""
    cfg = dataclasses.replace(gx.config_from_hf(config), **overrides)
    params = gx.params_from_hf((tensors or fixture_tensors()).__getitem__, cfg)
    ids, mask, _ = _reference()
    apply_fn = jitted_apply(cfg) if jit else gx.make_model(cfg)[1]
    return np.asarray(apply_fn(params, ids, mask))


def max_err(a, b):
    """Max |a - b| over the non-padded positions of the fixture batch."""
    keep = _reference()[1].astype(bool)
    return float(np.abs(np.asarray(a, np.float64) - b)[keep].max())


# ----------------------------------------------------------------------------
# Independent float64 numpy forward over HF-named tensors (torch layout).

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
NP_ACTS = {
    "gelu": lambda x: 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0))),
    "gelu_new": lambda x: 0.5 * x * (1.0 + np.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x**3))),
    "relu": lambda x: np.maximum(x, 0.0),
    "silu": lambda x: x / (1.0 + np.exp(-x)),
}


def np_forward(t: dict, cfg: gx.GPTNeoXConfig, ids, mask):
    """GPT-NeoX logits [B,T,V] in float64, written from the HF modeling file's semantics."""
    t = {k: np.asarray(v, np.float64) for k, v in t.items()}
    b, n = ids.shape
    d, h = cfg.hidden_size, cfg.num_attention_heads
    e = d // h
    r = int(e * cfg.rotary_pct)
    assert r % 2 == 0
    act = NP_ACTS[cfg.hidden_act]

    def layer_norm(x, name):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + cfg.layer_norm_eps) * t[f"{name}.weight"] + t[
            f"{name}.bias"
        ]

    def linear(x, name):
        y = x @ t[f"{name}.weight"].T
        return y + t[f"{name}.bias"] if f"{name}.bias" in t else y

    # Dim j < r/2 of a head pairs with dim j + r/2; both turn by angle pos * base^(-2j/r).
    angle = np.arange(n)[:, None] * cfg.rotary_emb_base ** (-2.0 * np.arange(r // 2) / r)
    cos, sin = np.cos(angle)[None, :, None, :], np.sin(angle)[None, :, None, :]

    def rope(x):
        x1, x2, rest = x[..., : r // 2], x[..., r // 2 : r], x[..., r:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)

    allowed = np.tril(np.ones((n, n), bool))[None] & mask.astype(bool)[:, None, :]

    def attn(x, pre):
        qkv = linear(x, f"{pre}.attention.query_key_value").reshape(b, n, h, 3, e)
        q, k, v = rope(qkv[..., 0, :]), rope(qkv[..., 1, :]), qkv[..., 2, :]
        s = np.einsum("bthe,bshe->bhts", q, k) / math.sqrt(e)
        s = np.where(allowed[:, None], s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        return linear(np.einsum("bhts,bshe->bthe", p, v).reshape(b, n, d), f"{pre}.attention.dense")

    def mlp(x, pre):
        return linear(act(linear(x, f"{pre}.mlp.dense_h_to_4h")), f"{pre}.mlp.dense_4h_to_h")

    x = t["gpt_neox.embed_in.weight"][ids]
    for i in range(cfg.num_hidden_layers):
        pre = f"gpt_neox.layers.{i}"
        a = attn(layer_norm(x, f"{pre}.input_layernorm"), pre)
        if cfg.use_parallel_residual:
            x = x + a + mlp(layer_norm(x, f"{pre}.post_attention_layernorm"), pre)
        else:
            x = x + a
            x = x + mlp(layer_norm(x, f"{pre}.post_attention_layernorm"), pre)
    x = layer_norm(x, "gpt_neox.final_layer_norm")
    out = t["gpt_neox.embed_in.weight"] if cfg.tie_word_embeddings else t["embed_out.weight"]
    return x @ out.T


def random_hf_tensors(cfg: gx.GPTNeoXConfig, seed=0, std=0.3) -> dict:
    """Random float32 tensors under HF names/shapes (listed here, independently of gx)."""
    v, d, f = cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size
    shapes = {"gpt_neox.embed_in.weight": (v, d)}
    for i in range(cfg.num_hidden_layers):
        pre = f"gpt_neox.layers.{i}"
        for ln in ("input_layernorm", "post_attention_layernorm"):
            shapes[f"{pre}.{ln}.weight"] = shapes[f"{pre}.{ln}.bias"] = (d,)
        shapes[f"{pre}.attention.query_key_value.weight"] = (3 * d, d)
        shapes[f"{pre}.attention.dense.weight"] = (d, d)
        if cfg.attention_bias:
            shapes[f"{pre}.attention.query_key_value.bias"] = (3 * d,)
            shapes[f"{pre}.attention.dense.bias"] = (d,)
        shapes[f"{pre}.mlp.dense_h_to_4h.weight"] = (f, d)
        shapes[f"{pre}.mlp.dense_h_to_4h.bias"] = (f,)
        shapes[f"{pre}.mlp.dense_4h_to_h.weight"] = (d, f)
        shapes[f"{pre}.mlp.dense_4h_to_h.bias"] = (d,)
    shapes["gpt_neox.final_layer_norm.weight"] = shapes["gpt_neox.final_layer_norm.bias"] = (d,)
    if not cfg.tie_word_embeddings:
        shapes["embed_out.weight"] = (v, d)
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        noise = rng.standard_normal(shape).astype(np.float32)
        is_scale = "norm" in name and name.endswith("weight")
        out[name] = (1.0 + 0.1 * noise) if is_scale else std * noise
    return out


def small_config(**kw) -> gx.GPTNeoXConfig:
    base = dict(
        vocab_size=40,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,  # head_dim 16, 4 rotary dims at rotary_pct 0.25
        max_position_embeddings=64,
    )
    base.update(kw)
    return gx.GPTNeoXConfig(**base)


def small_batch(cfg, seed=1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab_size, (3, 9)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    ids[mask == 0] = 0
    return ids, mask


# ----------------------------------------------------------------------------
# Against transformers' reference logits.


@pytest.mark.parametrize("jit", [False, True])
def test_matches_transformers_float32(jit):
    logits = fixture_logits(fixture_config(), jit=jit)
    ids, mask, ref = _reference()
    assert logits.shape == ref.shape and logits.dtype == np.float32
    assert np.all(np.isfinite(logits))
    assert max_err(logits, ref) < 1e-4


def test_matches_transformers_bfloat16():
    logits = fixture_logits(fixture_config(), dtype="bfloat16")
    ref = _reference()[2]
    assert logits.dtype == np.float32
    err = max_err(logits, ref)
    assert 0 < err < 0.05  # bf16 compute really happens, and stays close


def test_numpy_reference_matches_transformers():
    ids, mask, ref = _reference()
    ours = np_forward(fixture_tensors(), gx.config_from_hf(fixture_config()), ids, mask)
    assert max_err(ours, ref) < 1e-5


def test_hub_spelling_gives_same_config_and_logits():
    hub = fixture_config()
    rope = hub.pop("rope_parameters")
    hub.update(
        rotary_pct=rope["partial_rotary_factor"],
        rotary_emb_base=rope["rope_theta"],
        rope_theta=1e6,  # not what sets the gpt_neox base
        rope_scaling=None,
        torch_dtype="float16",
        transformers_version="4.24.0",
    )
    hub.pop("dtype")
    assert gx.config_from_hf(hub) == gx.config_from_hf(fixture_config())
    ref = _reference()[2]
    assert max_err(fixture_logits(hub), ref) < 1e-4
    # Both rotary fields are read from each spelling (fixture: 2 rotary dims, where the
    # base has no effect, so widen the rotary part).
    hub_wide = {**hub, "rotary_pct": 1.0, "rotary_emb_base": 100.0}
    new = fixture_config()
    new["rope_parameters"] = {**new["rope_parameters"], "partial_rotary_factor": 1.0}
    new_wide = {**new, "rope_parameters": {**new["rope_parameters"], "rope_theta": 100.0}}
    assert gx.config_from_hf(hub_wide) == gx.config_from_hf(new_wide)
    wide = fixture_logits(new_wide)
    np.testing.assert_array_equal(fixture_logits(hub_wide), wide)
    assert max_err(fixture_logits(new), ref) > 1e-3  # rotary_pct 1.0 vs 0.25
    assert max_err(wide, fixture_logits(new)) > 1e-3  # base 100 vs 10000
    # rope_parameters wins over the top-level hub keys (as in transformers).
    both = {**new, "rotary_emb_base": 5.0, "rotary_pct": 0.5}
    assert (gx.config_from_hf(both).rotary_emb_base, gx.config_from_hf(both).rotary_pct) == (
        10000.0,
        1.0,
    )


def test_sequential_residual_changes_logits_and_matches_numpy():
    config = {**fixture_config(), "use_parallel_residual": False}
    logits = fixture_logits(config)
    ids, mask, ref = _reference()
    assert max_err(logits, ref) > 1e-2
    expected = np_forward(fixture_tensors(), gx.config_from_hf(config), ids, mask)
    assert max_err(logits, expected) < 1e-4


# ----------------------------------------------------------------------------
# Against the numpy forward on random weights.


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"use_parallel_residual": False},
        {"tie_word_embeddings": True},
        {"attention_bias": False},
        {"rotary_pct": 1.0, "rotary_emb_base": 500.0},
        {"rotary_pct": 0.5, "hidden_act": "gelu_new"},
        {"rotary_pct": 0.0, "hidden_act": "relu"},
        {"hidden_act": "silu", "use_parallel_residual": False},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default",
)
def test_matches_numpy_reference(overrides):
    cfg = small_config(**overrides)
    tensors = random_hf_tensors(cfg)
    params = gx.params_from_hf(tensors.__getitem__, cfg)
    ids, mask = small_batch(cfg)
    logits = np.asarray(jitted_apply(cfg)(params, ids, mask))
    expected = np_forward(tensors, cfg, ids, mask)
    keep = mask.astype(bool)
    assert np.all(np.isfinite(logits))
    np.testing.assert_allclose(logits[keep], expected[keep], atol=2e-4, rtol=0)


def test_padding_does_not_leak():
    cfg = gx.config_from_hf(fixture_config())
    ids, mask, _ = _reference()
    params = gx.params_from_hf(fixture_tensors().__getitem__, cfg)
    other = ids.copy()
    other[mask == 0] = 7
    a = np.asarray(jitted_apply(cfg)(params, ids, mask))
    b = np.asarray(jitted_apply(cfg)(params, other, mask))
    keep = mask.astype(bool)
    np.testing.assert_array_equal(a[keep], b[keep])
    assert np.all(np.isfinite(a))


PACKING_VARIANTS = {
    "partial_rotary": {},
    "tied,sequential,full_rotary": {
        "tie_word_embeddings": True,
        "use_parallel_residual": False,
        "rotary_pct": 1.0,
    },
}


@pytest.mark.parametrize("variant", sorted(PACKING_VARIANTS))
def test_packed_inputs_match_sequences_alone(variant):
    cfg = small_config(**PACKING_VARIANTS[variant])
    params = gx.params_from_hf(random_hf_tensors(cfg).__getitem__, cfg)
    apply_fn = jitted_apply(cfg)
    packing_checks.check_packed_segments(apply_fn, params, cfg.vocab_size, atol=1e-4)
    packing_checks.check_prefix_branches(apply_fn, params, cfg.vocab_size, atol=1e-4)
    ids, mask = small_batch(cfg)
    packing_checks.check_segments_equal_attention_mask(apply_fn, params, ids, mask)


# ----------------------------------------------------------------------------
# Weight conversion.


def test_params_round_trip_fixture_exactly():
    tensors = fixture_tensors()
    cfg = gx.config_from_hf(fixture_config())
    params = gx.params_from_hf(tensors.__getitem__, cfg)
    assert params["layers_0"]["attention"]["query_key_value"]["kernel"].shape == (32, 96)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))
    back = gx.params_to_hf(params, cfg)
    assert sorted(back) == sorted(tensors) == sorted(gx.hf_tensor_names(cfg))
    for name, value in tensors.items():
        assert back[name].dtype == np.float32 and back[name].flags.c_contiguous
        np.testing.assert_array_equal(back[name], value, err_msg=name)


@pytest.mark.parametrize(
    "overrides", [{}, {"tie_word_embeddings": True}, {"attention_bias": False}]
)
def test_init_tree_matches_hf_conversion(overrides):
    cfg = small_config(**overrides)
    shapes = jax.eval_shape(gx.make_model(cfg)[0], jax.random.PRNGKey(0))
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(shapes))
    assert ("embed_out" in shapes) == (not cfg.tie_word_embeddings)
    qkv = shapes["layers_1"]["attention"]["query_key_value"]
    assert qkv["kernel"].shape == (64, 192)
    assert ("bias" in qkv) == cfg.attention_bias
    hf = gx.params_to_hf(jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes), cfg)
    expected = random_hf_tensors(cfg)
    assert sorted(hf) == sorted(expected) == sorted(gx.hf_tensor_names(cfg))
    assert {k: v.shape for k, v in hf.items()} == {k: v.shape for k, v in expected.items()}


def test_init_params_round_trip():
    cfg = small_config()
    params = jax.jit(gx.make_model(cfg)[0])(jax.random.PRNGKey(0))
    back = gx.params_from_hf(gx.params_to_hf(params, cfg).__getitem__, cfg)
    jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, params))


def test_old_checkpoint_buffers_are_the_ignored_suffixes():
    cfg = gx.config_from_hf(fixture_config())
    names = set(gx.hf_tensor_names(cfg))
    buffers = [
        "gpt_neox.layers.0.attention.bias",
        "gpt_neox.layers.0.attention.masked_bias",
        "gpt_neox.layers.1.attention.rotary_emb.inv_freq",
    ]
    assert all(b.endswith(gx.IGNORED_HF_SUFFIXES) and b not in names for b in buffers)
    assert not any(n.endswith(gx.IGNORED_HF_SUFFIXES) for n in names)


@pytest.mark.parametrize(
    "name", ["embed_out.weight", "gpt_neox.layers.1.attention.query_key_value.bias"]
)
def test_missing_tensor_raises_naming_it(name):
    tensors = fixture_tensors()
    del tensors[name]
    with pytest.raises(KeyError, match=name.replace(".", r"\.")):
        gx.params_from_hf(tensors.__getitem__, gx.config_from_hf(fixture_config()))


def test_wrong_shape_raises_naming_tensor_and_shapes():
    name = "gpt_neox.layers.0.attention.query_key_value.weight"
    tensors = fixture_tensors()
    tensors[name] = tensors[name].T  # [in, out] instead of torch's [out, in]
    with pytest.raises(ValueError) as info:
        gx.params_from_hf(tensors.__getitem__, gx.config_from_hf(fixture_config()))
    msg = str(info.value)
    assert name in msg and "(96, 32)" in msg and "(32, 96)" in msg


def test_bfloat16_checkpoint_loads_as_float32(tmp_path):
    """params_from_hf leaves dtypes alone; tr_align.hf casts to the requested dtype."""
    import shutil

    from safetensors.numpy import save_file

    from tr_align import hf

    shutil.copy(FIXTURE / "config.json", tmp_path / "config.json")
    tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in fixture_tensors().items()}
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    _, params, _ = hf.load_pretrained(str(tmp_path), dtype="float32")
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))
    emb = np.asarray(params["embed_in"]["embedding"])
    np.testing.assert_array_equal(emb, tensors["gpt_neox.embed_in.weight"].astype(np.float32))


def test_params_to_hf_rejects_bad_trees():
    cfg = gx.config_from_hf(fixture_config())
    params = gx.params_from_hf(fixture_tensors().__getitem__, cfg)
    tied = dataclasses.replace(cfg, tie_word_embeddings=True)
    with pytest.raises(ValueError, match="embed_out"):
        gx.params_to_hf(params, tied)
    params["layers_1"]["mlp"]["dense_4h_to_h"]["kernel"] = np.zeros((32, 64), np.float32)
    with pytest.raises(ValueError, match=r"dense_4h_to_h.*\(64, 32\).*\(32, 64\)"):
        gx.params_to_hf(params, cfg)


# ----------------------------------------------------------------------------
# Config.


@pytest.mark.parametrize(
    "cfg",
    [
        small_config(),
        small_config(
            rotary_pct=0.5,
            rotary_emb_base=500.0,
            layer_norm_eps=1e-6,
            use_parallel_residual=False,
            hidden_act="gelu_new",
            tie_word_embeddings=True,
            attention_bias=False,
            initializer_range=0.05,
        ),
    ],
)
def test_config_to_hf_round_trip(cfg):
    d = json.loads(json.dumps(gx.config_to_hf(cfg)))
    assert d["model_type"] == "gpt_neox"
    assert d["architectures"] == ["GPTNeoXForCausalLM"]
    assert d["rope_parameters"] == {
        "rope_type": "default",
        "rope_theta": cfg.rotary_emb_base,
        "partial_rotary_factor": cfg.rotary_pct,
    }
    assert (d["rotary_pct"], d["rotary_emb_base"]) == (cfg.rotary_pct, cfg.rotary_emb_base)
    assert gx.config_from_hf(d) == cfg
    # Hub spelling only.
    hub = {k: v for k, v in d.items() if k != "rope_parameters"}
    assert gx.config_from_hf(hub) == cfg


def test_config_from_hf_fixture_fields():
    cfg = gx.config_from_hf(fixture_config())
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (64, 32, 64)
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim) == (2, 4, 8)
    assert (cfg.rotary_pct, cfg.rotary_ndims, cfg.rotary_emb_base) == (0.25, 2, 10000.0)
    assert cfg.use_parallel_residual and cfg.attention_bias and not cfg.tie_word_embeddings
    assert (cfg.hidden_act, cfg.layer_norm_eps, cfg.dtype) == ("gelu", 1e-5, "float32")


@pytest.mark.parametrize(
    "change, match",
    [
        ({"model_type": "llama"}, "model_type"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "rope_type"),
        ({"rope_parameters": {"rope_theta": 1e4, "factor": 2.0}}, "factor"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling"),
        ({"hidden_act": "quick_gelu"}, "hidden_act"),
        ({"head_dim": 16}, "head_dim"),
        ({"hidden_size": None}, "hidden_size"),
        ({"num_attention_heads": 5}, "num_attention_heads"),
    ],
)
def test_config_from_hf_rejects_unsupported(change, match):
    with pytest.raises(ValueError, match=match):
        gx.config_from_hf({**fixture_config(), **change})


def test_config_from_hf_requires_sizes():
    d = fixture_config()
    del d["intermediate_size"]
    with pytest.raises(ValueError, match="intermediate_size"):
        gx.config_from_hf(d)


@pytest.mark.parametrize(
    "field, value",
    [
        ("vocab_size", 0),
        ("hidden_size", 30),
        ("rotary_pct", 1.5),
        ("rotary_emb_base", 0.0),
        ("layer_norm_eps", 0.0),
        ("hidden_act", "gelu_10"),
        ("dtype", "float16"),
        ("use_parallel_residual", 1),
    ],
)
def test_config_validation(field, value):
    with pytest.raises(ValueError, match=field):
        small_config(**{field: value})


def test_config_from_dict():
    cfg = small_config(rotary_pct=0.5)
    assert gx.GPTNeoXConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="rope_theta"):
        gx.GPTNeoXConfig.from_dict({**cfg.to_dict(), "rope_theta": 1.0})


# ----------------------------------------------------------------------------
# KV-cache decoding.

DECODE_VARIANTS = {
    "fixture": {},  # parallel residual, untied embed_out (as written by transformers)
    "sequential": {"use_parallel_residual": False},
    "sequential_tied": {"use_parallel_residual": False, "tie_word_embeddings": True},
}


@functools.cache
def decode_model(variant: str):
    """(config, params, jitted apply_fn, jitted decode_fn) for a fixture variant."""
    from tr_align import hf

    _, params, cfg = hf.load_pretrained(str(FIXTURE))
    cfg = dataclasses.replace(cfg, **DECODE_VARIANTS[variant])
    if cfg.tie_word_embeddings:
        params = {k: v for k, v in params.items() if k != "embed_out"}
    return cfg, params, jitted_apply(cfg), jax.jit(gx.make_decode_fn(cfg))


@pytest.mark.parametrize("variant", sorted(DECODE_VARIANTS))
def test_cached_decoding_matches_full_forward(variant):
    cfg, params, apply_fn, decode_fn = decode_model(variant)
    b, n, prefill = 2, 8, 3
    ids = np.random.default_rng(3).integers(0, cfg.vocab_size, (b, n)).astype(np.int32)
    full = np.asarray(apply_fn(params, ids, np.ones_like(ids)))

    cache = gx.init_cache(cfg, b, n)
    assert len(cache) == cfg.num_hidden_layers
    assert cache[0]["k"].shape == (b, n, cfg.num_attention_heads, cfg.head_dim)
    positions = np.broadcast_to(np.arange(n, dtype=np.int32), (b, n))
    kv_mask = np.zeros((b, n), np.int32)
    kv_mask[:, :prefill] = 1
    logits, cache = decode_fn(params, ids[:, :prefill], positions[:, :prefill], cache, 0, kv_mask)
    assert logits.dtype == np.float32 and logits.shape == (b, prefill, cfg.vocab_size)
    np.testing.assert_allclose(np.asarray(logits), full[:, :prefill], atol=1e-5, rtol=0)
    for i in range(prefill, n):
        kv_mask[:, i] = 1
        logits, cache = decode_fn(
            params, ids[:, i : i + 1], positions[:, i : i + 1], cache, i, kv_mask
        )
        np.testing.assert_allclose(np.asarray(logits[:, 0]), full[:, i], atol=1e-5, rtol=0)


# Tied random weights mostly repeat one token, so greedy generation uses the untied ones.
@pytest.mark.parametrize("variant", ["fixture", "sequential"])
def test_generate_left_padded_batch_matches_greedy_recompute(variant):
    from tr_align import generate

    cfg, params, apply_fn, _ = decode_model(variant)
    rng = np.random.default_rng(4)
    prompts = [rng.integers(1, cfg.vocab_size, n).tolist() for n in (5, 1, 8, 3)]
    new = 10
    tokens, lengths = generate.generate(
        gx.make_decode_fn(cfg),
        functools.partial(gx.init_cache, cfg),
        params,
        prompts,
        max_new_tokens=new,
    )
    assert tokens.shape == (len(prompts), new) and list(lengths) == [new] * len(prompts)

    # Greedy by full recomputation of each prompt alone. Sequences sit at the left of a
    # fixed-width buffer (one compile); causal attention makes the trailing slots inert.
    width = max(map(len, prompts)) + new
    for row, prompt in enumerate(prompts):
        seq = list(prompt)
        for _ in range(new):
            ids = np.zeros((1, width), np.int32)
            ids[0, : len(seq)] = seq
            mask = (np.arange(width) < len(seq)).astype(np.int32)[None]
            logits = np.asarray(apply_fn(params, ids, mask))
            seq.append(int(np.argmax(logits[0, len(seq) - 1])))
        assert tokens[row].tolist() == seq[len(prompt) :], row
