"""``tr-align bench``: time and memory of the compiled train step per reference mode.

For each mode (frozen reference, soft and hard trust-region updates) the step is
built from the same config, compiled, warmed up and timed over ``steps`` calls
on one fixed batch (input pipeline excluded), blocking on the result of every
call. Also recorded: compile time and XLA's memory analysis of the step (state
bytes, bytes aliased by donation, scratch bytes). Results go to a JSON file and
a markdown table; ratios are taken against the frozen reference in the same run.

``memory`` (``tr-align bench --memory``) compiles the train step once per memory
lever (bf16 compute, bf16 reference, remat, gradient accumulation, chunked log-probs,
all together) from abstract shapes only (nothing is allocated or run) and reports
XLA's memory analysis of each against the baseline in the same run.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import time

import jax
import jax.extend
import numpy as np

from tr_align import config as config_lib
from tr_align import sharding, trust_region
from tr_align.data import loader
from tr_align.models import count_params
from tr_align.training import loop
from tr_align.training import step as train

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

    # positions the policy forward sees per step (every row; a row of T tokens feeds T - 1)
    tokens = sum(v.shape[0] * (v.shape[1] - 1) for k, v in batch.items() if k.endswith("input_ids"))
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

    from tr_align import generate, hf
    from tr_align.io import pretrained

    config, _, _, params = pretrained.load({"pretrained": source, "dtype": "float32"})
    params = jax.tree.map(jax.numpy.asarray, params)
    decode_fn, init_cache = hf.decode_fns(config)
    rows = []
    for batch in batch_sizes:
        prompts = [
            [(7 * i + j) % config.vocab_size for j in range(prompt_len)] for i in range(batch)
        ]
        greedy = generate.SamplingSettings(max_new_tokens=max_new_tokens)
        run = functools.partial(generate.generate, decode_fn, init_cache, params, prompts, greedy)
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


def memory_levers(accum_steps: int = 4, chunk_size: int = 64) -> dict[str, dict]:
    """Name -> config overrides, one lever at a time, then all of them together."""
    levers = {
        "baseline": {},
        "bf16 compute": {"model.dtype": "bfloat16"},
        "bf16 reference": {"trust_region.ref_dtype": "bfloat16"},
        "remat save_dots": {"model.remat": "save_dots"},
        "remat full": {"model.remat": "full"},
        f"grad accum {accum_steps}": {"train.grad_accum_steps": accum_steps},
        f"logps chunk {chunk_size}": {"train.logps_chunk_size": chunk_size},
    }
    levers["all (bf16, bf16 ref, remat full, accum, chunk)"] = {
        **levers["bf16 compute"],
        **levers["bf16 reference"],
        **levers["remat full"],
        **levers[f"grad accum {accum_steps}"],
        **levers[f"logps chunk {chunk_size}"],
    }
    return levers


def _with(config, overrides):
    config = config.copy_and_resolve_references()
    for key, value in overrides.items():
        *path, last = key.split(".")
        node = config
        for part in path:
            node = node[part]
        node[last] = value
    return config


def saved_residual_bytes(fn, *args) -> int:
    """Bytes of the values ``jax.vjp(fn, *args)`` keeps for the backward pass, not
    counting ``args`` themselves (the same residuals ``jax.ad_checkpoint.
    print_saved_residuals`` lists). Traced from shapes only (``args`` may be
    ShapeDtypeStructs); independent of the backend and of its scheduling.
    """
    flat, tree = jax.tree.flatten(args)

    def vjp(*leaves):
        return jax.vjp(lambda *a: fn(*jax.tree.unflatten(tree, a)), *leaves)

    closed, (_, vjp_fn) = jax.make_jaxpr(vjp, return_shape=True)(*flat)
    jaxpr = closed.jaxpr
    n_res = len(jax.tree.leaves(vjp_fn))
    inputs = set(jaxpr.invars)
    residuals = {
        v: v.aval
        for v in jaxpr.outvars[len(jaxpr.outvars) - n_res :]
        if isinstance(v, jax.extend.core.Var) and v not in inputs
    }
    return int(sum(a.size * a.dtype.itemsize for a in residuals.values()))


def memory_lever(config, overrides: dict, *, seq_len: int, devices=None) -> dict:
    """Compiles the train step of ``config`` + ``overrides`` for a [batch_size, seq_len]
    batch from abstract shapes and returns XLA's memory analysis of it (bytes).

    ``total`` = arguments + outputs - aliased + temp: the device memory the step needs
    with the state donated (outputs written over the aliased inputs).
    ``residual`` = the activations the policy's backward pass keeps for one microbatch
    (``saved_residual_bytes`` of ``train.policy_loss``): what remat, chunking, bf16
    compute and microbatching shrink, as any backend sees it. XLA:CPU expands
    ``jax.checkpoint``'s optimization barriers before scheduling, so on CPU the
    recomputation is merged back and remat barely changes ``temp``; XLA:GPU removes
    them only after scheduling.
    """
    config = _with(config, overrides)
    built = loop.build(config, devices)
    program = built.program
    batch = program.abstract_batch(config.train.batch_size, seq_len)
    t0 = time.perf_counter()
    mem = built.train_step.lower(built.abstract_state, batch).compile().memory_analysis()
    compile_s = time.perf_counter() - t0
    state = built.abstract_state
    accum = config_lib.get_optional(config, "train.grad_accum_steps")
    micro = {
        k: jax.ShapeDtypeStruct((x.shape[0] // accum, *x.shape[1:]), x.dtype)
        for k, x in batch.items()
    }
    examples = config.train.batch_size // accum
    ref_logps = None
    if program.objective.needs_reference:
        ref_logps = jax.ShapeDtypeStruct((examples, len(program.objective.streams)), np.float32)
    loss = functools.partial(
        train.policy_loss,
        objective=program.objective,
        apply_fn=built.apply_fn,
        chunk_size=config_lib.get_optional(config, "train.logps_chunk_size"),
    )
    residual = saved_residual_bytes(lambda *a: loss(*a)[0], state.params, ref_logps, micro)
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
    out = {
        "overrides": overrides,
        "compile_s": round(compile_s, 2),
        "params": count_params(state.params),
        "params_bytes": nbytes(state.params),
        "ref_bytes": nbytes(state.ref_params or {}),
        "opt_state_bytes": nbytes(state.opt_state),
        "argument_bytes": mem.argument_size_in_bytes,
        "output_bytes": mem.output_size_in_bytes,
        "alias_bytes": mem.alias_size_in_bytes,
        "temp_bytes": mem.temp_size_in_bytes,
        "residual_bytes": residual,
    }
    out["total_bytes"] = (
        out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    )
    return out


def memory(
    config,
    out_path: str,
    *,
    seq_len: int | None = None,
    accum_steps: int = 4,
    chunk_size: int = 64,
    levers: list[str] | None = None,
    devices=None,
) -> tuple[dict, str]:
    """Memory of the compiled train step per lever; writes ``out_path`` (JSON) and .md.

    ``seq_len`` defaults to the synthetic data's padded length; ``levers`` selects
    names of ``memory_levers`` (default: all, the baseline always first).
    """
    from tr_align.data import synthetic

    if seq_len is None:
        seq_len = synthetic.seq_len(
            max_prompt_len=config.data.max_prompt_len, response_len=config.data.response_len
        )
    table_levers = memory_levers(accum_steps, chunk_size)
    names = list(table_levers) if levers is None else ["baseline", *levers]
    unknown = sorted(set(names) - set(table_levers))
    if unknown:
        raise config_lib.ConfigError(f"memory levers {unknown}: expected {list(table_levers)}")
    results = {}
    for name in dict.fromkeys(names):
        results[name] = memory_lever(config, table_levers[name], seq_len=seq_len, devices=devices)
        print(f"tr-align bench --memory: {name}: compiled in {results[name]['compile_s']} s")
    base = results["baseline"]
    for r in results.values():
        for key in ("temp_bytes", "total_bytes", "residual_bytes"):
            r[key.replace("_bytes", "_saved_bytes")] = base[key] - r[key]
        r["total_vs_baseline"] = round(r["total_bytes"] / base["total_bytes"], 4)
    devs = devices or jax.devices()
    report = {
        "device": f"{len(devs)} x {devs[0].device_kind} ({devs[0].platform})",
        "host": platform.node(),
        "jax": jax.__version__,
        "params": base["params"],
        "batch_pairs": config.train.batch_size,
        "seq_len": seq_len,
        "model": config.model.to_dict(),
        "results": [{"lever": k, **v} for k, v in results.items()],
    }
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    table = memory_table(report)
    with open(out_path + ".md", "w", encoding="utf-8") as f:
        f.write(table + "\n")
    return report, table


def memory_table(report) -> str:
    mib = 2.0**20
    head = (
        f"Train-step memory, compile only, on {report['device']}, jax {report['jax']}: "
        f"{report['params']:,} parameters, {report['batch_pairs']} pairs x "
        f"{report['seq_len']} tokens. state = policy + reference + AdamW; backward "
        "activations = what the policy's backward keeps (per microbatch, any backend); "
        "temp / total = XLA memory analysis (total = arguments + outputs - donated + temp)."
        "\n\n"
        "| lever | state MiB | backward activations MiB | temp MiB | total MiB "
        "| total saved MiB | total vs baseline |\n"
        "| --- | --- | --- | --- | --- | --- | --- |"
    )
    rows = [
        f"| {r['lever']} "
        f"| {(r['params_bytes'] + r['ref_bytes'] + r['opt_state_bytes']) / mib:,.1f} "
        f"| {r['residual_bytes'] / mib:,.1f} "
        f"| {r['temp_bytes'] / mib:,.1f} | {r['total_bytes'] / mib:,.1f} "
        f"| {r['total_saved_bytes'] / mib:,.1f} | {r['total_vs_baseline']:.3f} |"
        for r in report["results"]
    ]
    return "\n".join([head, *rows])
