"""Plumbing shared by the decoder models: linen module -> plain functions, KV caches.

Every model module (``llama``, ``gpt_neox``) defines a linen module with the same call
signature, ``(input_ids, attention_mask)`` for the plain forward and keyword-only
``cache, cache_index, positions_BT, kv_mask_BS`` for cached decoding, and exposes it
through these helpers as ``make_model``, ``make_decode_fn`` and ``init_cache``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def to_dict(tree: Any) -> Any:
    """Recursively converts (Frozen)Dict mappings to plain dicts."""
    if hasattr(tree, "items"):
        return {k: to_dict(v) for k, v in tree.items()}
    return tree


def model_fns(module: nn.Module) -> tuple[Callable, Callable]:
    """(init_fn, apply_fn) for a decoder module.

    init_fn(rng) -> params: plain nested dict of float32 arrays.
    apply_fn(params, input_ids [B,T] int32, attention_mask [B,T] 0/1) -> logits
      [B,T,V] float32. Neither is jitted; wrap in jax.jit as needed.
    """

    def init_fn(rng: jax.Array) -> dict:
        dummy = jnp.zeros((1, 1), jnp.int32)
        variables = module.init(rng, dummy, jnp.ones((1, 1), jnp.int32))
        return to_dict(variables["params"])

    def apply_fn(
        params: dict, input_ids: jax.Array, attention_mask: jax.Array | None = None
    ) -> jax.Array:
        return module.apply({"params": params}, input_ids, attention_mask)

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
