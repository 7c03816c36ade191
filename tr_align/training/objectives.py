"""Training objectives: what the one train step (``tr_align.training.step``) needs to know.

An objective says

* which completions (``streams``) each example contributes to the forward — paired
  preferences: ``("chosen", "rejected")``; unpaired KTO: ``("completion", "kl")`` (the
  prompt with the previous example's completion, for KTO's KL reference point); SFT:
  ``("chosen",)`` in training and both in evaluation;
* which per-example arrays it reads from the batch (``example_keys``: KTO's ``label``);
* whether it needs a reference model (SFT does not: its runs hold none) and whether the
  per-sequence log-probs are length-averaged (IPO);
* its loss and metrics from the per-sequence log-probs, as **sums and counts**
  (``Stats``: name -> (sum, count)). The step adds the sums and the counts of its
  microbatches and divides once, so gradient accumulation gives the full-batch value
  of every statistic that is a mean over examples or tokens (the preference losses, SFT's
  token-mean NLL, the reward metrics). Statistics of the batch as a whole — the KL
  reference point of KTO and ``kto_pair``, AOT's sorted log-ratios, the ``sft`` entry of
  a loss list — are taken per microbatch, as TRL takes them per device batch, and
  ``bco_pair``'s running mean (``loss.bco_running_mean``) is updated once per microbatch;
* its held-out metrics (``eval_metrics``: weighted means over a batch whose rows carry
  ``weight`` and the initial policy's log-probs ``init_{chosen,rejected}_logps``).

Objectives are small frozen dataclasses of static settings, so they can be closed over by
``jax.jit``; ``from_config(loss_cfg)`` picks one from ``loss.type`` (one type or TRL's list).
An objective may keep a running state across steps (``init_loss_state`` /
``update_loss_state``: ``bco_pair``'s running mean), carried in ``TrainState.loss_state``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from tr_align import defaults, losses
from tr_align.config import SFT_LOSSES, UNPAIRED_LOSSES, loss_types

Stats = dict[str, tuple[jax.Array, jax.Array]]  # name -> (sum, count)


@dataclasses.dataclass(frozen=True)
class Logps:
    """Per-sequence values of one (micro)batch, each [E, S] float32 (E examples, S streams):
    ``policy`` (summed or, for IPO, averaged completion log-probs; with ``ld_alpha`` < 1 the
    LD-DPO weighted sums), ``reference`` (None when the objective has no reference) and
    ``tokens`` (completion tokens per sequence). ``raw``: the plain summed policy log-probs
    when ``policy`` is LD-weighted (None otherwise: the same as ``policy``); ``wpo``: the
    policy's WPO term mean_t (log p_t - log sum_v p_v^2) per sequence (``use_weighting``;
    stop_gradient), else None."""

    policy: jax.Array
    reference: jax.Array | None
    tokens: jax.Array
    raw: jax.Array | None = None
    wpo: jax.Array | None = None


def _sum(x, weight=None):
    x = x.astype(jnp.float32)
    return jnp.sum(x) if weight is None else jnp.sum(x * weight)


def _mean(x, weight=None):
    """Mean over rows, or the ``weight``-weighted mean (eval batches pad with weight 0)."""
    return jnp.mean(x) if weight is None else jnp.sum(x * weight) / jnp.sum(weight)


def finalize(stats: Stats) -> dict[str, jax.Array]:
    """Stats -> means (sum / count; an empty count gives 0)."""
    return {k: s / jnp.maximum(c, 1e-30) for k, (s, c) in stats.items()}


def _init_reward_metrics(beta, pol, batch, weight):
    """Held-out implicit-reward accuracy and margin against the *initial* policy: did
    training raise the chosen completion's log-prob more than the rejected one's."""
    init_margin = (pol[:, 0] - batch["init_chosen_logps"]) - (
        pol[:, 1] - batch["init_rejected_logps"]
    )
    return {
        "eval/init_rewards/accuracies": _mean(init_margin > 0, weight),
        "eval/init_rewards/margins": beta * _mean(init_margin, weight),
    }


class _Stateless:
    """Objectives without a running loss state (all but ``bco_pair``'s running mean), and
    the log-prob options only ``Paired`` has (LD-DPO's ``ld_alpha``, WPO's weighting)."""

    ld_alpha = 1.0
    use_weighting = False

    def init_loss_state(self):
        return None

    def update_loss_state(self, lp: Logps, loss_state):
        return loss_state


@dataclasses.dataclass(frozen=True)
class Paired(_Stateless):
    """(TR-)DPO and the rest of TRL's paired family (``losses.preference_loss``), alone or
    as TRL's weighted list of losses.

    ``loss_type``: one type, or a tuple (TRL's ``loss_type`` list, e.g. MPO's
    ``("sigmoid", "bco_pair", "sft")``) combined as TRL 1.16 ``DPOTrainer._compute_loss``
    does,

        loss = sum_i weights[i] * mean_over_pairs(loss_i)      (weights () = 1 each)

    where ``sft`` is the token-mean NLL of the chosen completions (raw log-probs, also with
    ``ld_alpha``). ``rpo_alpha`` > 0 appends ``("sft", rpo_alpha)`` (RPO, Pang et al. 2024;
    the older TRL's ``rpo_alpha``: loss + rpo_alpha * NLL). Types that expect length-averaged
    log-probs (``losses.uses_average_logps``: ipo, sigmoid_norm) get them: a single such type
    asks the step for averaged log-probs (logged so), a list averages per type from the sums.

    With gradient accumulation each microbatch has the same number of pairs, so the pair
    means add up to the full batch's; the ``sft`` term of a list is the mean of the
    microbatches' token means (as TRL computes it per micro-batch).

    ``ld_alpha`` (LD-DPO, Liu et al. 2024, arXiv:2409.06411): policy and reference
    log-probs are sum(first min(|y_c|, |y_r|) completion tokens) + ld_alpha * sum(the rest)
    (1.0 = off). ``use_weighting`` (WPO, Zhou et al. 2024, arXiv:2406.11827, eq. 2): each
    pair's loss is multiplied by w_c * w_r, w = exp(mean_t (log p_t - log sum_v p_v^2)) of the
    policy (stop_gradient; TRL's ``log_sum_sq_probs``), also the ``sft`` term (by the mean
    weight). ``reference_free``: the reference log-probs are 0 (no reference model is held).
    ``bco_running_mean``: ``bco_pair`` shifts by the running mean of the batch-mean reward
    (the older TRL's ``RunningMoments``), kept in ``TrainState.loss_state``; False = TRL
    1.16's stateless ``bco_pair`` (shift 0)."""

    loss_type: str | tuple[str, ...]
    beta: float
    label_smoothing: float = 0.0
    discopop_tau: float = 0.05
    weights: tuple[float, ...] = ()
    rpo_alpha: float = 0.0
    ld_alpha: float = 1.0
    use_weighting: bool = False
    reference_free: bool = False
    bco_running_mean: bool = False

    streams = ("chosen", "rejected")
    eval_streams = ("chosen", "rejected")
    example_keys = ()

    @property
    def components(self) -> tuple[tuple[str, float], ...]:
        """((type, weight), ...) of the loss, ``rpo_alpha``'s ``sft`` term included."""
        types = loss_types(self.loss_type)
        weights = tuple(self.weights) or (1.0,) * len(types)
        comps = tuple(zip(types, (float(w) for w in weights), strict=True))
        if self.rpo_alpha:
            comps += (("sft", float(self.rpo_alpha)),)
        return comps

    @property
    def needs_reference(self) -> bool:
        return not self.reference_free

    @property
    def average_logps(self) -> bool:
        comps = self.components
        return len(comps) == 1 and losses.uses_average_logps(comps[0][0])

    @property
    def _bco_stateful(self) -> bool:
        return self.bco_running_mean and any(t == "bco_pair" for t, _ in self.components)

    def init_loss_state(self):
        if not self._bco_stateful:
            return None
        return {"bco_mean": jnp.zeros((), jnp.float32), "bco_count": jnp.zeros((), jnp.float32)}

    def update_loss_state(self, lp: Logps, loss_state):
        """The running mean of ``bco_pair``'s batch-mean reward mean(concat(beta cl, beta rl)),
        updated with this (micro)batch's before it is used (TRL's ``RunningMoments.update``:
        mean += (x - mean) / count, one update per micro-batch)."""
        if loss_state is None:
            return None
        pol, ref = self._inputs(lp, "bco_pair")
        x = jax.lax.stop_gradient(self.beta * jnp.mean(pol - ref))
        count = loss_state["bco_count"] + 1.0
        mean = loss_state["bco_mean"] + (x - loss_state["bco_mean"]) / count
        return {"bco_mean": mean, "bco_count": count}

    def _reference(self, lp: Logps):
        return jnp.zeros_like(lp.policy) if lp.reference is None else lp.reference

    def _inputs(self, lp: Logps, loss_type: str):
        """(policy, reference) [E, 2] as ``loss_type`` expects them (averaged or summed)."""
        pol, ref = lp.policy, self._reference(lp)
        if losses.uses_average_logps(loss_type) and not self.average_logps:
            n = jnp.maximum(lp.tokens, 1.0)
            pol, ref = pol / n, ref / n
        return pol, ref

    def _pair_weights(self, lp: Logps):
        """WPO's per-pair weight w_c * w_r [E] (stop_gradient), or None."""
        if not self.use_weighting:
            return None
        return jax.lax.stop_gradient(jnp.exp(lp.wpo[:, 0]) * jnp.exp(lp.wpo[:, 1]))

    def _terms(self, lp: Logps, weight=None, loss_state=None):
        """[(type, loss weight, per-example losses [E] or None, mean)] of each component;
        ``weight``: eval's row weights (means over the real rows)."""
        pair_w = self._pair_weights(lp)
        out = []
        for loss_type, w in self.components:
            if loss_type == "sft":
                raw = lp.policy if lp.raw is None else lp.raw
                tok = lp.tokens[:, 0]
                rw = jnp.ones_like(tok) if weight is None else weight
                mean = -jnp.sum(raw[:, 0] * rw) / jnp.maximum(jnp.sum(tok * rw), 1.0)
                if pair_w is not None:
                    mean = mean * _mean(pair_w, weight)
                out.append((loss_type, w, None, mean))
                continue
            pol, ref = self._inputs(lp, loss_type)
            delta = None
            if loss_type == "bco_pair" and loss_state is not None:
                delta = loss_state["bco_mean"]
            per_example = losses.preference_loss(
                loss_type,
                pol[:, 0],
                pol[:, 1],
                ref[:, 0],
                ref[:, 1],
                beta=self.beta,
                label_smoothing=self.label_smoothing,
                discopop_tau=self.discopop_tau,
                bco_delta=delta,
            )[0]
            if per_example.shape[0] != lp.policy.shape[0] and (
                weight is not None or pair_w is not None
            ):
                per_example = per_example.reshape(2, -1).mean(0)  # kto_pair: [chosen; rejected]
            if pair_w is not None:
                per_example = per_example * pair_w
            out.append((loss_type, w, per_example, _mean(per_example, weight)))
        return out

    def _rewards(self, lp: Logps):
        ref = self._reference(lp)
        c_rew = jax.lax.stop_gradient(self.beta * (lp.policy[:, 0] - ref[:, 0]))
        r_rew = jax.lax.stop_gradient(self.beta * (lp.policy[:, 1] - ref[:, 1]))
        return c_rew, r_rew

    def loss(self, lp: Logps, batch, loss_state=None) -> Stats:
        terms = self._terms(lp, loss_state=loss_state)
        c_rew, r_rew = self._rewards(lp)
        ref = self._reference(lp)
        n = jnp.float32(lp.policy.shape[0])
        if len(terms) == 1 and terms[0][2] is not None:
            # one pair loss: its sum over the terms (kto_pair: 2E terms, their mean is the loss)
            _, w, per_example, _ = terms[0]
            total = (per_example.sum() * w, jnp.float32(per_example.shape[0]))
        else:  # a weighted sum of means, as a sum over the microbatch's pairs
            total = (n * sum(w * mean for _, w, _, mean in terms), n)
        stats = {
            "loss": total,
            "rewards/chosen": (_sum(c_rew), n),
            "rewards/rejected": (_sum(r_rew), n),
            "rewards/accuracies": (_sum(c_rew > r_rew), n),
            "rewards/margins": (_sum(c_rew - r_rew), n),
            "logps/chosen": (_sum(lp.policy[:, 0]), n),
            "logps/rejected": (_sum(lp.policy[:, 1]), n),
        }
        if self.needs_reference:
            stats["ref_logps/chosen"] = (_sum(ref[:, 0]), n)
            stats["ref_logps/rejected"] = (_sum(ref[:, 1]), n)
        if len(terms) > 1:
            for loss_type, _, _, mean in terms:
                stats[f"loss/{loss_type}"] = (n * mean, n)
        if self.use_weighting:
            stats["wpo/weight"] = (_sum(self._pair_weights(lp)), n)
        if loss_state is not None:
            stats["bco/running_mean"] = (n * loss_state["bco_mean"], n)
        return stats

    def derived(self, metrics):
        return {}

    def eval_metrics(self, lp: Logps, batch, loss_state=None) -> dict[str, jax.Array]:
        """Held-out means; ``bco_pair``'s running mean is read, not updated."""
        weight = batch["weight"]
        terms = self._terms(lp, weight, loss_state=loss_state)
        c_rew, r_rew = self._rewards(lp)
        out = {
            "eval/loss": sum(w * mean for _, w, _, mean in terms),
            "eval/rewards/chosen": _mean(c_rew, weight),
            "eval/rewards/rejected": _mean(r_rew, weight),
            "eval/rewards/accuracies": _mean(c_rew > r_rew, weight),
            "eval/rewards/margins": _mean(c_rew - r_rew, weight),
            **_init_reward_metrics(self.beta, lp.policy, batch, weight),
        }
        if len(terms) > 1:
            out.update({f"eval/loss/{t}": mean for t, _, _, mean in terms})
        return out


@dataclasses.dataclass(frozen=True)
class KTO(_Stateless):
    """(TR-)KTO on unpaired, labelled completions (``losses.kto_loss_labeled``, TRL's
    ``kto``). Stream ``kl`` is each prompt with the previous example's completion: the
    mismatched pairs whose policy/reference log-ratio estimates the KL reference point."""

    beta: float
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    streams = ("completion", "kl")
    eval_streams = ("completion", "kl")
    example_keys = ("label",)
    needs_reference = True
    average_logps = False

    def _loss(self, lp: Logps, label, weight=None):
        return losses.kto_loss_labeled(
            lp.policy[:, 0],
            lp.reference[:, 0],
            lp.policy[:, 1],
            lp.reference[:, 1],
            label,
            beta=self.beta,
            desirable_weight=self.desirable_weight,
            undesirable_weight=self.undesirable_weight,
            weight=weight,
        )

    @staticmethod
    def _reward_stats(rewards, label, weight=None) -> Stats:
        w = jnp.ones_like(rewards) if weight is None else weight
        des = label.astype(jnp.float32) * w
        und = (1 - label.astype(jnp.float32)) * w
        return {
            "rewards/chosen": (jnp.sum(rewards * des), des.sum()),
            "rewards/rejected": (jnp.sum(rewards * und), und.sum()),
            # the implicit reward's sign agrees with the label
            "rewards/accuracies": (_sum((rewards > 0) == (label > 0), weight), w.sum()),
        }

    def loss(self, lp: Logps, batch, loss_state=None) -> Stats:
        label = batch["label"]
        per_example, rewards, kl = self._loss(lp, label)
        n = jnp.float32(lp.policy.shape[0])
        return {
            "loss": (per_example.sum(), n),
            **self._reward_stats(rewards, label),
            "kl": (kl, jnp.float32(1)),  # the mean of the microbatches' KL estimates
            "logps/completion": (_sum(lp.policy[:, 0]), n),
            "ref_logps/completion": (_sum(lp.reference[:, 0]), n),
        }

    def derived(self, metrics):
        return {"rewards/margins": metrics["rewards/chosen"] - metrics["rewards/rejected"]}

    def eval_metrics(self, lp: Logps, batch, loss_state=None) -> dict[str, jax.Array]:
        """``init_chosen_logps`` carries the *initial* policy's completion log-probs:
        ``eval/init_rewards/accuracies`` is the fraction of rows whose reward against the
        initial policy has the sign of the label."""
        weight, label = batch["weight"], batch["label"]
        per_example, rewards, kl = self._loss(lp, label, weight)
        means = {
            k: s / jnp.maximum(c, 1.0)
            for k, (s, c) in self._reward_stats(rewards, label, weight).items()
        }
        init_reward = self.beta * (lp.policy[:, 0] - batch["init_chosen_logps"])
        sign = 2.0 * label.astype(jnp.float32) - 1.0
        return {
            "eval/loss": _mean(per_example, weight),
            **{f"eval/{k}": v for k, v in means.items()},
            "eval/rewards/margins": means["rewards/chosen"] - means["rewards/rejected"],
            "eval/kl": kl,
            "eval/init_rewards/accuracies": _mean(
                ((init_reward > 0) == (label > 0)).astype(jnp.float32), weight
            ),
            "eval/init_rewards/margins": _mean(sign * init_reward, weight),
        }


@dataclasses.dataclass(frozen=True)
class SFT(_Stateless):
    """Supervised fine-tuning on the chosen completions, TRL ``SFTTrainer``'s loss on
    prompt-completion data: the mean negative log-likelihood per completion token,

        loss = - sum_{e,t} mask[e, t] log pi(y[e, t] | y[e, <t]) / sum_{e,t} mask[e, t]

    No reference (the run holds none). ``beta`` only scales the held-out implicit reward
    against the initial policy."""

    beta: float = 0.1

    streams = ("chosen",)
    eval_streams = ("chosen", "rejected")
    example_keys = ()
    needs_reference = False
    average_logps = False

    def loss(self, lp: Logps, batch, loss_state=None) -> Stats:
        n = jnp.float32(lp.policy.shape[0])
        return {
            "loss": (-lp.policy[:, 0].sum(), lp.tokens[:, 0].sum()),
            "logps/chosen": (_sum(lp.policy[:, 0]), n),
        }

    def derived(self, metrics):
        return {"perplexity": jnp.exp(metrics["loss"])}

    def eval_metrics(self, lp: Logps, batch, loss_state=None) -> dict[str, jax.Array]:
        weight = batch["weight"]
        nll = -jnp.sum(lp.policy[:, 0] * weight) / jnp.maximum(
            jnp.sum(lp.tokens[:, 0] * weight), 1.0
        )
        return {
            "eval/loss": nll,
            "eval/perplexity": jnp.exp(nll),
            **_init_reward_metrics(self.beta, lp.policy, batch, weight),
        }


Objective = Any  # Paired | KTO | SFT (any object with the attributes above)


def from_config(loss_cfg) -> Objective:
    """The objective of a ``loss`` config block (``loss.type``: one type or TRL's list)."""
    types = loss_types(loss_cfg.type)
    beta = float(loss_cfg.beta)
    opt = functools.partial(defaults.get_in_block, loss_cfg)
    if types == SFT_LOSSES and not opt("loss.rpo_alpha"):
        return SFT(beta=beta)
    if types == UNPAIRED_LOSSES:
        return KTO(
            beta=beta,
            desirable_weight=float(opt("loss.desirable_weight")),
            undesirable_weight=float(opt("loss.undesirable_weight")),
        )
    return Paired(
        loss_type=types[0] if len(types) == 1 else types,
        beta=beta,
        label_smoothing=float(loss_cfg.label_smoothing),
        discopop_tau=float(loss_cfg.discopop_tau),
        weights=tuple(float(w) for w in opt("loss.weights")),
        rpo_alpha=float(opt("loss.rpo_alpha")),
        ld_alpha=float(opt("loss.ld_alpha")),
        use_weighting=bool(opt("loss.use_weighting")),
        reference_free=bool(opt("loss.reference_free")),
        bco_running_mean=bool(opt("loss.bco_running_mean")),
    )
