"""Real-format data, offline: TR-DPO of a tiny Llama on the Anthropic-HH fixture.

The 8 hand-written rows of ``tests/fixtures/data/hh.jsonl`` (the hub dataset's schema:
``chosen``/``rejected`` transcripts) go through the whole data pipeline: HH parsing into chat
turns, the fixture tokenizer's ChatML template, truncation, length buckets, and training.
It shows the pipeline, not alignment quality (8 rows). Run from the repository root:

    tr-align data inspect --config=configs/hh_tiny.py
    tr-align train --config=configs/hh_tiny.py --workdir=runs/hh_tiny

Expected: ``data inspect`` lists 6 train / 2 eval examples and their length buckets; training
runs 20 steps in well under a minute on 2 CPU cores. The fixture paths are
relative to this file, so the commands work from any directory.

The same settings on the real dataset (network, Hugging Face cache):
``--config.data.source=hub --config.data.path=Anthropic/hh-rlhf --config.data.eval_split=test``
with a real model and its tokenizer (``--config.model.pretrained=smollm2``).
"""

import os

from tr_align.config import load_config_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config(preset: str | None = None):
    c = load_config_file(os.path.join(REPO, "configs", "default.py"), preset)
    c.model.vocab_size = 384  # the fixture tokenizer's vocabulary
    c.model.max_position_embeddings = 512
    c.data.update(
        dict(
            source="files",
            path=os.path.join(REPO, "tests", "fixtures", "data", "hh.jsonl"),
            format="hh",
            tokenizer=os.path.join(REPO, "tests", "fixtures", "tokenizer"),
            max_length=256,
            max_prompt_length=192,
            buckets=(64, 128, 256),
            eval_fraction=0.25,
        )
    )
    c.train.update(dict(steps=20, batch_size=2, eval_batch_size=2, eval_every_steps=10))
    c.optimizer.warmup_steps = 2
    c.checkpoint.every_steps = 10
    return c
