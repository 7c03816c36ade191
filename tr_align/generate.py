"""Batched sampling / greedy decoding with a KV cache, jitted end to end.

Prompts are LEFT-padded to a common length P, so every row's last prompt token sits
at slot P - 1 and the first new token is sampled from the same column for all rows.
Rotary positions count only real tokens (``cumsum(mask) - 1``), so a padded row
decodes exactly like the same prompt unpadded. The cache holds P + max_new_tokens
slots; after a one-shot prefill of the prompt, each step feeds one token.

Sampling: ``temperature == 0`` is greedy (argmax); otherwise logits are divided by
the temperature, restricted to the ``top_k`` largest (0 = all) and to the smallest
set whose probability reaches ``top_p`` (1 = all), then sampled with the seed.
After a row emits ``eos_id`` it emits ``pad_id``; decoding stops early once every
row is done. The settings of one decoding call are a ``SamplingSettings``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tr_align import hf, progress
from tr_align.errors import ConfigError
from tr_align.io import pretrained


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """How to decode: ``max_new_tokens`` per prompt; ``temperature`` 0 = greedy, else
    sampling restricted to the ``top_k`` most likely tokens (0 = all) and the ``top_p``
    nucleus (1 = all), seeded by ``seed``. Out-of-range values are a ``ConfigError``
    naming the setting."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        problems = [
            f"{name}={value!r}: {rule}"
            for name, value, ok, rule in (
                ("max_new_tokens", self.max_new_tokens, self.max_new_tokens >= 1, "must be >= 1"),
                ("temperature", self.temperature, self.temperature >= 0, "must be >= 0"),
                ("top_k", self.top_k, self.top_k >= 0, "must be >= 0 (0 = all)"),
                ("top_p", self.top_p, 0 < self.top_p <= 1, "must be in (0, 1] (1 = all)"),
            )
            if not ok
        ]
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def from_the_model(self) -> bool:
        """Samples follow the model's own distribution (temperature 1, no top-k / top-p
        truncation): what an unbiased Monte-Carlo KL estimate needs."""
        return self.temperature == 1.0 and self.top_k == 0 and self.top_p == 1.0

    def with_overrides(self, **overrides) -> SamplingSettings:
        """These settings with some fields replaced (``max_new_tokens=8``); no overrides: self."""
        return dataclasses.replace(self, **overrides) if overrides else self


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0):
    """Token-id lists -> (ids [B, P] int32, mask [B, P] int32), left-padded."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    return ids, mask


def sample_logits(logits_BV, rng, *, temperature: float, top_k: int, top_p: float):
    """One token per row from float32 logits [B, V] (see module doc)."""
    if temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits = logits_BV / temperature
    neg = jnp.finfo(logits.dtype).min
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p < 1.0:
        sorted_desc = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
        cutoff = jnp.min(jnp.where(before < top_p, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, neg, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(
    jax.jit,
    static_argnames=(
        "decode_fn",
        "init_cache",
        "max_new_tokens",
        "temperature",
        "top_k",
        "top_p",
        "eos_id",
        "pad_id",
    ),
)
def decode_loop(
    params,
    ids_BP,
    mask_BP,
    rng,
    *,
    decode_fn,
    init_cache,
    max_new_tokens,
    temperature,
    top_k,
    top_p,
    eos_id,
    pad_id,
):
    """The jitted decoding loop on left-padded prompts (``left_pad``): one prefill, then one
    token per step until ``max_new_tokens`` or every row is done. Returns (tokens
    [B, max_new_tokens] int32, lengths [B]) as device arrays. ``generate`` is the friendly
    entry point; this one lets a caller fix the padded width and the PRNG key itself."""
    b, p = ids_BP.shape
    cache = init_cache(b, p + max_new_tokens)
    kv_mask = jnp.zeros((b, p + max_new_tokens), jnp.int32).at[:, :p].set(mask_BP)
    positions = jnp.maximum(jnp.cumsum(mask_BP, axis=1) - 1, 0)
    logits, cache = decode_fn(params, ids_BP, positions, cache, 0, kv_mask)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
    eos = -1 if eos_id is None else eos_id

    def cond(carry):
        i, done = carry[0], carry[5]
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, logits_BV, cache, kv_mask, pos_B, done, out, rng = carry
        rng, key = jax.random.split(rng)
        tok = sample_logits(logits_BV, key, temperature=temperature, top_k=top_k, top_p=top_p)
        tok = jnp.where(done, pad_id, tok)
        out = out.at[:, i].set(tok)
        done = done | (tok == eos)
        kv_mask = kv_mask.at[:, p + i].set(1)
        step_logits, cache = decode_fn(params, tok[:, None], pos_B[:, None], cache, p + i, kv_mask)
        return i + 1, step_logits[:, -1], cache, kv_mask, pos_B + 1, done, out, rng

    carry = (
        0,
        logits[:, -1],
        cache,
        kv_mask,
        positions[:, -1] + 1,
        jnp.zeros((b,), jnp.bool_),
        out,
        rng,
    )
    carry = jax.lax.while_loop(cond, body, carry)
    out = carry[6]
    is_eos = out == eos
    first_eos = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1) + 1, max_new_tokens)
    return out, first_eos


def generate(
    decode_fn: Callable,
    init_cache: Callable,
    params,
    prompts,
    sampling: SamplingSettings | None = None,
    *,
    eos_id: int | None = None,
    pad_id: int = 0,
    **overrides,
):
    """Continues each prompt (a list of token ids).

    Args:
      decode_fn: a model's cached forward; ``hf.decode_fns(config)`` gives it and init_cache.
      init_cache: ``(batch, length) -> cache``.
      params: model parameters.
      prompts: token-id lists (any lengths; left-padded internally).
      sampling: the decoding settings (default ``SamplingSettings()``: greedy, 64 tokens).
      **overrides: fields of ``SamplingSettings`` replacing those of ``sampling``, e.g.
        ``max_new_tokens=16, temperature=1.0`` (as ``transformers``' ``generate(**kwargs)``
        overrides its generation config).

    Returns:
      (tokens [B, max_new_tokens] int32 numpy, lengths [B]): new tokens per row, padded
      with ``pad_id`` after EOS; ``lengths`` counts tokens up to and including EOS.
    """
    s = (sampling or SamplingSettings()).with_overrides(**overrides)
    ids, mask = left_pad(prompts, pad_id)
    tokens, lengths = decode_loop(
        params,
        jnp.asarray(ids),
        jnp.asarray(mask),
        jax.random.PRNGKey(s.seed),
        decode_fn=decode_fn,
        init_cache=init_cache,
        max_new_tokens=int(s.max_new_tokens),
        temperature=float(s.temperature),
        top_k=int(s.top_k),
        top_p=float(s.top_p),
        eos_id=eos_id,
        pad_id=pad_id,
    )
    return np.asarray(tokens), np.asarray(lengths)


def complete(
    source: str,
    prompts: Sequence[str],
    sampling: SamplingSettings | None = None,
    *,
    chat: bool = False,
    **overrides,
):
    """Text in, text out: loads ``source`` (see ``tr_align.io.pretrained``) and its tokenizer,
    encodes each prompt (as a user turn with the chat template when ``chat``), generates
    with ``sampling`` (and ``overrides``, as in ``generate``), and decodes the new tokens up
    to EOS."""
    with progress.phase(f"loading {source}"):
        config, _, _, params = pretrained.load({"pretrained": source, "dtype": "float32"})
        tokenizer = pretrained.load_tokenizer(source)
    decode_fn, init_cache = hf.decode_fns(config)
    if chat:
        ids = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True
            )
            for p in prompts
        ]
        ids = [list(x["input_ids"]) if hasattr(x, "keys") else list(x) for x in ids]
    else:
        ids = [tokenizer.encode(p) for p in prompts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with progress.phase(f"generating {len(ids)} completion(s)"):
        tokens, lengths = generate(
            decode_fn,
            init_cache,
            params,
            ids,
            sampling,
            eos_id=tokenizer.eos_token_id,
            pad_id=pad_id,
            **overrides,
        )
    return [tokenizer.decode(t[:n], skip_special_tokens=True) for t, n in zip(tokens, lengths)]
