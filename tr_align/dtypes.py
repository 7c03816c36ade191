"""The dtype names a config or a loader accepts, and the jax dtype of each."""

from __future__ import annotations

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
NAMES = tuple(DTYPES)  # ("float32", "bfloat16")
