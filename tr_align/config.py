"""Config checks that run before any compute.

Every problem is reported as a one-line ``ConfigError`` naming the key, the
value and what is allowed, e.g.
``trust_region.alpha=1.5: must be in [0, 1]``. ``warnings(config, total_steps)`` lists the
valid settings that silently do nothing (a ``trust_region.tau`` longer than the run,
real-data keys with the synthetic task, ...); the training loop prints them as
``tr-align: warning: ...`` lines before the model loads.
"""

from __future__ import annotations

import difflib
import math
import os
import re

import ml_collections
from absl import logging

from tr_align import dtypes, lora, losses, sharding, trust_region
from tr_align.data import formats, synthetic
from tr_align.defaults import DEFAULTS, RECIPE, RECIPE_KEYS
from tr_align.defaults import get as get_optional
from tr_align.defaults import plain as defaults_plain
from tr_align.errors import ConfigError
from tr_align.io import pretrained
from tr_align.models import LlamaConfig
from tr_align.models.common import REMAT_POLICIES
from tr_align.training import metrics, optim

# Optional keys and what their absence means: tr_align.defaults.DEFAULTS (one table; read with
# ``get_optional(config, key)``). This view holds the default values only.
OPTIONAL_DEFAULTS = {key: d.value for key, d in DEFAULTS.items()}
PACKING_LAYOUTS = ("none", "packed", "prefix_shared")

REQUIRED_KEYS = (
    "train.steps",
    "train.batch_size",
    "train.seed",
    "train.log_every_steps",
    "train.eval_every_steps",
    "train.eval_batch_size",
    "optimizer.learning_rate",
    "optimizer.warmup_steps",
    "optimizer.schedule",
    "optimizer.end_lr_factor",
    "optimizer.weight_decay",
    "optimizer.b1",
    "optimizer.b2",
    "optimizer.eps",
    "optimizer.max_grad_norm",
    "loss.type",
    "loss.beta",
    "loss.label_smoothing",
    "loss.discopop_tau",
    "trust_region.alpha",
    "trust_region.tau",
    "trust_region.enabled",
    "checkpoint.every_steps",
    "checkpoint.max_to_keep",
    "mesh.data",
    "mesh.fsdp",
    "mesh.tensor",
    "model.dtype",
    "data.source",
)


# loss.beta below this scales the loss's gradient (beta * d logp) under what float32 training
# resolves: beta = 1e-45 is a float32 denormal (flushed to 0 on accelerators: no gradient at
# all), and Adam's eps (1e-8) swamps gradients long before that.
MIN_BETA = 1e-6
# A warning (not an error) above this AdamW learning rate: 1e6 collapses the model
# (grad_norm 0 for the rest of the run); the usual range is 1e-7 .. 1e-2.
MAX_SANE_LEARNING_RATE = 0.1

UNPAIRED_LOSSES = ("kto",)  # unpaired data (tr_align.training.objectives.KTO)
SFT_LOSSES = ("sft",)  # next-token loss on the chosen completions (objectives.SFT)
TRUNCATION_MODES = ("keep_start", "keep_end")  # data.truncation_mode (TRL's)
# losses that sort the batch: no per-pair WPO weights (TRL refuses them too)
_SORTING_LOSSES = ("aot", "aot_unpaired")


def loss_types(loss_type) -> tuple[str, ...]:
    """``loss.type`` as a tuple of names: one name, a comma-separated string
    ("sigmoid,bco_pair,sft": TRL's ``loss_type`` list) or a list/tuple of names; old names
    (``aot_pair``) mapped to TRL's current ones (``losses.LOSS_ALIASES``)."""
    if isinstance(loss_type, str):
        loss_type = loss_type.split(",")
    return tuple(losses.canonical_loss_type(str(t).strip()) for t in loss_type)


def is_unpaired(loss_cfg) -> bool:
    """Whether the ``loss`` block trains on unpaired data (``loss.type=kto``)."""
    return loss_types(loss_cfg.type) == UNPAIRED_LOSSES


DATA_SOURCES = ("synthetic", "files", "hub", "tfds")


def load_config_file(path: str, preset: str | None = None):
    """``get_config(preset)`` of a config file, loaded by path (as ``--config=PATH:PRESET``);
    lets one recipe start from another."""
    import importlib.util

    name = "tr_align_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset) if preset else module.get_config()


# The blocks of a training config, in the order a recipe lists them (``recipe_base``).
RECIPE_BLOCKS = (
    "model",
    "data",
    "train",
    "optimizer",
    "loss",
    "trust_region",
    "mesh",
    "checkpoint",
    "logging",
)


def recipe_base(preset: str | None = None) -> ml_collections.ConfigDict:
    """The config the built-in recipes start from (``configs/default.py`` and the front door,
    ``frontdoor.base_config``, set their own keys on it), built from the defaults tables alone:
    every block of ``RECIPE_BLOCKS`` with each optional key of ``DEFAULTS`` in it at its
    default (but ``optimizer.schedule_extensions``, which a resume writes; ``lora`` is a LoRA
    recipe's block), the shared values of ``defaults.RECIPE``, ``data.max_prompt_length`` half
    of ``data.max_length`` (a reference: it follows an override of ``data.max_length`` unless
    set itself) and the trust region of ``trust_region.PRESETS[preset]`` (default tr-soft).

    What it leaves out is the recipe's own: the model (its sizes from scratch), data.source
    (the synthetic task's keys), data.eval_fraction (the table's 0.0 until set), and the run's
    length, batch, seed, eval cadence, learning rate, warmup and checkpoint cadence
    (``REQUIRED_KEYS``; ``validate`` names any a recipe forgets).
    """
    if preset is not None and preset not in trust_region.PRESETS:
        raise ConfigError(
            f"unknown preset {preset!r}; expected one of {sorted(trust_region.PRESETS)}"
        )
    blocks: dict = {block: {} for block in RECIPE_BLOCKS}
    for key, default in DEFAULTS.items():
        block, _, name = key.partition(".")
        if block in blocks and key != "optimizer.schedule_extensions":
            blocks[block][name] = default.value
    for key, value in RECIPE.items():
        block, _, name = key.partition(".")
        blocks[block][name] = value
    blocks["data"]["max_length"] = ml_collections.FieldReference(RECIPE["data.max_length"])
    blocks["trust_region"].update(trust_region.PRESETS[preset or "tr-soft"])
    c = ml_collections.ConfigDict(blocks)
    c.data.max_prompt_length = c.data.get_ref("max_length") // 2
    return c


def unknown_key(config, key: str) -> str | None:
    """None if the dotted ``key`` names an entry of ``config``, else a one-line message with
    a 'did you mean' suggestion (or the block's keys), e.g. for ``--config.train.step=5``:
    ``train.step: unknown key; did you mean train.steps?``."""
    node, done, parts = config, [], key.split(".")
    for i, part in enumerate(parts):
        if hasattr(node, "keys") and part in node:
            node = node[part]
            done.append(part)
            continue
        if not hasattr(node, "keys"):
            return f"{key}: unknown key ({'.'.join(done)} is a value, not a block)"
        choices = sorted(node.keys())
        close = difflib.get_close_matches(part, choices, n=1)
        if close:
            hint = f"did you mean {'.'.join([*done, close[0], *parts[i + 1 :]])}?"
        else:
            hint = f"{'.'.join(done) or 'the config'} has: {', '.join(choices)}"
        if key in DEFAULTS:
            hint = f"an optional key this recipe leaves out; set it in the config file ({hint})"
        elif key in RECIPE_KEYS:
            hint = (
                "this recipe leaves it out (configs/default.py has it); add it to the config "
                f"file, or start from configs/default.py ({hint})"
            )
        return f"{key}: unknown key; {hint}"
    return None


def _get(config, key):
    node = config
    for part in key.split("."):
        try:
            node = node[part]
        except (KeyError, AttributeError):
            raise ConfigError(f"{key}: missing from the config") from None
    return node


def _check(ok, key, value, allowed):
    if not ok:
        raise ConfigError(f"{key}={value!r}: {allowed}")


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate(config, num_devices: int) -> None:
    """Raises ConfigError for the first invalid value in ``config``."""
    for key in REQUIRED_KEYS:
        _get(config, key)
    t, o, lo, tr = config.train, config.optimizer, config.loss, config.trust_region

    for key in (
        "train.steps",
        "train.batch_size",
        "train.eval_batch_size",
        "train.log_every_steps",
        "train.eval_every_steps",
        "checkpoint.every_steps",
        "checkpoint.max_to_keep",
    ):
        v = _get(config, key)
        _check(_is_int(v) and v >= 1, key, v, "must be an integer >= 1")
    _check(
        _is_int(t.seed) and 0 <= t.seed < 2**32,
        "train.seed",
        t.seed,
        "must be an integer in [0, 2**32)",
    )
    v = get_optional(config, "logging.wandb")
    _check(isinstance(v, bool), "logging.wandb", v, "must be True or False")
    for key in ("logging.wandb_project", "logging.wandb_name"):
        name = get_optional(config, key)
        _check(isinstance(name, str), key, name, "must be a string")
    if v:
        metrics.check_wandb()  # MissingDependencyError (one line) before anything runs
    v = get_optional(config, "checkpoint.async_save")
    _check(isinstance(v, bool), "checkpoint.async_save", v, "must be True or False")
    v = get_optional(config, "checkpoint.timeout_s")
    _check(_is_num(v) and v > 0, "checkpoint.timeout_s", v, "must be a number of seconds > 0")
    epochs = get_optional(config, "train.epochs")
    _check(
        _is_num(epochs) and epochs >= 0,
        "train.epochs",
        epochs,
        "must be a number >= 0 (0 = run train.steps steps)",
    )

    _validate_loss_types(config)
    _check(_is_num(lo.beta) and lo.beta > 0, "loss.beta", lo.beta, "must be a number > 0")
    _check(
        lo.beta >= MIN_BETA,
        "loss.beta",
        lo.beta,
        f"must be >= {MIN_BETA:g} (smaller values leave no usable gradient in float32)",
    )
    _check(
        _is_num(lo.discopop_tau) and lo.discopop_tau > 0,
        "loss.discopop_tau",
        lo.discopop_tau,
        "must be a number > 0",
    )
    for key in ("loss.desirable_weight", "loss.undesirable_weight"):
        w = get_optional(config, key)
        _check(_is_num(w) and w >= 0, key, w, "must be a number >= 0")
    if get_optional(config, "loss.desirable_weight") == 0:
        w = get_optional(config, "loss.undesirable_weight")
        _check(
            w > 0, "loss.undesirable_weight", w, "and loss.desirable_weight are both 0 (no loss)"
        )
    _check(
        _is_num(lo.label_smoothing) and 0 <= lo.label_smoothing < 0.5,
        "loss.label_smoothing",
        lo.label_smoothing,
        "must be in [0, 0.5)",
    )

    _check(
        isinstance(tr.enabled, bool), "trust_region.enabled", tr.enabled, "must be True or False"
    )
    _check(
        _is_num(tr.alpha) and 0 <= tr.alpha <= 1,
        "trust_region.alpha",
        tr.alpha,
        "must be in [0, 1]",
    )
    _check(_is_int(tr.tau) and tr.tau >= 1, "trust_region.tau", tr.tau, "must be an integer >= 1")

    _check(
        _is_num(o.learning_rate) and o.learning_rate > 0,
        "optimizer.learning_rate",
        o.learning_rate,
        "must be a number > 0",
    )
    _check(
        _is_int(o.warmup_steps) and 0 <= o.warmup_steps,
        "optimizer.warmup_steps",
        o.warmup_steps,
        "must be an integer >= 0",
    )
    _check(
        o.schedule in optim.SCHEDULES,
        "optimizer.schedule",
        o.schedule,
        f"must be one of {', '.join(optim.SCHEDULES)}",
    )
    if not epochs:  # with train.epochs the step count is known once the data is read (optim)
        _check(
            o.warmup_steps <= t.steps,
            "optimizer.warmup_steps",
            o.warmup_steps,
            f"must be <= train.steps={t.steps} (the learning rate would never reach its peak)",
        )
    _check(
        _is_num(o.end_lr_factor) and 0 <= o.end_lr_factor <= 1,
        "optimizer.end_lr_factor",
        o.end_lr_factor,
        "must be in [0, 1] (the final learning rate as a fraction of the peak)",
    )
    _check(
        _is_num(o.weight_decay) and o.weight_decay >= 0,
        "optimizer.weight_decay",
        o.weight_decay,
        "must be a number >= 0",
    )
    for key in ("optimizer.b1", "optimizer.b2"):
        v = _get(config, key)
        _check(_is_num(v) and 0 <= v < 1, key, v, "must be in [0, 1)")
    _check(
        _is_num(o.eps) and o.eps > 0,
        "optimizer.eps",
        o.eps,
        "must be a number > 0 (AdamW divides by sqrt(v) + eps)",
    )
    _check(
        _is_num(o.max_grad_norm),
        "optimizer.max_grad_norm",
        o.max_grad_norm,
        "must be a finite number (> 0: clip the global gradient norm to it; <= 0: no clipping)",
    )
    if o.learning_rate > MAX_SANE_LEARNING_RATE:
        logging.warning(
            "optimizer.learning_rate=%r is far above the usual AdamW range (1e-7 .. 1e-2); "
            "the model is likely to collapse (grad_norm 0)",
            o.learning_rate,
        )

    source = get_optional(config, "model.pretrained")
    _check(isinstance(source, str), "model.pretrained", source, "must be a path, 'smollm2' or ''")
    problem = pretrained.check_source(source)
    _check(problem is None, "model.pretrained", source, problem)
    _check(
        config.model.dtype in dtypes.NAMES,
        "model.dtype",
        config.model.dtype,
        f"must be {' or '.join(map(repr, dtypes.NAMES))}",
    )
    remat = get_optional(config, "model.remat")
    _check(
        remat in REMAT_POLICIES, "model.remat", remat, f"must be one of {', '.join(REMAT_POLICIES)}"
    )
    ref_dtype = get_optional(config, "trust_region.ref_dtype")
    _check(
        ref_dtype in dtypes.NAMES,
        "trust_region.ref_dtype",
        ref_dtype,
        f"must be {' or '.join(map(repr, dtypes.NAMES))}",
    )
    _validate_lora(config)
    accum = get_optional(config, "train.grad_accum_steps")
    _check(
        _is_int(accum) and accum >= 1, "train.grad_accum_steps", accum, "must be an integer >= 1"
    )
    chunk = get_optional(config, "train.logps_chunk_size")
    _check(
        _is_int(chunk) and chunk >= 0,
        "train.logps_chunk_size",
        chunk,
        "must be an integer >= 0 (0 = off)",
    )
    packing = get_optional(config, "data.packing")
    _check(packing in PACKING_LAYOUTS, "data.packing", packing, f"must be one of {PACKING_LAYOUTS}")
    pack_length = get_optional(config, "data.pack_length")
    _check(
        _is_int(pack_length) and pack_length >= 0,
        "data.pack_length",
        pack_length,
        "must be an integer >= 0 (0 = the bucket of the batch's longest segment)",
    )
    if not source:
        try:
            model_config = LlamaConfig(
                **{k: v for k, v in config.model.items() if k != "pretrained"}
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model: {e}") from None

    _validate_data(config)
    if not source:
        check_model_fits_data(config, model_config)
    _validate_resume_keys(config)

    try:
        shape = sharding.mesh_shape(config.mesh, num_devices)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    rules = get_optional(config, "mesh.rules")
    problem = sharding.check_rules(rules)
    _check(problem is None, "mesh.rules", rules, problem)
    dp = shape[0] * shape[1]
    for key in ("train.batch_size", "train.eval_batch_size"):
        v = _get(config, key)
        _check(
            v % dp == 0,
            key,
            v,
            f"must be divisible by the data-parallel size mesh.data*mesh.fsdp={dp}",
        )

    _check(
        t.batch_size % (accum * dp) == 0,
        "train.batch_size",
        t.batch_size,
        f"must be divisible by train.grad_accum_steps * mesh.data * mesh.fsdp = {accum} * {dp} "
        "(every microbatch is split over the data-parallel devices)",
    )


def longest_sequence(config) -> tuple[str, int]:
    """(key, value) of the data's longest sequence in tokens: ``data.max_length``, or for the
    synthetic task BOS + ``data.max_prompt_len`` + SEP + ``data.response_len``."""
    d = config.data
    if d.source == "synthetic":
        return "the synthetic sequence length (data.max_prompt_len + data.response_len + 2)", (
            synthetic.seq_len(max_prompt_len=d.max_prompt_len, response_len=d.response_len)
        )
    return "data.max_length", d.max_length


def check_model_fits_data(config, model_config) -> None:
    """ConfigError when the data is longer than the model's context
    (``max_position_embeddings``) or the synthetic task needs more tokens than the model's
    vocabulary has. Runs in ``validate`` for models from scratch and after a pretrained
    model's config is read (``training.loop.load_data``)."""
    key, length = longest_sequence(config)
    context = getattr(model_config, "max_position_embeddings", None)
    if context is not None and length > context:
        where = "model.max_position_embeddings"
        if get_optional(config, "model.pretrained"):
            where = f"the context of model.pretrained={get_optional(config, 'model.pretrained')!r}"
        raise ConfigError(
            f"{key}={length}: longer than {where}={context}; shorten the data or use a model "
            "with a longer context"
        )
    if config.data.source == "synthetic":
        need = synthetic.FIRST_CONTENT + synthetic.MIN_CONTENT_TOKENS
        _check(
            model_config.vocab_size >= need,
            "model.vocab_size",
            model_config.vocab_size,
            f"too small for the synthetic task (needs >= {need}: pad, BOS, SEP and "
            f"{synthetic.MIN_CONTENT_TOKENS} content tokens)",
        )


def _validate_synthetic(config) -> None:
    d = config.data
    for key in ("num_train", "num_eval", "min_prompt_len", "max_prompt_len", "response_len"):
        _get(config, f"data.{key}")
    for key, low in (("num_train", 1), ("num_eval", 1), ("min_prompt_len", 1)):
        v = d[key]
        _check(_is_int(v) and v >= low, f"data.{key}", v, f"must be an integer >= {low}")
    _check(
        _is_int(d.max_prompt_len) and d.max_prompt_len >= d.min_prompt_len,
        "data.max_prompt_len",
        d.max_prompt_len,
        f"must be an integer >= data.min_prompt_len={d.min_prompt_len}",
    )
    _check(
        _is_int(d.response_len) and d.response_len >= 2,
        "data.response_len",
        d.response_len,
        "must be an integer >= 2 (the rejected response differs in 1 .. response_len // 2 "
        "positions)",
    )
    batch = config.train.batch_size
    _check(
        d.num_train >= batch,
        "train.batch_size",
        batch,
        f"is more than the data.num_train={d.num_train} training examples (fewer than one batch)",
    )
    vocab = config.model.get("vocab_size") if not get_optional(config, "model.pretrained") else None
    if _is_int(vocab) and vocab >= synthetic.FIRST_CONTENT + synthetic.MIN_CONTENT_TOKENS:
        prompts = synthetic.num_prompts(
            vocab_size=vocab,
            min_prompt_len=d.min_prompt_len,
            max_prompt_len=d.max_prompt_len,
            limit=d.num_train + d.num_eval,
        )
        _check(
            d.num_train + d.num_eval <= prompts,
            "data.num_train",
            d.num_train,
            f"with data.num_eval={d.num_eval} exceeds the {prompts} distinct prompts of "
            f"{d.min_prompt_len}..{d.max_prompt_len} tokens over {vocab - synthetic.FIRST_CONTENT} "
            "content tokens (raise model.vocab_size or data.max_prompt_len)",
        )


def _validate_loss_types(config) -> None:
    """loss.type (one type or TRL's list) and the TRL options that go with it."""
    lo, known = config.loss, losses.LOSS_TYPES + UNPAIRED_LOSSES + SFT_LOSSES
    raw = lo.type
    ok = isinstance(raw, str) or (
        isinstance(raw, (list, tuple)) and all(isinstance(t, str) for t in raw)
    )
    _check(ok, "loss.type", raw, "must be a loss name, a comma-separated list or a list of names")
    types = loss_types(raw)
    for t in types:
        where = "must be" if len(types) == 1 else f"has {t!r}; each entry must be"
        _check(t in known, "loss.type", raw, f"{where} one of {', '.join(known)}")
    paired = types not in (UNPAIRED_LOSSES, SFT_LOSSES)
    _check(
        not (len(types) > 1 and "kto" in types),
        "loss.type",
        raw,
        "kto (unpaired) cannot be combined with other losses",
    )
    weights = get_optional(config, "loss.weights")
    _check(
        isinstance(weights, (list, tuple))
        and all(_is_num(w) and w >= 0 for w in weights)
        and len(weights) in (0, len(types)),
        "loss.weights",
        weights,
        f"must be () or {len(types)} number(s) >= 0, one per loss.type entry ({', '.join(types)})",
    )
    rpo = get_optional(config, "loss.rpo_alpha")
    _check(_is_num(rpo) and rpo >= 0, "loss.rpo_alpha", rpo, "must be a number >= 0 (0 = off)")
    _check(
        not rpo or paired,
        "loss.rpo_alpha",
        rpo,
        f"adds the chosen NLL to a paired loss; loss.type={raw!r} has none",
    )
    ld = get_optional(config, "loss.ld_alpha")
    _check(_is_num(ld) and 0 <= ld <= 1, "loss.ld_alpha", ld, "must be in [0, 1] (1 = off)")
    _check(
        ld == 1 or paired,
        "loss.ld_alpha",
        ld,
        f"weights the tokens past a pair's shared length; loss.type={raw!r} is not paired",
    )
    wpo = get_optional(config, "loss.use_weighting")
    _check(isinstance(wpo, bool), "loss.use_weighting", wpo, "must be True or False")
    if wpo:
        _check(paired, "loss.use_weighting", wpo, f"weights pairs; loss.type={raw!r} is not paired")
        bad = [t for t in types if t in _SORTING_LOSSES + ("kto_pair",)]
        _check(
            not bad,
            "loss.use_weighting",
            wpo,
            f"not for {', '.join(bad)}: aot/aot_unpaired sort the batch (per-pair weights would "
            "be misaligned, as TRL says) and kto_pair's terms are not per pair",
        )
    tr_enabled = config.trust_region.enabled is True
    free = get_optional(config, "loss.reference_free")
    _check(isinstance(free, bool), "loss.reference_free", free, "must be True or False")
    if free:
        _check(paired, "loss.reference_free", free, f"is for paired losses, not {raw!r}")
        _check(
            not tr_enabled,
            "loss.reference_free",
            free,
            "leaves no reference for the trust region to update; set trust_region.enabled=False",
        )
    bco = get_optional(config, "loss.bco_running_mean")
    _check(isinstance(bco, bool), "loss.bco_running_mean", bco, "must be True or False")
    pre = get_optional(config, "loss.precompute_ref_log_probs")
    _check(isinstance(pre, bool), "loss.precompute_ref_log_probs", pre, "must be True or False")
    if pre:
        _check(
            not tr_enabled,
            "loss.precompute_ref_log_probs",
            pre,
            "cannot be used with a trust region: the reference changes every trust_region.tau "
            "steps, so log-probs computed before training go stale",
        )
        _check(
            False,
            "loss.precompute_ref_log_probs",
            pre,
            "is not supported: the frozen reference's forward runs inside the train step (one "
            "forward, no backward); set it False (or loss.reference_free=True for no reference)",
        )

def _validate_lora(config) -> None:
    """The ``lora.*`` keys and ``trust_region.lora_mode`` (targets that match no parameter of
    the model are refused when the model is known: ``tr_align.lora.Lora.check_targets``)."""
    rank = get_optional(config, "lora.rank")
    _check(_is_int(rank) and rank >= 0, "lora.rank", rank, "must be an integer >= 0 (0 = off)")
    mode = get_optional(config, "trust_region.lora_mode")
    _check(mode in lora.MODES, "trust_region.lora_mode", mode, f"must be one of {lora.MODES}")
    alpha = get_optional(config, "lora.alpha")
    _check(_is_num(alpha) and alpha > 0, "lora.alpha", alpha, "must be a number > 0")
    drop = get_optional(config, "lora.dropout")
    _check(_is_num(drop) and 0 <= drop < 1, "lora.dropout", drop, "must be in [0, 1)")
    base_dtype = get_optional(config, "lora.base_dtype")
    _check(
        base_dtype in dtypes.NAMES,
        "lora.base_dtype",
        base_dtype,
        f"must be {' or '.join(map(repr, dtypes.NAMES))}",
    )
    targets = get_optional(config, "lora.targets")
    ok = isinstance(targets, (list, tuple)) and targets and all(isinstance(t, str) for t in targets)
    _check(ok, "lora.targets", targets, "must be a non-empty list of regexes over parameter paths")
    for t in targets:
        try:
            re.compile(t)
        except re.error as e:
            raise ConfigError(f"lora.targets: {t!r} is not a regex ({e})") from None


def _validate_resume_keys(config) -> None:
    """The numerics guard and the schedule record of a resumed run (tr_align.training.resume)."""
    bad = get_optional(config, "train.max_bad_steps")
    _check(_is_int(bad) and bad >= 1, "train.max_bad_steps", bad, "must be an integer >= 1")
    ext = get_optional(config, "optimizer.schedule_extensions")
    ok = isinstance(ext, (list, tuple)) and all(
        isinstance(e, (list, tuple))
        and len(e) == 3
        and _is_int(e[0])
        and e[0] >= 0
        and _is_int(e[1])
        and e[1] >= 1
        and _is_num(e[2])
        and e[2] >= 0
        for e in ext
    )
    _check(
        ok,
        "optimizer.schedule_extensions",
        ext,
        "must be a list of [resume step >= 0, steps >= 1, epochs >= 0] (written by a resume)",
    )


def _validate_data(config) -> None:
    d = config.data
    _check(d.source in DATA_SOURCES, "data.source", d.source, f"must be one of {DATA_SOURCES}")
    if d.source == "synthetic":
        path = d.get("path", "")
        _check(
            not path,
            "data.path",
            path,
            "is set, but data.source='synthetic' trains on the built-in task and ignores it; set "
            "data.source=files (or hub, tfds) to train on it",
        )
        _validate_synthetic(config)
        return
    for key in ("path", "format", "split", "max_length", "max_prompt_length", "on_bad_row"):
        _get(config, f"data.{key}")
    path = d.path
    _check(
        bool(path) and (isinstance(path, str) or all(isinstance(p, str) for p in path)),
        "data.path",
        path,
        "must name a file/glob/list (files), a dataset (hub) or a builder (tfds)",
    )
    allowed = formats.PAIRED_FORMATS + formats.UNPAIRED_FORMATS
    _check(d.format in allowed, "data.format", d.format, f"must be one of {allowed}")
    _check(
        _is_int(d.max_length) and d.max_length >= 2,
        "data.max_length",
        d.max_length,
        "must be an integer >= 2",
    )
    _check(
        _is_int(d.max_prompt_length) and 0 <= d.max_prompt_length < d.max_length,
        "data.max_prompt_length",
        d.max_prompt_length,
        f"must be an integer in [0, data.max_length={d.max_length}) (0 = never truncate)",
    )
    _check(
        d.on_bad_row in ("skip", "error"), "data.on_bad_row", d.on_bad_row, "must be skip or error"
    )
    mode = get_optional(config, "data.truncation_mode")
    _check(
        mode in TRUNCATION_MODES,
        "data.truncation_mode",
        mode,
        f"must be one of {', '.join(TRUNCATION_MODES)} (TRL's truncation_mode)",
    )
    if not get_optional(config, "data.eval_split"):
        f = get_optional(config, "data.eval_fraction")
        _check(
            _is_num(f) and 0 < f < 1,
            "data.eval_fraction",
            f,
            "must be in (0, 1) when data.eval_split is empty",
        )
    buckets = tuple(get_optional(config, "data.buckets") or ())
    _check(
        all(_is_int(b) and b >= 2 for b in buckets)
        and (not buckets or max(buckets) >= d.max_length),
        "data.buckets",
        buckets,
        f"must be integers >= 2 whose largest is >= data.max_length={d.max_length} (or empty)",
    )
    gw = get_optional(config, "data.group_window")
    _check(_is_int(gw) and gw >= 0, "data.group_window", gw, "must be an integer >= 0")
    if d.format in formats.UNPAIRED_FORMATS:
        _check(
            is_unpaired(config.loss),
            "loss.type",
            config.loss.type,
            f"data.format={d.format!r} is unpaired: use loss.type='kto'",
        )


# data.* keys that only real data (data.source != 'synthetic') reads: set with the synthetic
# task they do nothing (``warnings``). The DEFAULTS ones are flagged when they differ from
# their default, the others when the caller says they were set (``set_keys``).
REAL_DATA_KEYS = (
    "data.path",
    "data.format",
    "data.split",
    "data.max_length",
    "data.max_prompt_length",
    "data.on_bad_row",
    "data.cache_dir",
    "data.fields",
    "data.tokenizer",
    "data.chat_template",
    "data.data_dir",
    "data.eval_split",
    "data.eval_fraction",
    "data.buckets",
)
# A peak learning rate at or above this with model.pretrained is a from-scratch one
# (configs/default.py's 1e-3); fine-tuning uses ~1e-7 .. 1e-5 (TRL's DPO default: 1e-6).
PRETRAINED_LEARNING_RATE = 1e-4


def warnings(config, total_steps: int, set_keys=()) -> list[str]:
    """One-line warnings (without the ``tr-align: warning:`` prefix) for settings of a valid
    ``config`` that silently do nothing or look like a mistake, for a run of ``total_steps``
    optimizer steps. ``set_keys``: dotted keys the user set explicitly (the CLI's
    ``--config.KEY`` overrides), so that a real-data key set with the synthetic task is
    flagged even when the recipe holds it."""
    out = []
    tr = config.trust_region
    if tr.enabled and config.loss.type not in SFT_LOSSES and tr.tau > total_steps:
        out.append(
            f"trust_region.tau={tr.tau} is more than the run's {total_steps} steps: the reference "
            "is never updated (a frozen-reference run); lower trust_region.tau"
        )
    source = get_optional(config, "model.pretrained")
    lr = config.optimizer.learning_rate
    if source and lr >= PRETRAINED_LEARNING_RATE:
        out.append(
            f"optimizer.learning_rate={lr:g} with model.pretrained={source!r}: a from-scratch "
            "learning rate; fine-tuning a pretrained model usually takes 1e-7 .. 1e-5 "
            "(TRL's DPO default: 1e-6)"
        )
    t = config.train
    if t.eval_every_steps > total_steps:
        out.append(
            f"train.eval_every_steps={t.eval_every_steps} is more than the run's {total_steps} "
            "steps: held-out metrics only at step 0 and at the end"
        )
    if t.log_every_steps > total_steps:
        out.append(
            f"train.log_every_steps={t.log_every_steps} is more than the run's {total_steps} "
            "steps: train metrics only at the last step"
        )
    if config.data.source == "synthetic":
        unused = []
        for key in REAL_DATA_KEYS:
            name = key.split(".")[1]
            if name not in config.data:
                continue
            value = config.data[name]
            changed = (
                key in DEFAULTS and key not in _RECIPE_DIFFERS and value != DEFAULTS[key].value
            )
            if key in set_keys or changed:
                unused.append(f"{key}={defaults_plain(value)!r}")
        if unused:
            out.append(
                f"{', '.join(unused)}: real-data settings; data.source='synthetic' ignores them "
                "(set data.source=files, hub or tfds to use them)"
            )
    return out


# DEFAULTS keys whose configs/default.py value differs from the table's (the default for a
# recipe that leaves them out): only an explicit setting of them is flagged.
_RECIPE_DIFFERS = ("data.fields", "data.eval_fraction")
