#!/usr/bin/env python3
"""Where the time of one `tr-align train` step goes, on the compare_trl work.

    python benchmarks/step_profile.py --workload trl [--mode trdpo] [--batches 24]
    python benchmarks/step_profile.py --smoke

Builds the run exactly as ``tr-align train --config=benchmarks/configs/compare.py:MODE``
does (``loop.build``) on the assets compare_trl.py made for the workload, then times, in one
process and one after the other:

- ``host``: the input pipeline alone (``next`` of the train iterator: sampling, padding or
  packing), per batch;
- ``step``: the compiled train step alone, each call blocked on, over the first ``--batches``
  batches (every shape compiled beforehand, so no compile is timed);
- ``loop``: host batch + step + metrics fetch, as the training loop does them (dispatch, then
  fetch the previous step's metrics);
- the step's op classes from XLA's own per-op profile (``jax.profiler`` trace of a few steps,
  summed by HLO op category) and its FLOPs (``cost_analysis``) against a plain float32
  matmul's rate measured in the same process.

Prints one JSON object and writes ``--out`` (default benchmarks/results/step_profile_<workload>.json/.md).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _median_ms(xs):
    return round(1e3 * statistics.median(xs), 2)


def matmul_rate(m=2048, k=256, n=688, reps=20) -> float:
    """GFLOP/s of a plain float32 [m, k] @ [k, n] matmul (+ its two backward matmuls' shapes)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (m, k), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (k, n), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        ts.append(time.perf_counter() - t0)
    return 2 * m * k * n / statistics.median(ts) / 1e9


def trace_categories(fn, n: int) -> dict:
    """Sums XLA:CPU op durations of ``n`` calls of ``fn`` by op kind (from a profiler trace)."""
    import jax

    d = tempfile.mkdtemp(prefix="tr_profile_")
    with jax.profiler.trace(d):
        for _ in range(n):
            fn()
    files = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)
    if not files:
        return {}
    with gzip.open(files[0]) as f:
        events = json.load(f).get("traceEvents", [])
    by = collections.Counter()
    for e in events:  # the XLA thunks of the step (python and runtime events carry no hlo_op)
        a = e.get("args") or {}
        if e.get("ph") != "X" or "hlo_op" not in a or "train_step" not in a.get("hlo_module", ""):
            continue
        by[_category(a["hlo_op"].split(".")[0])] += e["dur"]
    total = sum(by.values())
    return {k: round(v / total, 3) for k, v in by.most_common()} if total else {}


def _category(kind: str) -> str:
    """An HLO op name's class: XLA:CPU names a thunk after its op (dot.3) or its fusion's root
    ops (multiply_add_fusion.2); ynn_fusion is a matmul with fused operands run by YNNPACK."""
    k = kind.lower()
    if k.startswith("dot") or k.startswith("ynn") or "convolution" in k:
        return "matmul (dot, ynn_fusion)"
    if any(w in k for w in ("scatter", "gather", "dynamic")):
        return "gather/scatter/dynamic-slice"
    if any(w in k for w in ("exponential", "log", "reduce", "maximum", "divide")):
        return "softmax/log-softmax/reductions"
    if any(w in k for w in ("copy", "transpose", "concatenate", "pad", "slice", "bitcast")):
        return "copy/transpose/pad"
    return "other elementwise fusions"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--workload", default="trl")
    ap.add_argument("--mode", default="trdpo")
    ap.add_argument("--batches", type=int, default=24)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE config override")
    args = ap.parse_args(argv)
    if args.smoke:
        args.workload, args.batches = "smoke", 4
        if args.out == HERE / "results":  # a plumbing check writes no result
            args.out = HERE / ".work" / "smoke"

    import assets as assets_lib
    import jax

    from tr_align import sharding
    from tr_align.training import loop

    work = HERE / ".work" / args.workload
    adir = work / "assets"
    assets_lib.ensure(adir, args.workload)
    wl = assets_lib.WORKLOADS[args.workload]
    sys.argv = [sys.argv[0]]
    import runpy

    config = runpy.run_path(str(HERE / "configs" / "compare.py"))["get_config"](args.mode)
    config.model.pretrained = str(adir / "model")
    config.data.tokenizer = str(adir / "tokenizer")
    config.data.path = str(adir / "prefs.jsonl")
    config.data.cache_dir = str(work / "tokenized")
    config.data.max_length = wl.max_length
    config.data.max_prompt_length = wl.max_prompt_length
    for kv in args.set:
        key, value = kv.split("=", 1)
        node = config
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = (
            type(node[last])(value) if not isinstance(node[last], bool) else value == "True"
        )

    built = loop.build(config, None, progress=False)

    def iterator():  # the batches loop.run trains on
        return built.train_iterator(config)

    # host: the input pipeline alone
    it = iterator()
    host_t, batches = [], []
    for _ in range(args.batches):
        t0 = time.perf_counter()
        b = next(it)
        host_t.append(time.perf_counter() - t0)
        batches.append(b)
    shapes = sorted(
        {tuple(v.shape) for b in batches for k, v in b.items() if k.endswith("input_ids")}
    )

    state = built.init()
    step = built.train_step
    dev = [sharding.put_batch(b, built.mesh) for b in batches]
    # compile every shape first (one call each), so nothing below compiles
    seen = set()
    for b in dev:
        key = tuple(sorted((k, v.shape) for k, v in b.items()))
        if key not in seen:
            seen.add(key)
            state, m = step(state, b)
            jax.block_until_ready((state, m))
    step_t = []
    for b in dev:
        t0 = time.perf_counter()
        state, m = step(state, b)
        jax.block_until_ready((state, m))
        step_t.append(time.perf_counter() - t0)

    # loop: host batch + dispatch + previous metrics fetch, like loop.run
    it = iterator()
    loop_t, pending = [], None
    t_prev = time.perf_counter()
    for _ in range(args.batches):
        hb = next(it)
        state, m = step(state, sharding.put_batch(hb, built.mesh))
        if pending is not None:
            jax.device_get(pending)
            t = time.perf_counter()
            loop_t.append(t - t_prev)
            t_prev = t
        pending = m
    jax.device_get(pending)

    # FLOPs of the compiled step for the first batch's shape, and the matmul rate
    flops = temp_mib = None
    try:
        compiled = step.lower(state, dev[0]).compile()
        mem = compiled.memory_analysis()
        temp_mib = round(mem.temp_size_in_bytes / 2**20, 1) if mem is not None else None
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        flops = float(ca.get("flops", 0.0)) or None
    except Exception as e:  # noqa: BLE001 - a benchmark reports what it cannot measure
        print(f"[profile] cost_analysis failed: {e}", file=sys.stderr)
    rate = matmul_rate()
    first_shape_t = [t for b, t in zip(dev, step_t) if b["input_ids"].shape == dev[0]["input_ids"].shape] \
        if "input_ids" in dev[0] else step_t  # fmt: skip

    holder = {"state": state}

    def one():
        s, mm = step(holder["state"], dev[0])
        jax.block_until_ready((s, mm))
        holder["state"] = s

    cats = trace_categories(one, 3)
    res = {
        "workload": args.workload,
        "mode": args.mode,
        "layout": config.data.packing if "packing" in config.data else "default",
        "overrides": args.set,
        "batches": args.batches,
        "row_shapes": [list(s) for s in shapes],
        "host_batch_ms_median": _median_ms(host_t),
        "step_ms_median": _median_ms(step_t),
        "loop_step_ms_median": _median_ms(loop_t),
        "host_share_of_loop": round(statistics.median(host_t) / statistics.median(loop_t), 3),
        "step_flops_first_shape": flops,
        "step_gflops_per_s": round(flops / statistics.median(first_shape_t) / 1e9, 1)
        if flops
        else None,
        "matmul_gflops_per_s": round(rate, 1),
        "step_temp_mib_first_shape": temp_mib,
        "op_time_share": cats,
    }
    if res["step_gflops_per_s"]:
        res["step_rate_vs_matmul"] = round(res["step_gflops_per_s"] / rate, 3)
    print(json.dumps(res, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"step_profile_{args.workload}" + (
        "_" + "_".join(s.replace("=", "-") for s in args.set) if args.set else ""
    )
    (args.out / f"{name}.json").write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
