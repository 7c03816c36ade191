"""TR-DPO with LoRA on Llama-3-8B, on one GPU: the paper's UltraFeedback recipe
(configs/llama3_8b_ultrafeedback.py, tr-soft) with rank-16 adapters on every attention and
MLP projection, a frozen bfloat16 base and the factor-EMA reference (adapter memory).

Check the memory on one 80 GB and one 24 GB GPU with the GPU compiler (no GPU needed;
pip install -e '.[plan-gpu]'; docs/lora.md "Memory"):

    tr-align plan --config=configs/llama3_8b_lora.py --model=configs/hf/llama3_8b.json \
      --gpu=h100 --seq_len=1024        # 22.49 GiB per device: fits, 56.6 GiB to spare
    tr-align plan ... --gpu=rtx4090    # 22.88 GiB of 23.99: fits, 1.1 GiB to spare

Train (one GPU; on a 24 GB card give XLA the memory: XLA_PYTHON_CLIENT_MEM_FRACTION=0.95):

    tr-align train --config=configs/llama3_8b_lora.py:tr-soft --workdir=runs/llama3_8b_lora/tr-soft

Presets as the UltraFeedback recipe's (tr-soft [default], tr-hard, dpo); one GPU: the mesh is
data=1, and the paper's 64 pairs come from train.grad_accum_steps (64 microbatches of one
pair). Expected result: not measured (no GPU was lent to this project); compare with the
full-parameter recipe's at matched KL (tr-align eval).
"""

import os

from tr_align.config import load_config_file

_BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llama3_8b_ultrafeedback.py")


def get_config(preset: str | None = None):
    c = load_config_file(_BASE, preset or "tr-soft")
    c.lora = dict(
        rank=16,
        alpha=32.0,
        dropout=0.0,
        targets=(r"layers_\d+/(self_attn|attention|mlp)/[^/]+/kernel",),
        base_dtype="bfloat16",  # the frozen base in 2 bytes per parameter
    )
    c.trust_region.lora_mode = "factors"
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.train.logps_chunk_size = 256
    c.train.grad_accum_steps = 64
    return c
