"""Bad config values are rejected before any compute, with one line naming key, value and rule."""

import pytest

from conftest import REPO
from tr_align import config as config_lib
from tr_align.config import ConfigError


@pytest.mark.parametrize(
    "key,value,pattern",
    [
        ("loss.type", "dpo", r"loss\.type='dpo': must be one of sigmoid, ipo, .*kto_pair"),
        ("loss.beta", 0.0, r"loss\.beta=0\.0: must be a number > 0"),
        ("loss.beta", -1.0, r"loss\.beta=-1\.0"),
        ("loss.label_smoothing", 0.5, r"loss\.label_smoothing=0\.5: must be in \[0, 0\.5\)"),
        ("trust_region.alpha", 1.5, r"trust_region\.alpha=1\.5: must be in \[0, 1\]"),
        ("trust_region.alpha", -0.1, r"trust_region\.alpha=-0\.1"),
        ("trust_region.tau", 0, r"trust_region\.tau=0: must be an integer >= 1"),
        (
            "train.batch_size",
            12,
            r"train\.batch_size=12: must be divisible by the data-parallel size mesh\.data\*mesh\.fsdp=8",
        ),
        ("train.steps", 0, r"train\.steps=0: must be an integer >= 1"),
        ("optimizer.learning_rate", 0.0, r"optimizer\.learning_rate=0\.0"),
        (
            "optimizer.schedule",
            "step",
            r"optimizer\.schedule='step': must be one of linear, cosine, constant",
        ),
        ("checkpoint.every_steps", 0, r"checkpoint\.every_steps=0"),
        ("mesh.data", 3, r"mesh=.*needs 3 devices, 8 available|does not divide 8 devices"),
        ("model.remat", "some", r"model\.remat='some': must be one of none, full, save_dots"),
        (
            "trust_region.ref_dtype",
            "float16",
            r"trust_region\.ref_dtype='float16': must be 'float32' or 'bfloat16'",
        ),
        ("train.grad_accum_steps", 0, r"train\.grad_accum_steps=0: must be an integer >= 1"),
        ("train.logps_chunk_size", -1, r"train\.logps_chunk_size=-1: must be an integer >= 0"),
        (
            "train.grad_accum_steps",
            2,
            r"train\.batch_size=8: must be divisible by train\.grad_accum_steps \* mesh\.data "
            r"\* mesh\.fsdp = 2 \* 8",
        ),
    ],
)
def test_invalid_values_name_the_key(tiny_config, key, value, pattern):
    config = tiny_config(**{key: value})
    with pytest.raises(ConfigError, match=pattern) as err:
        config_lib.validate(config, num_devices=8)
    assert "\n" not in str(err.value)


def test_default_and_presets_are_valid(tiny_config):
    for preset in (None, "tr-soft", "tr-hard", "vanilla"):
        config_lib.validate(tiny_config(preset), num_devices=8)


def test_missing_key(tiny_config):
    config = tiny_config()
    del config.trust_region["tau"]
    with pytest.raises(ConfigError, match=r"trust_region\.tau: missing"):
        config_lib.validate(config, num_devices=1)


def test_model_block_errors_name_the_key(tiny_config, tmp_path):
    with pytest.raises(
        ConfigError, match=r"model: LlamaConfig.num_attention_heads \(4\) must be divisible"
    ):
        config_lib.validate(tiny_config(**{"model.num_key_value_heads": 3}), num_devices=1)
    with pytest.raises(
        ConfigError, match=r"model.pretrained='.*nope': not a Hugging Face model directory"
    ):
        config_lib.validate(
            tiny_config(**{"model.pretrained": str(tmp_path / "nope")}), num_devices=1
        )
    with pytest.raises(ConfigError, match=r"model.pretrained='.*x.gguf': no such .gguf file"):
        config_lib.validate(
            tiny_config(**{"model.pretrained": str(tmp_path / "x.gguf")}), num_devices=1
        )
    with pytest.raises(ConfigError, match=r"model.dtype='float16'"):
        config_lib.validate(tiny_config(**{"model.dtype": "float16"}), num_devices=1)


def test_hub_model_id_offline_gives_a_config_error(monkeypatch, tmp_path):
    from huggingface_hub import constants

    from tr_align.io import pretrained

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert pretrained.check_source("no-such-org/no-such-model") is None  # a hub id is accepted
    assert pretrained.resolve(str(tmp_path)) == str(tmp_path)  # local paths win
    with pytest.raises(ConfigError, match="model.pretrained='no-such-org/no-such-model'"):
        pretrained.resolve("no-such-org/no-such-model")


@pytest.mark.parametrize(
    "name",
    ["pythia28_hh", "pythia69_hh", "pythia28_tldr", "pythia69_tldr", "llama3_8b_ultrafeedback"],
)
def test_paper_recipes_load_and_validate(name):
    from tr_align.config import load_config_file

    for preset, loss, tr in [
        ("sft", "sft", False),
        ("dpo", "sigmoid", False),
        ("tr-soft", "sigmoid", (0.6, 1)),
        ("tr-hard", "sigmoid", (1.0, 512)),
    ]:
        c = load_config_file(str(REPO / "configs" / f"{name}.py"), preset)
        config_lib.validate(c, 8)
        assert c.loss.type == loss and c.trust_region.enabled == bool(tr)
        if tr:
            assert (c.trust_region.alpha, c.trust_region.tau) == tr
        assert (c.loss.beta, c.data.max_length, c.train.epochs) == (0.05, 1024, 1.0)
        assert c.optimizer.learning_rate == (2e-5 if preset == "sft" else 1e-6)


def test_memory_levers_are_optional(tiny_config):
    """Configs written before the memory levers still validate (defaults: all off)."""
    config = tiny_config()
    for block, key in (
        ("model", "remat"),
        ("trust_region", "ref_dtype"),
        ("train", "grad_accum_steps"),
        ("train", "logps_chunk_size"),
    ):
        del config[block][key]
        assert (
            config_lib.get_optional(config, f"{block}.{key}")
            == (config_lib.OPTIONAL_DEFAULTS[f"{block}.{key}"])
        )
    config_lib.validate(config, num_devices=8)


@pytest.mark.parametrize(
    "key,value,pattern",
    [
        ("train.max_bad_steps", 0, r"train\.max_bad_steps=0: must be an integer >= 1"),
        ("train.max_bad_steps", -3, r"train\.max_bad_steps=-3"),
        (
            "optimizer.schedule_extensions",
            [[3, 0, 0.0]],
            r"optimizer\.schedule_extensions=\[\[3, 0, 0\.0\]\]: must be a list of \[resume step",
        ),
        ("optimizer.schedule_extensions", [[3, 6]], r"optimizer\.schedule_extensions="),
    ],
)
def test_resume_and_numerics_keys_are_checked(tiny_config, key, value, pattern):
    config = tiny_config(**{key: value})
    with pytest.raises(ConfigError, match=pattern) as err:
        config_lib.validate(config, num_devices=8)
    assert "\n" not in str(err.value)
    del config.train["max_bad_steps"]  # optional: absent means the default (10)
    config.optimizer.schedule_extensions = [[3, 6, 0.0]]
    config_lib.validate(config, num_devices=8)
