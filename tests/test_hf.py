"""Hugging Face checkpoints in and out, against logits computed by transformers itself.

The fixtures (tests/fixtures/hf/, made by tests/fixtures/make_hf_fixtures.py) are tiny
random models saved by transformers' save_pretrained, with transformers' float32 logits
on a right-padded batch, so these tests need neither torch nor transformers.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import REPO
from tr_align import hf

FIXTURES = REPO / "tests" / "fixtures" / "hf"
LLAMA_FAMILY = [
    "llama_gqa",
    "llama3_rope_scaling",
    "smollm2_tied",
    "mistral",
    "mistral_sliding",
    "qwen2",
]
ALL = [*LLAMA_FAMILY, "gpt_neox"]


def _reference(name):
    ref = np.load(FIXTURES / name / "reference.npz")
    return (
        ref["input_ids"],
        ref["attention_mask"],
        ref["logits"],
        ref["attention_mask"].astype(bool),
    )


def _max_err(apply_fn, params, name):
    ids, mask, want, real = _reference(name)
    got = np.asarray(apply_fn(params, ids, mask), np.float32)
    return float(np.abs(got - want)[real].max())


@pytest.mark.parametrize("name", ALL)
def test_logits_match_transformers(name):
    apply_fn, params, config = hf.load_pretrained(str(FIXTURES / name))
    assert _max_err(apply_fn, params, name) < 1e-4
    assert _max_err(jax.jit(apply_fn), params, name) < 1e-4
    assert (
        config.model_type == json.loads((FIXTURES / name / "config.json").read_text())["model_type"]
    )


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2", "gpt_neox"])
def test_bfloat16_logits_close_to_transformers(name):
    apply_fn, params, config = hf.load_pretrained(str(FIXTURES / name), dtype="bfloat16")
    assert config.dtype == "bfloat16"
    assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(params))
    ids, mask, want, real = _reference(name)
    err = _max_err(jax.jit(apply_fn), params, name)
    assert err < 0.05 * float(np.abs(want[real]).max()), err


def test_rope_scaling_and_sliding_window_are_exercised():
    """Dropping Llama-3 rope scaling or Mistral's window must break parity (the fixtures test them)."""
    import dataclasses

    from tr_align.models import llama

    for name, field in (
        ("llama3_rope_scaling", "rope_scaling"),
        ("mistral_sliding", "sliding_window"),
    ):
        _, params, config = hf.load_pretrained(str(FIXTURES / name))
        _, apply_fn = llama.make_model(dataclasses.replace(config, **{field: None}))
        assert _max_err(apply_fn, params, name) > 1e-2


def test_hub_config_spelling(tmp_path):
    """Hub checkpoints carry top-level rope_theta / rope_scaling instead of rope_parameters."""
    src = FIXTURES / "llama3_rope_scaling"
    shutil.copytree(src, tmp_path / "m")
    cfg = json.loads((src / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = {**rope, "type": rope.pop("rope_type")}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    apply_fn, params, _ = hf.load_pretrained(str(tmp_path / "m"))
    assert _max_err(apply_fn, params, "llama3_rope_scaling") < 1e-4


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("max_shard_bytes", [5 * 2**30, 20_000])
def test_save_reproduces_the_transformers_checkpoint(tmp_path, name, max_shard_bytes):
    _, params, config = hf.load_pretrained(str(FIXTURES / name))
    hf.save_pretrained(params, config, str(tmp_path), max_shard_bytes=max_shard_bytes)
    original = load_file(FIXTURES / name / "model.safetensors")
    if max_shard_bytes < 10**6:
        index = json.loads((tmp_path / hf.INDEX_FILE).read_text())
        files = sorted(set(index["weight_map"].values()))
        assert len(files) > 1 and not (tmp_path / hf.SINGLE_FILE).exists()
        saved = {k: v for f in files for k, v in load_file(tmp_path / f).items()}
        assert index["metadata"]["total_size"] == sum(v.nbytes for v in saved.values())
    else:
        saved = load_file(tmp_path / hf.SINGLE_FILE)
    assert sorted(saved) == sorted(original)  # same names, nothing extra (tied: no lm_head)
    for k in original:
        np.testing.assert_array_equal(saved[k], original[k], err_msg=k)
    # Our config.json describes the same model as transformers' own.
    ours = json.loads((tmp_path / "config.json").read_text())
    theirs = json.loads((FIXTURES / name / "config.json").read_text())
    for key in (
        "model_type",
        "architectures",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "tie_word_embeddings",
        "rope_parameters",
    ):
        if key in theirs:
            assert ours[key] == theirs[key], key
    apply_fn, reloaded, _ = hf.load_pretrained(str(tmp_path))
    assert _max_err(apply_fn, reloaded, name) < 1e-4


@pytest.mark.parametrize("name", ["qwen2", "gpt_neox"])
def test_bfloat16_save_keeps_dtype(tmp_path, name):
    _, params, config = hf.load_pretrained(str(FIXTURES / name), dtype="bfloat16")
    hf.save_pretrained(params, config, str(tmp_path))
    assert {str(v.dtype) for v in load_file(tmp_path / hf.SINGLE_FILE).values()} == {"bfloat16"}


def _copy_with_tensors(tmp_path, name, edit):
    dst = tmp_path / "m"
    shutil.copytree(FIXTURES / name, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return str(dst)


def test_missing_tensor_is_named(tmp_path):
    path = _copy_with_tensors(
        tmp_path, "llama_gqa", lambda t: t.pop("model.layers.1.mlp.up_proj.weight")
    )
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.up_proj.weight' is missing"):
        hf.load_pretrained(path)


def test_wrong_shape_is_named(tmp_path):
    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((4, 32), np.float32)

    path = _copy_with_tensors(tmp_path, "llama_gqa", edit)
    with pytest.raises(
        ValueError,
        match=r"model.layers.0.self_attn.k_proj.weight: expected shape \(16, 32\).*got \(4, 32\)",
    ):
        hf.load_pretrained(path)


def test_unexpected_tensor_is_named_and_known_buffers_are_ignored(tmp_path):
    def edit(t):
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(4, np.float32)  # old buffer
        t["model.layers.9.mlp.up_proj.weight"] = np.zeros((2, 2), np.float32)

    path = _copy_with_tensors(tmp_path, "llama_gqa", edit)
    with pytest.raises(
        ValueError, match=r"unexpected tensors.*\['model.layers.9.mlp.up_proj.weight'\]"
    ):
        hf.load_pretrained(path)


def test_unsupported_architecture_and_missing_files(tmp_path):
    shutil.copytree(FIXTURES / "llama_gqa", tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "model_type": "gemma3"}))
    with pytest.raises(
        ValueError, match=r"model_type='gemma3' is not supported; supported: .*llama.*qwen2"
    ):
        hf.load_pretrained(str(tmp_path / "m"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hf.load_pretrained(str(tmp_path))
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    os.remove(tmp_path / "m" / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
        hf.load_pretrained(str(tmp_path / "m"))
    with pytest.raises(ValueError, match="dtype='float16'"):
        hf.load_pretrained(str(FIXTURES / "llama_gqa"), dtype="float16")


def test_unsupported_settings_are_rejected(tmp_path):
    shutil.copytree(FIXTURES / "llama_gqa", tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    for key, value in (("hidden_act", "gelu"), ("attention_bias", True), ("mlp_bias", True)):
        (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(ValueError, match=key):
            hf.load_pretrained(str(tmp_path / "m"))
    bad_rope = {**cfg, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}
    (tmp_path / "m" / "config.json").write_text(json.dumps(bad_rope))
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        hf.load_pretrained(str(tmp_path / "m"))


@pytest.mark.parametrize("name", ["llama_gqa", "smollm2_tied", "gpt_neox"])
def test_load_straight_into_a_sharding_reads_only_each_devices_block(name, monkeypatch):
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.asarray(jax.devices()).reshape(8), ("fsdp",))

    def spec(x):  # FSDP-style: split the first dimension divisible by 8
        dims = [i for i, d in enumerate(x.shape) if d % 8 == 0]
        if not dims:
            return NamedSharding(mesh, P())
        parts = [None] * len(x.shape)
        parts[dims[0]] = "fsdp"
        return NamedSharding(mesh, P(*parts))

    _, plain, _ = hf.load_pretrained(str(FIXTURES / name))
    shardings = jax.tree.map(spec, plain)

    reads = []
    real_getitem = hf.LazyTensor.__getitem__

    def recording_getitem(self, index):
        block = real_getitem(self, index)
        reads.append((self.name, self.shape, block.shape))
        return block

    monkeypatch.setattr(hf.LazyTensor, "__getitem__", recording_getitem)
    apply_fn, params, _ = hf.load_pretrained(str(FIXTURES / name), shardings=shardings)
    for got, want, sh in zip(
        jax.tree.leaves(params), jax.tree.leaves(plain), jax.tree.leaves(shardings)
    ):
        assert got.sharding == sh
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    split = [(n, full, blk) for n, full, blk in reads if full != blk]
    assert split and all(np.prod(blk) * 8 == np.prod(full) for _, full, blk in split)
    # Every 2-D tensor with a dimension divisible by 8 was read only in 1/8 blocks.
    assert not [
        n
        for n, full, blk in reads
        if len(full) == 2 and full == blk and any(d % 8 == 0 for d in full)
    ]
    assert _max_err(jax.jit(apply_fn), params, name) < 1e-4


# --- corrupt model directories (Reliability I): one line naming the file and what was expected


def _shard_in_two(d):
    t = load_file(d / "model.safetensors")
    os.remove(d / "model.safetensors")
    names = sorted(t)
    halves = {
        "model-00001-of-00002.safetensors": names[:10],
        "model-00002-of-00002.safetensors": names[10:],
    }
    weight_map = {}
    for file, part in halves.items():
        save_file({k: t[k] for k in part}, str(d / file))
        weight_map.update(dict.fromkeys(part, file))
    (d / hf.INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def _edit_config(d, f):
    cfg = json.loads((d / "config.json").read_text())
    f(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def _truncate(file, n):
    data = file.read_bytes()
    file.write_bytes(data[: n if n >= 0 else len(data) + n])


def _retype(d, dtype):
    t = load_file(d / "model.safetensors")
    save_file({k: (v * 100).astype(dtype) for k, v in t.items()}, str(d / "model.safetensors"))


CORRUPTIONS = {
    "garbled config.json": (
        lambda d: (d / "config.json").write_text('{"model_type": "llama", '),
        r"config\.json:1: invalid JSON: ",
    ),
    "config.json not an object": (
        lambda d: (d / "config.json").write_text("[1, 2]"),
        r"config\.json: expected a JSON object, got list$",
    ),
    "config.json not text": (
        lambda d: (d / "config.json").write_bytes(b"\xff\xfe\x00junk"),
        r"config\.json: not UTF-8 text",
    ),
    "config without hidden_size": (
        lambda d: _edit_config(d, lambda c: c.pop("hidden_size")),
        r"config\.json: missing 'hidden_size' \(needed for model_type='llama'\)$",
    ),
    "config with a string size": (
        lambda d: _edit_config(d, lambda c: c.update(num_hidden_layers="2")),
        r"config\.json: LlamaConfig\.num_hidden_layers must be a positive int, got '2'$",
    ),
    "config without model_type": (
        lambda d: _edit_config(d, lambda c: c.pop("model_type")),
        r"config\.json: model_type=None is not supported",
    ),
    "truncated safetensors": (
        lambda d: _truncate(d / "model.safetensors", -100),
        r"model\.safetensors: not a readable safetensors file \(.*\); truncated or corrupt\?$",
    ),
    "safetensors cut inside the header": (
        lambda d: _truncate(d / "model.safetensors", 20),
        r"model\.safetensors: not a readable safetensors file",
    ),
    "empty safetensors": (
        lambda d: _truncate(d / "model.safetensors", 0),
        r"model\.safetensors: not a readable safetensors file",
    ),
    "garbled safetensors header": (
        lambda d: (d / "model.safetensors").write_bytes(
            (d / "model.safetensors").read_bytes()[:8]
            + b"x" * 32
            + (d / "model.safetensors").read_bytes()[40:]
        ),
        r"model\.safetensors: not a readable safetensors file",
    ),
    "int32 weights": (
        lambda d: _retype(d, np.int32),
        r"model\.safetensors: tensor '.*' has dtype I32; expected a floating-point weight",
    ),
    "bool weights": (
        lambda d: _retype(d, np.bool_),
        r"has dtype BOOL; expected a floating-point weight",
    ),
    "wider config than the tensors": (
        lambda d: _edit_config(d, lambda c: c.update(hidden_size=64)),
        r"model\.safetensors: tensor .*: expected shape .* \(config .*config\.json\)$",
    ),
    "shard listed in the index but missing": (
        lambda d: (_shard_in_two(d), os.remove(d / "model-00002-of-00002.safetensors")),
        r"model-00002-of-00002\.safetensors: listed in .*model\.safetensors\.index\.json but "
        r"missing$",
    ),
    "garbled index": (
        lambda d: (_shard_in_two(d), (d / hf.INDEX_FILE).write_text("{oops")),
        r"model\.safetensors\.index\.json:1: invalid JSON",
    ),
    "index without weight_map": (
        lambda d: (_shard_in_two(d), (d / hf.INDEX_FILE).write_text('{"metadata": {}}')),
        r"model\.safetensors\.index\.json: expected a \"weight_map\" object",
    ),
    "index pointing at the wrong shard": (
        lambda d: (
            wm := _shard_in_two(d),
            (d / hf.INDEX_FILE).write_text(
                json.dumps(
                    {"weight_map": {**wm, sorted(wm)[0]: "model-00002-of-00002.safetensors"}}
                )
            ),
        ),
        r"model-00002-of-00002\.safetensors: has no tensor '.*' \(the index",
    ),
}


@pytest.mark.parametrize("what", sorted(CORRUPTIONS))
def test_corrupt_model_dir_is_one_line_naming_the_file(tmp_path, what):
    from tr_align import cli, errors

    corrupt, pattern = CORRUPTIONS[what]
    d = tmp_path / "m"
    shutil.copytree(FIXTURES / "llama_gqa", d)
    corrupt(d)
    with pytest.raises(errors.ModelError, match=pattern) as e:
        hf.load_pretrained(str(d))
    assert str(e.value).startswith(str(d))
    message, code = cli.error_report(e.value)
    assert message.startswith("tr-align: model error: ") and "\n" not in message and code == 2


def test_float16_weights_are_still_accepted_and_upcast(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(FIXTURES / "llama_gqa", d)
    t = load_file(d / "model.safetensors")
    save_file({k: v.astype(np.float16) for k, v in t.items()}, str(d / "model.safetensors"))
    _, params, _ = hf.load_pretrained(str(d))
    leaf = params["embed"]["embedding"] if "embed" in params else jax.tree.leaves(params)[0]
    assert leaf.dtype == np.float32
