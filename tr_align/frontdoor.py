"""The front door: ``tr-align dpo|ipo|kto|sft --model=M --data=D --workdir=O``.

One command from a pretrained model and a preference file to a trained Hugging Face model
(``O/hf``, with its tokenizer), the way ``trl dpo --model_name_or_path M --dataset_name D
--output_dir O`` works. ``prepare`` builds an ordinary run config (the keys of
``configs/default.py``) from the model, the data and defaults that suit a pretrained model;
``run`` trains it with the one training loop (``tr_align.training.loop.run``: resume, checks,
checkpoints as for ``tr-align train``) and exports the final policy (``tr_align.io.export``).

* ``--model``: a Hugging Face model directory, a hub id (``org/name``), a ``.gguf`` file or
  ``smollm2``; its tokenizer (or ``--data.tokenizer=...``) tokenizes the data.
* ``--data``: a local JSON / JSON Lines / Parquet file, a glob or folder, or a hub dataset
  (``NAME`` or ``NAME:CONFIG``). The record format is detected from the records
  (``detect_format``: ``hh``, ``tldr``, ``ultrafeedback``, ``generic``, ``kto``) unless
  ``--format`` says it.
* ``--tr``: ``soft`` (the paper's alpha 0.6, tau 1; the default), ``hard`` (alpha 1, tau
  ``hard_tau(steps)``), ``off`` (a frozen reference: vanilla DPO / IPO / KTO).
* ``--trl-config=dpo.yaml``: a TRL DPOConfig / KTOConfig YAML (``tr_align.trl_config``); its
  ``model_name_or_path`` / ``dataset_name`` / ``output_dir`` stand in for the flags.
* ``--KEY=VALUE``: any config key (``--loss.beta=0.05 --train.steps=200``), applied last.

Defaults (``FRONT_DOOR_DEFAULTS``; TRL's where TRL has one): learning rate 1e-6 (TRL's
DPOConfig / KTOConfig; 2e-5 for sft, TRL's SFTConfig) with a linear warmup over the first 10%
of the steps and linear decay, beta 0.1, AdamW as in TRL, max_grad_norm 1, 3 epochs, seed 42,
``data.max_length`` 1024 (the model's context if shorter) with ``data.max_prompt_length`` half
of it, a batch of 8 pairs (fewer for a smaller file), and 10% of the rows (at least one) held
out for the held-out metrics (a hub dataset's ``test`` split when it has one).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections import Counter

import ml_collections

from tr_align import config as config_lib
from tr_align import defaults, hf, sharding, trl_config, trust_region
from tr_align.data import formats, sources
from tr_align.errors import ConfigError, DataError
from tr_align.io import pretrained

# command -> loss.type
METHODS = {"dpo": "sigmoid", "ipo": "ipo", "kto": "kto", "sft": "sft"}
# --tr -> the trust_region block (hard: tau is set from the run's length, ``hard_tau``)
TR_MODES = {
    "soft": trust_region.PRESETS["tr-soft"],
    "hard": trust_region.PRESETS["tr-hard"],
    "off": trust_region.PRESETS["vanilla"],
}
FLAGS = ("model", "data", "workdir", "tr", "format", "trl-config")
HF_DIR = "hf"  # the exported model: WORKDIR/hf

FRONT_DOOR_DEFAULTS = {
    "learning_rate": {"dpo": 1e-6, "ipo": 1e-6, "kto": 1e-6, "sft": 2e-5},
    "epochs": 3.0,  # TRL's num_train_epochs
    "warmup_ratio": 0.1,
    "batch_size": 8,  # TRL's per_device_train_batch_size
    "eval_fraction": 0.1,
    "max_length": 1024,  # TRL's max_length
    "seed": 42,  # TRL's seed
    "every_steps_cap": 500,  # eval / checkpoint at least this often (and at the end)
}

USAGE = """\
usage: tr-align dpo|ipo|kto|sft --model=M --data=D --workdir=O [--tr=soft|hard|off]
       [--format=hh|tldr|ultrafeedback|generic|kto] [--trl-config=dpo.yaml] [--KEY=VALUE ...]

  --model       Hugging Face model directory, hub id (org/name), .gguf file or smollm2
  --data        JSON / JSON Lines / Parquet file, glob or folder, or a hub dataset (NAME[:CONFIG])
  --workdir     run directory; the trained model is written to WORKDIR/hf (rerun to resume)
  --tr          trust region: soft (alpha 0.6, tau 1; default), hard (alpha 1, tau ~ steps/4),
                off (frozen reference: vanilla DPO/IPO/KTO)
  --format      record format (default: detected from the records)
  --trl-config  a TRL DPOConfig/KTOConfig YAML (model_name_or_path, dataset_name, output_dir,
                beta, learning_rate, ...; see docs/switching.md)
  --KEY=VALUE   any config key, e.g. --loss.beta=0.05 --train.steps=200 --model.dtype=bfloat16

Then: tr-align generate --model=WORKDIR/hf --chat --prompt="..."
A config file instead: tr-align train --config=FILE --workdir=DIR (tr-align sft --config=FILE
trains it with loss.type=sft).
"""


@dataclasses.dataclass
class Plan:
    """A prepared front-door run: the config ``loop.run`` trains, and what to print."""

    config: ml_collections.ConfigDict
    workdir: str
    lines: list[str]  # what was chosen, and why (printed before training)
    # the records of data.split as prepare read them: ``run`` hands them to the data pipeline,
    # so that the file is read and parsed once (None: the pipeline reads it)
    records: list | None = None


# ------------------------------------------------------------------------- arguments


def parse_args(args) -> tuple[dict, dict]:
    """``(options, overrides)`` of the front door's flags (``args``: after the command).

    ``options``: the ``FLAGS`` (``trl-config`` also spelt ``trl_config``) and ``help``;
    ``overrides``: ``--KEY=VALUE`` of dotted config keys, as text (typed by ``prepare``).
    A flag may be ``--name=value`` or ``--name value``; anything else is a ConfigError.
    """
    options, overrides, args = {}, {}, list(args)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg in ("-h", "--help", "--helpfull"):
            options["help"] = True
            continue
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"{arg!r}: expected --FLAG=VALUE (see tr-align dpo --help)")
        name, eq, value = arg[2:].partition("=")
        name = name.replace("_", "-") if name.replace("_", "-") in FLAGS else name
        if "." in name:
            if not eq:
                raise ConfigError(f"--{name}: expected --{name}=VALUE")
            overrides[name] = value
            continue
        if name == "config" or name.startswith("config."):
            raise ConfigError(
                "--config: the front door builds its config from --model and --data; for a "
                "config file use tr-align train --config=FILE (or sft --config=FILE)"
            )
        if name not in FLAGS:
            close = difflib.get_close_matches(name, FLAGS, n=1)
            hint = f"did you mean --{close[0]}?" if close else f"flags: --{', --'.join(FLAGS)}"
            raise ConfigError(f"--{name}: unknown flag; {hint} (config keys: --KEY.NAME=VALUE)")
        if not eq:
            if i >= len(args) or args[i].startswith("--"):
                raise ConfigError(f"--{name}: expected a value (--{name}=VALUE)")
            value = args[i]
            i += 1
        options[name] = value
    return options, overrides


def base_config(method: str) -> ml_collections.ConfigDict:
    """The front door's config before the model and the data are known: the recipes' base
    (``config.recipe_base``, which ``configs/default.py`` starts from too) with defaults that
    suit a pretrained model on real data (``FRONT_DOOR_DEFAULTS``); ``prepare`` sets the rest
    (``model.pretrained``, ``data.path``, the batch, the run's length, cadences, lengths)."""
    if method not in METHODS:
        raise ConfigError(f"{method!r}: expected one of {', '.join(METHODS)}")
    d = FRONT_DOOR_DEFAULTS
    c = config_lib.recipe_base()
    c.trust_region.update(TR_MODES["soft"] if method != "sft" else TR_MODES["off"])
    c.data.update(dict(source="files", eval_fraction=d["eval_fraction"]))
    c.data.max_length = d["max_length"]  # data.max_prompt_length: half of it
    c.train.update(
        dict(
            steps=1,
            batch_size=d["batch_size"],
            eval_batch_size=d["batch_size"],
            seed=d["seed"],
            eval_every_steps=1,
        )
    )
    c.optimizer.update(dict(learning_rate=d["learning_rate"][method], warmup_steps=0))
    c.loss.type = METHODS[method]
    c.checkpoint.every_steps = 1
    return c


def parse_value(config, key: str, text: str):
    """The ``--KEY=VALUE`` text as the type of ``config``'s current value (ConfigError for an
    unknown key, with a suggestion, or a value of the wrong type)."""
    problem = config_lib.unknown_key(config, key)
    if problem is not None:
        raise ConfigError(problem)
    node = config
    for part in key.split("."):
        node = node[part]
    current = node
    if isinstance(current, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"{key}={text!r}: expected true or false")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r}: expected an integer") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r}: expected a number") from None
    if isinstance(current, str):
        return text
    import ast

    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(current, (tuple, list)) and isinstance(value, (str, int, float)):
        value = tuple(v.strip() for v in str(value).split(",") if v.strip())
    return tuple(value) if isinstance(value, list) else value


def _set(config, key: str, value) -> None:
    *path, last = key.split(".")
    node = config
    for part in path:
        node = node[part]
    with node.ignore_type():  # e.g. loss.type may be a tuple of types (combined losses)
        node[last] = value


def _get(config, key: str):
    node = config
    for part in key.split("."):
        node = node[part]
    return node


# ------------------------------------------------------------------------- the data


def data_source(data: str) -> tuple[str, str]:
    """``(data.source, data.path)`` of ``--data``: local files (an existing path, a glob or a
    name with a data file extension) or a hub dataset."""
    if any(c in data for c in "*?[") or os.path.exists(data):
        return "files", data
    lower = data.lower()
    if lower.endswith((".json", ".jsonl", ".parquet", ".json.gz", ".jsonl.gz")):
        return "files", data  # sources names the missing file
    if data.startswith((".", "/", "~")):
        raise DataError(f"{data}: no such file or folder")
    return "hub", data


def record_format(record) -> str | None:
    """The ``data.format`` a record looks like, or None.

    >>> record_format({"prompt": "2+2=", "chosen": " 4", "rejected": " 5"})
    'generic'
    >>> record_format({"chosen": "\\n\\nHuman: Hi\\n\\nAssistant: Hello", "rejected": "..."})
    'hh'
    >>> record_format({"prompt": "Hi", "completion": " Hello", "label": True})
    'kto'
    """
    if not isinstance(record, dict):
        return None
    keys = set(record)
    if {"info", "summaries", "choice"} <= keys:
        return "tldr"
    if {"prompt", "completion", "label"} <= keys:
        return "kto"
    if not {"chosen", "rejected"} <= keys:
        return None
    chosen = record["chosen"]
    if "prompt" not in keys:
        if isinstance(chosen, str):
            return "hh" if chosen.lstrip().startswith("Human:") else None
        return "ultrafeedback" if isinstance(chosen, list) else None  # the prompt: shared turns
    prompt = record["prompt"]
    if (
        isinstance(prompt, str)
        and isinstance(chosen, list)
        and chosen
        and isinstance(chosen[0], dict)
        and chosen[0].get("role") == "user"
    ):
        return "ultrafeedback"  # whole conversations beside a string prompt
    return "generic"


def detect_format(records, *, fields=None, sample: int = 100) -> str:
    """The most common ``record_format`` of the first ``sample`` records (seen through
    ``fields``, ``data.fields``: our name -> the record's key); DataError naming the first
    record and its keys when none looks like a known format."""
    renamed = {theirs: ours for ours, theirs in (fields or {}).items() if theirs != ours}

    def view(record):
        if not renamed or not isinstance(record, dict):
            return record
        return {renamed.get(k, k): v for k, v in record.items()}

    counts = Counter(f for r, _ in records[:sample] if (f := record_format(view(r))) is not None)
    if counts:
        return counts.most_common(1)[0][0]
    record, origin = records[0]
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise DataError(
        f"{origin}: cannot tell the record format from its keys {keys}; expected prompt/chosen/"
        "rejected (generic; strings or chat messages), chosen/rejected chat messages or "
        "'\\n\\nHuman: ...' transcripts (hh), info/summaries/choice (tldr) or prompt/completion/"
        "label (kto); rename fields with --data.fields.prompt=KEY ... or give --format"
    )


def _usable(records, fmt, fields) -> int:
    n = 0
    for record, _ in records:
        try:
            formats.convert(record, fmt, fields)
            n += 1
        except (formats.BadRow, ValueError):
            pass
    return n


def _hub_has_split(path: str, split: str) -> bool:
    try:
        import datasets

        repo, config = path, None
        if ":" in path:
            repo, config = path.rsplit(":", 1)
        return split in datasets.get_dataset_split_names(repo, config)
    except Exception:  # noqa: BLE001 - offline, unknown: hold out a share instead
        return False


def model_context(source: str) -> int | None:
    """``max_position_embeddings`` of a pretrained source, read from its config (a GGUF
    file's metadata) without loading the weights; None when it cannot be read here."""
    try:
        if pretrained.is_gguf(source):
            import gguf as gguf_lib

            from tr_align.io import gguf

            path = gguf.smollm2_gguf_path() if source == "smollm2" else source
            return int(gguf.config_from_gguf(gguf_lib.GGUFReader(path)).max_position_embeddings)
        local = pretrained.resolve(source)
        model_config = hf.config_from_hf(hf.read_config(local), os.path.join(local, "config.json"))
        return getattr(model_config, "max_position_embeddings", None)
    except (OSError, ValueError, KeyError):
        return None  # the loop reports the model's problem in its own words


# ------------------------------------------------------------------------- the plan


def hard_tau(steps: int) -> int:
    """``--tr=hard``'s tau: a reference copy every quarter of the run (4 updates), at most
    every 512 steps (the paper's largest tau) for long runs, at least every step."""
    return max(1, min(512, steps // 4))


def prepare(method: str, options: dict, overrides: dict, *, num_devices: int | None = None):
    """The ``Plan`` of ``tr-align METHOD`` with ``options`` / ``overrides`` (``parse_args``):
    reads the records once to detect their format and count them (kept in ``Plan.records``
    for the data pipeline, which reads no file again), then sets the batch, the run's length,
    warmup, eval split, lengths and the trust region to fit them."""
    if num_devices is None:
        import jax

        num_devices = jax.device_count()
    config = base_config(method)
    lines, notes = [], []
    explicit: dict = {}
    yaml_opts: dict = {}
    tr = options.get("tr")
    if tr is not None and tr not in TR_MODES:
        raise ConfigError(f"--tr={tr}: expected soft, hard or off")
    if method == "sft" and tr is not None:
        raise ConfigError("--tr: sft trains without a reference model (no trust region)")

    if options.get("trl-config"):
        dp0 = sharding.mesh_shape(config.mesh, num_devices)
        settings = trl_config.read(
            options["trl-config"],
            data_parallel=dp0[0] * dp0[1],
            known_keys=lambda k: config_lib.unknown_key(config, k) is None,
        )
        explicit.update(settings.config)
        yaml_opts = settings.options
        notes += settings.notes
        if tr is not None or method == "sft":  # --tr (or sft) decides the reference
            explicit = {k: v for k, v in explicit.items() if not k.startswith("trust_region.")}
        yaml_loss = explicit.get("loss.type")
        if method != "dpo" and yaml_loss is not None:  # ipo/kto/sft: the command's loss
            del explicit["loss.type"]
            if yaml_loss != METHODS[method]:
                notes.append(f"loss_type={yaml_loss!r} of the YAML: replaced by {method}'s loss")
    cli = {key: parse_value(config, key, text) for key, text in overrides.items()}
    epochs = cli.pop("train.epochs", None)
    explicit.update(cli)

    model = options.get("model") or yaml_opts.get("model")
    data = options.get("data") or yaml_opts.get("data")
    workdir = options.get("workdir") or yaml_opts.get("workdir")
    for name, value, what in (
        ("model", model, "a Hugging Face model directory, hub id, .gguf file or smollm2"),
        ("data", data, "a JSON/JSONL/Parquet file, glob or hub dataset"),
        ("workdir", workdir, "the run directory (the model is written to WORKDIR/hf)"),
    ):
        if not value:
            raise ConfigError(f"--{name} is required: {what} (tr-align {method} --help)")
    problem = pretrained.check_source(model)
    if problem is not None:
        raise ConfigError(f"--model={model}: {problem}")
    config.model.pretrained = model
    if tr is not None:
        config.trust_region.update(TR_MODES[tr])
    for key, value in explicit.items():
        _set(config, key, value)
    if tr is None and method != "sft":
        tr = "off" if not config.trust_region.enabled else "soft"
        if config.trust_region.enabled and config.trust_region.alpha == 1.0:
            tr = "hard"

    tokenizer = config.data.tokenizer or model
    if (
        not pretrained.is_gguf(tokenizer)
        and os.path.isdir(tokenizer)
        and not any(os.path.isfile(os.path.join(tokenizer, f)) for f in hf.TOKENIZER_FILES)
    ):
        flag = "--data.tokenizer" if config.data.tokenizer else "--model"
        raise ConfigError(
            f"{flag}={tokenizer}: the directory has no tokenizer files (tokenizer.json, ...); "
            "give one with --data.tokenizer=DIR|HUB_ID|FILE.gguf"
        )

    # --- the data: source, format, usable rows
    source, path = data_source(data)
    if yaml_opts.get("data_config") and source == "hub":
        path = f"{path}:{yaml_opts['data_config']}"
    config.data.source, config.data.path = source, path
    split = config.data.split
    records = sources.load_records(
        source, path, split, data_dir=defaults.get(config, "data.data_dir") or None
    )
    if not records:
        raise DataError(f"{path} [{split}]: holds no records")
    if options.get("format"):
        config.data.format = options["format"]
    elif "data.format" not in explicit:
        config.data.format = detect_format(records, fields=dict(config.data.fields))
    fmt = config.data.format
    allowed = formats.PAIRED_FORMATS + formats.UNPAIRED_FORMATS
    if fmt not in allowed:
        raise ConfigError(f"--format={fmt}: expected one of {', '.join(allowed)}")
    if fmt in formats.UNPAIRED_FORMATS and config.loss.type != "kto":
        raise ConfigError(
            f"{path}: the records are unpaired (prompt, completion, label): use tr-align kto"
        )
    fields = dict(config.data.fields) if fmt in ("generic", "kto") else None
    usable = _usable(records, fmt, fields)
    if usable == 0:
        raise DataError(
            f"{path}: none of the {len(records)} records is a usable {fmt} row (first: "
            f"{records[0][1]}); check the fields, or give --format"
        )

    # --- held-out rows
    if "data.eval_split" not in explicit and source == "hub":
        want = yaml_opts.get("eval_split") or "test"
        if _hub_has_split(path, want):
            config.data.eval_split = want
    if config.data.eval_split:
        n_train, eval_desc = usable, f"split {config.data.eval_split!r}"
    else:
        frac = config.data.eval_fraction
        n_eval = max(1, int(round(frac * usable)))
        n_train = usable - n_eval
        eval_desc = f"{n_eval} held out ({frac:g})"
        if n_train < 1:
            raise DataError(
                f"{path}: {usable} usable row(s); training needs at least 2 (one is held out "
                "for the held-out metrics)"
            )
    examples = 2 * n_train if config.loss.type == "kto" and fmt not in ("kto",) else n_train

    # --- the batch and the run's length
    shape = sharding.mesh_shape(config.mesh, num_devices)
    dp = shape[0] * shape[1]
    accum = config.train.grad_accum_steps
    unit = dp * accum
    if "train.batch_size" not in explicit:
        want = min(FRONT_DOOR_DEFAULTS["batch_size"], examples)
        config.train.batch_size = max(unit, want // unit * unit)
    batch = config.train.batch_size
    if batch > examples:
        raise DataError(
            f"{path}: {examples} training examples are fewer than one batch "
            f"(train.batch_size={batch}"
            + (f"; {dp} data-parallel devices need at least {unit}" if unit > 1 else "")
            + "); add rows or lower train.batch_size"
        )
    if "train.eval_batch_size" not in explicit:
        config.train.eval_batch_size = batch // accum
    if epochs is None:
        epochs = yaml_opts.get("epochs", FRONT_DOOR_DEFAULTS["epochs"])
    if "train.steps" not in explicit:
        if not (isinstance(epochs, (int, float)) and epochs > 0):
            raise ConfigError(f"train.epochs={epochs!r}: must be a number > 0")
        config.train.steps = max(1, int(epochs * examples) // batch)
        length = f"{epochs:g} epochs = {config.train.steps} steps"
    else:
        length = f"{config.train.steps} steps"
    config.train.epochs = 0.0
    steps = config.train.steps
    if "optimizer.warmup_steps" not in explicit:
        ratio = yaml_opts.get("warmup_ratio", FRONT_DOOR_DEFAULTS["warmup_ratio"])
        config.optimizer.warmup_steps = min(steps, int(math.ceil(ratio * steps)))
    for key, value in yaml_opts.items():  # TRL's logging/eval/save steps as a share of the run
        if key.startswith("ratio:") and key[6:] not in cli:
            _set(config, key[6:], max(1, int(round(value * steps))))
            explicit[key[6:]] = True
    cap = FRONT_DOOR_DEFAULTS["every_steps_cap"]
    for key, value in (
        ("train.log_every_steps", 1 if steps <= 100 else 10),
        ("train.eval_every_steps", max(1, min(steps, cap))),
        ("checkpoint.every_steps", max(1, min(steps, cap))),
    ):
        if key not in explicit:
            _set(config, key, value)

    # --- lengths: TRL's max_length, within the model's context
    context = model_context(model)
    if "data.max_length" not in explicit:
        longest = FRONT_DOOR_DEFAULTS["max_length"]
        if context is not None and context < longest:
            longest = context
            notes.append(f"data.max_length={context}: the context of {model}")
        config.data.max_length = longest
    if "data.max_prompt_length" not in explicit:
        config.data.max_prompt_length = config.data.max_length // 2

    # --- the trust region
    if tr == "hard" and "trust_region.tau" not in explicit:  # YAML / --KEY: theirs
        config.trust_region.tau = hard_tau(steps)
    t = config.trust_region
    if method == "sft":
        mode = "no reference (sft)"
    elif not t.enabled:
        mode = "frozen reference (--tr=off)"
    else:
        mode = f"TR {tr}: alpha {t.alpha:g}, tau {t.tau}"
        if tr == "hard" and "trust_region.tau" not in explicit:
            mode += f" (hard_tau: a reference copy every {t.tau} of {steps} steps)"

    o = config.optimizer
    lines.insert(
        0,
        f"tr-align {method}: {data} ({source}, format {fmt}"
        + (", detected" if not options.get("format") and "data.format" not in explicit else "")
        + f"): {usable} usable of {len(records)} records, {eval_desc}; {n_train} train rows",
    )
    lines.insert(
        1,
        f"  model {model}; {mode}; batch {batch}, {length}; lr {o.learning_rate:g} "
        f"(warmup {o.warmup_steps}, {o.schedule}), beta {config.loss.beta:g}; max_length "
        f"{config.data.max_length} (prompt {config.data.max_prompt_length})",
    )
    lines += [f"  note: {n}" for n in notes]
    return Plan(config=config, workdir=workdir, lines=lines, records=records)


def run(plan: Plan, *, progress: bool = True, devices=None) -> dict:
    """Trains ``plan`` with the training loop (resuming a run in ``plan.workdir``; the data
    pipeline starts from ``plan.records``, the records ``prepare`` read) and, when the run
    reached its last step, exports the policy with its tokenizer to WORKDIR/hf. Returns the
    loop's summary (with ``"export"``: the exported directory)."""
    from tr_align.io import export
    from tr_align.training import loop

    print("\n".join(plan.lines), flush=True)
    summary = loop.run(
        plan.config, plan.workdir, progress=progress, devices=devices, records=plan.records
    )
    if summary.get("signal") or summary["step"] < summary["total_steps"]:
        return summary
    out = os.path.join(plan.workdir, HF_DIR)
    import jax

    if jax.process_index() == 0:
        export.export(plan.workdir, out)
        chat = _has_chat_template(out)
        print(
            f"tr-align: wrote the trained policy with its tokenizer to {out}\n"
            f"  try: tr-align generate --model={out}{' --chat' if chat else ''} "
            '--prompt="..."',
            flush=True,
        )
    summary["export"] = out
    return summary


def _has_chat_template(out: str) -> bool:
    if os.path.isfile(os.path.join(out, "chat_template.jinja")):
        return True
    import json

    try:
        with open(os.path.join(out, "tokenizer_config.json"), encoding="utf-8") as f:
            return bool(json.load(f).get("chat_template"))
    except (OSError, ValueError):
        return False


def help_text(method: str) -> str:
    """``tr-align METHOD --help``: the usage, then every config key ``--KEY=VALUE`` sets, with
    the front door's value (before the model and the data fit it) and its meaning from the
    defaults table (``tr_align.defaults.describe_keys``)."""
    from tr_align import defaults

    rows = defaults.describe_keys(base_config(method))
    width = min(44, max(len(f"{k} = {v!r}") for k, v, _ in rows))
    out = [USAGE.rstrip(), "", f"config keys (--KEY=VALUE; the {method} front door's values):"]
    out += [f"  {f'{k} = {v!r}':<{width}}  {m}".rstrip() for k, v, m in rows]
    out.append(
        "  data.path, model.pretrained, the batch size, steps, eval split and tau are then "
        "fitted to --model and --data"
    )
    return "\n".join(out)


def main(method: str, args) -> int:
    """``tr-align METHOD ARGS``: parse, prepare, run; returns the exit code (errors are
    raised for ``tr_align.cli`` to map)."""
    options, overrides = parse_args(args)
    if options.get("help"):
        print(help_text(method))
        return 0
    summary = run(prepare(method, options, overrides))
    if summary.get("signal"):
        from tr_align.errors import EXIT_RESUME

        return EXIT_RESUME
    return 0
