"""TRL's loss options (issue 15, "Switching from TRL"): loss lists with weights, rpo_alpha,
sigmoid_norm, aot_unpaired, bco_pair (stateless and running mean), reference_free,
precompute_ref_log_probs (refused), LD-DPO's ld_alpha and WPO's use_weighting.

Expected values are written from TRL 1.16 ``DPOTrainer._compute_loss`` (and the older TRL's
``rpo_alpha`` / ``RunningMoments``) in float64 numpy, never from the code under test. The
log-prob options are checked in every batch layout (none, packed, prefix_shared) and with
chunked log-probs against a bigram model whose per-token log-probs numpy computes exactly.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tr_align import config as config_lib
from tr_align.config import ConfigError
from tr_align.data import batching, packing
from tr_align.data.tokenize import Ragged, TokenizedSet
from tr_align.training import objectives
from tr_align.training import step as step_lib

BETA = 0.5


def softplus(x):
    return np.logaddexp(0.0, np.asarray(x, np.float64))


def logsig(x):
    return -softplus(-np.asarray(x, np.float64))


# three pairs: policy / reference log-probs of chosen and rejected, completion lengths
PC, PR = np.array([-4.0, -6.0, -3.0]), np.array([-5.0, -5.0, -7.0])
RC, RR = np.array([-4.5, -5.5, -3.5]), np.array([-4.5, -5.0, -6.0])
NC, NR = np.array([2.0, 3.0, 1.0]), np.array([4.0, 2.0, 3.0])


def _lp(pc=PC, pr=PR, rc=RC, rr=RR, *, reference=True, wpo=None):
    f = lambda *a: jnp.asarray(np.stack(a, axis=1), jnp.float32)  # noqa: E731
    return objectives.Logps(
        policy=f(pc, pr),
        reference=f(rc, rr) if reference else None,
        tokens=f(NC, NR),
        wpo=None if wpo is None else jnp.asarray(wpo, jnp.float32),
    )


def _loss(objective, lp, loss_state=None):
    return {k: float(v) for k, v in objectives.finalize(objective.loss(lp, {}, loss_state)).items()}


# TRL 1.16 per-pair losses (float64), as in DPOTrainer._compute_loss
def trl_sigmoid(pc=PC, pr=PR, rc=RC, rr=RR):
    return -logsig(BETA * ((pc - rc) - (pr - rr)))


def trl_bco_pair(pc=PC, pr=PR, rc=RC, rr=RR, delta=0.0):
    return -logsig(BETA * (pc - rc) - delta) - logsig(-(BETA * (pr - rr) - delta))


def trl_sft(pc=PC):
    return -pc.sum() / NC.sum()  # -chosen_per_token_logps[chosen_mask].mean()


# --- losses on per-sequence log-probs ---------------------------------------------------------


def test_mpo_list_is_the_weighted_sum_of_the_means():
    """MPO-style loss_type=[sigmoid, bco_pair, sft], loss_weights=[0.8, 0.2, 1.0]."""
    obj = objectives.Paired(
        loss_type=("sigmoid", "bco_pair", "sft"), beta=BETA, weights=(0.8, 0.2, 1.0)
    )
    got = _loss(obj, _lp())
    sig, bco, sft = trl_sigmoid().mean(), trl_bco_pair().mean(), trl_sft()
    # by hand, pair 0: cl = 0.5, rl = -0.5 -> sigmoid softplus(-0.5), bco 2 softplus(-0.25)
    assert trl_sigmoid()[0] == pytest.approx(math.log1p(math.exp(-0.5)))
    assert trl_bco_pair()[0] == pytest.approx(2 * math.log1p(math.exp(-0.25)))
    assert sft == pytest.approx(13.0 / 6.0)
    assert got["loss"] == pytest.approx(0.8 * sig + 0.2 * bco + 1.0 * sft, rel=1e-6)
    assert got["loss/sigmoid"] == pytest.approx(sig, rel=1e-6)
    assert got["loss/bco_pair"] == pytest.approx(bco, rel=1e-6)
    assert got["loss/sft"] == pytest.approx(sft, rel=1e-6)
    # weights () = 1.0 each
    plain = objectives.Paired(loss_type=("sigmoid", "bco_pair", "sft"), beta=BETA)
    assert _loss(plain, _lp())["loss"] == pytest.approx(sig + bco + sft, rel=1e-6)


def test_rpo_alpha_adds_the_chosen_nll():
    """The older TRL's rpo_alpha: loss + rpo_alpha * NLL (TRL 1.16: the sft entry)."""
    obj = objectives.Paired(loss_type="sigmoid", beta=BETA, rpo_alpha=0.3)
    want = trl_sigmoid().mean() + 0.3 * trl_sft()
    assert _loss(obj, _lp())["loss"] == pytest.approx(want, rel=1e-6)
    as_list = objectives.Paired(loss_type=("sigmoid", "sft"), beta=BETA, weights=(1.0, 0.3))
    assert obj.components == as_list.components


def test_length_averaged_types_in_a_list_and_alone():
    """sigmoid_norm and ipo divide the scores by the completion lengths (TRL 1.16)."""
    obj = objectives.Paired(loss_type=("sigmoid_norm", "ipo", "sigmoid"), beta=BETA)
    assert not obj.average_logps  # a list asks for sums and averages per type
    avg = (PC - RC) / NC - (PR - RR) / NR
    want = -logsig(BETA * avg).mean() + ((avg - 1 / (2 * BETA)) ** 2).mean()
    want += trl_sigmoid().mean()
    assert _loss(obj, _lp())["loss"] == pytest.approx(want, rel=1e-6)
    # alone: the step hands it averaged log-probs
    alone = objectives.Paired(loss_type="sigmoid_norm", beta=BETA)
    assert alone.average_logps
    lp = _lp(PC / NC, PR / NR, RC / NC, RR / NR)
    assert _loss(alone, lp)["loss"] == pytest.approx(-logsig(BETA * avg).mean(), rel=1e-6)


def test_reference_free_uses_zero_reference_logps():
    obj = objectives.Paired(loss_type=("sigmoid", "bco_pair"), beta=BETA, reference_free=True)
    assert not obj.needs_reference
    got = _loss(obj, _lp(reference=False))
    zero = np.zeros(3)
    want = trl_sigmoid(rc=zero, rr=zero).mean() + trl_bco_pair(rc=zero, rr=zero).mean()
    assert got["loss"] == pytest.approx(want, rel=1e-6)
    assert got["rewards/chosen"] == pytest.approx(BETA * PC.mean(), rel=1e-6)
    assert "ref_logps/chosen" not in got


def test_wpo_weights_every_term_by_the_pair_weight():
    """use_weighting: per_sequence_loss *= w_c * w_r, w = exp(mean_t (logp_t - log sum p^2))."""
    wpo = np.array([[-0.2, -0.7], [-1.0, -0.1], [-0.4, -0.4]])
    w = np.exp(wpo[:, 0]) * np.exp(wpo[:, 1])
    obj = objectives.Paired(loss_type=("sigmoid", "sft"), beta=BETA, use_weighting=True)
    got = _loss(obj, _lp(wpo=wpo))
    want = (w * trl_sigmoid()).mean() + trl_sft() * w.mean()
    assert got["loss"] == pytest.approx(want, rel=1e-6)
    assert got["wpo/weight"] == pytest.approx(w.mean(), rel=1e-6)


def test_bco_pair_stateless_and_running_mean():
    stateless = objectives.Paired(loss_type="bco_pair", beta=BETA)
    assert stateless.init_loss_state() is None
    assert _loss(stateless, _lp())["loss"] == pytest.approx(trl_bco_pair().mean(), rel=1e-6)

    # the older TRL: RunningMoments (mean 0, count 1e-24), updated with each batch's mean
    # reward mean(cat(beta cl, beta rl)) before the loss uses it
    class RunningMoments:
        mean, var, count = 0.0, 1.0, 1e-24

        def update(self, x):
            delta, tot = x - self.mean, self.count + 1
            self.var = (self.var * self.count + delta**2 * self.count / tot) / tot
            self.mean += delta / tot
            self.count = tot

    obj = objectives.Paired(loss_type="bco_pair", beta=BETA, bco_running_mean=True)
    state, trl = obj.init_loss_state(), RunningMoments()
    rng = np.random.default_rng(0)
    for _ in range(3):
        pc, pr = PC + rng.normal(size=3), PR + rng.normal(size=3)
        lp = _lp(pc, pr)
        state = obj.update_loss_state(lp, state)
        trl.update(BETA * np.concatenate([pc - RC, pr - RR]).mean())
        assert float(state["bco_mean"]) == pytest.approx(trl.mean, rel=1e-5)
        want = trl_bco_pair(pc, pr, delta=trl.mean).mean()
        assert _loss(obj, lp, state)["loss"] == pytest.approx(want, rel=1e-6)
    assert float(state["bco_count"]) == 3.0


def test_aot_pair_is_an_alias_of_aot_unpaired():
    assert config_lib.loss_types("aot_pair") == ("aot_unpaired",)
    assert config_lib.loss_types(" sigmoid, bco_pair ,sft") == ("sigmoid", "bco_pair", "sft")
    assert config_lib.loss_types(["ipo", "aot_pair"]) == ("ipo", "aot_unpaired")


# --- config ---------------------------------------------------------------------------------


def test_from_config_reads_the_trl_keys(tiny_config):
    c = tiny_config(
        "vanilla",
        **{
            "loss.type": "sigmoid,bco_pair,sft",
            "loss.weights": (0.8, 0.2, 1.0),
            "loss.ld_alpha": 0.5,
            "loss.use_weighting": True,
            "loss.bco_running_mean": True,
        },
    )
    config_lib.validate(c, 8)
    obj = objectives.from_config(c.loss)
    assert obj.components == (("sigmoid", 0.8), ("bco_pair", 0.2), ("sft", 1.0))
    assert (obj.ld_alpha, obj.use_weighting, obj.bco_running_mean) == (0.5, True, True)
    assert obj.init_loss_state() is not None
    # a recipe without the new keys: TRL 1.16's defaults
    block = ml_collections.ConfigDict(
        dict(type="aot_pair", beta=0.1, label_smoothing=0.0, discopop_tau=0.05)
    )
    obj = objectives.from_config(block)
    assert obj.components == (("aot_unpaired", 1.0),) and obj.needs_reference
    assert obj.init_loss_state() is None and obj.ld_alpha == 1.0


@pytest.mark.parametrize(
    "overrides,pattern",
    [
        ({"loss.type": "sigmoid,dpo"}, r"loss\.type='sigmoid,dpo': has 'dpo'; each entry must"),
        ({"loss.type": "sigmoid,kto"}, r"loss\.type='sigmoid,kto': kto .*cannot be combined"),
        (
            {"loss.type": "sigmoid,sft", "loss.weights": (1.0,)},
            r"loss\.weights=\(1\.0,\): must be \(\) or 2 number\(s\) >= 0",
        ),
        ({"loss.weights": (-1.0,)}, r"loss\.weights=\(-1\.0,\): must be \(\) or 1 number"),
        ({"loss.rpo_alpha": -0.1}, r"loss\.rpo_alpha=-0\.1: must be a number >= 0"),
        ({"loss.type": "kto", "loss.rpo_alpha": 0.5}, r"loss\.rpo_alpha=0\.5: adds the chosen"),
        ({"loss.ld_alpha": 1.5}, r"loss\.ld_alpha=1\.5: must be in \[0, 1\]"),
        ({"loss.type": "sft", "loss.ld_alpha": 0.5}, r"loss\.ld_alpha=0\.5: .*not paired"),
        ({"loss.use_weighting": 1}, r"loss\.use_weighting=1: must be True or False"),
        (
            {"loss.type": "sigmoid,aot_pair", "loss.use_weighting": True},
            r"loss\.use_weighting=True: not for aot_unpaired: .*sort the batch",
        ),
        (
            {"loss.reference_free": True},
            r"loss\.reference_free=True: leaves no reference for the trust region",
        ),
        ({"loss.bco_running_mean": "yes"}, r"loss\.bco_running_mean='yes': must be True or"),
        (
            {"loss.precompute_ref_log_probs": True},
            r"loss\.precompute_ref_log_probs=True: cannot be used with a trust region: the "
            r"reference changes every trust_region\.tau steps",
        ),
        (
            {"loss.precompute_ref_log_probs": True, "trust_region.enabled": False},
            r"loss\.precompute_ref_log_probs=True: is not supported: the frozen reference's "
            r"forward runs inside the train step",
        ),
    ],
)
def test_bad_trl_options_are_one_line_errors(tiny_config, overrides, pattern):
    c = tiny_config()
    for key, value in overrides.items():  # any type (a config.json is not type-checked)
        block, name = key.split(".")
        del c[block][name]
        c[block][name] = value
    with pytest.raises(ConfigError, match=pattern) as e:
        config_lib.validate(c, 8)
    assert "\n" not in str(e.value)


def test_truncation_mode_is_checked(tiny_config, tmp_path):
    c = tiny_config(
        **{
            "data.source": "files",
            "data.path": str(tmp_path / "x.jsonl"),
            "data.max_length": 64,
            "data.max_prompt_length": 32,
            "data.truncation_mode": "keep_middle",
        }
    )
    with pytest.raises(ConfigError, match=r"data\.truncation_mode='keep_middle': must be one of"):
        config_lib.validate(c, 8)


def test_reference_free_and_frozen_reference_validate(tiny_config):
    c = tiny_config("vanilla", **{"loss.reference_free": True, "loss.type": "sigmoid,sft"})
    config_lib.validate(c, 8)
    assert not objectives.from_config(c.loss).needs_reference


# --- LD-DPO and WPO in every batch layout ---------------------------------------------------

V = 8
PROMPTS = [[1, 2, 3], [2, 2], [7], [5, 6, 1, 2]]
CHOSEN = [[4, 5, 6, 7], [3], [1, 2], [6, 6, 3]]
REJECTED = [[5, 6], [6, 5, 4], [3, 4], [7, 1, 1, 2, 3]]


def _bigram():
    """logits of the next token depend on the current token only: every layout (padded,
    packed, prefix-shared) gives a token the same logits, which numpy computes exactly."""
    table = np.random.default_rng(0).normal(scale=2.0, size=(V, V)).astype(np.float32)

    def apply_fn(params, ids, split_head=False, **_):
        if split_head:
            return jax.nn.one_hot(ids, V, dtype=jnp.float32), lambda h: h @ params
        return params[ids]

    return table, apply_fn


def _np_expected(table, ld_alpha):
    """(LD-weighted sums, plain sums, WPO terms), each [E, 2], float64: TRL's shared/tail split
    (``comp_pos <= min(len_c, len_r)``) and ``log_sum_sq_probs``."""
    t = table.astype(np.float64)
    logp = t - np.log(np.exp(t).sum(-1, keepdims=True))
    lssp = np.log((np.exp(logp) ** 2).sum(-1))
    ld, raw, wpo = (np.zeros((len(PROMPTS), 2)) for _ in range(3))
    for e, (p, c, r) in enumerate(zip(PROMPTS, CHOSEN, REJECTED)):
        shared = min(len(c), len(r))
        for s, comp in enumerate((c, r)):
            seq = p + comp
            for place, j in enumerate(range(len(p), len(seq)), start=1):
                lp = logp[seq[j - 1], seq[j]]
                raw[e, s] += lp
                ld[e, s] += lp if place <= shared else ld_alpha * lp
                wpo[e, s] += (lp - lssp[seq[j - 1]]) / len(comp)
    return ld, raw, wpo


def _batches():
    data = TokenizedSet(
        prompt=Ragged.from_lists(PROMPTS),
        chosen=Ragged.from_lists(CHOSEN),
        rejected=Ragged.from_lists(REJECTED),
    )
    idx = np.arange(len(PROMPTS))
    out = {"none": batching.make_batch(data, idx, buckets=(16,), pad_id=0)}
    for layout in ("packed", "prefix_shared"):
        out[layout] = packing.pack_batch(
            data, idx, layout=layout, streams=("chosen", "rejected"), buckets=(16, 32)
        )
    return {k: jax.tree.map(jnp.asarray, v) for k, v in out.items()}


@pytest.mark.slow
@pytest.mark.parametrize("chunk_size", [0, 3])
def test_ld_alpha_and_wpo_in_every_layout(chunk_size):
    table, apply_fn = _bigram()
    ld_alpha = 0.3
    want_ld, want_raw, want_wpo = _np_expected(table, ld_alpha)
    # pair 1 by hand: chosen [3] (1 token), rejected [6, 5, 4]: shared 1, the rejected tail
    # 6 -> 5 -> 4 is weighted 0.3
    assert not np.allclose(want_ld, want_raw)
    fn = jax.jit(
        lambda params, batch, **kw: step_lib.sequence_logps(
            apply_fn, params, batch, ("chosen", "rejected"), chunk_size=chunk_size, **kw
        ),
        static_argnames=("average", "ld_alpha", "wpo"),
    )
    for layout, batch in _batches().items():
        logps, tokens, extras = fn(jnp.asarray(table), batch, ld_alpha=ld_alpha, wpo=True)
        np.testing.assert_allclose(logps, want_ld, rtol=1e-5, err_msg=layout)
        np.testing.assert_allclose(extras["raw"], want_raw, rtol=1e-5, err_msg=layout)
        np.testing.assert_allclose(extras["wpo"], want_wpo, rtol=1e-5, err_msg=layout)
        np.testing.assert_array_equal(tokens, [[len(c), len(r)] for c, r in zip(CHOSEN, REJECTED)])
        # averaged (ipo / sigmoid_norm alone): the LD sums over the full lengths, as TRL
        avg, _, _ = fn(jnp.asarray(table), batch, average=True, ld_alpha=ld_alpha)
        np.testing.assert_allclose(avg, want_ld / np.asarray(tokens), rtol=1e-5, err_msg=layout)


def test_ld_alpha_one_is_the_plain_sum_and_zero_masks_the_tail():
    table, apply_fn = _bigram()
    batch = _batches()["prefix_shared"]
    fn = jax.jit(
        lambda params, batch, **kw: step_lib.sequence_logps(
            apply_fn, params, batch, ("chosen", "rejected"), **kw
        ),
        static_argnames=("ld_alpha",),
    )
    _, raw, _ = _np_expected(table, 1.0)
    plain, _, extras = fn(jnp.asarray(table), batch)
    np.testing.assert_allclose(plain, raw, rtol=1e-5)
    assert extras == {}
    zero, _, _ = fn(jnp.asarray(table), batch, ld_alpha=0.0)
    np.testing.assert_allclose(zero, _np_expected(table, 0.0)[0], rtol=1e-5, atol=1e-6)


# --- end to end: the train step in every layout, resume -------------------------------------

TRL_MIX = {
    "optimizer.learning_rate": 3e-3,
    "loss.type": "sigmoid_norm,bco_pair,sft",
    "loss.weights": (1.0, 0.5, 0.2),
    "loss.rpo_alpha": 0.1,
    "loss.ld_alpha": 0.6,
    "loss.use_weighting": True,
    "loss.bco_running_mean": True,
}


@pytest.mark.slow
def test_trl_options_train_the_same_in_every_layout(tiny_config):
    """A loss list with weights, rpo_alpha, LD-DPO, WPO and the running bco mean: prefix-shared
    batches with chunked log-probs give the padded step's loss, metrics, parameters and
    running mean (``TrainState.loss_state``); packed: the next test."""
    from test_packed_step import _assert_same, _run

    devices = jax.devices()[:1]
    # a frozen reference: step-2 rewards are a whole step's change, far from ties (chunked
    # log-probs differ in float32 rounding)
    want = _run(tiny_config("vanilla", **TRL_MIX), "none", 2, devices)
    assert float(want[0].loss_state["bco_count"]) == 2.0
    assert want[1][1]["wpo/weight"] < 1.0 and "loss/sigmoid_norm" in want[1][1]
    chunked = tiny_config("vanilla", **TRL_MIX, **{"train.logps_chunk_size": 4})
    _assert_same(_run(chunked, "prefix_shared", 2, devices), want)


@pytest.mark.slow
def test_trl_options_with_grad_accumulation_and_reference_free(tiny_config):
    """K = 2 microbatches on 2 devices, a soft trust region: the running mean is updated once
    per microbatch (count 2 a step), the same in the packed layout; reference_free runs hold
    no reference."""
    from test_packed_step import _assert_same, _run

    devices = jax.devices()[:2]
    config = tiny_config(**TRL_MIX, **{"train.grad_accum_steps": 2})
    want = _run(config, "none", 2, devices)
    assert float(want[0].loss_state["bco_count"]) == 4.0
    _assert_same(_run(config, "packed", 2, devices), want)

    free = tiny_config("vanilla", **{"loss.type": "sigmoid,sft", "loss.reference_free": True})
    state, metrics, evals, _ = _run(free, "prefix_shared", 1, devices)
    assert state.ref_params is None and state.loss_state is None
    assert "ref_logps/chosen" not in metrics[0] and "ref/updates" not in metrics[0]
    assert np.isfinite(metrics[0]["loss"]) and np.isfinite(evals["eval/loss"])


@pytest.mark.slow
def test_bco_running_mean_resumes_exactly(tiny_config, tmp_path):
    """The running mean is part of the checkpointed state: stop at step 2 and resume gives the
    straight run's losses and running means."""
    import json

    from tr_align.training import loop

    c = tiny_config(
        "vanilla",
        **{
            "loss.type": "bco_pair",
            "loss.bco_running_mean": True,
            "train.steps": 4,
            "checkpoint.every_steps": 2,
            "train.eval_every_steps": 4,
        },
    )
    devices = jax.devices()[:1]
    loop.run(c, str(tmp_path / "a"), progress=False, devices=devices)
    loop.run(c, str(tmp_path / "b"), progress=False, devices=devices, stop_at_step=2)
    loop.run(c, str(tmp_path / "b"), progress=False, devices=devices)
    read = lambda d: [json.loads(x) for x in open(d / "metrics.jsonl")]  # noqa: E731
    a = [(r["step"], r["loss"], r["bco/running_mean"]) for r in read(tmp_path / "a") if "loss" in r]
    b = [(r["step"], r["loss"], r["bco/running_mean"]) for r in read(tmp_path / "b") if "loss" in r]
    assert [s for s, _, _ in b] == [1, 2, 3, 4]
    assert a == b
    assert len({m for _, _, m in a}) >= 3  # the mean moves (step 1 is at the reference: 0)


# TRL 1.16 itself: ``DPOTrainer._compute_loss`` run (torch, float64) on this file's bigram
# policy and a perturbed bigram reference, over the four pairs above (beta 0.5), by a script
# that gives the trainer a stand-in ``self``; the values are hard-coded here. (TRL 1.16 fails
# on use_weighting with an ``sft`` entry: an in-place multiply of an expanded tensor.)
TRL_COMPUTED = [
    ({"loss_type": ("sigmoid", "bco_pair", "sft"), "weights": (0.8, 0.2, 1.0)}, 4.225907426148634),
    (
        {"loss_type": ("sigmoid", "bco_pair"), "weights": (0.8, 0.2), "ld_alpha": 0.3,
         "use_weighting": True},
        0.017286574418349097,
    ),
    (
        {"loss_type": ("sigmoid", "bco_pair", "sft"), "weights": (0.8, 0.2, 1.0),
         "ld_alpha": 0.3},
        4.221763356381084,
    ),
    ({"loss_type": ("sigmoid_norm", "ipo"), "ld_alpha": 0.5}, 1.0936862791414543),
    ({"loss_type": ("aot_unpaired", "apo_zero")}, 1.388470892331478),
]  # fmt: skip


@pytest.mark.parametrize("layout", ["none", "prefix_shared"])
def test_losses_match_values_computed_by_trl(layout):
    table, apply_fn = _bigram()
    ref_table = table + np.random.default_rng(1).normal(scale=0.5, size=(V, V))
    ref_table = ref_table.astype(np.float32)
    batch = _batches()[layout]
    for kw, want in TRL_COMPUTED:
        obj = objectives.Paired(beta=BETA, **kw)

        def logps(params, wpo=False, obj=obj):
            return step_lib.sequence_logps(
                apply_fn, jnp.asarray(params), batch, ("chosen", "rejected"),
                average=obj.average_logps, ld_alpha=obj.ld_alpha, wpo=wpo,
            )  # fmt: skip

        pol, tokens, extras = logps(table, obj.use_weighting)
        lp = objectives.Logps(pol, logps(ref_table)[0], tokens, **extras)
        got = float(objectives.finalize(obj.loss(lp, {}))["loss"])
        assert got == pytest.approx(want, rel=2e-5), kw
