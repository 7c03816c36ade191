"""The decoder shell every model family shares: embedding, blocks, final norm, output head.

A family (``llama``, ``gpt_neox``) describes only what differs in a ``Family``: its norm,
q/k/v projection, MLP, rotary variant, residual wiring and parameter names. The shell
builds the linen modules from it, so the parameter tree keeps each family's Hugging Face
derived names (``layers_{i}/<attention_name>/...``, ``<embed_name>/embedding``, ...).

Compute layout, chosen for XLA:CPU's backward pass (``benchmarks/model_step.py``): every
projection runs on 2-D ``[B*T, D]`` rows (``Dense``), the attention mask is built once per
forward and shared by the layers, and the attention itself is ``common.attention``.

Shape suffixes: B batch, T query length, S key length, D hidden, V vocab, N = B*T rows,
H query heads, K kv heads, E head_dim.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tr_align.models import common

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class ConfigDict:
    """``from_dict`` / ``to_dict`` and field checks for a family's frozen config dataclass."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """Builds a config from a dict; raises ValueError naming any unknown keys."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}.from_dict: unknown keys {unknown}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check_positive_ints(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(
                    f"{type(self).__name__}.{name} must be a positive int, got {value!r}"
                )

    def check_common(self) -> None:
        """The size fields every family has, the compute dtype and the remat policy."""
        self.check_positive_ints(
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
        )
        name = type(self).__name__
        if self.dtype not in DTYPES:
            raise ValueError(f"{name}.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.remat not in common.REMAT_POLICIES:
            raise ValueError(
                f"{name}.remat must be one of {common.REMAT_POLICIES}, got {self.remat!r}"
            )


@dataclasses.dataclass(frozen=True)
class Family:
    """What a model family plugs into the shell. ``cfg`` is the family's config.

    norm(cfg, name) -> a norm module; qkv(cfg, x [N, D]) -> (q [N,H,E], k [N,K,E], v [N,K,E]),
    creating its projections (``dense``) in the calling attention module; mlp: a module class
    called ``mlp(cfg, name="mlp")`` on [N, D]; rope_tables(cfg, positions [T] or [B,T]) ->
    (cos, sin) and apply_rope(x [B,T,H,E], cos, sin) -> x; kv_heads(cfg), out_bias(cfg)
    (bias on the attention output projection), parallel_residual(cfg) (x + attn(ln1 x) +
    mlp(ln2 x) instead of the sequential pre-norm block), sliding_window(cfg) -> None or w.
    """

    embed_name: str
    attention_name: str
    out_proj_name: str
    final_norm_name: str
    head_name: str
    norm: Callable[[Any, str], nn.Module]
    qkv: Callable
    mlp: type[nn.Module]
    rope_tables: Callable
    apply_rope: Callable
    kv_heads: Callable[[Any], int]
    out_bias: Callable[[Any], bool] = lambda cfg: False
    parallel_residual: Callable[[Any], bool] = lambda cfg: False
    sliding_window: Callable[[Any], int | None] = lambda cfg: None


class Dense(nn.Dense):
    """``nn.Dense`` (same ``kernel``/``bias`` params) computing on 2-D ``[N, in]`` rows.

    Inputs ``[..., in]`` are flattened to rows and the result reshaped back: on a 3-D input
    XLA:CPU computes the kernel gradient as a dot contracting two dimensions, several times
    slower than the same matmul on rows.

    A kernel given as ``common.FactoredKernel`` (a LoRA target, ``tr_align.lora``) is applied
    factor by factor, ``x @ W + scale * (x @ A) @ B``: the gradient reaches A and B through
    [N, r] activations, never through an [in, out] matrix.
    """

    @nn.compact
    def __call__(self, inputs):
        lead = inputs.shape[:-1]
        x = inputs.reshape(-1, inputs.shape[-1])
        kernel = self.get_variable("params", "kernel")
        if isinstance(kernel, common.FactoredKernel):
            y = self._factored(x, kernel)
        else:
            y = super().__call__(x)
        return y.reshape(*lead, y.shape[-1])

    def _factored(self, x, k):
        dtype = self.dtype or jnp.result_type(x, k.w)
        dot = self.dot_general or jax.lax.dot_general
        dims = (((1,), (0,)), ((), ()))
        x = x.astype(dtype)
        low = dot(x, k.a.astype(dtype), dims).astype(dtype)
        y = dot(x, k.w.astype(dtype), dims) + k.scale * dot(low, k.b.astype(dtype), dims)
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            y = y + bias.astype(y.dtype)
        return y


def dense(cfg, features: int, name: str, use_bias: bool = False, **kw) -> Dense:
    """A projection in ``cfg``'s compute dtype with float32 params, N(0, initializer_range)."""
    return Dense(
        features,
        use_bias=use_bias,
        dtype=DTYPES[cfg.dtype],
        param_dtype=jnp.float32,
        kernel_init=nn.initializers.normal(cfg.initializer_range),
        bias_init=nn.initializers.zeros,
        name=name,
        **kw,
    )


def _head(family: Family, cfg) -> Dense:
    return dense(cfg, cfg.vocab_size, family.head_name, dot_general=common.F32_DOT)


class Attention(nn.Module):
    """Self-attention with RoPE. x [B,T,D], mask [B,T,S], cos/sin [T,R] or [B,T,R] -> [B,T,D].

    Without ``cache`` the keys are this chunk's (S = T). With ``cache`` = {"k", "v"}
    of [B, S, K, E], this chunk's keys/values are written at slot ``cache_index``
    and the queries attend over all S slots; returns (out, new_cache).
    """

    family: Family
    cfg: Any

    @nn.compact
    def __call__(self, x_BTD, mask_BTS, cos, sin, cache=None, cache_index=None):
        fam, cfg = self.family, self.cfg
        b, t, d = x_BTD.shape
        q, k, v = fam.qkv(cfg, x_BTD.reshape(b * t, d))
        q = fam.apply_rope(q.reshape(b, t, *q.shape[1:]), cos, sin)
        k = fam.apply_rope(k.reshape(b, t, *k.shape[1:]), cos, sin)
        v = v.reshape(b, t, *v.shape[1:])
        if cache is not None:
            at = (0, cache_index, 0, 0)
            cache = {
                "k": jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), at),
                "v": jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), at),
            }
            k, v = cache["k"].astype(q.dtype), cache["v"].astype(q.dtype)
        out_BTHE = common.attention(q, k, v, mask_BTS, causal=cache is None)
        proj = dense(cfg, cfg.hidden_size, fam.out_proj_name, fam.out_bias(cfg))
        out = proj(out_BTHE.reshape(b, t, -1))
        return out if cache is None else (out, cache)


class Block(nn.Module):
    """Sequential ``h = x + attn(ln1(x)); h + mlp(ln2(h))`` or, with
    ``family.parallel_residual``, ``x + attn(ln1(x)) + mlp(ln2(x))``."""

    family: Family
    cfg: Any

    @nn.compact
    def __call__(self, x_BTD, mask_BTS, cos, sin, cache=None, cache_index=None):
        fam, cfg = self.family, self.cfg
        attn = Attention(fam, cfg, name=fam.attention_name)
        y = fam.norm(cfg, "input_layernorm")(x_BTD)
        attn_BTD = attn(y, mask_BTS, cos, sin, cache, cache_index)
        if cache is not None:
            attn_BTD, cache = attn_BTD
        ln2, mlp = fam.norm(cfg, "post_attention_layernorm"), fam.mlp(cfg, name="mlp")
        if fam.parallel_residual(cfg):
            out_BTD = mlp(ln2(x_BTD)) + attn_BTD + x_BTD
        else:
            h_BTD = x_BTD + attn_BTD
            out_BTD = h_BTD + mlp(ln2(h_BTD))
        return out_BTD if cache is None else (out_BTD, cache)


class Decoder(nn.Module):
    """input_ids [B,T] int -> logits [B,T,V] float32 (see ``common.model_fns`` for the inputs).

    Plain forward: ``attention_mask`` [B,T] 0/1 (right-padded), or ``segment_ids`` (packed
    sequences, 0 = padding) with optional ``branch_ids`` (prefix sharing) and rotary
    ``positions`` [B,T] (default ``arange(T)``); the mask rule is ``common.plain_mask``.
    ``return_hidden=True`` returns the final-norm hidden states [B,T,D] instead.

    Decoding mode (``cache`` given, see ``init_cache``): the chunk's tokens sit at cache
    slots ``cache_index .. cache_index + T - 1``; ``positions`` [B,T] are their rotary
    positions and ``kv_mask_BS`` marks the valid (non-padding) slots. A query attends
    to valid slots at or before its own. Returns (logits, new_cache).
    """

    family: Family
    cfg: Any

    @nn.compact
    def __call__(
        self,
        input_ids_BT,
        attention_mask_BT=None,
        *,
        positions=None,
        segment_ids=None,
        branch_ids=None,
        cache=None,
        cache_index=None,
        kv_mask_BS=None,
        return_hidden=False,
    ):
        fam, cfg, dtype = self.family, self.cfg, DTYPES[self.cfg.dtype]
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=dtype,
            param_dtype=jnp.float32,
            embedding_init=nn.initializers.normal(cfg.initializer_range),
            name=fam.embed_name,
        )
        x_BTD = embed(input_ids_BT.astype(jnp.int32))
        if cache is None:
            mask_BTS, positions = common.plain_mask(
                input_ids_BT.shape,
                attention_mask_BT,
                positions,
                segment_ids,
                branch_ids,
                sliding_window=fam.sliding_window(cfg),
            )
        else:
            mask_BTS = common.cached_mask(
                cache_index, kv_mask_BS, input_ids_BT.shape[1], fam.sliding_window(cfg)
            )
        cos, sin = fam.rope_tables(cfg, positions)

        block_cls = Block if cache is not None else common.remat_block(Block, cfg.remat)
        blocks = [block_cls(fam, cfg, name=f"layers_{i}") for i in range(cfg.num_hidden_layers)]
        x_BTD, new_cache = common.run_blocks(blocks, x_BTD, mask_BTS, cos, sin, cache, cache_index)
        x_BTD = fam.norm(cfg, fam.final_norm_name)(x_BTD)
        if return_hidden and cache is None:
            return x_BTD
        if cfg.tie_word_embeddings:
            logits = common.tied_logits(x_BTD, embed.embedding, dtype)
        else:
            logits = _head(fam, cfg)(x_BTD).astype(jnp.float32)
        return logits if cache is None else (logits, new_cache)


def param_axes(family: Family, norm_params: str, layer_rules: tuple) -> tuple:
    """A family's ``PARAM_AXES`` (``tr_align.sharding``: regex over the "/"-joined path, full
    match, first wins -> one logical name per dimension): the shell's embedding, norm and
    head rules around ``layer_rules`` (the attention / MLP kernels and biases).
    ``norm_params`` is a regex alternative of the norms' parameter names."""
    norms = rf"(layers_\d+/(input|post_attention)_layernorm|{family.final_norm_name})"
    return (
        (rf"{family.embed_name}/embedding", ("vocab", "embed")),
        (rf"{norms}/{norm_params}", ("norm",)),
        *layer_rules,
        (rf"{family.head_name}/kernel", ("embed", "vocab")),
    )


def head_logits(family: Family, cfg, params: dict, x: jax.Array) -> jax.Array:
    """The output projection alone: final-norm hidden [..., D] -> logits [..., V] float32
    (the head kernel, or the embedding transpose when tied), the same ops as ``Decoder``."""
    if cfg.tie_word_embeddings:
        return common.tied_logits(x, params[family.embed_name]["embedding"], DTYPES[cfg.dtype])
    return _head(family, cfg).apply({"params": params[family.head_name]}, x).astype(jnp.float32)


def make_model(family: Family, cfg) -> tuple[Callable, Callable]:
    """(init_fn, apply_fn): see ``common.model_fns``."""
    return common.model_fns(Decoder(family, cfg), functools.partial(head_logits, family, cfg))


def make_decode_fn(family: Family, cfg) -> Callable:
    """Cached forward for ``tr_align.generate``: see ``common.decode_fn`` and ``Decoder``."""
    return common.decode_fn(Decoder(family, cfg))


def init_cache(family: Family, cfg, batch: int, length: int, dtype=None) -> list[dict]:
    """Zeroed KV cache, per layer {"k", "v"} of [batch, length, kv heads, head_dim], in the
    compute dtype unless ``dtype`` is given."""
    dtype = DTYPES[cfg.dtype] if dtype is None else dtype
    return common.zeros_cache(
        cfg.num_hidden_layers, batch, length, family.kv_heads(cfg), cfg.head_dim, dtype
    )
