"""Checks of a model's packed-sequence inputs (``positions``, ``segment_ids``, ``branch_ids``),
shared by the model families' tests. References are the same model run on each sequence
alone through the plain (attention-mask) path, which the families' tests compare against
numpy / transformers; each check also asserts that dropping the new input changes the
logits, so it can fail."""

import numpy as np


def _row(pieces, pad):
    """(ids, segment_ids, positions, branch_ids) of one row from (ids, seg, pos, br) pieces."""
    cols = [np.concatenate([np.asarray(p[i]) for p in pieces] + [np.zeros(pad)]) for i in range(4)]
    return [c.astype(np.int32) for c in cols]


def check_packed_segments(apply_fn, params, vocab, *, atol, seed=0):
    """Two rows, each packing two sequences (+ padding) with per-segment positions, give
    every token the logits of its sequence run alone."""
    rng = np.random.default_rng(seed)
    layouts = ((5, 4), (7, 2))
    seqs = [[rng.integers(0, vocab, n) for n in lengths] for lengths in layouts]
    rows = [
        _row(
            [
                (s, np.full(len(s), j + 1), np.arange(len(s)), np.zeros(len(s)))
                for j, s in enumerate(r)
            ],
            2,
        )
        for r in seqs
    ]
    ids, seg, pos, _ = (np.stack(c) for c in zip(*rows))
    got = np.asarray(apply_fn(params, ids, segment_ids=seg, positions=pos))
    assert np.all(np.isfinite(got))
    for b, row in enumerate(seqs):
        start = 0
        for s in row:
            alone = np.asarray(apply_fn(params, s[None].astype(np.int32)))[0]
            np.testing.assert_allclose(got[b, start : start + len(s)], alone, atol=atol, rtol=0)
            start += len(s)
    # Without segments the second sequences change. (Positions alone could not: RoPE scores
    # depend on relative positions only, so ``check_prefix_branches`` tests them.)
    no_seg = np.asarray(apply_fn(params, ids, positions=pos))
    assert np.abs(no_seg - got)[seg == 2].max() > 1e-3


def check_prefix_branches(apply_fn, params, vocab, *, atol, seed=1, n=4, m=2, k=1):
    """Row [p_0..p_{n-2} (br 0), p_{n-1} a_0..a_m (br 1), p_{n-1} b_0..b_k (br 2), pad] with
    positions [0..n-2, n-1..n+m, n-1..n+k]: branch 1 has the logits of p + a, branch 2 those
    of p + b, the shared prefix those of p."""
    rng = np.random.default_rng(seed)
    p, a, b = (rng.integers(0, vocab, size) for size in (n, m + 1, k + 1))
    pieces = [
        (p[:-1], np.ones(n - 1), np.arange(n - 1), np.zeros(n - 1)),
        (np.r_[p[-1], a], np.ones(m + 2), np.arange(n - 1, n + m + 1), np.ones(m + 2)),
        (np.r_[p[-1], b], np.ones(k + 2), np.arange(n - 1, n + k + 1), np.full(k + 2, 2)),
    ]
    ids, seg, pos, br = (c[None] for c in _row(pieces, 1))
    got = np.asarray(apply_fn(params, ids, segment_ids=seg, positions=pos, branch_ids=br))[0]
    assert np.all(np.isfinite(got))
    with_a = np.asarray(apply_fn(params, np.r_[p, a][None].astype(np.int32)))[0]
    with_b = np.asarray(apply_fn(params, np.r_[p, b][None].astype(np.int32)))[0]
    np.testing.assert_allclose(got[: n - 1], with_a[: n - 1], atol=atol, rtol=0)
    np.testing.assert_allclose(got[n - 1 : n + m + 1], with_a[n - 1 :], atol=atol, rtol=0)
    np.testing.assert_allclose(got[n + m + 1 : n + m + k + 3], with_b[n - 1 :], atol=atol, rtol=0)
    # Without branch_ids branch 2 also sees branch 1, and without positions it sits further
    # from the prefix: either changes its logits.
    branch2 = slice(n + m + 1, n + m + k + 3)
    shared = np.asarray(apply_fn(params, ids, segment_ids=seg, positions=pos))[0]
    assert np.abs(shared - got)[branch2].max() > 1e-3
    rows = np.asarray(apply_fn(params, ids, segment_ids=seg, branch_ids=br))[0]
    assert np.abs(rows - got)[branch2].max() > 1e-3


def check_segments_equal_attention_mask(apply_fn, params, ids, mask):
    """segment_ids = attention_mask (right-padded), positions = arange give the real tokens
    the attention-mask path's logits (pad outputs finite); both at once is an error."""
    ids, mask = np.asarray(ids, np.int32), np.asarray(mask, np.int32)
    old = np.asarray(apply_fn(params, ids, mask))
    positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape)
    new = np.asarray(apply_fn(params, ids, segment_ids=mask, positions=positions))
    real = mask.astype(bool)
    np.testing.assert_allclose(new[real], old[real], atol=1e-6, rtol=1e-6)
    assert np.all(np.isfinite(new))
    try:
        apply_fn(params, ids, mask, segment_ids=mask)
    except ValueError as e:
        assert "not both" in str(e)
    else:
        raise AssertionError("attention_mask with segment_ids did not raise")
