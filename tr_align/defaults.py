"""What an absent config key means: the one table of defaults, and ``get`` that reads it.

A recipe (``configs/*.py``) may leave out any key of ``DEFAULTS`` (older recipes predate the
memory levers, a JSON ``config.json`` of a run may come from an older version, ``pretrained``
blocks are written by hand); code reads such a key only through ``get``, never with an
inline ``.get(key, default)``. Required keys (``config.REQUIRED_KEYS``) have no default.

``RECIPE_KEYS`` gives the keys a recipe sets itself (the required keys, the model's sizes
from scratch, the synthetic task and the real-data keys) their meaning line, so that
``meaning`` answers for every key of ``configs/default.py`` and ``tr-align COMMAND --help``
lists a config's keys from this module alone (``describe_keys``). ``RECIPE`` holds the values
the built-in recipes share (``tr_align.config.recipe_base`` builds their configs from it and
``DEFAULTS``).

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
    "train.epochs": Default(0.0, "> 0: run this many epochs of the data instead of train.steps"),
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
    "loss.weights": Default(
        (), "TRL loss_weights: one weight per loss.type entry (a list); () = 1.0 for each"
    ),
    "loss.rpo_alpha": Default(
        0.0, "RPO: + rpo_alpha * NLL of the chosen (TRL's sft term); 0 = off"
    ),
    "loss.ld_alpha": Default(
        1.0, "LD-DPO: weight of the completion tokens past the pair's shared length; 1 = off"
    ),
    "loss.use_weighting": Default(False, "WPO: weight each pair by the policy's w_c * w_r"),
    "loss.reference_free": Default(False, "reference log-probs 0 (no reference model held)"),
    "loss.bco_running_mean": Default(
        False, "bco_pair: shift by the running mean reward (old TRL); False = TRL 1.16 (no shift)"
    ),
    "loss.precompute_ref_log_probs": Default(
        False, "TRL's option; only False (the reference forward runs in the step)"
    ),
    "mesh.rules": Default((), "extra (logical axis, mesh axes) sharding rules; () = built-in"),
    "data.tokenizer": Default("", "tokenizer source; '' = model.pretrained's"),
    "data.chat_template": Default("", "'' = the tokenizer's; 'hh' = HH raw text; or Jinja"),
    "data.fields": Default(None, "generic/kto: our field name -> the record's key; None = same"),
    "data.data_dir": Default("", "hub: a sub-folder of the dataset; tfds: the data folder"),
    "data.truncation_mode": Default(
        "keep_start",
        "TRL's truncation_mode for data.max_length: keep_start (completions keep their start) "
        "| keep_end (the prompt loses its start)",
    ),
    "data.eval_split": Default("", "held-out split; '' = hold out data.eval_fraction"),
    "data.eval_fraction": Default(0.0, "held-out share of data.split; required without eval_split"),
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
    "logging.wandb": Default(False, "also log metrics to Weights & Biases (pip install wandb)"),
    "logging.wandb_project": Default("tr_align", "the W&B project of the run"),
    "logging.wandb_name": Default("", "the W&B run name; '' = the workdir's name"),
}

# Keys without a default here (the recipe sets them; configs/default.py has every one): what
# each means. Required keys (config.REQUIRED_KEYS) are among them.
RECIPE_KEYS: dict[str, str] = {
    "model.vocab_size": "from scratch: vocabulary size (the synthetic task's tokens too)",
    "model.hidden_size": "from scratch: width of the residual stream",
    "model.intermediate_size": "from scratch: width of the SwiGLU MLP",
    "model.num_hidden_layers": "from scratch: decoder blocks",
    "model.num_attention_heads": "from scratch: query heads",
    "model.num_key_value_heads": "from scratch: key/value heads (grouped-query attention)",
    "model.rope_theta": "from scratch: RoPE base frequency",
    "model.rms_norm_eps": "from scratch: RMSNorm epsilon",
    "model.tie_word_embeddings": "from scratch: the LM head shares the embedding matrix",
    "model.max_position_embeddings": "from scratch: context length (longest sequence)",
    "data.source": "synthetic (the built-in task) | files | hub | tfds (real data)",
    "data.num_train": "synthetic: training pairs",
    "data.num_eval": "synthetic: held-out pairs",
    "data.min_prompt_len": "synthetic: shortest prompt in tokens",
    "data.max_prompt_len": "synthetic: longest prompt in tokens",
    "data.response_len": "synthetic: tokens per response",
    "data.path": "files: a file, glob or list; hub: a dataset name; tfds: a builder name",
    "data.format": "hh | tldr | ultrafeedback | generic | kto (unpaired)",
    "data.split": "the training split (files: 'train' for the files given)",
    "data.max_length": "prompt + completion tokens per sequence (TRL's max_length)",
    "data.max_prompt_length": (
        "over-long prompts keep their last this many tokens; configs/default.py: "
        "data.max_length // 2 unless set; 0 = never truncate"
    ),
    "data.on_bad_row": "skip (counted per reason) | error (stop at the first bad row)",
    "data.cache_dir": "tokenized-data cache; '' = ~/.cache/tr_align/tokenized",
    "train.steps": "optimizer steps of the run (unless train.epochs > 0)",
    "train.batch_size": "preference pairs per optimizer step (global, TRL's batch size)",
    "train.eval_batch_size": "held-out pairs per eval batch",
    "train.seed": "seed of the initialisation, the data order and the held-out split",
    "train.log_every_steps": "write train metrics every this many steps",
    "train.eval_every_steps": "held-out metrics every this many steps (and at the end)",
    "optimizer.learning_rate": "peak AdamW learning rate (pretrained models: ~1e-6 .. 1e-5)",
    "optimizer.warmup_steps": "linear warmup steps (<= train.steps)",
    "optimizer.schedule": "after warmup: linear | cosine | constant",
    "optimizer.end_lr_factor": "final learning rate as a fraction of the peak",
    "optimizer.weight_decay": "AdamW decoupled weight decay",
    "optimizer.b1": "AdamW beta1",
    "optimizer.b2": "AdamW beta2",
    "optimizer.eps": "AdamW epsilon",
    "optimizer.max_grad_norm": "clip the global gradient norm to this; <= 0 = no clipping",
    "loss.type": "sigmoid (DPO) | ipo | hinge | ... (tr_align.losses.LOSS_TYPES) | kto | sft",
    "loss.beta": "the loss's beta (KL strength)",
    "loss.label_smoothing": "conservative DPO / robust losses: label noise in [0, 0.5)",
    "loss.discopop_tau": "discopop loss: its tau",
    "trust_region.enabled": "update the reference model during training (TR-DPO); False = frozen",
    "trust_region.alpha": "reference <- alpha * policy + (1 - alpha) * reference (1 = hard copy)",
    "trust_region.tau": "update the reference every tau optimizer steps",
    "checkpoint.every_steps": "save a checkpoint every this many steps (and at the end)",
    "checkpoint.max_to_keep": "checkpoints kept (the newest)",
    "mesh.data": "data-parallel devices (-1 = all the others)",
    "mesh.fsdp": "fully sharded data-parallel devices (parameters sharded)",
    "mesh.tensor": "tensor-parallel devices",
}

# The values every built-in recipe starts from (``tr_align.config.recipe_base``, on which
# configs/default.py and the front door set their own): of the keys above that all of them
# share, and of the optional keys whose recipe value is not the table's (a recipe that leaves
# one of those out means the table's). ``data.max_prompt_length`` is half of
# ``data.max_length`` (following an override of it), the trust region a preset of
# ``tr_align.trust_region.PRESETS``; the rest of a recipe is its own (the model, the data
# source, the run's length, batch, seed, cadences, learning rate and warmup).
RECIPE: dict[str, Any] = {
    "data.path": "",
    "data.format": "generic",
    "data.fields": {
        "prompt": "prompt",
        "chosen": "chosen",
        "rejected": "rejected",
        "completion": "completion",
        "label": "label",
    },
    "data.split": "train",
    "data.max_length": 1024,  # TRL's max_length
    "data.group_window": 16,
    "data.on_bad_row": "skip",
    "data.cache_dir": "",
    "train.log_every_steps": 1,
    "optimizer.schedule": "linear",
    "optimizer.end_lr_factor": 0.0,
    "optimizer.weight_decay": 0.0,
    "optimizer.b1": 0.9,
    "optimizer.b2": 0.999,
    "optimizer.eps": 1e-8,
    "optimizer.max_grad_norm": 1.0,
    "loss.type": "sigmoid",
    "loss.beta": 0.1,
    "loss.label_smoothing": 0.0,
    "loss.discopop_tau": 0.05,
    "mesh.data": -1,
    "mesh.fsdp": 1,
    "mesh.tensor": 1,
    "checkpoint.max_to_keep": 2,
}

# tr-align frontier's config (configs/frontier.py; its ``base`` block is a configs/default.py
# config, whose keys mean what they mean above).
FRONTIER_KEYS: dict[str, str] = {
    "seed": "corpus split, SFT, pair sampling and evaluation samples",
    "seeds": "alignment seeds (data order) per method",
    "reward": "the gold reward: a tr_align.experiments.scorers spec",
    "max_length": "tokens of prompt + completion in training (longer ones are cut)",
    "corpus.source": "gensim (its movie-review test data) | file (corpus.path, one a line)",
    "corpus.path": "corpus.source=file: the text file",
    "corpus.min_prompt_words": "shortest review prefix (prompt) in words",
    "corpus.max_prompt_words": "longest review prefix (prompt) in words",
    "corpus.eval_fraction": "held-out share of the prompts",
    "corpus.max_eval_prompts": "held-out prompts evaluated",
    "tokenizer.min_count": "word-level tokenizer: a word's minimum count",
    "sft.steps": "SFT steps on the corpus",
    "sft.batch_size": "SFT sequences per step",
    "sft.learning_rate": "SFT peak learning rate",
    "sft.warmup_steps": "SFT warmup steps",
    "pairs.pairs_per_prompt": "preference pairs sampled per prompt (labelled by the reward)",
    "pairs.max_new_tokens": "tokens per sampled completion",
    "pairs.temperature": "sampling temperature of the pairs",
    "dpo.steps": "alignment steps per method and seed",
    "dpo.batch_size": "preference pairs per alignment step",
    "dpo.learning_rate": "alignment peak learning rate",
    "dpo.warmup_steps": "alignment warmup steps",
    "dpo.beta": "the DPO beta",
    "dpo.eval_every": "frontier points every this many steps",
    "methods.dpo.enabled": "DPO: trust region on (False = the frozen-reference baseline)",
    "methods.dpo.alpha": "DPO: trust-region alpha (unused while disabled)",
    "methods.dpo.tau": "DPO: trust-region tau (unused while disabled)",
    "methods.tr_soft.enabled": "TR-DPO soft: trust region on",
    "methods.tr_soft.alpha": "TR-DPO soft: reference <- alpha * policy + (1 - alpha) * ref",
    "methods.tr_soft.tau": "TR-DPO soft: update every tau steps",
    "methods.tr_hard.enabled": "TR-DPO hard: trust region on",
    "methods.tr_hard.alpha": "TR-DPO hard: 1 = copy the policy",
    "methods.tr_hard.tau": "TR-DPO hard: copy every tau steps",
    "eval.samples_per_prompt": "completions sampled per held-out prompt",
    "eval.max_new_tokens": "tokens per evaluation completion",
    "eval.batch_size": "rows per evaluation batch",
}


def meaning(key: str) -> str:
    """The one-line meaning of a dotted config key ('' for a key neither table has)."""
    if key in DEFAULTS:
        return DEFAULTS[key].meaning
    if key in RECIPE_KEYS:
        return RECIPE_KEYS[key]
    if key.startswith("base."):  # tr-align frontier: its configs/default.py block
        return meaning(key[len("base.") :])
    return FRONTIER_KEYS.get(key, "")


def leaf_keys(config, prefix: str = "") -> list[str]:
    """The dotted keys of a config's values (``data.fields``, a dict value, is one key)."""
    out = []
    for k, v in config.items():
        key = prefix + k
        if hasattr(v, "items") and not meaning(key):
            out.extend(leaf_keys(v, key + "."))
        else:
            out.append(key)
    return out


def describe_keys(config) -> list[tuple[str, Any, str]]:
    """``(key, value, meaning)`` of every key of ``config`` (its value there), then of the
    optional keys a training config (one with a ``train`` block) leaves out (their default;
    meaning marked ``(default)``), sorted by key. ``tr-align COMMAND --help`` prints these."""
    present = leaf_keys(config)
    rows = [(k, plain(_lookup(config, k.split("."), None)), meaning(k)) for k in present]
    if "train" in config:
        rows += [
            (k, d.value, f"{d.meaning} (default)") for k, d in DEFAULTS.items() if k not in present
        ]
    return sorted(rows)


def plain(value):
    """A ConfigDict value as a plain dict (for printing)."""
    return value.to_dict() if hasattr(value, "to_dict") else value


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
