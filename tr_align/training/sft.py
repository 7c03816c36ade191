"""Supervised fine-tuning on the chosen completions (``loss.type = "sft"``).

The paper (like the DPO paper) first fine-tunes the base model on the chosen responses of the
preference data; that SFT model is the starting policy and reference of every alignment run.
The step has the shape of ``tr_align.training.step.train_step`` (pure, donated, sharded) with the
loss TRL's ``SFTTrainer`` uses on prompt-completion data: the mean negative log-likelihood
per completion token over the batch,

    loss = - sum_{b,t} mask[b, t] * log pi(y[b, t] | y[b, <t]) / sum_{b,t} mask[b, t]

on the ``chosen_*`` rows of a paired batch (the prompt is masked out). No reference is used;
the state's ``ref_params`` are not touched. Export the result with ``tr-align export`` and
start alignment from it with ``model.pretrained=EXPORT_DIR``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from tr_align import losses
from tr_align.training.step import PAIR_KEYS, _mean, jit_eval_step, jit_train_step, pair_logps


def _token_count(batch, name="chosen"):
    return batch[f"{name}_loss_mask"][:, 1:].astype(jnp.float32).sum(-1)


def train_step(state, batch, *, apply_fn, tx, schedule, loss_cfg, tr_cfg, logps_chunk_size=0):
    """One optimizer step of SFT on ``batch['chosen_*']``. Pure; jit with ``compile_train_step``."""
    del loss_cfg, tr_cfg  # no reference, no beta
    rng, _ = jax.random.split(state.rng)
    tokens = _token_count(batch)

    def loss_fn(params):
        chosen = chosen_logps(apply_fn, params, batch, logps_chunk_size)
        return -chosen.sum() / jnp.maximum(tokens.sum(), 1.0), chosen

    (loss, chosen), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "perplexity": jnp.exp(loss),
        "logps/chosen": chosen.mean(),
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": schedule(state.step),
    }
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
    return new_state, metrics


def chosen_logps(apply_fn, params, batch, chunk_size: int = 0):
    """Summed log-probs [B] of the chosen completions (a forward over the chosen rows only;
    ``chunk_size``: see ``train.pair_logps``)."""
    ids, attn = batch["chosen_input_ids"], batch["chosen_attention_mask"]
    labels, mask = ids[:, 1:], batch["chosen_loss_mask"][:, 1:]
    if chunk_size:
        hidden, head = apply_fn(params, ids[:, :-1], attn[:, :-1], split_head=True)
        return losses.chunked_sequence_logps(hidden, head, labels, mask, chunk_size=chunk_size)
    return losses.sequence_logps(apply_fn(params, ids[:, :-1], attn[:, :-1]), labels, mask)


def eval_step(state, batch, *, apply_fn, loss_cfg, logps_chunk_size=0):
    """Held-out token NLL of the chosen completions (``eval/loss``, ``eval/perplexity``), and
    the implicit-reward accuracy against the initial policy (did SFT raise the chosen
    completion's log-prob more than the rejected one's)."""
    weight = batch["weight"]
    pol_c, pol_r = pair_logps(apply_fn, state.params, batch, chunk_size=logps_chunk_size)
    tokens = _token_count(batch)
    nll = -jnp.sum(pol_c * weight) / jnp.maximum(jnp.sum(tokens * weight), 1.0)
    init_margin = (pol_c - batch["init_chosen_logps"]) - (pol_r - batch["init_rejected_logps"])
    metrics = {
        "eval/loss": nll,
        "eval/perplexity": jnp.exp(nll),
        "eval/init_rewards/accuracies": _mean(init_margin > 0, weight),
        "eval/init_rewards/margins": float(loss_cfg.beta) * _mean(init_margin, weight),
    }
    return metrics, (pol_c, pol_r)


def compile_train_step(
    mesh,
    state_shardings,
    *,
    apply_fn,
    tx,
    schedule,
    loss_cfg,
    tr_cfg,
    grad_accum_steps: int = 1,
    logps_chunk_size: int = 0,
):
    if grad_accum_steps != 1:  # a token mean over the batch: microbatch means would differ
        raise ValueError("train.grad_accum_steps > 1 is not supported for loss.type='sft' yet")
    fn = functools.partial(
        train_step,
        apply_fn=apply_fn,
        tx=tx,
        schedule=schedule,
        loss_cfg=loss_cfg,
        tr_cfg=tr_cfg,
        logps_chunk_size=logps_chunk_size,
    )
    return jit_train_step(fn, mesh, state_shardings, PAIR_KEYS)


def compile_eval_step(mesh, state_shardings, *, apply_fn, loss_cfg, logps_chunk_size: int = 0):
    fn = functools.partial(
        eval_step, apply_fn=apply_fn, loss_cfg=loss_cfg, logps_chunk_size=logps_chunk_size
    )
    return jit_eval_step(fn, mesh, state_shardings)
