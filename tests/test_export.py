"""Training from a Hugging Face checkpoint and exporting the result back to one."""

import json
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import REPO
from tr_align import hf
from tr_align.io import export
from tr_align.training import checkpoint, loop

FIXTURES = REPO / "tests" / "fixtures" / "hf"
FIXTURE = FIXTURES / "llama_gqa"


def _pretrained_config(tiny_config, preset, source=FIXTURE):
    return tiny_config(
        preset,
        **{
            "model.pretrained": str(source),
            "train.steps": 4,
            "train.eval_every_steps": 4,
            "checkpoint.every_steps": 2,
        },
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama_gqa", "gpt_neox", "qwen2"])
def test_train_from_hf_checkpoint_and_export(tiny_config, tmp_path, name):
    source = FIXTURES / name
    config = _pretrained_config(tiny_config, "tr-soft", source)
    summary = loop.run(config, str(tmp_path / "run"), progress=False, devices=jax.devices()[:1])
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[1])
    np.testing.assert_allclose(first["loss"], np.log(2.0), rtol=1e-6)  # policy == reference
    assert summary["step"] == 4

    step = export.export(str(tmp_path / "run"), str(tmp_path / "out"))
    assert step == 4
    built = loop.build(config, devices=jax.devices()[:1])
    mngr = checkpoint.manager(str(tmp_path / "run"), max_to_keep=5)
    _, state, _, _ = checkpoint.restore_latest(mngr, built.abstract_state, built.state_shardings)
    apply_fn, params, cfg = hf.load_pretrained(str(tmp_path / "out"))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert cfg.model_type == json.loads((source / "config.json").read_text())["model_type"]
    assert (tmp_path / "out" / "generation_config.json").exists()  # copied from the source dir
    # Training moved the weights away from the pretrained ones.
    original = load_file(source / "model.safetensors")
    exported = load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(original) == sorted(exported)
    assert any(not np.array_equal(original[k], exported[k]) for k in original)


@pytest.mark.slow
def test_frozen_reference_exports_the_pretrained_weights(tiny_config, tmp_path):
    config = _pretrained_config(tiny_config, "vanilla")
    loop.run(config, str(tmp_path / "run"), progress=False, devices=jax.devices()[:1])
    export.export(str(tmp_path / "run"), str(tmp_path / "ref"), which="reference", step=2)
    original = load_file(FIXTURE / "model.safetensors")
    exported = load_file(tmp_path / "ref" / "model.safetensors")
    for k in original:
        np.testing.assert_array_equal(exported[k], original[k], err_msg=k)


def test_export_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_config.json: not found"):
        export.export(str(tmp_path), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="which='both'"):
        export.export(str(tmp_path), str(tmp_path / "out"), which="both")
    os.makedirs(tmp_path / "run")
    (tmp_path / "run" / "model_config.json").write_text((FIXTURE / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        export.export(str(tmp_path / "run"), str(tmp_path / "out"))
