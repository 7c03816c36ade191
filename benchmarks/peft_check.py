"""Dev check (not CI): a tr-align LoRA run exported with ``--format=peft`` loads in ``peft``
onto the Hugging Face base with the logits tr-align computes.

Two stages, two Pythons (the project's venv has no torch; the torch venv has no jax):

    # 1. tr-align: train a short TR-DPO LoRA run from the tiny HF fixture, export the
    #    policy and the reference as PEFT adapters, save our logits on fixed ids
    PYTHONPATH=. python benchmarks/peft_check.py train --workdir=/tmp/peft_check
    # 2. torch + transformers + peft: load each adapter onto the base, compare logits
    /tmp/trl-bench/venv/bin/python benchmarks/peft_check.py check --workdir=/tmp/peft_check

Stage 2 prints the largest absolute logit difference per adapter and exits 1 above 1e-4.
"""

import argparse
import json
import os
import pathlib
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
BASE = REPO / "tests" / "fixtures" / "hf" / "llama_gqa"
IDS = np.array([[1, 5, 9, 17, 33, 63, 40, 7, 3, 12], [1, 44, 2, 50, 51, 52, 11, 4, 8, 60]])
TOL = 1e-4


def train(workdir: str, steps: int):
    sys.path.insert(0, str(REPO / "configs"))
    import default
    import jax

    from tr_align.io import export
    from tr_align.io.rundir import RunDir
    from tr_align.training import loop

    c = default.get_config()
    c.model.pretrained = str(BASE)
    c.data.num_train, c.data.num_eval = 256, 64
    c.train.steps, c.train.batch_size, c.train.eval_batch_size = steps, 16, 32
    c.train.eval_every_steps = c.checkpoint.every_steps = steps
    c.optimizer.warmup_steps, c.optimizer.learning_rate = 0, 1e-2
    c.lora = dict(rank=4, alpha=8.0)
    summary = loop.run(c, workdir, progress=False, devices=jax.devices()[:1])
    run = RunDir(workdir)
    model_config = run.model_config()
    from tr_align import hf

    _, apply_fn = hf.model_fns(model_config)
    out = {}
    for which in ("policy", "reference"):
        export.export(workdir, os.path.join(workdir, f"peft_{which}"), which=which, format="peft")
        params, _ = run.restore_params(which)  # base + adapters, merged
        out[which] = np.asarray(jax.jit(apply_fn)(params, IDS))
    np.savez(os.path.join(workdir, "ours.npz"), **out)
    print(json.dumps({"final_loss": summary["train"]["loss"], "steps": steps}))


def check(workdir: str) -> int:
    import peft
    import torch
    import transformers

    ours = np.load(os.path.join(workdir, "ours.npz"))
    worst = 0.0
    for which in ("policy", "reference"):
        base = transformers.AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
        model = peft.PeftModel.from_pretrained(base, os.path.join(workdir, f"peft_{which}"))
        model.eval()
        with torch.no_grad():
            logits = model(torch.tensor(IDS)).logits.numpy()
        diff = float(np.abs(logits - ours[which]).max())
        with torch.no_grad(), model.disable_adapter():
            base_logits = model(torch.tensor(IDS)).logits.numpy()
        moved = float(np.abs(logits - base_logits).max())
        print(
            f"{which}: peft {peft.__version__} max |logits(peft) - logits(tr-align)| = {diff:.3e}"
            f" (the adapter moves the logits by up to {moved:.3e} from the base)"
        )
        worst = max(worst, diff)
    return 0 if worst <= TOL else 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("stage", choices=("train", "check"))
    ap.add_argument("--workdir", default="/tmp/peft_check")
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    if args.stage == "train":
        train(args.workdir, args.steps)
        return 0
    return check(args.workdir)


if __name__ == "__main__":
    sys.exit(main())
