"""Causal LMs loaded for inference by ``tr-align eval``, its scorers and the frontier.

A ``Model`` is a policy from an HF model directory, a .gguf file, ``smollm2`` or a tr-align
run directory (``WORKDIR`` = its newest checkpoint, ``WORKDIR@STEP`` = that step), in
float32, with compiled functions shared by every model of one architecture and, when it has
one, its tokenizer. ``completion_logps`` scores completions under a model by teacher forcing.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tr_align import hf, losses, progress
from tr_align.errors import ModelNotFoundError
from tr_align.io import pretrained
from tr_align.io.rundir import RunDir, is_run_dir


@dataclasses.dataclass
class Model:
    """A loaded causal LM: parameters, compiled functions and (optionally) its tokenizer."""

    name: str
    config: Any
    params: Any
    apply_fn: Any  # jitted (params, ids [B, T], mask [B, T]) -> logits [B, T, V]
    decode_fn: Any
    init_cache: Any
    tokenizer: Any = None
    start_source: str = ""  # a run directory's starting model (its SFT model), else ""
    step: int | None = None  # a run directory's checkpoint step


_FNS: dict[str, tuple] = {}


def model_fns(config):
    """(jitted apply_fn, decode_fn, init_cache), one set per distinct model config, so models
    of one architecture share compiled code (generation and scoring compile once)."""
    key = repr(config)
    if key not in _FNS:
        _, apply_fn = hf.model_fns(config)
        decode_fn, init_cache = hf.decode_fns(config)
        _FNS[key] = (jax.jit(apply_fn), decode_fn, init_cache)
    return _FNS[key]


def split_step(source: str) -> tuple[str, int | None]:
    """``"runs/x@100"`` -> ``("runs/x", 100)``; other sources -> ``(source, None)``."""
    base, sep, step = source.rpartition("@")
    if sep and step.isdigit() and is_run_dir(base):
        return base, int(step)
    return source, None


def restore_run_params(workdir: str, *, step: int | None = None, which: str = "policy"):
    """``(params, step)`` of a run's checkpoint (newest when ``step`` is None) on the default
    device; ``which``: "policy" or "reference"."""
    params, step = RunDir(workdir).restore_params(which, step)
    return jax.tree.map(jnp.asarray, params), step


@functools.lru_cache(maxsize=8)
def _tokenizer_or_none(source: str):
    if os.path.isdir(source) and not any(
        os.path.isfile(os.path.join(source, f)) for f in hf.TOKENIZER_FILES
    ):
        return None
    try:
        return pretrained.load_tokenizer(source)
    except (OSError, ValueError):
        return None


def load_policy(source: str, *, step: int | None = None, which: str = "policy") -> Model:
    """A model from an HF directory, a .gguf file, ``smollm2`` or a run directory
    (``DIR`` or ``DIR@STEP``), in float32."""
    source, at = split_step(source)
    step = at if step is None else step
    if is_run_dir(source):
        run = RunDir(source)
        config = run.model_config()
        with progress.phase(f"loading {source}"):
            params, step = restore_run_params(source, step=step, which=which)
        start, tok_source = run.starting_model(), run.tokenizer_source()
        tokenizer = _tokenizer_or_none(tok_source) if tok_source else None
        name = f"{source}@{step}"
    else:
        if not source or pretrained.check_source(source):
            raise ModelNotFoundError(
                f"{source!r}: not a model (expected a Hugging Face model directory, a .gguf "
                f"file, 'smollm2' or a tr-align run directory)"
            )
        with progress.phase(f"loading {source}"):
            config, _, _, params = pretrained.load({"pretrained": source, "dtype": "float32"})
            tokenizer, start, name = _tokenizer_or_none(source), "", source
    apply_fn, decode_fn, init_cache = model_fns(config)
    return Model(name, config, params, apply_fn, decode_fn, init_cache, tokenizer, start, step)


def with_params(model: Model, params, name: str) -> Model:
    """The same architecture and tokenizer with other parameters (e.g. a later checkpoint)."""
    return dataclasses.replace(model, params=params, name=name)


def completion_text(tokenizer, ids: list[int]) -> str:
    """A sampled completion as text: a trailing EOS dropped, special tokens skipped; token ids
    joined by spaces without a tokenizer (the synthetic task)."""
    if tokenizer is None:
        return " ".join(map(str, ids))
    eos = tokenizer.eos_token_id
    if ids and ids[-1] == eos:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=True)


@functools.partial(jax.jit, static_argnames="apply_fn")
def _row_logps(params, ids, attn, loss_mask, *, apply_fn):
    logits = apply_fn(params, ids[:, :-1], attn[:, :-1])
    return losses.sequence_logps(logits, ids[:, 1:], loss_mask[:, 1:])


def completion_logps(
    apply_fn, params, prompt_ids: Sequence, completion_ids: Sequence, *, batch_size: int = 32
) -> np.ndarray:
    """``log p(y | x) = sum_t log p(y_t | x, y_<t)`` [N] float32 for token-id lists x, y
    (teacher forcing on right-padded ``x + y``; only the completion tokens are summed)."""
    n = len(prompt_ids)
    if n != len(completion_ids):
        raise ValueError(f"{n} prompts but {len(completion_ids)} completions")
    total = [len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)]
    width = -(-max(total) // 16) * 16  # few distinct shapes -> few compilations
    out = np.zeros(n, np.float32)
    for start in range(0, n, batch_size):
        ids = np.zeros((batch_size, width), np.int32)
        attn = np.zeros((batch_size, width), np.int32)
        mask = np.zeros((batch_size, width), np.int32)
        for r, i in enumerate(range(start, min(start + batch_size, n))):
            p, c = list(prompt_ids[i]), list(completion_ids[i])
            ids[r, : len(p) + len(c)] = p + c
            attn[r, : len(p) + len(c)] = 1
            mask[r, len(p) : len(p) + len(c)] = 1
        logps = _row_logps(params, ids, attn, mask, apply_fn=apply_fn)
        real = min(batch_size, n - start)
        out[start : start + real] = np.asarray(logps)[:real]
    return out
