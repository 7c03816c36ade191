"""Deterministic, checkpointable batch iteration over tokenized examples (grain).

``train_iterator`` is a grain iterator over global batches (``batching.BatchOrder``: the order
depends only on the seed, a fresh permutation per epoch, optionally grouped by length), each
padded to its length bucket and cut to this process's rows. Its state (``get_state()``, a small
JSON-able dict) is saved in every checkpoint and restored on resume, so a resumed run sees
exactly the batches an uninterrupted run would see.

``layout`` (``"none"`` | ``"packed"`` | ``"prefix_shared"``) switches both to the sequence
batches of ``packing.pack_batch`` (segment ids, positions, sequence ids placed for ``shards``
data-parallel devices and ``microbatches`` accumulation steps); ``layout=None`` keeps the padded
pair dicts of ``batching.make_batch``. Either way a batch is a pure function of its global
batch index, so the iterator state stays the same small dict.
"""

from __future__ import annotations

import functools

import grain
import numpy as np

from tr_align.data import batching, packing
from tr_align.data.tokenize import TokenizedSet


def _buckets(data: TokenizedSet, buckets):
    return tuple(sorted(buckets)) if buckets else (int(data.lengths.max()),)


def train_iterator(
    data: TokenizedSet,
    *,
    batch_size: int,
    seed: int,
    buckets=None,
    pad_id: int = 0,
    group_window: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    layout: str | None = None,
    streams=None,
    shards: int = 1,
    microbatches: int = 1,
    pack_length: int = 0,
):
    """An endless iterator of host-local batches (dicts of [batch_size // process_count, L]
    arrays, L = the batch's bucket). ``buckets=None``: one bucket, the longest example.

    ``layout`` set: host-local sequence batches (``packing.pack_batch``) of ``streams``
    (default ``packing.default_streams(data)``; SFT passes ``("chosen",)``)."""
    if batch_size % process_count:
        raise ValueError(
            f"train.batch_size={batch_size} must be divisible by the number of processes "
            f"({process_count})"
        )
    order = batching.BatchOrder(data.lengths, batch_size, seed, group_window)
    if layout is None:
        pad = functools.partial(
            batching.make_batch,
            data,
            buckets=_buckets(data, buckets),
            pad_id=pad_id,
            process_index=process_index,
            process_count=process_count,
        )
    else:
        pad = functools.partial(
            packing.pack_batch,
            data,
            layout=layout,
            streams=tuple(streams or packing.default_streams(data)),
            buckets=_buckets(data, buckets),
            pad_id=pad_id,
            shards=shards,
            microbatches=microbatches,
            pack_length=pack_length,
            process_index=process_index,
            process_count=process_count,
        )
    return iter(grain.MapDataset.source(order).map(pad).to_iter_dataset())


def eval_batches(
    data: TokenizedSet,
    batch_size: int,
    *,
    buckets=None,
    pad_id: int = 0,
    per_row=None,
    layout: str | None = None,
    streams=None,
    shards: int = 1,
    pack_length: int = 0,
    process_index: int = 0,
    process_count: int = 1,
):
    """Fixed-order global eval batches; the last one is padded by repeating row 0 and every
    batch carries a ``weight`` array (1 for real rows, 0 for padding). ``per_row``: more
    arrays with one entry per example (e.g. the initial policy's log-probs), gathered into
    each batch under their own names with the same rows.

    ``layout`` set: sequence batches (``packing.pack_batch``, one microbatch), cut to this
    process's rows and examples (``weight`` and ``per_row`` included); with ``layout=None``
    the batches stay global and ``process_index``/``process_count`` are ignored."""
    n = len(data)
    buckets = _buckets(data, buckets)
    if layout is not None:
        streams = tuple(streams or packing.default_streams(data))
    local = batch_size // process_count
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        weight = (idx < n).astype(np.float32)
        idx = np.where(idx < n, idx, 0)
        if layout is None:
            batch = batching.make_batch(data, idx, buckets=buckets, pad_id=pad_id)
            batch.update({k: v[idx] for k, v in (per_row or {}).items()})
            batch["weight"] = weight
            yield batch
            continue
        batch = packing.pack_batch(
            data,
            idx,
            layout=layout,
            streams=streams,
            buckets=buckets,
            pad_id=pad_id,
            shards=shards,
            microbatches=1,
            pack_length=pack_length,
            process_index=process_index,
            process_count=process_count,
        )
        mine = slice(process_index * local, (process_index + 1) * local)
        batch.update({k: v[idx[mine]] for k, v in (per_row or {}).items()})
        batch["weight"] = weight[mine]
        yield batch
