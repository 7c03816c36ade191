"""A new user's first runs (issue "Switching from TRL in an afternoon"): every config mistake
is one ``tr-align: config error: ...`` line before any model load, and settings that silently
do nothing get one ``tr-align: warning: ...`` line each."""

import jax
import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from conftest import REPO, load_default_config, set_keys
from tr_align import cli, errors
from tr_align import config as config_lib
from tr_align.io import pretrained
from tr_align.training import loop, metrics

FIXTURES = REPO / "tests" / "fixtures"


def _parse(argv, config_file="configs/default.py", **required):
    """``argv`` parsed as the CLI parses it, into a fresh set of flags: (flag values, error)."""
    fv, argv = flags.FlagValues(), ["tr-align", *argv]
    config_flags.DEFINE_config_file(
        "config", str(REPO / config_file), flag_values=fv, lock_config=True, sys_argv=argv
    )
    for name in required:
        flags.DEFINE_string(name, None, "", required=True, flag_values=fv)
    try:
        fv(argv)
    except flags.Error as e:
        return fv, e
    return fv, None


def _no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the config/data checks")

    monkeypatch.setattr(pretrained, "load", refuse)


def _hh_tiny(**overrides):
    return set_keys(config_lib.load_config_file(str(REPO / "configs" / "hh_tiny.py")), overrides)


# ------------------------------------------------------------------ errors: one line, early


def test_a_wrong_typed_override_or_a_missing_flag_is_one_line():
    _, e = _parse(["--config.train.steps=abc"])
    assert cli._flag_error_line(e) == (
        "tr-align: config error: --config.train.steps=abc: invalid literal for int() with "
        "base 10: 'abc'"
    )
    _, e = _parse([], workdir=None)
    assert cli._flag_error_line(e) == "tr-align: flag error: --workdir: required (see --help)"


def test_data_path_with_the_synthetic_task_is_refused(tiny_config):
    with pytest.raises(errors.ConfigError) as e:
        config_lib.validate(tiny_config(**{"data.path": "prefs.jsonl"}), num_devices=8)
    assert str(e.value) == (
        "data.path='prefs.jsonl': is set, but data.source='synthetic' trains on the built-in "
        "task and ignores it; set data.source=files (or hub, tfds) to train on it"
    )


def test_fewer_synthetic_examples_than_a_batch_is_a_config_error(tiny_config):
    config = tiny_config(**{"data.num_train": 4, "train.batch_size": 8})
    with pytest.raises(errors.ConfigError, match=r"^train\.batch_size=8: is more than the "):
        config_lib.validate(config, num_devices=8)


def test_fewer_real_examples_than_a_batch_is_found_before_the_model_loads(monkeypatch):
    # hh.jsonl has 8 rows; eval_fraction 0.25 holds out 2: 6 training examples
    _no_model_load(monkeypatch)
    config = _hh_tiny(**{"train.batch_size": 8})
    with pytest.raises(errors.ConfigError) as e:
        loop.build(config, jax.devices()[:1], progress=False)
    assert str(e.value).startswith(
        "train.batch_size=8: more than the 6 training examples of "
        f"{FIXTURES / 'data' / 'hh.jsonl'} (8 rows read, 2 held out (data.eval_fraction), "
    )
    report = cli.error_report(e.value)
    assert report[0].startswith("tr-align: config error: train.batch_size=8: ") and report[1] == 2
    assert "\n" not in report[0]


def test_a_key_the_recipe_leaves_out_says_where_it_is():
    smollm2 = config_lib.load_config_file(str(REPO / "configs" / "smollm2_135m.py"))
    message = config_lib.unknown_key(smollm2, "data.path")
    assert message.startswith("data.path: unknown key; this recipe leaves it out ")
    assert "configs/default.py has it" in message


def test_max_prompt_length_follows_max_length_on_the_command_line():
    fv, e = _parse(["--config.data.max_length=512"])
    assert e is None and fv.config.data.max_prompt_length == 256
    fv, e = _parse(["--config.data.max_length=300", "--config.data.max_prompt_length=100"])
    assert e is None and (fv.config.data.max_length, fv.config.data.max_prompt_length) == (300, 100)
    config = load_default_config()
    config.data.update(dict(source="files", path=str(FIXTURES / "data" / "hh.jsonl")))
    config.data.max_length = 512  # alone: data.max_prompt_length follows (was refused: 512)
    config.model.max_position_embeddings = 512
    config_lib.validate(config, num_devices=8)
    assert config.data.max_prompt_length == 256


@pytest.mark.slow
def test_the_model_config_of_smollm2_is_read_without_its_weights():
    try:
        from tr_align.io import gguf

        gguf.smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    c = pretrained.load_config({"pretrained": "smollm2", "dtype": "bfloat16"})
    # SmolLM2-135M-Instruct's config.json on the hub
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers) == (49152, 576, 30)
    assert (c.num_attention_heads, c.num_key_value_heads, c.dtype) == (9, 3, "bfloat16")


def test_wandb_enabled_but_not_installed_is_one_line_before_the_run(tiny_config, monkeypatch):
    real = metrics.importlib.util.find_spec
    monkeypatch.setattr(
        metrics.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name)
    )
    with pytest.raises(errors.MissingDependencyError) as e:
        config_lib.validate(tiny_config(**{"logging.wandb": True}), num_devices=8)
    assert cli.error_report(e.value) == (
        "tr-align: logging.wandb=True: the wandb package is not installed; pip install wandb "
        "(or pip install 'tr_align[wandb]'), or set logging.wandb=False",
        2,
    )
    config = tiny_config()
    config.logging = ml_collections.ConfigDict(dict(wandb="yes"))  # a recipe's typo
    with pytest.raises(errors.ConfigError, match=r"logging\.wandb='yes': must be True or False"):
        config_lib.validate(config, num_devices=8)


# ------------------------------------------------------------------ warnings


def test_the_default_recipe_has_no_warnings():
    assert config_lib.warnings(load_default_config(), 400) == []
    assert config_lib.warnings(load_default_config("vanilla"), 400) == []


def test_hard_updates_longer_than_the_run_warn():
    # configs/default.py:tr-hard: tau 512, 400 steps -> never an update
    assert config_lib.warnings(load_default_config("tr-hard"), 400) == [
        "trust_region.tau=512 is more than the run's 400 steps: the reference is never "
        "updated (a frozen-reference run); lower trust_region.tau"
    ]
    assert config_lib.warnings(load_default_config("tr-hard"), 512) == []
    sft = set_keys(load_default_config("tr-hard"), {"loss.type": "sft"})
    assert config_lib.warnings(sft, 400) == []  # no reference at all


def test_a_pretrained_model_with_a_from_scratch_learning_rate_warns():
    c = set_keys(load_default_config(), {"model.pretrained": "smollm2"})
    (w,) = config_lib.warnings(c, 400)
    assert w.startswith("optimizer.learning_rate=0.001 with model.pretrained='smollm2': ")
    c.optimizer.learning_rate = 1e-5
    assert config_lib.warnings(c, 400) == []


def test_cadences_longer_than_the_run_warn():
    c = load_default_config()  # eval every 100 steps
    assert config_lib.warnings(c, 50) == [
        "train.eval_every_steps=100 is more than the run's 50 steps: held-out metrics only at "
        "step 0 and at the end"
    ]
    c.train.log_every_steps = 60
    assert config_lib.warnings(c, 50)[1].startswith("train.log_every_steps=60 is more than")


def test_real_data_keys_with_the_synthetic_task_warn():
    c = set_keys(load_default_config(), {"data.tokenizer": "smollm2"})
    assert config_lib.warnings(c, 400) == [
        "data.tokenizer='smollm2': real-data settings; data.source='synthetic' ignores them "
        "(set data.source=files, hub or tfds to use them)"
    ]
    # a recipe's own value set on the command line
    (w,) = config_lib.warnings(load_default_config(), 400, set_keys=("data.max_length",))
    assert w.startswith("data.max_length=1024: real-data settings")


def test_build_prints_the_warnings_before_the_model_loads(tiny_config, monkeypatch, capsys):
    _no_model_load(monkeypatch)
    config = tiny_config("tr-hard")  # tau 512, 6 steps
    with pytest.raises(AssertionError, match="the model was loaded"):
        loop.build(config, jax.devices()[:1], progress=False, set_keys=("data.format",))
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "tr-align: warning: trust_region.tau=512 is more than the run's 6 steps: the reference "
        "is never updated (a frozen-reference run); lower trust_region.tau",
        "tr-align: warning: data.format='generic': real-data settings; data.source='synthetic' "
        "ignores them (set data.source=files, hub or tfds to use them)",
    ]
