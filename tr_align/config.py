"""Config checks that run before any compute.

Every problem is reported as a one-line ``ConfigError`` naming the key, the
value and what is allowed, e.g.
``trust_region.alpha=1.5: must be in [0, 1]``.
"""

from __future__ import annotations

import math
import os

from tr_align import dtypes, losses, sharding
from tr_align.data import formats
from tr_align.defaults import DEFAULTS
from tr_align.defaults import get as get_optional
from tr_align.errors import ConfigError
from tr_align.io import pretrained
from tr_align.models import LlamaConfig
from tr_align.models.common import REMAT_POLICIES
from tr_align.training import optim

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
    "loss.type",
    "loss.beta",
    "loss.label_smoothing",
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


UNPAIRED_LOSSES = ("kto",)  # unpaired data (tr_align.training.objectives.KTO)
SFT_LOSSES = ("sft",)  # next-token loss on the chosen completions (objectives.SFT)
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
    _check(_is_int(t.seed), "train.seed", t.seed, "must be an integer")
    epochs = get_optional(config, "train.epochs")
    _check(
        _is_num(epochs) and epochs >= 0,
        "train.epochs",
        epochs,
        "must be a number >= 0 (0 = run train.steps steps)",
    )

    _check(
        lo.type in losses.LOSS_TYPES + UNPAIRED_LOSSES + SFT_LOSSES,
        "loss.type",
        lo.type,
        f"must be one of {', '.join(losses.LOSS_TYPES + UNPAIRED_LOSSES + SFT_LOSSES)}",
    )
    _check(_is_num(lo.beta) and lo.beta > 0, "loss.beta", lo.beta, "must be a number > 0")
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
            LlamaConfig(**{k: v for k, v in config.model.items() if k != "pretrained"})
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model: {e}") from None

    _validate_data(config)
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
            config.loss.type in UNPAIRED_LOSSES,
            "loss.type",
            config.loss.type,
            f"data.format={d.format!r} is unpaired: use loss.type='kto'",
        )
