"""The train and eval steps for unpaired data: (TR-)KTO (``loss.type = "kto"``).

Same shape as ``tr_align.training.step.train_step`` (one pure, donated, sharded step; the reference
forward under stop_gradient; the trust-region update on device), for batches of single
completions with a desirability ``label``:

  ``completion_{input_ids,attention_mask,loss_mask}`` [B, T], ``label`` [B] (1 desirable),
  ``kl_{input_ids,attention_mask,loss_mask}`` [B, T]: each prompt with the previous row's
  completion, the mismatched pairs whose policy/reference log-ratio estimates KTO's KL
  reference point (TRL's ``KTOTrainer``; built by ``tr_align.data.batching.make_batch``).

Completion and KL rows go through one forward (``train.pair_logps`` interleaves them), and
the loss is ``losses.kto_loss_labeled`` (TRL's ``kto`` loss with a fixed-shape label split).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from tr_align import losses, trust_region
from tr_align.training.step import _mean, apply_gradients, jit_eval_step, jit_train_step, pair_logps

KEYS = tuple(
    f"{k}_{f}" for k in ("completion", "kl") for f in ("input_ids", "attention_mask", "loss_mask")
)


def completion_logps(apply_fn, params, batch, chunk_size: int = 0):
    """(completion log-probs [B], KL-row log-probs [B]) in one forward (``chunk_size``: see
    ``train.pair_logps``)."""
    as_pairs = {
        f"{new}_{f}": batch[f"{old}_{f}"]
        for new, old in (("chosen", "completion"), ("rejected", "kl"))
        for f in ("input_ids", "attention_mask", "loss_mask")
    }
    return pair_logps(apply_fn, params, as_pairs, chunk_size=chunk_size)


def _kto(loss_cfg, pol, pol_kl, ref, ref_kl, label, weight=None):
    return losses.kto_loss_labeled(
        pol,
        ref,
        pol_kl,
        ref_kl,
        label,
        beta=float(loss_cfg.beta),
        desirable_weight=float(loss_cfg.get("desirable_weight", 1.0)),
        undesirable_weight=float(loss_cfg.get("undesirable_weight", 1.0)),
        weight=weight,
    )


def _reward_metrics(prefix, rewards, label, weight=None):
    w = jnp.ones_like(rewards) if weight is None else weight
    des = label.astype(jnp.float32) * w
    und = (1 - label.astype(jnp.float32)) * w
    chosen = jnp.sum(rewards * des) / jnp.maximum(des.sum(), 1.0)
    rejected = jnp.sum(rewards * und) / jnp.maximum(und.sum(), 1.0)
    return {
        f"{prefix}rewards/chosen": chosen,
        f"{prefix}rewards/rejected": rejected,
        f"{prefix}rewards/margins": chosen - rejected,
        # the implicit reward's sign agrees with the label
        f"{prefix}rewards/accuracies": _mean(
            ((rewards > 0) == (label > 0)).astype(jnp.float32), weight
        ),
    }


def train_step(state, batch, *, apply_fn, tx, schedule, loss_cfg, tr_cfg, logps_chunk_size=0):
    """One optimizer step of (TR-)KTO on an unpaired batch. Pure; jit with ``compile_train_step``."""
    rng, _ = jax.random.split(state.rng)
    logps = functools.partial(completion_logps, apply_fn, batch=batch, chunk_size=logps_chunk_size)
    ref, ref_kl = jax.lax.stop_gradient(logps(state.ref_params))
    label = batch["label"]

    def loss_fn(params):
        pol, pol_kl = logps(params)
        per_example, rewards, kl = _kto(loss_cfg, pol, pol_kl, ref, ref_kl, label)
        return per_example.mean(), (pol, rewards, kl)

    (loss, (pol, rewards, kl)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    params, ref_params, opt_state, step = apply_gradients(state, grads, tx=tx, tr_cfg=tr_cfg)
    metrics = {
        "loss": loss,
        **_reward_metrics("", rewards, label),
        "kl": kl,
        "logps/completion": pol.mean(),
        "ref_logps/completion": ref.mean(),
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": schedule(state.step),
        "ref/updates": trust_region.num_updates(step, enabled=tr_cfg.enabled, tau=int(tr_cfg.tau)),
        "ref/param_distance": trust_region.param_distance(params, ref_params),
    }
    new_state = state.replace(
        step=step, params=params, ref_params=ref_params, opt_state=opt_state, rng=rng
    )
    return new_state, metrics


def eval_step(state, batch, *, apply_fn, loss_cfg, logps_chunk_size=0):
    """Held-out metrics (rows weighted by ``batch['weight']``) and the policy's completion and
    KL-row log-probs. ``init_chosen_logps`` carries the *initial* policy's completion log-probs:
    ``eval/init_rewards/accuracies`` is the fraction of rows whose reward against the initial
    policy has the sign of the label."""
    weight = batch["weight"]
    label = batch["label"]
    logps = functools.partial(completion_logps, apply_fn, batch=batch, chunk_size=logps_chunk_size)
    pol, pol_kl = logps(state.params)
    ref, ref_kl = logps(state.ref_params)
    per_example, rewards, kl = _kto(loss_cfg, pol, pol_kl, ref, ref_kl, label, weight)
    init_reward = float(loss_cfg.beta) * (pol - batch["init_chosen_logps"])
    sign = 2.0 * label.astype(jnp.float32) - 1.0
    metrics = {
        "eval/loss": _mean(per_example, weight),
        **_reward_metrics("eval/", rewards, label, weight),
        "eval/kl": kl,
        "eval/init_rewards/accuracies": _mean(
            ((init_reward > 0) == (label > 0)).astype(jnp.float32), weight
        ),
        "eval/init_rewards/margins": _mean(sign * init_reward, weight),
    }
    return metrics, (pol, pol_kl)


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
    if grad_accum_steps != 1:  # the KL reference point is a batch mean: not additive
        raise ValueError("train.grad_accum_steps > 1 is not supported for loss.type='kto'")
    fn = functools.partial(
        train_step,
        apply_fn=apply_fn,
        tx=tx,
        schedule=schedule,
        loss_cfg=loss_cfg,
        tr_cfg=tr_cfg,
        logps_chunk_size=logps_chunk_size,
    )
    return jit_train_step(fn, mesh, state_shardings, KEYS + ("label",))


def compile_eval_step(mesh, state_shardings, *, apply_fn, loss_cfg, logps_chunk_size: int = 0):
    fn = functools.partial(
        eval_step, apply_fn=apply_fn, loss_cfg=loss_cfg, logps_chunk_size=logps_chunk_size
    )
    return jit_eval_step(fn, mesh, state_shardings)
