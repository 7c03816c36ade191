"""Sequence batches (tr_align.data.packing): every (example, stream) sequence is recoverable
from the layout exactly as the model sees it, placed in its data-parallel shard and
gradient-accumulation microbatch; hosts split the global layout; packing removes padding."""

import json

import numpy as np
import pytest

from tr_align.data import batching, loader, packing
from tr_align.data.tokenize import Ragged, TokenizedSet

PAD = 0
BUCKETS = (8, 16, 20)
STREAM_CASES = {
    "paired": (True, ("chosen", "rejected")),
    "kto": (False, ("completion", "kl")),
    "sft": (True, ("chosen",)),
}


def toy_set(n=48, paired=True, seed=0, max_len=20):
    """Random tokens (1..300, never PAD); prompts 1..10 tokens (some of exactly 1),
    completions 1..12 (unpaired: 1..14 and 1..16, so that some KL rows need truncating), every
    example's longest sequence <= max_len."""
    rng = np.random.default_rng(seed)
    prompts, comps = [], []
    top_p, top_c = (11, 13) if paired else (15, 17)
    while len(prompts) < n:
        p = 1 if len(prompts) % 7 == 0 else int(rng.integers(1, top_p))
        cs = [int(rng.integers(1, top_c)) for _ in range(2 if paired else 1)]
        if p + max(cs) > max_len:
            continue
        prompts.append(rng.integers(1, 300, p).tolist())
        comps.append([rng.integers(1, 300, c).tolist() for c in cs])
    if paired:
        return TokenizedSet(
            prompt=Ragged.from_lists(prompts),
            chosen=Ragged.from_lists([c[0] for c in comps]),
            rejected=Ragged.from_lists([c[1] for c in comps]),
        )
    return TokenizedSet(
        prompt=Ragged.from_lists(prompts),
        completion=Ragged.from_lists([c[0] for c in comps]),
        label=(np.arange(n) % 2).astype(np.int32),
    )


def expected(data, idx, streams, max_bucket):
    """(g, s, prompt, completion) of every sequence, built independently of packing."""
    kl = np.roll(idx, 1)
    for g, i in enumerate(idx):
        p = list(data.prompt[i])
        for s, name in enumerate(streams):
            if name == "kl":
                c = list(data.completion[kl[g]][: max_bucket - len(p)])
            else:
                c = list(getattr(data, name)[i])
            yield g, s, p, c


def visible(batch, row, q):
    """Columns that query column q attends to (the model's rule)."""
    seg, br = batch["segment_ids"][row, : q + 1], batch["branch_ids"][row, : q + 1]
    return np.flatnonzero((seg == seg[q]) & ((br == 0) | (br == br[q])))


def check_layout(batch, data, idx, streams, *, layout, shards=1, microbatches=1, pack_length=0):
    E, S, D, K = len(idx), len(streams), shards, microbatches
    ids, pos, seg, br, loss, sid = (batch[k] for k in packing.FIELDS)
    assert all(batch[k].dtype == np.int32 for k in packing.FIELDS)
    R, L = ids.shape
    assert R % (D * K) == 0
    assert L == pack_length if pack_length else L in BUCKETS
    pad = seg == 0
    assert (ids[pad] == PAD).all() and not (loss[pad].any() or sid[pad].any() or pos[pad].any())
    assert not br[pad].any() and not sid[loss == 0].any()
    if layout != "prefix_shared":
        assert not br.any()
    if layout == "none":
        assert R == E * S and (seg <= 1).all()
    for row in range(R):  # segments 1, 2, ... left to right, contiguous, padding at the end
        s_row = seg[row]
        starts = np.flatnonzero(np.diff(np.concatenate([[-1], s_row])) != 0)
        runs = s_row[starts]
        nz = runs[runs > 0]
        assert nz.tolist() == list(range(1, len(nz) + 1))
        assert (runs[len(nz) :] == 0).all()
        first = starts[runs > 0]
        assert (pos[row, first] == 0).all() and not loss[row, first].any()
    covered = np.zeros(loss.shape, bool)
    rows = np.arange(R)
    for g, s, p, c in expected(data, idx, streams, max(BUCKETS)):
        sel = (sid == (g // K) * S + s) & (loss == 1) & (rows % K == g % K)[:, None]
        r_, t = np.nonzero(sel)
        assert len(set(r_.tolist())) == 1, (g, s)
        row = r_[0]
        assert row // (R // D) == g // (E // D), "the sequence is outside its example's shard"
        assert row % K == g % K
        assert (np.diff(t) == 1).all()
        assert ids[row, t].tolist() == c
        assert pos[row, t].tolist() == list(range(len(p), len(p) + len(c)))
        assert ids[row, t[0] - 1] == p[-1] and pos[row, t[0] - 1] == len(p) - 1
        full = p + c
        for q in t:  # the context of the hidden state that predicts token q
            k = visible(batch, row, q - 1)
            assert ids[row, k].tolist() == full[: pos[row, q]]
            assert pos[row, k].tolist() == list(range(pos[row, q]))
        if layout == "prefix_shared" and br[row, t[0]]:
            assert br[row, t[0]] == br[row, t[0] - 1] == s + 1
        covered[row, t] = True
    assert (covered == (loss == 1)).all(), "loss tokens that belong to no sequence"


def _batch(case, layout, shards=1, microbatches=1, seed=0, **kw):
    paired, streams = STREAM_CASES[case]
    data = toy_set(paired=paired, seed=seed)
    idx = np.random.default_rng(seed + 1).permutation(len(data))[:16]
    batch = packing.pack_batch(
        data,
        idx,
        layout=layout,
        streams=streams,
        buckets=BUCKETS,
        pad_id=PAD,
        shards=shards,
        microbatches=microbatches,
        **kw,
    )
    return data, idx, streams, batch


@pytest.mark.parametrize("dk", [(1, 1), (2, 2), (4, 1), (1, 4)])
@pytest.mark.parametrize("case", list(STREAM_CASES))
@pytest.mark.parametrize("layout", packing.LAYOUTS)
def test_every_sequence_is_recovered_exactly_in_its_shard_and_microbatch(layout, case, dk):
    D, K = dk
    data, idx, streams, batch = _batch(case, layout, D, K)
    check_layout(batch, data, idx, streams, layout=layout, shards=D, microbatches=K)
    if not data.paired:
        np.testing.assert_array_equal(batch["label"], data.label[idx])


def test_prefix_shared_falls_back_to_separate_segments_only_for_long_examples():
    data, idx, streams, batch = _batch("paired", "prefix_shared")
    p = packing.plan(data, idx, layout="prefix_shared", streams=streams, buckets=BUCKETS)
    shared = p.unit_s < 0
    assert shared.any() and (~shared).any()  # the toy data exercises both
    lens = p.prompt_len + p.comp_len.sum(1) + 1
    assert set(p.unit_g[shared].tolist()) == set(np.flatnonzero(lens <= max(BUCKETS)).tolist())
    # a shared example saves P - 1 tokens per extra stream
    saved = p.real_tokens - p.tokens
    assert saved == int((p.prompt_len[p.unit_g[shared]] - 1).sum())


def test_kl_stream_is_truncated_to_the_largest_bucket():
    data, idx, streams, batch = _batch("kto", "packed")
    p = packing.plan(data, idx, layout="packed", streams=streams, buckets=BUCKETS)
    kl = data.completion.lengths[np.roll(idx, 1)]
    assert (p.comp_len[:, 1] < kl).any()  # the toy data truncates some
    assert (p.prompt_len + p.comp_len[:, 1] <= max(BUCKETS)).all()


@pytest.mark.parametrize("layout", packing.LAYOUTS)
def test_hosts_split_the_single_host_layout(layout):
    paired, streams = STREAM_CASES["kto"]
    data = toy_set(paired=paired)
    idx = np.random.default_rng(3).permutation(len(data))[:16]
    kw = dict(layout=layout, streams=streams, buckets=BUCKETS, shards=2, microbatches=2)
    full = packing.pack_batch(data, idx, **kw)
    parts = [
        packing.pack_batch(data, idx, process_index=i, process_count=2, **kw) for i in range(2)
    ]
    assert set(parts[0]) == set(full)
    for k, v in full.items():
        np.testing.assert_array_equal(np.concatenate([q[k] for q in parts]), v)


def test_shapes_row_counts_and_pack_length():
    data, idx, streams, none = _batch("paired", "none", 2, 2)
    assert none["input_ids"].shape == (32, batching.bucket_for(data.lengths[idx].max(), BUCKETS))
    _, _, _, packed = _batch("paired", "packed", 2, 2)
    R, L = packed["input_ids"].shape
    assert R % 4 == 0 and packing.row_bucket(R // 4) == R // 4
    _, _, _, fixed = _batch("paired", "packed", 2, 2, pack_length=40)
    assert fixed["input_ids"].shape[1] == 40 and fixed["input_ids"].shape[0] <= R
    check_layout(
        fixed, data, idx, streams, layout="packed", shards=2, microbatches=2, pack_length=40
    )
    _, _, _, again = _batch("paired", "packed", 2, 2)
    for k in packing.FIELDS:  # deterministic
        np.testing.assert_array_equal(again[k], packed[k])


def test_row_bucket():
    got = {r: packing.row_bucket(r) for r in (1, 2, 7, 8, 9, 10, 11, 16, 17, 21, 32, 33, 64, 65)}
    assert got == {
        1: 1,
        2: 2,
        7: 7,
        8: 8,
        9: 10,
        10: 10,
        11: 12,
        16: 16,
        17: 20,
        21: 24,
        32: 32,
        33: 40,
        64: 64,
        65: 80,
    }
    assert packing.row_bucket(100) == 112 and packing.row_bucket(129) == 160


def test_bad_arguments_are_explained():
    data = toy_set()
    idx = np.arange(12)
    with pytest.raises(ValueError, match=r"divisible by data-parallel shards \(2\) x .*\(4\)"):
        packing.pack_batch(
            data,
            idx,
            layout="packed",
            streams=("chosen",),
            buckets=BUCKETS,
            microbatches=4,
            shards=2,
        )
    with pytest.raises(ValueError, match="pack_length=10"):
        packing.pack_batch(
            data, idx, layout="packed", streams=("chosen",), buckets=BUCKETS, pack_length=10
        )
    with pytest.raises(ValueError, match="streams"):
        packing.pack_batch(data, idx, layout="packed", streams=("kl",), buckets=BUCKETS)
    with pytest.raises(ValueError, match="layout"):
        packing.pack_batch(data, idx, layout="dense", streams=("chosen",), buckets=BUCKETS)


def long_tailed_set(n=64, seed=0, max_length=512):
    """HH-like lengths: prompts 20-400 tokens, responses 10-300 (log-normal), max_length 512."""
    rng = np.random.default_rng(seed)

    def draw(lo, hi, median):
        return np.clip(rng.lognormal(np.log(median), 0.7, n), lo, hi).astype(int)

    p, c, r = draw(20, 400, 80), draw(10, 300, 60), draw(10, 300, 60)
    p = np.minimum(p, max_length - np.maximum(c, r))
    seqs = lambda lens: Ragged.from_lists([rng.integers(1, 300, k).tolist() for k in lens])
    return TokenizedSet(prompt=seqs(p), chosen=seqs(c), rejected=seqs(r))


def test_packing_removes_padding_and_prefix_sharing_removes_prompt_tokens():
    data = long_tailed_set()
    buckets = batching.default_buckets(512)
    idx = np.arange(32)
    streams = ("chosen", "rejected")
    counts = {}
    for layout in packing.LAYOUTS:
        b = packing.pack_batch(data, idx, layout=layout, streams=streams, buckets=buckets)
        counts[layout] = packing.token_counts(b)
        assert counts[layout]["sequences"] == 64
        eff = packing.padding_efficiency(b)
        assert eff == counts[layout]["tokens"] / counts[layout]["padded_tokens"]
    real = int(
        (2 * data.prompt.lengths[idx] + data.chosen.lengths[idx] + data.rejected.lengths[idx]).sum()
    )
    for layout in packing.LAYOUTS:  # the unshared count, recovered from every layout
        assert counts[layout]["real_tokens"] == real
    assert counts["none"]["tokens"] == counts["packed"]["tokens"] == real
    pad = {k: v["padded_tokens"] - v["tokens"] for k, v in counts.items()}
    assert pad["packed"] < 0.25 * pad["none"] and pad["prefix_shared"] < 0.25 * pad["none"]
    saved = counts["packed"]["tokens"] - counts["prefix_shared"]["tokens"]
    prompts = int(data.prompt.lengths[idx].sum())
    assert 0.9 * prompts <= saved <= prompts  # (S - 1) * (P - 1) per shared example


def test_epoch_padding_efficiency_matches_the_materialized_batches():
    data = long_tailed_set()
    buckets = batching.default_buckets(512)
    streams = ("chosen", "rejected")
    kw = dict(layout="prefix_shared", streams=streams, buckets=buckets, shards=2, microbatches=2)
    est = packing.epoch_padding_efficiency(data, 16, **kw)
    tok = pad = 0
    for idx in batching.epoch_batches(data.lengths, 16, 0, 0):
        c = packing.token_counts(packing.pack_batch(data, idx, **kw))
        tok, pad = tok + c["tokens"], pad + c["padded_tokens"]
    assert est["tokens"] == tok and est["padded_tokens"] == pad
    none = packing.epoch_padding_efficiency(data, 16, **{**kw, "layout": "none"})
    assert est["efficiency"] > 1.5 * none["efficiency"]


def test_train_iterator_packed_batches_resume_exactly():
    data = toy_set()
    kw = dict(batch_size=8, seed=1, buckets=BUCKETS, layout="packed", shards=2, microbatches=2)
    it = loader.train_iterator(data, **kw)
    batches = [next(it) for _ in range(8)]  # 8 batches = more than one epoch of 6
    order = batching.BatchOrder(data.lengths, 8, 1)
    for j, b in enumerate(batches):
        check_layout(
            b, data, order[j], ("chosen", "rejected"), layout="packed", shards=2, microbatches=2
        )
    it2 = loader.train_iterator(data, **kw)
    for _ in range(3):
        next(it2)
    it3 = loader.train_iterator(data, **kw)
    it3.set_state(json.loads(json.dumps(it2.get_state())))
    for b in batches[3:]:
        got = next(it3)
        for k in packing.FIELDS:
            np.testing.assert_array_equal(got[k], b[k])
    sft = next(loader.train_iterator(data, **kw, streams=("chosen",)))
    assert not sft["branch_ids"].any() and sft["seq_ids"].max() == 8 // 2 - 1


def test_eval_batches_with_a_layout_weight_padding_and_hosts():
    data = toy_set(n=21, paired=False)
    per_row = {"init_chosen_logps": np.arange(21, dtype=np.float32)}
    kw = dict(buckets=BUCKETS, per_row=per_row, layout="prefix_shared", shards=2)
    full = list(loader.eval_batches(data, 8, **kw))
    assert len(full) == 3
    last = full[-1]
    assert last["weight"].tolist() == [1] * 5 + [0] * 3
    assert last["init_chosen_logps"].tolist() == [16, 17, 18, 19, 20, 0, 0, 0]
    idx = np.where(np.arange(16, 24) < 21, np.arange(16, 24), 0)
    check_layout(last, data, idx, ("completion", "kl"), layout="prefix_shared", shards=2)
    hosts = [
        list(loader.eval_batches(data, 8, **kw, process_index=i, process_count=2)) for i in range(2)
    ]
    for j, b in enumerate(full):
        for k, v in b.items():
            np.testing.assert_array_equal(np.concatenate([h[j][k] for h in hosts]), v)
    plain = next(loader.eval_batches(data, 8, buckets=BUCKETS))  # layout=None: as before
    assert "completion_input_ids" in plain and "segment_ids" not in plain
