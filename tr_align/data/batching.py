"""Fixed-shape padded batches from tokenized examples: length buckets and batch order.

jit compiles one program per input shape, so every batch is right-padded to the
smallest *bucket* length that holds its longest sequence: a few bucket sizes mean a few
compiled programs, and short batches do not pay for the longest sequence in the data.

Order: the global batch ``k`` of epoch ``e`` is a pure function of (seed, e, k): each epoch
is a fresh permutation of the examples (numpy's PCG64 seeded with ``(seed, e)``), cut into
``len // batch_size`` batches (the remainder waits for the next epoch's permutation). With
``group_by_length``, each window of ``group_window`` consecutive batches is sorted by length
before it is cut (so batches hold similar lengths and pad less), and the window's batches are
then shuffled, like transformers' ``LengthGroupedSampler``.

Multi-host: every process computes the same global batch of indices and the same bucket, and
pads only its own rows ``[process_index * B / P, (process_index + 1) * B / P)``.
"""

from __future__ import annotations

import numpy as np

from tr_align.data.tokenize import TokenizedSet

PAIR_FIELDS = ("input_ids", "attention_mask", "loss_mask")


def default_buckets(max_length: int, smallest: int = 64) -> tuple[int, ...]:
    """Powers of two from ``smallest`` up to ``max_length``, and ``max_length`` itself."""
    out, b = [], smallest
    while b < max_length:
        out.append(b)
        b *= 2
    return tuple(out) + (max_length,)


def bucket_for(length: int, buckets) -> int:
    """The smallest bucket >= length (buckets sorted ascending)."""
    for b in buckets:
        if b >= length:
            return b
    raise ValueError(f"a sequence of {length} tokens exceeds the largest bucket {buckets[-1]}")


def epoch_batches(
    lengths: np.ndarray, batch_size: int, seed: int, epoch: int, *, group_window: int = 0
) -> np.ndarray:
    """[num_batches, batch_size] example indices of one epoch (see module docstring)."""
    n = len(lengths)
    num = n // batch_size
    rng = np.random.Generator(np.random.PCG64([seed, epoch]))
    order = rng.permutation(n)[: num * batch_size]
    if group_window > 1:
        w = group_window * batch_size
        for start in range(0, len(order), w):
            part = order[start : start + w]
            # stable sort by descending length; ties keep the random order
            order[start : start + w] = part[np.argsort(-lengths[part], kind="stable")]
    batches = order.reshape(num, batch_size)
    if group_window > 1:
        batches = batches[rng.permutation(num)]
    return batches


class BatchOrder:
    """Random access to the global batches of an endless sequence of epochs: ``[j]`` is the
    index array of global batch j. A ``Sequence`` for ``grain.MapDataset.source``."""

    EPOCHS = 1_000_000  # "endless": grain needs a length

    def __init__(self, lengths, batch_size: int, seed: int, group_window: int = 0):
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group_window = group_window
        self.per_epoch = len(self.lengths) // batch_size
        self._cached = (-1, None)
        if self.per_epoch == 0:
            raise ValueError(
                f"{len(self.lengths)} training examples are fewer than one batch "
                f"(train.batch_size={batch_size})"
            )

    def __len__(self) -> int:
        return self.per_epoch * self.EPOCHS

    def _epoch(self, epoch: int) -> np.ndarray:
        if self._cached[0] != epoch:  # one epoch's order at a time (a few bytes per example)
            order = epoch_batches(
                self.lengths, self.batch_size, self.seed, epoch, group_window=self.group_window
            )
            self._cached = (epoch, order)
        return self._cached[1]

    def __getitem__(self, j: int) -> np.ndarray:
        epoch, k = divmod(int(j), self.per_epoch)
        return self._epoch(epoch)[k]


def _pad_rows(prompts, completions, length, pad_id):
    """[n, length] input_ids / attention_mask / loss_mask of prompt+completion rows."""
    n = len(prompts)
    ids = np.full((n, length), pad_id, np.int32)
    attn = np.zeros((n, length), np.int32)
    loss = np.zeros((n, length), np.int32)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        lp, lc = len(p), len(c)
        ids[i, :lp] = p
        ids[i, lp : lp + lc] = c
        attn[i, : lp + lc] = 1
        loss[i, lp : lp + lc] = 1
    return dict(zip(PAIR_FIELDS, (ids, attn, loss)))


def make_batch(
    data: TokenizedSet,
    idx: np.ndarray,
    *,
    buckets,
    pad_id: int,
    process_index: int = 0,
    process_count: int = 1,
) -> dict:
    """The host-local padded batch for global batch ``idx`` (all hosts pick the same bucket).

    Paired: ``{chosen,rejected}_{input_ids,attention_mask,loss_mask}``. Unpaired (KTO):
    ``completion_*``, ``label`` and ``kl_*``, where the KL rows pair each prompt with the
    previous example's completion in the global batch (TRL's mismatched pairs for the KL
    reference point), truncated to the largest bucket.
    """
    idx = np.asarray(idx)
    if data.paired:
        length = bucket_for(int(data.lengths[idx].max()), buckets)
    else:
        kl_idx = np.roll(idx, 1)
        # a KL row longer than the largest bucket keeps the start of its completion
        kl_len = np.minimum(
            data.prompt.lengths[idx] + data.completion.lengths[kl_idx], max(buckets)
        )
        length = bucket_for(int(max(data.lengths[idx].max(), kl_len.max())), buckets)
    local = len(idx) // process_count
    sl = slice(process_index * local, (process_index + 1) * local)
    mine = idx[sl]
    prompts = [data.prompt[i] for i in mine]
    out = {}
    names = ("chosen", "rejected") if data.paired else ("completion",)
    for name in names:
        comp = getattr(data, name)
        rows = _pad_rows(prompts, [comp[i] for i in mine], length, pad_id)
        out.update({f"{name}_{k}": v for k, v in rows.items()})
    if not data.paired:
        out["label"] = data.label[mine]
        kl_comps = [data.completion[j][: length - len(p)] for j, p in zip(kl_idx[sl], prompts)]
        rows = _pad_rows(prompts, kl_comps, length, pad_id)
        out.update({f"kl_{k}": v for k, v in rows.items()})
    return out


def padding_efficiency(batch: dict) -> float:
    """Real tokens / padded tokens of a batch (chosen + rejected, or completion rows)."""
    masks = [v for k, v in batch.items() if k.endswith("attention_mask") and not k.startswith("kl")]
    return float(sum(m.sum() for m in masks) / sum(m.size for m in masks))


def epoch_padding_efficiency(
    data: TokenizedSet, batch_size: int, *, buckets, seed: int = 0, group_window: int = 0
) -> float:
    """Padding efficiency of one epoch's batches, from lengths alone (no padding done)."""
    order = epoch_batches(data.lengths, batch_size, seed, 0, group_window=group_window)
    comps = data.completions()
    real = padded = 0
    for idx in order:
        length = bucket_for(int(data.lengths[idx].max()), buckets)
        for c in comps:
            real += int((data.prompt.lengths[idx] + c.lengths[idx]).sum())
        padded += length * len(idx) * len(comps)
    return real / max(padded, 1)
