"""A built-in synthetic preference task, generated offline and deterministic from a seed.

Token ids: 0 = pad, 1 = BOS, 2 = SEP (end of prompt), 3.. = content tokens.

Each example is ``BOS p_1 .. p_P SEP r_1 .. r_R`` with a random prompt of
``P`` content tokens (P varies, so batches are right-padded). The rule that
makes a response *chosen*: it counts up from the last prompt token in steps of
``s = 1 + (p_1 mod 3)`` (modulo the number of content tokens), i.e. the step
size is set by the first prompt token. The *rejected* response is the chosen
one with 1 to ``R // 2`` positions replaced by other content tokens. A model
has to attend back to the prompt to tell them apart, so reward accuracy on
held-out prompts measures whether the rule was learned rather than memorised.
"""

from __future__ import annotations

import numpy as np

PAD, BOS, SEP = 0, 1, 2
FIRST_CONTENT = 3
MIN_CONTENT_TOKENS = 4  # model.vocab_size >= FIRST_CONTENT + 4 = 7


def num_prompts(
    *, vocab_size: int, min_prompt_len: int, max_prompt_len: int, limit: int | None = None
) -> int:
    """How many distinct prompts exist (the train and eval prompts are all distinct), or
    ``limit`` once the count reaches it."""
    c, total = vocab_size - FIRST_CONTENT, 0
    for n in range(min_prompt_len, max_prompt_len + 1):
        total += c**n
        if limit is not None and total >= limit:
            return limit
    return total


def _example(rng, *, num_content, min_prompt_len, max_prompt_len, response_len):
    p_len = int(rng.integers(min_prompt_len, max_prompt_len + 1))
    prompt = rng.integers(0, num_content, size=p_len)
    step = 1 + prompt[0] % 3
    chosen = (prompt[-1] + step * np.arange(1, response_len + 1)) % num_content
    rejected = chosen.copy()
    n_bad = int(rng.integers(1, response_len // 2 + 1))
    where = rng.choice(response_len, size=n_bad, replace=False)
    shift = rng.integers(1, num_content, size=n_bad)  # never 0: always a different token
    rejected[where] = (rejected[where] + shift) % num_content
    return prompt + FIRST_CONTENT, chosen + FIRST_CONTENT, rejected + FIRST_CONTENT


def seq_len(*, max_prompt_len: int, response_len: int) -> int:
    """Padded length of every synthetic sequence: BOS + prompt + SEP + response."""
    return max_prompt_len + response_len + 2


def make_pairs(
    num_pairs: int,
    seed: int,
    *,
    vocab_size: int,
    min_prompt_len: int = 4,
    max_prompt_len: int = 8,
    response_len: int = 6,
    exclude_prompts=frozenset(),
):
    """Generates ``num_pairs`` preference pairs as right-padded int32 arrays.

    Returns:
      (arrays, prompts): ``arrays`` maps ``{chosen,rejected}_{input_ids,attention_mask,loss_mask}``
      to [N, T] int32 arrays (``loss_mask`` is 1 on response tokens); ``prompts``
      is the set of prompt tuples used (pass it as ``exclude_prompts`` to build a
      disjoint held-out set).
    """
    num_content = vocab_size - FIRST_CONTENT
    if num_content < MIN_CONTENT_TOKENS:
        raise ValueError(
            f"model.vocab_size={vocab_size} too small for the synthetic task (need >= 7)"
        )
    t = seq_len(max_prompt_len=max_prompt_len, response_len=response_len)
    rng = np.random.default_rng(seed)
    out = {
        f"{k}_{f}": np.zeros((num_pairs, t), np.int32)
        for k in ("chosen", "rejected")
        for f in ("input_ids", "attention_mask", "loss_mask")
    }
    prompts = set()
    i = 0
    while i < num_pairs:
        prompt, chosen, rejected = _example(
            rng,
            num_content=num_content,
            min_prompt_len=min_prompt_len,
            max_prompt_len=max_prompt_len,
            response_len=response_len,
        )
        key = tuple(prompt.tolist())
        if key in exclude_prompts or key in prompts:
            continue
        prompts.add(key)
        head = np.concatenate([[BOS], prompt, [SEP]])
        n = len(head) + response_len
        for name, resp in (("chosen", chosen), ("rejected", rejected)):
            out[f"{name}_input_ids"][i, :n] = np.concatenate([head, resp])
            out[f"{name}_attention_mask"][i, :n] = 1
            out[f"{name}_loss_mask"][i, len(head) : n] = 1
        i += 1
    return out, prompts


def train_and_eval(cfg, *, vocab_size: int, seed: int):
    """Builds the disjoint train and held-out eval sets described by ``cfg`` (the ``data`` config)."""
    kw = dict(
        vocab_size=vocab_size,
        min_prompt_len=cfg.min_prompt_len,
        max_prompt_len=cfg.max_prompt_len,
        response_len=cfg.response_len,
    )
    train, seen = make_pairs(cfg.num_train, seed, **kw)
    evals, _ = make_pairs(cfg.num_eval, seed + 1_000_003, exclude_prompts=seen, **kw)
    return train, evals


def to_tokenized(arrays):
    """The padded arrays of ``make_pairs`` as a ``TokenizedSet`` (prompt = BOS..SEP)."""
    from tr_align.data.tokenize import Ragged, TokenizedSet

    attn, loss = arrays["chosen_attention_mask"], arrays["chosen_loss_mask"]
    prompt_len = (attn * (1 - loss)).sum(1)

    def part(name, lo, hi):
        ids = arrays[f"{name}_input_ids"]
        return Ragged.from_lists([row[a:b] for row, a, b in zip(ids, lo, hi)])

    ends = attn.sum(1)
    return TokenizedSet(
        prompt=part("chosen", np.zeros_like(prompt_len), prompt_len),
        chosen=part("chosen", prompt_len, ends),
        rejected=part("rejected", prompt_len, arrays["rejected_attention_mask"].sum(1)),
    )
