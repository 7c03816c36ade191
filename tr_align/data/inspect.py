"""``tr-align data inspect``: look at the tokenized data before paying for a run.

Prints the data report (sizes, bad rows per reason, length statistics, padding efficiency,
tokenization throughput), the number of training batches per length bucket, and a few
examples exactly as the model sees them: the padded row decoded token by token, with the
prompt (masked out of the loss) shown dim on a terminal, or between ``[[prompt: ... ]]``
markers otherwise.
"""

from __future__ import annotations

import collections
import sys

import numpy as np

from tr_align.data import batching, pipeline

DIM, RESET = "\x1b[2m", "\x1b[0m"


def _decode(tokenizer, ids) -> str:
    if tokenizer is None:  # synthetic task: token ids
        return " ".join(str(int(i)) for i in ids)
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def render_row(ids, loss_mask, attention_mask, tokenizer, *, color: bool) -> str:
    """One padded row: masked (prompt) span dim or bracketed, completion plain, padding cut."""
    n = int(attention_mask.sum())
    ids, loss_mask = ids[:n], loss_mask[:n]
    out = []
    start = 0
    for end in list(np.flatnonzero(np.diff(loss_mask)) + 1) + [n]:
        text = _decode(tokenizer, ids[start:end])
        if loss_mask[start] == 0:
            text = f"{DIM}{text}{RESET}" if color else f"[[prompt: {text}]]"
        out.append(text)
        start = end
    return "".join(out)


def load(config, *, progress: bool = True):
    """(Data, tokenizer or None) for ``config`` without loading model weights."""
    import jax

    from tr_align.config import validate

    validate(config, jax.device_count())
    # the synthetic task's vocabulary is the from-scratch model's
    return pipeline.from_config(config, vocab_size=config.model.vocab_size, progress=progress)


def inspect(config, *, num_examples: int = 3, color: bool | None = None, out=None) -> dict:
    """Prints the report and ``num_examples`` rendered examples; returns the data report."""
    out = out or sys.stdout
    color = out.isatty() if color is None else color
    data, tokenizer = load(config, progress=True)
    print(pipeline.describe(data.report), file=out)
    order = batching.epoch_batches(data.train.lengths, config.train.batch_size, 0, 0)
    per_bucket = collections.Counter(
        batching.bucket_for(int(data.train.lengths[idx].max()), data.buckets) for idx in order
    )
    print(
        "  training batches per bucket (epoch 0): "
        + ", ".join(f"{b}: {per_bucket.get(b, 0)}" for b in data.buckets),
        file=out,
    )
    n = min(num_examples, len(data.train))
    batch = batching.make_batch(data.train, np.arange(n), buckets=data.buckets, pad_id=data.pad_id)
    names = ("chosen", "rejected") if data.paired else ("completion",)
    for i in range(n):
        p = len(data.train.prompt[i])
        head = f"\n--- example {i}: prompt {p} tokens (masked out of the loss)"
        if not data.paired:
            head += f", label {'desirable' if data.train.label[i] else 'undesirable'}"
        print(head, file=out)
        for name in names:
            c = len(getattr(data.train, name)[i])
            text = render_row(
                batch[f"{name}_input_ids"][i],
                batch[f"{name}_loss_mask"][i],
                batch[f"{name}_attention_mask"][i],
                tokenizer,
                color=color,
            )
            print(
                f"[{name}: {c} tokens, padded to {batch[f'{name}_input_ids'].shape[1]}]", file=out
            )
            print(text, file=out)
    return data.report
