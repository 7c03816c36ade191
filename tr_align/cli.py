"""Command line: ``tr-align COMMAND [flags]`` (also ``python -m tr_align``).

Commands:
  train   Train or resume a run:
          tr-align train --config=configs/default.py[:PRESET] --workdir=DIR [--config.KEY=VALUE ...]
          Rerunning with the same --workdir resumes from its newest checkpoint.
  sft     Supervised fine-tuning on the chosen completions (train with loss.type=sft); export
          the result and start alignment from it with --config.model.pretrained=EXPORT_DIR:
          tr-align sft --config=configs/hh_tiny.py --workdir=runs/sft
          tr-align export --workdir=runs/sft --out=runs/sft/hf
  data inspect  Print the data report and a few tokenized examples (prompt masked) of a config:
          tr-align data inspect --config=configs/hh_tiny.py [--num_examples=3]
  export  Write a run's trained policy (or reference) as a Hugging Face checkpoint:
          tr-align export --workdir=DIR --out=OUT [--which=policy|reference] [--step=N]
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

Run ``tr-align COMMAND --help`` for a command's flags.
"""

from __future__ import annotations

import os
import sys

USAGE = __doc__.split("\n", 2)[2]
_REPO_DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "default.py"
)


def _define_config_flag():
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config",
        default=_REPO_DEFAULT_CONFIG if os.path.exists(_REPO_DEFAULT_CONFIG) else None,
        help_string="Config file with get_config(); append ':PRESET' (tr-soft, tr-hard, vanilla) "
        "to pick a trust-region preset, override keys with --config.KEY=VALUE.",
        lock_config=True,
    )


def _run_app(argv, command, body) -> None:
    """Runs ``body()`` under absl with quiet logging and one-line errors for bad configs."""
    from absl import app, logging

    def main(_):
        if not any(a.startswith(("--verbosity", "-v")) for a in argv):
            logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
        from tr_align.config import ConfigError
        from tr_align.data.sources import DataError

        try:
            body()
        except ConfigError as e:
            print(f"tr-align: config error: {e}", file=sys.stderr)
            sys.exit(2)
        except DataError as e:
            print(f"tr-align: data error: {e}", file=sys.stderr)
            sys.exit(2)
        except FloatingPointError as e:
            print(f"tr-align: {e}", file=sys.stderr)
            sys.exit(1)

    app.run(main, argv=[f"{argv[0]} {command}"] + list(argv[2:]))


def _train(argv, command="train") -> None:
    from absl import flags

    _define_config_flag()
    flags.DEFINE_string(
        "workdir", None, "Run directory (resumed if it has checkpoints).", required=True
    )
    flags.DEFINE_integer(
        "stop_at_step", None, "Stop after this step with a checkpoint, as if interrupted there."
    )
    FLAGS = flags.FLAGS

    def body():
        from tr_align import loop

        if command == "sft":
            FLAGS.config.loss.type = "sft"
        loop.run(FLAGS.config, FLAGS.workdir, stop_at_step=FLAGS.stop_at_step)

    _run_app(argv, command, body)


def _sft(argv) -> None:
    _train(argv, "sft")


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
    FLAGS = flags.FLAGS

    def body():
        from tr_align import bench, trust_region
        from tr_align.config import ConfigError

        if FLAGS.generate_model:
            _, table = bench.generation(FLAGS.generate_model, FLAGS.out)
            print(table)
            print(f"tr-align: wrote {FLAGS.out} and {FLAGS.out}.md")
            return
        unknown = sorted(set(FLAGS.modes) - set(trust_region.PRESETS))
        if unknown:
            raise ConfigError(
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
    FLAGS = flags.FLAGS

    def body():
        from tr_align import export

        step = export.export(FLAGS.workdir, FLAGS.out, which=FLAGS.which, step=FLAGS.step)
        print(f"tr-align: wrote the {FLAGS.which} of {FLAGS.workdir} at step {step} to {FLAGS.out}")

    _run_app(argv, "export", body)


def _generate(argv) -> None:
    from absl import flags

    flags.DEFINE_string(
        "model", None, "HF model directory, .gguf file or 'smollm2'.", required=True
    )
    flags.DEFINE_multi_string("prompt", None, "Prompt text (repeat for a batch).", required=True)
    flags.DEFINE_bool("chat", False, "Wrap each prompt as a user turn with the chat template.")
    flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt.")
    flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
    flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0 = all).")
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = all).")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    FLAGS = flags.FLAGS

    def body():
        from tr_align import generate

        texts = generate.complete(
            FLAGS.model,
            FLAGS.prompt,
            chat=FLAGS.chat,
            max_new_tokens=FLAGS.max_new_tokens,
            temperature=FLAGS.temperature,
            top_k=FLAGS.top_k,
            top_p=FLAGS.top_p,
            seed=FLAGS.seed,
        )
        for prompt, text in zip(FLAGS.prompt, texts):
            print(f"### prompt: {prompt}\n{text}\n")

    _run_app(argv, "generate", body)


def _eval(argv) -> None:
    from absl import flags
    from ml_collections import config_flags

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
    flags.DEFINE_integer("max_new_tokens", 64, "Tokens per completion (at most).")
    flags.DEFINE_float("temperature", 1.0, "Sampling temperature (1 for an unbiased KL).")
    flags.DEFINE_integer("top_k", 0, "Top-k sampling (0 = off).")
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_integer("batch_size", 32, "Rows per generation / scoring batch.")
    FLAGS = flags.FLAGS

    def body():
        from tr_align import evaluate

        try:
            _, table = evaluate.run(
                FLAGS.policy,
                FLAGS.out,
                prompts_file=FLAGS.prompts,
                config=FLAGS.config,
                sft=FLAGS.sft,
                scorer_specs=FLAGS.scorer,
                judge_spec=FLAGS.judge,
                baseline=FLAGS.baseline,
                chat=FLAGS.chat,
                num_prompts=FLAGS.num_prompts,
                samples_per_prompt=FLAGS.samples_per_prompt,
                max_new_tokens=FLAGS.max_new_tokens,
                temperature=FLAGS.temperature,
                top_k=FLAGS.top_k,
                top_p=FLAGS.top_p,
                seed=FLAGS.seed,
                batch_size=FLAGS.batch_size,
            )
        except (ValueError, FileNotFoundError, ImportError, RuntimeError) as e:
            print(f"tr-align: eval: {e}", file=sys.stderr)
            sys.exit(2)
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
        from tr_align import frontier

        if FLAGS.config is None:
            print(
                "tr-align: frontier: --config=configs/frontier.py is required outside the "
                "repository",
                file=sys.stderr,
            )
            sys.exit(2)
        try:
            frontier.run(FLAGS.config, FLAGS.workdir)
        except (FileNotFoundError, ImportError) as e:
            print(f"tr-align: frontier: {e}", file=sys.stderr)
            sys.exit(2)
        print(f"tr-align: wrote {FLAGS.workdir}/frontier.json and frontier.png")

    _run_app(argv, "frontier", body)


def _data(argv) -> None:
    from absl import flags

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


COMMANDS = {
    "train": _train,
    "sft": _sft,
    "data": _data,
    "export": _export,
    "generate": _generate,
    "eval": _eval,
    "frontier": _frontier,
    "bench": _bench,
}


def main(argv=None) -> int:
    argv = sys.argv if argv is None else argv
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(f"usage: tr-align COMMAND [flags]\n\n{USAGE}")
        return 0
    if argv[1] not in COMMANDS:
        print(
            f"tr-align: unknown command {argv[1]!r}; expected one of {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    COMMANDS[argv[1]](argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
