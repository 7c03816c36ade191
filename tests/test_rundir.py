"""The run directory object: its files, checkpoint lookup and errors; the defaults table."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from tr_align import defaults, errors
from tr_align.io.rundir import RunDir, is_run_dir
from tr_align.training import checkpoint

FIXTURE = REPO / "tests" / "fixtures" / "hf" / "llama_gqa"


def _run(tmp_path, ref_params):
    """A run directory with checkpoints at steps 2 and 4 of a tiny state."""
    (tmp_path / "run").mkdir(parents=True)
    (tmp_path / "run" / "model_config.json").write_text((FIXTURE / "config.json").read_text())
    config = {"model": {"pretrained": "x"}, "data": {"tokenizer": ""}}
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    run = RunDir(tmp_path / "run")
    mngr = checkpoint.manager(run.path, max_to_keep=5)
    for step in (2, 4):
        state = {"params": {"w": jnp.full(3, step, jnp.float32)}, "ref_params": ref_params}
        checkpoint.save(mngr, step, state, {}, {})
    mngr.wait_until_finished()
    return run


def test_checkpoints_and_params(tmp_path):
    run = _run(tmp_path, {"w": jnp.zeros(3)})
    assert is_run_dir(run.path) and not is_run_dir(tmp_path)
    assert run.checkpoint_steps() == [2, 4] and run.latest_step() == 4
    params, step = run.restore_params()
    assert step == 4 and isinstance(params["w"], np.ndarray)
    np.testing.assert_array_equal(params["w"], [4, 4, 4])
    ref, step = run.restore_params("reference", 2)
    assert step == 2 and not ref["w"].any()
    assert run.starting_model() == "x" and run.tokenizer_source() == "x"
    assert run.model_config().vocab_size > 0
    assert run.summary() is None and not run.finished()
    run.write_summary({"step": 4, "total_steps": 4})
    assert run.finished()


def test_errors_name_the_missing_thing(tmp_path):
    empty = RunDir(tmp_path)
    with pytest.raises(errors.RunDirError, match="model_config.json: not found"):
        empty.model_config()
    with pytest.raises(errors.RunDirError, match=r"no checkpoint \(available: \[\]\)"):
        empty.restore_params()
    assert empty.checkpoint_steps() == [] and not (tmp_path / "checkpoints").exists()
    run = _run(tmp_path, {"w": jnp.zeros(3)})
    with pytest.raises(
        errors.RunDirError, match=r"no checkpoint at step 3 \(available: \[2, 4\]\)"
    ):
        run.restore_params(step=3)
    with pytest.raises(errors.ConfigError, match="which='both'"):
        run.restore_params("both")


def test_a_run_without_reference_has_no_reference_to_restore(tmp_path):
    run = _run(tmp_path / "sft", None)
    params, _ = run.restore_params("policy")
    np.testing.assert_array_equal(params["w"], [4, 4, 4])
    with pytest.raises(errors.RunDirError, match="holds no reference parameters"):
        run.restore_params("reference")


def test_defaults_table():
    assert defaults.get({}, "data.tokenizer") == ""
    assert defaults.get({"data": {"tokenizer": "t"}}, "data.tokenizer") == "t"
    assert defaults.get_in_block({"pretrained": "smollm2"}, "model.dtype") == "float32"
    assert all(d.meaning for d in defaults.DEFAULTS.values())
    with pytest.raises(KeyError, match="train.steps"):
        defaults.get({}, "train.steps")  # required: no default
