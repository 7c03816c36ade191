"""Toy overoptimization experiment: exact sequence probabilities under DPO/IPO/KTO-pair vs TR.

The claim tested (Gorbatovski et al. 2024, arXiv:2404.09656, toy example): with a frozen
reference, offline preference losses push the probabilities of BOTH the chosen and the rejected
sequences down and leak probability mass to sequences that never appear in the data
("out-of-distribution", OOD); updating the reference (TR-DPO / TR-IPO / TR-KTO) reduces that.

Setup (every setting is a field of ``ToySettings``; the defaults are the run in docs/experiments.md):

* Sequence space: all ``vocab ** length`` token sequences (default 4 ** 4 = 256), so every
  probability below is exact, not sampled.
* Policy (``model``): an autoregressive network whose weights are shared by all sequences, so
  pushing one sequence down moves the others (how mass can leak to unseen sequences).
  ``"mlp"`` (default, ``Policy``): position t sees its prefix in L - 1 embedding slots
  (width ``embed_dim`` 16, PAD-filled) plus a position embedding, then two GELU layers of
  width ``hidden`` 64. ``"llama"``: the project's Llama (``tr_align.models.llama``: 1 layer,
  hidden 32, 2 heads, intermediate 64, untied head) on ``[BOS, y_0 .. y_{L-2}]`` (BOS = id
  ``vocab``), logits of the ``vocab`` real tokens only. Either way
  ``log pi(y) = sum_t log softmax(logits_t)[y_t]`` and ``sum_y pi(y) = 1`` exactly over the
  enumerated space; one batched forward gives every sequence's probability (``all_logps``).
* Data: ``pairs`` (default 4 preference pairs over 8 distinct sequences; chosen ones follow
  "each token = previous + 1 mod vocab", each rejected one breaks that rule at one position).
  The chosen and rejected sets are disjoint, so p(chosen) + p(rejected) + P_OOD = 1, where
  p(chosen) = sum of pi(y) over the distinct chosen sequences, p(rejected) likewise and
  ``P_OOD = 1 - sum of pi(y) over every sequence that appears in the data``.
* SFT start: from a random init (the seed), ``sft_steps`` (100) full-batch Adam(1e-2) steps
  of maximum likelihood on the uniform mixture of all data sequences (chosen and rejected),
  an SFT model of the distribution the pairs come from (it ends near 1/8 on each of the 8
  data sequences, P_OOD < 0.005). This policy is pi_sft, the starting point of every method
  and the frozen reference of the vanilla ones.
* Preference training: full batch (all pairs every step), Adam with constant ``lr`` (1e-4),
  ``steps`` (500) steps, ``beta`` (0.1, the paper's and TRL's default) for every loss. Losses from ``tr_align.losses.preference_loss``: ``sigmoid``
  (DPO), ``ipo`` (on length-averaged log-probs, as TRL), ``kto_pair``.
* Reference: vanilla = frozen pi_sft; soft TR = ``update_reference`` with alpha 0.6, tau 1
  (the ``tr-soft`` preset); hard TR = alpha 1 with ``hard_tau`` (default 50: the paper's
  presets use tau 32-512 for runs of thousands of steps; 50 gives 10 hard copies in 500
  steps).
* LoRA (``lora_rank`` > 0; off by default): the base is pi_sft, frozen; the trainable
  parameters are ``tr_align.lora.Lora`` adapters of rank ``lora_rank`` and scale
  ``lora_alpha / lora_rank`` on the 2-D Dense kernels ``LORA_TARGETS`` selects: the MLP's
  ``fc1``, ``fc2`` and ``out`` kernels (not the embeddings nor the biases); the Llama's
  attention and MLP projections ``q/k/v/o_proj`` and ``gate/up/down_proj`` (the library's
  default targets; not the embedding nor ``lm_head``). A starts uniform in +-1/sqrt(in)
  (its own key per seed), B at zero, so every LoRA run starts at pi_sft. Vanilla: the
  reference is pi_sft. Soft / hard TR: the reference is pi_sft + a reference delta, updated
  by ``tr_align.lora.LoraReferenceUpdate`` in ``lora_mode`` (``"factors"``: the EMA of A
  and B separately; ``"merged"``: the exact EMA of the dense delta), which drives the loss;
  the other mode's reference is updated from the same policy trajectory alongside ("same
  policy" replay, as ``benchmarks/lora_drift.py``), so every TR run also tracks, per step,
  ``drift = ||D_ref(factors) - D_ref(exact)||_F / ||D_ref(exact)||_F`` over all target
  matrices (0 where both are 0, at step 0) and ``ref_delta_norm = ||D_ref(exact)||_F``.
* Seeds (5) vary the policy initialisation (and hence pi_sft). Tracked exactly after every step:
  p(chosen), p(rejected), P_OOD, KL(pi || pi_sft) = sum_y pi(y) (log pi(y) - log pi_sft(y)),
  and the loss. Results are reported at matched steps and at matched KL to pi_sft (values
  linearly interpolated at the first step where a seed's KL reaches the target).

The paper's own toy settings (sizes, model, data) were not available to us; every setting
here is ours. Each method's whole run (all seeds, vmapped; all steps, ``lax.scan``) is one
jitted call; ``tr-align toy`` runs all 9 methods x 5 seeds in about 40 s of CPU time.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import numbers
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from tr_align import lora, losses, trust_region
from tr_align.errors import ConfigError
from tr_align.models import llama

# name -> (loss type, reference mode)
METHODS: dict[str, tuple[str, str]] = {
    "DPO": ("sigmoid", "vanilla"),
    "TR-DPO-soft": ("sigmoid", "soft"),
    "TR-DPO-hard": ("sigmoid", "hard"),
    "IPO": ("ipo", "vanilla"),
    "TR-IPO-soft": ("ipo", "soft"),
    "TR-IPO-hard": ("ipo", "hard"),
    "KTO-pair": ("kto_pair", "vanilla"),
    "TR-KTO-pair-soft": ("kto_pair", "soft"),
    "TR-KTO-pair-hard": ("kto_pair", "hard"),
}
TRACKED = ("p_chosen", "p_rejected", "p_ood", "kl_to_sft", "loss")
# LoRA runs of a soft / hard TR method also track these (see the module docstring).
LORA_TRACKED = ("drift", "ref_delta_norm")
# The steps of the drift table (those <= steps).
DRIFT_STEPS = (10, 50, 100, 250, 500)
# model -> the LoRA targets (regexes, full match over "/"-joined parameter paths): every
# 2-D Dense kernel of the network except the embeddings and the Llama's head.
LORA_TARGETS = {
    "mlp": (r"(fc1|fc2|out)/kernel",),
    "llama": lora.DEFAULT_TARGETS,  # layers_N/(self_attn|attention|mlp)/*/kernel
}

DEFAULT_PAIRS = (
    # (chosen, rejected): chosen counts up by 1 mod 4, rejected breaks the rule once.
    ((0, 1, 2, 3), (0, 1, 3, 3)),
    ((1, 2, 3, 0), (1, 3, 3, 0)),
    ((2, 3, 0, 1), (2, 3, 0, 0)),
    ((3, 0, 1, 2), (3, 1, 1, 2)),
)


@dataclasses.dataclass(frozen=True)
class ToySettings:
    """Every setting of the experiment (see the module docstring); the defaults are the
    run in docs/experiments.md."""

    vocab: int = 4
    length: int = 4
    pairs: tuple = DEFAULT_PAIRS
    model: str = "mlp"  # "mlp" (Policy below) or "llama" (tr_align.models.llama)
    embed_dim: int = 16  # mlp: token embedding width; llama: hidden_size = 2 * embed_dim
    hidden: int = 64  # mlp: width of the two hidden layers; llama: intermediate_size
    sft_steps: int = 100
    sft_lr: float = 1e-2
    steps: int = 500
    lr: float = 1e-4
    beta: float = 0.1
    soft_alpha: float = 0.6
    soft_tau: int = 1
    hard_tau: int = 50
    seeds: int = 5
    kl_targets: tuple = (1.0, 2.0, 5.0)
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank on pi_sft (frozen); 0 = off
    lora_alpha: float = 8.0  # LoRA scale numerator: W_eff = W + (lora_alpha / rank) A @ B
    lora_mode: str = "factors"  # the reference that drives a TR run: "factors" or "merged"

    def validate(self) -> None:
        for c, r in self.pairs:
            for seq in (c, r):
                if len(seq) != self.length or not all(0 <= t < self.vocab for t in seq):
                    raise ConfigError(
                        f"toy pairs: {seq} must have {self.length} tokens in [0, {self.vocab})"
                    )
        chosen = {tuple(c) for c, _ in self.pairs}
        rejected = {tuple(r) for _, r in self.pairs}
        if chosen & rejected:
            raise ConfigError(
                f"toy pairs: chosen and rejected overlap in {sorted(chosen & rejected)}"
            )
        if self.model not in ("mlp", "llama"):
            raise ConfigError(f"toy: model={self.model!r}; expected 'mlp' or 'llama'")
        if self.steps < 1 or self.seeds < 1:
            raise ConfigError(f"toy: steps={self.steps} and seeds={self.seeds} must be >= 1")
        trust_region.validate(self.soft_alpha, self.soft_tau)
        trust_region.validate(1.0, self.hard_tau)
        rank, alpha = self.lora_rank, self.lora_alpha
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ConfigError(f"toy: lora_rank={rank!r}; expected an integer >= 0")
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not alpha > 0:
            raise ConfigError(f"toy: lora_alpha={self.lora_alpha!r}; expected a number > 0")
        if self.lora_mode not in lora.MODES:
            raise ConfigError(
                f"toy: lora_mode={self.lora_mode!r}; expected one of {', '.join(lora.MODES)}"
            )


class Policy(nn.Module):
    """Autoregressive MLP policy over fixed-length sequences.

    Position t (0-based) sees its prefix y_0 .. y_{t-1}, written into ``length - 1`` slots
    (empty slots hold the PAD id ``vocab``), plus a learned position embedding:

        x_t = concat_j embed(slot_j) + pos_t        ([(length - 1) * embed_dim])
        logits_t = W_3 gelu(W_2 gelu(W_1 x_t))      ([vocab]; each W_i with a bias)

    Every weight is shared by all positions and prefixes, so moving one sequence's
    probability moves the others' (what lets mass leak to sequences not in the data).
    """

    vocab: int
    length: int
    embed_dim: int
    hidden: int

    @nn.compact
    def __call__(self, seqs_NL):
        n, L = seqs_NL.shape
        # prefixes[n, t, j] = seqs[n, j] if j < t else PAD, for t < L, j < L - 1.
        j = jnp.arange(L - 1)[None, None, :]
        t = jnp.arange(L)[None, :, None]
        prefixes = jnp.where(j < t, seqs_NL[:, None, : L - 1], self.vocab)
        emb = nn.Embed(self.vocab + 1, self.embed_dim, name="embed")(prefixes)  # [N,L,L-1,E]
        x = emb.reshape(n, L, (L - 1) * self.embed_dim)
        x = x + nn.Embed(L, (L - 1) * self.embed_dim, name="pos")(jnp.arange(L))[None]
        x = nn.gelu(nn.Dense(self.hidden, name="fc1")(x))
        x = nn.gelu(nn.Dense(self.hidden, name="fc2")(x))
        return nn.Dense(self.vocab, name="out")(x)  # [N, L, vocab]


def make_policy(s: ToySettings):
    """(init_fn(key) -> params, apply_fn(params, seqs [N, L]) -> logits [N, L, vocab]);
    logits[:, t] is the distribution of token t given tokens < t."""
    if s.model == "llama":
        return _llama_policy(s)
    module = Policy(s.vocab, s.length, s.embed_dim, s.hidden)

    def init_fn(key):
        return module.init(key, jnp.zeros((1, s.length), jnp.int32))["params"]

    def apply_fn(params, seqs):
        return module.apply({"params": params}, seqs)

    return init_fn, apply_fn


def _llama_policy(s: ToySettings):
    """The project's Llama (1 layer, 2 heads, untied head) on ``[BOS, y_0 .. y_{L-2}]``
    (BOS = id ``vocab``), keeping the logits of the ``vocab`` real tokens only."""
    cfg = llama.LlamaConfig(
        vocab_size=s.vocab + 1,
        hidden_size=2 * s.embed_dim,
        intermediate_size=s.hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=max(s.length, 2),
    )
    init_fn, llama_apply = llama.make_model(cfg)

    def apply_fn(params, seqs):
        bos = jnp.full((seqs.shape[0], 1), s.vocab, jnp.int32)
        inputs = jnp.concatenate([bos, seqs[:, :-1]], axis=1)
        return llama_apply(params, inputs, jnp.ones_like(inputs))[..., : s.vocab]

    return init_fn, apply_fn


def all_sequences(vocab: int, length: int) -> np.ndarray:
    """Every sequence, int32 [vocab**length, length]; row i is i written in base ``vocab``."""
    return np.array(list(itertools.product(range(vocab), repeat=length)), np.int32)


def sequence_index(seq, vocab: int) -> int:
    """Row of ``seq`` in ``all_sequences``: sum_t seq[t] * vocab ** (L - 1 - t)."""
    idx = 0
    for t in seq:
        idx = idx * vocab + int(t)
    return idx


def all_logps(apply_fn, params, seqs, vocab: int) -> jax.Array:
    """log pi(y) = sum_t log softmax(logits_t)[y_t] for every row y of ``seqs``, float32 [N].

    ``seqs`` must be ``all_sequences(vocab, length)``. The logits of a sequence do not depend
    on its last token (the policy is causal), and rows ``i * vocab .. i * vocab + vocab - 1``
    differ only there, so one forward over every ``vocab``-th row (vocab ** (length - 1)
    sequences) gives the logits of all rows (``jnp.repeat``); the log-probs are then
    ``tr_align.losses.sequence_logps``.
    """
    logits = apply_fn(params, seqs[::vocab])  # [N / vocab, L, vocab]
    logits = jnp.repeat(logits, vocab, axis=0)
    return losses.sequence_logps(logits, seqs, jnp.ones_like(seqs))


def ood_mass(probs, data_index) -> jax.Array:
    """P_OOD = 1 - sum of probs over the distinct indices in ``data_index``."""
    mask = jnp.zeros(probs.shape[-1], bool).at[jnp.asarray(data_index)].set(True)
    return 1.0 - jnp.sum(jnp.where(mask, probs, 0.0), axis=-1)


@dataclasses.dataclass(frozen=True)
class _Data:
    seqs: np.ndarray  # [N, L]
    chosen: np.ndarray  # [P] row index of each pair's chosen sequence
    rejected: np.ndarray  # [P]
    chosen_set: np.ndarray  # distinct chosen rows
    rejected_set: np.ndarray
    data_set: np.ndarray  # distinct rows in the data


def _data(s: ToySettings) -> _Data:
    chosen = np.array([sequence_index(c, s.vocab) for c, _ in s.pairs])
    rejected = np.array([sequence_index(r, s.vocab) for _, r in s.pairs])
    return _Data(
        seqs=all_sequences(s.vocab, s.length),
        chosen=chosen,
        rejected=rejected,
        chosen_set=np.unique(chosen),
        rejected_set=np.unique(rejected),
        data_set=np.unique(np.concatenate([chosen, rejected])),
    )


def _metrics(logp, logp_sft, d: _Data):
    p = jnp.exp(logp)
    return {
        "p_chosen": p[d.chosen_set].sum(),
        "p_rejected": p[d.rejected_set].sum(),
        "p_ood": ood_mass(p, d.data_set),
        "kl_to_sft": jnp.sum(p * (logp - logp_sft)),
    }


def make_sft(s: ToySettings):
    """seed keys [S] -> pi_sft params (stacked over seeds); jitted."""
    init_fn, apply_fn = make_policy(s)
    d = _data(s)
    seqs = jnp.asarray(d.seqs)
    tx = optax.adam(s.sft_lr)

    def one(key):
        params = init_fn(key)

        def nll(p):
            return -all_logps(apply_fn, p, seqs, s.vocab)[d.data_set].mean()

        def step(carry, _):
            p, opt = carry
            g = jax.grad(nll)(p)
            upd, opt = tx.update(g, opt, p)
            return (optax.apply_updates(p, upd), opt), None

        (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=s.sft_steps)
        return params

    return jax.jit(jax.vmap(one))


def _pair_loss(s: ToySettings, loss_type: str, d: _Data, logp, ref_logp) -> jax.Array:
    """The mean preference loss over the data's pairs from the log-probs of every sequence
    (length-averaged, as TRL does, for ``losses.uses_average_logps`` types)."""
    scale = 1.0 / s.length if losses.uses_average_logps(loss_type) else 1.0
    per_example, _, _ = losses.preference_loss(
        loss_type,
        scale * logp[d.chosen],
        scale * logp[d.rejected],
        scale * ref_logp[d.chosen],
        scale * ref_logp[d.rejected],
        beta=s.beta,
    )
    return per_example.mean()


def _preference_run(s: ToySettings, method: str, *, view, ref_view, ref_update, extra=None):
    """The preference-training scan shared by ``make_train`` and ``make_lora_train``:
    ``run(base, params, refs) -> (curves, params, refs)`` for one seed, where the policy is
    ``view(base, params)``, the reference ``ref_view(base, refs)`` (pi_sft = ``base`` when
    ``refs`` is None: a vanilla method), ``ref_update(refs, params, k)`` the reference after
    optimizer step k, and ``extra(refs)`` more metrics per step. curves: {name: [steps + 1]},
    column k the policy after k optimizer steps."""
    loss_type, _ = METHODS[method]
    _, apply_fn = make_policy(s)
    d = _data(s)
    seqs = jnp.asarray(d.seqs)
    tx = optax.adam(s.lr)

    def loss_fn(params, base, ref_logp):
        logp = all_logps(apply_fn, view(base, params), seqs, s.vocab)
        return _pair_loss(s, loss_type, d, logp, ref_logp), logp

    def ref_logps(base, refs, logp_sft):
        if refs is None:
            return logp_sft
        return all_logps(apply_fn, ref_view(base, refs), seqs, s.vocab)

    def tracked(logp, logp_sft, loss, refs):
        m = _metrics(logp, logp_sft, d)
        m["loss"] = loss
        if refs is not None and extra is not None:
            m.update(extra(refs))
        return m

    def run(base, params, refs):
        logp_sft = all_logps(apply_fn, base, seqs, s.vocab)

        def step(carry, _):
            params, refs, opt, k = carry
            ref_logp = ref_logps(base, refs, logp_sft)
            (loss, logp), g = jax.value_and_grad(loss_fn, has_aux=True)(params, base, ref_logp)
            m = tracked(logp, logp_sft, loss, refs)  # after k steps (before this update)
            upd, opt = tx.update(g, opt, params)
            params = optax.apply_updates(params, upd)
            k = k + 1
            if refs is not None:
                refs = ref_update(refs, params, k)
            return (params, refs, opt, k), m

        init = (params, refs, tx.init(params), jnp.zeros((), jnp.int32))
        (params, refs, _, _), per_step = jax.lax.scan(step, init, None, length=s.steps)
        loss, logp = loss_fn(params, base, ref_logps(base, refs, logp_sft))
        last = tracked(logp, logp_sft, loss, refs)
        curves = {k: jnp.concatenate([per_step[k], last[k][None]]) for k in per_step}
        return curves, params, refs

    return run


def make_train(s: ToySettings, method: str):
    """Jitted: pi_sft params (stacked over seeds) -> (curves, policy, reference).

    curves: {name in TRACKED: [S, steps + 1]}; column 0 is pi_sft itself, column k the policy
    after k optimizer steps. policy, reference: the final parameters (stacked over seeds);
    the reference of a vanilla method is pi_sft, never updated.

    With ``s.lora_rank`` > 0 it is ``make_lora_train`` (a different signature).
    """
    if s.lora_rank:
        return make_lora_train(s, method)
    _, mode = METHODS[method]
    alpha, tau = (s.soft_alpha, s.soft_tau) if mode == "soft" else (1.0, s.hard_tau)
    run = _preference_run(
        s,
        method,
        view=lambda base, params: params,
        ref_view=lambda base, ref: ref,
        ref_update=lambda ref, params, k: trust_region.update_reference(
            ref, params, k, alpha=alpha, tau=tau
        ),
    )

    def one(sft_params):
        curves, params, ref = run(sft_params, sft_params, None if mode == "vanilla" else sft_params)
        return curves, params, sft_params if ref is None else ref

    return jax.jit(jax.vmap(one))


def toy_lora(s: ToySettings, mode: str | None = None) -> lora.Lora:
    """The ``Lora`` of a LoRA toy run: rank, alpha, ``LORA_TARGETS[s.model]``, and ``mode``
    (default ``s.lora_mode``) for its reference."""
    return lora.Lora(
        rank=int(s.lora_rank),
        alpha=float(s.lora_alpha),
        targets=tuple(LORA_TARGETS[s.model]),
        mode=mode or s.lora_mode,
    )


def lora_keys(s: ToySettings) -> jax.Array:
    """The per-seed keys of the adapters' initialisation (A; B is zero)."""
    return jax.random.split(jax.random.key(1), s.seeds)


def _sq_norm(deltas: dict) -> jax.Array:
    return sum((jnp.sum(jnp.square(d)) for d in deltas.values()), jnp.zeros((), jnp.float32))


def reference_drift(factors: dict, exact: dict) -> tuple[jax.Array, jax.Array]:
    """(drift, norm) of two {target path: reference delta} dicts: norm = ||exact||_F and
    drift = ||factors - exact||_F / norm over all targets; 0 / 0 is 0 (step 0), x / 0 inf."""
    num = jnp.sqrt(_sq_norm({p: factors[p] - exact[p] for p in exact}))
    den = jnp.sqrt(_sq_norm(exact))
    return jnp.where(num == 0, 0.0, num / den), den


def make_lora_train(s: ToySettings, method: str):
    """Jitted: (pi_sft params, adapter keys [S]) -> (curves, adapters, references), all
    stacked over seeds; the LoRA version of ``make_train`` (``s.lora_rank`` > 0).

    The policy is ``Lora.policy(pi_sft, adapters)`` (pi_sft frozen, the adapters trained,
    B = 0 at step 0). curves: TRACKED and, for a soft / hard TR method, LORA_TRACKED
    ({name: [S, steps + 1]}, column k after k optimizer steps). references: None for a
    vanilla method (the reference is pi_sft); else {"factors": the reference adapters,
    "merged": the dense reference deltas, one [in, out] leaf per target in the base's
    nesting}: the one of ``s.lora_mode`` drove the loss, the other followed the same policy
    trajectory.
    """
    _, mode = METHODS[method]
    los = {m: toy_lora(s, m) for m in lora.MODES}
    drive = los[s.lora_mode]
    alpha, tau = (s.soft_alpha, s.soft_tau) if mode == "soft" else (1.0, s.hard_tau)
    updates = {m: lora.LoraReferenceUpdate(alpha=alpha, tau=tau, lora=lo) for m, lo in los.items()}

    def drift(refs):
        d, n = reference_drift(
            los["factors"].reference_deltas(refs["factors"]),
            los["merged"].reference_deltas(refs["merged"]),
        )
        return {"drift": d, "ref_delta_norm": n}

    run = _preference_run(
        s,
        method,
        view=drive.policy,
        ref_view=lambda base, refs: drive.reference(base, refs[s.lora_mode]),
        ref_update=lambda refs, adapters, k: {
            name: updates[name].update(r, adapters, k) for name, r in refs.items()
        },
        extra=drift,
    )

    def one(sft_params, key):
        adapters = drive.init_adapters(key, sft_params)  # on pi_sft, the frozen base
        refs = None
        if mode != "vanilla":
            refs = {m: lo.init_reference(adapters, enabled=True) for m, lo in los.items()}
        return run(sft_params, adapters, refs)

    return jax.jit(jax.vmap(one))


def value_at_kl(kl, values, target: float) -> float:
    """``values`` linearly interpolated at the first step where ``kl`` reaches ``target``.

    kl, values: 1-D arrays over steps (kl[0] = 0). NaN if the run never reaches ``target``.
    """
    kl, values = np.asarray(kl, np.float64), np.asarray(values, np.float64)
    above = np.nonzero(kl >= target)[0]
    if len(above) == 0:
        return float("nan")
    i = int(above[0])
    if i == 0:
        return float(values[0])
    w = (target - kl[i - 1]) / (kl[i] - kl[i - 1])
    return float(values[i - 1] + w * (values[i] - values[i - 1]))


def checkpoints(steps: int) -> list[int]:
    """The matched-step columns of the table: steps / 5, steps / 2 and the last step."""
    return sorted({max(steps // 5, 1), max(steps // 2, 1), steps})


def _mean_std(values) -> dict:
    """{"mean", "std", "n"} over the non-NaN entries (mean/std None if there are none)."""
    a = np.asarray(values, np.float64)
    a = a[~np.isnan(a)]
    if len(a) == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(a.mean()), "std": float(a.std()), "n": int(len(a))}


def summarize(per_seed: dict, s: ToySettings) -> dict:
    """Per-method results from per-seed curves {name: [seeds, steps + 1]}.

    per_step: mean/std over seeds at every step; at_step: mean/std at ``checkpoints``;
    at_kl: p(chosen), p(rejected), P_OOD at the first step where KL(pi || pi_sft) reaches
    each target (n = seeds that reached it); per_seed_final: last-step values per seed;
    per_seed_curves: KL and P_OOD per seed and step.
    """
    out = {
        "per_step": {
            k: {
                "mean": np.round(v.mean(axis=0), 6).tolist(),
                "std": np.round(v.std(axis=0), 6).tolist(),
            }
            for k, v in per_seed.items()
        },
        "at_step": {
            str(c): {k: _mean_std(v[:, c]) for k, v in per_seed.items()}
            for c in checkpoints(s.steps)
        },
        "at_kl": {},
        "per_seed_final": {k: v[:, -1].tolist() for k, v in per_seed.items()},
        # for P_OOD over KL (the figure's last row); rounded to keep the JSON small
        "per_seed_curves": {k: np.round(per_seed[k], 5).tolist() for k in ("kl_to_sft", "p_ood")},
    }
    kl = per_seed["kl_to_sft"]
    for target in s.kl_targets:
        out["at_kl"][str(target)] = {
            k: _mean_std([value_at_kl(kl[i], per_seed[k][i], target) for i in range(len(kl))])
            for k in ("p_chosen", "p_rejected", "p_ood")
        }
    return out


def _sig(a, digits: int = 4) -> list:
    """``a`` as a (nested) list of floats rounded to ``digits`` significant digits."""
    return np.vectorize(lambda x: float(f"{x:.{digits}g}"), otypes=[float])(a).tolist()


def drift_steps(steps: int) -> list[int]:
    """The columns of the drift table: ``DRIFT_STEPS`` up to ``steps``, and ``steps``."""
    return sorted({c for c in DRIFT_STEPS if c <= steps} | {steps})


def summarize_drift(per_seed: dict, s: ToySettings) -> dict:
    """The drift of a LoRA TR run from per-seed curves {name in LORA_TRACKED: [seeds,
    steps + 1]} (4 significant digits): per_step: mean and max over seeds at every step;
    at_step: mean, max and per-seed values at ``drift_steps``; peak: each seed's largest
    drift and its step."""
    drift = per_seed["drift"]
    return {
        "lora_mode": s.lora_mode,
        "per_step": {
            k: {"mean": _sig(v.mean(axis=0)), "max": _sig(v.max(axis=0))}
            for k, v in per_seed.items()
        },
        "at_step": {
            str(c): {
                k: {
                    "mean": _sig(v[:, c].mean()),
                    "max": _sig(v[:, c].max()),
                    "per_seed": _sig(v[:, c]),
                }
                for k, v in per_seed.items()
            }
            for c in drift_steps(s.steps)
        },  # fmt: skip
        "peak": {"drift": _sig(drift.max(axis=1)), "step": drift.argmax(axis=1).tolist()},
    }


def run(s: ToySettings = ToySettings(), methods=None, *, log=print) -> dict:
    """Trains every method from the same pi_sft per seed; returns the results dict:

    {"settings": ..., "methods": {name: {"loss_type", "reference", "seconds", "per_step",
    "at_step", "at_kl", "per_seed_final"}}, "seconds": total}; see ``summarize``.
    """
    s.validate()
    methods = list(METHODS) if methods is None else list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"toy: unknown methods {unknown}; expected some of {list(METHODS)}")
    t0 = time.perf_counter()
    keys = jax.random.split(jax.random.key(0), s.seeds)
    sft_params = make_sft(s)(keys)
    results = {"settings": settings_dict(s), "methods": {}}
    for name in methods:
        t = time.perf_counter()
        if s.lora_rank:
            curves = jax.device_get(make_train(s, name)(sft_params, lora_keys(s))[0])
        else:
            curves = jax.device_get(make_train(s, name)(sft_params)[0])
        per_seed = {k: np.asarray(curves[k], np.float64) for k in TRACKED}
        loss_type, reference = METHODS[name]
        results["methods"][name] = {
            "loss_type": loss_type,
            "reference": reference,
            "seconds": time.perf_counter() - t,
            **summarize(per_seed, s),
        }
        if "drift" in curves:
            results["methods"][name]["drift"] = summarize_drift(
                {k: np.asarray(curves[k], np.float64) for k in LORA_TRACKED}, s
            )
        log(f"toy: {name}: {time.perf_counter() - t:.1f}s")
    results["seconds"] = time.perf_counter() - t0
    return results


def settings_dict(s: ToySettings) -> dict:
    """The settings as JSON-able values, with the derived ones spelled out."""
    d = dataclasses.asdict(s)
    d["pairs"] = [[list(c), list(r)] for c, r in s.pairs]
    d["kl_targets"] = list(s.kl_targets)
    d["num_sequences"] = s.vocab**s.length
    d["sft"] = (
        f"random init (seed), then {s.sft_steps} full-batch Adam({s.sft_lr}) steps of maximum "
        "likelihood on the uniform mixture of the distinct data sequences"
    )
    d["optimizer"] = f"Adam({s.lr}), constant, full batch, {s.steps} steps"
    d["references"] = {
        "vanilla": "frozen pi_sft",
        "soft": f"alpha {s.soft_alpha}, tau {s.soft_tau}",
        "hard": f"alpha 1, tau {s.hard_tau}",
    }
    if s.lora_rank:
        lo = toy_lora(s)
        d["lora"] = (
            f"rank {lo.rank}, alpha {lo.alpha} (scale {lo.scale:g}) on {list(lo.targets)} of "
            f"pi_sft (frozen); the TR reference is pi_sft + its delta, updated in mode "
            f"{s.lora_mode!r} (drives the loss); drift: the other mode's reference replayed "
            "on the same policy"
        )
    return d


def _fmt(d) -> str:
    if d["mean"] is None:
        return "not reached"
    return f"{d['mean']:.3f} ± {d['std']:.3f}"


def table(results: dict) -> str:
    """Two markdown tables (mean ± std over seeds): at matched steps and at matched KL."""
    s = results["settings"]
    cps = checkpoints(s["steps"])
    lines = [
        "| method | "
        + " | ".join(f"P_OOD @ step {c}" for c in cps)
        + f" | p(chosen) @ {cps[-1]} | p(rejected) @ {cps[-1]} | KL(pi‖pi_sft) @ {cps[-1]} |",
        "| --- |" + " --- |" * (len(cps) + 3),
    ]
    for name, e in results["methods"].items():
        a = e["at_step"]
        last = a[str(cps[-1])]
        row = [_fmt(a[str(c)]["p_ood"]) for c in cps]
        row += [_fmt(last["p_chosen"]), _fmt(last["p_rejected"]), _fmt(last["kl_to_sft"])]
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    targets = s["kl_targets"]
    lines += [
        "",
        "| method | " + " | ".join(f"P_OOD @ KL {t} | p(chosen) @ KL {t}" for t in targets) + " |",
        "| --- |" + " --- |" * (2 * len(targets)),
    ]
    for name, e in results["methods"].items():
        row = []
        for t in targets:
            a = e["at_kl"][str(t)]
            note = "" if a["p_ood"]["n"] in (0, s["seeds"]) else f" ({a['p_ood']['n']} seeds)"
            row += [_fmt(a["p_ood"]) + note, _fmt(a["p_chosen"])]
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    start = next(iter(results["methods"].values()))["per_step"]
    lines.append("")
    lines.append(
        f"pi_sft (step 0): P_OOD {start['p_ood']['mean'][0]:.3f}, p(chosen) "
        f"{start['p_chosen']['mean'][0]:.3f}, p(rejected) {start['p_rejected']['mean'][0]:.3f}; "
        f"mean ± std over {s['seeds']} seeds; KL columns: values at the first step where a "
        f"seed's KL(pi‖pi_sft) reaches the target (n seeds when not all did)."
    )
    lines += drift_table(results)
    return "\n".join(lines)


def _e(x) -> str:
    return f"{x:.2e}"


def drift_table(results: dict) -> list[str]:
    """The LoRA TR methods' drift at ``drift_steps`` (mean over seeds, max in brackets) as
    markdown lines; [] without LoRA."""
    rows = {n: e["drift"] for n, e in results["methods"].items() if "drift" in e}
    if not rows:
        return []
    s = results["settings"]
    cps = drift_steps(s["steps"])
    lines = [
        "",
        "| method | " + " | ".join(f"drift @ {c}" for c in cps) + " | peak drift (step) |",
        "| --- |" + " ---: |" * (len(cps) + 1),
    ]
    for name, e in rows.items():
        cells = [
            f"{_e(e['at_step'][str(c)]['drift']['mean'])} ({_e(e['at_step'][str(c)]['drift']['max'])})"
            for c in cps
        ]
        i = int(np.argmax(e["peak"]["drift"]))
        cells.append(f"{_e(e['peak']['drift'][i])} ({e['peak']['step'][i]})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"LoRA: {s['lora']}; drift = ||D_ref(factors) - D_ref(exact)||_F / ||D_ref(exact)||_F "
        "over the targets, mean over seeds (max); peak: the largest over seeds and steps.",
    ]
    return lines


def _at_kl_grid(per_seed_kl, per_seed_ood, grid):
    """Mean P_OOD over the seeds that reach each KL in ``grid`` (NaN where fewer than half)."""
    out = []
    for g in grid:
        vals = [value_at_kl(k, v, g) for k, v in zip(per_seed_kl, per_seed_ood)]
        d = _mean_std(vals)
        out.append(np.nan if d["n"] * 2 < len(vals) else d["mean"])
    return np.asarray(out)


def plot(results: dict, out_path: str) -> None:
    """Rows P_OOD, p(chosen), p(rejected) over steps (mean, band ± 1 std over seeds) and
    P_OOD over KL(pi ‖ pi_sft) (mean over the seeds that reach each KL, at the first step they
    do; drawn where at least half do); one column per loss, one colour per reference mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(dict.fromkeys(e["loss_type"] for e in results["methods"].values()))
    rows = [("p_ood", "P_OOD"), ("p_chosen", "p(chosen)"), ("p_rejected", "p(rejected)")]
    nrows = len(rows) + 1
    fig, axes = plt.subplots(
        nrows,
        len(families),
        figsize=(4.3 * len(families), 2.7 * nrows),
        squeeze=False,
        constrained_layout=True,
    )
    colors = {"vanilla": "tab:red", "soft": "tab:blue", "hard": "tab:green"}
    titles = {"sigmoid": "DPO", "ipo": "IPO", "kto_pair": "KTO-pair"}
    curves = {n: e["per_seed_curves"] for n, e in results["methods"].items()}
    kl_max = max(float(np.max(c["kl_to_sft"])) for c in curves.values())
    grid = np.linspace(0.0, min(kl_max, 20.0), 81)
    for name, e in results["methods"].items():
        col = families.index(e["loss_type"])
        c = colors[e["reference"]]
        steps = np.arange(len(e["per_step"]["p_ood"]["mean"]))
        for row, (key, label) in enumerate(rows):
            ax = axes[row, col]
            m = np.asarray(e["per_step"][key]["mean"])
            sd = np.asarray(e["per_step"][key]["std"])
            ax.plot(steps, m, color=c, label=name)
            ax.fill_between(
                steps, np.clip(m - sd, 0, 1), np.clip(m + sd, 0, 1), color=c, alpha=0.2, lw=0
            )
            ax.set_ylabel(label)
            ax.set_xlabel("step")
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
        ax = axes[len(rows), col]
        kl, ood = curves[name]["kl_to_sft"], curves[name]["p_ood"]
        ax.plot(grid, _at_kl_grid(kl, ood, grid), color=c, label=name)
        ax.set_xlabel("KL(pi ‖ pi_sft), first reached")
        ax.set_ylabel("P_OOD")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    for col, fam in enumerate(families):
        axes[0, col].set_title(titles.get(fam, fam))
        axes[0, col].legend(fontsize=8)
    s = results["settings"]
    fig.suptitle(
        f"Toy overoptimization: {s['num_sequences']} sequences, {len(s['pairs'])} pairs, "
        f"{s['model']} policy, {s['seeds']} seeds (mean ± std)"
    )
    fig.savefig(out_path, dpi=100)
    plt.close(fig)


def write(results: dict, workdir: str) -> tuple[str, str]:
    """Writes ``workdir/toy_results.json`` and ``workdir/toy_overoptimization.png``."""
    os.makedirs(workdir, exist_ok=True)
    json_path = os.path.join(workdir, "toy_results.json")
    png_path = os.path.join(workdir, "toy_overoptimization.png")
    with open(json_path, "w") as f:
        json.dump(results, f)
    plot(results, png_path)
    return json_path, png_path


def main(workdir: str, s: ToySettings = ToySettings(), methods=None, *, log=print) -> dict:
    """``tr-align toy``: runs, writes the JSON and the PNG into ``workdir``, prints the tables."""
    results = run(s, methods, log=log)
    json_path, png_path = write(results, workdir)
    log(table(results))
    log(f"toy: wrote {json_path} and {png_path} in {results['seconds']:.0f}s")
    return results
