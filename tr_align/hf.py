"""Hugging Face checkpoints in and out: ``config.json`` + safetensors, single file or sharded.

    apply_fn, params, config = hf.load_pretrained("path/to/model", dtype="bfloat16")
    logits = apply_fn(params, input_ids, attention_mask)   # right-padded [B, T]
    hf.save_pretrained(params, config, "out/")              # transformers can load "out/"

Architectures are dispatched on ``config.json``'s ``model_type``; each model module
(``tr_align.models.llama``, ``tr_align.models.gpt_neox``) provides ``config_from_hf``,
``config_to_hf``, ``params_from_hf``, ``params_to_hf``, ``hf_tensor_names`` and
``IGNORED_HF_SUFFIXES``. Tensors are read with safetensors' numpy backend (bfloat16
via ml_dtypes); a missing, extra or mis-shaped tensor is an error naming it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from tr_align.dtypes import DTYPES

# model_type -> module implementing it.
ARCHITECTURES = {
    "llama": "tr_align.models.llama",
    "mistral": "tr_align.models.llama",
    "qwen2": "tr_align.models.llama",
    "gpt_neox": "tr_align.models.gpt_neox",
}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# The files a Hugging Face tokenizer is saved as (any subset, by tokenizer type), and the
# generation defaults file that sits beside the weights.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
GENERATION_CONFIG_FILE = "generation_config.json"


def _module_for_type(model_type, where: str):
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"{where}: model_type={model_type!r} is not supported; "
            f"supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return importlib.import_module(ARCHITECTURES[model_type])


def _module_for_config(config):
    return importlib.import_module(type(config).__module__)


def config_to_hf(config) -> dict:
    """The Hugging Face config.json dict for a model config (any supported architecture)."""
    return _module_for_config(config).config_to_hf(config)


def config_from_hf(hf_config: dict, where: str = "config.json"):
    """Our model config from a parsed Hugging Face config.json."""
    return _module_for_type(hf_config.get("model_type"), where).config_from_hf(hf_config)


def model_fns(config):
    """(init_fn, apply_fn) for any supported model config (LlamaConfig, GPTNeoXConfig)."""
    return _module_for_config(config).make_model(config)


def param_axes(config):
    """The model module's ``PARAM_AXES`` (parameter path regex -> logical axis names)."""
    return _module_for_config(config).PARAM_AXES


def decode_fns(config):
    """(decode_fn, init_cache) for KV-cache generation (``tr_align.generate``):
    ``decode_fn(params, ids, positions, cache, cache_index, kv_mask)`` and
    ``init_cache(batch, length)``."""
    module = _module_for_config(config)
    if not hasattr(module, "make_decode_fn"):
        raise ValueError(f"{type(config).__name__}: KV-cache generation is not implemented")
    return module.make_decode_fn(config), functools.partial(module.init_cache, config)


def read_config(path: str) -> dict:
    """The parsed ``config.json`` of a model directory."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file}: no config.json (expected a Hugging Face model directory)")
    with open(file, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}:{e.lineno}: invalid JSON: {e.msg}") from None


def _tensor_files(path: str) -> dict[str, str]:
    """tensor name -> safetensors file, for a single-file or an index-sharded checkpoint."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(path, file) for name, file in weight_map.items()}
    single = os.path.join(path, SINGLE_FILE)
    if os.path.isfile(single):
        with safe_open(single, framework="numpy") as f:
            return dict.fromkeys(f.keys(), single)
    raise FileNotFoundError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found")


class LazyTensor:
    """A tensor in a safetensors file, read only where indexed.

    ``.T`` is a lazy transpose; ``x[index]`` (a tuple of slices, as
    ``jax.make_array_from_callback`` passes) reads just that block with safetensors'
    ``get_slice``; ``np.asarray(x)`` reads everything.
    """

    def __init__(self, handle, name: str, transposed: bool = False):
        self._handle, self.name, self.transposed = handle, name, transposed
        shape = tuple(handle.get_slice(name).get_shape())
        self.shape = shape[::-1] if transposed else shape

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def T(self) -> LazyTensor:  # noqa: N802 - numpy's name
        return LazyTensor(self._handle, self.name, not self.transposed)

    def __getitem__(self, index) -> np.ndarray:
        index = tuple(index) if isinstance(index, tuple) else (index,)
        index = index + (slice(None),) * (self.ndim - len(index))
        if self.transposed:
            return self._handle.get_slice(self.name)[index[::-1]].T
        return self._handle.get_slice(self.name)[index]

    def __array__(self, dtype=None, copy=None):
        x = self[tuple(slice(None) for _ in self.shape)]
        return x if dtype is None else x.astype(dtype)


class _Reader:
    """``reader(name) -> LazyTensor``, keeping each safetensors file open once."""

    def __init__(self, path: str):
        self.path = path
        self.files = _tensor_files(path)
        self._open = {}

    def __call__(self, name: str) -> LazyTensor:
        if name not in self.files:
            raise KeyError(name)
        file = self.files[name]
        if file not in self._open:
            self._open[file] = safe_open(file, framework="numpy")
        return LazyTensor(self._open[file], name)


def _materialize(params, dtype, shardings):
    """Lazy tensors -> jax arrays; with ``shardings`` each device reads only its block."""
    if shardings is None:
        return jax.tree.map(lambda x: jnp.asarray(np.asarray(x), dtype), params)
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, params)

    def place(x, sharding):
        def block(index):
            return np.asarray(x[index]).astype(dtype)

        return jax.make_array_from_callback(tuple(x.shape), sharding, block)

    return jax.tree.map(place, params, shardings)


def load_pretrained(path: str, dtype: str = "float32", *, shardings=None):
    """Loads a local Hugging Face causal-LM directory.

    Args:
      path: directory with config.json and model.safetensors (or a sharded
        model.safetensors.index.json).
      dtype: "float32" or "bfloat16": the parameter and compute dtype (logits are float32).
      shardings: None (arrays on the default device), one ``jax.sharding.Sharding`` for
        every parameter, or a pytree of them with the params' structure. With shardings,
        each process reads from disk only the blocks its devices hold (safetensors slices),
        so a model larger than one host's memory can be loaded across a mesh.

    Returns:
      (apply_fn, params, config): ``apply_fn(params, input_ids, attention_mask) -> logits``.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
    hf_config = read_config(path)
    module = _module_for_type(hf_config.get("model_type"), os.path.join(path, "config.json"))
    config = dataclasses.replace(module.config_from_hf(hf_config), dtype=dtype)
    reader = _Reader(path)
    try:
        params = module.params_from_hf(reader, config)
    except KeyError as e:
        raise ValueError(
            f"{path}: tensor {e.args[0]!r} is missing from the checkpoint "
            f"({len(reader.files)} tensors found)"
        ) from None
    expected = set(module.hf_tensor_names(config))
    extra = sorted(
        n for n in set(reader.files) - expected if not n.endswith(module.IGNORED_HF_SUFFIXES)
    )
    if extra:
        raise ValueError(f"{path}: unexpected tensors for this config: {extra[:10]}")
    params = _materialize(params, DTYPES[dtype], shardings)
    _, apply_fn = module.make_model(config)
    return apply_fn, params, config


def save_pretrained(params, config, out_dir: str, *, max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes ``config.json`` and safetensors (sharded with an index above ``max_shard_bytes``)
    that ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` loads.

    Tensors are written in the parameters' dtype (float32 or bfloat16).
    """
    module = _module_for_config(config)
    host = jax.tree.map(np.asarray, jax.device_get(params))
    tensors = {k: np.ascontiguousarray(v) for k, v in module.params_to_hf(host, config).items()}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(module.config_to_hf(config), f, indent=2)

    shards, current, size = [], {}, 0
    for name, x in tensors.items():
        if current and size + x.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = x
        size += x.nbytes
    shards.append(current)
    for stale in (SINGLE_FILE, INDEX_FILE):
        if os.path.exists(os.path.join(out_dir, stale)):
            os.remove(os.path.join(out_dir, stale))
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, SINGLE_FILE), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    index = {
        "metadata": {"total_size": sum(x.nbytes for x in tensors.values())},
        "weight_map": weight_map,
    }
    with open(os.path.join(out_dir, INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
