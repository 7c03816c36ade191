#!/usr/bin/env python3
"""The TRL side of compare_trl.py: one DPO or TR-DPO run of TRL's DPOTrainer; one JSON line out.

    PYTHON benchmarks/trl_runner.py --assets DIR --mode dpo|trdpo [--steps 40] [--batch 8]

Runs in any Python that has torch and trl >= 1.16 (``pip install -e '.[bench]'``, or a venv of
its own: compare_trl.py's ``--trl-python``); it imports nothing from tr_align. Settings: sigmoid
loss, beta 0.1, AdamW (0.9, 0.999, 1e-8, no weight decay), lr 1e-5 linear to 0 over the run,
no warmup, max_grad_norm 1.0, ``--batch`` pairs per step, fp32, max_length 512, seed 0,
2 torch threads, no eval, no saving, logging every step, the reference a second copy loaded
from the same files. trdpo adds ``sync_ref_model`` (alpha 0.6, every step).

stdout gets one line: {"step_end": {step: perf_counter()}, "real": {step: non-pad tokens},
"padded": {...}, "pairs": {step: [row indices]}, "loss": {...}, "learning_rate": {...}, ...}.
The step-end stamp is taken by a callback added after TRL's own (so after the reference
sync), like the shared harness's; library output goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

THREADS = 2
for _k, _v in {
    "OMP_NUM_THREADS": str(THREADS),
    "MKL_NUM_THREADS": str(THREADS),
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_DISABLED": "true",
}.items():
    os.environ.setdefault(_k, _v)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--assets", required=True, help="model/, tokenizer/, prefs.jsonl")
    ap.add_argument("--mode", choices=["dpo", "trdpo"], required=True)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8, help="preference pairs per step")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--data", default=None, help="preference JSONL (default: ASSETS/prefs.jsonl)")
    args = ap.parse_args(argv)

    out, sys.stdout = sys.stdout, sys.stderr  # keep library prints off the JSON line
    t_start = time.perf_counter()
    import datasets
    import torch
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(THREADS)
    datasets.disable_progress_bar()
    datasets.disable_caching()
    transformers.logging.set_verbosity_error()

    data_path = args.data or os.path.join(args.assets, "prefs.jsonl")
    with open(data_path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    tok = AutoTokenizer.from_pretrained(os.path.join(args.assets, "tokenizer"))
    load = lambda: AutoModelForCausalLM.from_pretrained(  # noqa: E731
        os.path.join(args.assets, "model"), dtype=torch.float32
    )
    model, ref_model = load(), load()

    rec = {"real": {}, "padded": {}, "pairs": {}, "step_end": {}, "loss": {}, "learning_rate": {}}
    key_to_row = {}

    class Trainer(DPOTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            step = self.state.global_step + 1
            am = inputs["attention_mask"]
            rec["real"][step] = int(am.sum())
            rec["padded"][step] = int(am.numel())
            half = am.shape[0] // 2  # chosen rows first: they name the pairs
            ids = inputs["input_ids"]
            rec["pairs"][step] = [
                key_to_row.get(tuple(ids[i, : int(am[i].sum())].tolist()), -1) for i in range(half)
            ]
            return super().training_step(model, inputs, num_items_in_batch)

    class StepEnd(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            rec["step_end"][0] = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            rec["step_end"][state.global_step] = time.perf_counter()

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                rec["loss"][state.global_step] = float(logs["loss"])
                rec["learning_rate"][state.global_step] = float(logs.get("learning_rate", "nan"))

    with tempfile.TemporaryDirectory(prefix="trl_runner_") as tmp:
        cfg = DPOConfig(
            output_dir=tmp,
            loss_type=["sigmoid"],
            beta=0.1,
            learning_rate=1e-5,
            lr_scheduler_type="linear",
            warmup_steps=0,
            weight_decay=0.0,
            adam_beta1=0.9,
            adam_beta2=0.999,
            adam_epsilon=1e-8,
            max_grad_norm=1.0,
            optim="adamw_torch",
            per_device_train_batch_size=args.batch,
            gradient_accumulation_steps=1,
            max_steps=args.steps,
            bf16=False,
            fp16=False,
            max_length=args.max_length,
            eval_strategy="no",
            save_strategy="no",
            logging_strategy="steps",
            logging_steps=1,
            report_to="none",
            seed=0,
            data_seed=0,
            use_cpu=True,
            dataloader_num_workers=0,
            dataloader_pin_memory=False,
            disable_tqdm=True,
            sync_ref_model=args.mode == "trdpo",
            ref_model_mixup_alpha=0.6,
            ref_model_sync_steps=1,
        )
        trainer = Trainer(
            model=model,
            ref_model=ref_model,
            args=cfg,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tok,
        )
        tds = trainer.train_dataset
        if len(tds) != len(rows):
            raise SystemExit(f"TRL dropped {len(rows) - len(tds)} of {len(rows)} rows")
        for i, (p, c) in enumerate(zip(tds["prompt_ids"], tds["chosen_ids"])):
            key_to_row[tuple(p + c)] = i
        trainer.add_callback(StepEnd())  # last: after SyncRefModelCallback
        names = [type(c).__name__ for c in trainer.callback_handler.callbacks]
        assert names[-1] == "StepEnd" and (
            ("SyncRefModelCallback" in names) == (args.mode == "trdpo")
        )
        t0 = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t0

    import resource

    rec.update(
        system="trl",
        mode=args.mode,
        steps=args.steps,
        threads=torch.get_num_threads(),
        attn_implementation=model.config._attn_implementation,
        train_wall_s=round(train_s, 2),
        startup_s=round(t0 - t_start, 2),
        self_peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        versions={
            "torch": torch.__version__,
            "trl": trl.__version__,
            "transformers": transformers.__version__,
        },
    )
    out.write(json.dumps(rec) + "\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
