"""Resume compatibility: the saved config.json against the new config, before anything is
written; --allow_config_change; a continuous learning rate when the run's length changes."""

import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest

from conftest import load_default_config, set_keys
from tr_align import errors
from tr_align.training import loop, optim, resume
from tr_align.training.metrics import read_jsonl

TINY = {
    "data.num_train": 256,
    "data.num_eval": 64,
    "train.steps": 6,
    "train.batch_size": 8,
    "train.eval_batch_size": 32,
    "train.eval_every_steps": 3,
    "checkpoint.every_steps": 3,
    "optimizer.warmup_steps": 2,
}
LR = 1e-3  # configs/default.py


def _config(**overrides):
    return set_keys(load_default_config(), {**TINY, **overrides})


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A 6-step run stopped (with a checkpoint) at step 3."""
    workdir = str(tmp_path_factory.mktemp("stopped") / "run")
    loop.run(_config(), workdir, stop_at_step=3, progress=False, devices=jax.devices()[:1])
    return workdir


@pytest.fixture
def run_copy(stopped_run, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(stopped_run, workdir)
    return workdir


def _snapshot(workdir):
    out = {}
    for root, _, files in os.walk(workdir):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, workdir)] = fh.read()
    return out


def _lr_rows(workdir):
    return {
        r["step"]: r["learning_rate"]
        for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
        if "learning_rate" in r
    }


ISSUE_CHANGES = {  # the issue's list of silently accepted changes after a stop
    "loss.type": "ipo",
    "trust_region.alpha": 0.3,
    "trust_region.enabled": False,
    "train.batch_size": 16,
    "train.seed": 5,
    "optimizer.learning_rate": 5e-4,
    "train.steps": 600,
}


def test_a_changed_config_is_refused_with_every_key_and_nothing_is_written(run_copy):
    before = _snapshot(run_copy)
    config = _config(**ISSUE_CHANGES)
    with pytest.raises(errors.ConfigError) as e:
        loop.run(config, run_copy, progress=False, devices=jax.devices()[:1])
    msg = str(e.value)
    assert "\n" not in msg and "resuming step 3" in msg and "nothing was written" in msg
    for text in (
        "loss.type 'sigmoid' -> 'ipo'",
        "trust_region.alpha 0.6 -> 0.3",
        "trust_region.enabled True -> False",
        "train.batch_size 8 -> 16",
        "train.seed 0 -> 5",
        "optimizer.learning_rate 0.001 -> 0.0005",
        "train.steps 6 -> 600",
    ):
        assert text in msg, text
    assert "loss.type, train.batch_size, train.seed cannot change on resume" in msg
    assert (
        "--allow_config_change=optimizer.learning_rate,train.steps,"
        "trust_region.alpha,trust_region.enabled" in msg
    )
    assert _snapshot(run_copy) == before  # config.json, model_config.json, metrics untouched


def test_a_shape_change_is_refused_even_with_an_override(run_copy):
    before = _snapshot(run_copy)
    config = _config(**{"model.hidden_size": 128})
    with pytest.raises(errors.ConfigError, match=r"model.hidden_size 64 -> 128.*cannot change"):
        loop.run(
            config,
            run_copy,
            progress=False,
            devices=jax.devices()[:1],
            allow_config_change=["model.hidden_size"],
        )
    assert _snapshot(run_copy) == before


def test_harmless_and_allowed_changes_are_accepted(stopped_run):
    harmless = _config(
        **{"train.log_every_steps": 2, "checkpoint.every_steps": 5, "model.remat": "full"}
    )
    assert resume.prepare(harmless, stopped_run, log=None) is harmless
    lr = _config(**{"optimizer.learning_rate": 5e-4, "loss.beta": 0.2})
    with pytest.raises(errors.ConfigError, match="loss.beta 0.1 -> 0.2"):
        resume.prepare(lr, stopped_run, allow="optimizer.learning_rate", log=None)
    lines = []
    out = resume.prepare(
        lr, stopped_run, allow="optimizer.learning_rate,loss.beta", log=lines.append
    )
    assert out is lr and len(lines) == 1 and "optimizer.learning_rate 0.001 -> 0.0005" in lines[0]
    with pytest.raises(errors.ConfigError, match="--allow_config_change=train.stepz: no such"):
        resume.prepare(_config(), stopped_run, allow="train.stepz", log=None)


def test_clipping_on_or_off_is_refused_but_its_value_may_change():
    assert resume.kind("optimizer.max_grad_norm", 1.0, 0.5) == "override"
    assert resume.kind("optimizer.max_grad_norm", 1.0, 0.0) == "never"
    assert resume.kind("optimizer.max_grad_norm", -1, 2.0) == "never"


def test_absent_optional_keys_compare_as_their_defaults():
    old = resume.as_dict(_config())
    del old["train"]["grad_accum_steps"], old["data"]["packing"]  # an older config.json
    assert resume.compare(old, resume.as_dict(_config())) == []
    changes = resume.compare(old, resume.as_dict(_config(**{"train.grad_accum_steps": 2})))
    assert [(c.key, c.old, c.new, c.kind) for c in changes] == [
        ("train.grad_accum_steps", 1, 2, "override")
    ]


def test_a_longer_run_records_where_its_schedule_was_stretched(stopped_run):
    config = _config(**{"train.steps": 12})
    out = resume.prepare(config, stopped_run, allow=["train.steps"], log=None)
    assert out is not config and not config.optimizer.get("schedule_extensions")
    assert [list(e) for e in out.optimizer.schedule_extensions] == [[3, 6, 0.0]]


def _opt(schedule="linear", warmup=2, end=0.0):
    return ml_collections.ConfigDict(
        dict(learning_rate=LR, warmup_steps=warmup, schedule=schedule, end_lr_factor=end)
    )


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_stretched_schedule_is_continuous_and_decays_to_the_new_end(schedule):
    """6 steps (warmup 2), lengthened to 12 at step 3: the old values up to 3, then from the
    value at 3 (0.75 * lr for linear) to the end value at 12, computed by hand."""
    cfg = _opt(schedule, end=0.1)
    old = optim.make_schedule(cfg, 6)
    new = optim.make_schedule(cfg, 12, ((3, 6),))
    end = 0.1 * LR
    frac3 = (3 - 2) / (6 - 2)
    v3 = (
        LR + (end - LR) * frac3
        if schedule == "linear"
        else end + (LR - end) * 0.5 * (1 + np.cos(np.pi * frac3))
    )
    for t in range(4):
        assert float(new(t)) == float(old(t))
    np.testing.assert_allclose(float(new(3)), v3, rtol=1e-6)
    for t in range(3, 16):
        f = min((t - 3) / 9, 1.0)
        want = (
            v3 + (end - v3) * f
            if schedule == "linear"
            else end + (v3 - end) * 0.5 * (1 + np.cos(np.pi * f))
        )
        np.testing.assert_allclose(float(new(t)), want, rtol=1e-5)
    # without the extension the 12-step schedule jumps at the resume step
    assert abs(float(optim.make_schedule(cfg, 12)(3)) - v3) > 0.1 * LR


def test_a_resume_inside_warmup_keeps_the_warmup():
    cfg = _opt("linear", warmup=4)
    new = optim.make_schedule(cfg, 20, ((1, 6),))
    np.testing.assert_allclose(
        [float(new(t)) for t in range(5)], [0, LR / 4, LR / 2, 0.75 * LR, LR], rtol=1e-6
    )
    np.testing.assert_allclose(float(new(12)), LR * (1 - 8 / 16), rtol=1e-6)


@pytest.mark.slow
def test_lengthened_run_keeps_the_learning_rate_continuous_across_two_resumes(run_copy):
    """Stopped at 3 of 6, resumed with train.steps=12 to step 8, then resumed again with the
    same command to 12: the logged learning rates are the stretched schedule's, by hand."""
    config = _config(**{"train.steps": 12})
    kw = dict(progress=False, devices=jax.devices()[:1], allow_config_change=["train.steps"])
    loop.run(config, run_copy, stop_at_step=8, **kw)
    loop.run(config, run_copy, **kw)
    lr = _lr_rows(run_copy)
    assert sorted(lr) == list(range(1, 13))
    # row k logs the rate of step k, the schedule at k - 1: warmup 2, 6-step linear decay
    # to 0 up to 3 (0.75 lr), then linear from 0.75 lr to 0 at 12
    want = {1: 0.0, 2: LR / 2, 3: LR, 4: 0.75 * LR}
    want.update({k: 0.75 * LR * (1 - (k - 1 - 3) / 9) for k in range(5, 13)})
    for k in range(1, 13):
        np.testing.assert_allclose(lr[k], want[k], rtol=1e-5, atol=1e-12, err_msg=str(k))
    with open(os.path.join(run_copy, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["train"]["steps"] == 12
    assert cfg["optimizer"]["schedule_extensions"] == [[3, 6, 0.0]]
