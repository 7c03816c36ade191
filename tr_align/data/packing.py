"""Padding-free token layouts ("sequence batches"): several sequences per row, prefix sharing.

A global batch of E examples, each a prompt and S completions ("streams": ``(chosen,
rejected)``; KTO ``(completion, kl)`` with ``kl`` the previous example's completion in the
global batch, as ``batching.make_batch`` builds it; SFT ``(chosen,)``), becomes [R, L] int32
arrays:

* ``input_ids``; ``positions`` (rotary position of each token); ``segment_ids`` (0 = padding,
  the segments of a row numbered 1, 2, ...); ``branch_ids`` (0 except in ``prefix_shared``);
  ``loss_mask`` (1 on completion tokens, whose log-probs count); ``seq_ids`` (on loss tokens:
  the microbatch-local sequence index ``(g // K) * S + s`` of stream s of global example g;
  0 elsewhere).
* per-example arrays (E_local entries): ``label`` for unpaired (KTO) data.

The step computes log p(token[t + 1] | hidden[t]); every loss token's predecessor in its row is
the previous token of its own sequence (segments never start with a loss token: prompts are
non-empty, and a sequence's tokens are contiguous).

Layouts:

* ``none``: one sequence (prompt + completion) per row, right-padded; L = the smallest bucket
  >= the longest sequence of the global batch (``make_batch``'s rule).
* ``packed``: one segment per sequence, positions from 0 in each, packed first-fit-decreasing
  (FFD) into rows of L = ``pack_length`` (> 0) or the bucket >= the longest sequence.
* ``prefix_shared``: one segment per example: ``prompt[:-1]`` (branch 0, positions 0..P-2), then
  for each stream s the prompt's last token and the stream's completion (branch s + 1, positions
  P-1, P, ...). Under the model's rule (key k visible to query q iff k <= q, same segment and
  branch[k] in (0, branch[q])) each completion sees the prompt and itself only, exactly as in
  its own row, for one repeated token per stream. An example whose shared segment would exceed
  ``pack_length`` (or the largest bucket) falls back to one ``packed`` segment per stream (still
  exact). Segments are packed FFD; L = ``pack_length`` or the bucket >= the longest segment.

Placement follows the step's data-parallel sharding over ``shards`` (D) devices (contiguous
blocks of the example and row axes) and its gradient accumulation over ``microbatches`` (K)
(``x.reshape(-1, K, ...).swapaxes(0, 1)``: microbatch j = items j, j + K, ...): example g is in
shard ``g // (E / D)`` and microbatch ``g % K``; global row i of R_total = D * K * r rows is in
shard ``i // (K * r)`` and microbatch ``i % K``. The units of each (shard, microbatch) group are
packed into that group's r rows; r = the most rows any group of the global batch needs, rounded
up by ``row_bucket`` (for ``none``, exactly E * S / (D * K)). Every host plans every group (from
lengths only, cheap) so all agree on [R, L], and materializes only its own rows
``[p * R_total / P, (p + 1) * R_total / P)`` and examples ``[p * E / P, (p + 1) * E / P)``.

Deterministic: FFD takes units by length descending, ties by (example, stream) order.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tr_align.data.batching import bucket_for, epoch_batches
from tr_align.data.tokenize import TokenizedSet

LAYOUTS = ("none", "packed", "prefix_shared")
FIELDS = ("input_ids", "positions", "segment_ids", "branch_ids", "loss_mask", "seq_ids")
STREAMS = ("chosen", "rejected", "completion", "kl")


def row_bucket(rows: int) -> int:
    """The smallest row count >= ``rows`` among 1..8, then steps of 2 up to 16, 4 up to 32,
    8 up to 64, ... (steps of 1/8 of the next power of two: at most ~12% padding rows)."""
    if rows <= 8:
        return max(int(rows), 1)
    step, top = 2, 16
    while rows > top:
        step, top = step * 2, top * 2
    return -(-int(rows) // step) * step


def default_streams(data: TokenizedSet, *, sft: bool = False) -> tuple[str, ...]:
    """Paired: (chosen, rejected); unpaired: (completion, kl); SFT: the first one only."""
    names = ("chosen", "rejected") if data.paired else ("completion", "kl")
    return names[:1] if sft else names


def _check_streams(data: TokenizedSet, streams) -> tuple[str, ...]:
    streams = tuple(streams)
    allowed = ("chosen", "rejected") if data.paired else ("completion", "kl")
    bad = [s for s in streams if s not in allowed]
    if not streams or bad or len(set(streams)) != len(streams):
        kind = "paired" if data.paired else "unpaired"
        raise ValueError(
            f"streams={streams!r}: {kind} data takes distinct streams from {allowed} "
            f"(known stream names: {STREAMS})"
        )
    return streams


@dataclasses.dataclass(frozen=True)
class Plan:
    """Where every unit (a sequence, or a shared-prefix example) of a global batch goes.

    Unit u: example ``unit_g[u]`` (position in the global batch), stream ``unit_s[u]`` (-1: the
    example's shared segment), ``unit_len[u]`` tokens, in global row ``unit_row[u]`` at column
    ``unit_off[u]`` as segment ``unit_seg[u]`` of that row.
    """

    layout: str
    streams: tuple[str, ...]
    length: int  # L
    rows_per_group: int  # r
    shards: int
    microbatches: int
    prompt_len: np.ndarray  # [E]
    comp_len: np.ndarray  # [E, S] (kl: after truncation)
    kl_idx: np.ndarray | None  # [E] dataset indices of the kl completions
    unit_g: np.ndarray
    unit_s: np.ndarray
    unit_len: np.ndarray
    unit_row: np.ndarray
    unit_off: np.ndarray
    unit_seg: np.ndarray

    @property
    def rows(self) -> int:  # R_total
        return self.shards * self.microbatches * self.rows_per_group

    @property
    def real_tokens(self) -> int:
        """Sum of prompt + completion over all sequences (the unshared count)."""
        return int((self.prompt_len[:, None] + self.comp_len).sum())

    @property
    def tokens(self) -> int:
        """Non-padding tokens of the layout (fewer than ``real_tokens`` with prefix sharing)."""
        return int(self.unit_len.sum())


def _ffd(lengths: np.ndarray, capacity: int):
    """First-fit-decreasing: (row, offset, segment number) of each item, and the row count."""
    n = len(lengths)
    order = np.lexsort((np.arange(n), -lengths))  # length descending, ties by index
    rem = np.zeros(n, np.int64)  # free space of each opened row
    count = np.zeros(n, np.int64)  # segments in each row
    row, off, seg = (np.zeros(n, np.int64) for _ in range(3))
    used = 0
    for i in order:
        fits = np.flatnonzero(rem[:used] >= lengths[i])
        if len(fits):
            r = int(fits[0])
        else:
            r, used = used, used + 1
            rem[r] = capacity
        row[i], off[i] = r, capacity - rem[r]
        count[r] += 1
        seg[i] = count[r]
        rem[r] -= lengths[i]
    return row, off, seg, used


def plan(
    data: TokenizedSet,
    idx,
    *,
    layout: str,
    streams,
    buckets,
    shards: int = 1,
    microbatches: int = 1,
    pack_length: int = 0,
    process_count: int = 1,
) -> Plan:
    """The placement of global batch ``idx`` (lengths only; the same on every host)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected one of {LAYOUTS}")
    streams = _check_streams(data, streams)
    idx = np.asarray(idx)
    E, S, D, K = len(idx), len(streams), int(shards), int(microbatches)
    if D < 1 or K < 1 or E % (D * K):
        raise ValueError(
            f"a global batch of {E} examples must be divisible by data-parallel shards ({D}) x "
            f"gradient-accumulation microbatches ({K}) = {D * K}: every (shard, microbatch) "
            f"group holds whole examples (set train.batch_size to a multiple of {D * K})"
        )
    if D % process_count:
        raise ValueError(
            f"{D} data-parallel shards cannot be split evenly over {process_count} processes"
        )
    max_bucket = max(buckets)
    plen = data.prompt.lengths[idx].astype(np.int64)
    kl_idx = None if data.paired else np.roll(idx, 1)
    clen = np.zeros((E, S), np.int64)
    for s, name in enumerate(streams):
        if name == "kl":  # truncated so prompt + kl fits the largest bucket (make_batch's rule)
            clen[:, s] = np.minimum(data.completion.lengths[kl_idx], max_bucket - plen)
        else:
            clen[:, s] = getattr(data, name).lengths[idx]
    seq_len = plen[:, None] + clen
    longest = int(seq_len.max())
    if pack_length and layout != "none" and longest > pack_length:
        raise ValueError(
            f"a sequence of {longest} tokens does not fit pack_length={pack_length} "
            f"(use a pack length >= data.max_length)"
        )
    cap = int(pack_length) if pack_length and layout != "none" else max_bucket

    # units: (example, stream, length); stream -1 = an example's shared segment
    g_all = np.repeat(np.arange(E), S)
    s_all = np.tile(np.arange(S), E)
    if layout == "prefix_shared":
        shared = plen + clen.sum(1) + (S - 1)
        ok = shared <= cap
        units = []
        for g in range(E):  # in (example, stream) order
            if ok[g]:
                units.append((g, -1, shared[g]))
            else:
                units.extend((g, s, seq_len[g, s]) for s in range(S))
        ug, us, ul = (np.asarray(x, np.int64) for x in zip(*units))
    else:
        ug, us, ul = g_all, s_all, seq_len.reshape(-1)
    length = (
        int(pack_length) if pack_length and layout != "none" else bucket_for(int(ul.max()), buckets)
    )

    per_shard = E // D
    group = (ug // per_shard) * K + ug % K  # d * K + j
    row_in_group = np.zeros(len(ug), np.int64)
    off = np.zeros(len(ug), np.int64)
    seg = np.ones(len(ug), np.int64)
    need = 0
    for gr in range(D * K):
        sel = np.flatnonzero(group == gr)
        if layout == "none":
            row_in_group[sel] = np.arange(len(sel))
            need = max(need, len(sel))
        else:
            r, o, sg, used = _ffd(ul[sel], length)
            row_in_group[sel], off[sel], seg[sel] = r, o, sg
            need = max(need, used)
    r = need if layout == "none" else row_bucket(need)
    d, j = group // K, group % K
    row = d * K * r + j + K * row_in_group
    return Plan(
        layout=layout,
        streams=streams,
        length=length,
        rows_per_group=r,
        shards=D,
        microbatches=K,
        prompt_len=plen,
        comp_len=clen,
        kl_idx=kl_idx,
        unit_g=ug,
        unit_s=us,
        unit_len=ul,
        unit_row=row,
        unit_off=off,
        unit_seg=seg,
    )


def pack_batch(
    data: TokenizedSet,
    idx,
    *,
    layout: str,
    streams,
    buckets,
    pad_id: int = 0,
    shards: int = 1,
    microbatches: int = 1,
    pack_length: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> dict:
    """The host-local sequence batch of global batch ``idx`` (module docstring): [R_local, L]
    ``FIELDS`` arrays, ``examples`` [E_local] (the examples' dataset indices) and, for
    unpaired data, ``label`` [E_local]."""
    idx = np.asarray(idx)
    p = plan(
        data,
        idx,
        layout=layout,
        streams=streams,
        buckets=buckets,
        shards=shards,
        microbatches=microbatches,
        pack_length=pack_length,
        process_count=process_count,
    )
    E, S, K, L = len(idx), len(p.streams), p.microbatches, p.length
    rows_local = p.rows // process_count
    first_row = process_index * rows_local
    e_local = E // process_count
    out = {k: np.zeros((rows_local, L), np.int32) for k in FIELDS}
    out["input_ids"][:] = pad_id
    ids, pos, segs, br, loss, sid = (out[k] for k in FIELDS)

    def completion(g, s):
        name = p.streams[s]
        if name == "kl":
            return data.completion[int(p.kl_idx[g])][: int(p.comp_len[g, s])]
        return getattr(data, name)[int(idx[g])]

    mine = np.flatnonzero((p.unit_row >= first_row) & (p.unit_row < first_row + rows_local))
    for u in mine:
        g, s = int(p.unit_g[u]), int(p.unit_s[u])
        row, a, n = int(p.unit_row[u]) - first_row, int(p.unit_off[u]), int(p.unit_len[u])
        prompt = data.prompt[int(idx[g])]
        P = len(prompt)
        segs[row, a : a + n] = p.unit_seg[u]
        if s >= 0:  # one sequence: prompt + completion
            c = completion(g, s)
            ids[row, a : a + P] = prompt
            ids[row, a + P : a + n] = c
            pos[row, a : a + n] = np.arange(n)
            loss[row, a + P : a + n] = 1
            sid[row, a + P : a + n] = (g // K) * S + s
            continue
        # shared prefix: prompt[:-1], then per stream: prompt[-1] + completion
        ids[row, a : a + P - 1] = prompt[:-1]
        pos[row, a : a + P - 1] = np.arange(P - 1)
        t = a + P - 1
        for s in range(S):
            c = completion(g, s)
            m = len(c)
            ids[row, t] = prompt[-1]
            ids[row, t + 1 : t + 1 + m] = c
            pos[row, t : t + 1 + m] = np.arange(P - 1, P + m)
            br[row, t : t + 1 + m] = s + 1
            loss[row, t + 1 : t + 1 + m] = 1
            sid[row, t + 1 : t + 1 + m] = (g // K) * S + s
            t += 1 + m
    my_examples = idx[process_index * e_local : (process_index + 1) * e_local]
    out["examples"] = my_examples.astype(np.int32)  # dataset indices: E, for the step
    if not data.paired:
        out["label"] = data.label[my_examples]
    return out


def padding_efficiency(batch: dict) -> float:
    """Non-padding tokens (segment_ids > 0) / R * L of a sequence batch."""
    seg = batch["segment_ids"]
    return float((seg > 0).sum() / max(seg.size, 1))


def token_counts(batch: dict) -> dict:
    """``tokens``: non-padding tokens of the layout; ``real_tokens``: prompt + completion summed
    over all its sequences (what an unshared layout holds: equal to ``tokens`` for ``none`` and
    ``packed``); ``padded_tokens``: R * L; ``sequences``.

    From the batch alone: a sequence's last loss token sits at position P + len(completion) - 1.
    """
    seg, loss, sid, pos = (batch[k] for k in ("segment_ids", "loss_mask", "seq_ids", "positions"))
    cont = np.zeros(loss.shape, bool)  # the next token continues this loss chain
    cont[:, :-1] = (loss[:, 1:] == 1) & (sid[:, 1:] == sid[:, :-1]) & (seg[:, 1:] == seg[:, :-1])
    end = (loss == 1) & ~cont
    return {
        "tokens": int((seg > 0).sum()),
        "real_tokens": int((pos[end].astype(np.int64) + 1).sum()),
        "padded_tokens": int(seg.size),
        "sequences": int(end.sum()),
    }


def epoch_padding_efficiency(
    data: TokenizedSet,
    batch_size: int,
    *,
    layout: str,
    streams,
    buckets,
    shards: int = 1,
    microbatches: int = 1,
    pack_length: int = 0,
    seed: int = 0,
    group_window: int = 0,
) -> dict:
    """One epoch's ``tokens`` / ``real_tokens`` / ``padded_tokens`` and ``efficiency``
    (tokens / padded), from lengths alone (nothing materialized)."""
    order = epoch_batches(data.lengths, batch_size, seed, 0, group_window=group_window)
    tokens = real = padded = 0
    for idx in order:
        p = plan(
            data,
            idx,
            layout=layout,
            streams=streams,
            buckets=buckets,
            shards=shards,
            microbatches=microbatches,
            pack_length=pack_length,
        )
        tokens, real, padded = tokens + p.tokens, real + p.real_tokens, padded + p.rows * p.length
    return {
        "tokens": tokens,
        "real_tokens": real,
        "padded_tokens": padded,
        "efficiency": tokens / max(padded, 1),
    }
