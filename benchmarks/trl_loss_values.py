#!/usr/bin/env python3
"""The TRL-computed values of tests/test_trl_losses.py (``TRL_COMPUTED``): TRL 1.16's
``DPOTrainer._compute_loss`` run with a stand-in ``self`` on the tests' bigram policy and
perturbed bigram reference (four pairs, beta 0.5), in float64 torch.

    /path/to/trl-venv/bin/python benchmarks/trl_loss_values.py

Needs torch and trl 1.16 (the tests do not: they hard-code the printed values).
"""

import types
from collections import defaultdict

import numpy as np
import torch
from trl.trainer.dpo_trainer import DPOTrainer

V = 8
PROMPTS = [[1, 2, 3], [2, 2], [7], [5, 6, 1, 2]]
CHOSEN = [[4, 5, 6, 7], [3], [1, 2], [6, 6, 3]]
REJECTED = [[5, 6], [6, 5, 4], [3, 4], [7, 1, 1, 2, 3]]
table = np.random.default_rng(0).normal(scale=2.0, size=(V, V)).astype(np.float32)
ref_table = (table + np.random.default_rng(1).normal(scale=0.5, size=(V, V))).astype(np.float32)


class Bigram:
    training = True
    is_gradient_checkpointing = False
    _modules = {}

    def __init__(self, t):
        self.t = torch.tensor(t, dtype=torch.float64)

    def __call__(self, input_ids, labels, **kw):
        logits = self.t[input_ids[:, :-1]]
        logp_all = torch.log_softmax(logits, -1)
        tgt = labels[:, 1:]
        safe = tgt.clamp(min=0)
        lp = logp_all.gather(-1, safe[..., None])[..., 0]
        m = tgt != -100
        lp = lp * m
        lssp = torch.logsumexp(2 * logp_all, -1) * m
        z = torch.zeros_like(lp)
        return types.SimpleNamespace(
            log_probs=lp,
            entropy=z,
            mean_logits=z,
            is_top1=torch.zeros_like(m),
            log_sum_sq_probs=lssp,
        )


def inputs():
    seqs, masks = [], []
    for comps in (CHOSEN, REJECTED):
        for p, c in zip(PROMPTS, comps):
            seqs.append(p + c)
            masks.append([0] * len(p) + [1] * len(c))
    T = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (T - len(s)) for s in seqs])
    att = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs])
    cm = torch.tensor([m + [0] * (T - len(m)) for m in masks])
    return {"input_ids": ids, "attention_mask": att, "completion_mask": cm}


class Acc:
    device = "cpu"
    gather_for_metrics = staticmethod(lambda x: x)
    gather = staticmethod(lambda x: x)


def trl_loss(loss_types, weights=None, ld_alpha=None, use_weighting=False, beta=0.5):
    self = types.SimpleNamespace(
        model=Bigram(table),
        ref_model=Bigram(ref_table),
        accelerator=Acc(),
        ld_alpha=ld_alpha,
        precompute_ref_logps=False,
        aux_loss_enabled=False,
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None, discopop_tau=0.05),
        f_divergence_type="reverse_kl",
        loss_types=loss_types,
        loss_weights=weights or [1.0] * len(loss_types),
        beta=beta,
        label_smoothing=0.0,
        use_weighting=use_weighting,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    return float(DPOTrainer._compute_loss(self, self.model, inputs(), False))


for name, kw in [
    ("mpo", dict(loss_types=["sigmoid", "bco_pair", "sft"], weights=[0.8, 0.2, 1.0])),
    (
        "sig_bco_ld_wpo",
        dict(
            loss_types=["sigmoid", "bco_pair"], weights=[0.8, 0.2], ld_alpha=0.3, use_weighting=True
        ),
    ),
    (
        "mpo_ld",
        dict(loss_types=["sigmoid", "bco_pair", "sft"], weights=[0.8, 0.2, 1.0], ld_alpha=0.3),
    ),
    ("norm_ipo_ld", dict(loss_types=["sigmoid_norm", "ipo"], ld_alpha=0.5)),
    ("aot_unpaired_wpo_off", dict(loss_types=["aot_unpaired", "apo_zero"])),
]:
    print(name, repr(trl_loss(**kw)))
