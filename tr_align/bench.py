"""``tr-align bench``: time and memory of the compiled train step per reference mode.

For each mode (frozen reference, soft and hard trust-region updates) the step is
built from the same config, compiled, warmed up and timed over ``steps`` calls
on one fixed batch (input pipeline excluded), blocking on the result of every
call. Also recorded: compile time and XLA's memory analysis of the step (state
bytes, bytes aliased by donation, scratch bytes). Results go to a JSON file and
a markdown table; ratios are taken against the frozen reference in the same run.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

import jax

from tr_align import loop, sharding, trust_region
from tr_align.data import loader
from tr_align.models import count_params

MODES = ("vanilla", "tr-soft", "tr-hard")


def bench_mode(config, mode: str, *, steps: int, warmup: int, devices=None) -> dict:
    config = config.copy_and_resolve_references()
    config.trust_region.update(trust_region.PRESETS[mode])
    built = loop.build(config, devices)
    it = loader.train_iterator(
        built.data.train, batch_size=config.train.batch_size, seed=config.train.seed
    )
    batch = sharding.put_batch(next(it), built.mesh)
    state = built.init()

    t0 = time.perf_counter()
    compiled = built.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()

    for _ in range(warmup):
        state, m = compiled(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = compiled(state, batch)
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t0)

    tokens = 2 * config.train.batch_size * (batch["chosen_input_ids"].shape[1] - 1)
    step_s = statistics.median(times)
    return {
        "mode": mode,
        "alpha": config.trust_region.alpha,
        "tau": config.trust_region.tau,
        "enabled": config.trust_region.enabled,
        "params": count_params(built.abstract_state.params),
        "batch_pairs": config.train.batch_size,
        "compile_s": round(compile_s, 3),
        "step_ms_median": round(1e3 * step_s, 3),
        "step_ms_min": round(1e3 * min(times), 3),
        "policy_tokens_per_s": round(tokens / step_s, 1),
        "state_bytes": sum(x.nbytes for x in jax.tree.leaves(state)),
        "alias_bytes": getattr(mem, "alias_size_in_bytes", None),
        "temp_bytes": getattr(mem, "temp_size_in_bytes", None),
    }


def run(config, out_path: str, *, steps: int = 30, warmup: int = 3, modes=MODES, devices=None):
    """Benchmarks ``modes`` and writes ``out_path`` (JSON) and ``out_path``.md (table)."""
    results = [bench_mode(config, m, steps=steps, warmup=warmup, devices=devices) for m in modes]
    base = next((r for r in results if r["mode"] == "vanilla"), results[0])
    for r in results:
        r["step_time_vs_vanilla"] = round(r["step_ms_median"] / base["step_ms_median"], 3)
    devs = devices or jax.devices()
    report = {
        "device": f"{len(devs)} x {devs[0].device_kind} ({devs[0].platform})",
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "steps_timed": steps,
        "model": dict(config.model),
        "results": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    table = markdown_table(report)
    with open(out_path + ".md", "w", encoding="utf-8") as f:
        f.write(table + "\n")
    return report, table


def markdown_table(report) -> str:
    head = (
        f"Device: {report['device']}, jax {report['jax']}, median of {report['steps_timed']} steps\n\n"
        "| mode | alpha | tau | params | step ms (median) | vs vanilla | policy tok/s | "
        "compile s | state MiB | aliased MiB | scratch MiB |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    mib = 2.0**20
    rows = [
        f"| {r['mode']} | {r['alpha'] if r['enabled'] else '-'} | {r['tau'] if r['enabled'] else '-'} "
        f"| {r['params']:,} | {r['step_ms_median']:.2f} | {r['step_time_vs_vanilla']:.3f} "
        f"| {r['policy_tokens_per_s']:,.0f} | {r['compile_s']:.1f} | {r['state_bytes'] / mib:.2f} "
        f"| {(r['alias_bytes'] or 0) / mib:.2f} | {(r['temp_bytes'] or 0) / mib:.2f} |"
        for r in report["results"]
    ]
    return "\n".join([head, *rows])


def generation(
    source: str,
    out_path: str,
    *,
    batch_sizes=(1, 8),
    prompt_len: int = 32,
    max_new_tokens: int = 64,
    repeats: int = 3,
) -> tuple[dict, str]:
    """Greedy KV-cache decoding throughput of a pretrained model.

    Prompts are ``prompt_len`` fixed token ids; EOS is disabled so every row produces
    ``max_new_tokens``. Reported: median wall time over ``repeats`` calls after one
    compiling call, and new tokens per second (batch * max_new_tokens / time).
    """
    import functools

    from tr_align import generate, hf, pretrained

    config, _, _, params = pretrained.load({"pretrained": source, "dtype": "float32"})
    params = jax.tree.map(jax.numpy.asarray, params)
    decode_fn, init_cache = hf.decode_fns(config)
    rows = []
    for batch in batch_sizes:
        prompts = [
            [(7 * i + j) % config.vocab_size for j in range(prompt_len)] for i in range(batch)
        ]
        run = functools.partial(
            generate.generate, decode_fn, init_cache, params, prompts, max_new_tokens=max_new_tokens
        )
        t0 = time.perf_counter()
        run()
        first = time.perf_counter() - t0
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        rows.append(
            {
                "batch": batch,
                "prompt_len": prompt_len,
                "new_tokens": max_new_tokens,
                "first_call_s": round(first, 2),
                "median_s": round(t, 3),
                "new_tokens_per_s": round(batch * max_new_tokens / t, 1),
            }
        )
    devs = jax.devices()
    report = {
        "source": source,
        "device": f"{len(devs)} x {devs[0].device_kind}",
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "results": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    table = "\n".join(
        [
            f"Generation, {source} on {report['device']}, jax {report['jax']}\n",
            "| batch | prompt tokens | new tokens | first call s | median s | new tokens/s |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        + [
            f"| {r['batch']} | {r['prompt_len']} | {r['new_tokens']} | {r['first_call_s']} "
            f"| {r['median_s']} | {r['new_tokens_per_s']} |"
            for r in rows
        ]
    )
    with open(out_path + ".md", "w", encoding="utf-8") as f:
        f.write(table + "\n")
    return report, table
