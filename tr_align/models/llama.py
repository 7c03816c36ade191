"""Decoder-only Llama-style transformer in Flax linen, sized by a config.

Covers Llama / Mistral (``sliding_window``) / Qwen2 (``qkv_bias``) / SmolLM2
(``tie_word_embeddings``) style checkpoints; the embedding / blocks / head shell is
``decoder``'s, this module gives what is Llama's (``FAMILY``). Semantics follow Hugging Face
``modeling_llama.py`` so weights map one-to-one:

  * RMSNorm: ``scale * x * rsqrt(mean(x**2) + eps)``, normalisation in float32.
  * RoPE in the "rotate_half" form, ``cos/sin = concat(freqs, freqs)``, positions
    ``arange(T)`` (inputs are RIGHT-padded) unless given; optional Llama 3 scaling.
  * Grouped-query attention: kv head ``k`` serves the contiguous query heads
    ``k*G .. k*G+G-1`` (``G = H // KV``; HF ``repeat_kv``).
  * Causal + key-padding (or packed-segment) mask with ``finfo(float32).min`` (never
    -inf), softmax in float32, no dropout (``common.plain_mask``, ``common.attention``).
  * SwiGLU MLP ``down(silu(gate(x)) * up(x))``, pre-norm residual blocks, final
    RMSNorm, ``lm_head`` (or the embedding transpose when tied).

Parameter tree (plain nested dict, float32; Dense kernels are ``[in, out]``, the
transpose of torch's ``weight``)::

  embed_tokens/embedding                               [V, D]
  layers_{i}/input_layernorm/scale                     [D]
  layers_{i}/self_attn/q_proj/kernel (+ bias)          [D, H*hd]
  layers_{i}/self_attn/k_proj/kernel (+ bias)          [D, KV*hd]
  layers_{i}/self_attn/v_proj/kernel (+ bias)          [D, KV*hd]
  layers_{i}/self_attn/o_proj/kernel                   [H*hd, D]
  layers_{i}/post_attention_layernorm/scale            [D]
  layers_{i}/mlp/{gate_proj,up_proj}/kernel            [D, F]
  layers_{i}/mlp/down_proj/kernel                      [F, D]
  norm/scale                                           [D]
  lm_head/kernel                                       [D, V]  (absent when tied)

Shape suffixes: B batch, T query length, S key length, D hidden, V vocab,
H query heads, K kv heads, G query heads per kv head, E head_dim, F intermediate.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tr_align.models import decoder

_LLAMA3_ROPE_KEYS = (
    "rope_type",
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
)
# Hugging Face model_type -> the architectures entry written on export.
HF_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig(decoder.ConfigDict):
    """Model hyper-parameters; field names equal Hugging Face ``config.json`` keys.

    ``num_key_value_heads`` and ``head_dim`` may be given as None; they are resolved
    in ``__post_init__`` (to ``num_attention_heads`` and
    ``hidden_size // num_attention_heads``), so on an instance they are always ints.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    dtype: str = "float32"
    # Llama 3 frequency scaling: None or {"rope_type": "llama3", "factor", "low_freq_factor",
    # "high_freq_factor", "original_max_position_embeddings"} (HF _compute_llama3_parameters).
    rope_scaling: dict | None = None
    sliding_window: int | None = None  # Mistral: attend to keys with q - k < sliding_window
    model_type: str = "llama"  # Hugging Face architecture to export as: llama | mistral | qwen2
    remat: str = "none"  # per-block rematerialisation: none | full | save_dots (not exported)

    def __post_init__(self):
        self.check_common()
        heads = self.num_attention_heads
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", heads)
        kv = self.num_key_value_heads
        if not isinstance(kv, int) or isinstance(kv, bool) or kv <= 0:
            raise ValueError(f"LlamaConfig.num_key_value_heads must be a positive int, got {kv!r}")
        if heads % kv:
            raise ValueError(
                f"LlamaConfig.num_attention_heads ({heads}) must be divisible by "
                f"num_key_value_heads ({kv})"
            )
        if self.head_dim is None:
            if self.hidden_size % heads:
                raise ValueError(
                    f"LlamaConfig.hidden_size ({self.hidden_size}) must be divisible by "
                    f"num_attention_heads ({heads}) when head_dim is None"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // heads)
        hd = self.head_dim
        if not isinstance(hd, int) or isinstance(hd, bool) or hd <= 0 or hd % 2:
            raise ValueError(f"LlamaConfig.head_dim must be a positive even int, got {hd!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"LlamaConfig.rope_theta must be > 0, got {self.rope_theta!r}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"LlamaConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        if self.rope_scaling is not None:
            missing = sorted(set(_LLAMA3_ROPE_KEYS) - set(self.rope_scaling))
            if self.rope_scaling.get("rope_type") != "llama3" or missing:
                raise ValueError(
                    "LlamaConfig.rope_scaling must be None or a llama3 scaling dict with "
                    f"{_LLAMA3_ROPE_KEYS}, got {self.rope_scaling!r}"
                )
        if self.sliding_window is not None and not self.sliding_window > 0:
            raise ValueError(
                f"LlamaConfig.sliding_window must be None or > 0, got {self.sliding_window!r}"
            )
        if self.model_type not in HF_MODEL_TYPES:
            raise ValueError(
                f"LlamaConfig.model_type must be one of {sorted(HF_MODEL_TYPES)}, "
                f"got {self.model_type!r}"
            )


# ----------------------------------------------------------------------------
# Pure functions.


def rope_inv_freq(head_dim: int, theta: float, rope_scaling: dict | None = None) -> jax.Array:
    """Rotary inverse frequencies [E/2]: theta ** (-2j / E), optionally Llama-3 scaled.

    Llama 3 scaling (HF ``_compute_llama3_parameters``): with wavelength
    w = 2 pi / inv_freq, L = original_max_position_embeddings, frequencies with
    w > L / low_freq_factor are divided by ``factor``, those with
    w < L / high_freq_factor are kept, and in between they are blended with
    s = (L / w - low_freq_factor) / (high_freq_factor - low_freq_factor):
    (1 - s) * f / factor + s * f.
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if rope_scaling is None:
        return inv_freq
    factor = rope_scaling["factor"]
    low, high = rope_scaling["low_freq_factor"], rope_scaling["high_freq_factor"]
    old_len = rope_scaling["original_max_position_embeddings"]
    wavelen = 2 * jnp.pi / inv_freq
    scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return jnp.where(medium, blended, scaled)


def rope_cos_sin(
    positions_T: jax.Array, head_dim: int, theta: float, rope_scaling: dict | None = None
) -> tuple[jax.Array, jax.Array]:
    """HF rotary tables. positions [T] (or [B, T]) int -> (cos, sin) each [T, E] ([B, T, E]).

    freqs = pos * rope_inv_freq(...); cos/sin of concat(freqs, freqs).
    """
    inv_freq = rope_inv_freq(head_dim, theta, rope_scaling)
    freqs_TE2 = positions_T.astype(jnp.float32)[..., None] * inv_freq
    emb_TE = jnp.concatenate([freqs_TE2, freqs_TE2], axis=-1)
    return jnp.cos(emb_TE), jnp.sin(emb_TE)


def apply_rope(x_BTNE: jax.Array, cos_TE: jax.Array, sin_TE: jax.Array) -> jax.Array:
    """x * cos + rotate_half(x) * sin, rotate_half(x) = concat(-x2, x1). Keeps x dtype."""
    half = x_BTNE.shape[-1] // 2
    x1, x2 = x_BTNE[..., :half], x_BTNE[..., half:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    # Tables are [T, E] (shared positions) or [B, T, E] (per-row positions, e.g. decoding).
    expand = (lambda c: c[None, :, None, :]) if cos_TE.ndim == 2 else (lambda c: c[:, :, None, :])
    cos = expand(cos_TE).astype(x_BTNE.dtype)
    sin = expand(sin_TE).astype(x_BTNE.dtype)
    return x_BTNE * cos + rotated * sin


# ----------------------------------------------------------------------------
# Modules.


class RMSNorm(nn.Module):
    """scale * x * rsqrt(mean(x^2) + eps), normalised in float32. [..., D] -> [..., D]."""

    eps: float
    dtype: Any

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * x32.astype(self.dtype)


def _qkv(cfg: LlamaConfig, x_ND):
    """q [N,H,E], k/v [N,K,E] from separate projections (bias with ``qkv_bias``)."""
    h, k, e = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = decoder.dense(cfg, h * e, "q_proj", cfg.qkv_bias)(x_ND)
    kk = decoder.dense(cfg, k * e, "k_proj", cfg.qkv_bias)(x_ND)
    v = decoder.dense(cfg, k * e, "v_proj", cfg.qkv_bias)(x_ND)
    n = x_ND.shape[0]
    return q.reshape(n, h, e), kk.reshape(n, k, e), v.reshape(n, k, e)


class Mlp(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). [..., D] -> [..., D]."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        gate = decoder.dense(cfg, cfg.intermediate_size, "gate_proj")(x)
        up = decoder.dense(cfg, cfg.intermediate_size, "up_proj")(x)
        return decoder.dense(cfg, cfg.hidden_size, "down_proj")(nn.silu(gate) * up)


FAMILY = decoder.Family(
    embed_name="embed_tokens",
    attention_name="self_attn",
    out_proj_name="o_proj",
    final_norm_name="norm",
    head_name="lm_head",
    norm=lambda cfg, name: RMSNorm(cfg.rms_norm_eps, decoder.DTYPES[cfg.dtype], name=name),
    qkv=_qkv,
    mlp=Mlp,
    rope_tables=lambda cfg, positions: rope_cos_sin(
        positions, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling
    ),
    apply_rope=apply_rope,
    kv_heads=lambda cfg: cfg.num_key_value_heads,
    sliding_window=lambda cfg: cfg.sliding_window,
)


# Logical axes of every parameter (``decoder.param_axes``).
PARAM_AXES = decoder.param_axes(
    FAMILY,
    "scale",
    (
        (r"layers_\d+/self_attn/q_proj/kernel", ("embed", "heads")),
        (r"layers_\d+/self_attn/q_proj/bias", ("heads",)),
        (r"layers_\d+/self_attn/[kv]_proj/kernel", ("embed", "kv_heads")),
        (r"layers_\d+/self_attn/[kv]_proj/bias", ("kv_heads",)),
        (r"layers_\d+/self_attn/o_proj/kernel", ("heads", "embed")),
        (r"layers_\d+/mlp/(gate|up)_proj/kernel", ("embed", "mlp")),
        (r"layers_\d+/mlp/down_proj/kernel", ("mlp", "embed")),
    ),
)


# ----------------------------------------------------------------------------
# Public API.


def head_logits(config: LlamaConfig, params: dict, x: jax.Array) -> jax.Array:
    """The output projection alone: final-norm hidden [..., D] -> logits [..., V] float32
    (``lm_head``, or the embedding transpose when tied), the same ops as the model's."""
    return decoder.head_logits(FAMILY, config, params, x)


def make_model(config: LlamaConfig) -> tuple[Callable, Callable]:
    """(init_fn, apply_fn): see ``common.model_fns`` (tree in the module doc)."""
    return decoder.make_model(FAMILY, config)


def make_decode_fn(config: LlamaConfig) -> Callable:
    """Cached forward for ``tr_align.generate``: see ``common.decode_fn``."""
    return decoder.make_decode_fn(FAMILY, config)


def init_cache(config: LlamaConfig, batch: int, length: int, dtype=None) -> list[dict]:
    """Zeroed KV cache (``decoder.init_cache``): per layer {"k", "v"} [batch, length, KV, E]."""
    return decoder.init_cache(FAMILY, config, batch, length, dtype)


def count_params(params: Any) -> int:
    """Total number of scalar parameters in a pytree."""
    return int(sum(x.size for x in jax.tree.leaves(params)))


# ----------------------------------------------------------------------------
# Hugging Face conversion (used by tr_align.hf; tensors are numpy, torch layout).

# Buffers some checkpoints carry that are not parameters.
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def _rope_from_hf(d: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either the hub spelling (top-level ``rope_theta``,
    ``rope_scaling``) or the transformers-5 ``rope_parameters`` block."""
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or params
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise ValueError(f"config.json rope_type={rope_type!r} is not supported (default, llama3)")
    return float(theta), {k: scaling[k] for k in _LLAMA3_ROPE_KEYS if k != "rope_type"} | {
        "rope_type": "llama3"
    }


def config_from_hf(d: dict) -> LlamaConfig:
    """LlamaConfig from a parsed Hugging Face config.json (llama, mistral or qwen2)."""
    model_type = d.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(f"config.json model_type={model_type!r} is not a Llama-family model")
    for key, ok in (
        ("hidden_act", d.get("hidden_act", "silu") == "silu"),
        ("mlp_bias", not d.get("mlp_bias", False)),
        ("attention_bias", not (model_type != "qwen2" and d.get("attention_bias", False))),
        ("use_sliding_window", not (model_type == "qwen2" and d.get("use_sliding_window"))),
    ):
        if not ok:
            raise ValueError(f"config.json {key}={d.get(key)!r} is not supported")
    theta, scaling = _rope_from_hf(d)
    return LlamaConfig(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=d["num_attention_heads"],
        num_key_value_heads=d.get("num_key_value_heads"),
        head_dim=d.get("head_dim"),
        rope_theta=theta,
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=d.get("tie_word_embeddings", False),
        qkv_bias=model_type == "qwen2",
        max_position_embeddings=d.get("max_position_embeddings", 2048),
        initializer_range=d.get("initializer_range", 0.02),
        rope_scaling=scaling,
        sliding_window=d.get("sliding_window") if model_type == "mistral" else None,
        model_type=model_type,
    )


def config_to_hf(cfg: LlamaConfig) -> dict:
    """A config.json dict that transformers loads as the matching *ForCausalLM."""
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope = {**cfg.rope_scaling, "rope_theta": cfg.rope_theta}
    d = {
        "architectures": [HF_MODEL_TYPES[cfg.model_type]],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": cfg.initializer_range,
        "rope_parameters": rope,
        "dtype": cfg.dtype,
    }
    if cfg.model_type == "mistral":
        d["sliding_window"] = cfg.sliding_window
    if cfg.model_type == "llama":
        d.update(attention_bias=False, mlp_bias=False)
    return d


def _hf_layout(cfg: LlamaConfig):
    """Yields (hf_name, our_path, transpose) for every tensor of the checkpoint."""
    yield "model.embed_tokens.weight", ("embed_tokens", "embedding"), False
    for i in range(cfg.num_hidden_layers):
        hf, ours = f"model.layers.{i}", f"layers_{i}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            yield f"{hf}.{norm}.weight", (ours, norm, "scale"), False
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield f"{hf}.self_attn.{proj}.weight", (ours, "self_attn", proj, "kernel"), True
            if cfg.qkv_bias and proj != "o_proj":
                yield f"{hf}.self_attn.{proj}.bias", (ours, "self_attn", proj, "bias"), False
        for proj in ("gate_proj", "up_proj", "down_proj"):
            yield f"{hf}.mlp.{proj}.weight", (ours, "mlp", proj, "kernel"), True
    yield "model.norm.weight", ("norm", "scale"), False
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", ("lm_head", "kernel"), True


def _expected_shapes(cfg: LlamaConfig) -> dict:
    """Our parameter shapes, from the model's own init (traced, no compute)."""
    init_fn, _ = make_model(cfg)
    return jax.eval_shape(init_fn, jax.random.PRNGKey(0))


def hf_kernel_modules(cfg: LlamaConfig) -> dict[str, str]:
    """{our kernel path: the HF module holding it as ``.weight``} (LoRA / PEFT names)."""
    return {
        "/".join(path): name.removesuffix(".weight")
        for name, path, transpose in _hf_layout(cfg)
        if transpose and path[-1] == "kernel"
    }


def hf_tensor_names(cfg: LlamaConfig) -> list[str]:
    return [name for name, _, _ in _hf_layout(cfg)]


def params_from_hf(get: Callable[[str], Any], cfg: LlamaConfig) -> dict:
    """Our params from HF tensors; ``get(name)`` returns a (numpy) tensor by its HF name.

    Raises ValueError naming the tensor when its shape does not match ``cfg``.
    """
    shapes = _expected_shapes(cfg)
    params: dict = {}
    for name, path, transpose in _hf_layout(cfg):
        x = get(name)
        x = x.T if transpose else x
        want = functools.reduce(lambda t, k: t[k], path, shapes).shape
        if tuple(x.shape) != tuple(want):
            raise ValueError(
                f"tensor {name}: expected shape {tuple(want[::-1] if transpose else want)} "
                f"for this config, got {tuple(x.shape[::-1] if transpose else x.shape)}"
            )
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = x
    return params


def params_to_hf(params: dict, cfg: LlamaConfig) -> dict:
    """HF-named tensors (torch layout) from our params."""
    out = {}
    for name, path, transpose in _hf_layout(cfg):
        x = functools.reduce(lambda t, k: t[k], path, params)
        out[name] = x.T if transpose else x
    return out
