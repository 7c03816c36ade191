"""How far the factor EMA of a LoRA reference drifts from the exact EMA of its delta.

Runs TR-DPO soft with LoRA twice from the same start, ``trust_region.lora_mode=factors``
and ``merged`` (the merged run is the exact EMA of (alpha / rank) B A), and replays the
factors rule on the *merged run's* policy adapters so that both references follow the same
policy trajectory: at every step

    drift = ||delta_ref(factors) - delta_ref(exact)|| / ||delta_ref(exact)||

over all target matrices (Frobenius norms). Also reported: the same ratio between the two
independent runs (their policies differ a little because their references do), and the
policies' distance.

    PYTHONPATH=. python benchmarks/lora_drift.py --config=configs/default.py --steps=200 \
        --out=benchmarks/results/lora_drift_default.json
"""

import argparse
import json
import os
import sys

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=os.path.join(REPO, "configs", "default.py"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--alpha", type=float, default=0.6)
    ap.add_argument("--tau", type=int, default=1)
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    from tr_align import lora, sharding
    from tr_align.config import load_config_file
    from tr_align.training import loop

    def build(mode):
        c = load_config_file(args.config)
        c.train.steps = args.steps
        c.optimizer.learning_rate = args.lr
        c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, args.steps)
        c.trust_region.update(dict(enabled=True, alpha=args.alpha, tau=args.tau))
        c.lora = dict(rank=args.rank, alpha=2.0 * args.rank)
        c.trust_region.lora_mode = mode
        return c, loop.build(c, devices=jax.devices()[:1], progress=False)

    runs = {m: build(m) for m in ("merged", "factors")}
    states = {m: b.init() for m, (_, b) in runs.items()}
    its = {m: b.train_iterator(c) for m, (c, b) in runs.items()}
    lo_f = runs["factors"][1].program.lora
    replay = jax.tree.map(
        np.asarray, states["merged"].params
    )  # factor reference on merged's policy
    upd = jax.jit(
        lambda r, p: jax.tree.map(lambda a, b: args.alpha * b + (1 - args.alpha) * a, r, p)
    )
    deltas = jax.jit(lo_f.policy_deltas)

    def norm(d):
        return float(np.sqrt(sum(np.sum(np.square(np.asarray(x))) for x in d.values())))

    rows = []
    for step in range(1, args.steps + 1):
        for m, (_c, b) in runs.items():
            batch = sharding.put_batch(next(its[m]), b.mesh)
            states[m], metrics = b.train_step(states[m], batch)
            if m == "merged":
                loss = float(metrics["loss"])
        if step % args.tau == 0:
            replay = upd(replay, states["merged"].params)
        exact = lora.flat_leaves(states["merged"].ref_params)
        same = deltas(replay)
        other = deltas(states["factors"].ref_params)
        n = norm(exact)
        if step % max(1, args.steps // 20) == 0 or step == args.steps:
            row = dict(
                step=step,
                loss_merged=loss,
                ref_delta_norm=n,
                drift_same_policy=norm({k: same[k] - exact[k] for k in exact}) / n,
                drift_between_runs=norm({k: other[k] - exact[k] for k in exact}) / n,
                policy_distance=norm(
                    {
                        k: v - deltas(states["factors"].params)[k]
                        for k, v in deltas(states["merged"].params).items()
                    }
                )
                / norm(deltas(states["merged"].params)),
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = dict(
        config=args.config,
        steps=args.steps,
        rank=args.rank,
        lr=args.lr,
        alpha=args.alpha,
        rows=rows,
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
