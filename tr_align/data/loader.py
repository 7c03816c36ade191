"""Deterministic, checkpointable batch iteration over in-memory preference arrays (grain).

The order depends only on the seed: each epoch is a fresh permutation
(``shuffle(seed).repeat()``). The iterator state (``get_state()``, a small
JSON-able dict) is saved in every checkpoint and restored on resume, so a
resumed run sees exactly the batches an uninterrupted run would see. In a
multi-host run each process reads only its own rows (``process_index`` slice).
"""

from __future__ import annotations

import grain
import numpy as np


class _Rows:
    """A random-access source over a dict of equal-length arrays."""

    def __init__(self, arrays):
        self._arrays = arrays
        self._n = len(next(iter(arrays.values())))

    def __len__(self):
        return self._n

    def __getitem__(self, i):
        return {k: v[i] for k, v in self._arrays.items()}


def train_iterator(
    arrays, *, batch_size: int, seed: int, process_index: int = 0, process_count: int = 1
):
    """An endless iterator of host-local batches (dicts of [batch_size // process_count, ...] arrays)."""
    if batch_size % process_count:
        raise ValueError(
            f"train.batch_size={batch_size} must be divisible by the number of processes ({process_count})"
        )
    ds = grain.MapDataset.source(_Rows(arrays)).shuffle(seed=seed).repeat(None)
    ds = ds[process_index::process_count]
    ds = ds.batch(batch_size // process_count, drop_remainder=True)
    return iter(ds.to_iter_dataset())


def eval_batches(arrays, batch_size: int):
    """Fixed-order eval batches; the last one is padded by repeating row 0 and
    carries a ``weight`` array (1 for real rows, 0 for padding)."""
    n = len(next(iter(arrays.values())))
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        weight = (idx < n).astype(np.float32)
        idx = np.where(idx < n, idx, 0)
        batch = {k: v[idx] for k, v in arrays.items()}
        batch["weight"] = weight
        yield batch
