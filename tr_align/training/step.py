"""The functional core: ``TrainState`` and one pure train step.

``train_step(state, batch) -> (state, metrics)`` runs, all on device:
  1. one policy forward over chosen and rejected together (interleaved as a
     [2B, T] batch, so each data-parallel shard keeps its own pairs),
  2. one reference forward on the same batch, under ``stop_gradient``,
  3. the preference loss (``tr_align.losses``) and its gradient,
  4. the optax update of the policy,
  5. the trust-region reference update (``tr_align.trust_region``), unless the
     reference is frozen (vanilla DPO/IPO/KTO).

The step is jitted by ``compile_train_step`` with explicit in/out shardings and
the state donated, so parameters never leave the device and the reference is
updated in place.

Batches are dicts of [B, T] int32 arrays named
``{chosen,rejected}_{input_ids,attention_mask,loss_mask}``; ``loss_mask`` is 1
on completion tokens (the tokens whose log-probs are summed).

Memory levers (see README "Memory levers"): ``grad_accum_steps`` = K > 1 runs steps
1-3 on K microbatches of B / K pairs inside one ``lax.scan`` and averages their
gradients before the single optimizer update (for losses that are a mean over
examples this equals the full-batch step); ``logps_chunk_size`` > 0 computes the
log-probs from the final hidden states chunk by chunk
(``losses.chunked_sequence_logps``) so the [2B, T, V] logits are never all live.
The reference may be stored in bfloat16 (``init_state(..., ref_dtype=)``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from tr_align import losses, sharding, trust_region

PAIR_KEYS = tuple(
    f"{k}_{f}" for k in ("chosen", "rejected") for f in ("input_ids", "attention_mask", "loss_mask")
)


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates done
    params: Any  # policy parameters
    ref_params: Any  # reference parameters (the SFT model at step 0)
    opt_state: Any
    rng: jax.Array  # uint32[2] PRNG key, split once per step


def init_state(
    rng,
    params,
    *,
    init_fn: Callable,
    tx: optax.GradientTransformation,
    ref_dtype: str | None = None,
) -> TrainState:
    """A fresh state: the reference starts as a copy of the initial policy.

    The policy is ``params`` (e.g. a pretrained/SFT model) or, when None, ``init_fn(rng)``.
    The policy and the optimizer state keep the parameters' dtype (float32 master
    weights); the reference is stored in ``ref_dtype`` ("float32" or "bfloat16", None =
    the policy's dtype), i.e. the initial policy rounded to nearest once.
    """
    params_rng, state_rng = jax.random.split(rng)
    if params is None:
        params = init_fn(params_rng)
    ref_params = jax.tree.map(lambda x: jnp.array(x, dtype=ref_dtype or x.dtype, copy=True), params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ref_params=ref_params,
        opt_state=tx.init(params),
        rng=state_rng,
    )


def pair_logps(apply_fn, params, batch, *, average: bool = False, chunk_size: int = 0):
    """Per-sequence log-probs of the chosen and rejected completions, one forward.

    ``chunk_size`` > 0: the model returns its final hidden states and the output head is
    applied ``chunk_size`` positions at a time (``losses.chunked_sequence_logps``), so
    the [2B, T, V] logits are never materialised; 0 computes them all at once.

    Returns:
      (chosen_logps [B], rejected_logps [B]) in float32.
    """

    def stack(name):  # [B, T] x 2 -> [2B, T], rows (chosen_0, rejected_0, chosen_1, ...)
        both = jnp.stack([batch[f"chosen_{name}"], batch[f"rejected_{name}"]], axis=1)
        return both.reshape((-1,) + both.shape[2:])

    ids_NT, attn_NT, loss_NT = stack("input_ids"), stack("attention_mask"), stack("loss_mask")
    # Position t predicts token t + 1: feed T - 1 tokens, score tokens 1..T-1.
    if chunk_size:
        hidden_NTD, head = apply_fn(params, ids_NT[:, :-1], attn_NT[:, :-1], split_head=True)
        logps_N = losses.chunked_sequence_logps(
            hidden_NTD, head, ids_NT[:, 1:], loss_NT[:, 1:], chunk_size=chunk_size, average=average
        )
    else:
        logits_NTV = apply_fn(params, ids_NT[:, :-1], attn_NT[:, :-1])
        logps_N = losses.sequence_logps(logits_NTV, ids_NT[:, 1:], loss_NT[:, 1:], average=average)
    logps_B2 = logps_N.reshape(-1, 2)
    return logps_B2[:, 0], logps_B2[:, 1]


def _loss_kwargs(loss_cfg):
    return dict(
        beta=float(loss_cfg.beta),
        label_smoothing=float(loss_cfg.label_smoothing),
        discopop_tau=float(loss_cfg.discopop_tau),
    )


def _mean(x, weight=None):
    """Mean over rows, or the ``weight``-weighted mean (eval batches pad with weight 0)."""
    return jnp.mean(x) if weight is None else jnp.sum(x * weight) / jnp.sum(weight)


def _reward_metrics(prefix, chosen_rewards, rejected_rewards, weight=None):
    acc = (chosen_rewards > rejected_rewards).astype(jnp.float32)
    margin = chosen_rewards - rejected_rewards
    mean = functools.partial(_mean, weight=weight)
    return {
        f"{prefix}rewards/chosen": mean(chosen_rewards),
        f"{prefix}rewards/rejected": mean(rejected_rewards),
        f"{prefix}rewards/accuracies": mean(acc),
        f"{prefix}rewards/margins": mean(margin),
    }


def apply_gradients(state: TrainState, grads, *, tx, tr_cfg):
    """Steps 4 and 5: the optax update of the policy, then the trust-region reference update
    (none when ``tr_cfg.enabled`` is False). Returns (params, ref_params, opt_state, step)."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    step = state.step + 1
    if tr_cfg.enabled:
        ref_params = trust_region.update_reference(
            state.ref_params, params, step, alpha=float(tr_cfg.alpha), tau=int(tr_cfg.tau)
        )
    else:
        ref_params = state.ref_params
    return params, ref_params, opt_state, step


def microbatches(batch, k: int):
    """[B, ...] arrays -> [k, B / k, ...]: microbatch j holds rows j, j + k, j + 2k, ...

    Strided rather than contiguous, so that when B is split over data-parallel devices
    in contiguous blocks every microbatch keeps rows on every device (no resharding).
    ``unmicrobatch`` restores the original row order.
    """
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(-1, k, *x.shape[1:]), 0, 1), batch)


def unmicrobatch(x):
    """[k, B / k, ...] -> [B, ...], inverse of ``microbatches``."""
    return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def policy_loss(params, ref_logps, batch, *, apply_fn, loss_cfg, chunk_size: int = 0):
    """Mean preference loss of the policy ``params`` on ``batch`` (steps 1 and 3).

    ``ref_logps`` = (chosen [B], rejected [B]) reference log-probs. Returns
    (loss, (pol_c, pol_r, chosen_rewards, rejected_rewards)); differentiate w.r.t. params.
    """
    pol_c, pol_r = pair_logps(
        apply_fn,
        params,
        batch,
        average=losses.uses_average_logps(loss_cfg.type),
        chunk_size=chunk_size,
    )
    per_example, c_rew, r_rew = losses.preference_loss(
        loss_cfg.type, pol_c, pol_r, *ref_logps, **_loss_kwargs(loss_cfg)
    )
    return per_example.mean(), (pol_c, pol_r, c_rew, r_rew)


def _loss_and_grads(params, ref_params, batch, *, apply_fn, loss_cfg, chunk_size):
    """Steps 1-3 on one (micro)batch -> (loss, grads, per-pair (pol_c, pol_r, ref_c, ref_r,
    chosen_rewards, rejected_rewards))."""
    average = losses.uses_average_logps(loss_cfg.type)
    ref_c, ref_r = jax.lax.stop_gradient(
        pair_logps(apply_fn, ref_params, batch, average=average, chunk_size=chunk_size)
    )
    loss_fn = functools.partial(
        policy_loss, apply_fn=apply_fn, loss_cfg=loss_cfg, chunk_size=chunk_size
    )
    (loss, (pol_c, pol_r, c_rew, r_rew)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, (ref_c, ref_r), batch
    )
    return loss, grads, (pol_c, pol_r, ref_c, ref_r, c_rew, r_rew)


def train_step(
    state: TrainState,
    batch,
    *,
    apply_fn,
    tx,
    schedule,
    loss_cfg,
    tr_cfg,
    grad_accum_steps: int = 1,
    logps_chunk_size: int = 0,
):
    """One optimizer step of (TR-)DPO/IPO/KTO-pair. Pure; jit with ``compile_train_step``.

    With ``grad_accum_steps`` = K > 1 the batch is split into K microbatches
    (``microbatches``) that a ``lax.scan`` runs one after another, summing loss and
    gradients; the step then uses ``loss = sum / K`` and ``grads = sum / K``. For a loss
    that is a mean over examples (all types except bco_pair) this is the full-batch loss
    and gradient up to float32 summation order. ``bco_pair`` differs: its reward shift
    ``delta`` is the mean reward of the batch it sees, here of each microbatch.
    Metrics are computed from the per-pair values of all microbatches, exactly as for
    the full batch. The optimizer and the reference update run once per step.
    """
    rng, _ = jax.random.split(state.rng)  # no dropout yet; the key still advances per step
    run = functools.partial(
        _loss_and_grads, apply_fn=apply_fn, loss_cfg=loss_cfg, chunk_size=logps_chunk_size
    )
    if grad_accum_steps == 1:
        loss, grads, per_pair = run(state.params, state.ref_params, batch)
    else:

        def body(acc, micro):
            loss, grads, per_pair = run(state.params, state.ref_params, micro)
            return jax.tree.map(jnp.add, acc, (loss, grads)), per_pair

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
        (loss, grads), per_pair = jax.lax.scan(body, zeros, microbatches(batch, grad_accum_steps))
        loss, grads = jax.tree.map(lambda x: x / grad_accum_steps, (loss, grads))
        per_pair = jax.tree.map(unmicrobatch, per_pair)
    pol_c, pol_r, ref_c, ref_r, c_rew, r_rew = per_pair

    params, ref_params, opt_state, step = apply_gradients(state, grads, tx=tx, tr_cfg=tr_cfg)

    metrics = {
        "loss": loss,
        **_reward_metrics("", c_rew, r_rew),
        "logps/chosen": pol_c.mean(),
        "logps/rejected": pol_r.mean(),
        "ref_logps/chosen": ref_c.mean(),
        "ref_logps/rejected": ref_r.mean(),
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": schedule(state.step),
        "ref/updates": trust_region.num_updates(step, enabled=tr_cfg.enabled, tau=int(tr_cfg.tau)),
        "ref/param_distance": trust_region.param_distance(params, ref_params),
    }
    new_state = state.replace(
        step=step, params=params, ref_params=ref_params, opt_state=opt_state, rng=rng
    )
    return new_state, metrics


def eval_step(state: TrainState, batch, *, apply_fn, loss_cfg, logps_chunk_size: int = 0):
    """Held-out metrics for one batch (rows weighted by ``batch['weight']``).

    Returns weighted means of the TRL-style metrics against the *current*
    reference (``eval/rewards/...``) and of the implicit reward against the
    *initial* policy (``eval/init_rewards/...``; the batch carries the starting
    policy's log-probs of its rows as ``init_{chosen,rejected}_logps``), plus
    the policy log-probs themselves so the caller can record them at step 0.
    """
    logps = functools.partial(
        pair_logps,
        apply_fn,
        batch=batch,
        average=losses.uses_average_logps(loss_cfg.type),
        chunk_size=logps_chunk_size,
    )
    weight = batch["weight"]
    pol_c, pol_r = logps(state.params)
    ref_c, ref_r = logps(state.ref_params)
    per_example, c_rew, r_rew = losses.preference_loss(
        loss_cfg.type, pol_c, pol_r, ref_c, ref_r, **_loss_kwargs(loss_cfg)
    )
    if per_example.shape[0] != weight.shape[0]:  # kto_pair: [chosen part; rejected part]
        per_example = per_example.reshape(2, -1).mean(0)
    init_c, init_r = batch["init_chosen_logps"], batch["init_rejected_logps"]
    init_margin = (pol_c - init_c) - (pol_r - init_r)
    metrics = {
        "eval/loss": _mean(per_example, weight),
        **_reward_metrics("eval/", c_rew, r_rew, weight),
        "eval/init_rewards/accuracies": _mean(init_margin > 0, weight),
        "eval/init_rewards/margins": float(loss_cfg.beta) * _mean(init_margin, weight),
    }
    return metrics, (pol_c, pol_r)


def jit_train_step(step_fn, mesh, state_shardings, batch_keys):
    """``step_fn(state, batch) -> (state, metrics)`` jitted over ``mesh``: the state in and out
    with ``state_shardings`` and donated, batch arrays ``batch_keys`` split over the
    data-parallel axes, metrics replicated."""
    batch_sh = {k: sharding.batch_sharding(mesh) for k in batch_keys}
    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_sh),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )


def jit_eval_step(eval_fn, mesh, state_shardings):
    """``eval_fn(state, batch) -> (metrics, per-row outputs)`` jitted over ``mesh``."""
    batch_sh = sharding.batch_sharding(mesh)
    return jax.jit(
        eval_fn,
        in_shardings=(state_shardings, batch_sh),
        out_shardings=(sharding.replicated(mesh), batch_sh),
    )


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
    """``train_step`` jitted over ``mesh``: explicit shardings, state donated."""
    fn = functools.partial(
        train_step,
        apply_fn=apply_fn,
        tx=tx,
        schedule=schedule,
        loss_cfg=loss_cfg,
        tr_cfg=tr_cfg,
        grad_accum_steps=grad_accum_steps,
        logps_chunk_size=logps_chunk_size,
    )
    return jit_train_step(fn, mesh, state_shardings, PAIR_KEYS)


def compile_eval_step(mesh, state_shardings, *, apply_fn, loss_cfg, logps_chunk_size: int = 0):
    fn = functools.partial(
        eval_step, apply_fn=apply_fn, loss_cfg=loss_cfg, logps_chunk_size=logps_chunk_size
    )
    return jit_eval_step(fn, mesh, state_shardings)
