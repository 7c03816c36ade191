"""Resume compatibility: the saved ``config.json`` against the new config, before anything
is written.

A workdir with checkpoints is resumed only with a config that means the same run. Every key
whose value differs (``flat`` dotted names; an absent optional key counts as its
``tr_align.defaults`` value) falls in one of three classes (``kind``):

* ``harmless`` — accepted silently, the new value applies from the resumed step: logging,
  eval and checkpoint cadence (``train.log_every_steps``, ``train.eval_every_steps``,
  ``train.eval_batch_size``, ``checkpoint.*``), the mesh (``mesh.*``: a checkpoint restores
  into any sharding), the memory levers that compute the same step (``model.remat``,
  ``train.logps_chunk_size``), ``train.max_bad_steps``, ``data.cache_dir`` and the metric
  sinks (``logging.*``);
* ``override`` — refused unless named in ``allow`` (``tr-align train
  --allow_config_change=KEY,KEY``): the run's length (``train.steps``, ``train.epochs``), the
  optimizer's values (``optimizer.learning_rate``, ``end_lr_factor``, ``weight_decay``,
  ``b1``, ``b2``, ``eps``, ``max_grad_norm``), the loss's values (``loss.*`` but its type),
  the trust region (``trust_region.enabled``, ``alpha``, ``tau``), ``train.grad_accum_steps``,
  ``model.dtype`` and the exact batch layouts (``data.packing``, ``data.pack_length``,
  ``data.buckets``); and any key not listed here;
* ``never`` — refused even when named in ``allow`` (start a new ``--workdir``): the model
  (``model.*``: shapes, the starting model), ``loss.type``, ``loss.reference_free`` and
  ``loss.bco_running_mean`` (what the state holds), ``trust_region.ref_dtype``,
  LoRA (``lora.*``, ``trust_region.lora_mode``: what the checkpoint's adapters are),
  ``train.seed``, ``train.batch_size``, the data (``data.*`` but the keys above: what the
  saved data position indexes), the schedule's shape (``optimizer.schedule``,
  ``optimizer.warmup_steps``), and ``optimizer.max_grad_norm`` turning clipping on or off
  (the optimizer state's structure).

An accepted value applies as if the run had been configured with it from the start (a new
``optimizer.learning_rate`` scales the remaining schedule), except the run's length: a
resume at step S that changes the total steps (``train.steps`` / ``train.epochs``) keeps the
learning rate continuous. The schedule is the old one up to max(S, warmup) and from there
decays, with the same shape, from its value there to the end value at the new last step
(``optimizer.schedule_extensions`` records [S, old steps, old epochs] in the config, so a
later resume rebuilds the same schedule). A finished run that is lengthened goes on at its
end learning rate.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os

from tr_align import defaults
from tr_align.errors import ConfigError, RunDirError
from tr_align.training import checkpoint

CONFIG_FILE = "config.json"  # tr_align.io.rundir.CONFIG_FILE (the loop writes it)
ALLOW_FLAG = "--allow_config_change"
EXTENSIONS_KEY = "optimizer.schedule_extensions"  # kept from the saved config, never compared

# A name ending in "." is a block prefix; the first matching table (in this order) wins.
HARMLESS = (
    "train.log_every_steps",
    "train.eval_every_steps",
    "train.eval_batch_size",
    "train.max_bad_steps",
    "train.logps_chunk_size",
    "model.remat",
    "checkpoint.",
    "logging.",
    "mesh.",
    "data.cache_dir",
)
OVERRIDE = ("model.dtype", "data.packing", "data.pack_length", "data.buckets")
NEVER = (
    "model.",
    "loss.type",
    "loss.reference_free",  # whether the state holds a reference
    "loss.bco_running_mean",  # whether the state holds the running mean
    "trust_region.ref_dtype",
    "trust_region.lora_mode",
    "lora.",
    "train.seed",
    "train.batch_size",
    "data.",
    "optimizer.schedule",
    "optimizer.warmup_steps",
)
LENGTH_KEYS = ("train.steps", "train.epochs")
_ABSENT = "<absent>"


def _matches(key: str, table) -> bool:
    return any(key.startswith(n) if n.endswith(".") else key == n for n in table)


def kind(key: str, old=None, new=None) -> str:
    """``"harmless"``, ``"override"`` or ``"never"`` for a change of ``key`` (module doc)."""
    if key == "optimizer.max_grad_norm":
        clips = [isinstance(v, (int, float)) and v > 0 for v in (old, new)]
        return "never" if clips[0] != clips[1] else "override"
    for name, table in (("harmless", HARMLESS), ("override", OVERRIDE), ("never", NEVER)):
        if _matches(key, table):
            return name
    return "override"


def flat(tree, prefix: str = "") -> dict:
    """Nested dicts -> ``{"block.key": value}`` (lists and other values are leaves)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def as_dict(config) -> dict:
    """A config (ConfigDict or dict) as the plain JSON values ``config.json`` holds."""
    return json.loads(config.to_json() if hasattr(config, "to_json") else json.dumps(config))


@dataclasses.dataclass(frozen=True)
class Change:
    key: str
    old: object
    new: object
    kind: str

    def describe(self) -> str:
        return f"{self.key} {self.old!r} -> {self.new!r}"


def compare(old: dict, new: dict) -> list[Change]:
    """The differing keys of two configs (plain dicts), sorted by key."""
    a, b = flat(old), flat(new)
    changes = []
    for key in sorted(set(a) | set(b)):
        if key == EXTENSIONS_KEY:
            continue
        default = defaults.DEFAULTS[key].value if key in defaults.DEFAULTS else _ABSENT
        default = json.loads(json.dumps(default))  # tuples -> lists, as in config.json
        x, y = a.get(key, default), b.get(key, default)
        if x != y:
            changes.append(Change(key, x, y, kind(key, x, y)))
    return changes


def parse_allow(allow) -> tuple[str, ...]:
    """``--allow_config_change`` as a tuple of keys: a comma-separated string or a list."""
    if isinstance(allow, str):
        allow = allow.split(",")
    return tuple(k.strip() for k in (allow or ()) if k.strip())


def prepare(config, workdir: str, *, allow=(), log=print):
    """The config to run in ``workdir``: ``config`` itself for a fresh run; on a resume (the
    workdir holds checkpoints) checked against the saved ``config.json`` (module doc) and
    returned as a copy that carries the run's ``optimizer.schedule_extensions`` (one more when
    the run's length changed). Raises a one-line ConfigError listing every refused key with
    its old and new values; reads only, writes nothing. ``log``: one line about the accepted
    changes (None = silent)."""
    allow = parse_allow(allow)
    new = as_dict(config)
    steps = checkpoint.saved_steps(workdir)
    path = os.path.join(workdir, CONFIG_FILE)
    if not steps:
        _check_allow_names(allow, flat(new), {})
        return config
    if not os.path.isfile(path):
        raise RunDirError(
            f"{path}: not found, but {checkpoint.directory(workdir)} holds checkpoints "
            f"{steps}: cannot check that the resumed run has this config (restore "
            "config.json or use a new --workdir)"
        )
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError) as e:
        raise RunDirError(f"{path}: unreadable ({e}); cannot check the resumed run") from None
    _check_allow_names(allow, flat(new), flat(old))
    step = steps[-1]
    changes = compare(old, new)
    refused = [
        c for c in changes if c.kind == "never" or (c.kind == "override" and c.key not in allow)
    ]
    if refused:
        never = [c.key for c in refused if c.kind == "never"]
        need = [c.key for c in refused if c.kind == "override"]
        hints = []
        if never:
            hints.append(f"{', '.join(never)} cannot change on resume (use a new --workdir)")
        if need:
            hints.append(f"to accept the others pass {ALLOW_FLAG}={','.join(need)}")
        raise ConfigError(
            f"{path}: resuming step {step} with a different config (nothing was written): "
            f"{'; '.join(c.describe() for c in refused)}. {'; '.join(hints)}"
        )
    out = _with_extensions(config, old, new, step, changes)
    if changes and log is not None:
        log(
            f"tr-align: resuming step {step} with config changes: "
            f"{'; '.join(c.describe() for c in changes)}"
        )
    return out


def _check_allow_names(allow, new_flat, old_flat):
    for key in allow:
        if key not in new_flat and key not in old_flat and key not in defaults.DEFAULTS:
            raise ConfigError(f"{ALLOW_FLAG}={key}: no such config key")


def _with_extensions(config, old, new, step, changes):
    """``config`` (a copy) with the saved schedule extensions, plus one at ``step`` when the
    run's length changed."""
    saved = [list(e) for e in defaults.get(old, EXTENSIONS_KEY)]
    if any(c.key in LENGTH_KEYS for c in changes):
        saved.append(
            [int(step), int(old["train"]["steps"]), float(defaults.get(old, "train.epochs"))]
        )
    if saved == [list(e) for e in defaults.get(new, EXTENSIONS_KEY)]:
        return config
    out = copy.deepcopy(config)
    if hasattr(out, "unlocked"):
        with out.unlocked():
            out.optimizer.schedule_extensions = saved
    else:
        out["optimizer"]["schedule_extensions"] = saved
    return out
