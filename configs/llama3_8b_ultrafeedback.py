"""Paper recipe: Llama-3-8B on UltraFeedback (TR-DPO vs DPO; IPO and KTO variants by loss type).

Stages (presets; values and their sources in configs/paper.py): sft, dpo, tr-soft (alpha 0.6,
tau 1), tr-hard (alpha 1, tau 512). beta 0.05, lr 1e-6 (SFT 2e-5), 100 warmup steps,
max_grad_norm 2, max_length 1024, batch 64 pairs, one epoch, bf16 compute with float32
master weights, parameters/reference/optimizer sharded over all devices (FSDP).

Hardware: one host with 8 x H100 80GB (FSDP over 8 devices); or a TPU v5p-32 slice. Check the memory first:
    tr-align plan --config=configs/llama3_8b_ultrafeedback.py:tr-soft \
      --model=configs/hf/llama3_8b.json --gpu=h100:8 --seq_len=1024 --batch_per_device=1
    (the default recipe's step at this size, one pair per GPU: 49.4 GiB per H100 by XLA:GPU,
    33.7 with model.remat=full and train.logps_chunk_size=128; docs/scaling.md)
    (the GPU compiler, no GPU needed: pip install -e '.[plan-gpu]'; or --devices=8 --hbm=h100
    for XLA:CPU's estimate, which runs high)

Run on one GPU host (launch/gpu_local.sh wraps the same commands with the venv and logs):

    tr-align train --config=configs/llama3_8b_ultrafeedback.py:tr-soft --workdir=runs/llama3_8b_ultrafeedback/tr-soft
    (then :tr-hard and :dpo the same way; add --config.loss.type=ipo for (TR-)IPO and
    --config.loss.type=kto_pair for (TR-)KTO)

Run on a TPU pod slice (every worker runs the same command; the workdir on the bucket mount):
    bash launch/tpu_pod.sh --name=trdpo --zone=us-east5-a --accelerator-type=v5p-32 \
      --bucket=MY_BUCKET --config=configs/llama3_8b_ultrafeedback.py:tr-soft

Starting policy and reference: the public SFT model princeton-nlp/Llama-3-Base-8B-SFT (the alignment presets start from it; no SFT stage here).
Expected wall time: not measured by this project (no accelerator was lent while writing it).
A FLOP estimate (8 N tokens per pair-step for policy forward+backward and reference forward,
about 40% of bf16 peak) puts one epoch at roughly an hour on 8 x H100; measure with
``tr-align bench`` on the target before planning a sweep.
Compare with: the paper's Llama-3-8B general-assistant results (arXiv:2404.09656): TR-DPO / TR-IPO / TR-KTO above their vanilla versions on AlpacaEval 2 (length-controlled win rate) and Arena-Hard. Compare methods at matched KL to the SFT policy as well as at equal
steps (``tr-align eval``).
"""

import os

from tr_align.config import load_config_file

_PAPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "paper.py")


def get_config(preset: str | None = None):
    paper = load_config_file(_PAPER, "llama-3-8b,ultrafeedback,{}".format(preset or "tr-soft"))
    return paper
