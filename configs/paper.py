"""The paper's recipes (Gorbatovski et al. 2024, arXiv:2404.09656), shared by the per-model files.

``recipe(model, dataset, preset)`` builds one stage of one recipe on top of
``configs/default.py``. Presets:

  sft      supervised fine-tuning on the chosen completions (the starting point of the rest)
  dpo      DPO, frozen reference (the paper's baseline); IPO / KTO: add
           ``--config.loss.type=ipo`` or ``kto_pair`` (paired) / ``kto`` (unpaired)
  tr-soft  TR-DPO with the soft update: alpha 0.6, tau 1
  tr-hard  TR-DPO with the hard update: alpha 1, tau 512

Where each value comes from:
  * beta 0.05, learning rate 1e-6, one epoch, max_length 1024, max_grad_norm 2, 100 warmup
    steps: TRL's paper index entry for this paper ("Table 1" / "Table 2 of the paper").
  * alpha 0.6 / tau 1 (soft) and alpha 1 / tau 512 (hard): the issue text and the paper's
    reported best settings (soft alpha 0.5-0.8 with tau 1, hard tau 32-512); TRL's index pairs
    alpha 0.6 with tau 512 in one example.
  * batch 64 pairs, linear decay after warmup, AdamW without weight decay: not given by TRL's
    index; 64 is the DPO paper's batch size (Rafailov et al. 2023, App. B).
  * SFT: learning rate 2e-5 (TRL SFTConfig's default), one epoch, on the chosen completions.
  * max_prompt_length 512: half of max_length (TRL's classic default ratio), configs/default.py's
    rule, so it follows an override of data.max_length.
Nothing here was tuned by us; none of these recipes has been run at full scale by this
project yet (no accelerator was available while writing them).
"""

import os

from tr_align.config import load_config_file

CONFIGS = os.path.dirname(os.path.abspath(__file__))

# The paper's datasets: (source, path, format, split, eval split, data_dir, chat template).
DATASETS = {
    # Anthropic HH-RLHF (all subsets), ~160.8k train / 8.55k test pairs.
    "hh": dict(
        source="hub", path="Anthropic/hh-rlhf", format="hh", split="train", eval_split="test"
    ),
    # Reddit TL;DR comparisons (Stiennon et al. 2020), ~92.9k train / 83.8k validation pairs.
    # datasets >= 4 no longer runs this repository's loading script: if it fails, download the
    # comparisons JSON files and use source="files", path="comparisons/batch*.json".
    "tldr": dict(
        source="hub",
        path="openai/summarize_from_feedback:comparisons",
        format="tldr",
        split="train",
        eval_split="validation",
    ),
    # UltraFeedback binarized (HuggingFaceH4), 61.1k train_prefs / 2k test_prefs pairs.
    "ultrafeedback": dict(
        source="hub",
        path="HuggingFaceH4/ultrafeedback_binarized",
        format="ultrafeedback",
        split="train_prefs",
        eval_split="test_prefs",
    ),
}

# Hugging Face hub ids of the base models (safetensors); the SFT stage starts from these, the
# alignment stages from the exported SFT model (--config.model.pretrained=EXPORT_DIR).
MODELS = {
    "pythia-2.8b": "EleutherAI/pythia-2.8b",
    "pythia-6.9b": "EleutherAI/pythia-6.9b",
    "llama-3-8b": "princeton-nlp/Llama-3-Base-8B-SFT",  # a public SFT Llama-3-8B
}

PRESETS = ("sft", "dpo", "tr-soft", "tr-hard")


def recipe(model: str, dataset: str, preset: str | None):
    preset = preset or "tr-soft"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {PRESETS}")
    tr_preset = {"sft": "vanilla", "dpo": "vanilla"}.get(preset, preset)
    c = load_config_file(os.path.join(CONFIGS, "default.py"), tr_preset)
    if preset == "tr-hard":
        c.trust_region.tau = 512

    c.model.pretrained = MODELS[model]
    c.model.dtype = "bfloat16"  # compute dtype; master weights and Adam state stay float32

    c.data.update(DATASETS[dataset])
    c.data.update(dict(max_length=1024, group_by_length=True))  # max_prompt_length: 512
    if model.startswith("pythia"):
        c.data.chat_template = "hh"  # Pythia has no chat template: HH's raw text format

    c.train.update(
        dict(
            epochs=1.0,  # steps = one epoch of the training split
            batch_size=64,
            eval_batch_size=64,
            eval_every_steps=500,
            log_every_steps=10,
        )
    )
    c.optimizer.update(
        dict(learning_rate=1e-6, warmup_steps=100, schedule="linear", max_grad_norm=2.0)
    )
    c.loss.beta = 0.05
    if preset == "sft":
        c.loss.type = "sft"
        c.optimizer.learning_rate = 2e-5
    c.checkpoint.update(dict(every_steps=500, max_to_keep=2))
    # all devices shard parameters, reference and optimizer state (FSDP); see README
    c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
    return c


def get_config(preset: str | None = None):
    """``--config=configs/paper.py:MODEL,DATASET,PRESET``, e.g. ``pythia-2.8b,hh,tr-soft``."""
    model, dataset, stage = (preset or "pythia-2.8b,hh,tr-soft").split(",")
    return recipe(model, dataset, stage)
