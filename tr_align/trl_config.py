"""``--trl-config=dpo.yaml``: a TRL ``DPOConfig`` / ``KTOConfig`` YAML read as front-door settings.

A TRL user's YAML (what ``trl dpo --config dpo.yaml`` reads: ``DPOConfig`` / ``KTOConfig``
fields, the ``transformers.TrainingArguments`` under them, and the ``ScriptArguments`` /
``ModelConfig`` names ``model_name_or_path``, ``dataset_name``, ...) becomes tr_align config
values. ``FIELDS`` is the one table of the mapping (field names of TRL 1.16 and
transformers 5.23, plus the older TRL names ``max_prompt_length``, ``rpo_alpha``,
``reference_free``, ``warmup_ratio``). Each field is one of:

* **mapped** (``map``): its value sets tr_align config keys (or a front-door option:
  ``model``, ``data``, ``workdir``, ``epochs``, ``warmup_ratio``, ``data_config``,
  ``eval_split``, ``ratio:KEY``). When the key does not exist in this tr_align (a TRL loss option
  not available yet), TRL's default value of the field is accepted with a note and any other
  value is refused.
* **ignored** (``ignore``): logging, hub, data-loader and launcher settings that do not change
  what is trained (``report_to``, ``run_name``, ``logging_dir``, ...): accepted, and listed in
  one printed note.
* **only** (``only``): accepted (and ignored) at the listed values, which are TRL's defaults
  or mean what tr_align does anyway; any other value is refused (``fp16: true``,
  ``use_peft: true``, ``optim: adafactor``, ...).

Anything refused, and any field the table does not know, is reported together in one
``ConfigError`` line naming each field (with a "did you mean" for a misspelt one).

``read(path, data_parallel=N)`` returns ``Settings(config, options, notes)``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Callable
from typing import Any

from tr_align.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Field:
    kind: str  # "map" | "ignore" | "only"
    # map: value, the whole YAML dict, the data-parallel size -> {config key or option: value}
    convert: Callable[[Any, dict, int], dict] | None = None
    allowed: tuple = ()  # only: the values accepted (and ignored)
    note: str = ""  # the table's explanation (docs/switching.md); for "only": why others are refused
    targets: tuple[str, ...] = ()  # map: the config keys / options it can set (for the table)


@dataclasses.dataclass
class Settings:
    """What a TRL YAML says, as tr_align sees it."""

    config: dict[str, Any]  # dotted config key -> value
    options: dict[str, Any]  # front-door options (model, data, workdir, epochs, ...)
    notes: list[str]  # one-line notes to print (ignored fields, absent keys at TRL's default)
    ignored: list[str] = dataclasses.field(default_factory=list)  # every ignored field


# ------------------------------------------------------------------------- value converters


def _num(name, value, kind=float):
    """A YAML number (PyYAML reads ``1e-6`` as a string) as ``kind``; ConfigError otherwise."""
    if isinstance(value, bool):
        raise ConfigError(f"{name}={value!r}: expected a number")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r}: expected a number") from None
    if not math.isfinite(out):
        raise ConfigError(f"{name}={value!r}: expected a finite number")
    if kind is int:
        if out != int(out):
            raise ConfigError(f"{name}={value!r}: expected an integer")
        return int(out)
    return out


def _bool(name, value):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ConfigError(f"{name}={value!r}: expected true or false")


def _to(key, kind=float):
    """A converter that sets ``key`` to the value as ``kind`` (float, int, bool, str)."""

    def convert(value, doc, dp, name=None):
        if kind is bool:
            return {key: _bool(name, value)}
        if kind is str:
            return {key: str(value)}
        return {key: _num(name, value, kind)}

    convert.targets = (key,)
    return convert


def _optional(key, kind=float, none=None):
    """As ``_to``, but a YAML ``null`` sets ``key`` to ``none`` (None: leaves it out)."""
    inner = _to(key, kind)

    def convert(value, doc, dp, name=None):
        if value is None:
            return {} if none is None else {key: none}
        return inner(value, doc, dp, name=name)

    convert.targets = (key,)
    return convert


# TRL 1.16's DPO loss names -> tr_align's (losses.LOSS_TYPES): TRL renamed the AOT pair in 1.x
# ("aot_pair" -> "aot" is the paired form, "aot" -> "aot_unpaired" the unpaired one).
LOSS_NAMES = {"aot_unpaired": "aot_pair"}


def _loss_type(value, doc, dp, name=None):
    types = [value] if isinstance(value, str) else list(value or ())
    if not types or not all(isinstance(t, str) for t in types):
        raise ConfigError(f"{name}={value!r}: expected a loss name or a list of them")
    types = [LOSS_NAMES.get(t, t) for t in types]
    return {"loss.type": types[0] if len(types) == 1 else tuple(types)}


_loss_type.targets = ("loss.type",)


def _loss_weights(value, doc, dp, name=None):
    if value is None:
        return {}
    return {"loss.weights": tuple(_num(name, w) for w in value)}


_loss_weights.targets = ("loss.weights",)


def _batch(value, doc, dp, name=None):
    """TRL's global batch = per-device batch x devices x accumulation steps; tr_align's
    ``train.batch_size`` is the global batch, split into ``grad_accum_steps`` microbatches."""
    per_device = _num(name, value, int)
    accum = _num("gradient_accumulation_steps", doc.get("gradient_accumulation_steps", 1), int)
    return {"train.batch_size": per_device * accum * dp, "train.grad_accum_steps": accum}


_batch.targets = ("train.batch_size", "train.grad_accum_steps")


def _accum(value, doc, dp, name=None):
    if "per_device_train_batch_size" in doc:
        return {}  # set with the batch size
    return {"train.grad_accum_steps": _num(name, value, int)}


_accum.targets = ("train.grad_accum_steps",)


def _eval_batch(value, doc, dp, name=None):
    return {"train.eval_batch_size": _num(name, value, int) * dp}


_eval_batch.targets = ("train.eval_batch_size",)


def _max_steps(value, doc, dp, name=None):
    steps = _num(name, value, int)
    return {"train.steps": steps} if steps > 0 else {}  # -1: num_train_epochs decides


_max_steps.targets = ("train.steps",)


def _warmup_steps(value, doc, dp, name=None):
    """transformers 5: an integer is a step count, a float in (0, 1) a share of the run."""
    v = _num(name, value)
    if 0 < v < 1:
        return {"warmup_ratio": v}
    return {"optimizer.warmup_steps": _num(name, value, int)}


_warmup_steps.targets = ("optimizer.warmup_steps", "warmup_ratio")


def _every(key):
    """logging/eval/save steps: an integer, or a float in (0, 1) as a share of the run."""

    def convert(value, doc, dp, name=None):
        if value is None:
            return {}
        v = _num(name, value)
        if 0 < v < 1:
            return {f"ratio:{key}": v}
        return {key: _num(name, value, int)}

    convert.targets = (key,)
    return convert


SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant"}
SCHEDULES["constant_with_warmup"] = "constant"


def _schedule(value, doc, dp, name=None):
    if value not in SCHEDULES:
        raise ConfigError(
            f"{name}={value!r}: supported are {', '.join(SCHEDULES)} (tr_align's linear, cosine "
            "and constant schedules, all after a linear warmup)"
        )
    return {"optimizer.schedule": SCHEDULES[value]}


_schedule.targets = ("optimizer.schedule",)


def _max_length(value, doc, dp, name=None):
    if value is None:
        raise ConfigError(f"{name}=None: tr_align needs a maximum length; set a number")
    return {"data.max_length": _num(name, value, int)}


_max_length.targets = ("data.max_length",)


def _bf16(value, doc, dp, name=None):
    return {"model.dtype": "bfloat16" if _bool(name, value) else "float32"}


_bf16.targets = ("model.dtype",)


def _remat(value, doc, dp, name=None):
    return {"model.remat": "full" if _bool(name, value) else "none"}


_remat.targets = ("model.remat",)


def _option(option, kind=str):
    def convert(value, doc, dp, name=None):
        if value is None:
            return {}
        return {option: value if kind is str else _num(name, value, kind)}

    convert.targets = (option,)
    return convert


def _map(convert, note=""):
    return Field("map", convert=convert, note=note, targets=convert.targets)


def _ignore(note=""):
    return Field("ignore", note=note)


def _only(*allowed, note=""):
    return Field("only", allowed=allowed, note=note)


_LAUNCH = "logging, hub, data-loader or launcher setting; no effect on what is trained"

# The mapping: TRL field -> Field. One place; docs/switching.md shows it.
FIELDS: dict[str, Field] = {
    # --- what to train on, where (TRL's ScriptArguments / ModelConfig)
    "model_name_or_path": _map(_option("model"), "--model"),
    "dataset_name": _map(_option("data"), "--data (a hub dataset or a local file/glob)"),
    "dataset_config": _map(_option("data_config"), "hub dataset config (NAME:CONFIG)"),
    "dataset_train_split": _map(_to("data.split", str)),
    "dataset_test_split": _map(
        _option("eval_split"), "data.eval_split when the hub dataset has it; else a held-out share"
    ),
    "output_dir": _map(_option("workdir"), "--workdir; the trained model goes to OUTPUT_DIR/hf"),
    # --- the loss
    "beta": _map(_to("loss.beta")),
    "loss_type": _map(_loss_type, "a list of several types: combined losses (loss.weights)"),
    "loss_weights": _map(_loss_weights),
    "label_smoothing": _map(_to("loss.label_smoothing")),
    "discopop_tau": _map(_to("loss.discopop_tau")),
    "rpo_alpha": _map(_optional("loss.rpo_alpha"), "older TRL; null = off"),
    "ld_alpha": _map(_optional("loss.ld_alpha"), "null = off"),
    "use_weighting": _map(_to("loss.use_weighting", bool)),
    "reference_free": _map(_to("loss.reference_free", bool), "older TRL"),
    "precompute_ref_log_probs": _map(_to("loss.precompute_ref_log_probs", bool)),
    "desirable_weight": _map(_to("loss.desirable_weight"), "KTO"),
    "undesirable_weight": _map(_to("loss.undesirable_weight"), "KTO"),
    "f_divergence_type": _only("reverse_kl", note="only the reverse KL (DPO's) is implemented"),
    "f_alpha_divergence_coef": _ignore("used only with f_divergence_type=alpha_divergence"),
    # --- the trust region (TR-DPO: TRL's sync_ref_model)
    "sync_ref_model": _map(_to("trust_region.enabled", bool)),
    "ref_model_mixup_alpha": _map(_to("trust_region.alpha")),
    "ref_model_sync_steps": _map(_to("trust_region.tau", int)),
    # --- the data
    "max_length": _map(_max_length),
    "max_prompt_length": _map(_optional("data.max_prompt_length", int, none=0), "older TRL"),
    "max_completion_length": _only(
        None, note="older TRL; tr_align cuts completions to fit data.max_length"
    ),
    "truncation_mode": _map(_to("data.truncation_mode", str)),
    "padding_free": _ignore("tr_align's batches are padding-free already (data.packing)"),
    "pad_to_multiple_of": _ignore("padded lengths are data.buckets"),
    "dataset_num_proc": _ignore(),
    "dataset_streaming": _only(False, note="tr_align reads the whole dataset first"),
    "pad_token": _ignore("the tokenizer's pad token (or 0) is used"),
    "precompute_ref_batch_size": _ignore(),
    # --- optimisation
    "learning_rate": _map(_to("optimizer.learning_rate")),
    "per_device_train_batch_size": _map(
        _batch, "train.batch_size = per-device x devices x gradient_accumulation_steps"
    ),
    "gradient_accumulation_steps": _map(_accum),
    "per_device_eval_batch_size": _map(_eval_batch, "x devices"),
    "num_train_epochs": _map(_option("epochs", float), "the run's steps, unless max_steps > 0"),
    "max_steps": _map(_max_steps, "-1 = num_train_epochs decides"),
    "warmup_ratio": _map(_option("warmup_ratio", float), "older transformers"),
    "warmup_steps": _map(_warmup_steps, "a float in (0, 1): a share of the run"),
    "lr_scheduler_type": _map(_schedule, "linear, cosine, constant, constant_with_warmup"),
    "lr_scheduler_kwargs": _only(None, {}, note="no scheduler options"),
    "weight_decay": _map(_to("optimizer.weight_decay")),
    "adam_beta1": _map(_to("optimizer.b1")),
    "adam_beta2": _map(_to("optimizer.b2")),
    "adam_epsilon": _map(_to("optimizer.eps")),
    "max_grad_norm": _map(_to("optimizer.max_grad_norm"), "0 = no clipping"),
    "optim": _only(
        "adamw_torch",
        "adamw_torch_fused",
        "adamw_hf",
        "adamw_torch_xla",
        "adamw_apex_fused",
        note="tr_align trains with AdamW (optax.adamw)",
    ),
    "optim_args": _only(None, note="no optimizer options"),
    "optim_target_modules": _only(None),
    "seed": _map(_to("train.seed", int)),
    "data_seed": _only(None, note="the data order follows seed (train.seed)"),
    "full_determinism": _ignore("tr_align runs are deterministic"),
    "label_smoothing_factor": _only(0, 0.0, note="use label_smoothing (the DPO loss's)"),
    "neftune_noise_alpha": _only(None, note="NEFTune is not implemented"),
    "auto_find_batch_size": _only(False),
    "average_tokens_across_devices": _ignore(),
    # --- precision and memory
    "bf16": _map(_bf16, "model.dtype = bfloat16 (compute; master weights stay float32)"),
    "fp16": _only(False, note="use bf16"),
    "bf16_full_eval": _ignore(),
    "fp16_full_eval": _only(False, note="use bf16"),
    "tf32": _ignore(),
    "gradient_checkpointing": _map(_remat, "model.remat = full"),
    "activation_checkpointing": _map(_remat, "transformers 5's name"),
    "gradient_checkpointing_kwargs": _ignore(),
    "activation_checkpointing_kwargs": _ignore(),
    "gradient_checkpointing_use_reentrant": _ignore(),
    "activation_offloading": _only(False, note="use model.remat and train.logps_chunk_size"),
    "use_liger_kernel": _ignore("kernels are XLA's"),
    "liger_kernel_config": _ignore(),
    "torch_compile": _ignore("the step is always compiled (jax.jit)"),
    "torch_compile_backend": _ignore(),
    "torch_compile_mode": _ignore(),
    "torch_empty_cache_steps": _ignore(),
    "use_cache": _ignore(),
    # --- the model
    "dtype": _ignore("weights load in float32; bf16 sets the compute dtype"),
    "torch_dtype": _ignore("weights load in float32; bf16 sets the compute dtype"),
    "model_revision": _only("main", note="give a local directory or a hub id"),
    "model_init_kwargs": _only(None, {}, note="no model loading options"),
    "trust_remote_code": _only(False, note="only the built-in architectures load"),
    "attn_implementation": _ignore("attention is tr_align's own"),
    "disable_dropout": _ignore("tr_align models have no dropout"),
    "router_aux_loss_coef": _only(None, note="no mixture-of-experts models"),
    "use_peft": _only(False, note="LoRA / PEFT is not available in this tr_align"),
    **{
        k: _ignore("used only with use_peft")
        for k in (
            "lora_r",
            "lora_alpha",
            "lora_dropout",
            "lora_target_modules",
            "lora_target_parameters",
            "lora_modules_to_save",
            "lora_task_type",
            "use_rslora",
            "use_dora",
            "bnb_4bit_quant_type",
            "use_bnb_nested_quant",
            "bnb_4bit_quant_storage",
        )
    },
    "load_in_8bit": _only(False, note="quantized training is not implemented"),
    "load_in_4bit": _only(False, note="quantized training is not implemented"),
    # --- logging, evaluation and checkpoints
    "logging_steps": _map(_every("train.log_every_steps"), "a float in (0, 1): a share"),
    "eval_steps": _map(_every("train.eval_every_steps"), "null: tr_align's default"),
    "save_steps": _map(_every("checkpoint.every_steps")),
    "save_total_limit": _map(_optional("checkpoint.max_to_keep", int)),
    "resume_from_checkpoint": _ignore("rerun with the same output_dir to resume"),
    "load_best_model_at_end": _only(False, note="the final policy is exported"),
    "train_sampling_strategy": _ignore("batches are shuffled by seed"),
    "fsdp": _ignore("shard with --mesh.fsdp=N"),
    "fsdp_config": _ignore("shard with --mesh.fsdp=N"),
    "deepspeed": _ignore("shard with --mesh.fsdp=N"),
    "accelerator_config": _ignore(_LAUNCH),
    "parallelism_config": _ignore("shard with --mesh.*"),
    **{
        k: _ignore(_LAUNCH)
        for k in (
            "report_to",
            "run_name",
            "logging_dir",
            "logging_strategy",
            "logging_first_step",
            "logging_nan_inf_filter",
            "log_level",
            "log_level_replica",
            "log_on_each_node",
            "disable_tqdm",
            "project",
            "trackio_space_id",
            "trackio_bucket_id",
            "trackio_static_space_id",
            "include_num_input_tokens_seen",
            "eval_strategy",
            "evaluation_strategy",
            "eval_delay",
            "eval_on_start",
            "eval_accumulation_steps",
            "eval_do_concat_batches",
            "eval_use_gather_object",
            "prediction_loss_only",
            "include_for_metrics",
            "batch_eval_metrics",
            "metric_for_best_model",
            "greater_is_better",
            "skip_memory_metrics",
            "save_strategy",
            "save_only_model",
            "save_on_each_node",
            "save_safetensors",
            "enable_jit_checkpoint",
            "overwrite_output_dir",
            "push_to_hub",
            "hub_token",
            "hub_private_repo",
            "hub_model_id",
            "hub_strategy",
            "hub_always_push",
            "hub_revision",
            "ignore_data_skip",
            "restore_callback_states_from_checkpoint",
            "do_train",
            "do_eval",
            "do_predict",
            "use_cpu",
            "local_rank",
            "debug",
            "dataloader_drop_last",
            "dataloader_num_workers",
            "dataloader_pin_memory",
            "dataloader_persistent_workers",
            "dataloader_prefetch_factor",
            "dataloader_multiprocessing_context",
            "dataloader_in_order",
            "remove_unused_columns",
            "label_names",
            "length_column_name",
            "ddp_find_unused_parameters",
            "ddp_bucket_cap_mb",
            "ddp_broadcast_buffers",
            "ddp_static_graph",
            "ddp_backend",
            "ddp_timeout",
            "ignore_bias_buffers",
        )
    },
}


def read(path: str, *, data_parallel: int = 1, known_keys=None) -> Settings:
    """The ``Settings`` of the TRL YAML file ``path``.

    ``data_parallel``: the devices a TRL run's per-device batch is multiplied by.
    ``known_keys``: a callable ``key -> bool`` telling which config keys exist in this tr_align
    (a mapped field whose key is absent: TRL's default value is accepted with a note, any
    other value refused); None = all exist.
    """
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"--trl-config={path}: cannot read: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a YAML mapping of TRL config fields")
    return from_dict(doc, data_parallel=data_parallel, known_keys=known_keys, where=path)


# TRL's default of each mapped field whose config key may be absent from this tr_align (added
# with TRL's loss options): at this value the field changes nothing and is accepted.
TRL_NEUTRAL = {
    "rpo_alpha": None,
    "ld_alpha": None,
    "loss_weights": None,
    "use_weighting": False,
    "reference_free": False,
    "precompute_ref_log_probs": False,
    "truncation_mode": "keep_start",
}


def from_dict(doc: dict, *, data_parallel: int = 1, known_keys=None, where="TRL config"):
    """``read`` for an already parsed YAML mapping."""
    config, options, refused, ignored, absent = {}, {}, [], [], []
    for name, value in doc.items():
        field = FIELDS.get(name)
        if field is None:
            close = difflib.get_close_matches(str(name), FIELDS, n=1)
            refused.append(
                f"{name} (not a TRL field tr_align knows"
                + (f"; did you mean {close[0]}?)" if close else ")")
            )
            continue
        if field.kind == "ignore":
            ignored.append(name)
            continue
        if field.kind == "only":
            if not any(_same(value, a) for a in field.allowed):
                shown = " or ".join(repr(a) for a in field.allowed)
                refused.append(f"{name}={value!r} (only {shown}: {field.note or 'not supported'})")
            continue
        try:
            values = field.convert(value, doc, data_parallel, name=name)
        except ConfigError as e:
            refused.append(str(e))
            continue
        for key, v in values.items():
            if "." in key and not key.startswith("ratio:") and known_keys and not known_keys(key):
                if name in TRL_NEUTRAL and _same(value, TRL_NEUTRAL[name]):
                    absent.append(f"{name}={value!r}")
                else:
                    refused.append(f"{name}={value!r} ({key} is not available in this tr_align)")
                continue
            (config if "." in key and not key.startswith("ratio:") else options)[key] = v
    if refused:
        raise ConfigError(f"{where}: not supported: " + "; ".join(refused))
    notes = []
    if ignored:  # named: the ones set to something (a dumped config holds them all)
        shown = [n for n in ignored if doc[n] not in (None, False, "", 0, [], {}, "no", "none")]
        shown.sort(
            key=lambda n: (n not in NOTED_FIRST, NOTED_FIRST.index(n) if n in NOTED_FIRST else 0)
        )
        more = len(ignored) - len(shown[:8])
        notes.append(
            f"{os.path.basename(where)}: {len(ignored)} logging/hub/launcher fields ignored (no "
            f"effect here)"
            + (f": {', '.join(shown[:8])}" if shown else "")
            + (f" and {more} more" if shown and more else "")
        )
    if absent:
        notes.append(
            f"{os.path.basename(where)}: at TRL's default, options this tr_align lacks: "
            + ", ".join(absent)
        )
    return Settings(config=config, options=options, notes=notes, ignored=ignored)


# Ignored fields a TRL user is most likely to have set on purpose: named first in the note.
NOTED_FIRST = (
    "report_to",
    "run_name",
    "logging_dir",
    "push_to_hub",
    "hub_model_id",
    "resume_from_checkpoint",
    "deepspeed",
    "fsdp",
    "torch_compile",
    "use_liger_kernel",
    "padding_free",
)


def _same(value, allowed) -> bool:
    if isinstance(allowed, bool) or isinstance(value, bool):
        return value is allowed or (isinstance(value, bool) and value == allowed)
    if isinstance(allowed, (int, float)) and not isinstance(value, str):
        return value == allowed
    return value == allowed and type(value) is type(allowed)


def markdown_table() -> str:
    """The mapped fields as a Markdown table (docs/switching.md): config keys in
    code font, front-door options (``model``, ``epochs``, ...) in italics."""
    rows = ["| TRL field | tr_align | note |", "| --- | --- | --- |"]
    for name, f in FIELDS.items():
        if f.kind == "map":
            targets = ", ".join(f"`{t}`" if "." in t else f"*{t}*" for t in f.targets)
            rows.append(f"| `{name}` | {targets} | {f.note} |")
    return "\n".join(rows)
