"""Tokenization of preference examples into ragged token arrays, cached on disk.

An example is ``{prompt, chosen, rejected}`` (paired) or ``{prompt, completion,
label}`` (unpaired KTO), as produced by ``tr_align.data.formats.convert``: plain
strings, or chat message lists (conversational).

Text (as TRL builds it):
  * conversational: ``prompt_text = apply_chat_template(prompt, add_generation_prompt=True)``
    and ``completion_text = apply_chat_template(prompt + completion)[len(prompt_text):]``, both
    tokenized without extra special tokens (the template writes them). Trailing whitespace after
    the template's end-of-turn token is dropped, so the completion ends with EOS.
  * plain strings: the prompt is tokenized with the tokenizer's own special tokens (e.g. Llama's
    BOS; GPT-NeoX adds none), the completion without.
  * EOS is appended to every completion that does not already end with it.

Truncation (TRL's classic ``DPODataCollatorWithPadding`` rule, applied to chosen and rejected
together so they keep one shared prompt): when ``len(prompt) + len(longest completion) >
max_length``, the prompt keeps its last ``max_prompt_length`` tokens; when it is still too long,
the completions keep their first ``max_length - len(prompt)`` tokens (TRL's
``truncation_mode="keep_start"``, ``data.truncation_mode``'s default). With
``max_prompt_length = 0`` prompts are never truncated, and a prompt that leaves no room for a
completion token is a bad row (``prompt_too_long``; TRL drops such rows too).

``truncation_mode="keep_end"`` (TRL's ``sequence[-max_length:]``): after the
``max_prompt_length`` step, a sequence still over ``max_length`` loses its start — the prompt
keeps its last ``max_length - len(longest completion)`` tokens, so the longest sequence is
exactly TRL's; when even that leaves no prompt token, the prompt keeps its last token and the
completions their last ``max_length - 1`` tokens (nothing is dropped). TRL cuts chosen and
rejected each on its own, so there the shorter one can keep more of the prompt; here both keep
one prompt (the shared prefix the ``prefix_shared`` layout computes once).

The result is a ``TokenizedSet``: flat int32 token arrays plus offsets, saved as one ``.npz``
in a cache keyed by the examples, the tokenizer and the length settings, so a second run (or
a resumed one) skips tokenization.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

from tr_align.data.formats import BadRow, is_conversational

CACHE_VERSION = 1  # bump when the token layout or the rules above change
_CHUNK = 512  # examples per batched tokenizer call


@dataclasses.dataclass(frozen=True)
class Ragged:
    """N variable-length int32 sequences: ``values[offsets[i]:offsets[i + 1]]``."""

    values: np.ndarray  # int32 [total]
    offsets: np.ndarray  # int64 [N + 1]

    @classmethod
    def from_lists(cls, seqs: Sequence[Sequence[int]]) -> Ragged:
        lengths = np.fromiter((len(s) for s in seqs), np.int64, len(seqs))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        values = np.fromiter((t for s in seqs for t in s), np.int32, int(offsets[-1]))
        return cls(values, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def take(self, idx) -> Ragged:
        return Ragged.from_lists([self[int(i)] for i in idx])


@dataclasses.dataclass(frozen=True)
class TokenizedSet:
    """Tokenized examples. Paired: ``chosen`` and ``rejected``; unpaired: ``completion`` and
    ``label`` (1 desirable, 0 undesirable). ``prompt`` is shared by both completions."""

    prompt: Ragged
    chosen: Ragged | None = None
    rejected: Ragged | None = None
    completion: Ragged | None = None
    label: np.ndarray | None = None  # int32 [N]

    @property
    def paired(self) -> bool:
        return self.chosen is not None

    def __len__(self) -> int:
        return len(self.prompt)

    def completions(self) -> tuple[Ragged, ...]:
        return (self.chosen, self.rejected) if self.paired else (self.completion,)

    @property
    def lengths(self) -> np.ndarray:
        """Tokens of the longest sequence (prompt + completion) of each example."""
        return self.prompt.lengths + np.maximum.reduce([c.lengths for c in self.completions()])

    def take(self, idx) -> TokenizedSet:
        idx = np.asarray(idx)
        return TokenizedSet(
            prompt=self.prompt.take(idx),
            **{
                k: (getattr(self, k).take(idx) if getattr(self, k) is not None else None)
                for k in ("chosen", "rejected", "completion")
            },
            label=None if self.label is None else self.label[idx],
        )

    def save(self, path: str) -> None:
        arrays = {}
        for name in ("prompt", "chosen", "rejected", "completion"):
            r = getattr(self, name)
            if r is not None:
                arrays[f"{name}_values"], arrays[f"{name}_offsets"] = r.values, r.offsets
        if self.label is not None:
            arrays["label"] = self.label
        tmp = path + ".tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written cache entry

    @classmethod
    def load(cls, path: str) -> TokenizedSet:
        with np.load(path) as z:
            parts = {
                name: Ragged(z[f"{name}_values"], z[f"{name}_offsets"])
                for name in ("prompt", "chosen", "rejected", "completion")
                if f"{name}_values" in z
            }
            return cls(**parts, label=z["label"] if "label" in z else None)


def texts(example: dict, tokenizer) -> tuple[str, list[str]]:
    """(prompt text, [completion texts]) of one example, chat template applied if needed."""
    keys = ("chosen", "rejected") if "chosen" in example else ("completion",)
    if not is_conversational(example):
        return example["prompt"], [example[k] for k in keys]
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "conversational data needs a tokenizer with a chat template; this tokenizer has none "
            "(use plain-string data or a tokenizer with tokenizer_config.json 'chat_template')"
        )
    prompt = example["prompt"]
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    out = []
    for k in keys:
        full = tokenizer.apply_chat_template(prompt + list(example[k]), tokenize=False)
        if not full.startswith(prompt_text):
            raise ValueError(
                "the chat template renders the prompt differently with and without the "
                f"completion; cannot split them (prompt text: {prompt_text[-80:]!r})"
            )
        completion = full[len(prompt_text) :]
        eos = tokenizer.eos_token
        if eos and completion.rstrip().endswith(eos):
            completion = completion.rstrip()
        out.append(completion)
    return prompt_text, out


def truncate(
    prompt,
    completions,
    *,
    max_length: int,
    max_prompt_length: int,
    truncation_mode: str = "keep_start",
):
    """TRL's classic rule, then ``truncation_mode`` (module docstring). Raises
    BadRow('prompt_too_long') (``keep_start`` only)."""
    longest = max(len(c) for c in completions)
    if len(prompt) + longest > max_length and max_prompt_length:
        prompt = prompt[-max_prompt_length:]
    if truncation_mode == "keep_end":
        if len(prompt) + longest > max_length:
            keep = max(max_length - longest, 1)
            prompt = prompt[-keep:]
            if keep + longest > max_length:
                completions = [c[-(max_length - keep) :] for c in completions]
        return prompt, completions
    if truncation_mode != "keep_start":
        raise ValueError(f"truncation_mode must be keep_start or keep_end, got {truncation_mode!r}")
    if len(prompt) >= max_length:
        raise BadRow(
            "prompt_too_long",
            f"the prompt has {len(prompt)} tokens; data.max_length={max_length} leaves no room "
            "for the completion (set data.max_prompt_length to keep the prompt's end)",
        )
    if len(prompt) + longest > max_length:
        completions = [c[: max_length - len(prompt)] for c in completions]
    return prompt, completions


def _encode(tokenizer, strings, *, special):
    if not strings:
        return []
    return tokenizer(list(strings), add_special_tokens=special)["input_ids"]


def tokenize(
    examples: Sequence[dict],
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int,
    truncation_mode: str = "keep_start",
    progress: bool = True,
) -> tuple[TokenizedSet, list[tuple[int, BadRow]], dict]:
    """Tokenizes and truncates ``examples`` (all paired or all unpaired).

    Returns (the kept examples as a TokenizedSet, [(index, BadRow)] of dropped ones, stats with
    ``examples_per_s`` and ``tokens_per_s``).
    """
    t0 = time.perf_counter()
    eos = tokenizer.eos_token_id
    paired = bool(examples) and "chosen" in examples[0]
    prompts, comps, bad, labels = [], [], [], []
    total_tokens = 0
    bar = tqdm(total=len(examples), desc="tokenize", disable=not progress, unit="ex")
    for start in range(0, len(examples), _CHUNK):
        chunk = examples[start : start + _CHUNK]
        rendered = [texts(ex, tokenizer) for ex in chunk]
        chat = [is_conversational(ex) for ex in chunk]
        p_ids = [None] * len(chunk)
        for flag in (True, False):  # chat prompts carry their special tokens in the text
            where = [i for i, c in enumerate(chat) if c == flag]
            for i, ids in zip(
                where, _encode(tokenizer, [rendered[i][0] for i in where], special=not flag)
            ):
                p_ids[i] = ids
        flat = [c for _, cs in rendered for c in cs]
        c_ids = _encode(tokenizer, flat, special=False)
        per = len(rendered[0][1]) if rendered else 0
        for i, ex in enumerate(chunk):
            cs = [list(ids) for ids in c_ids[i * per : (i + 1) * per]]
            cs = [c if c and c[-1] == eos else c + [eos] for c in cs]
            try:
                p, cs = truncate(
                    p_ids[i],
                    cs,
                    max_length=max_length,
                    max_prompt_length=max_prompt_length,
                    truncation_mode=truncation_mode,
                )
            except BadRow as e:
                bad.append((start + i, e))
                continue
            prompts.append(p)
            comps.append(cs)
            if not paired:
                labels.append(int(bool(ex["label"])))
            total_tokens += len(p) + sum(len(c) for c in cs)
        bar.update(len(chunk))
    bar.close()
    if paired:
        out = TokenizedSet(
            prompt=Ragged.from_lists(prompts),
            chosen=Ragged.from_lists([c[0] for c in comps]),
            rejected=Ragged.from_lists([c[1] for c in comps]),
        )
    else:
        out = TokenizedSet(
            prompt=Ragged.from_lists(prompts),
            completion=Ragged.from_lists([c[0] for c in comps]),
            label=np.asarray(labels, np.int32),
        )
    dt = max(time.perf_counter() - t0, 1e-9)
    stats = {
        "examples": len(examples),
        "seconds": round(dt, 3),
        "examples_per_s": round(len(examples) / dt, 1),
        "tokens_per_s": round(total_tokens / dt, 1),
    }
    return out, bad, stats


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything about the tokenizer that changes token ids."""
    backend = (
        tokenizer.backend_tokenizer.to_str() if hasattr(tokenizer, "backend_tokenizer") else ""
    )
    parts = [backend, str(getattr(tokenizer, "chat_template", "")), str(tokenizer.eos_token)]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


def cache_key(examples: Sequence[dict], tokenizer, **settings) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_VERSION, settings, tokenizer_fingerprint(tokenizer)]).encode())
    for ex in examples:
        h.update(json.dumps(ex, sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "tr_align", "tokenized")


def tokenize_cached(
    examples: Sequence[dict],
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int,
    truncation_mode: str = "keep_start",
    cache_dir: str = "",
    progress: bool = True,
) -> tuple[TokenizedSet, Counter, dict]:
    """``tokenize`` with an on-disk cache. Returns (set, Counter of dropped reasons, stats);
    stats has ``cached: True`` when the cache was hit. Tokenization never fails on a row:
    rows that cannot fit are dropped and counted (the caller decides whether that is an error,
    with ``first_bad`` in the stats naming the first one)."""
    settings = dict(max_length=max_length, max_prompt_length=max_prompt_length)
    if truncation_mode != "keep_start":  # the default keeps the caches made before the option
        settings["truncation_mode"] = truncation_mode
    cache_dir = cache_dir or default_cache_dir()
    key = cache_key(examples, tokenizer, **settings)
    path = os.path.join(cache_dir, f"{key}.npz")
    meta_path = os.path.join(cache_dir, f"{key}.json")
    if os.path.exists(path) and os.path.exists(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        return TokenizedSet.load(path), Counter(meta["bad"]), {**meta["stats"], "cached": True}
    out, bad, stats = tokenize(
        examples,
        tokenizer,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        truncation_mode=truncation_mode,
        progress=progress,
    )
    counts = Counter(e.reason for _, e in bad)
    if bad:
        i, e = bad[0]
        stats["first_bad"] = {"index": i, "reason": e.reason, "detail": str(e)}
    os.makedirs(cache_dir, exist_ok=True)
    out.save(path)
    with open(meta_path, "w", encoding="utf-8") as f:
        json.dump({"bad": dict(counts), "stats": stats}, f)
    return out, counts, {**stats, "cached": False}


def unpair(data: TokenizedSet) -> TokenizedSet:
    """Paired set -> unpaired: every chosen completion as desirable (label 1), then every
    rejected one as undesirable (label 0), each with its prompt (``formats.to_unpaired`` for
    tokenized data)."""
    n = len(data)
    both = list(range(n)) * 2
    prompts = data.prompt.take(both)
    comps = [data.chosen[i] for i in range(n)] + [data.rejected[i] for i in range(n)]
    return TokenizedSet(
        prompt=prompts,
        completion=Ragged.from_lists(comps),
        label=np.concatenate([np.ones(n, np.int32), np.zeros(n, np.int32)]),
    )
