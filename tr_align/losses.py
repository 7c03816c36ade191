"""Pure, jit-able preference losses on per-sequence log-probabilities.

Conventions
-----------
* Every loss takes per-sequence log-probabilities ("logps"): the sum over the
  completion tokens of log pi(y_t | x, y_<t), shape ``[B]``. ``pc``/``pr`` are
  the policy logps of the chosen/rejected completions, ``rc``/``rr`` the
  reference-model ones. ``chosen_logratios = pc - rc``,
  ``rejected_logratios = pr - rr`` and ``logits = (pc - pr) - (rc - rr)``.
* Functions return per-example arrays (never a reduced scalar); the batch loss
  is ``losses.mean()``, exactly as in Hugging Face TRL.
* Everything is computed in float32 (inputs are upcast). Config values
  (``loss_type``, ``average``) are Python values and must be static under
  ``jax.jit``; numeric hyper-parameters (``beta``, ``label_smoothing``, ...)
  may be Python numbers (validated eagerly) or traced arrays (not validated;
  upcast to float32 too, so a float16/bfloat16 ``beta = 1e-6`` cannot overflow
  in ``1 / (2 beta)``).
* Range: for per-sequence logps of any float dtype with |logp| up to 1e30 (far
  beyond any real model's, and representable in bfloat16 and float32) and
  ``beta`` in [1e-6, 1e3] (``label_smoothing`` in [0, 0.5), ``discopop_tau`` in
  (0, 1]: above 1 DiscoPOP's ``exp(-z) m`` term grows exponentially), every loss and
  its gradient are finite (tested with hypothesis, tests/test_fuzz.py; the KTO losses
  too, for weights >= 0). The squared losses (``ipo``, ``sppo_hard``)
  would overflow float32 beyond a margin of ~1.8e19: their value saturates at
  float32-max / B (B = batch size, so ``losses.mean()`` stays finite) while their
  gradient stays the exact ``2 * margin``. Beyond that range the scaled margins
  ``beta * logits`` themselves leave float32 and the linear-growth losses return
  inf; a gradient w.r.t. float16 inputs is float16 and overflows above 65504
  (e.g. IPO with ``beta`` < 1e-5), so feed float32 logps (``sequence_logps``
  returns float32) when ``beta`` is tiny.
* Implicit rewards ``beta * logratios`` are returned wrapped in
  ``jax.lax.stop_gradient`` (logging only, like TRL's ``.detach()``).
* Formulas follow the 2024-2025 TRL ``DPOTrainer.dpo_loss`` (the version with
  the EXO eps fallback and cDPO label smoothing of ``sigmoid``) and TRL 1.16's
  ``DPOTrainer._compute_loss`` (``sigmoid_norm``, ``aot_unpaired`` = the old ``aot_pair``,
  the stateless ``bco_pair``), and
  ``KTOTrainer.kto_loss``; ``kto_pair`` is the paired KTO loss TRL's DPO trainer
  had until mid-2024 (used for TR-KTO in Gorbatovski et al. 2024,
  arXiv:2404.09656). Numerically equivalent rewrites are used where they are
  more stable in float32 (e.g. ``1 - sigmoid(x)`` is computed as
  ``sigmoid(-x)``).

Only jax, jax.numpy and chex are needed; nothing else from ``tr_align``.
"""

from __future__ import annotations

import functools
import math
import numbers

import chex
import jax
import jax.numpy as jnp

__all__ = [
    "LOSS_TYPES",
    "LOSS_ALIASES",
    "AVERAGED_LOSSES",
    "canonical_loss_type",
    "preference_loss",
    "uses_average_logps",
    "kto_loss",
    "kto_loss_labeled",
    "token_logps",
    "token_logps_and_sq",
    "sequence_logps",
    "chunked_sequence_logps",
]

LOSS_TYPES: tuple[str, ...] = (
    "sigmoid",
    "ipo",
    "hinge",
    "robust",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "kto_pair",
    "sigmoid_norm",
)
# Older names still accepted (TRL renamed ``aot_pair`` to ``aot_unpaired``).
LOSS_ALIASES: dict[str, str] = {"aot_pair": "aot_unpaired"}
# Losses that expect length-averaged per-sequence log-probs (``uses_average_logps``).
AVERAGED_LOSSES: tuple[str, ...] = ("ipo", "sigmoid_norm")

_EXO_DEFAULT_EPS = 1e-3


def _is_static_number(x) -> bool:
    """True for Python / numpy scalars (values we can validate eagerly)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def canonical_loss_type(loss_type: str) -> str:
    """``loss_type`` with an old name (``LOSS_ALIASES``: ``aot_pair``) mapped to TRL's current
    one (``aot_unpaired``); unknown names unchanged."""
    return LOSS_ALIASES.get(loss_type, loss_type)


def _check_loss_type(loss_type) -> None:
    if canonical_loss_type(loss_type) not in LOSS_TYPES:
        raise ValueError(
            f"Unknown loss_type {loss_type!r}; valid loss types are: {', '.join(LOSS_TYPES)} "
            f"(aliases: {', '.join(LOSS_ALIASES)})."
        )


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or (_is_static_number(value) and not value > 0):
        raise ValueError(f"{name} must be > 0, got {value!r}.")


def _f32(x) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def _hparam(x):
    """A hyper-parameter as used in the formulas: Python numbers as they are (exact, weakly
    typed), arrays upcast to float32 (a float16 ``beta = 1e-6`` would make ``1 / (2 beta)``
    overflow float16's 65504)."""
    return x if _is_static_number(x) or x is None else _f32(x)


_F32_MAX = float(jnp.finfo(jnp.float32).max)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _saturating_square(cap: float, x: jax.Array) -> jax.Array:
    """``min(x**2, cap)`` with the gradient of ``x**2`` (``2 x``) everywhere.

    For the squared losses (``ipo``, ``sppo_hard``) in float32: a margin beyond
    sqrt(cap) (about 1.8e19 / sqrt(B) with ``cap = f32max / B``) would give ``inf``; here the
    value saturates at ``cap`` (so the batch mean stays finite) while the gradient stays the
    exact ``2 x``, finite for |x| < f32max / 2. NaN stays NaN.
    """
    return jnp.minimum(jnp.square(x), cap)


@_saturating_square.defjvp
def _saturating_square_jvp(cap, primals, tangents):
    (x,), (t,) = primals, tangents
    return _saturating_square(cap, x), 2.0 * x * t


def uses_average_logps(loss_type: str) -> bool:
    """Whether ``loss_type`` expects length-AVERAGED per-sequence log-probs.

    TRL divides the summed completion log-probs (its "scores") by the number of
    completion tokens for ``ipo`` and ``sigmoid_norm`` (``AVERAGED_LOSSES``; TRL 1.16
    ``DPOTrainer._compute_loss``: ``chosen_scores / chosen_mask.sum(dim=1).clamp(min=1.0)``);
    every other loss uses the sum. Use the result as ``sequence_logps(..., average=...)``.

    Raises:
      ValueError: unknown ``loss_type``.
    """
    _check_loss_type(loss_type)
    return canonical_loss_type(loss_type) in AVERAGED_LOSSES


def _smoothed_logistic(z: jax.Array, label_smoothing) -> jax.Array:
    """-logsigmoid(z) * (1 - ls) - logsigmoid(-z) * ls  (cDPO form)."""
    return (
        -jax.nn.log_sigmoid(z) * (1.0 - label_smoothing) - jax.nn.log_sigmoid(-z) * label_smoothing
    )


def preference_loss(
    loss_type: str,
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    beta,
    label_smoothing=0.0,
    discopop_tau=0.05,
    bco_delta=None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Paired preference losses of TRL's ``DPOTrainer.dpo_loss``.

    Notation (all shape [B]): pc, pr = policy logps of chosen / rejected;
    rc, rr = reference logps; cl = pc - rc, rl = pr - rr (log-ratios);
    logits = (pc - pr) - (rc - rr) = cl - rl; ls = label_smoothing;
    logsig = log(sigmoid(.)); z = beta * logits.

    * ``sigmoid``  (DPO, Rafailov et al. 2023, arXiv:2305.18290; with ls > 0 the
      conservative cDPO of Mitchell 2023):
          -logsig(z) * (1 - ls) - logsig(-z) * ls
    * ``robust``   (rDPO, Chowdhury et al. 2024, arXiv:2403.00409):
          (-logsig(z) * (1 - ls) + logsig(-z) * ls) / (1 - 2 ls)
    * ``exo_pair`` (EXO, Ji et al. 2024, arXiv:2402.00856, eq. 16), eps = ls if
      ls > 0 else 1e-3:
          sigmoid(z) (logsig(z) - log(1 - eps)) + sigmoid(-z) (logsig(-z) - log(eps))
    * ``hinge``    (SLiC, Zhao et al. 2023 / RSO, Liu et al. 2023):  relu(1 - z)
    * ``ipo``      (IPO, Azar et al. 2023, arXiv:2310.12036, eq. 17; beta = tau):
          (logits - 1 / (2 beta))^2
      NOTE: TRL feeds IPO length-AVERAGED logps (see ``uses_average_logps``).
      Saturates at float32-max / B instead of overflowing; exact gradient
      (see "Range" above).
    * ``bco_pair`` (BCO, Jung et al. 2024, arXiv:2404.04656), with delta =
      ``bco_delta`` (default 0):
          -logsig(beta cl - delta) - logsig(-(beta rl - delta))
      delta = 0 is TRL 1.16's stateless form. TRL before 1.x shifted by a running
      mean (``RunningMoments``) over training steps of the batch mean
      mean(concat(beta cl, beta rl)); a caller that wants that form keeps the running
      value itself and passes it (a scalar, not differentiated) as ``bco_delta``
      (``tr_align.training.objectives.Paired`` with ``bco_running_mean``).
    * ``sppo_hard`` (SPPO, Wu et al. 2024, arXiv:2405.00675, hard labels):
          (cl - 0.5 / beta)^2 + (rl + 0.5 / beta)^2
      (each square saturates at float32-max / 2B, exact gradient; see "Range").
    * ``nca_pair`` (NCA, Chen et al. 2024, arXiv:2402.05369):
          -logsig(beta cl) - 0.5 logsig(-beta cl) - 0.5 logsig(-beta rl)
    * ``aot_unpaired`` (AOT, Melnyk et al. 2024, arXiv:2406.05882, unpaired form;
      ``aot_pair`` is its older name, still accepted):
          d = sort(cl) - sort(rl)  (sorted over the batch axis);
          -logsig(beta d) (1 - ls) - logsig(-beta d) ls
    * ``aot``      (AOT, paired form): d = sort(pc - pr) - sort(rc - rr); same form.
    * ``apo_zero`` (APO, D'Oosterlinck et al. 2024, arXiv:2408.06266, eq. 7):
          (1 - sigmoid(beta cl)) + sigmoid(beta rl)
    * ``apo_down`` (APO, eq. 8):
          sigmoid(beta cl) + (1 - sigmoid(beta (cl - rl)))
    * ``discopop`` (DiscoPOP, Chris Lu et al. 2024, arXiv:2406.08414, eq. 5),
      m = sigmoid(z / discopop_tau):
          -logsig(z) (1 - m) + exp(-z) m
      (exp(-z) m is evaluated as exp(-z + logsig(z / tau)) to avoid inf * 0.)
    * ``sigmoid_norm`` (TRL 1.16; length-normalised DPO, as SimPO's normalisation with a
      reference): -logsig(z), no label smoothing. It expects length-AVERAGED logps
      (``uses_average_logps``), so z = beta * (cl / |y_c| - rl / |y_r|).
    * ``kto_pair`` (paired KTO, Ethayarajh et al. 2024, arXiv:2402.01306, eq. 7;
      removed from TRL in 2024, used by TR-KTO): chosen_KL = max(mean(cl), 0),
      rejected_KL = max(mean(rl), 0) (no stop_gradient, as in old TRL);
          concat(1 - sigmoid(beta (cl - rejected_KL)),
                 1 - sigmoid(beta (chosen_KL - rl)))      -> shape [2B]

    Args:
      loss_type: one of ``LOSS_TYPES`` (static under jit).
      policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
        ref_rejected_logps: float arrays of shape [B].
      beta: inverse temperature / KL strength (> 0). For IPO it is tau.
      label_smoothing: cDPO / rDPO noise rate in [0, 0.5) (also eps for EXO and
        the smoothing of the AOT losses); ignored by the other losses (and by
        ``sigmoid_norm``, as in TRL).
      discopop_tau: temperature of the DiscoPOP mixing coefficient (> 0).
      bco_delta: reward shift for ``bco_pair`` (scalar; None = 0, TRL 1.16).

    Returns:
      (losses, chosen_rewards, rejected_rewards): losses has shape [B] ([2B]
      for ``kto_pair``); rewards are beta * cl and beta * rl (stop_gradient).
      All float32.

    Raises:
      ValueError: unknown ``loss_type``; ``beta``/``discopop_tau`` <= 0 or
        ``label_smoothing`` outside [0, 0.5] ([0, 0.5) for ``robust``) when given
        as Python numbers.
    """
    _check_loss_type(loss_type)
    loss_type = canonical_loss_type(loss_type)
    _check_positive("beta", beta)
    _check_positive("discopop_tau", discopop_tau)
    ls = label_smoothing
    if _is_static_number(ls):
        if not 0.0 <= ls <= 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5], got {ls!r}.")
        if loss_type == "robust" and ls == 0.5:
            raise ValueError("label_smoothing must be < 0.5 for loss_type='robust'.")

    chex.assert_rank(
        [policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps], 1
    )
    chex.assert_equal_shape(
        [policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps]
    )
    beta, ls, discopop_tau, bco_delta = map(_hparam, (beta, ls, discopop_tau, bco_delta))
    # the squared losses saturate here, so that the mean over the batch stays finite
    cap = _F32_MAX / max(int(policy_chosen_logps.shape[0]), 1)
    pc, pr, rc, rr = map(
        _f32, (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    )

    chosen_logratios = pc - rc
    rejected_logratios = pr - rr
    logits = (pc - pr) - (rc - rr)
    z = beta * logits

    if loss_type == "sigmoid":
        losses = _smoothed_logistic(z, ls)
    elif loss_type == "robust":
        losses = (-jax.nn.log_sigmoid(z) * (1.0 - ls) + jax.nn.log_sigmoid(-z) * ls) / (
            1.0 - 2.0 * ls
        )
    elif loss_type == "exo_pair":
        if _is_static_number(ls):
            eps = float(ls) if ls > 0 else _EXO_DEFAULT_EPS
            log_p_chosen, log_p_rejected = math.log1p(-eps), math.log(eps)
        else:
            eps = jnp.where(ls > 0, ls, _EXO_DEFAULT_EPS).astype(jnp.float32)
            log_p_chosen, log_p_rejected = jnp.log1p(-eps), jnp.log(eps)
        losses = jax.nn.sigmoid(z) * (jax.nn.log_sigmoid(z) - log_p_chosen) + jax.nn.sigmoid(-z) * (
            jax.nn.log_sigmoid(-z) - log_p_rejected
        )
    elif loss_type == "hinge":
        losses = jax.nn.relu(1.0 - z)
    elif loss_type == "ipo":
        losses = _saturating_square(cap, logits - 1.0 / (2.0 * beta))
    elif loss_type == "bco_pair":
        chosen_r = beta * chosen_logratios
        rejected_r = beta * rejected_logratios
        delta = 0.0 if bco_delta is None else jax.lax.stop_gradient(bco_delta)
        losses = -jax.nn.log_sigmoid(chosen_r - delta) - jax.nn.log_sigmoid(-(rejected_r - delta))
    elif loss_type == "sppo_hard":
        losses = _saturating_square(cap / 2, chosen_logratios - 0.5 / beta) + _saturating_square(
            cap / 2, rejected_logratios + 0.5 / beta
        )
    elif loss_type == "nca_pair":
        chosen_r = beta * chosen_logratios
        rejected_r = beta * rejected_logratios
        losses = (
            -jax.nn.log_sigmoid(chosen_r)
            - 0.5 * jax.nn.log_sigmoid(-chosen_r)
            - 0.5 * jax.nn.log_sigmoid(-rejected_r)
        )
    elif loss_type == "aot_unpaired":
        delta = jnp.sort(chosen_logratios, axis=0) - jnp.sort(rejected_logratios, axis=0)
        losses = _smoothed_logistic(beta * delta, ls)
    elif loss_type == "aot":
        delta = jnp.sort(pc - pr, axis=0) - jnp.sort(rc - rr, axis=0)
        losses = _smoothed_logistic(beta * delta, ls)
    elif loss_type == "apo_zero":
        # 1 - sigmoid(x) == sigmoid(-x), without cancellation for large x.
        losses = jax.nn.sigmoid(-beta * chosen_logratios) + jax.nn.sigmoid(
            beta * rejected_logratios
        )
    elif loss_type == "apo_down":
        losses = jax.nn.sigmoid(beta * chosen_logratios) + jax.nn.sigmoid(
            -beta * (chosen_logratios - rejected_logratios)
        )
    elif loss_type == "discopop":
        one_minus_m = jax.nn.sigmoid(-z / discopop_tau)
        exp_times_m = jnp.exp(-z + jax.nn.log_sigmoid(z / discopop_tau))
        losses = -jax.nn.log_sigmoid(z) * one_minus_m + exp_times_m
    elif loss_type == "sigmoid_norm":
        losses = -jax.nn.log_sigmoid(z)
    elif loss_type == "kto_pair":
        # clamp(min=0) with torch's subgradient convention (gradient 1 at 0).
        chosen_kl_raw = jnp.mean(chosen_logratios)
        rejected_kl_raw = jnp.mean(rejected_logratios)
        chosen_kl = jnp.where(chosen_kl_raw >= 0, chosen_kl_raw, 0.0)
        rejected_kl = jnp.where(rejected_kl_raw >= 0, rejected_kl_raw, 0.0)
        losses = jnp.concatenate(
            [
                jax.nn.sigmoid(-beta * (chosen_logratios - rejected_kl)),
                jax.nn.sigmoid(-beta * (chosen_kl - rejected_logratios)),
            ]
        )
    else:  # pragma: no cover - guarded by _check_loss_type
        raise AssertionError(loss_type)

    chosen_rewards = jax.lax.stop_gradient(beta * chosen_logratios)
    rejected_rewards = jax.lax.stop_gradient(beta * rejected_logratios)
    return losses.astype(jnp.float32), chosen_rewards, rejected_rewards


def kto_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    policy_kl_logps: jax.Array | None,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    ref_kl_logps: jax.Array | None,
    *,
    beta,
    desirable_weight=1.0,
    undesirable_weight=1.0,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Unpaired KTO loss of TRL's ``KTOTrainer.kto_loss`` (loss_type="kto").

    KTO: Ethayarajh et al. 2024, arXiv:2402.01306, eq. 7. With
    cl = pc - rc (desirable examples, shape [Nc]) and rl = pr - rr (undesirable
    examples, shape [Nr]; Nc and Nr may differ and may be 0):

        kl = stop_gradient(max(mean(policy_kl_logps - ref_kl_logps), 0))
        chosen_losses   = 1 - sigmoid(beta * (cl - kl))
        rejected_losses = 1 - sigmoid(beta * (kl - rl))
        losses = concat(desirable_weight * chosen_losses,
                        undesirable_weight * rejected_losses)        # [Nc + Nr]

    The KL reference point is estimated from mismatched prompt/completion pairs
    (``policy_kl_logps``/``ref_kl_logps``, shape [K]). Pass ``None`` for both to
    use kl = 0 (TRL's ``calculate_KL=False``). TRL additionally averages kl over
    data-parallel processes; under ``jax.jit`` with a globally sharded batch the
    mean here is already global. The batch loss is ``losses.mean()``.

    Returns:
      (losses [Nc + Nr], chosen_rewards [Nc] = beta * cl, rejected_rewards [Nr]
      = beta * rl, kl scalar), all float32; rewards and kl are stop_gradient-ed.
    """
    _check_positive("beta", beta)
    beta, desirable_weight, undesirable_weight = map(
        _hparam, (beta, desirable_weight, undesirable_weight)
    )
    chex.assert_rank(
        [policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps], 1
    )
    chex.assert_equal_shape([policy_chosen_logps, ref_chosen_logps])
    chex.assert_equal_shape([policy_rejected_logps, ref_rejected_logps])
    if (policy_kl_logps is None) != (ref_kl_logps is None):
        raise ValueError("policy_kl_logps and ref_kl_logps must both be given or both be None.")

    if policy_kl_logps is None:
        kl = jnp.zeros((), jnp.float32)
    else:
        chex.assert_rank([policy_kl_logps, ref_kl_logps], 1)
        chex.assert_equal_shape([policy_kl_logps, ref_kl_logps])
        kl = jnp.maximum(jnp.mean(_f32(policy_kl_logps) - _f32(ref_kl_logps)), 0.0)
        kl = jax.lax.stop_gradient(kl)

    chosen_logratios = _f32(policy_chosen_logps) - _f32(ref_chosen_logps)
    rejected_logratios = _f32(policy_rejected_logps) - _f32(ref_rejected_logps)
    # 1 - sigmoid(x) == sigmoid(-x)
    chosen_losses = jax.nn.sigmoid(-beta * (chosen_logratios - kl))
    rejected_losses = jax.nn.sigmoid(-beta * (kl - rejected_logratios))
    losses = jnp.concatenate(
        [desirable_weight * chosen_losses, undesirable_weight * rejected_losses]
    ).astype(jnp.float32)
    chosen_rewards = jax.lax.stop_gradient(beta * chosen_logratios)
    rejected_rewards = jax.lax.stop_gradient(beta * rejected_logratios)
    return losses, chosen_rewards, rejected_rewards, kl


def kto_loss_labeled(
    policy_logps: jax.Array,
    ref_logps: jax.Array,
    policy_kl_logps: jax.Array,
    ref_kl_logps: jax.Array,
    label: jax.Array,
    *,
    beta,
    desirable_weight=1.0,
    undesirable_weight=1.0,
    weight: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``kto_loss`` for a fixed-shape batch that mixes desirable and undesirable rows.

    Same formulas as ``kto_loss``, with the split done by ``label`` ([B], 1 = desirable,
    0 = undesirable) instead of by shape, so it jits with one program for any mix:

        kl     = stop_gradient(max(sum(w * (policy_kl_logps - ref_kl_logps)) / sum(w), 0))
        r      = policy_logps - ref_logps
        losses = where(label, desirable_weight * (1 - sigmoid(beta * (r - kl))),
                              undesirable_weight * (1 - sigmoid(beta * (kl - r))))   # [B]

    ``weight`` ([B], default 1) excludes padding rows from the KL mean. The batch loss is
    the (weighted) mean of ``losses``, which equals the mean of ``kto_loss``'s concatenated
    losses.

    Returns:
      (losses [B], rewards [B] = stop_gradient(beta * r), kl scalar), float32.
    """
    _check_positive("beta", beta)
    beta, desirable_weight, undesirable_weight = map(
        _hparam, (beta, desirable_weight, undesirable_weight)
    )
    chex.assert_rank([policy_logps, ref_logps, policy_kl_logps, ref_kl_logps, label], 1)
    chex.assert_equal_shape([policy_logps, ref_logps, policy_kl_logps, ref_kl_logps, label])
    w = jnp.ones_like(_f32(policy_logps)) if weight is None else _f32(weight)
    kl_terms = _f32(policy_kl_logps) - _f32(ref_kl_logps)
    kl = jnp.maximum(jnp.sum(w * kl_terms) / jnp.maximum(jnp.sum(w), 1.0), 0.0)
    kl = jax.lax.stop_gradient(kl)
    r = _f32(policy_logps) - _f32(ref_logps)
    desirable = label.astype(bool)
    losses = jnp.where(
        desirable,
        desirable_weight * jax.nn.sigmoid(-beta * (r - kl)),
        undesirable_weight * jax.nn.sigmoid(-beta * (kl - r)),
    ).astype(jnp.float32)
    return losses, jax.lax.stop_gradient(beta * r), kl


def token_logps(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-token log-probabilities log softmax(logits)[label], float32 [B, T].

    Computed as ``take_along_axis(logits, labels) - logsumexp(logits)``: the
    gather reads the original dtype (exact upcast of one value per token) and
    the float32 upcast of the full [B, T, V] array is fused by XLA into the
    logsumexp reduction, so no second [B, T, V] array is materialised (unlike
    ``log_softmax``). Labels are clipped to [0, V - 1] so padding ids such as
    -100 are safe; mask such positions afterwards (``sequence_logps`` does).

    Args:
      logits: [B, T, V] float (any float dtype); ``logits[b, t]`` predicts
        ``labels[b, t]`` (already shifted by the caller).
      labels: [B, T] integer token ids.
    """
    chex.assert_rank(logits, 3)
    chex.assert_rank(labels, 2)
    chex.assert_type(labels, int)
    chex.assert_equal_shape_prefix([logits, labels], 2)
    vocab = logits.shape[-1]
    safe_labels = jnp.clip(labels, 0, vocab - 1).astype(jnp.int32)
    picked = jnp.take_along_axis(logits, safe_labels[..., None], axis=-1)[..., 0]
    lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return picked.astype(jnp.float32) - lse


def token_logps_and_sq(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``token_logps`` and, per token, log sum_v p_v^2 = logsumexp(2 logits) - 2 logsumexp(logits)
    (stop_gradient), both float32 [B, T]: WPO's per-token normaliser (Zhou et al. 2024,
    arXiv:2406.11827; TRL's ``log_sum_sq_probs``)."""
    per_token = token_logps(logits, labels)
    x = jax.lax.stop_gradient(logits).astype(jnp.float32)
    sq = jax.nn.logsumexp(2.0 * x, axis=-1) - 2.0 * jax.nn.logsumexp(x, axis=-1)
    return per_token, sq


def sequence_logps(
    logits: jax.Array, labels: jax.Array, loss_mask: jax.Array, *, average: bool = False
) -> jax.Array:
    """Per-sequence log-probability of ``labels`` under ``logits``, float32 [B].

        sum_t mask[b, t] * log softmax(logits[b, t])[labels[b, t]]
        (divided by max(sum_t mask[b, t], 1) when ``average=True``)

    This is TRL's ``_get_batch_logps`` / ``selective_log_softmax`` reduction
    (TRL shifts inside; here the caller passes already-shifted logits/labels).
    Positions with mask 0 contribute exactly 0 even if their logits are
    non-finite, and their labels may be arbitrary (e.g. 0 or -100).

    Args:
      logits: [B, T, V] float (any float dtype).
      labels: [B, T] int.
      loss_mask: [B, T] 0/1 (bool, int or float).
      average: return the length-averaged log-prob (used for IPO, see
        ``uses_average_logps``); static under jit.
    """
    chex.assert_rank(loss_mask, 2)
    chex.assert_equal_shape([labels, loss_mask])
    per_token = token_logps(logits, labels)
    mask = loss_mask.astype(jnp.float32)
    per_token = jnp.where(mask != 0, per_token, 0.0) * mask
    total = per_token.sum(axis=-1)
    if average:
        return total / jnp.maximum(mask.sum(axis=-1), 1.0)
    return total


def chunked_sequence_logps(
    hidden: jax.Array,
    head,
    labels: jax.Array,
    loss_mask: jax.Array,
    *,
    chunk_size: int,
    average: bool = False,
) -> jax.Array:
    """``sequence_logps(head(hidden), labels, loss_mask)`` without all [B, T, V] logits.

    The masked sum over positions of ``chunked_token_logps`` (see there for the chunking
    and its memory); only the summation order differs from ``sequence_logps`` (float32
    rounding).

    Args:
      hidden: [B, T, D] final hidden states (any float dtype).
      head: ``head(x [B, C, D]) -> logits [B, C, V]``, e.g. the ``head`` returned by a
        model's ``apply_fn(..., split_head=True)``; may close over traced parameters
        (gradients flow to them).
      labels: [B, T] int; ``head(hidden)[b, t]`` predicts ``labels[b, t]``.
      loss_mask: [B, T] 0/1 (bool, int or float).
      chunk_size: positions per chunk, an integer >= 1 (static).
      average: length-averaged log-probs (see ``uses_average_logps``); static.

    Returns:
      [B] float32.
    """
    chex.assert_rank([labels, loss_mask], 2)
    chex.assert_equal_shape([labels, loss_mask])
    per_token = chunked_token_logps(hidden, head, labels, chunk_size=chunk_size)
    mask = loss_mask.astype(jnp.float32)
    total = (jnp.where(mask != 0, per_token, 0.0) * mask).sum(axis=-1)
    if average:
        return total / jnp.maximum(mask.sum(axis=-1), 1.0)
    return total


def chunked_token_logps(
    hidden: jax.Array, head, labels: jax.Array, *, chunk_size: int, with_sq: bool = False
):
    """``token_logps(head(hidden), labels)`` [B, T] float32 without all [B, T, V] logits
    (``with_sq``: ``token_logps_and_sq``'s pair, each [B, T]).

    The sequence is cut into ``ceil(T / chunk_size)`` chunks of ``chunk_size`` positions
    (the last one padded); a ``lax.scan`` applies ``head`` to one chunk at a time. The
    chunk body is wrapped in ``jax.checkpoint``, so the backward pass recomputes one
    chunk's logits instead of keeping every chunk's: the largest live logits array is
    [B, chunk_size, V] float32 (B * chunk_size * V * 4 bytes; e.g. 16 x 128 x 128256 x 4
    = 1.05 GB for Llama 3's vocabulary, against 8.4 GB for T = 1024 unchunked). Chunks
    split the sequence, never the vocabulary, so each logsumexp is exact and the batch
    dimension (the data-parallel one) keeps its sharding. Mask the result as
    ``token_logps``'s.

    Args:
      hidden: [B, T, D] final hidden states (any float dtype).
      head: ``head(x [B, C, D]) -> logits [B, C, V]`` (may close over traced parameters).
      labels: [B, T] int; ``head(hidden)[b, t]`` predicts ``labels[b, t]``.
      chunk_size: positions per chunk, an integer >= 1 (static).
    """
    chex.assert_rank(hidden, 3)
    chex.assert_rank(labels, 2)
    chex.assert_equal_shape_prefix([hidden, labels], 2)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}.")
    b, t, d = hidden.shape
    n_chunks = -(-t // chunk_size)
    pad = n_chunks * chunk_size - t
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        labels = jnp.pad(labels, ((0, 0), (0, pad)))

    def chunks(x):  # [B, T', ...] -> [n_chunks, B, chunk_size, ...]
        return jnp.swapaxes(x.reshape(b, n_chunks, chunk_size, *x.shape[2:]), 0, 1)

    @jax.checkpoint
    def chunk_logps(x_BCD, labels_BC):
        if with_sq:
            return token_logps_and_sq(head(x_BCD), labels_BC)
        return token_logps(head(x_BCD), labels_BC)

    _, per_chunk = jax.lax.scan(
        lambda carry, c: (carry, chunk_logps(*c)), None, (chunks(hidden), chunks(labels))
    )  # [n_chunks, B, chunk_size] (a pair of them with_sq)

    def unchunk(x):
        return jnp.swapaxes(x, 0, 1).reshape(b, n_chunks * chunk_size)[:, :t]

    return jax.tree.map(unchunk, per_chunk)
