"""tr-align side of benchmarks/compare_trl.py: TRL's DPOTrainer settings, expressed as a config.

    tr-align train --config=benchmarks/configs/compare.py:dpo   --workdir=DIR \\
        --config.model.pretrained=ASSETS/model --config.data.tokenizer=ASSETS/tokenizer \\
        --config.data.path=ASSETS/prefs.jsonl
    tr-align train --config=benchmarks/configs/compare.py:trdpo ...

Presets: ``dpo`` (frozen reference: trust_region.enabled=False) and ``trdpo`` (soft update
after every step, alpha 0.6, tau 1: TRL's sync_ref_model with ref_model_mixup_alpha=0.6,
ref_model_sync_steps=1). The paths default to the assets compare_trl.py builds for the
``trl`` workload (benchmarks/.work/trl/assets).

Everything else starts from configs/default.py, so the library's defaults (e.g. how batches
are laid out) apply as they are; only what TRL's run fixes is set here:
- sigmoid loss, beta 0.1; AdamW b1 0.9, b2 0.999, eps 1e-8, no weight decay;
  max_grad_norm 1.0; lr 1e-5, no warmup, linear to 0 over train.steps: step k uses
  1e-5 * (41 - k) / 40 of 40 steps, as transformers' "linear" schedule;
- 8 pairs per step, 40 steps, seed 0, fp32 (model.dtype), data.max_length 512 (the prompt
  limit 400 never bites: the benchmark rows are built to fit, so neither system truncates);
- no checkpoints but the one at the last step (tr-align always writes it) and no eval but
  the two tr-align always runs (step 0 and the last step), on the smallest held-out split
  the config allows (1 pair: data.eval_fraction must be > 0), so 511 of TRL's 512 pairs
  train. Both fall outside the timed steps.
"""

import os
import runpy

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
ASSETS = os.path.join(REPO, "benchmarks", ".work", "trl", "assets")

PRESETS = {
    "dpo": dict(enabled=False),
    "trdpo": dict(enabled=True, alpha=0.6, tau=1),
}


def get_config(preset: str | None = None):
    preset = preset or "trdpo"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    c = runpy.run_path(os.path.join(REPO, "configs", "default.py"))["get_config"]()

    c.model.pretrained = os.path.join(ASSETS, "model")
    c.model.dtype = "float32"
    c.data.update(
        dict(
            source="files",
            path=os.path.join(ASSETS, "prefs.jsonl"),
            format="generic",
            tokenizer=os.path.join(ASSETS, "tokenizer"),
            max_length=512,
            max_prompt_length=400,
            eval_split="",
            eval_fraction=0.001,  # -> 1 held-out pair (the least allowed)
        )
    )
    c.train.update(
        dict(
            steps=40,
            epochs=0.0,
            batch_size=8,
            eval_batch_size=8,
            seed=0,
            log_every_steps=1,
            eval_every_steps=10**9,  # only the evals tr-align always runs (step 0, last step)
            grad_accum_steps=1,
        )
    )
    c.optimizer.update(
        dict(
            learning_rate=1e-5,
            warmup_steps=0,
            schedule="linear",
            end_lr_factor=0.0,
            weight_decay=0.0,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            max_grad_norm=1.0,
        )
    )
    c.loss.update(dict(type="sigmoid", beta=0.1, label_smoothing=0.0))
    c.trust_region.update(PRESETS[preset])
    c.checkpoint.update(dict(every_steps=10**9, max_to_keep=1))
    return c
