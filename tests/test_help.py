"""``tr-align COMMAND --help``: the command's own flags (not absl's), the config's keys with
their values and meanings, exit 0 — in-process for every command (``cli.main`` removes the
flags it defined again, so one process can ask for every help)."""

import re
import signal

import pytest
from absl import flags

from conftest import REPO
from tr_align import cli, defaults
from tr_align import config as config_lib

# Each command's own flags, written out by hand (not read from the code).
OWN_FLAGS = {
    "train": ["--config", "--workdir", "--stop_at_step", "--allow_config_change"],
    "data": ["--config", "--num_examples"],
    "export": ["--workdir", "--out", "--which", "--step"],
    "generate": ["--model", "--prompt", "--chat", "--max_new_tokens", "--temperature", "--seed"],
    "eval": ["--policy", "--prompts", "--out", "--sft", "--scorer", "--judge", "--baseline"],
    "frontier": ["--config", "--workdir"],
    "bench": ["--config", "--out", "--steps", "--warmup", "--modes", "--memory", "--seq_len"],
    "plan": ["--config", "--model", "--devices", "--tpu", "--mesh", "--hbm", "--out"],
    "toy": ["--workdir", "--seeds", "--steps", "--methods", "--model", "--lr", "--hard_tau",
            "--soft_alpha", "--soft_tau", "--lora_rank", "--lora_alpha", "--lora_mode"],
}
# The front door (tr_align.frontdoor): its own usage, flags and the config keys it sets.
FRONT_DOOR = ("dpo", "ipo", "kto", "sft")  # sft with --config: the train flags
FRONT_DOOR_FLAGS = ["--model", "--data", "--workdir", "--tr", "--format", "--trl-config"]
WITH_CONFIG = ("train", "sft", "data", "eval", "bench", "plan")
ABSL_FLAGS = (
    "--alsologtostderr",
    "--logtostderr",
    "--verbosity",
    "--log_dir",
    "--chex_",
    "--grain",
)


def _help(capsys, *args):
    before = set(flags.FLAGS)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    code = cli.main(["tr-align", *args])
    # the start-up signal handlers the command installed are gone again too
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    out = capsys.readouterr().out
    added = set(flags.FLAGS) - before
    # the command's flags are gone again; flags of libraries it imported (orbax, grain) stay
    assert not [n for n in added if flags.FLAGS.find_module_defining_flag(n, "").startswith("tr")]
    assert before <= set(flags.FLAGS)
    return code, out


def test_every_command_has_a_help_test():
    assert set(OWN_FLAGS) | set(FRONT_DOOR) == set(cli.COMMANDS)


def test_sft_with_a_config_file_has_the_train_flags(capsys):
    code, out = _help(capsys, "sft", "--config=configs/default.py", "--help")
    assert code == 0 and out.startswith("usage: tr-align sft")
    for flag in ("--config", "--workdir", "--stop_at_step", "--allow_config_change"):
        assert re.search(rf"^  {flag} \(", out, re.M), flag


@pytest.mark.parametrize("command", FRONT_DOOR)
def test_front_door_help_lists_its_flags_and_every_config_key(capsys, command):
    code = cli.main(["tr-align", command, "--help"])
    out = capsys.readouterr().out
    assert code == 0
    for flag in FRONT_DOOR_FLAGS:
        assert re.search(rf"^  {flag} ", out, re.M), flag
    # the keys with the front door's pretrained-model defaults and the table's meanings
    assert re.search(r"^  loss\.beta = 0\.1 +\S", out, re.M)
    lr = "2e-05" if command == "sft" else "1e-06"  # TRL's SFTConfig / DPOConfig defaults
    assert re.search(rf"^  optimizer\.learning_rate = {lr} +\S", out, re.M)
    for key in ("train.batch_size", "trust_region.alpha", "data.max_length", "loss.type"):
        assert re.search(rf"^  {re.escape(key)} = .+  {re.escape(defaults.meaning(key))}", out, re.M)


@pytest.mark.parametrize("command", sorted(OWN_FLAGS))
def test_help_lists_the_commands_own_flags(capsys, command):
    code, out = _help(capsys, command, "--help")
    assert code == 0
    assert out.startswith(f"usage: tr-align {command}")
    for flag in OWN_FLAGS[command]:
        assert re.search(rf"^  {flag} \(", out, re.M), (flag, out)
    for flag in ABSL_FLAGS:
        assert flag not in out, (flag, out)
    if command in WITH_CONFIG:  # configs/default.py's values, read off the file by hand
        assert re.search(r"^  train\.steps = 400 +optimizer steps of the run", out, re.M), out
        assert re.search(r"^  optimizer\.learning_rate = 0\.001 +peak AdamW", out, re.M)
        assert re.search(r"^  trust_region\.tau = 1 +update the reference every tau", out, re.M)
        assert re.search(r"^  data\.max_prompt_length = 512 +over-long prompts", out, re.M)
        assert re.search(r"^  logging\.wandb = False +also log metrics to Weights", out, re.M)


def test_help_of_a_recipe_shows_its_values_and_the_defaults_it_leaves_out(capsys):
    code, out = _help(capsys, "train", "--config=configs/smollm2_135m.py:tr-hard", "-h")
    assert code == 0
    assert "values of configs/smollm2_135m.py:tr-hard" in out
    assert re.search(r"^  train\.steps = 20 ", out, re.M)
    assert re.search(r"^  trust_region\.tau = 512 ", out, re.M)  # the tr-hard preset
    assert re.search(r"^  model\.pretrained = 'smollm2' ", out, re.M)
    # optional keys the recipe leaves out: their default, marked
    assert re.search(r"^  data\.packing = 'prefix_shared' .*\(default\)$", out, re.M)
    assert "model.vocab_size" not in out  # not in that recipe, and required from scratch only


def test_help_of_frontier_lists_its_config(capsys):
    code, out = _help(capsys, "frontier", "--help")
    assert code == 0
    assert "config keys (--config.KEY=VALUE; values of configs/frontier.py):" in out
    assert re.search(r"^  dpo\.steps = 300 +alignment steps per method", out, re.M)
    assert re.search(r"^  base\.loss\.beta = 0\.1 +the loss's beta", out, re.M)


def test_every_key_of_the_default_recipe_and_every_required_key_has_a_meaning():
    config = config_lib.load_config_file(str(REPO / "configs" / "default.py"))
    keys = set(defaults.leaf_keys(config)) | set(config_lib.REQUIRED_KEYS)
    assert keys and all(defaults.meaning(k) for k in keys), [
        k for k in keys if not defaults.meaning(k)
    ]
    frontier = config_lib.load_config_file(str(REPO / "configs" / "frontier.py"))
    missing = [k for k in defaults.leaf_keys(frontier) if not defaults.meaning(k)]
    assert not missing, missing


def test_describe_keys_marks_the_defaults_a_config_leaves_out():
    import ml_collections

    config = ml_collections.ConfigDict(dict(train=dict(steps=7)))
    rows = {k: (v, m) for k, v, m in defaults.describe_keys(config)}
    assert rows["train.steps"] == (7, "optimizer steps of the run (unless train.epochs > 0)")
    assert rows["checkpoint.timeout_s"] == (
        1200,
        "a checkpoint save/restore that takes longer aborts (default)",
    )
