"""What an absent config key means: the one table of defaults, and ``get`` that reads it.

A recipe (``configs/*.py``) may leave out any key of ``DEFAULTS`` (older recipes predate the
memory levers, a JSON ``config.json`` of a run may come from an older version, ``pretrained``
blocks are written by hand); code reads such a key only through ``get``, never with an
inline ``.get(key, default)``. Required keys (``config.REQUIRED_KEYS``) have no default.

This module imports nothing from the package, so every module can read the table (the
config checks in ``tr_align.config`` import the model loaders, which read it too).
"""

from __future__ import annotations

from typing import Any, NamedTuple


class Default(NamedTuple):
    value: Any
    meaning: str  # one line: what the key does, and what the default means


DEFAULTS: dict[str, Default] = {
    "model.pretrained": Default("", "starting model: HF dir, hub id, .gguf, smollm2; '' = none"),
    "model.dtype": Default("float32", "compute dtype (float32 | bfloat16); master weights f32"),
    "model.remat": Default("none", "per-block rematerialisation: none | full | save_dots"),
    "trust_region.ref_dtype": Default("float32", "storage dtype of the reference parameters"),
    "trust_region.lora_mode": Default(
        "factors",
        "LoRA reference: factors (EMA of A and B separately, adapter memory) | merged (exact "
        "EMA of the delta, a dense [in, out] buffer per target)",
    ),
    "lora.rank": Default(0, "> 0: train LoRA adapters of this rank on a frozen base; 0 = off"),
    "lora.alpha": Default(16.0, "LoRA scale numerator: W_eff = W + (alpha / rank) * A @ B"),
    "lora.dropout": Default(
        0.0, "drop rate of the adapters' input features (one mask per step); 0 = off"
    ),
    "lora.targets": Default(
        (r"layers_\d+/(self_attn|attention|mlp)/[^/]+/kernel",),
        "regexes (full match) over parameter paths; default: the attention and MLP projections",
    ),
    "lora.base_dtype": Default("float32", "storage dtype of the frozen base (bfloat16 halves it)"),
    "train.epochs": Default(0, "> 0: run this many epochs of the data instead of train.steps"),
    "train.grad_accum_steps": Default(1, "microbatches per step inside the jitted step"),
    "train.logps_chunk_size": Default(0, "> 0: log-probs this many positions at a time; 0 = off"),
    "train.max_bad_steps": Default(
        10, "stop after this many consecutive steps with a non-finite loss/gradient (skipped)"
    ),
    "optimizer.schedule_extensions": Default(
        (),
        "set by a resume that changes the run's length: [resume step, steps, epochs] of the "
        "run before; keeps the learning rate continuous (do not set by hand)",
    ),
    "loss.desirable_weight": Default(1.0, "kto: weight of the desirable examples' losses"),
    "loss.undesirable_weight": Default(1.0, "kto: weight of the undesirable examples' losses"),
    "mesh.rules": Default((), "extra (logical axis, mesh axes) sharding rules; () = built-in"),
    "data.tokenizer": Default("", "tokenizer source; '' = model.pretrained's"),
    "data.chat_template": Default("", "'' = the tokenizer's; 'hh' = HH raw text; or Jinja"),
    "data.fields": Default(None, "generic/kto: our field name -> the record's key; None = same"),
    "data.data_dir": Default("", "hub: a sub-folder of the dataset; tfds: the data folder"),
    "data.eval_split": Default("", "held-out split; '' = hold out data.eval_fraction"),
    "data.eval_fraction": Default(0, "held-out share of data.split; required without eval_split"),
    "data.buckets": Default((), "padded lengths; () = powers of two up to data.max_length"),
    "data.group_by_length": Default(False, "batches of similar lengths (less padding)"),
    "data.group_window": Default(0, "batches per length-sorted window (group_by_length)"),
    "data.packing": Default(
        "prefix_shared",
        "batch layout: prefix_shared (prompt once, each completion a branch) | packed "
        "(several sequences per row) | none (one padded row per sequence); all exact",
    ),
    "data.pack_length": Default(0, "tokens per packed row; 0 = the bucket of the longest segment"),
    "checkpoint.async_save": Default(False, "write checkpoints while the next steps run"),
    "checkpoint.timeout_s": Default(1200, "a checkpoint save/restore that takes longer aborts"),
}


def get(config, key: str):
    """``config[key]`` for a dotted key of ``DEFAULTS`` (``"data.tokenizer"``), or its default
    when the key, or a block above it, is absent. ``config``: a ConfigDict or a plain dict
    (a run's ``config.json``)."""
    if key not in DEFAULTS:
        raise KeyError(f"{key}: not in tr_align.defaults.DEFAULTS (required keys have none)")
    return _lookup(config, key.split("."), DEFAULTS[key].value)


def get_in_block(block, key: str):
    """``get`` for code that holds one block of the config (``config.model``, or a dict such
    as ``{"pretrained": "smollm2"}``): ``get_in_block(model_cfg, "model.dtype")``."""
    if key not in DEFAULTS:
        raise KeyError(f"{key}: not in tr_align.defaults.DEFAULTS (required keys have none)")
    return _lookup(block, key.split(".")[1:], DEFAULTS[key].value)


def _lookup(node, parts, default):
    for part in parts:
        if node is None or part not in node:
            return default
        node = node[part]
    return node
