"""``tr-align export``: a run's trained policy (or reference) as a Hugging Face checkpoint.

``format="merged"`` (default) writes the full model (a LoRA run: the base merged with the
adapters); ``format="peft"`` writes a LoRA run's adapters as a PEFT adapter directory
(``adapter_config.json`` + ``adapter_model.safetensors``, PEFT's tensor names
``base_model.model.<module>.lora_A.weight`` [rank, in] and ``.lora_B.weight`` [out, rank])
that ``peft.PeftModel.from_pretrained(base, OUT)`` loads onto the Hugging Face base.

Reads ``WORKDIR/model_config.json`` (written at the start of every run) and the
newest checkpoint (or ``step``; read on the host, so a checkpoint from any mesh or number
of hosts exports on one machine), and writes config.json + safetensors that
``transformers.AutoModelForCausalLM.from_pretrained(OUT)`` loads. The run's tokenizer is
written beside them, from wherever the run took it (``data.tokenizer``, else
``model.pretrained``: a Hugging Face directory or hub id, a GGUF file's embedded tokenizer,
``smollm2``), with the run's ``data.chat_template`` when it set one, and the starting model's
``generation_config.json``; so ``tr-align generate --model=OUT`` works on the result. Every
file written is readable by all (``0644`` under the usual umask ``022``).
"""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
from safetensors.numpy import save_file

from tr_align import defaults, hf
from tr_align import lora as lora_lib
from tr_align.data import pipeline
from tr_align.errors import ConfigError
from tr_align.io import pretrained
from tr_align.io.rundir import STATE_FIELDS, RunDir

FORMATS = ("merged", "peft")
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def export(
    workdir: str,
    out_dir: str,
    *,
    which: str = "policy",
    step: int | None = None,
    format: str = "merged",
) -> int:
    """Writes the ``which`` ("policy" | "reference") parameters of ``workdir`` to ``out_dir``
    as ``format`` ("merged": a full HF model; "peft": a LoRA run's adapters).

    Returns the exported checkpoint step.
    """
    if which not in STATE_FIELDS:
        raise ConfigError(f"which={which!r}: expected 'policy' or 'reference'")
    if format not in FORMATS:
        raise ConfigError(f"format={format!r}: expected one of {', '.join(FORMATS)}")
    run = RunDir(workdir)
    model_config = run.model_config()
    if format == "peft":
        lo = run.lora()
        if lo is None:
            raise ConfigError(f"format='peft': {workdir} is not a LoRA run (lora.rank = 0)")
        if which == "reference" and lo.mode == "merged":
            raise ConfigError(
                "format='peft' --which=reference: trust_region.lora_mode='merged' keeps the "
                "reference's delta as a dense matrix, not low-rank adapters; use format=merged"
            )
        adapters, step = run.restore_state_field(which, step)
        if adapters is None:
            raise ConfigError(
                f"format='peft' --which={which}: the run has no reference adapters (a frozen "
                "reference is the base model itself)"
            )
        save_peft(adapters, lo, model_config, out_dir, base=run.starting_model())
        make_readable(out_dir)
        return step
    params, step = run.restore_params(which, step)
    hf.save_pretrained(params, model_config, out_dir)
    write_tokenizer(run.config(), out_dir)
    make_readable(out_dir)
    return step


def peft_tensors(adapters, lo, model_config) -> dict[str, np.ndarray]:
    """PEFT's {name: float32 array} of an adapter tree: A [in, r] -> ``lora_A.weight``
    [r, in], B [r, out] -> ``lora_B.weight`` [out, r] (torch Linear layout)."""
    modules = hf.kernel_modules(model_config)
    out = {}
    for path, ab in lora_lib.flat_adapters(adapters).items():
        name = PEFT_PREFIX + modules[path]
        out[f"{name}.lora_A.weight"] = np.ascontiguousarray(np.asarray(ab[lora_lib.A]).T)
        out[f"{name}.lora_B.weight"] = np.ascontiguousarray(np.asarray(ab[lora_lib.B]).T)
    return {k: v.astype(np.float32) for k, v in out.items()}


def peft_config(adapters, lo, model_config, base: str = "") -> dict:
    """PEFT's ``adapter_config.json`` (LoraConfig fields) for an adapter tree. The adapted
    modules: their short names when every layer has the same set, else one regex that
    matches exactly their full names (PEFT full-matches a string ``target_modules``)."""
    modules = hf.kernel_modules(model_config)
    chosen = [modules[p] for p in lora_lib.flat_adapters(adapters)]
    short = sorted({m.split(".")[-1] for m in chosen})
    every = sorted(m for m in modules.values() if m.split(".")[-1] in short)
    if sorted(chosen) == every:
        targets = short
    else:
        targets = "^(" + "|".join(re.escape(m) for m in sorted(chosen)) + ")$"
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base or None,
        "r": lo.rank,
        "lora_alpha": lo.alpha,
        "lora_dropout": lo.dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def save_peft(adapters, lo, model_config, out_dir: str, *, base: str = "") -> None:
    """Writes ``adapter_config.json`` + ``adapter_model.safetensors`` into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    save_file(
        peft_tensors(adapters, lo, model_config),
        os.path.join(out_dir, PEFT_WEIGHTS),
        metadata={"format": "pt"},
    )
    with open(os.path.join(out_dir, PEFT_CONFIG), "w", encoding="utf-8") as f:
        json.dump(peft_config(adapters, lo, model_config, base), f, indent=2)


def write_tokenizer(config, out_dir: str) -> None:
    """The tokenizer of a run's ``config`` (a ConfigDict or its ``config.json`` dict) and the
    starting model's generation config, written into ``out_dir``; nothing for a run without
    a tokenizer (the synthetic task from scratch).

    The tokenizer comes from ``data.tokenizer``, else ``model.pretrained``. A Hugging Face
    directory's tokenizer files are copied as they are; a GGUF file's tokenizer, a hub id's
    and any tokenizer whose chat template ``data.chat_template`` replaced are loaded and saved
    (``save_pretrained``)."""
    source = defaults.get(config, "data.tokenizer") or defaults.get(config, "model.pretrained")
    if source:
        local = not pretrained.is_gguf(source) and os.path.isdir(source)
        if local and not defaults.get(config, "data.chat_template"):
            for name in hf.TOKENIZER_FILES:
                if os.path.isfile(os.path.join(source, name)):
                    shutil.copy(os.path.join(source, name), os.path.join(out_dir, name))
        else:
            pipeline.load_tokenizer(config).save_pretrained(out_dir)
    model = defaults.get(config, "model.pretrained")
    if model and not pretrained.is_gguf(model):
        model = model if os.path.isdir(model) else pretrained.resolve(model)
        file = os.path.join(model, hf.GENERATION_CONFIG_FILE)
        if os.path.isfile(file):
            shutil.copy(file, os.path.join(out_dir, hf.GENERATION_CONFIG_FILE))


def make_readable(out_dir: str) -> None:
    """Gives every file in ``out_dir`` the permissions of a newly created file (``0666``
    less the umask): safetensors writes its files ``0600``, copies keep their source's."""
    mask = os.umask(0)
    os.umask(mask)
    for name in os.listdir(out_dir):
        path = os.path.join(out_dir, name)
        if os.path.isfile(path) and not os.path.islink(path):
            os.chmod(path, 0o666 & ~mask)
