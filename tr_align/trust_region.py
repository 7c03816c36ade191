"""Trust-region reference updates (Gorbatovski et al. 2024, arXiv:2404.09656).

TR-DPO / TR-IPO / TR-KTO update the reference policy during training instead of
keeping it frozen at the SFT model:

    soft update (alpha in (0, 1)):  theta_ref <- alpha * theta + (1 - alpha) * theta_ref
    hard update (alpha = 1):        theta_ref <- theta

applied after every ``tau``-th optimizer step. TRL exposes the same rule as
``sync_ref_model`` / ``ref_model_mixup_alpha`` / ``ref_model_sync_steps``
(``SyncRefModelCallback``), where it runs as a host-side loop over parameters;
here it is a tree op inside the jitted train step (cf. ``optax.incremental_update``
and ``optax.periodic_update``), so with the state donated the reference is
updated in place and never leaves the device.

Reference precision (``trust_region.ref_dtype``)
------------------------------------------------
The reference may be stored in bfloat16 to halve its memory (the policy and the
optimizer state stay float32). The update is then computed in float32 from the
upcast reference and rounded to bfloat16 once, to nearest-even:

    ref_bf16 <- bf16( alpha * policy_f32 + (1 - alpha) * f32(ref_bf16) )

bfloat16 keeps 8 significant bits, so a reference value r is only representable
to a spacing (ulp) of 2**(floor(log2|r|) - 7): 2**-7 = 0.0078 for |r| in [1, 2),
1.2e-4 for |r| in [0.0156, 0.0313) (typical weights). A soft update moves r by
alpha * (p - r); when that is below half an ulp the rounding returns r unchanged,
and because the next update starts from the same r, the step is lost for good,
not deferred: with alpha = 0.6, r = 1.0 stays put for any p in (1, 1.0065); with
alpha = 0.01 it stays put for p = 1.3 (update 0.003 < 0.0039), so the bf16
reference stalls where a float32 one would converge to p. Each applied update
also carries a rounding error of at most half an ulp (relative 2**-8 = 0.39%).
With the paper's soft settings (alpha 0.5-0.8, tau 1) and hard copies (alpha = 1,
where bf16(p) is simply the policy rounded once) this is usually harmless; for
small alpha keep ``ref_dtype = "float32"``. When a Llama-family model computes in
bfloat16 (``model.dtype``) its forward casts every parameter to bfloat16 anyway, so
a hard-copied bfloat16 reference gives exactly the log-probs of a float32 one
(GPT-NeoX applies its LayerNorm scale and bias in float32).
"""

from __future__ import annotations

import dataclasses
import numbers

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tr_align.errors import ConfigError

# Named settings of the ``trust_region`` config block. The soft and hard values
# are the paper's (soft: alpha 0.5-0.8 with tau 1; hard: tau 32-512).
PRESETS = {
    "tr-soft": dict(enabled=True, alpha=0.6, tau=1),
    "tr-hard": dict(enabled=True, alpha=1.0, tau=512),
    "vanilla": dict(enabled=False, alpha=0.6, tau=1),
}


def validate(alpha, tau) -> None:
    """Raises ConfigError (a ValueError) unless ``alpha`` is a real number in [0, 1] and ``tau``
    an integer >= 1 (``bool``, strings, NaN and non-integral ``tau`` are refused; any size of
    ``tau`` is fine, see ``update_reference``)."""
    if (
        isinstance(alpha, (bool, np.bool_))
        or not isinstance(alpha, numbers.Real)
        or not 0.0 <= float(alpha) <= 1.0
    ):
        raise ConfigError(f"trust_region.alpha={alpha!r} must be a real number in [0, 1]")
    if isinstance(tau, (bool, np.bool_)) or not isinstance(tau, numbers.Integral) or tau < 1:
        raise ConfigError(f"trust_region.tau={tau!r} must be an integer >= 1")


def _check_trees(ref_params, policy_params) -> None:
    """Same tree structure, same shapes, floating-point leaves on both sides (else an error
    naming the first offending leaf); dtypes may differ (a bfloat16 reference)."""
    ref_leaves, ref_def = jax.tree_util.tree_flatten_with_path(ref_params)
    pol_leaves, pol_def = jax.tree_util.tree_flatten_with_path(policy_params)
    if ref_def != pol_def:
        raise ValueError(
            f"update_reference: the reference and policy trees differ in structure "
            f"(reference {ref_def}, policy {pol_def})"
        )
    for (path, r), (_, p) in zip(ref_leaves, pol_leaves):
        name = jax.tree_util.keystr(path) or "the leaf"
        for which, x in (("reference", r), ("policy", p)):
            dtype = jnp.result_type(x)
            if not jnp.issubdtype(dtype, jnp.floating):
                raise TypeError(
                    f"update_reference: {which} {name} has dtype {dtype}; the trust-region mix "
                    "needs floating-point parameters (an integer leaf would be truncated)"
                )
        if jnp.shape(r) != jnp.shape(p):
            raise ValueError(
                f"update_reference: {name} has shape {jnp.shape(r)} in the reference but "
                f"{jnp.shape(p)} in the policy (no broadcasting)"
            )


def _is_multiple(step, tau: int):
    """``step % tau == 0`` for an integer array ``step`` and any Python int ``tau`` >= 1: a
    ``tau`` beyond the step dtype's range (2**40 for int32 steps) cannot be converted to it,
    and there no representable step but 0 is a multiple of it."""
    step = jnp.asarray(step)
    if tau > jnp.iinfo(step.dtype).max:
        return step == 0
    return step % tau == 0


def update_reference(ref_params, policy_params, step, *, alpha: float, tau: int):
    """Trust-region update of the reference parameters.

    After optimizer step ``step`` (1-based count of updates done so far):

        if step % tau == 0:  ref <- alpha * policy + (1 - alpha) * ref
        else:                ref unchanged

    ``alpha = 1`` copies the policy (hard update). ``step`` may be a traced integer
    (no Python branching on it); ``alpha`` and ``tau`` are static Python numbers.
    The mix is computed in float32 (at least) from both operands and rounded once to
    each reference leaf's dtype, so a reference stored in bfloat16 stays in it (see
    the module doc for what the rounding loses).

    Args:
      ref_params: pytree of floating-point reference parameters.
      policy_params: pytree with the same structure and leaf shapes (the updated policy),
        floating point too (dtypes may differ from the reference's).
      step: int scalar, the number of optimizer updates done (>= 1).
      alpha: mixing weight, a real number in [0, 1] (not a bool).
      tau: update period, an integer >= 1 of any size (one beyond the range of ``step``'s
        dtype, e.g. 2**40 with int32 steps, means no update ever happens after step 0).

    Returns:
      The new reference pytree.

    Raises:
      ConfigError (a ValueError): bad ``alpha`` or ``tau``.
      ValueError: the two trees differ in structure or in a leaf's shape (never broadcast).
      TypeError: a leaf that is not floating point (integers would be truncated).
    """
    validate(alpha, tau)
    _check_trees(ref_params, policy_params)
    alpha = float(alpha)

    def mix(ref):
        if alpha == 1.0:
            new = policy_params
        else:
            up = lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32))  # noqa: E731
            new = optax.incremental_update(
                jax.tree.map(up, policy_params), jax.tree.map(up, ref), step_size=alpha
            )
        return jax.tree.map(lambda n, r: n.astype(r.dtype), new, ref)

    ref_params = jax.tree.map(jnp.asarray, ref_params)
    policy_params = jax.tree.map(jnp.asarray, policy_params)
    if tau == 1:
        return mix(ref_params)
    # periodic_update-style: the update branch only runs on sync steps.
    return jax.lax.cond(_is_multiple(step, tau), mix, lambda r: r, ref_params)


@dataclasses.dataclass(frozen=True)
class ReferenceUpdate:
    """The trust-region rule as the object a train state applies after each optimizer step
    (``TrainState.apply_gradients``; levanter's model-averaging hook has this shape): soft
    for alpha < 1, hard (a copy) for alpha = 1, every ``tau`` steps."""

    alpha: float
    tau: int

    def __post_init__(self):
        validate(self.alpha, self.tau)

    def update(self, ref_params, policy_params, step):
        return update_reference(ref_params, policy_params, step, alpha=self.alpha, tau=self.tau)

    def num_updates(self, step):
        return num_updates(step, enabled=True, tau=self.tau)


def from_config(tr_cfg) -> ReferenceUpdate | None:
    """The ``trust_region`` config block's update, or None for a frozen reference."""
    if not tr_cfg.enabled:
        return None
    return ReferenceUpdate(alpha=float(tr_cfg.alpha), tau=int(tr_cfg.tau))


def num_updates(step, *, enabled: bool, tau: int):
    """Number of reference updates done after ``step`` optimizer steps."""
    if not enabled:
        return jnp.zeros_like(step)
    if tau > jnp.iinfo(jnp.asarray(step).dtype).max:  # beyond the step's range (see _is_multiple)
        return jnp.zeros_like(step)
    return step // tau


def param_distance(a, b):
    """L2 distance between two parameter pytrees (float32 accumulation)."""
    sq = jax.tree.map(
        lambda x, y: jnp.sum(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32))), a, b
    )
    return jnp.sqrt(sum(jax.tree.leaves(sq)))
