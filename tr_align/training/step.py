"""The functional core: ``TrainState`` and the one train step every objective uses.

``train_step(state, batch, objective=...) -> (state, metrics)`` runs, all on device:
  1. one policy forward over every sequence of the batch (all streams of all examples:
     chosen and rejected, or completion and KL rows, ...),
  2. one reference forward on the same tokens, under ``stop_gradient``, when the
     objective has a reference (SFT has none),
  3. the objective's loss and its gradient (``tr_align.training.objectives``; an objective
     with a running state — ``bco_pair``'s running mean — updates ``TrainState.loss_state``
     once per microbatch, kept on a skipped step),
  4. the optax update of the policy and 5. the reference update
     (``TrainState.apply_gradients``; a ``trust_region.ReferenceUpdate``, or none for a
     frozen reference: vanilla DPO/IPO/KTO).
     A bad step (a non-finite loss or gradient) applies neither: the state
     is kept bitwise except ``step`` (and ``rng``), and ``metrics["train/step_skipped"]``
     is 1 (the loop counts them: ``train/skipped_steps``, ``train.max_bad_steps``).

The step is jitted by ``compile_train_step`` with explicit in/out shardings and the state
donated, so parameters never leave the device and the reference is updated in place.

LoRA (``lora=``, ``tr_align.lora``) is a transform of the parameters, not another step:
``state.params`` are the adapters, ``state.base`` the frozen base, and the forwards see
base + deltas (``views``), so steps 1-5 and the skip run unchanged on the adapters.

Batches come in one of two layouts (``sequence_logps`` reads either):

* **padded**: per stream ``{stream}_{input_ids,attention_mask,loss_mask}`` [E, T] (one
  row per sequence, right-padded; ``tr_align.data.batching.make_batch``);
* **tokens** (``tr_align.data.packing``): ``input_ids``, ``positions``, ``segment_ids``,
  ``branch_ids``, ``loss_mask``, ``seq_ids`` [R, L]: several sequences packed per row
  (segment ids, per-segment positions), or prompt-shared segments whose branches hold one
  completion each; ``seq_ids`` names the sequence (``example * S + stream``) of every
  completion token, and per-sequence log-probs are segment sums; ``examples`` [E] (the
  examples' indices) gives the number of examples.

Either way ``loss_mask`` marks the completion tokens, and token t + 1 is scored by the
model's output at t. Per-example arrays (``label``, eval's ``weight``) have E rows.

Memory levers (docs/scaling.md, "Memory levers"): ``grad_accum_steps`` = K > 1 runs steps 1-3 on K
microbatches inside one ``lax.scan`` and adds their statistics (sums and counts) and
gradients before the single optimizer update; ``logps_chunk_size`` > 0 computes the
log-probs from the final hidden states chunk by chunk (``losses.chunked_token_logps``) so
the logits are never all live; the reference may be stored in bfloat16
(``init_state(..., ref_dtype=)``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from tr_align import lora as lora_lib
from tr_align import losses, sharding, trust_region
from tr_align.training import objectives as objectives_lib

PAD_FIELDS = ("input_ids", "attention_mask", "loss_mask")
TOKEN_FIELDS = ("input_ids", "positions", "segment_ids", "branch_ids", "loss_mask", "seq_ids")


def padded_keys(streams) -> tuple[str, ...]:
    """The padded layout's array names for ``streams``."""
    return tuple(f"{s}_{f}" for s in streams for f in PAD_FIELDS)


PAIR_KEYS = padded_keys(("chosen", "rejected"))
# 1 when this step's update was skipped (a non-finite loss or gradient), else 0
SKIPPED_METRIC = "train/step_skipped"


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates done
    params: Any  # policy parameters
    ref_params: Any  # reference parameters (the SFT model at step 0); None without one
    opt_state: Any
    rng: jax.Array  # uint32[2] PRNG key, split once per step
    # the objective's running state (objectives.Paired's bco_pair running mean), None without
    loss_state: Any = None
    # LoRA (``tr_align.lora``): the frozen base the adapters (``params``) and the reference
    # adapters / deltas (``ref_params``) apply to; no gradient, no optimizer state, never
    # checkpointed. None without LoRA.
    base: Any = None

    def apply_gradients(
        self, grads, *, tx, reference_update=None, finite=None
    ) -> tuple[TrainState, jax.Array]:
        """Steps 4 and 5: the optax update of the policy, then the reference update
        (``reference_update.update(ref, params, step)``; none when it is None).

        Skipping a bad step: with ``finite`` (a traced bool: "the loss and the gradient are
        finite") the update runs under ``lax.cond``; when it is False the policy, the
        reference and the optimizer state (AdamW moments and count) are kept bitwise. A
        branch rather than ``jnp.where`` over the trees, so that no second copy of the
        state is live (the donated buffers are still updated in place: the step's temp
        memory is unchanged). ``step`` advances either way (it counts the batches
        consumed, so the schedule, the data position and the checkpoints stay on the
        loop's step).

        Returns:
          (new state, applied: bool scalar, True when ``finite`` is None)
        """
        step = self.step + 1

        def update(_):
            updates, opt_state = tx.update(grads, self.opt_state, self.params)
            params = optax.apply_updates(self.params, updates)
            ref_params = self.ref_params
            if reference_update is not None:
                ref_params = reference_update.update(ref_params, params, step)
            return params, ref_params, opt_state

        def keep(_):
            return self.params, self.ref_params, self.opt_state

        if finite is None:
            applied = jnp.array(True)
            params, ref_params, opt_state = update(None)
        else:
            applied = jnp.asarray(finite, bool)
            params, ref_params, opt_state = jax.lax.cond(applied, update, keep, None)
        return (
            self.replace(step=step, params=params, ref_params=ref_params, opt_state=opt_state),
            applied,
        )


def init_state(
    rng,
    params,
    *,
    init_fn: Callable,
    tx: optax.GradientTransformation,
    ref_dtype: str | None = None,
    with_reference: bool = True,
    loss_state=None,
    lora=None,
    update_reference: bool = True,
) -> TrainState:
    """A fresh state: the reference (``with_reference``) starts as a copy of the policy.

    The policy is ``params`` (e.g. a pretrained/SFT model) or, when None, ``init_fn(rng)``.
    The policy and the optimizer state keep the parameters' dtype (float32 master
    weights); the reference is stored in ``ref_dtype`` ("float32" or "bfloat16", None =
    the policy's dtype), i.e. the initial policy rounded to nearest once. ``loss_state``: the
    objective's initial running state (``objective.init_loss_state()``).

    With ``lora`` (a ``tr_align.lora.Lora``) that model is the frozen ``base`` (in
    ``lora.base_dtype``: ``init_base``), ``params`` are fresh adapters and the reference is
    ``lora.init_reference`` (None for a frozen one, ``update_reference`` False: the
    reference is the base itself).
    """
    params_rng, state_rng = jax.random.split(rng)
    if lora is not None:
        base = init_base(rng, params, init_fn=init_fn, lora=lora)
        adapters = lora.init_adapters(jax.random.fold_in(params_rng, 1), base)
        ref = None
        if with_reference:
            ref = lora.init_reference(adapters, enabled=update_reference, dtype=ref_dtype)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=adapters,
            ref_params=ref,
            opt_state=tx.init(adapters),
            rng=state_rng,
            base=base,
        )
    if params is None:
        params = init_fn(params_rng)
    ref_params = None
    if with_reference:
        ref_params = jax.tree.map(
            lambda x: jnp.array(x, dtype=ref_dtype or x.dtype, copy=True), params
        )
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ref_params=ref_params,
        opt_state=tx.init(params),
        rng=state_rng,
        loss_state=loss_state,
    )


def init_base(rng, params, *, init_fn: Callable, lora):
    """A LoRA run's frozen base for the state seeded by ``rng`` (``init_state``'s key):
    ``params`` or the model's init, in ``lora.base_dtype``. A resume rebuilds it with this
    function (checkpoints hold no base)."""
    if params is None:
        params = init_fn(jax.random.split(rng)[0])
    return lora.make_base(params)


def is_token_layout(batch) -> bool:
    return "seq_ids" in batch


def _shared_length_weights(mask, seq, tokens, ld_alpha):
    """LD-DPO's per-token weights [N] for flat completion-token ``mask`` [N] (0/1) and sequence
    ids ``seq`` [N] (``example * 2 + stream``): 1 for a sequence's first min(|y_c|, |y_r|)
    completion tokens, ``ld_alpha`` for the rest. A sequence's tokens are contiguous and in
    order in the flat arrays (each padded row, packed segment or branch holds one sequence),
    so a token's place in its completion is the running count of completion tokens minus the
    count before the sequence's first token."""
    n = tokens.shape[0]
    shared = jnp.repeat(jnp.min(tokens.reshape(-1, 2), axis=1), 2)  # [n] per sequence
    is_c = (mask != 0).astype(jnp.int32)
    count = jnp.cumsum(is_c)
    big = jnp.iinfo(jnp.int32).max
    before = jax.ops.segment_min(jnp.where(is_c > 0, count - is_c, big), seq, num_segments=n)
    place = count - before[seq]  # 1, 2, ... within the sequence's completion
    return jnp.where(place <= shared[seq], 1.0, ld_alpha).astype(jnp.float32)


def sequence_logps(
    apply_fn,
    params,
    batch,
    streams,
    *,
    average: bool = False,
    chunk_size: int = 0,
    ld_alpha: float = 1.0,
    wpo: bool = False,
):
    """Per-sequence completion log-probs and token counts, one forward over the batch.

    ``chunk_size`` > 0: the model returns its final hidden states and the output head is
    applied ``chunk_size`` positions at a time, so the logits are never all materialised.
    ``ld_alpha`` < 1 (paired streams only): LD-DPO's sums, the first min(|y_c|, |y_r|)
    completion tokens of a pair weighted 1 and the rest ``ld_alpha`` (TRL's shared/tail
    split). ``wpo``: also WPO's mean over completion tokens of log p_t - log sum_v p_v^2
    (``losses.token_logps_and_sq``; stop_gradient).

    Returns:
      (logps [E, S], tokens [E, S], extras) float32: S = len(streams) sequences per example,
      summed (``average``: length-averaged; ``ld_alpha``: weighted) log-probs of their
      completion tokens, and the number of those tokens. ``extras``: ``raw`` (the plain sums,
      when ``ld_alpha`` < 1) and ``wpo`` [E, S] (when ``wpo``).
    """
    num_streams = len(streams)
    if is_token_layout(batch):
        ids = batch["input_ids"]
        model_in = {k: batch[k][:, :-1] for k in ("positions", "segment_ids", "branch_ids")}
    else:  # [E, T] per stream -> [E * S, T], rows (e0 s0, e0 s1, ..., e1 s0, ...)

        def stack(field):
            both = jnp.stack([batch[f"{s}_{field}"] for s in streams], axis=1)
            return both.reshape((-1,) + both.shape[2:])

        ids = stack("input_ids")
        model_in = {"attention_mask": stack("attention_mask")[:, :-1]}
    mask = (batch["loss_mask"] if is_token_layout(batch) else stack("loss_mask"))[:, 1:]
    labels = ids[:, 1:]
    # Position t predicts token t + 1: feed L - 1 tokens, score tokens 1..L-1.
    sq = None
    if chunk_size:
        hidden, head = apply_fn(params, ids[:, :-1], **model_in, split_head=True)
        if wpo:
            per_token, sq = losses.chunked_token_logps(
                hidden, head, labels, chunk_size=chunk_size, with_sq=True
            )
        else:
            per_token = losses.chunked_token_logps(hidden, head, labels, chunk_size=chunk_size)
    else:
        logits = apply_fn(params, ids[:, :-1], **model_in)
        if wpo:
            per_token, sq = losses.token_logps_and_sq(logits, labels)
        else:
            per_token = losses.token_logps(logits, labels)
    mask = mask.astype(jnp.float32)
    per_token = jnp.where(mask != 0, per_token, 0.0) * mask
    n = ids.shape[0] if not is_token_layout(batch) else batch["examples"].shape[0] * num_streams
    if is_token_layout(batch):
        seq = batch["seq_ids"][:, 1:].reshape(-1)
    else:  # row r holds sequence r
        seq = jnp.repeat(jnp.arange(n), mask.shape[1])
    flat_mask = mask.reshape(-1)

    def per_sequence(x):
        return jax.ops.segment_sum(x.reshape(-1), seq, num_segments=n)

    if is_token_layout(batch):
        total, tokens = per_sequence(per_token), per_sequence(mask)
    else:
        total, tokens = per_token.sum(-1), mask.sum(-1)
    extras = {}
    if ld_alpha != 1.0:
        if num_streams != 2:
            raise ValueError(f"ld_alpha needs paired streams, got {streams}")
        weights = _shared_length_weights(flat_mask, seq, tokens, ld_alpha)
        extras["raw"] = total.reshape(-1, num_streams)
        total = per_sequence(per_token.reshape(-1) * weights)
    if wpo:
        aligned = jnp.where(flat_mask != 0, per_token.reshape(-1) - sq.reshape(-1), 0.0)
        mean = per_sequence(aligned) / jnp.maximum(tokens, 1.0)
        extras["wpo"] = jax.lax.stop_gradient(mean).reshape(-1, num_streams)
    if average:
        total = total / jnp.maximum(tokens, 1.0)
    return total.reshape(-1, num_streams), tokens.reshape(-1, num_streams), extras


def microbatches(batch, k: int):
    """[B, ...] arrays -> [k, B / k, ...]: microbatch j holds rows j, j + k, j + 2k, ...

    Strided rather than contiguous, so that when B is split over data-parallel devices
    in contiguous blocks every microbatch keeps rows on every device (no resharding).
    ``unmicrobatch`` restores the original row order. (The packer lays out token-layout
    rows and examples for this split: ``tr_align.data.packing``.)
    """
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(-1, k, *x.shape[1:]), 0, 1), batch)


def unmicrobatch(x):
    """[k, B / k, ...] -> [B, ...], inverse of ``microbatches``."""
    return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def _logps_fn(apply_fn, batch, *, objective, chunk_size, streams=None, wpo=False):
    return functools.partial(
        sequence_logps,
        apply_fn,
        batch=batch,
        streams=objective.streams if streams is None else streams,
        average=objective.average_logps,
        chunk_size=chunk_size,
        ld_alpha=objective.ld_alpha,
        wpo=wpo,
    )


def _policy_logps(params, ref_logps, batch, *, objective, apply_fn, chunk_size, streams=None):
    """The objective's ``Logps`` of the policy ``params`` (WPO's term when it weights)."""
    wpo = objective.use_weighting
    pol, tokens, extras = _logps_fn(
        apply_fn, batch, objective=objective, chunk_size=chunk_size, streams=streams, wpo=wpo
    )(params)
    return objectives_lib.Logps(pol, ref_logps, tokens, **extras)


def policy_loss(
    params, ref_logps, batch, loss_state=None, *, objective, apply_fn, chunk_size: int = 0
):
    """Step 1 and 3 on one (micro)batch: the objective's loss *sum* of the policy
    ``params`` (differentiate w.r.t. params) and its statistics. ``ref_logps`` [E, S]:
    the reference's per-sequence log-probs (None without a reference). ``loss_state``: the
    objective's running state (``TrainState.loss_state``), updated with this batch first.

    Returns:
      (loss sum, (stats, new loss_state))"""
    lp = _policy_logps(
        params, ref_logps, batch, objective=objective, apply_fn=apply_fn, chunk_size=chunk_size
    )
    loss_state = objective.update_loss_state(lp, loss_state)
    stats = objective.loss(lp, batch, loss_state)
    return stats["loss"][0], (stats, loss_state)


def views(apply_fn, lora, base, dropout_rng=None) -> tuple[Callable, Callable]:
    """(policy apply, reference apply): ``apply_fn`` over what the state holds. Without LoRA
    both are ``apply_fn``; with it they apply the frozen ``base`` and the adapters (the
    reference's adapters or deltas; the base alone for None) inside the traced function,
    per call: target projections factor by factor (``Lora.policy_view``), so no merged
    [in, out] weight or its gradient is formed (``tr_align.lora``)."""
    if lora is None:
        return apply_fn, apply_fn

    def policy(adapters, *args, **kw):
        return apply_fn(lora.policy_view(base, adapters, dropout_rng), *args, **kw)

    def reference(ref, *args, **kw):
        return apply_fn(lora.reference_view(base, ref), *args, **kw)

    return policy, reference


def _batch_stats(
    params, ref_params, batch, loss_state, *, objective, apply_fn, chunk_size, ref_apply_fn=None
):
    """Steps 1-3 on one (micro)batch -> (stats, grads of the loss sum, new loss_state)."""
    ref = None
    if objective.needs_reference:
        logps = _logps_fn(
            ref_apply_fn or apply_fn, batch, objective=objective, chunk_size=chunk_size
        )
        ref = jax.lax.stop_gradient(logps(ref_params)[0])
    loss_fn = functools.partial(
        policy_loss, objective=objective, apply_fn=apply_fn, chunk_size=chunk_size
    )
    (_, (stats, loss_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, ref, batch, loss_state
    )
    return stats, grads, loss_state


def train_step(
    state: TrainState,
    batch,
    *,
    objective,
    apply_fn,
    tx,
    schedule,
    reference_update=None,
    grad_accum_steps: int = 1,
    logps_chunk_size: int = 0,
    lora=None,
):
    """One optimizer step of ``objective``. Pure; jit with ``compile_train_step``.

    With ``lora`` (``tr_align.lora.Lora``) ``state.params`` are the adapters and
    ``state.base`` the frozen base: the forwards see base + deltas (``views``), the
    gradient, the optimizer and the reference update (a ``lora.LoraReferenceUpdate``) see
    the adapters only.

    With ``grad_accum_steps`` = K > 1 the batch is split into K microbatches
    (``microbatches``) that a ``lax.scan`` runs one after another, adding their
    statistics (sums, counts) and the gradients of their loss sums; the step then divides
    by the total count. For a loss that is a mean over examples or tokens this is the
    full-batch loss and gradient up to float32 summation order (see
    ``tr_align.training.objectives`` for the batch statistics taken per microbatch). The
    optimizer and the reference update run once per step.
    """
    # the key advances per step; its second half drives LoRA's dropout (lora.dropout > 0)
    rng, dropout_rng = jax.random.split(state.rng)
    policy_apply, ref_apply = views(apply_fn, lora, state.base, dropout_rng)
    run = functools.partial(
        _batch_stats,
        objective=objective,
        apply_fn=policy_apply,
        chunk_size=logps_chunk_size,
        ref_apply_fn=ref_apply,
    )
    if grad_accum_steps == 1:
        stats, grads, loss_state = run(state.params, state.ref_params, batch, state.loss_state)
    else:
        micro = microbatches(batch, grad_accum_steps)
        first = jax.tree.map(lambda x: x[0], micro)
        shapes = jax.eval_shape(run, state.params, state.ref_params, first, state.loss_state)
        zeros = jax.tree.map(jnp.zeros_like, shapes[:2])

        def body(carry, mb):
            acc, loss_state = carry
            stats, grads, loss_state = run(state.params, state.ref_params, mb, loss_state)
            return (jax.tree.map(jnp.add, acc, (stats, grads)), loss_state), None

        ((stats, grads), loss_state), _ = jax.lax.scan(body, (zeros, state.loss_state), micro)
    grads = jax.tree.map(lambda g: g / jnp.maximum(stats["loss"][1], 1e-30), grads)
    metrics = objectives_lib.finalize(stats)
    metrics.update(objective.derived(metrics))
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    new_state, applied = state.apply_gradients(
        grads, tx=tx, reference_update=reference_update, finite=finite
    )
    if loss_state is not None:  # a skipped step keeps the running loss state too
        new_state = new_state.replace(
            loss_state=jax.tree.map(
                lambda new, old: jnp.where(applied, new, old), loss_state, state.loss_state
            )
        )
    metrics["grad_norm"] = grad_norm
    metrics[SKIPPED_METRIC] = jnp.logical_not(applied).astype(jnp.int32)
    metrics["learning_rate"] = schedule(state.step)
    if objective.needs_reference:
        ru = reference_update
        metrics["ref/updates"] = (
            jnp.zeros_like(new_state.step) if ru is None else ru.num_updates(new_state.step)
        )
        if lora is None:
            distance = trust_region.param_distance(new_state.params, new_state.ref_params)
        else:  # between the effective weights: the deltas (the base cancels)
            distance = lora_lib.delta_distance(lora, new_state.params, new_state.ref_params)
        metrics["ref/param_distance"] = distance
    return new_state.replace(rng=rng), metrics


def eval_step(
    state: TrainState, batch, *, objective, apply_fn, logps_chunk_size: int = 0, lora=None
):
    """Held-out metrics of one batch (weighted means, rows weighted by ``batch['weight']``)
    and the policy's per-example log-probs of the two eval streams (recorded at step 0 as
    the initial policy's, ``init_{chosen,rejected}_logps``)."""
    streams = objective.eval_streams
    policy_apply, ref_apply = views(apply_fn, lora, state.base)
    ref = None
    if objective.needs_reference:
        ref = _logps_fn(
            ref_apply, batch, objective=objective, chunk_size=logps_chunk_size, streams=streams
        )(state.ref_params)[0]
    lp = _policy_logps(
        state.params,
        ref,
        batch,
        objective=objective,
        apply_fn=policy_apply,
        chunk_size=logps_chunk_size,
        streams=streams,
    )
    metrics = objective.eval_metrics(lp, batch, state.loss_state)
    return metrics, (lp.policy[:, 0], lp.policy[:, 1])


def compile_train_step(
    mesh,
    state_shardings,
    *,
    objective,
    apply_fn,
    tx,
    schedule,
    reference_update=None,
    grad_accum_steps: int = 1,
    logps_chunk_size: int = 0,
    lora=None,
):
    """``train_step`` jitted over ``mesh``: the state in and out with ``state_shardings``
    and donated, every batch array (either layout) split over the data-parallel axes,
    metrics replicated."""
    fn = functools.partial(
        train_step,
        objective=objective,
        apply_fn=apply_fn,
        tx=tx,
        schedule=schedule,
        reference_update=reference_update,
        grad_accum_steps=grad_accum_steps,
        logps_chunk_size=logps_chunk_size,
        lora=lora,
    )
    return jax.jit(
        fn,
        in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )


def compile_eval_step(
    mesh, state_shardings, *, objective, apply_fn, logps_chunk_size: int = 0, lora=None
):
    """``eval_step`` jitted over ``mesh``: (metrics replicated, per-example outputs split)."""
    fn = functools.partial(
        eval_step,
        objective=objective,
        apply_fn=apply_fn,
        logps_chunk_size=logps_chunk_size,
        lora=lora,
    )
    batch_sh = sharding.batch_sharding(mesh)
    return jax.jit(
        fn,
        in_shardings=(state_shardings, batch_sh),
        out_shardings=(sharding.replicated(mesh), batch_sh),
    )
