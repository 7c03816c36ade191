"""``tr-align`` / ``python -m tr_align`` end to end in subprocesses, as a user runs it."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

TINY = [
    "--config.train.steps=4",
    "--config.optimizer.warmup_steps=1",  # at most train.steps (config check)
    "--config.train.batch_size=8",
    "--config.train.eval_every_steps=2",
    "--config.checkpoint.every_steps=2",
    "--config.data.num_train=64",
    "--config.data.num_eval=32",
    "--config.train.eval_batch_size=32",
]


def _cli(*args, timeout=300, env=None):
    env = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "tr_align", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_help_lists_commands():
    out = _cli("--help")
    assert out.returncode == 0 and "train" in out.stdout


def test_unknown_command():
    out = _cli("trian")
    assert out.returncode == 2 and "unknown command 'trian'" in out.stderr


def test_bad_config_value_is_one_line_error(tmp_path):
    out = _cli("train", f"--workdir={tmp_path}", "--config.trust_region.alpha=2.0")
    assert out.returncode == 2
    assert out.stderr.strip() == "tr-align: config error: trust_region.alpha=2.0: must be in [0, 1]"
    assert not os.listdir(tmp_path)  # rejected before anything was written


@pytest.mark.slow
def test_train_preset_and_overrides(tmp_path):
    out = _cli(
        "train",
        "--config=configs/default.py:tr-hard",
        f"--workdir={tmp_path}",
        "--config.trust_region.tau=2",
        "--config.loss.type=ipo",
        *TINY,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "done at step 4/4" in out.stdout
    config = json.loads((tmp_path / "config.json").read_text())
    assert {k: config["trust_region"][k] for k in ("enabled", "alpha", "tau")} == {
        "enabled": True,
        "alpha": 1.0,
        "tau": 2,
    }
    assert config["loss"]["type"] == "ipo"
    last = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("ref/updates", 0) for r in last) == 2
    # A changed loss.beta on resume is refused in one line before anything is written...
    cmd = [
        "train",
        "--config=configs/default.py:tr-hard",
        f"--workdir={tmp_path}",
        "--config.trust_region.tau=2",
        "--config.loss.type=ipo",
        "--config.loss.beta=0.2",
        *TINY,
    ]
    before = (tmp_path / "config.json").read_text()
    refused = _cli(*cmd)
    assert refused.returncode == 2
    assert refused.stderr.strip().startswith("tr-align: config error: ")
    assert "loss.beta 0.1 -> 0.2" in refused.stderr
    assert "--allow_config_change=loss.beta" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert (tmp_path / "config.json").read_text() == before
    # ...and accepted with the override: resumes, finds the run finished.
    again = _cli(*cmd, "--allow_config_change=loss.beta")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming step 4 with config changes: loss.beta 0.1 -> 0.2" in again.stdout
    assert "resuming from step 4" in again.stdout
    assert json.loads((tmp_path / "config.json").read_text())["loss"]["beta"] == 0.2


@pytest.mark.slow
def test_generate_with_the_shipped_smollm2():
    out = _cli(
        "generate",
        "--model=smollm2",
        "--chat",
        "--max_new_tokens=12",
        "--prompt=What is the capital of France?",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert (
        "### prompt: What is the capital of France?\nThe capital of France is Paris." in out.stdout
    )


def test_every_command_maps_project_errors_to_one_line(tmp_path):
    out = _cli("export", f"--workdir={tmp_path}", f"--out={tmp_path / 'out'}")
    assert out.returncode == 2
    assert out.stderr.strip() == (
        f"tr-align: {tmp_path / 'model_config.json'}: not found; is {tmp_path} a tr-align run "
        "directory?"
    )
    out = _cli("eval", f"--policy={tmp_path / 'nope'}", f"--out={tmp_path / 'out'}")
    assert out.returncode == 2 and out.stderr.strip().startswith("tr-align: ")
    assert "not a model" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_command_help_lists_its_own_flags_and_config_keys():
    out = _cli("train", "--config=configs/hh_tiny.py", "--help")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("usage: tr-align train [flags]")
    for flag in ("--workdir", "--config", "--stop_at_step", "--allow_config_change"):
        assert f"\n  {flag} (" in out.stdout
    assert "--alsologtostderr" not in out.stdout and "--chex_n_cpu_devices" not in out.stdout
    assert "\n  data.format = 'hh' " in out.stdout  # configs/hh_tiny.py's values
    assert "\n  data.max_prompt_length = 192 " in out.stdout


@pytest.mark.slow
def test_a_tokenizer_command_prints_no_library_banners(tmp_path):
    # a fresh copy of the HH fixture, so datasets builds (and would report) a new split
    data = tmp_path / "hh.jsonl"
    data.write_bytes((REPO / "tests" / "fixtures" / "data" / "hh.jsonl").read_bytes())
    out = _cli(
        "data",
        "inspect",
        "--config=configs/hh_tiny.py",
        f"--config.data.path={data}",
        f"--config.data.cache_dir={tmp_path / 'tokenized'}",
        "--num_examples=1",
        env={"HF_DATASETS_CACHE": str(tmp_path / "hf_datasets")},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout + out.stderr
    assert "6 train / 2 eval examples from 8 records" in out.stdout  # 8 rows, 0.25 held out
    for banner in ("PyTorch was not found", "[transformers]", "Generating train split"):
        assert banner not in text, (banner, text[-2000:])
