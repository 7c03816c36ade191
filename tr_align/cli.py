"""Command line: ``tr-align COMMAND [flags]`` (also ``python -m tr_align``).

Commands:
  train   Train or resume a run:
          tr-align train --config=configs/default.py[:PRESET] --workdir=DIR [--config.KEY=VALUE ...]
          Rerunning with the same --workdir resumes from its newest checkpoint.
  export  Write a run's trained policy (or reference) as a Hugging Face checkpoint:
          tr-align export --workdir=DIR --out=OUT [--which=policy|reference] [--step=N]
  generate  Complete prompts with a pretrained model (KV-cache decoding):
          tr-align generate --model=PATH|smollm2 --prompt="..." [--chat] [--max_new_tokens=64]
          [--temperature=0] [--top_k=0] [--top_p=1] [--seed=0]
  bench   Time and memory of the compiled train step, frozen vs. trust-region reference:
          tr-align bench --config=configs/default.py --out=bench/default.json [--config.KEY=VALUE ...]
          tr-align bench --generate_model=smollm2 --out=bench/generate.json   (tokens/s)
  toy     Toy overoptimization experiment (exact probabilities of all sequences; DPO/IPO/KTO-pair
          vs their TR variants over several seeds): writes DIR/toy_results.json and
          DIR/toy_overoptimization.png and prints the tables:
          tr-align toy --workdir=DIR [--seeds=5] [--steps=500] [--methods=DPO,TR-DPO-soft]
          [--model=mlp|llama] [--lr=1e-4] [--beta=0.1] [--hard_tau=50]

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

        try:
            body()
        except ConfigError as e:
            print(f"tr-align: config error: {e}", file=sys.stderr)
            sys.exit(2)
        except FloatingPointError as e:
            print(f"tr-align: {e}", file=sys.stderr)
            sys.exit(1)

    app.run(main, argv=[f"{argv[0]} {command}"] + list(argv[2:]))


def _train(argv) -> None:
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

        loop.run(FLAGS.config, FLAGS.workdir, stop_at_step=FLAGS.stop_at_step)

    _run_app(argv, "train", body)


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


def _toy(argv) -> None:
    from absl import flags

    from tr_align import toy

    d = toy.ToySettings()
    flags.DEFINE_string("workdir", None, "Output directory.", required=True)
    flags.DEFINE_integer("seeds", d.seeds, "Seeds (policy initialisations); mean ± std over them.")
    flags.DEFINE_integer("steps", d.steps, "Preference-optimization steps per method.")
    flags.DEFINE_list("methods", list(toy.METHODS), "Methods to run (names as in the table).")
    flags.DEFINE_enum("model", d.model, ["mlp", "llama"], "Policy network.")
    flags.DEFINE_float("lr", d.lr, "Adam learning rate of the preference optimization.")
    flags.DEFINE_float("beta", d.beta, "beta of every loss.")
    flags.DEFINE_integer("hard_tau", d.hard_tau, "Hard TR: copy the policy every hard_tau steps.")
    FLAGS = flags.FLAGS

    def body():
        from tr_align.config import ConfigError

        settings = toy.ToySettings(
            seeds=FLAGS.seeds,
            steps=FLAGS.steps,
            model=FLAGS.model,
            lr=FLAGS.lr,
            beta=FLAGS.beta,
            hard_tau=FLAGS.hard_tau,
        )
        try:
            settings.validate()
            unknown = [m for m in FLAGS.methods if m not in toy.METHODS]
            if unknown:
                raise ValueError(
                    f"--methods: unknown {unknown}; expected some of {list(toy.METHODS)}"
                )
        except ValueError as e:
            raise ConfigError(str(e)) from None
        toy.main(FLAGS.workdir, settings, FLAGS.methods)

    _run_app(argv, "toy", body)


COMMANDS = {
    "train": _train,
    "export": _export,
    "generate": _generate,
    "bench": _bench,
    "toy": _toy,
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
