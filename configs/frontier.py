"""The gold-reward / KL frontier (tr_align/frontier.py): DPO vs TR-DPO soft and hard, offline.

    pip install 'tr_align[frontier]'      # gensim (the review corpus) and vaderSentiment
    tr-align frontier --workdir=runs/frontier                              # reduced setting
    tr-align frontier --workdir=runs/frontier_full --config=configs/frontier.py:full

The reduced setting (default) took 749 s (12.5 minutes) on 2 CPU cores of a shared, busy
machine: SFT 150 steps, 8 pairs per training prompt (~5,300 pairs), 300 alignment
steps per method and seed, 3 seeds, 64 held-out prompts x 8 samples per checkpoint (every 30
steps). The ``full`` preset is the documented full setting: a 4-layer 128-wide model, 16
pairs per prompt (~10,000 pairs), 1000 alignment steps, 5 seeds, 16 samples per held-out
prompt (roughly 20x the compute: hours on 2 cores, minutes on a GPU). Override any key, e.g.
``--config.dpo.beta=0.05 --config.seeds=0,1``.

Gold reward: VADER compound sentiment (vaderSentiment) of prompt + completion, in [-1, 1].
Trust-region settings: soft alpha=0.6, tau=1 (the paper's soft update); hard alpha=1 with
tau=60 (reduced) / 200 (full), i.e. 4 hard reference updates per run (the paper's tau of
32-512 was for runs of thousands of steps).
"""

import os

import ml_collections

from tr_align.config import load_config_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config(preset: str | None = None):
    c = ml_collections.ConfigDict()
    # the training-run template (optimizer, mesh, checkpoint keys) for the SFT and DPO stages
    c.base = load_config_file(os.path.join(REPO, "configs", "default.py"))
    c.seed = 0  # corpus split, SFT, pair sampling, evaluation samples
    c.seeds = (0, 1, 2)  # alignment seeds (data order) per method
    c.reward = "vader"  # gold reward: any tr_align.experiments.scorers spec
    c.max_length = 32  # tokens of prompt + completion in training (longer ones are cut)
    c.corpus = ml_collections.ConfigDict(
        dict(
            source="gensim",  # gensim's movie-review test data, or "file" (path, one a line)
            path="",
            min_prompt_words=2,
            max_prompt_words=4,
            eval_fraction=0.2,
            max_eval_prompts=64,
        )
    )
    c.tokenizer = ml_collections.ConfigDict(dict(min_count=1))  # word level
    c.model = ml_collections.ConfigDict(
        dict(
            hidden_size=64,
            intermediate_size=192,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=128,
            tie_word_embeddings=True,
        )
    )
    c.sft = ml_collections.ConfigDict(
        dict(steps=150, batch_size=32, learning_rate=3e-3, warmup_steps=20)
    )
    c.pairs = ml_collections.ConfigDict(
        dict(pairs_per_prompt=8, max_new_tokens=24, temperature=1.0)
    )
    c.dpo = ml_collections.ConfigDict(
        dict(steps=300, batch_size=32, learning_rate=3e-4, warmup_steps=10, beta=0.1, eval_every=30)
    )
    c.methods = ml_collections.ConfigDict(
        dict(
            dpo=dict(enabled=False, alpha=0.6, tau=1),
            tr_soft=dict(enabled=True, alpha=0.6, tau=1),
            tr_hard=dict(enabled=True, alpha=1.0, tau=60),
        )
    )
    c.eval = ml_collections.ConfigDict(dict(samples_per_prompt=8, max_new_tokens=24, batch_size=64))
    if preset == "full":
        c.seeds = (0, 1, 2, 3, 4)
        c.model.update(dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4))
        c.pairs.pairs_per_prompt = 16
        c.dpo.update(dict(steps=1000, eval_every=100))
        c.methods.tr_hard.tau = 200
        c.eval.samples_per_prompt = 16
    elif preset:
        raise ValueError(f"unknown preset {preset!r}; expected 'full' or none")
    return c
