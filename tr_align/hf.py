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
import re

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from tr_align.dtypes import DTYPES
from tr_align.errors import ModelError, ModelNotFoundError

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
    if not isinstance(model_type, str) or model_type not in ARCHITECTURES:
        raise ModelError(
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
    """Our model config from a parsed Hugging Face config.json (``where`` names it in errors).

    Raises ModelError (a ValueError) naming ``where`` for a config that is not a JSON object,
    an unsupported ``model_type``, a missing key (``hidden_size``...) or a bad value.
    """
    if not isinstance(hf_config, dict):
        raise ModelError(f"{where}: expected a JSON object, got {type(hf_config).__name__}")
    model_type = hf_config.get("model_type")
    module = _module_for_type(model_type, where)
    try:
        return module.config_from_hf(hf_config)
    except KeyError as e:
        raise ModelError(
            f"{where}: missing {e.args[0]!r} (needed for model_type={model_type!r})"
        ) from None
    except (TypeError, ValueError, ArithmeticError) as e:
        raise ModelError(f"{where}: {e}") from None


def model_fns(config):
    """(init_fn, apply_fn) for any supported model config (LlamaConfig, GPTNeoXConfig)."""
    return _module_for_config(config).make_model(config)


def param_axes(config):
    """The model module's ``PARAM_AXES`` (parameter path regex -> logical axis names)."""
    return _module_for_config(config).PARAM_AXES


def kernel_modules(config) -> dict[str, str]:
    """{our Dense kernel path ("layers_0/self_attn/q_proj/kernel"): its Hugging Face module
    ("model.layers.0.self_attn.q_proj")}: the module names LoRA adapters attach to (PEFT)."""
    return _module_for_config(config).hf_kernel_modules(config)


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
        raise ModelNotFoundError(
            f"{file}: no config.json (expected a Hugging Face model directory)"
        )
    return _read_json(file, "a JSON object")


def _read_json(file: str, expected: str):
    """The parsed JSON object of ``file``; ModelError naming the file (and line) otherwise."""
    try:
        with open(file, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise ModelError(f"{file}:{e.lineno}: invalid JSON: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise ModelError(f"{file}: not UTF-8 text ({e.reason}); expected {expected}") from None
    except (OSError, RecursionError, ValueError) as e:
        raise ModelError(f"{file}: could not read ({type(e).__name__}: {e})") from None
    if not isinstance(value, dict):
        raise ModelError(f"{file}: expected {expected}, got {type(value).__name__}")
    return value


def _safe_open(file: str):
    """``safe_open(file)``; ModelError naming the file for a truncated or garbled one."""
    try:
        return safe_open(file, framework="numpy")
    except FileNotFoundError:
        raise ModelError(f"{file}: no such file") from None
    except Exception as e:  # noqa: BLE001 - safetensors' SafetensorError, OSError, ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(
            f"{file}: not a readable safetensors file ({msg}); truncated or corrupt?"
        ) from None


# safetensors dtype names of floating-point tensors (the only ones a weight may have)
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def _tensor_files(path: str) -> dict[str, str]:
    """tensor name -> safetensors file, for a single-file or an index-sharded checkpoint."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        weight_map = _read_json(index, 'a JSON object with a "weight_map"').get("weight_map")
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise ModelError(
                f'{index}: expected a "weight_map" object (tensor name -> shard file name)'
            )
        files = {name: os.path.join(path, file) for name, file in weight_map.items()}
        missing = sorted({f for f in files.values() if not os.path.isfile(f)})
        if missing:
            raise ModelError(
                f"{missing[0]}: listed in {index} but missing"
                + (f" (and {len(missing) - 1} more shard(s))" if len(missing) > 1 else "")
            )
        return files
    single = os.path.join(path, SINGLE_FILE)
    if os.path.isfile(single):
        with _safe_open(single) as f:
            return dict.fromkeys(f.keys(), single)
    raise ModelNotFoundError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found")


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
            self._open[file] = _safe_open(file)
        handle = self._open[file]
        if name not in handle.keys():
            raise ModelError(f"{file}: has no tensor {name!r} (the index {INDEX_FILE} says it has)")
        dtype = handle.get_slice(name).get_dtype()
        if dtype not in FLOAT_DTYPES:
            raise ModelError(
                f"{file}: tensor {name!r} has dtype {dtype}; expected a floating-point weight "
                f"({', '.join(FLOAT_DTYPES)})"
            )
        return LazyTensor(handle, name)


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
    config_file = os.path.join(path, "config.json")
    config = dataclasses.replace(config_from_hf(hf_config, config_file), dtype=dtype)
    module = _module_for_config(config)
    reader = _Reader(path)
    try:
        params = module.params_from_hf(reader, config)
    except KeyError as e:
        raise ModelError(
            f"{path}: tensor {e.args[0]!r} is missing from the checkpoint "
            f"({len(reader.files)} tensors found)"
        ) from None
    except ModelError:
        raise
    except ValueError as e:  # a tensor whose shape does not match config.json
        named = re.search(r"tensor '?([^\s:']+)'?:", str(e))
        where = reader.files.get(named.group(1), path) if named else path
        raise ModelError(f"{where}: {e} (config {config_file})") from None
    expected = set(module.hf_tensor_names(config))
    extra = sorted(
        n for n in set(reader.files) - expected if not n.endswith(module.IGNORED_HF_SUFFIXES)
    )
    if extra:
        raise ModelError(f"{path}: unexpected tensors for this config: {extra[:10]}")
    params = _materialize(params, DTYPES[dtype], shardings)
    _, apply_fn = module.make_model(config)
    return apply_fn, params, config


def _as_new_file(path: str) -> None:
    """Gives ``path`` the mode ``open()`` gives a new file (0666 less the umask)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def save_pretrained(params, config, out_dir: str, *, max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes ``config.json`` and safetensors (sharded with an index above ``max_shard_bytes``)
    that ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` loads.

    Tensors are written in the parameters' dtype (float32 or bfloat16). The files get the
    mode of any new file (``0666`` less the umask: ``0644`` usually), not the ``0600`` that
    safetensors gives its own.
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
        _as_new_file(os.path.join(out_dir, SINGLE_FILE))
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, file), metadata={"format": "pt"})
        _as_new_file(os.path.join(out_dir, file))
        weight_map.update(dict.fromkeys(shard, file))
    index = {
        "metadata": {"total_size": sum(x.nbytes for x in tensors.values())},
        "weight_map": weight_map,
    }
    with open(os.path.join(out_dir, INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
