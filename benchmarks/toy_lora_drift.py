"""The toy overoptimization experiment with LoRA: how far the factor EMA of the reference
drifts from the exact EMA of its delta, and how much that changes the outcome.

For one toy policy (``--model``) and each TR setting (soft alpha 0.6 tau 1, hard tau 50,
soft alpha 0.5 tau 10; TR-DPO), 5 seeds, 500 steps, from the same pi_sft per seed:

* full fine-tuning at the toy's lr (1e-4): how far (KL to pi_sft) the full runs move;
* LoRA (``tr_align.experiments.toy``, ``lora_rank`` > 0) driven by the ``factors``
  reference and, separately, by the ``merged`` (exact) one, same adapter init per seed.
  Each run also carries the other mode's reference on its own policy trajectory, so

      drift = ||D_ref(factors) - D_ref(exact)||_F / ||D_ref(exact)||_F

  over all target matrices is the definition of ``benchmarks/lora_drift.py`` ("same
  policy"); it is reported for both drivers (mean and max over seeds at steps 10, 50, 100,
  250, 500, and each seed's peak);
* the outcome of the two drivers (P_OOD, KL, p(chosen) at equal steps and at matched KL,
  mean ± std over seeds) and their per-seed differences (factors - merged), with the
  distance of the two runs' final policies ||D_pol(factors run) - D_pol(merged run)|| /
  ||D_pol(merged run)||.

    PYTHONPATH=. python benchmarks/toy_lora_drift.py --model=mlp --lr=1.25e-4 \
        --out=benchmarks/results/toy_lora_drift_mlp.json
    PYTHONPATH=. python benchmarks/toy_lora_drift.py --model=llama --lr=3e-4 \
        --out=benchmarks/results/toy_lora_drift_llama.json

It prints the markdown tables of benchmarks/results/lora_drift.md ("Toy experiment").
"""

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = (  # name, method, ToySettings overrides
    ("soft a0.6 t1", "TR-DPO-soft", dict(soft_alpha=0.6, soft_tau=1)),
    ("hard t50", "TR-DPO-hard", dict(hard_tau=50)),
    ("soft a0.5 t10", "TR-DPO-soft", dict(soft_alpha=0.5, soft_tau=10)),
)
STEPS = (100, 250, 500)
KLS = (1.0, 2.0, 5.0)


def _ms(a) -> dict:
    a = np.asarray(a, np.float64)
    a = a[~np.isnan(a)]
    if not len(a):
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(a.mean()), "std": float(a.std()), "n": int(len(a))}


def _fmt(d, digits=3) -> str:
    if d["mean"] is None:
        return "not reached"
    return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}"


def outcome(toy, curves, seeds) -> dict:
    """Per-seed values at STEPS and at matched KLS, and their mean/std."""
    per_seed = {}
    for c in STEPS:
        for k in ("p_ood", "kl_to_sft", "p_chosen"):
            per_seed[f"{k}@{c}"] = [float(curves[k][i, c]) for i in range(seeds)]
    for t in KLS:
        for k in ("p_ood", "p_chosen"):
            per_seed[f"{k}@KL{t:g}"] = [
                toy.value_at_kl(curves["kl_to_sft"][i], curves[k][i], t) for i in range(seeds)
            ]
    return {"per_seed": per_seed, "summary": {k: _ms(v) for k, v in per_seed.items()}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mlp", choices=["mlp", "llama"])
    ap.add_argument("--lr", type=float, required=True, help="LoRA runs' Adam lr")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--lora_alpha", type=float, default=8.0)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    from tr_align import lora
    from tr_align.experiments import toy

    base = toy.ToySettings(model=args.model, seeds=args.seeds, steps=args.steps)
    sft = toy.make_sft(base)(jax.random.split(jax.random.key(0), base.seeds))
    out = dict(
        model=args.model,
        full_lr=base.lr,
        lora_lr=args.lr,
        rank=args.rank,
        lora_alpha=args.lora_alpha,
        seeds=args.seeds,
        steps=args.steps,
        targets=list(toy.LORA_TARGETS[args.model]),
        settings={},
    )
    for name, method, over in SETTINGS:
        t0 = time.perf_counter()
        s_full = dataclasses.replace(base, **over)
        full = jax.device_get(toy.make_train(s_full, method)(sft)[0])
        full = {k: np.asarray(v, np.float64) for k, v in full.items()}
        entry = {"method": method, **over, "full": outcome(toy, full, args.seeds), "lora": {}}
        pol = {}
        for mode in lora.MODES:
            s = dataclasses.replace(
                s_full, lr=args.lr, lora_rank=args.rank, lora_alpha=args.lora_alpha,
                lora_mode=mode,
            )  # fmt: skip
            curves, adapters, _ = toy.make_train(s, method)(sft, toy.lora_keys(s))
            curves = {k: np.asarray(v, np.float64) for k, v in jax.device_get(curves).items()}
            pol[mode] = jax.device_get(jax.vmap(toy.toy_lora(s).policy_deltas)(adapters))
            entry["lora"][mode] = {
                **outcome(toy, curves, args.seeds),
                "drift": toy.summarize_drift({k: curves[k] for k in toy.LORA_TRACKED}, s),
            }
        f, m = pol["factors"], pol["merged"]
        dist = []
        for i in range(args.seeds):
            num = sum(np.sum((f[p][i] - m[p][i]) ** 2) for p in m)
            dist.append(float(np.sqrt(num / sum(np.sum(m[p][i] ** 2) for p in m))))
        entry["policy_distance_at_end"] = dist
        out["settings"][name] = entry
        print(f"{args.model} {name}: {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(compact(out), fh)
    print(tables(out))
    return 0


def compact(out) -> dict:
    """``out`` for the JSON file: the per-step curves of the drift only (mean and max over
    seeds), not of the reference's norm (its values at the table's steps stay)."""
    out = json.loads(json.dumps(out))
    for e in out["settings"].values():
        for r in e["lora"].values():
            r["drift"]["per_step"].pop("ref_delta_norm", None)
    return out


def tables(out) -> str:
    lines = [
        f"### {out['model']} policy: LoRA rank {out['rank']}, alpha {out['lora_alpha']:g}, "
        f"lr {out['lora_lr']:g} (full fine-tuning: lr {out['full_lr']:g}), {out['seeds']} seeds",
        "",
        "Drift (same policy; mean over seeds, max in brackets):",
        "",
        "| setting | driver | norm of D_ref (exact) @ 500 | "
        + " | ".join(f"drift @ {c}" for c in (10, 50, 100, 250, 500))
        + " | peak drift (step) |",
        "| --- | --- |" + " ---: |" * 7,
    ]
    for name, e in out["settings"].items():
        for mode in ("merged", "factors"):
            d = e["lora"][mode]["drift"]
            a = d["at_step"]
            last = str(out["steps"])
            cells = [f"{a[last]['ref_delta_norm']['mean']:.3g}"]
            for c in (10, 50, 100, 250, 500):
                x = a.get(str(c), {}).get("drift")
                cells.append("" if x is None else f"{x['mean']:.2e} ({x['max']:.2e})")
            i = int(np.argmax(d["peak"]["drift"]))
            cells.append(f"{d['peak']['drift'][i]:.2e} ({d['peak']['step'][i]})")
            lines.append(f"| {name} | {mode} | " + " | ".join(cells) + " |")
    keys = [f"p_ood@{c}" for c in STEPS] + ["p_chosen@500", "kl_to_sft@500"]
    keys += ["p_ood@KL1", "p_chosen@KL1", "p_ood@KL2", "p_chosen@KL2"]
    heads = [f"P_OOD @ {c}" for c in STEPS] + ["p(chosen) @ 500", "KL @ 500"]
    heads += ["P_OOD @ KL 1", "p(chosen) @ KL 1", "P_OOD @ KL 2", "p(chosen) @ KL 2"]
    lines += [
        "",
        "Outcome (mean ± std over seeds; KL columns: at the first step a seed's KL(pi‖pi_sft) "
        "reaches it, (n) seeds when not all did):",
        "",
        "| setting | run | " + " | ".join(heads) + " |",
        "| --- | --- |" + " --- |" * len(heads),
    ]
    for name, e in out["settings"].items():
        for run, o in (
            (f"full, lr {out['full_lr']:g}", e["full"]),
            ("LoRA, factors", e["lora"]["factors"]),
            ("LoRA, merged", e["lora"]["merged"]),
        ):
            cells = []
            for k in keys:
                d = o["summary"][k]
                note = "" if d["n"] in (0, out["seeds"]) else f" ({d['n']})"
                cells.append(_fmt(d, 2 if k.startswith("kl") else 3) + note)
            lines.append(f"| {name} | {run} | " + " | ".join(cells) + " |")
    dkeys = ["p_ood@250", "p_ood@500", "kl_to_sft@500", "p_chosen@500", "p_ood@KL2"]
    lines += [
        "",
        "Factors-driven minus merged-driven, paired by seed (mean ± std; max |difference|):",
        "",
        "| setting | "
        + " | ".join(["ΔP_OOD @ 250", "ΔP_OOD @ 500", "ΔKL @ 500", "Δp(chosen) @ 500"])
        + " | ΔP_OOD @ KL 2 | policy distance @ 500 (mean; max) |",
        "| --- |" + " --- |" * (len(dkeys) + 1),
    ]
    for name, e in out["settings"].items():
        f, m = e["lora"]["factors"]["per_seed"], e["lora"]["merged"]["per_seed"]
        cells = []
        for k in dkeys:
            diff = np.asarray(f[k], np.float64) - np.asarray(m[k], np.float64)
            d = _ms(diff)
            big = np.nanmax(np.abs(diff)) if d["n"] else float("nan")
            cells.append(f"{d['mean']:+.2e} ± {d['std']:.2e}; {big:.2e}" if d["n"] else "n/a")
        pd = e["policy_distance_at_end"]
        cells.append(f"{np.mean(pd):.2e}; {np.max(pd):.2e}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
