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
  reference point of KTO and ``kto_pair``, ``bco_pair``'s reward shift, AOT's sorted
  log-ratios — are taken per microbatch, as TRL takes them per device batch;
* its held-out metrics (``eval_metrics``: weighted means over a batch whose rows carry
  ``weight`` and the initial policy's log-probs ``init_{chosen,rejected}_logps``).

Objectives are small frozen dataclasses of static settings, so they can be closed over by
``jax.jit``; ``from_config(loss_cfg)`` picks one from ``loss.type``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from tr_align import defaults, losses
from tr_align.config import SFT_LOSSES, UNPAIRED_LOSSES

Stats = dict[str, tuple[jax.Array, jax.Array]]  # name -> (sum, count)


@dataclasses.dataclass(frozen=True)
class Logps:
    """Per-sequence values of one (micro)batch, each [E, S] float32 (E examples, S streams):
    ``policy`` (summed or, for IPO, averaged completion log-probs), ``reference`` (None when
    the objective has no reference) and ``tokens`` (completion tokens per sequence)."""

    policy: jax.Array
    reference: jax.Array | None
    tokens: jax.Array


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


@dataclasses.dataclass(frozen=True)
class Paired:
    """(TR-)DPO and the rest of TRL's paired family (``losses.preference_loss``)."""

    loss_type: str
    beta: float
    label_smoothing: float = 0.0
    discopop_tau: float = 0.05

    streams = ("chosen", "rejected")
    eval_streams = ("chosen", "rejected")
    example_keys = ()
    needs_reference = True

    @property
    def average_logps(self) -> bool:
        return losses.uses_average_logps(self.loss_type)

    def _loss(self, lp: Logps):
        return losses.preference_loss(
            self.loss_type,
            lp.policy[:, 0],
            lp.policy[:, 1],
            lp.reference[:, 0],
            lp.reference[:, 1],
            beta=self.beta,
            label_smoothing=self.label_smoothing,
            discopop_tau=self.discopop_tau,
        )

    def loss(self, lp: Logps, batch) -> Stats:
        per_example, c_rew, r_rew = self._loss(lp)
        n = jnp.float32(lp.policy.shape[0])
        # kto_pair returns [chosen part; rejected part]: 2E terms, their mean is the loss
        return {
            "loss": (per_example.sum(), jnp.float32(per_example.shape[0])),
            "rewards/chosen": (_sum(c_rew), n),
            "rewards/rejected": (_sum(r_rew), n),
            "rewards/accuracies": (_sum(c_rew > r_rew), n),
            "rewards/margins": (_sum(c_rew - r_rew), n),
            "logps/chosen": (_sum(lp.policy[:, 0]), n),
            "logps/rejected": (_sum(lp.policy[:, 1]), n),
            "ref_logps/chosen": (_sum(lp.reference[:, 0]), n),
            "ref_logps/rejected": (_sum(lp.reference[:, 1]), n),
        }

    def derived(self, metrics):
        return {}

    def eval_metrics(self, lp: Logps, batch) -> dict[str, jax.Array]:
        weight = batch["weight"]
        per_example, c_rew, r_rew = self._loss(lp)
        if per_example.shape[0] != weight.shape[0]:  # kto_pair: [chosen part; rejected part]
            per_example = per_example.reshape(2, -1).mean(0)
        return {
            "eval/loss": _mean(per_example, weight),
            "eval/rewards/chosen": _mean(c_rew, weight),
            "eval/rewards/rejected": _mean(r_rew, weight),
            "eval/rewards/accuracies": _mean(c_rew > r_rew, weight),
            "eval/rewards/margins": _mean(c_rew - r_rew, weight),
            **_init_reward_metrics(self.beta, lp.policy, batch, weight),
        }


@dataclasses.dataclass(frozen=True)
class KTO:
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

    def loss(self, lp: Logps, batch) -> Stats:
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

    def eval_metrics(self, lp: Logps, batch) -> dict[str, jax.Array]:
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
class SFT:
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

    def loss(self, lp: Logps, batch) -> Stats:
        n = jnp.float32(lp.policy.shape[0])
        return {
            "loss": (-lp.policy[:, 0].sum(), lp.tokens[:, 0].sum()),
            "logps/chosen": (_sum(lp.policy[:, 0]), n),
        }

    def derived(self, metrics):
        return {"perplexity": jnp.exp(metrics["loss"])}

    def eval_metrics(self, lp: Logps, batch) -> dict[str, jax.Array]:
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
    """The objective of a ``loss`` config block (``loss.type``)."""
    kind = loss_cfg.type
    beta = float(loss_cfg.beta)
    if kind in SFT_LOSSES:
        return SFT(beta=beta)
    if kind in UNPAIRED_LOSSES:
        return KTO(
            beta=beta,
            desirable_weight=float(defaults.get_in_block(loss_cfg, "loss.desirable_weight")),
            undesirable_weight=float(defaults.get_in_block(loss_cfg, "loss.undesirable_weight")),
        )
    return Paired(
        loss_type=kind,
        beta=beta,
        label_smoothing=float(loss_cfg.label_smoothing),
        discopop_tau=float(loss_cfg.discopop_tau),
    )
