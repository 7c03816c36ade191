"""Decoder-only Llama-style transformer in Flax linen, sized by a config.

Covers Llama / Mistral (without sliding window) / Qwen2 (``qkv_bias``) / SmolLM2
(``tie_word_embeddings``) style checkpoints. Semantics follow Hugging Face
``modeling_llama.py`` so weights map one-to-one:

  * RMSNorm: ``scale * x * rsqrt(mean(x**2) + eps)``, normalisation in float32.
  * RoPE in the "rotate_half" form, ``cos/sin = concat(freqs, freqs)``, positions
    ``arange(T)`` (inputs are RIGHT-padded). No rope scaling.
  * Grouped-query attention: kv head ``k`` serves the contiguous query heads
    ``k*G .. k*G+G-1`` (``G = H // KV``; HF ``repeat_kv``).
  * Causal + key-padding mask with ``finfo(float32).min`` (never -inf), softmax in
    float32, no dropout.
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

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
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

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
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
        if self.dtype not in _DTYPES:
            raise ValueError(
                f"LlamaConfig.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}"
            )
        if not self.rope_theta > 0:
            raise ValueError(f"LlamaConfig.rope_theta must be > 0, got {self.rope_theta!r}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"LlamaConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        """Builds a config from a dict; raises ValueError naming any unknown keys."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"LlamaConfig.from_dict: unknown keys {unknown}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------
# Pure functions.


def rope_cos_sin(
    positions_T: jax.Array, head_dim: int, theta: float
) -> tuple[jax.Array, jax.Array]:
    """HF rotary tables. positions [T] int -> (cos, sin) each [T, E], float32.

    inv_freq[j] = theta ** (-2j / E), j < E/2; freqs = pos * inv_freq;
    cos/sin of concat(freqs, freqs).
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs_TE2 = positions_T.astype(jnp.float32)[:, None] * inv_freq[None, :]
    emb_TE = jnp.concatenate([freqs_TE2, freqs_TE2], axis=-1)
    return jnp.cos(emb_TE), jnp.sin(emb_TE)


def apply_rope(x_BTNE: jax.Array, cos_TE: jax.Array, sin_TE: jax.Array) -> jax.Array:
    """x * cos + rotate_half(x) * sin, rotate_half(x) = concat(-x2, x1). Keeps x dtype."""
    half = x_BTNE.shape[-1] // 2
    x1, x2 = x_BTNE[..., :half], x_BTNE[..., half:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos = cos_TE[None, :, None, :].astype(x_BTNE.dtype)
    sin = sin_TE[None, :, None, :].astype(x_BTNE.dtype)
    return x_BTNE * cos + rotated * sin


def attention(
    q_BTHE: jax.Array, k_BSKE: jax.Array, v_BSKE: jax.Array, mask_BTS: jax.Array
) -> jax.Array:
    """Grouped-query softmax attention -> [B, T, H, E] in q's dtype.

    Query head h uses kv head h // G (contiguous groups, HF repeat_kv). Scores are
    accumulated and soft-maxed in float32; masked entries get finfo(float32).min, so
    a fully masked row gives a uniform (finite) distribution, never NaN.
    """
    b, t, h, e = q_BTHE.shape
    k = k_BSKE.shape[2]
    q_BTKGE = q_BTHE.reshape(b, t, k, h // k, e)
    scores_BKGTS = jnp.einsum(
        "btkge,bske->bkgts", q_BTKGE, k_BSKE, preferred_element_type=jnp.float32
    )
    scores_BKGTS = scores_BKGTS * (e**-0.5)
    scores_BKGTS = jnp.where(
        mask_BTS[:, None, None, :, :], scores_BKGTS, jnp.finfo(jnp.float32).min
    )
    probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(v_BSKE.dtype)
    out_BTKGE = jnp.einsum("bkgts,bske->btkge", probs_BKGTS, v_BSKE)
    return out_BTKGE.reshape(b, t, h, e)


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


def _dense(cfg: LlamaConfig, features: int, name: str, use_bias: bool = False, **kw) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=_DTYPES[cfg.dtype],
        param_dtype=jnp.float32,
        kernel_init=nn.initializers.normal(cfg.initializer_range),
        bias_init=nn.initializers.zeros,
        name=name,
        **kw,
    )


class Attention(nn.Module):
    """GQA self-attention with RoPE. x [B,T,D], mask [B,T,T], cos/sin [T,E] -> [B,T,D]."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x_BTD, mask_BTT, cos_TE, sin_TE):
        cfg = self.cfg
        b, t, _ = x_BTD.shape
        h, k, e = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q = _dense(cfg, h * e, "q_proj", cfg.qkv_bias)(x_BTD).reshape(b, t, h, e)
        kk = _dense(cfg, k * e, "k_proj", cfg.qkv_bias)(x_BTD).reshape(b, t, k, e)
        v = _dense(cfg, k * e, "v_proj", cfg.qkv_bias)(x_BTD).reshape(b, t, k, e)
        q = apply_rope(q, cos_TE, sin_TE)
        kk = apply_rope(kk, cos_TE, sin_TE)
        out_BTHE = attention(q, kk, v, mask_BTT)
        return _dense(cfg, cfg.hidden_size, "o_proj")(out_BTHE.reshape(b, t, h * e))


class Mlp(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). [B,T,D] -> [B,T,D]."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x_BTD):
        cfg = self.cfg
        gate_BTF = _dense(cfg, cfg.intermediate_size, "gate_proj")(x_BTD)
        up_BTF = _dense(cfg, cfg.intermediate_size, "up_proj")(x_BTD)
        return _dense(cfg, cfg.hidden_size, "down_proj")(nn.silu(gate_BTF) * up_BTF)


class Block(nn.Module):
    """Pre-norm decoder layer: x + attn(ln1(x)); x + mlp(ln2(x))."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x_BTD, mask_BTT, cos_TE, sin_TE):
        cfg, dtype = self.cfg, _DTYPES[self.cfg.dtype]
        y = RMSNorm(cfg.rms_norm_eps, dtype, name="input_layernorm")(x_BTD)
        x_BTD = x_BTD + Attention(cfg, name="self_attn")(y, mask_BTT, cos_TE, sin_TE)
        y = RMSNorm(cfg.rms_norm_eps, dtype, name="post_attention_layernorm")(x_BTD)
        return x_BTD + Mlp(cfg, name="mlp")(y)


class Llama(nn.Module):
    """input_ids [B,T] int, attention_mask [B,T] 0/1 (right-padded) -> logits [B,T,V] f32."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, input_ids_BT, attention_mask_BT=None):
        cfg, dtype = self.cfg, _DTYPES[self.cfg.dtype]
        b, t = input_ids_BT.shape
        if attention_mask_BT is None:
            attention_mask_BT = jnp.ones((b, t), jnp.int32)
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=dtype,
            param_dtype=jnp.float32,
            embedding_init=nn.initializers.normal(cfg.initializer_range),
            name="embed_tokens",
        )
        x_BTD = embed(input_ids_BT.astype(jnp.int32))

        causal_TT = jnp.tril(jnp.ones((t, t), jnp.bool_))
        mask_BTT = causal_TT[None] & attention_mask_BT.astype(jnp.bool_)[:, None, :]
        cos_TE, sin_TE = rope_cos_sin(jnp.arange(t), cfg.head_dim, cfg.rope_theta)

        for i in range(cfg.num_hidden_layers):
            x_BTD = Block(cfg, name=f"layers_{i}")(x_BTD, mask_BTT, cos_TE, sin_TE)
        x_BTD = RMSNorm(cfg.rms_norm_eps, dtype, name="norm")(x_BTD)

        if cfg.tie_word_embeddings:
            return jnp.einsum(
                "btd,vd->btv",
                x_BTD,
                embed.embedding.astype(dtype),
                preferred_element_type=jnp.float32,
            )
        f32_dot = functools.partial(jax.lax.dot_general, preferred_element_type=jnp.float32)
        logits = _dense(cfg, cfg.vocab_size, "lm_head", dot_general=f32_dot)(x_BTD)
        return logits.astype(jnp.float32)


# ----------------------------------------------------------------------------
# Public API.


def make_model(config: LlamaConfig) -> tuple[Callable, Callable]:
    """Returns (init_fn, apply_fn).

    init_fn(rng) -> params: plain nested dict of float32 arrays (tree in module doc).
    apply_fn(params, input_ids [B,T] int32, attention_mask [B,T] 0/1) -> logits
      [B,T,V] float32. Neither is jitted; wrap in jax.jit as needed.
    """
    module = Llama(config)

    def init_fn(rng: jax.Array) -> dict:
        dummy = jnp.zeros((1, 1), jnp.int32)
        variables = module.init(rng, dummy, jnp.ones((1, 1), jnp.int32))
        return _to_dict(variables["params"])

    def apply_fn(
        params: dict, input_ids: jax.Array, attention_mask: jax.Array | None = None
    ) -> jax.Array:
        return module.apply({"params": params}, input_ids, attention_mask)

    return init_fn, apply_fn


def _to_dict(tree: Any) -> Any:
    """Recursively converts (Frozen)Dict mappings to plain dicts."""
    if hasattr(tree, "items"):
        return {k: _to_dict(v) for k, v in tree.items()}
    return tree


def count_params(params: Any) -> int:
    """Total number of scalar parameters in a pytree."""
    return int(sum(x.size for x in jax.tree.leaves(params)))
