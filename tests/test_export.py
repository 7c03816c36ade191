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


# --- the tokenizer and file modes of an export ------------------------------------------------

TOKENIZER = str(REPO / "tests" / "fixtures" / "tokenizer")
DATA = REPO / "tests" / "fixtures" / "data"


def _file_modes(path):
    return {p.name: oct(p.stat().st_mode & 0o777) for p in path.iterdir() if p.is_file()}


@pytest.mark.slow
def test_export_writes_the_data_tokenizer_readable_and_generate_answers(tiny_config, tmp_path):
    """A run from scratch whose tokenizer came from data.tokenizer: the export holds that
    tokenizer (before: none, and generate failed on a sentencepiece message), every file is
    0644 (before: model.safetensors 0600), and generate answers from the export."""
    from transformers import AutoTokenizer

    from tr_align import generate

    config = tiny_config(
        **{
            "model.vocab_size": 384,
            "model.max_position_embeddings": 128,
            "data.source": "files",
            "data.path": str(DATA / "hh.jsonl"),
            "data.format": "hh",
            "data.tokenizer": TOKENIZER,
            "data.max_length": 128,
            "data.max_prompt_length": 96,
            "data.buckets": (128,),
            "data.eval_fraction": 0.25,
            "data.cache_dir": str(tmp_path / "cache"),
            "train.steps": 2,
            "train.batch_size": 2,
            "train.eval_batch_size": 2,
            "train.eval_every_steps": 2,
            "checkpoint.every_steps": 2,
            "optimizer.warmup_steps": 1,
        }
    )
    loop.run(config, str(tmp_path / "run"), progress=False, devices=jax.devices()[:1])
    old = os.umask(0o022)
    try:
        export.export(str(tmp_path / "run"), str(tmp_path / "out"))
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert (out / "tokenizer.json").exists()
    assert set(_file_modes(out).values()) == {"0o644"}, _file_modes(out)
    ours, theirs = AutoTokenizer.from_pretrained(str(out)), AutoTokenizer.from_pretrained(TOKENIZER)
    text = "Human: what is a trust region?"
    assert ours.encode(text) == theirs.encode(text) and len(ours.encode(text)) > 3
    [answer] = generate.complete(str(out), ["Hello"], max_new_tokens=4)
    assert isinstance(answer, str)


@pytest.mark.slow
def test_write_tokenizer_from_a_gguf_with_the_runs_chat_template(tmp_path):
    """A GGUF-embedded tokenizer (smollm2) is written as HF tokenizer files, with the run's
    data.chat_template ("hh") in place of the file's own template."""
    from transformers import AutoTokenizer

    from tr_align.data import pipeline
    from tr_align.io import gguf

    config = {"model": {"pretrained": "smollm2"}, "data": {"chat_template": "hh"}}
    export.write_tokenizer(config, str(tmp_path))
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    original = gguf.load_tokenizer(gguf.smollm2_gguf_path())
    assert tok.encode("The trust region") == original.encode("The trust region")
    assert tok.chat_template == pipeline.CHAT_TEMPLATES["hh"]


def test_a_model_directory_without_tokenizer_files_is_one_line(tmp_path):
    from tr_align.errors import ModelError
    from tr_align.io import pretrained

    with pytest.raises(ModelError, match="llama_gqa: no tokenizer files .*tr-align export again"):
        pretrained.load_tokenizer(str(FIXTURE))


def test_save_pretrained_files_are_readable(tmp_path):
    _, params, config = hf.load_pretrained(str(FIXTURE))
    old = os.umask(0o022)
    try:
        hf.save_pretrained(params, config, str(tmp_path / "out"))
    finally:
        os.umask(old)
    assert set(_file_modes(tmp_path / "out").values()) == {"0o644"}
