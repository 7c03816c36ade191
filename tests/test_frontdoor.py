"""The front door (``tr-align dpo|ipo|kto|sft --model --data --workdir``) and the TRL YAML
mapping (``--trl-config``): format detection, defaults, the hard tau, overrides, TRL fields
mapped and refused, and one run end to end on a tiny random Llama directory."""

import json
import os
import shutil
import subprocess
import sys

import jax
import pytest

from conftest import REPO
from tr_align import config as config_lib
from tr_align import frontdoor, trl_config
from tr_align.data import sources
from tr_align.errors import ConfigError, DataError

FIXTURES = REPO / "tests" / "fixtures"
DATA = FIXTURES / "data"
TOKENIZER = FIXTURES / "tokenizer"
TRL = FIXTURES / "trl"
LLAMA = FIXTURES / "hf" / "llama_gqa"  # context 64, no tokenizer files


def _pairs(n):
    return [
        {"prompt": f"Question {i}: what is {i} + {i}?", "chosen": f" {2 * i}.", "rejected": " 7?"}
        for i in range(n)
    ]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A random 2-layer Llama with the fixture tokenizer (vocab 384, context 256), saved as a
    Hugging Face directory."""
    from tr_align import hf
    from tr_align.models import LlamaConfig

    out = tmp_path_factory.mktemp("tiny_llama")
    config = LlamaConfig(
        vocab_size=384,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    init_fn, _ = hf.model_fns(config)
    hf.save_pretrained(init_fn(jax.random.PRNGKey(0)), config, str(out))
    for f in TOKENIZER.iterdir():
        shutil.copy(f, out / f.name)
    return str(out)


def _prepare(method="dpo", num_devices=1, overrides=None, **options):
    """``frontdoor.prepare``; the fixture models have no tokenizer: the fixture tokenizer."""
    overrides = {"data.tokenizer": str(TOKENIZER), **(overrides or {})}
    return frontdoor.prepare(method, options, overrides, num_devices=num_devices)


# --- format detection --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "file, expected",
    [
        ("hh.jsonl", "hh"),
        ("tldr.jsonl", "tldr"),
        ("generic_chat.jsonl", "generic"),
        ("kto.jsonl", "kto"),
        ("ultrafeedback.parquet", "ultrafeedback"),
    ],
)
def test_the_format_is_detected_from_the_records(file, expected):
    records = sources.load_records("files", str(DATA / file))
    assert frontdoor.detect_format(records) == expected


def test_renamed_fields_are_detected_through_data_fields():
    records = sources.load_records("files", str(DATA / "generic.json"))
    fields = {"prompt": "question", "chosen": "answer_good", "rejected": "answer_bad"}
    assert frontdoor.detect_format(records, fields=fields) == "generic"
    with pytest.raises(DataError, match=r"generic.json row 0: cannot tell .*--data.fields"):
        frontdoor.detect_format(records)


def test_implicit_prompt_chat_pairs_are_ultrafeedback_and_unknown_records_one_line():
    turn = [{"role": "user", "content": "Hi"}]
    record = {
        "chosen": turn + [{"role": "assistant", "content": "Hello"}],
        "rejected": turn + [{"role": "assistant", "content": "Go"}],
    }
    assert frontdoor.record_format(record) == "ultrafeedback"
    with pytest.raises(DataError, match=r"x.jsonl:1: cannot tell the record format .*'answer'"):
        frontdoor.detect_format([({"question": "q", "answer": "a"}, "x.jsonl:1")])


# --- the base config ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["dpo", "sft"])
def test_the_base_config_before_the_model_and_data(method):
    """``base_config``: the recipes' shared values (as configs/default.py has them) with the
    front door's (TRL's defaults, written here by hand), no from-scratch model sizes and no
    synthetic task keys."""
    c = frontdoor.base_config(method)
    assert dict(c.model) == {"pretrained": "", "dtype": "float32", "remat": "none"}
    assert (c.data.source, c.data.path, c.data.format, c.data.split) == (
        "files",
        "",
        "generic",
        "train",
    )
    assert (c.data.eval_fraction, c.data.max_length, c.data.max_prompt_length) == (0.1, 1024, 512)
    assert dict(c.data.fields) == {
        k: k for k in ("prompt", "chosen", "rejected", "completion", "label")
    }
    assert (c.data.packing, c.data.group_window, c.data.on_bad_row) == ("prefix_shared", 16, "skip")
    assert not {"num_train", "num_eval", "min_prompt_len", "max_prompt_len", "response_len"} & set(
        c.data
    )
    t = c.train
    assert (t.steps, t.epochs, t.batch_size, t.eval_batch_size, t.seed) == (1, 0.0, 8, 8, 42)
    assert (t.log_every_steps, t.eval_every_steps, t.max_bad_steps) == (1, 1, 10)
    o = c.optimizer
    assert (o.learning_rate, o.warmup_steps, o.schedule) == (
        2e-5 if method == "sft" else 1e-6,
        0,
        "linear",
    )
    assert (o.end_lr_factor, o.weight_decay, o.b1, o.b2, o.eps, o.max_grad_norm) == (
        0.0,
        0.0,
        0.9,
        0.999,
        1e-8,
        1.0,
    )
    assert (c.loss.type, c.loss.beta, c.loss.label_smoothing, c.loss.discopop_tau) == (
        "sft" if method == "sft" else "sigmoid",
        0.1,
        0.0,
        0.05,
    )
    assert (c.trust_region.enabled, c.trust_region.alpha, c.trust_region.tau) == (
        method != "sft",
        0.6,
        1,
    )
    assert (c.mesh.data, c.checkpoint.every_steps, c.checkpoint.max_to_keep) == (-1, 1, 2)
    assert c.logging.wandb is False  # --logging.wandb=true is a key the front door takes


# --- defaults that fit the data ----------------------------------------------------------------


def test_a_15_row_file_gets_defaults_that_train(tmp_path):
    """TRL's defaults (lr 1e-6, beta 0.1, 3 epochs, batch 8), warmup over 10% of the steps,
    max_length the model's context (64 < 1024) with half for the prompt, 10% held out."""
    data = _write_jsonl(tmp_path / "my.jsonl", _pairs(15))
    plan = _prepare(model=str(LLAMA), data=data, workdir=str(tmp_path / "run"))
    c = plan.config
    # 15 rows: round(1.5) = 2 held out, 13 train; 3 epochs of 13 at batch 8 = 39 // 8 = 4 steps
    assert (c.data.source, c.data.path, c.data.format) == ("files", data, "generic")
    assert (c.data.eval_fraction, c.data.eval_split) == (0.1, "")
    assert (c.train.batch_size, c.train.steps, c.train.epochs) == (8, 4, 0.0)
    assert (c.optimizer.learning_rate, c.optimizer.warmup_steps, c.optimizer.schedule) == (
        1e-6,
        1,  # ceil(0.1 * 4)
        "linear",
    )
    assert (c.loss.type, c.loss.beta) == ("sigmoid", 0.1)
    assert (c.data.max_length, c.data.max_prompt_length) == (64, 32)
    assert (c.trust_region.enabled, c.trust_region.alpha, c.trust_region.tau) == (True, 0.6, 1)
    assert c.model.pretrained == str(LLAMA) and c.train.seed == 42
    config_lib.validate(c, 1)  # the loop's own checks pass
    assert "13 train rows" in plan.lines[0] and "detected" in plan.lines[0]


def test_small_files_and_many_devices(tmp_path):
    three = _write_jsonl(tmp_path / "three.jsonl", _pairs(3))
    c = _prepare(model=str(LLAMA), data=three, workdir="w").config
    # 1 held out (round(0.3) -> at least 1), 2 train: batch 2, 3 epochs = 3 steps
    assert (c.train.batch_size, c.train.steps) == (2, 3)
    twenty = _write_jsonl(tmp_path / "twenty.jsonl", _pairs(20))
    c = _prepare(model=str(LLAMA), data=twenty, workdir="w", num_devices=8).config
    assert c.train.batch_size == 8 and c.train.eval_batch_size == 8  # divisible by 8 devices
    with pytest.raises(DataError, match="1 usable row.*at least 2"):
        _prepare(
            model=str(LLAMA), data=_write_jsonl(tmp_path / "one.jsonl", _pairs(1)), workdir="w"
        )
    with pytest.raises(DataError, match=r"2 training examples are fewer than one batch.*8"):
        _prepare(model=str(LLAMA), data=three, workdir="w", num_devices=8)


def test_methods_set_their_loss(tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", _pairs(20))
    base = dict(model=str(LLAMA), data=data, workdir="w")
    assert _prepare("ipo", **base).config.loss.type == "ipo"
    kto = _prepare("kto", **base).config
    # kto splits each of the 18 train pairs into 2 examples: 3 epochs of 36 at batch 8 = 13
    assert (kto.loss.type, kto.train.steps) == ("kto", 13)
    sft = _prepare("sft", **base).config
    assert (sft.loss.type, sft.trust_region.enabled, sft.optimizer.learning_rate) == (
        "sft",
        False,
        2e-5,
    )
    with pytest.raises(ConfigError, match="sft trains without a reference"):
        _prepare("sft", tr="soft", **base)
    with pytest.raises(ConfigError, match="unpaired .*use tr-align kto"):
        _prepare("dpo", model=str(LLAMA), data=str(DATA / "kto.jsonl"), workdir="w")
    assert _prepare("kto", model=str(LLAMA), data=str(DATA / "kto.jsonl"), workdir="w").config


def test_hard_tau_gives_several_reference_updates(tmp_path):
    assert [frontdoor.hard_tau(s) for s in (1, 3, 4, 100, 2048, 100_000)] == [
        1,
        1,
        1,
        25,
        512,
        512,
    ]
    data = _write_jsonl(tmp_path / "d.jsonl", _pairs(200))
    # 180 train rows, 3 epochs at batch 8: 67 steps; tau 16 -> 4 reference copies
    plan = _prepare(model=str(LLAMA), data=data, workdir="w", tr="hard")
    t = plan.config.trust_region
    assert (plan.config.train.steps, t.enabled, t.alpha, t.tau) == (67, True, 1.0, 16)
    assert "a reference copy every 16 of 67 steps" in plan.lines[1]
    t = _prepare(
        model=str(LLAMA), data=data, workdir="w", tr="hard", overrides={"trust_region.tau": "5"}
    ).config.trust_region
    assert t.tau == 5
    off = _prepare(model=str(LLAMA), data=data, workdir="w", tr="off").config.trust_region
    assert not off.enabled


def test_overrides_are_typed_and_unknown_keys_one_line(tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", _pairs(20))
    base = dict(model=str(LLAMA), data=data, workdir="w")
    c = _prepare(
        overrides={
            "loss.beta": "0.05",
            "train.steps": "7",
            "train.batch_size": "4",
            "data.max_length": "48",
            "model.dtype": "bfloat16",
            "data.group_by_length": "true",
        },
        **base,
    ).config
    assert (c.loss.beta, c.train.steps, c.train.batch_size) == (0.05, 7, 4)
    assert (c.data.max_length, c.data.max_prompt_length) == (48, 24)  # prompt follows
    assert c.model.dtype == "bfloat16" and c.data.group_by_length is True
    assert c.optimizer.warmup_steps == 1  # ceil(0.1 * 7)
    assert _prepare(overrides={"train.epochs": "1"}, **base).config.train.steps == 2  # 18 // 8
    with pytest.raises(ConfigError, match="train.step: unknown key; did you mean train.steps"):
        _prepare(overrides={"train.step": "5"}, **base)
    with pytest.raises(ConfigError, match="train.steps='x': expected an integer"):
        _prepare(overrides={"train.steps": "x"}, **base)
    with pytest.raises(ConfigError, match="--modle: unknown flag; did you mean --model"):
        frontdoor.parse_args(["--modle=x"])
    options, overrides = frontdoor.parse_args(
        ["--model", "m", "--data=d", "--trl_config=t.yaml", "--loss.beta=0.2"]
    )
    assert options == {"model": "m", "data": "d", "trl-config": "t.yaml"}
    assert overrides == {"loss.beta": "0.2"}
    with pytest.raises(ConfigError, match="llama_gqa: the directory has no tokenizer files"):
        _prepare(model=str(LLAMA), data=data, workdir="w", overrides={"data.tokenizer": ""})
    with pytest.raises(ConfigError, match="--workdir is required"):
        _prepare(model=str(LLAMA), data=data)
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        _prepare(model=str(LLAMA), data=str(tmp_path / "nope.jsonl"), workdir="w")


def _count_reads(monkeypatch):
    """Every ``sources.load_records`` call (the front door's and the pipeline's) as
    ``(path, split)``."""
    calls, real = [], sources.load_records

    def counting(source, path, split="train", **kw):
        calls.append((path, split))
        return real(source, path, split, **kw)

    monkeypatch.setattr(sources, "load_records", counting)
    return calls


def test_the_data_file_is_read_once(tmp_path, monkeypatch):
    """``prepare`` reads the file to detect the format and count the rows; ``run`` hands those
    records on, so the data pipeline behind the loop reads no file again (the loop is a
    stand-in here that loads the data as ``loop.build`` does; the slow in-process run below
    goes through the real one)."""
    from tr_align.data import pipeline
    from tr_align.training import loop

    reads = _count_reads(monkeypatch)
    data = _write_jsonl(tmp_path / "my.jsonl", _pairs(15))
    plan = _prepare(
        model=str(LLAMA),
        data=data,
        workdir=str(tmp_path / "run"),
        overrides={"data.cache_dir": str(tmp_path / "cache")},
    )
    assert reads == [(data, "train")]
    loaded = {}

    def loop_run(config, workdir, *, records=None, **kw):
        given = {} if records is None else {"records": records}  # None: the pipeline reads
        loaded["data"], _ = pipeline.from_config(config, vocab_size=384, progress=False, **given)
        return {"signal": "SIGTERM", "step": 0, "total_steps": config.train.steps}

    monkeypatch.setattr(loop, "run", loop_run)
    frontdoor.run(plan, progress=False)
    assert reads == [(data, "train")]  # not read again
    report = loaded["data"].report
    # 15 rows: round(0.1 * 15) = 2 held out, 13 train (as read from the file)
    assert (report["records_read"], report["train_examples"], report["eval_examples"]) == (
        15,
        13,
        2,
    )


# --- the TRL YAML ------------------------------------------------------------------------------


def test_a_dpo_config_written_by_trl_maps_to_our_keys():
    """tests/fixtures/trl/dpo_config.yaml: DPOConfig(...).to_dict() + ScriptArguments +
    ModelConfig as TRL 1.16 wrote them (make_trl_configs.py)."""
    base = frontdoor.base_config("dpo")
    s = trl_config.read(
        str(TRL / "dpo_config.yaml"),
        data_parallel=2,
        known_keys=lambda k: config_lib.unknown_key(base, k) is None,
    )
    c = s.config
    assert c["loss.beta"] == 0.05 and c["loss.type"] == "sigmoid"
    assert c["optimizer.learning_rate"] == 5e-7
    assert (c["train.batch_size"], c["train.grad_accum_steps"]) == (2 * 2 * 2, 2)
    assert c["train.eval_batch_size"] == 4 * 2
    assert (c["optimizer.schedule"], c["optimizer.weight_decay"], c["optimizer.b2"]) == (
        "cosine",
        0.01,
        0.98,
    )
    assert (c["optimizer.b1"], c["optimizer.eps"], c["optimizer.max_grad_norm"]) == (
        0.9,
        1e-8,
        2.0,
    )
    assert (c["train.seed"], c["train.log_every_steps"], c["checkpoint.every_steps"]) == (7, 1, 3)
    assert c["checkpoint.max_to_keep"] == 1
    assert (c["model.dtype"], c["model.remat"]) == ("float32", "none")
    assert (c["trust_region.enabled"], c["trust_region.alpha"], c["trust_region.tau"]) == (
        True,
        0.5,
        2,
    )
    assert (c["data.max_length"], c["data.split"], c["loss.label_smoothing"]) == (128, "train", 0)
    assert "train.steps" not in c  # max_steps -1: the epochs decide
    assert s.options == {
        "model": "tests/fixtures/hf/llama_gqa",
        "data": "tests/fixtures/data/generic.json",
        "workdir": "runs/trl-dpo",
        "epochs": 2.0,
        "warmup_ratio": 0.1,
        "eval_split": "test",
    }
    for name in ("report_to", "run_name", "push_to_hub", "hub_token", "lora_r"):
        assert name in s.ignored
    note = next(n for n in s.notes if "ignored" in n)  # names the ones set to something
    assert note.startswith(f"dpo_config.yaml: {len(s.ignored)} logging/hub/launcher fields")
    assert "run_name" in note and "push_to_hub" not in note


def test_a_kto_config_written_by_trl():
    s = trl_config.read(str(TRL / "kto_config.yaml"))
    assert s.config["loss.type"] == "kto" and s.config["loss.beta"] == 0.2
    assert (s.config["loss.desirable_weight"], s.config["loss.undesirable_weight"]) == (1.5, 1.0)


def test_the_command_decides_the_loss_but_dpo_keeps_the_yamls(tmp_path):
    """``tr-align ipo --trl-config=dpo.yaml``: IPO (the YAML's loss_type is DPOConfig's
    default); ``tr-align dpo`` takes the YAML's loss_type (it may name any DPO-family loss)."""
    data = _write_jsonl(tmp_path / "d.jsonl", _pairs(20))
    (tmp_path / "c.yaml").write_text("loss_type: [hinge]\nbeta: 0.3\n", encoding="utf-8")
    base = dict(model=str(LLAMA), data=data, workdir="w")
    base["trl-config"] = str(tmp_path / "c.yaml")
    dpo = _prepare("dpo", **base).config
    assert (dpo.loss.type, dpo.loss.beta) == ("hinge", 0.3)
    plan = _prepare("ipo", **base)
    assert (plan.config.loss.type, plan.config.loss.beta) == ("ipo", 0.3)
    assert any("loss_type='hinge' of the YAML: replaced by ipo's loss" in x for x in plan.lines)


def test_unsupported_trl_values_are_refused_by_name_in_one_line():
    doc = {
        "beta": 0.1,
        "betta": 0.2,
        "fp16": True,
        "use_peft": True,
        "optim": "adafactor",
        "lr_scheduler_type": "polynomial",
        "report_to": ["wandb"],  # harmless: accepted
    }
    with pytest.raises(ConfigError) as e:
        trl_config.from_dict(doc, where="dpo.yaml")
    message = str(e.value)
    assert "\n" not in message and message.startswith("dpo.yaml: not supported: ")
    for part in (
        "betta (not a TRL field tr_align knows; did you mean beta?)",
        "fp16=True (only False: use bf16)",
        "use_peft=True",
        "optim='adafactor'",
        "lr_scheduler_type='polynomial'",
    ):
        assert part in message
    assert "report_to" not in message


def test_trl_loss_options_map_to_the_new_keys_or_are_refused_when_absent():
    doc = {
        "loss_type": ["sigmoid", "bco_pair", "sft"],
        "loss_weights": [0.8, 0.2, 1.0],
        "rpo_alpha": 0.5,
        "ld_alpha": 0.3,
        "use_weighting": True,
        "reference_free": True,
        "precompute_ref_log_probs": True,
        "truncation_mode": "keep_end",
        "max_prompt_length": None,
        "warmup_steps": 20,
        "bf16": True,
        "gradient_checkpointing": True,
    }
    c = trl_config.from_dict(doc).config  # every key available: all mapped
    assert c["loss.type"] == ("sigmoid", "bco_pair", "sft")
    assert c["loss.weights"] == (0.8, 0.2, 1.0)
    assert (c["loss.rpo_alpha"], c["loss.ld_alpha"]) == (0.5, 0.3)
    assert c["loss.use_weighting"] and c["loss.reference_free"]
    assert c["loss.precompute_ref_log_probs"] and c["data.truncation_mode"] == "keep_end"
    assert (c["data.max_prompt_length"], c["optimizer.warmup_steps"]) == (0, 20)
    assert (c["model.dtype"], c["model.remat"]) == ("bfloat16", "full")
    assert trl_config.from_dict({"loss_type": "aot_unpaired"}).config["loss.type"] == "aot_pair"
    # keys this tr_align lacks: TRL's default is accepted with a note, anything else refused
    s = trl_config.from_dict(
        {"use_weighting": False, "truncation_mode": "keep_start"}, known_keys=lambda k: False
    )
    assert s.config == {} and "use_weighting=False" in s.notes[0]
    with pytest.raises(ConfigError, match=r"rpo_alpha=0.5 \(loss.rpo_alpha is not available"):
        trl_config.from_dict({"rpo_alpha": 0.5}, known_keys=lambda k: False)


def test_the_docs_show_every_mapped_trl_field():
    page = (REPO / "docs" / "switching.md").read_text(encoding="utf-8")
    assert trl_config.markdown_table() in page


def test_yaml_numbers_and_errors(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("learning_rate: 1e-6\nbeta: 0.1\n", encoding="utf-8")  # PyYAML: '1e-6' a str
    assert trl_config.read(str(f)).config["optimizer.learning_rate"] == 1e-6
    f.write_text("beta: [0.1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"c.yaml:\d+: not valid YAML"):
        trl_config.read(str(f))
    f.write_text("beta: high\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="beta='high': expected a number"):
        trl_config.read(str(f))


# --- end to end -------------------------------------------------------------------------------


def _cli(*args, cwd, timeout=600):
    env = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0"}  # one CPU device
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "tr_align", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_front_door_trains_exports_and_generate_answers(tiny_llama, tmp_path):
    """``tr-align dpo --model=DIR --data=my.jsonl --workdir=O`` on a 15-row file with the
    defaults, then ``tr-align generate --model=O/hf``: one try each, no traceback."""
    _write_jsonl(tmp_path / "my.jsonl", _pairs(15))
    out = _cli("dpo", f"--model={tiny_llama}", "--data=my.jsonl", "--workdir=O", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert "done at step 4/4" in out.stdout
    hf_dir = tmp_path / "O" / "hf"
    assert f"wrote the trained policy with its tokenizer to {os.path.join('O', 'hf')}" in out.stdout
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert oct((hf_dir / name).stat().st_mode & 0o777) == "0o644", name
    answer = _cli(
        "generate", "--model=O/hf", "--prompt=Question 3:", "--max_new_tokens=4", cwd=tmp_path
    )
    assert answer.returncode == 0, answer.stderr[-3000:]
    assert "### prompt: Question 3:" in answer.stdout


@pytest.mark.slow
def test_trl_yaml_run_in_process(tiny_llama, tmp_path, monkeypatch):
    """The TRL-written DPO YAML, with the model and data given on the command line (they
    win over model_name_or_path / dataset_name): trains with its settings and exports."""
    data = _write_jsonl(tmp_path / "d.jsonl", _pairs(12))
    options, overrides = frontdoor.parse_args(
        [
            f"--trl-config={TRL / 'dpo_config.yaml'}",
            f"--model={tiny_llama}",
            f"--data={data}",
            f"--workdir={tmp_path / 'run'}",
        ]
    )
    reads = _count_reads(monkeypatch)
    plan = frontdoor.prepare("dpo", options, overrides, num_devices=1)
    c = plan.config
    # 12 rows: 1 held out, 11 train; batch 2 x 2 accumulation = 4; 2 epochs: 22 // 4 = 5 steps
    assert (c.train.batch_size, c.train.grad_accum_steps, c.train.steps) == (4, 2, 5)
    assert (c.optimizer.warmup_steps, c.trust_region.tau, c.loss.beta) == (1, 2, 0.05)
    summary = frontdoor.run(plan, progress=False, devices=jax.devices()[:1])
    assert summary["step"] == 5 and summary["train"]["ref/updates"] == 2  # steps 2 and 4
    assert reads == [(data, "train")]  # read once: the loop's data pipeline took prepare's
    assert (tmp_path / "run" / "hf" / "tokenizer.json").exists()


@pytest.mark.slow
def test_front_door_errors_are_one_line(tmp_path):
    """Bad input to the front door: one ``tr-align: <kind> error: ...`` line, exit 2, before
    any training and with nothing written."""
    _write_jsonl(tmp_path / "my.jsonl", _pairs(15))
    (tmp_path / "dpo.yaml").write_text("beta: 0.1\nfp16: true\n", encoding="utf-8")
    base = [f"--model={LLAMA}", f"--data.tokenizer={TOKENIZER}", "--workdir=O"]
    for args, expected in (
        (["--data=nope.jsonl"], "tr-align: data error: nope.jsonl: no such file"),
        (
            ["--data=my.jsonl", "--loss.betta=0.2"],
            "tr-align: config error: loss.betta: unknown key; did you mean loss.beta?",
        ),
        (
            ["--data=my.jsonl", "--trl-config=dpo.yaml"],
            "tr-align: config error: dpo.yaml: not supported: fp16=True (only False: use bf16)",
        ),
    ):
        out = _cli("dpo", *base, *args, cwd=tmp_path)
        assert (out.returncode, out.stderr.strip()) == (2, expected), out.stderr[-2000:]
    assert not (tmp_path / "O").exists()
