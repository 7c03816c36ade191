"""Plumbing shared by the decoder models: linen module -> plain functions, KV caches.

Every model module (``llama``, ``gpt_neox``) defines a linen module with the same call
signature, ``(input_ids, attention_mask)`` for the plain forward and keyword-only
``cache, cache_index, positions_BT, kv_mask_BS`` for cached decoding, and exposes it
through these helpers as ``make_model``, ``make_decode_fn`` and ``init_cache``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tr_align import sharding

# dot_general accumulating (and returning) float32, for the output projection.
F32_DOT = functools.partial(jax.lax.dot_general, preferred_element_type=jnp.float32)


def to_dict(tree: Any) -> Any:
    """Recursively converts (Frozen)Dict mappings to plain dicts."""
    if hasattr(tree, "items"):
        return {k: to_dict(v) for k, v in tree.items()}
    return tree


def model_fns(module: nn.Module, head_fn: Callable | None = None) -> tuple[Callable, Callable]:
    """(init_fn, apply_fn) for a decoder module.

    init_fn(rng) -> params: plain nested dict of float32 arrays.
    apply_fn(params, input_ids [B,T] int32, attention_mask [B,T] 0/1) -> logits
      [B,T,V] float32. Neither is jitted; wrap in jax.jit as needed.
    apply_fn(..., split_head=True) -> (hidden [B,T,D] in the compute dtype, head) with
      ``head(x [..., D]) -> logits [..., V] float32`` the output projection bound to
      ``params`` (``head_fn(params, x)``), so ``head(hidden)`` equals the plain output.
      Callers apply ``head`` piecewise to never hold all [B,T,V] logits at once
      (``losses.chunked_sequence_logps``).
    """

    def init_fn(rng: jax.Array) -> dict:
        dummy = jnp.zeros((1, 1), jnp.int32)
        variables = module.init(rng, dummy, jnp.ones((1, 1), jnp.int32))
        return to_dict(variables["params"])

    def apply_fn(
        params: dict,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        split_head: bool = False,
    ):
        if not split_head:
            return module.apply({"params": params}, input_ids, attention_mask)
        if head_fn is None:
            raise ValueError(f"{type(module).__name__}: split_head needs a head_fn")
        hidden = module.apply({"params": params}, input_ids, attention_mask, return_hidden=True)
        return hidden, functools.partial(head_fn, params)

    return init_fn, apply_fn


def decode_fn(module: nn.Module) -> Callable:
    """decode_fn(params, input_ids [B,T], positions [B,T], cache, cache_index, kv_mask [B,S])
    -> (logits [B,T,V] float32, new_cache). Not jitted (``tr_align.generate`` jits it)."""

    def decode(params, input_ids, positions, cache, cache_index, kv_mask):
        return module.apply(
            {"params": params},
            input_ids,
            cache=cache,
            cache_index=cache_index,
            positions_BT=positions,
            kv_mask_BS=kv_mask,
        )

    return decode


def zeros_cache(num_layers: int, batch: int, length: int, kv_heads: int, head_dim: int, dtype):
    """Per layer {"k", "v"} zeros of [batch, length, kv_heads, head_dim]."""
    shape = (batch, length, kv_heads, head_dim)
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(num_layers)]


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


def slot_mask(
    attention_mask_BT,
    cache_index,
    kv_mask_BS,
    positions_BT,
    *,
    batch: int,
    length: int,
    sliding_window: int | None = None,
):
    """(mask [B,T,S] bool, rotary positions) for the plain or the cached forward.

    Plain forward (``cache_index`` None): T = S, key padding from ``attention_mask_BT``
    (default all ones), positions ``arange(T)`` (inputs are right-padded). Cached
    decoding: the chunk's queries sit at slots ``cache_index + arange(T)``, keys are
    the S cache slots marked valid in ``kv_mask_BS``, positions are ``positions_BT``.
    A query sees valid keys at or before its own slot (and, with a sliding window,
    fewer than ``sliding_window`` slots back).
    """
    if cache_index is None:
        if attention_mask_BT is None:
            attention_mask_BT = jnp.ones((batch, length), jnp.int32)
        q_slots_T, kv_valid_BS, positions = (
            jnp.arange(length),
            attention_mask_BT,
            jnp.arange(length),
        )
    else:
        q_slots_T, kv_valid_BS, positions = (
            cache_index + jnp.arange(length),
            kv_mask_BS,
            positions_BT,
        )
    kv_slots_S = jnp.arange(kv_valid_BS.shape[1])
    allowed_TS = kv_slots_S[None, :] <= q_slots_T[:, None]
    if sliding_window is not None:
        allowed_TS &= (q_slots_T[:, None] - kv_slots_S[None, :]) < sliding_window
    return allowed_TS[None] & kv_valid_BS.astype(jnp.bool_)[:, None, :], positions


def run_blocks(blocks, x_BTD, mask_BTS, cos, sin, cache=None, cache_index=None):
    """Applies the decoder layers in order, threading the per-layer KV cache when given.

    Returns (x_BTD, new_cache); new_cache is None for the plain forward. The residual
    stream is pinned to (batch, length, embed) at each block boundary when a mesh is
    active (``sharding.constrain``; a no-op otherwise).
    """
    if cache is None:
        x_BTD = sharding.constrain(x_BTD, sharding.ACTIVATION_BTD)
        for block in blocks:
            x_BTD = block(x_BTD, mask_BTS, cos, sin)
            x_BTD = sharding.constrain(x_BTD, sharding.ACTIVATION_BTD)
        return x_BTD, None
    new_cache = []
    for block, layer_cache in zip(blocks, cache):
        x_BTD, layer_cache = block(x_BTD, mask_BTS, cos, sin, layer_cache, cache_index)
        new_cache.append(layer_cache)
    return x_BTD, new_cache


def tied_logits(x_BTD, embedding_VD, dtype):
    """x @ embedding^T in ``dtype`` with float32 accumulation -> [B,T,V] float32."""
    return jnp.einsum(
        "btd,vd->btv", x_BTD, embedding_VD.astype(dtype), preferred_element_type=jnp.float32
    )


# model.remat: what the backward pass keeps of each decoder block's forward.
#   none       keep every intermediate (fastest, most memory);
#   full       keep only the block's input, recompute the rest in the backward pass;
#   save_dots  keep the outputs of matmuls without batch dimensions (the q/k/v/o and MLP
#              projections), recompute norms, activations, RoPE and the attention
#              scores/softmax (jax.checkpoint_policies.dots_with_no_batch_dims_saveable).
REMAT_POLICIES = ("none", "full", "save_dots")


def remat_block(block_cls: type[nn.Module], policy: str) -> type[nn.Module]:
    """``block_cls`` wrapped in ``nn.remat`` for ``policy`` (one of REMAT_POLICIES).

    Parameter names and values are unchanged; only what the backward pass stores differs.
    """
    if policy == "none":
        return block_cls
    if policy == "full":
        return nn.remat(block_cls, prevent_cse=True)
    if policy == "save_dots":
        return nn.remat(
            block_cls,
            prevent_cse=True,
            policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        )
    raise ValueError(f"remat={policy!r}: expected one of {REMAT_POLICIES}")
