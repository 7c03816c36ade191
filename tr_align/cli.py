"""Command line: ``tr-align COMMAND [flags]`` (also ``python -m tr_align``).

Commands:
  dpo | ipo | kto | sft   Align a pretrained model on a data file in one command, TRL-style
          (the format is detected, defaults suit a pretrained model; the trained model and its
          tokenizer are written to WORKDIR/hf; tr_align/frontdoor.py):
          tr-align dpo --model=HF_DIR|HUB_ID|FILE.gguf|smollm2 --data=FILE|GLOB|HUB_NAME
            --workdir=DIR [--tr=soft|hard|off] [--format=F] [--trl-config=dpo.yaml] [--KEY=VALUE]
  train   Train or resume a run:
          tr-align train --config=configs/default.py[:PRESET] --workdir=DIR [--config.KEY=VALUE ...]
          Rerunning with the same --workdir resumes from its newest checkpoint (with the same
          config; --allow_config_change=train.steps,... accepts listed changes).
  sft     Supervised fine-tuning on the chosen completions (train with loss.type=sft); export
          the result and start alignment from it with --config.model.pretrained=EXPORT_DIR:
          tr-align sft --config=configs/hh_tiny.py --workdir=runs/sft
          tr-align export --workdir=runs/sft --out=runs/sft/hf
  data inspect  Print the data report and a few tokenized examples (prompt masked) of a config:
          tr-align data inspect --config=configs/hh_tiny.py [--num_examples=3]
  export  Write a run's trained policy (or reference) as a Hugging Face checkpoint:
          tr-align export --workdir=DIR --out=OUT [--which=policy|reference] [--step=N]
                          [--format=merged|peft]
  generate  Complete prompts with a pretrained model (KV-cache decoding):
          tr-align generate --model=PATH|smollm2 --prompt="..." [--chat] [--max_new_tokens=64]
          [--temperature=0] [--top_k=0] [--top_p=1] [--seed=0]
  eval    Sample completions for held-out prompts; KL to the SFT model, reward scores, win rate:
          tr-align eval --policy=runs/dpo [--policy=MODEL2 ...] --prompts=prompts.jsonl
          [--sft=MODEL] [--scorer=vader --scorer=module:function] [--judge=score:length|http]
          [--baseline=MODEL|completions.jsonl] [--samples_per_prompt=1] --out=eval/
          (prompts from a config's held-out split instead: --config=configs/hh_tiny.py)
  frontier  The offline gold-reward/KL frontier of DPO vs TR-DPO (soft, hard) on review prefixes:
          tr-align frontier --workdir=runs/frontier [--config=configs/frontier.py[:full]]
  bench   Time and memory of the compiled train step, frozen vs. trust-region reference:
          tr-align bench --config=configs/default.py --out=bench/default.json [--config.KEY=VALUE ...]
          tr-align bench --generate_model=smollm2 --out=bench/generate.json   (tokens/s)
  plan    Per-device memory of the train step on a target mesh (compiled ahead of time, no
          weights allocated) and whether it fits a device's HBM:
          tr-align plan --config=configs/default.py --model=configs/hf/llama3_8b.json \
            --devices=8 --mesh=data=1,fsdp=8,tensor=1 --seq_len=1024 --hbm=h100 [--out=F.json]
          tr-align plan ... --tpu=v5p-32   (the TPU compiler via libtpu; no TPU needed)
          tr-align plan ... --gpu=h100:8   (the GPU compiler via the CUDA plugin; no GPU needed)
          tr-align bench --memory --config=configs/llama_100m.py --out=bench/memory.json
          (compiled train-step memory per memory lever, compile only)
  toy     Toy overoptimization experiment (exact probabilities of all sequences; DPO/IPO/KTO-pair
          vs their TR variants over several seeds): writes DIR/toy_results.json and
          DIR/toy_overoptimization.png and prints the tables:
          tr-align toy --workdir=DIR [--seeds=5] [--steps=500] [--methods=DPO,TR-DPO-soft]
          [--model=mlp|llama] [--lr=1e-4] [--beta=0.1] [--hard_tau=50] [--soft_alpha=0.6]
          [--soft_tau=1] [--lora_rank=0] [--lora_alpha=8] [--lora_mode=factors|merged]
          (LoRA on pi_sft when --lora_rank > 0; TR runs also report the factor reference's
          drift from the exact one)

Run ``tr-align COMMAND --help`` for a command's flags and, where it reads --config, the config
keys with their values and meanings.
"""

from __future__ import annotations

import os
import sys

from tr_align import errors

USAGE = __doc__.split("\n", 2)[2]
_REPO_DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "default.py"
)


def _define_config_flag():
    from ml_collections import config_flags

    try:  # without --config, the default file and its --config.KEY overrides are read here
        config_flags.DEFINE_config_file(
            "config",
            default=_REPO_DEFAULT_CONFIG if os.path.exists(_REPO_DEFAULT_CONFIG) else None,
            help_string="Config file with get_config(); append ':PRESET' (tr-soft, tr-hard, "
            "vanilla) to pick a trust-region preset, override keys with --config.KEY=VALUE.",
            lock_config=True,
        )
    except (AttributeError, KeyError):
        _exit_on_unknown_override(sys.argv)
        raise


# Every project error type (tr_align.errors) -> the label of its one-line message
# (``tr-align: LABEL: MESSAGE``; None: ``tr-align: MESSAGE``) and the exit code, for every
# command. The first row an error is an instance of applies; anything else is a bug and keeps
# its traceback.
ERRORS = (
    (errors.ConfigError, "config error", 2),
    (errors.DataError, "data error", 2),
    (errors.DistributedSetupError, "distributed setup", 2),
    (errors.RunDirError, None, 2),
    (errors.ModelNotFoundError, None, 2),
    (errors.ModelError, "model error", 2),
    (errors.MissingDependencyError, None, 2),
    (errors.RemoteError, None, 2),
    (errors.CheckpointError, "checkpoint error", 1),
    (errors.WorkdirError, "workdir error", 1),
    # errors.NonFiniteError; the training loop still raises the built-in FloatingPointError
    (FloatingPointError, None, 1),
    (errors.Error, None, 2),
)


def error_report(e: BaseException) -> tuple[str, int] | None:
    """``(one-line message, exit code)`` for a project error, None for any other exception."""
    for kind, label, code in ERRORS:
        if isinstance(e, kind):
            text = " ".join(str(e).split("\n"))
            return (f"tr-align: {label}: {text}" if label else f"tr-align: {text}"), code
    return None


def _override_keys(argv) -> list[str]:
    """The KEYs of the ``--config.KEY=VALUE`` arguments of ``argv``."""
    return [a[len("--config.") :].split("=", 1)[0] for a in argv if a.startswith("--config.")]


def _config_override_error(argv) -> str | None:
    """The first ``--config.KEY=...`` of ``argv`` whose KEY the config file lacks, as a
    one-line message (``config.unknown_key``), or None."""
    overrides = _override_keys(argv)
    if not overrides:
        return None
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    spec = spec or _REPO_DEFAULT_CONFIG
    path, _, preset = spec.partition(":")
    from tr_align import config as config_lib

    try:
        config = config_lib.load_config_file(path, preset or None)
    except Exception:  # noqa: BLE001 - absl reports a config file it cannot load itself
        return None
    for key in overrides:
        if (message := config_lib.unknown_key(config, key)) is not None:
            return message
    return None


def _parse_flags(argv):
    """absl's flag parsing, except that a bad flag ends the command with one line (exit 2):
    ``tr-align: config error: ...`` for an unknown ``--config.KEY`` (instead of
    ml_collections' traceback) or a ``--config.KEY=VALUE`` of the wrong type, ``tr-align: flag
    error: ...`` for the others (absl: two lines, exit 1)."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(_flag_error_line(e), file=sys.stderr)
        sys.exit(2)
    except (AttributeError, KeyError):
        _exit_on_unknown_override(argv)
        raise


def _flag_error_line(e) -> str:
    """absl's flag error as one ``tr-align: ...`` line."""
    text = " ".join(str(e).split())
    if text.startswith("flag --"):  # "flag --config.train.steps=abc: invalid literal ..."
        text = text[len("flag ") :]
    label = "config error" if text.startswith("--config") else "flag error"
    if "must have a value other than None" in text:  # a required flag not given
        text = text.split("=", 1)[0] + ": required (see --help)"
    return f"tr-align: {label}: {text}"


def _exit_on_unknown_override(argv) -> None:
    """Exits with one config-error line (code 2) if an override of ``argv`` names a key the
    config lacks; returns otherwise (the caller re-raises)."""
    message = _config_override_error(argv)
    if message is not None:
        print(f"tr-align: config error: {message}", file=sys.stderr)
        sys.exit(2)


HELP_ARGS = ("--help", "-h", "--helpshort", "-?")


class _HelpRequested(Exception):
    """Raised by ``_run_app`` under ``--help`` once the command's flags are defined;
    ``main`` prints them (``command_help``)."""

    def __init__(self, command: str, argv):
        super().__init__(command)
        self.command, self.argv = command, list(argv)


def _usage_section(command: str) -> str:
    """The paragraph of this module's docstring that describes ``command``."""
    lines, out = USAGE.splitlines(), []
    head = command.split()[0]
    for line in lines:
        starts = line.startswith("  ") and not line.startswith("   ")
        if out and (starts or not line.strip()):
            break
        if out or (starts and line.split()[0] == head):
            out.append(line)
    return "\n".join(out)


def _flag_line(name: str, flag) -> list[str]:
    required = any(
        "must have a value other than None" in getattr(v, "message", "")
        for v in getattr(flag, "validators", ())
    )
    kind = flag.flag_type()
    if required:
        note = "required"
    elif name == "config":
        note = "a config file"
    else:
        note = f"default: {flag.default_as_str or repr(flag.default)}"
    if kind.startswith("multi"):
        note += "; repeatable"
    text = " ".join((flag.help or "").split())
    text = text.replace("; repeat this option to specify a list of values", "")
    return [f"  --{name} ({kind}; {note})", f"      {text}"]


def _config_for_help(argv, config_flag):
    """The config named by ``--config=PATH[:PRESET]`` in ``argv``, else the flag's default
    (None without one); a file that cannot be loaded gives None."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None:
        value = getattr(config_flag, "default", None)
        if hasattr(value, "items"):
            return value
        spec = _REPO_DEFAULT_CONFIG if os.path.exists(_REPO_DEFAULT_CONFIG) else None
        if spec is None:
            return None
    path, _, preset = spec.partition(":")
    from tr_align import config as config_lib

    try:
        return config_lib.load_config_file(path, preset or None)
    except Exception:  # noqa: BLE001 - the command itself reports an unloadable file
        return None


def _config_flag_file(config_flag) -> str | None:
    """The file of a config flag's default (absl's ``default_as_str``: the quoted path)."""
    if not hasattr(getattr(config_flag, "default", None), "items"):
        return None
    return (config_flag.default_as_str or "").strip("'\"") or None


def command_help(command: str, argv, names) -> str:
    """``tr-align COMMAND --help``: the command's usage paragraph, its own flags (``names``:
    the flags it defined, not absl's), and for a command with ``--config`` the config's keys
    with their values and meanings (``tr_align.defaults.describe_keys``)."""
    from absl import flags

    from tr_align import defaults

    F = flags.FLAGS
    own = [n for n in names if F.find_module_defining_flag(n, "").startswith("tr_align")]
    out = [f"usage: tr-align {command} [flags]", "", _usage_section(command), "", "flags:"]
    for name in own:
        out += _flag_line(name, F[name])
    out.append("  --helpfull: every flag, absl's included")
    if "config" in own:
        config = _config_for_help(argv, F["config"])
        if config is not None:
            spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
            where = spec or _config_flag_file(F["config"]) or _REPO_DEFAULT_CONFIG
            where = os.path.relpath(where) if os.path.isabs(where) else where
            rows = defaults.describe_keys(config)
            width = min(44, max(len(f"{k} = {v!r}") for k, v, _ in rows))
            out += ["", f"config keys (--config.KEY=VALUE; values of {where}):"]
            for k, v, meaning in rows:
                out.append(f"  {f'{k} = {v!r}':<{width}}  {meaning}".rstrip())
            out.append(
                "  (default): the file leaves the key out and this default applies; set it in "
                "the file (--config.KEY needs the key there)"
            )
    return "\n".join(out)


def _reporting_errors(fn):
    """``fn()``; a project error ends the process with its one line and exit code
    (``error_report``), anything else propagates."""
    try:
        return fn()
    except Exception as e:
        report = error_report(e)
        if report is None:
            raise
        print(report[0], file=sys.stderr)
        sys.exit(report[1])


def _run_app(argv, command, body) -> None:
    """Runs ``body()`` under absl with quiet logging; a project error ends the command with
    its one-line message and exit code (``error_report``), whatever the command. Under
    ``--help`` (``HELP_ARGS``) it raises ``_HelpRequested`` instead (``main`` prints it)."""
    from absl import app, logging

    if any(a in HELP_ARGS for a in argv[2:]):
        raise _HelpRequested(command, argv)

    def main(_):
        if not any(a.startswith(("--verbosity", "-v")) for a in argv):
            logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
        from tr_align import distributed

        def start():
            distributed.initialize()  # multi-host jobs: before anything touches a device
            body()

        _reporting_errors(start)

    app.run(main, argv=[f"{argv[0]} {command}"] + list(argv[2:]), flags_parser=_parse_flags)


def _train(argv, command="train") -> None:
    from tr_align.training import interrupt

    interrupt.install_startup_handlers()  # first thing: before the slow imports and start-up
    from absl import flags

    _define_config_flag()
    flags.DEFINE_string(
        "workdir", None, "Run directory (resumed if it has checkpoints).", required=True
    )
    flags.DEFINE_integer(
        "stop_at_step", None, "Stop after this step with a checkpoint, as if interrupted there."
    )
    flags.DEFINE_list(
        "allow_config_change",
        [],
        "Resuming: config keys that may differ from the run's config.json (comma-separated, "
        "e.g. train.steps,optimizer.learning_rate); see docs/running.md, 'Resuming'.",
    )
    FLAGS = flags.FLAGS

    def body():
        from tr_align.training import loop

        if command == "sft":
            FLAGS.config.loss.type = "sft"
        summary = loop.run(
            FLAGS.config,
            FLAGS.workdir,
            stop_at_step=FLAGS.stop_at_step,
            allow_config_change=FLAGS.allow_config_change,
            set_keys=_override_keys(argv),
        )
        if summary.get("signal"):  # stopped by a signal or a preemption, state saved
            sys.exit(errors.EXIT_RESUME)

    _run_app(argv, command, body)


def _sft(argv) -> None:
    if any(a == "--config" or a.startswith(("--config=", "--config.")) for a in argv[2:]):
        _train(argv, "sft")  # a config file: as tr-align train with loss.type=sft
    else:
        _front_door(argv)


def _front_door(argv) -> None:
    """``tr-align dpo|ipo|kto|sft --model=M --data=D --workdir=O ...`` (tr_align.frontdoor)."""
    from tr_align.training import interrupt

    interrupt.install_startup_handlers()
    from absl import logging

    logging.set_verbosity(logging.WARNING)

    def start():
        from tr_align import distributed, frontdoor

        distributed.initialize()
        return frontdoor.main(argv[1], argv[2:])

    code = _reporting_errors(start)
    if code:
        sys.exit(code)


def _bench(argv) -> None:
    from absl import flags

    _define_config_flag()
    flags.DEFINE_string("out", "bench/results.json", "JSON results; a .md table is written beside.")
    flags.DEFINE_integer("steps", 30, "Timed steps per mode (median reported).")
    flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
    flags.DEFINE_list("modes", ["vanilla", "tr-soft", "tr-hard"], "Reference modes to compare.")
    flags.DEFINE_string(
        "generate_model",
        None,
        "Instead of the train step, time KV-cache "
        "generation of this pretrained model (HF dir, .gguf or 'smollm2').",
    )
    flags.DEFINE_bool(
        "memory",
        False,
        "Instead of timing, compile the train step once per memory lever (bf16 compute, "
        "bf16 reference, remat, grad accumulation, chunked log-probs) and report XLA's "
        "memory analysis.",
    )
    flags.DEFINE_integer("seq_len", 0, "--memory: tokens per sequence (0 = the data's length).")
    flags.DEFINE_integer("accum_steps", 4, "--memory: microbatches of the grad-accum lever.")
    flags.DEFINE_integer("chunk_size", 64, "--memory: positions per chunk of the logps lever.")
    FLAGS = flags.FLAGS

    def body():
        from tr_align import trust_region
        from tr_align.tools import bench

        if FLAGS.memory:
            _, table = bench.memory(
                FLAGS.config,
                FLAGS.out,
                seq_len=FLAGS.seq_len or None,
                accum_steps=FLAGS.accum_steps,
                chunk_size=FLAGS.chunk_size,
            )
            print(table)
            print(f"tr-align: wrote {FLAGS.out} and {FLAGS.out}.md")
            return
        if FLAGS.generate_model:
            _, table = bench.generation(FLAGS.generate_model, FLAGS.out)
            print(table)
            print(f"tr-align: wrote {FLAGS.out} and {FLAGS.out}.md")
            return
        unknown = sorted(set(FLAGS.modes) - set(trust_region.PRESETS))
        if unknown:
            raise errors.ConfigError(
                f"--modes={','.join(unknown)}: expected {sorted(trust_region.PRESETS)}"
            )
        _, table = bench.run(
            FLAGS.config, FLAGS.out, steps=FLAGS.steps, warmup=FLAGS.warmup, modes=FLAGS.modes
        )
        print(table)
        print(f"tr-align: wrote {FLAGS.out} and {FLAGS.out}.md")

    _run_app(argv, "bench", body)


def _export(argv) -> None:
    from absl import flags

    flags.DEFINE_string("workdir", None, "Run directory of tr-align train.", required=True)
    flags.DEFINE_string(
        "out", None, "Output directory for config.json + safetensors.", required=True
    )
    flags.DEFINE_enum("which", "policy", ["policy", "reference"], "Which parameters to export.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
    flags.DEFINE_enum(
        "format",
        "merged",
        ["merged", "peft"],
        "merged: a full HF model (LoRA merged in); peft: a LoRA run's PEFT adapter directory.",
    )
    FLAGS = flags.FLAGS

    def body():
        from tr_align.io import export

        step = export.export(
            FLAGS.workdir, FLAGS.out, which=FLAGS.which, step=FLAGS.step, format=FLAGS.format
        )
        print(f"tr-align: wrote the {FLAGS.which} of {FLAGS.workdir} at step {step} to {FLAGS.out}")

    _run_app(argv, "export", body)


def _generate(argv) -> None:
    from absl import flags

    from tr_align import generate

    d = generate.SamplingSettings()
    flags.DEFINE_string(
        "model", None, "HF model directory, .gguf file or 'smollm2'.", required=True
    )
    flags.DEFINE_multi_string("prompt", None, "Prompt text (repeat for a batch).", required=True)
    flags.DEFINE_bool("chat", False, "Wrap each prompt as a user turn with the chat template.")
    _define_sampling_flags(d, temperature_help="0 = greedy.")
    FLAGS = flags.FLAGS

    def body():
        texts = generate.complete(FLAGS.model, FLAGS.prompt, _sampling(FLAGS), chat=FLAGS.chat)
        for prompt, text in zip(FLAGS.prompt, texts):
            print(f"### prompt: {prompt}\n{text}\n")

    _run_app(argv, "generate", body)


def _define_sampling_flags(d, *, temperature_help: str) -> None:
    """--max_new_tokens, --temperature, --top_k, --top_p, --seed with the defaults of the
    ``generate.SamplingSettings`` ``d``."""
    from absl import flags

    flags.DEFINE_integer("max_new_tokens", d.max_new_tokens, "Tokens to generate per prompt.")
    flags.DEFINE_float("temperature", d.temperature, temperature_help)
    flags.DEFINE_integer("top_k", d.top_k, "Sample among the k most likely tokens (0 = all).")
    flags.DEFINE_float("top_p", d.top_p, "Nucleus sampling mass (1 = all).")
    flags.DEFINE_integer("seed", d.seed, "Sampling seed.")


def _sampling(FLAGS):
    from tr_align import generate

    return generate.SamplingSettings(
        max_new_tokens=FLAGS.max_new_tokens,
        temperature=FLAGS.temperature,
        top_k=FLAGS.top_k,
        top_p=FLAGS.top_p,
        seed=FLAGS.seed,
    )


def _eval(argv) -> None:
    from absl import flags
    from ml_collections import config_flags

    from tr_align.experiments import evaluate

    config_flags.DEFINE_config_file(
        "config",
        default=None,
        help_string="Take the prompts from this training config's "
        "held-out split (instead of --prompts).",
        lock_config=False,
    )
    flags.DEFINE_multi_string(
        "policy",
        None,
        "Model to evaluate: HF directory, .gguf, 'smollm2', a run directory "
        "(newest checkpoint) or RUNDIR@STEP. Repeat for several (one table row each).",
        required=True,
    )
    flags.DEFINE_string(
        "prompts",
        "",
        "JSON/JSONL prompts: strings or records with 'prompt' "
        "(a string or a list of chat messages).",
    )
    flags.DEFINE_string(
        "out", None, "Output directory (eval.json, eval.md, completions.jsonl).", required=True
    )
    flags.DEFINE_string(
        "sft", None, "KL reference model (default: a run directory's starting model; '' = no KL)."
    )
    flags.DEFINE_multi_string(
        "scorer", [], "length | vader | logprob:MODEL | module:function (repeatable)."
    )
    flags.DEFINE_string(
        "judge",
        "",
        "Pairwise judge: score:SCORER (local, deterministic) or "
        "http (TR_ALIGN_JUDGE_URL / _MODEL / _API_KEY from the environment).",
    )
    flags.DEFINE_string(
        "baseline",
        "",
        "The judge's baseline: a model, or a JSON/JSONL file of "
        "records with 'completion' (default: the SFT model).",
    )
    flags.DEFINE_bool("chat", False, "Wrap string prompts as a user turn (chat template).")
    flags.DEFINE_integer("num_prompts", 0, "Use the first N prompts (0 = all).")
    flags.DEFINE_integer("samples_per_prompt", 1, "Completions sampled per prompt.")
    _define_sampling_flags(
        evaluate.EVAL_SAMPLING, temperature_help="Sampling temperature (1 for an unbiased KL)."
    )
    flags.DEFINE_integer("batch_size", 32, "Rows per generation / scoring batch.")
    FLAGS = flags.FLAGS

    def body():
        _, table = evaluate.run(
            FLAGS.policy,
            FLAGS.out,
            _sampling(FLAGS),
            prompts_file=FLAGS.prompts,
            config=FLAGS.config,
            sft=FLAGS.sft,
            scorer_specs=FLAGS.scorer,
            judge_spec=FLAGS.judge,
            baseline=FLAGS.baseline,
            chat=FLAGS.chat,
            num_prompts=FLAGS.num_prompts,
            samples_per_prompt=FLAGS.samples_per_prompt,
            batch_size=FLAGS.batch_size,
        )
        print(table)
        print(f"tr-align: wrote {FLAGS.out}/eval.json, eval.md and completions.jsonl")

    _run_app(argv, "eval", body)


def _frontier(argv) -> None:
    from absl import flags
    from ml_collections import config_flags

    default = os.path.join(os.path.dirname(_REPO_DEFAULT_CONFIG), "frontier.py")
    config_flags.DEFINE_config_file(
        "config",
        default=default if os.path.exists(default) else None,
        help_string="Frontier config (configs/frontier.py; ':full' for the full setting).",
        lock_config=True,
    )
    flags.DEFINE_string(
        "workdir", None, "Output directory (reused stages are skipped).", required=True
    )
    FLAGS = flags.FLAGS

    def body():
        from tr_align.experiments import frontier

        if FLAGS.config is None:
            raise errors.ConfigError(
                "--config=configs/frontier.py is required outside the repository"
            )
        frontier.run(FLAGS.config, FLAGS.workdir)
        print(f"tr-align: wrote {FLAGS.workdir}/frontier.json and frontier.png")

    _run_app(argv, "frontier", body)


def _data(argv) -> None:
    from absl import flags

    if len(argv) >= 3 and argv[2] in HELP_ARGS:  # tr-align data --help
        argv = [argv[0], "data", "inspect", *argv[2:]]
    if len(argv) < 3 or argv[2] != "inspect":
        print("usage: tr-align data inspect --config=CONFIG [--num_examples=3]", file=sys.stderr)
        sys.exit(2)
    _define_config_flag()
    flags.DEFINE_integer("num_examples", 3, "Tokenized training examples to print.")
    FLAGS = flags.FLAGS

    def body():
        from tr_align.data import inspect

        inspect.inspect(FLAGS.config, num_examples=FLAGS.num_examples)

    _run_app([argv[0], "data"] + list(argv[3:]), "data inspect", body)


def _plan(argv) -> None:
    from absl import flags

    _define_config_flag()
    flags.DEFINE_string(
        "model",
        None,
        "Hugging Face config.json (or a model directory) to plan for; weights are not read. "
        "Default: the config's model block.",
    )
    flags.DEFINE_integer(
        "devices", None, "Plan for this many fake CPU devices (the CPU compiler's estimate)."
    )
    flags.DEFINE_string(
        "tpu", None, "Plan for a TPU slice, e.g. v5p-32 or v5e-64, with the TPU compiler (libtpu)."
    )
    flags.DEFINE_string(
        "gpu",
        None,
        "Plan for NVIDIA GPUs, CARD[:COUNT] with CARD in h100, a100-80, a100-40, rtx4090 "
        "(e.g. h100:8), with the GPU compiler (the plan-gpu extra; no GPU needed).",
    )
    flags.DEFINE_string(
        "mesh", "", "Mesh override, e.g. data=1,fsdp=16,tensor=1 (axes not named: the config's)."
    )
    flags.DEFINE_integer("seq_len", 1024, "Tokens per chosen / rejected sequence.")
    flags.DEFINE_integer(
        "batch_per_device",
        None,
        "Preference pairs per data-parallel shard (global = this x data x fsdp); "
        "default: the config's train.batch_size as the global batch.",
    )
    flags.DEFINE_string(
        "hbm",
        None,
        "Memory per device to check against: a size (95GiB, 80GB) or a name "
        "(v4, v5e, v5p, v6e, a100-40, a100-80, h100, h200). Default: the --tpu generation's, "
        "the --gpu card's, or the real device's limit.",
    )
    flags.DEFINE_string("out", None, "Also write the report as JSON here.")
    FLAGS = flags.FLAGS

    def body():
        import json

        import jax

        from tr_align.config import ConfigError
        from tr_align.tools import plan

        given = [f"--{k}" for k in ("devices", "tpu", "gpu") if getattr(FLAGS, k) is not None]
        if len(given) > 1:
            raise ConfigError(f"{' and '.join(given)}: give one of them")
        hbm, label = (None, None) if FLAGS.hbm is None else plan.parse_bytes(FLAGS.hbm)
        if FLAGS.gpu:
            devices = plan.gpu_devices(FLAGS.gpu)
            if hbm is None:
                card = plan.GPU_TARGETS[plan.parse_gpu(FLAGS.gpu)[0]]
                hbm = card["device_memory_size"]
                label = f"{card['description']} ({hbm / 2**30:.2f} GiB)"
        elif FLAGS.tpu:
            devices = plan.tpu_devices(FLAGS.tpu)
            if hbm is None:
                hbm, label = plan.parse_bytes(plan.tpu_topology(FLAGS.tpu)[0])
        elif FLAGS.devices is not None:
            if FLAGS.devices < 1:
                raise ConfigError(f"--devices={FLAGS.devices}: must be >= 1")
            devices = plan.cpu_devices(FLAGS.devices)
        else:
            devices = jax.devices()
            limit = (devices[0].memory_stats() or {}).get("bytes_limit")
            if hbm is None and limit:
                hbm, label = limit, f"{devices[0].device_kind} limit"
        report = plan.plan(
            FLAGS.config,
            plan.model_config_from(FLAGS.config, FLAGS.model),
            devices,
            seq_len=FLAGS.seq_len,
            batch_per_shard=FLAGS.batch_per_device,
            mesh_cfg=plan.parse_mesh(FLAGS.mesh, FLAGS.config.mesh),
            hbm=hbm,
            hbm_label=label,
        )
        print(plan.table(report))
        if FLAGS.out:
            os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
            with open(FLAGS.out, "w", encoding="utf-8") as f:
                json.dump(report, f, indent=2)
            print(f"tr-align: wrote {FLAGS.out}")

    _run_app(argv, "plan", body)


def _plan_environment(argv) -> None:
    """Before jax starts: ``plan --devices=N`` needs N CPU devices, ``plan --tpu=...`` and
    ``--gpu=...`` only the CPU backend (the TPU / GPU compiler is reached through libtpu's /
    the CUDA plugin's topology description; JAX_PLATFORMS=cpu also keeps the plugin from
    looking for a GPU).

    Sets JAX_PLATFORMS=cpu, XLA_FLAGS=--xla_force_host_platform_device_count=N and
    TR_ALIGN_DISTRIBUTED=0 (no multi-host start-up for a plan). When jax
    is already imported (a caller's process), nothing is changed and ``plan.cpu_devices``
    checks that enough CPU devices exist.
    """
    if "jax" in sys.modules:
        return
    value = {}
    for i, arg in enumerate(argv):
        for name in ("devices", "tpu", "gpu"):
            if arg.startswith(f"--{name}="):
                value[name] = arg.split("=", 1)[1]
            elif arg == f"--{name}" and i + 1 < len(argv):
                value[name] = argv[i + 1]
    if not value:
        return
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("TR_ALIGN_DISTRIBUTED", "0")  # a plan is one process, never a job
    if "tpu" in value:
        # libtpu describes the slice without a TPU; these keep it from looking for one
        # (GCE metadata server, worker hostnames) and printing warnings about it.
        gen, _, size = value["tpu"].lower().partition("-")
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{gen.replace('v5e', 'v5litepod')}-{size}")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("TPU_WORKER_ID", "0")
    if "gpu" in value and "xla_gpu_enable_triton_gemm" not in os.environ.get("XLA_FLAGS", ""):
        # Without a GPU there is no autotuning, and XLA:GPU's default Triton GEMM tiling fails
        # on the rank-r adapter matmuls ("INTERNAL: Couldn't find output tile sizes", Llama-3-8B
        # LoRA r16): plan with cuBLAS GEMMs (their operands are materialized where a Triton
        # fusion might not need them, so the temp errs high if anything).
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_triton_gemm=false"
        ).strip()
    n = value.get("devices", "")
    if n.isdigit():
        flags = [
            f
            for f in os.environ.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")
        ]
        flags.append(f"--xla_force_host_platform_device_count={n}")
        os.environ["XLA_FLAGS"] = " ".join(flags)


def _toy(argv) -> None:
    from absl import flags

    from tr_align.experiments import toy

    d = toy.ToySettings()
    flags.DEFINE_string("workdir", None, "Output directory.", required=True)
    flags.DEFINE_integer("seeds", d.seeds, "Seeds (policy initialisations); mean ± std over them.")
    flags.DEFINE_integer("steps", d.steps, "Preference-optimization steps per method.")
    flags.DEFINE_list("methods", list(toy.METHODS), "Methods to run (names as in the table).")
    flags.DEFINE_enum("model", d.model, ["mlp", "llama"], "Policy network.")
    flags.DEFINE_float("lr", d.lr, "Adam learning rate of the preference optimization.")
    flags.DEFINE_float("beta", d.beta, "beta of every loss.")
    flags.DEFINE_integer("hard_tau", d.hard_tau, "Hard TR: copy the policy every hard_tau steps.")
    flags.DEFINE_float("soft_alpha", d.soft_alpha, "Soft TR: the reference's mixing weight.")
    flags.DEFINE_integer(
        "soft_tau", d.soft_tau, "Soft TR: update the reference every soft_tau steps."
    )
    flags.DEFINE_integer(
        "lora_rank", d.lora_rank, "> 0: train LoRA adapters of this rank on pi_sft; 0 = off."
    )
    flags.DEFINE_float(
        "lora_alpha", d.lora_alpha, "LoRA scale numerator: W + (lora_alpha / rank) A @ B."
    )
    flags.DEFINE_string(
        "lora_mode",
        d.lora_mode,
        "LoRA: the TR reference that drives the loss: factors (EMA of A and B) or merged "
        "(exact EMA of the delta); the other one is replayed for the drift.",
    )
    FLAGS = flags.FLAGS

    def body():
        settings = toy.ToySettings(
            seeds=FLAGS.seeds,
            steps=FLAGS.steps,
            model=FLAGS.model,
            lr=FLAGS.lr,
            beta=FLAGS.beta,
            hard_tau=FLAGS.hard_tau,
            soft_alpha=FLAGS.soft_alpha,
            soft_tau=FLAGS.soft_tau,
            lora_rank=FLAGS.lora_rank,
            lora_alpha=FLAGS.lora_alpha,
            lora_mode=FLAGS.lora_mode,
        )
        settings.validate()
        unknown = [m for m in FLAGS.methods if m not in toy.METHODS]
        if unknown:
            raise errors.ConfigError(
                f"--methods: unknown {unknown}; expected some of {list(toy.METHODS)}"
            )
        toy.main(FLAGS.workdir, settings, FLAGS.methods)

    _run_app(argv, "toy", body)


COMMANDS = {
    "dpo": _front_door,
    "ipo": _front_door,
    "kto": _front_door,
    "train": _train,
    "sft": _sft,
    "data": _data,
    "export": _export,
    "generate": _generate,
    "eval": _eval,
    "frontier": _frontier,
    "bench": _bench,
    "plan": _plan,
    "toy": _toy,
}


# Set (unless already set) before transformers / datasets are imported: no "PyTorch was not
# found" advice (transformers), no "Generating train split" bars (datasets); their errors
# still show. tr-align's own status lines and bars (tr_align.progress) replace them.
QUIET_LIBRARIES = {
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
}


def main(argv=None) -> int:
    """``tr-align COMMAND ...``; the signal handlers a command installs are put back when it
    returns, so a process that calls ``main`` in-process keeps its own."""
    from tr_align.training import interrupt

    saved = interrupt.startup_state()
    try:
        return _main(argv)
    finally:
        interrupt.restore_startup_state(saved)


def _main(argv=None) -> int:
    argv = sys.argv if argv is None else argv
    for name, value in QUIET_LIBRARIES.items():
        os.environ.setdefault(name, value)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(f"usage: tr-align COMMAND [flags]\n\n{USAGE}")
        return 0
    if argv[1] not in COMMANDS:
        print(
            f"tr-align: unknown command {argv[1]!r}; expected one of {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    if argv[1] == "plan":
        _plan_environment(argv)
    if not any(a in HELP_ARGS for a in argv[2:]):
        COMMANDS[argv[1]](argv)
        return 0
    from absl import flags

    before = set(flags.FLAGS)
    try:
        COMMANDS[argv[1]](argv)  # defines its flags, then _run_app raises _HelpRequested
    except _HelpRequested as h:
        print(command_help(h.command, h.argv, [n for n in flags.FLAGS if n not in before]))
    finally:  # the command's flags go again, so a caller's process can ask for another help
        for name in set(flags.FLAGS) - before:  # (libraries' flags stay: they are imported)
            if flags.FLAGS.find_module_defining_flag(name, "").startswith("tr_align"):
                delattr(flags.FLAGS, name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
