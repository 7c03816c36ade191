"""One status line or bar per long phase (``tr_align.progress``): model loads, eval sampling,
generation; shown in a terminal (or when asked), silent in logs and tests by default."""

import io
import re

import jax
import pytest

from conftest import REPO
from tr_align import progress
from tr_align.experiments import evaluate
from tr_align.io import pretrained
from tr_align.training import loop


def _last_line(buf):
    return buf.getvalue().replace("\r", "\n").strip().splitlines()[-1]


def test_a_phase_is_one_status_line_with_the_elapsed_time():
    buf = io.StringIO()
    with progress.phase("loading smollm2", enabled=True, file=buf):
        pass
    assert re.fullmatch(r"tr-align: loading smollm2 \(00:0\d\)", _last_line(buf)), buf.getvalue()
    quiet = io.StringIO()  # enabled=None: only on a terminal (a StringIO is none)
    with progress.phase("loading smollm2", file=quiet):
        pass
    assert quiet.getvalue() == ""


def test_a_bar_counts_its_items():
    buf = io.StringIO()
    assert list(progress.bar(range(3), "sampling x", enabled=True, file=buf)) == [0, 1, 2]
    assert re.match(r"tr-align: sampling x: 100%.*\b3/3\b", _last_line(buf)), buf.getvalue()


@pytest.fixture
def shown(monkeypatch):
    """Every phase and bar shown, into one buffer: (descriptions, buffer)."""
    buf, descs = io.StringIO(), []
    phase, bar = progress.phase, progress.bar

    def show_phase(desc, **kw):
        descs.append(desc)
        return phase(desc, enabled=True, file=buf)

    def show_bar(iterable=None, desc="", **kw):
        descs.append(desc)
        return bar(iterable, desc, total=kw.get("total"), enabled=True, file=buf)

    monkeypatch.setattr(progress, "phase", show_phase)
    monkeypatch.setattr(progress, "bar", show_bar)
    return descs, buf


@pytest.mark.slow
def test_eval_shows_the_model_load_a_sampling_bar_and_the_kl_scoring(shown):
    descs, buf = shown
    source = str(REPO / "tests" / "fixtures" / "hf" / "llama_gqa")
    model = evaluate.load_policy(source)
    prompts = [evaluate.Prompt(str(i), (5, 17, 3 + i)) for i in range(5)]
    evaluate.sample(model, prompts, max_new_tokens=2, temperature=0.0, batch_size=2)
    assert descs == [f"loading {source}", f"sampling {source}"]
    assert "3/3" in _last_line(buf)  # 5 prompts in batches of 2
    evaluate.evaluate_model(model, prompts, sft=model, max_new_tokens=2, batch_size=2)
    assert descs[2:] == [f"sampling {source}", f"KL: scoring 5 completions under {source}"]


def test_training_shows_the_pretrained_model_load(tiny_config, monkeypatch, capsys):
    config = tiny_config(**{"model.pretrained": "smollm2", "optimizer.learning_rate": 1e-5})
    scratch = tiny_config().model  # stands in for SmolLM2: its weights are not the point
    real_config, real_load = pretrained.load_config, pretrained.load
    monkeypatch.setattr(pretrained, "load_config", lambda m: real_config(scratch))
    monkeypatch.setattr(pretrained, "load", lambda m, shardings=None: real_load(scratch, shardings))
    loop.build(config, jax.devices()[:1], progress=True)
    err = capsys.readouterr().err.replace("\r", "\n")
    assert re.search(r"^tr-align: loading smollm2 \(00:\d\d\)$", err, re.M), err
    loop.build(config, jax.devices()[:1], progress=False)
    assert "loading" not in capsys.readouterr().err
