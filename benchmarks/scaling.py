#!/usr/bin/env python3
"""Step time and memory of `tr-align train` as the sequence length and the model grow.

    python benchmarks/scaling.py                 # both sweeps (CPU: about 20-30 minutes)
    python benchmarks/scaling.py --sweep seq     # 256 -> 2048 tokens, the 3.7M-parameter model
    python benchmarks/scaling.py --sweep size    # 3.7M -> 103M parameters, 512 tokens
    python benchmarks/scaling.py --smoke         # seconds: the plumbing (tests/test_scaling.py)

Every point is TR-DPO (soft update, alpha 0.6, tau 1: benchmarks/configs/compare.py:trdpo)
trained for ``--steps`` steps on ``--batch`` pairs per step, once per batch layout
(``data.packing``): ``none`` (each sequence its own row, padded to its length bucket),
``packed`` (several sequences per row, no padding inside) and ``prefix_shared`` (the default:
prompt, chosen and rejected in one segment, the prompt computed once). Each run is its own
process, run one after the other; the layouts of one point run back to back, so their ratios
compare like with like even when absolute times drift.

The work: random-init HF Llamas (benchmarks/assets.py, vocab 1024, untied) and HH-like
long-tailed pairs scaled to the length L (prompt log-normal with median 0.18 L, 0.04-0.78 L;
responses log-normal with median 0.12 L, 0.02-0.58 L; every row fits L, so nothing is
truncated) -- the ``hh`` workload of compare_trl.py at L = 512. Sizes (hidden, intermediate,
layers, heads): 256/688/4/4 (3.7M), 512/1376/6/8 (20M), 768/2048/8/12 (58M),
1024/2752/8/16 (103M).

Measured per run (benchmarks/measure.py, as compare_trl.py): steps/s = 1 / median interval
between step ends over the steps after ``--warmup`` (first compiles excluded; a step that
meets a new row bucket compiles again, which the median absorbs), real tokens/s (prompt +
completion tokens of every chosen and rejected sequence), computed positions per step
(rows x row length) and peak RSS (wait4's ru_maxrss of the process). Writes
``--out``/scaling.json (every number) and scaling.md (tables).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import assets as assets_lib  # noqa: E402
import compare_trl  # noqa: E402
import measure  # noqa: E402

LAYOUTS = ("none", "packed", "prefix_shared")
SIZES = {  # name: (hidden, intermediate, layers, heads)
    "3.7M": (256, 688, 4, 4),
    "20M": (512, 1376, 6, 8),
    "58M": (768, 2048, 8, 12),
    "103M": (1024, 2752, 8, 16),
}
SEQ_LENGTHS = (256, 512, 1024, 2048)
SEQ_SIZE, SIZE_SEQ = "3.7M", 512


def workload(length: int, size: str, n_pairs: int = 256) -> assets_lib.Workload:
    """The hh workload's shape at row length ``length`` with the model ``size``."""
    h, m, n_layers, heads = SIZES[size]
    return replace(
        assets_lib.WORKLOADS["hh"],
        name=f"scale_L{length}_{size}",
        n_pairs=n_pairs,
        prompt=("lognormal", round(0.18 * length), 0.75, max(4, length // 25), int(0.78 * length)),
        response=("lognormal", round(0.12 * length), 0.8, max(2, length // 50), int(0.58 * length)),
        max_length=length,
        max_prompt_length=int(0.78 * length),
        hidden_size=h,
        intermediate_size=m,
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
    )


def smoke_workload(length: int, size: str) -> assets_lib.Workload:
    return replace(assets_lib.WORKLOADS["smoke"], name=f"smoke_L{length}_{size}", max_length=length)


def points(sweep: str, smoke: bool) -> list[tuple[str, int, str]]:
    if smoke:
        return [("seq", 64, "smoke")]
    out = []
    if sweep in ("seq", "both"):
        out += [("seq", L, SEQ_SIZE) for L in SEQ_LENGTHS]
    if sweep in ("size", "both"):
        out += [("size", SIZE_SEQ, s) for s in SIZES]
    return out


def run_point(args, work: Path, sweep: str, length: int, size: str, layout: str) -> dict:
    wl = smoke_workload(length, size) if args.smoke else workload(length, size)
    adir = work / "assets" / wl.name
    manifest = (
        assets_lib.build_workload(adir, wl)
        if not (adir / "prefs.jsonl").exists()
        else (json.loads((adir / "manifest.json").read_text()))
    )
    rdir = work / f"{sweep}_{wl.name}_{layout}"
    if args.resummarize:  # the logs of an earlier sweep, measured again
        if (rdir / "proc.json").exists():
            p = json.loads((rdir / "proc.json").read_text())
        else:  # a sweep from before proc.json: its peak RSS from the results it wrote
            p = next({k: r[k] for k in ("peak_rss_mib", "wall_s")} for r in args.old_runs
                     if (r["sweep"], r["length"], r["size"], r["layout"]) == (sweep, length, size, layout))  # fmt: skip
    else:
        rec = compare_trl.tr_align_run(
            args.tr_align_python,
            adir,
            "trdpo",
            rdir,
            steps=args.steps,
            batch=args.batch,
            max_length=wl.max_length,
            max_prompt_length=wl.max_prompt_length,
            cache_dir=work / "tokenized",
            extra=[f"--config.data.packing={layout}"],
        )
        p = {k: rec["proc"][k] for k in ("peak_rss_mib", "wall_s")}
        (rdir / "proc.json").write_text(json.dumps(p))
    records = [
        json.loads(x)
        for x in (rdir / "workdir" / "metrics.jsonl").read_text().splitlines()
        if x.strip()
    ]
    out = {"sweep": sweep, "length": length, "size": size, "params": manifest.get("n_params"),
           "layout": layout, **summarize(records, layout, args.warmup), **p}  # fmt: skip
    return out


def summarize(records: list[dict], layout: str, warmup: int) -> dict:
    """Steady-state figures from a run's metrics.jsonl train records.

    A record's ``time`` is stamped after the next step was dispatched, so the interval ending
    at step s includes the compile of step s + 1 when s + 1 is the first step of its shape
    (rows, length): such intervals are left out, as are the first ``warmup`` steps. Computed
    positions per step = rows x length (``none``: real tokens / padding efficiency, which
    every tr-align version logs correctly for padded pairs)."""
    train = sorted((r for r in records if "loss" in r), key=lambda r: r["step"])
    by = {r["step"]: r for r in train}
    shape = {s: (r["data/rows"], r["data/length"]) for s, r in by.items()}
    first = {}
    for s in sorted(shape):
        first.setdefault(shape[s], s)
    compiles = set(first.values())
    clean = [s for s in sorted(by) if s > warmup and s - 1 in by and s + 1 not in compiles]
    iv = {s: by[s]["time"] - by[s - 1]["time"] for s in clean}
    if not iv:
        raise ValueError("no step interval free of compiles: run more steps")
    computed = {
        s: (r["data/real_tokens"] / r["data/padding_efficiency"] if layout == "none"
            else r["data/rows"] * r["data/length"])
        for s, r in by.items()
    }  # fmt: skip
    step_s = measure.median(list(iv.values()))
    return {
        "step_s": round(step_s, 3),
        "steps_timed": clean,
        "tokens_per_s": round(
            measure.median([by[s]["data/real_tokens"] / iv[s] for s in clean]), 1
        ),
        "real_tokens_per_step": round(
            sum(by[s]["data/real_tokens"] for s in clean) / len(clean), 1
        ),
        "padded_tokens_per_step": round(sum(computed[s] for s in clean) / len(clean), 1),
        "shapes_compiled": len(first),
    }


def fmt(x, nd=2):
    return "-" if x is None else (f"{x:,.{nd}f}" if isinstance(x, float) else f"{x:,}")


def markdown(res: dict) -> str:
    lines = [
        "# tr-align step time and memory: sequence length and model size",
        "",
        f"{res['date']}; {res['machine'].get('cpu', '?')}, {res['machine'].get('cores', '?')} "
        f"cores; {res['settings']}",
        "",
        "TR-DPO (soft, alpha 0.6, tau 1), fp32, HH-like long-tailed pairs scaled to the row length "
        "L. `none` = padded to length buckets, `packed` = several sequences per row, "
        "`prefix_shared` (the default) = prompt once per pair. step s = median step time; "
        "real tok/s = prompt + completion tokens of both sequences per second; computed = "
        "positions the step computes (rows x row length) per step; RSS = peak resident memory "
        "of the process. Ratios against `none` at the same point.",
        "",
    ]
    for sweep, title in (("seq", "Sequence length (3.7M-parameter model)"),
                         ("size", f"Model size (L = {SIZE_SEQ})")):  # fmt: skip
        rows = [r for r in res["runs"] if r["sweep"] == sweep]
        if not rows:
            continue
        lines += [f"## {title}", "",
                  "| L | params | layout | step s | real tok/s | x none | real tok/step | "
                  "computed/step | peak RSS MiB | RSS x none |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for r in rows:
            base = next(
                (b for b in rows if b["layout"] == "none" and (b["length"], b["size"]) ==
                 (r["length"], r["size"])), None)  # fmt: skip
            rt = measure.ratio(r["tokens_per_s"], base and base["tokens_per_s"])
            rm = measure.ratio(r["peak_rss_mib"], base and base["peak_rss_mib"])
            lines.append(
                f"| {r['length']} | {fmt(r['params'])} | {r['layout']} | {fmt(r['step_s'], 3)} | "
                f"{fmt(r['tokens_per_s'], 0)} | {fmt(rt)} | {fmt(r['real_tokens_per_step'], 0)} | "
                f"{fmt(r['padded_tokens_per_step'], 0)} | {fmt(r['peak_rss_mib'], 0)} | {fmt(rm)} |"
            )
        lines.append("")
    if res.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in res["notes"]] + [""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sweep", choices=("seq", "size", "both"), default="both")
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3, help="untimed first steps")
    ap.add_argument("--batch", type=int, default=4, help="preference pairs per step")
    ap.add_argument("--work", type=Path, default=HERE / ".work" / "scaling")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--tr-align-python", default=sys.executable)
    ap.add_argument("--smoke", action="store_true", help="tiny model and rows, 5 steps")
    ap.add_argument("--resummarize", action="store_true",
                    help="no runs: measure the logs an earlier sweep left in --work again")  # fmt: skip
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup, args.batch = 6, 1, 4
    layouts = [x for x in args.layouts.split(",") if x]
    old = args.out / ("scaling_smoke.json" if args.smoke else "scaling.json")
    args.old_runs = json.loads(old.read_text())["runs"] if args.resummarize and old.exists() else []
    work = args.work.resolve()
    res = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": compare_trl.machine(args.tr_align_python, None),
        "settings": f"batch {args.batch} pairs, {args.steps} steps, timed after {args.warmup} "
        "(intervals that include a compile left out)",
        "runs": [],
        "notes": [],
    }
    name = "scaling_smoke" if args.smoke else "scaling"
    args.out.mkdir(parents=True, exist_ok=True)
    for sweep, length, size in points(args.sweep, args.smoke):
        for layout in layouts:
            print(f"[scaling] {sweep}: L={length} {size} {layout}", file=sys.stderr)
            r = run_point(args, work, sweep, length, size, layout)
            res["runs"].append(r)
            print(f"[scaling]   {r['step_s']} s/step, {r['tokens_per_s']} real tok/s, "
                  f"{r['peak_rss_mib']} MiB", file=sys.stderr)  # fmt: skip
            (args.out / f"{name}.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
            (args.out / f"{name}.md").write_text(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
