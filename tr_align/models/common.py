"""Plumbing shared by the decoder models: linen module -> plain functions, masks, attention.

The model families (``llama``, ``gpt_neox``) are built by ``decoder`` into one linen module
with the same call signature: ``(input_ids, attention_mask)`` plus keyword-only
``positions, segment_ids, branch_ids`` for the plain forward, and ``cache, cache_index,
positions, kv_mask_BS`` for cached decoding; these helpers turn it into ``make_model``'s
and ``make_decode_fn``'s plain functions.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from tr_align import sharding

# dot_general accumulating (and returning) float32, for the output projection.
F32_DOT = functools.partial(jax.lax.dot_general, preferred_element_type=jnp.float32)


@flax.struct.dataclass
class FactoredKernel:
    """A projection's kernel kept as LoRA factors: ``W + scale * A @ B`` (W [in, out], A [in,
    r], B [r, out]), which ``decoder.Dense`` applies as ``x @ W + scale * (x @ A) @ B``
    without ever forming the [in, out] sum or its gradient (``tr_align.lora``'s view of a
    target for the forward; the effective weight is the same)."""

    w: Any
    a: Any
    b: Any
    scale: float = flax.struct.field(pytree_node=False)


def to_dict(tree: Any) -> Any:
    """Recursively converts (Frozen)Dict mappings to plain dicts."""
    if hasattr(tree, "items"):
        return {k: to_dict(v) for k, v in tree.items()}
    return tree


def model_fns(module: nn.Module, head_fn: Callable | None = None) -> tuple[Callable, Callable]:
    """(init_fn, apply_fn) for a decoder module.

    init_fn(rng) -> params: plain nested dict of float32 arrays.
    apply_fn(params, input_ids [B,T] int, attention_mask [B,T] 0/1 = None, *, positions=None,
      segment_ids=None, branch_ids=None) -> logits [B,T,V] float32. Neither is jitted.

      attention_mask: key padding of right-padded rows (default: none).
      positions [B,T] int: rotary positions (default ``arange(T)`` for every row).
      segment_ids [B,T] int: several sequences packed in a row, 0 = padding; exclusive with
        attention_mask.
      branch_ids [B,T] int (default all 0): prefix sharing inside a segment, 0 = the shared
        prefix, b > 0 = branch b; give each branch the positions it has after the prefix.
      Key k is visible to query q of the same row iff ``k <= q`` and (with segment_ids)
      ``seg[k] == seg[q]`` and (with branch_ids) ``br[k] in (0, br[q])``, and (with
      attention_mask) ``attention_mask[k]``; see ``plain_mask``.
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
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        branch_ids: jax.Array | None = None,
        split_head: bool = False,
    ):
        if split_head and head_fn is None:
            raise ValueError(f"{type(module).__name__}: split_head needs a head_fn")
        out = module.apply(
            {"params": params},
            input_ids,
            attention_mask,
            positions=positions,
            segment_ids=segment_ids,
            branch_ids=branch_ids,
            return_hidden=split_head,
        )
        return (out, functools.partial(head_fn, params)) if split_head else out

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
            positions=positions,
            kv_mask_BS=kv_mask,
        )

    return decode


def zeros_cache(num_layers: int, batch: int, length: int, kv_heads: int, head_dim: int, dtype):
    """Per layer {"k", "v"} zeros of [batch, length, kv_heads, head_dim]."""
    shape = (batch, length, kv_heads, head_dim)
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(num_layers)]


# Causal attention runs in query blocks of at least this many rows (at most
# CAUSAL_MAX_BLOCKS blocks), each against the keys up to its own end only.
CAUSAL_BLOCK = 64
CAUSAL_MAX_BLOCKS = 16


def attention(
    q_BTHE: jax.Array,
    k_BSKE: jax.Array,
    v_BSKE: jax.Array,
    mask_BTS: jax.Array,
    *,
    causal: bool = False,
) -> jax.Array:
    """Grouped-query softmax attention -> [B, T, H, E] in q's dtype.

    Query head h uses kv head h // G (contiguous groups, HF repeat_kv). Scores are
    accumulated and soft-maxed in float32; masked entries get finfo(float32).min, so
    a fully masked row gives a uniform (finite) distribution, never NaN.

    ``causal=True`` promises that ``mask_BTS`` hides every key after its query (S = T,
    ``k <= q``, as ``plain_mask`` builds it): the queries are then taken in blocks
    (``CAUSAL_BLOCK``), each against the keys up to the block's end, which skips the
    upper-triangle blocks of scores (about 40% of the attention work at T = 256, forward
    and backward) and gives the same outputs up to float summation order (a fully masked
    row still gets a finite uniform distribution, over fewer keys).
    """
    t = q_BTHE.shape[1]
    block = max(CAUSAL_BLOCK, -(-t // CAUSAL_MAX_BLOCKS))
    if causal and t == k_BSKE.shape[1] and t > block:
        outs = [
            _attention(
                q_BTHE[:, start : start + block],
                k_BSKE[:, : start + block],
                v_BSKE[:, : start + block],
                mask_BTS[:, start : start + block, : start + block],
            )
            for start in range(0, t, block)
        ]
        return jnp.concatenate(outs, axis=1)
    return _attention(q_BTHE, k_BSKE, v_BSKE, mask_BTS)


def _attention(q_BTHE, k_BSKE, v_BSKE, mask_BTS):
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


def plain_mask(
    shape_BT: tuple[int, int],
    attention_mask_BT=None,
    positions_BT=None,
    segment_ids_BT=None,
    branch_ids_BT=None,
    *,
    sliding_window: int | None = None,
):
    """(mask [B,T,T] bool, rotary positions [T] or [B,T]) for the plain forward.

    Key k is visible to query q of the same row iff ``k <= q`` (row order) and
      * ``attention_mask[k]`` when given (the right-padded batch: default all ones), or
        ``segment_ids[q] == segment_ids[k]`` when segment_ids are given (0 = padding, so
        pad queries see only pad keys: finite, unused outputs);
      * ``branch_ids[k] == 0 or branch_ids[k] == branch_ids[q]`` when branch_ids are given;
      * ``positions[q] - positions[k] < sliding_window`` when the model has one.
    Positions default to ``arange(T)``.
    """
    b, t = shape_BT
    slots_T = jnp.arange(t)
    mask_BTS = (slots_T[None, :] <= slots_T[:, None])[None]
    if segment_ids_BT is None:
        if attention_mask_BT is not None:
            mask_BTS = mask_BTS & attention_mask_BT.astype(jnp.bool_)[:, None, :]
    elif attention_mask_BT is not None:
        raise ValueError("give attention_mask or segment_ids, not both")
    else:
        mask_BTS = mask_BTS & (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])
    if branch_ids_BT is not None:
        key_BS = branch_ids_BT[:, None, :]
        mask_BTS = mask_BTS & ((key_BS == 0) | (key_BS == branch_ids_BT[:, :, None]))
    positions = slots_T if positions_BT is None else positions_BT
    if sliding_window is not None:
        pos = positions if positions.ndim == 2 else positions[None]
        mask_BTS = mask_BTS & ((pos[:, :, None] - pos[:, None, :]) < sliding_window)
    return jnp.broadcast_to(mask_BTS, (b, t, t)), positions


def cached_mask(cache_index, kv_mask_BS, length: int, sliding_window: int | None = None):
    """mask [B,T,S] bool for cached decoding: the chunk's queries sit at slots
    ``cache_index + arange(T)``; a query sees the slots valid in ``kv_mask_BS`` at or
    before its own (and, with a sliding window, fewer than ``sliding_window`` slots back)."""
    q_slots_T = cache_index + jnp.arange(length)
    kv_slots_S = jnp.arange(kv_mask_BS.shape[1])
    allowed_TS = kv_slots_S[None, :] <= q_slots_T[:, None]
    if sliding_window is not None:
        allowed_TS &= (q_slots_T[:, None] - kv_slots_S[None, :]) < sliding_window
    return allowed_TS[None] & kv_mask_BS.astype(jnp.bool_)[:, None, :]


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


def tied_logits(x, embedding_VD, dtype):
    """x [..., D] @ embedding^T in ``dtype`` with float32 accumulation -> [..., V] float32
    (computed on 2-D rows, like ``decoder.Dense``)."""
    x_ND = x.reshape(-1, x.shape[-1]).astype(dtype)
    logits_NV = F32_DOT(x_ND, embedding_VD.astype(dtype), (((1,), (1,)), ((), ())))
    return logits_NV.reshape(*x.shape[:-1], embedding_VD.shape[0])


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
