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


# --- values that silently ruined a run or gave tracebacks (Reliability H) --------------------


@pytest.mark.parametrize(
    "key,value,pattern",
    [
        ("optimizer.eps", -1.0, r"optimizer\.eps=-1\.0: must be a number > 0"),
        ("optimizer.eps", 0.0, r"optimizer\.eps=0\.0: must be a number > 0"),
        ("loss.beta", 1e-45, r"loss\.beta=1e-45: must be >= 1e-06"),
        ("optimizer.b1", 1.5, r"optimizer\.b1=1\.5: must be in \[0, 1\)"),
        ("optimizer.b2", 1.0, r"optimizer\.b2=1\.0: must be in \[0, 1\)"),
        ("optimizer.b1", -0.1, r"optimizer\.b1=-0\.1"),
        ("optimizer.weight_decay", -1.0, r"optimizer\.weight_decay=-1\.0: must be a number >= 0"),
        ("optimizer.end_lr_factor", 5.0, r"optimizer\.end_lr_factor=5\.0: must be in \[0, 1\]"),
        ("optimizer.end_lr_factor", -0.5, r"optimizer\.end_lr_factor=-0\.5"),
        ("loss.desirable_weight", -1.0, r"loss\.desirable_weight=-1\.0: must be a number >= 0"),
        ("loss.undesirable_weight", -2, r"loss\.undesirable_weight=-2\.0: must be a number >= 0"),
        ("optimizer.max_grad_norm", float("nan"), r"optimizer\.max_grad_norm=nan: must be finite"),
        ("optimizer.max_grad_norm", float("inf"), r"optimizer\.max_grad_norm=inf"),
        (
            "optimizer.warmup_steps",
            7,
            r"optimizer\.warmup_steps=7: must be <= train\.steps=6",
        ),
        (
            "model.max_position_embeddings",
            15,
            r"the synthetic sequence length .*=16: longer than model\.max_position_embeddings=15",
        ),
        ("loss.discopop_tau", 0.0, r"loss\.discopop_tau=0\.0: must be a number > 0"),
        ("model.vocab_size", 2, r"model\.vocab_size=2: too small for the synthetic task"),
        ("data.response_len", 0, r"data\.response_len=0: must be an integer >= 2"),
        ("data.response_len", 1, r"data\.response_len=1"),
        ("data.num_train", 0, r"data\.num_train=0: must be an integer >= 1"),
        ("data.num_eval", 0, r"data\.num_eval=0: must be an integer >= 1"),
        ("data.min_prompt_len", 0, r"data\.min_prompt_len=0: must be an integer >= 1"),
        ("data.max_prompt_len", 3, r"data\.max_prompt_len=3: must be an integer >= "),
        ("train.seed", -1, r"train\.seed=-1: must be an integer in \[0, 2\*\*32\)"),
    ],
)
def test_ruinous_values_are_refused_in_one_line(tiny_config, key, value, pattern):
    config = tiny_config(**{key: value})
    with pytest.raises(
        ConfigError, match=pattern.replace("must be finite", "must be a finite")
    ) as err:
        config_lib.validate(config, num_devices=8)
    assert "\n" not in str(err.value)


def test_both_kto_weights_zero_and_too_few_synthetic_prompts(tiny_config):
    c = tiny_config(**{"loss.desirable_weight": 0.0, "loss.undesirable_weight": 0.0})
    with pytest.raises(ConfigError, match=r"loss\.undesirable_weight=0\.0: and .* both 0"):
        config_lib.validate(c, num_devices=8)
    config_lib.validate(tiny_config(**{"loss.desirable_weight": 0.0}), num_devices=8)
    # 4 content tokens, prompts of exactly 2 tokens: 16 distinct prompts for 256 + 64 examples
    # (the generator would loop forever looking for new ones)
    c = tiny_config(**{"model.vocab_size": 7, "data.min_prompt_len": 2, "data.max_prompt_len": 2})
    with pytest.raises(
        ConfigError,
        match=r"data\.num_train=256: with data\.num_eval=64 exceeds "
        r"the 16 distinct prompts",
    ):
        config_lib.validate(c, num_devices=8)


def test_max_grad_norm_zero_or_negative_still_means_off(tiny_config):
    for v in (0.0, -1.0, 0):
        config_lib.validate(tiny_config(**{"optimizer.max_grad_norm": v}), num_devices=8)


def test_real_data_longer_than_the_model_context(tiny_config):
    c = tiny_config(
        **{
            "data.source": "files",
            "data.path": "x.jsonl",
            "data.max_length": 128,
            "data.max_prompt_length": 64,
            "model.max_position_embeddings": 64,
        }
    )
    with pytest.raises(
        ConfigError,
        match=r"data\.max_length=128: longer than "
        r"model\.max_position_embeddings=64",
    ):
        config_lib.validate(c, num_devices=8)
    # a pretrained model's context is checked once its config is read
    import types

    c.model.max_position_embeddings = 128
    c.model.pretrained = "org/model"
    config_lib.check_model_fits_data(c, types.SimpleNamespace(max_position_embeddings=128))
    with pytest.raises(
        ConfigError,
        match=r"longer than the context of model\.pretrained="
        r"'org/model'=100",
    ):
        config_lib.check_model_fits_data(c, types.SimpleNamespace(max_position_embeddings=100))


def test_warmup_longer_than_an_epoch_based_run():
    import ml_collections

    from tr_align.training import optim

    cfg = ml_collections.ConfigDict(
        dict(learning_rate=1e-3, warmup_steps=50, schedule="linear", end_lr_factor=0.0)
    )
    assert float(optim.make_schedule(cfg, 50)(50)) == pytest.approx(1e-3)
    with pytest.raises(ConfigError, match=r"optimizer\.warmup_steps=50: must be <= the run's 49"):
        optim.make_schedule(cfg, 49)


def test_absurd_learning_rate_warns(tiny_config, caplog):
    import logging

    with caplog.at_level(logging.WARNING):
        config_lib.validate(tiny_config(**{"optimizer.learning_rate": 1e6}), num_devices=8)
    assert any(
        "optimizer.learning_rate=1000000.0 is far above" in r.getMessage() for r in caplog.records
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        config_lib.validate(tiny_config(**{"optimizer.learning_rate": 1e-3}), num_devices=8)
    assert not any("learning_rate" in r.getMessage() for r in caplog.records)


def test_unknown_keys_get_a_suggestion(tiny_config):
    c = tiny_config()
    assert config_lib.unknown_key(c, "train.steps") is None
    assert config_lib.unknown_key(c, "train.step") == (
        "train.step: unknown key; did you mean train.steps?"
    )
    assert config_lib.unknown_key(c, "trian.steps") == (
        "trian.steps: unknown key; did you mean train.steps?"
    )
    assert config_lib.unknown_key(c, "train.foo").startswith(
        "train.foo: unknown key; train has: batch_size, epochs, eval_batch_size"
    )
    assert config_lib.unknown_key(c, "train.steps.x") == (
        "train.steps.x: unknown key (train.steps is a value, not a block)"
    )
    del c.train["grad_accum_steps"]
    assert "an optional key this recipe leaves out" in config_lib.unknown_key(
        c, "train.grad_accum_steps"
    )


@pytest.mark.slow
def test_cli_config_errors_are_one_line_before_any_output(tmp_path):
    import os
    import subprocess
    import sys

    for flag, want in [
        ("--config.train.foo=1", "tr-align: config error: train.foo: unknown key; train has: "),
        ("--config.optimizer.eps=-1", "tr-align: config error: optimizer.eps=-1.0: must be"),
    ]:
        out = subprocess.run(
            [sys.executable, "-m", "tr_align", "train", f"--workdir={tmp_path / 'run'}", flag],
            cwd=REPO,
            env={**os.environ, "JAX_PLATFORMS": "cpu"},
            capture_output=True,
            text=True,
            timeout=600,  # a loaded 2-core machine imports jax slowly
        )
        assert out.returncode == 2, out.stderr[-2000:]
        assert out.stderr.strip().splitlines() == [out.stderr.strip()]  # one line
        assert out.stderr.startswith(want) and out.stdout == ""
        assert not (tmp_path / "run").exists()


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


# configs/default.py's keys and values (repr: a float stays a float) as the file wrote them out
# before the recipes shared config.recipe_base, copied by hand from it; trust_region.lora_mode
# (at its default) is the one key the builder adds. The default run must keep them.
DEFAULT_RECIPE = """
checkpoint.async_save = False
checkpoint.every_steps = 100
checkpoint.max_to_keep = 2
checkpoint.timeout_s = 1200
data.buckets = ()
data.cache_dir = ''
data.chat_template = ''
data.data_dir = ''
data.eval_fraction = 0.05
data.eval_split = ''
data.fields = {'chosen': 'chosen', 'completion': 'completion', 'label': 'label', 'prompt': 'prompt', 'rejected': 'rejected'}
data.format = 'generic'
data.group_by_length = False
data.group_window = 16
data.max_length = 1024
data.max_prompt_len = 8
data.max_prompt_length = 512
data.min_prompt_len = 4
data.num_eval = 512
data.num_train = 2048
data.on_bad_row = 'skip'
data.pack_length = 0
data.packing = 'prefix_shared'
data.path = ''
data.response_len = 6
data.source = 'synthetic'
data.split = 'train'
data.tokenizer = ''
data.truncation_mode = 'keep_start'
logging.wandb = False
logging.wandb_name = ''
logging.wandb_project = 'tr_align'
loss.bco_running_mean = False
loss.beta = 0.1
loss.desirable_weight = 1.0
loss.discopop_tau = 0.05
loss.label_smoothing = 0.0
loss.ld_alpha = 1.0
loss.precompute_ref_log_probs = False
loss.reference_free = False
loss.rpo_alpha = 0.0
loss.type = 'sigmoid'
loss.undesirable_weight = 1.0
loss.use_weighting = False
loss.weights = ()
mesh.data = -1
mesh.fsdp = 1
mesh.rules = ()
mesh.tensor = 1
model.dtype = 'float32'
model.hidden_size = 64
model.intermediate_size = 128
model.max_position_embeddings = 64
model.num_attention_heads = 4
model.num_hidden_layers = 2
model.num_key_value_heads = 2
model.pretrained = ''
model.remat = 'none'
model.rms_norm_eps = 1e-06
model.rope_theta = 10000.0
model.tie_word_embeddings = True
model.vocab_size = 32
optimizer.b1 = 0.9
optimizer.b2 = 0.999
optimizer.end_lr_factor = 0.0
optimizer.eps = 1e-08
optimizer.learning_rate = 0.001
optimizer.max_grad_norm = 1.0
optimizer.schedule = 'linear'
optimizer.warmup_steps = 20
optimizer.weight_decay = 0.0
train.batch_size = 32
train.epochs = 0.0
train.eval_batch_size = 128
train.eval_every_steps = 100
train.grad_accum_steps = 1
train.log_every_steps = 1
train.logps_chunk_size = 0
train.max_bad_steps = 10
train.seed = 0
train.steps = 400
trust_region.alpha = 0.6
trust_region.enabled = True
trust_region.lora_mode = 'factors'
trust_region.ref_dtype = 'float32'
trust_region.tau = 1
"""


def _lines(config, prefix=""):
    """``KEY = repr(VALUE)`` of every value of a config (``data.fields``: one value)."""
    out = []
    for key, value in config.items():
        if hasattr(value, "items") and key != "fields":
            out += _lines(value, f"{prefix}{key}.")
        else:
            value = dict(sorted(value.items())) if key == "fields" else value
            out.append(f"{prefix}{key} = {value!r}")
    return out


def test_the_default_recipe_keeps_its_values():
    """configs/default.py (config.recipe_base + its own values): every key and value of the
    file as it was written out, with the same types (so that --config.train.epochs=1.5 and
    --config.data.eval_fraction=0.2 parse as numbers), the presets, and data.max_prompt_length
    following an override of data.max_length."""
    from conftest import load_default_config

    assert sorted(_lines(load_default_config())) == DEFAULT_RECIPE.split("\n")[1:-1]
    hard = [line for line in _lines(load_default_config("tr-hard")) if "trust_region." in line]
    assert sorted(hard) == [
        "trust_region.alpha = 1.0",
        "trust_region.enabled = True",
        "trust_region.lora_mode = 'factors'",
        "trust_region.ref_dtype = 'float32'",
        "trust_region.tau = 512",
    ]
    assert load_default_config("vanilla").trust_region.enabled is False
    with pytest.raises(ValueError, match="unknown preset 'tr-medium'; expected one of"):
        load_default_config("tr-medium")
    c = load_default_config()
    c.data.max_length = 300
    assert c.data.max_prompt_length == 150
    config_lib.validate(load_default_config(), num_devices=8)


def test_the_recipes_share_one_table(monkeypatch):
    """configs/default.py and the front door take their shared values from one place
    (tr_align.defaults.RECIPE, built by config.recipe_base): a change there reaches both."""
    from conftest import load_default_config
    from tr_align import defaults, frontdoor

    monkeypatch.setitem(defaults.RECIPE, "optimizer.b2", 0.95)
    monkeypatch.setitem(defaults.RECIPE, "data.on_bad_row", "error")
    monkeypatch.setitem(defaults.DEFAULTS, "loss.rpo_alpha", defaults.Default(0.25, "test"))
    for c in (load_default_config(), frontdoor.base_config("dpo"), frontdoor.base_config("sft")):
        assert (c.optimizer.b2, c.data.on_bad_row, c.loss.rpo_alpha) == (0.95, "error", 0.25)
