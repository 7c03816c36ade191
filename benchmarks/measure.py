"""What compare_trl.py measures, as pure functions (unit-tested in tests/test_compare_trl.py).

Both systems are timed the same way: a timestamp at the end of every step (TRL: a callback's
``on_step_end``; tr_align: the ``time`` of each ``metrics.jsonl`` train record, stamped when
that step's metrics reached the host), the interval of step k = end(k) - end(k-1), and
``steps_per_s`` = 1 / median interval over the timed steps (11-40 of 40 by default).
Real tokens = non-pad tokens of a step's chosen and rejected rows (prompt + completion +
EOS); ``tokens_per_s`` = median over the timed steps of real tokens / interval (the shared TRL
harness's definition), ``padded_tokens_per_s`` the same with padding.
"""

from __future__ import annotations

import json
import math
import statistics


def median(xs):
    xs = sorted(xs)
    if not xs:
        raise ValueError("median of nothing")
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def timed_steps(n_steps: int, warmup: int) -> list[int]:
    """Steps whose intervals count: warmup+1..n_steps (short runs: 2..n_steps)."""
    if warmup + 1 <= n_steps and warmup >= 1:
        return list(range(warmup + 1, n_steps + 1))
    return list(range(2, n_steps + 1))


def intervals(step_end: dict) -> dict:
    """{step: end(step) - end(step - 1)} for every step whose predecessor has an end time."""
    ends = {int(k): float(v) for k, v in step_end.items()}
    return {k: ends[k] - ends[k - 1] for k in sorted(ends) if k - 1 in ends}


def summarize(step_end: dict, steps: list[int], real=None, padded=None) -> dict:
    """Throughput over ``steps`` from step-end times and per-step token counts (dicts by step).

    ``real``/``padded`` may be None (unknown): their rates are then None."""
    iv = intervals(step_end)
    missing = [s for s in steps if s not in iv]
    if missing:
        raise ValueError(f"no interval for steps {missing} (step ends known: {sorted(step_end)})")
    ivs = [iv[s] for s in steps]
    med = median(ivs)
    out = {
        "steps_timed": f"{steps[0]}-{steps[-1]}",
        "median_step_ms": round(1000 * med, 2),
        "steps_per_s": round(1.0 / med, 4),
        "mean_steps_per_s": round(len(ivs) / sum(ivs), 4),
        # steps that took over twice the median (e.g. a compile for a new shape)
        "slow_steps": [s for s in steps if iv[s] > 2 * med],
    }
    for name, counts in (("tokens", real), ("padded_tokens", padded)):
        if counts is None:
            out[f"{name}_per_s"] = None
            out[f"{name}_per_step"] = None
            continue
        counts = {int(k): v for k, v in counts.items()}
        out[f"{name}_per_s"] = round(median([counts[s] / iv[s] for s in steps]), 1)
        out[f"{name}_per_step"] = round(statistics.fmean(counts[s] for s in steps), 1)
    return out


# ------------------------------------------------------------------------ token counts


def pair_tokens(rows, encode, eos_id: int, max_length: int | None = None) -> list[tuple]:
    """(chosen row, rejected row) real-token counts of each preference pair.

    A row is prompt + completion + EOS (EOS added unless the completion ends with it), cut to
    ``max_length`` (what both systems keep for the rows these benchmarks generate, which never
    exceed it). ``encode(text) -> ids`` without special tokens."""
    out = []
    for r in rows:
        p = len(encode(r["prompt"]))
        lens = []
        for key in ("chosen", "rejected"):
            ids = encode(r[key])
            n = p + len(ids) + (0 if ids and ids[-1] == eos_id else 1)
            lens.append(min(n, max_length) if max_length else n)
        out.append(tuple(lens))
    return out


def read_pairs(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def dataset_tokens(pairs: list[tuple], batch_size: int) -> dict:
    """Real tokens per step expected from the data alone: ``batch_size`` random pairs."""
    per_pair = [c + r for c, r in pairs]
    return {
        "mean_tokens_per_pair": round(statistics.fmean(per_pair), 2),
        "expected_tokens_per_step": round(batch_size * statistics.fmean(per_pair), 1),
        "min_tokens_per_step": batch_size * min(per_pair),
        "max_tokens_per_step": batch_size * max(per_pair),
    }


# ------------------------------------------------------------------------ tr_align's log


def tr_align_steps(records: list[dict], batch_size: int) -> dict:
    """Per-step end times, losses, learning rates and token counts from metrics.jsonl records.

    Train records are those with ``loss`` (eval records have ``eval/...`` keys only). Real
    tokens = ``data/real_tokens`` (prompt + completion of every chosen and rejected sequence,
    whatever the layout); padded = ``data/rows`` x ``data/length`` (the positions the step
    computes). Older logs without those fields: real = ``data/padding_efficiency`` x 2 x
    batch_size x ``data/length`` (rows padded to one length). Missing fields: None."""
    train = {r["step"]: r for r in records if "loss" in r}
    if train and any("time" not in r for r in train.values()):
        raise ValueError("metrics.jsonl train records have no 'time' field (tr_align too old?)")
    real, padded = {}, {}
    for s, r in train.items():
        eff, length = r.get("data/padding_efficiency"), r.get("data/length")
        if "data/real_tokens" in r and "data/rows" in r:
            real[s], padded[s] = int(r["data/real_tokens"]), int(r["data/rows"]) * int(length)
            continue
        if eff is None or length is None:
            real = padded = None
            break
        pad = 2 * batch_size * int(length)
        tokens = eff * pad
        if abs(tokens - round(tokens)) > 1e-3 * max(1.0, tokens / 1000):
            real = padded = None
            break
        real[s], padded[s] = int(round(tokens)), pad
    return {
        "step_end": {s: r["time"] for s, r in train.items()},
        "loss": {s: r["loss"] for s, r in train.items()},
        "learning_rate": {s: r.get("learning_rate") for s, r in train.items()},
        "real": real,
        "padded": padded,
    }


def ratio(a, b):
    if a is None or b is None or b == 0 or (isinstance(b, float) and math.isnan(b)):
        return None
    return round(a / b, 3)
