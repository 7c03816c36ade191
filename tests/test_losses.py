"""Tests for tr_align.losses against independent float64 numpy references.

The references below are written from the published formulas (DPO/cDPO, rDPO,
EXO, SLiC hinge, IPO, BCO, SPPO, NCA, AOT, APO, DiscoPOP, KTO) and TRL's
``dpo_loss`` / ``kto_loss`` definitions, never by calling the code under test.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tr_align import losses
from tr_align.losses import (
    LOSS_TYPES,
    kto_loss,
    preference_loss,
    sequence_logps,
    token_logps,
    uses_average_logps,
)

RTOL = 1e-5
ATOL = 1e-6


# --------------------------------------------------------------------------
# float64 numpy references
# --------------------------------------------------------------------------
def np_logsig(x):
    """log(sigmoid(x)) = -log(1 + exp(-x)), evaluated without overflow."""
    x = np.asarray(x, np.float64)
    return np.minimum(x, 0.0) - np.log1p(np.exp(-np.abs(x)))


def np_sig(x):
    return np.exp(np_logsig(x))


def np_smoothed(z, ls):
    return -(1.0 - ls) * np_logsig(z) - ls * np_logsig(-z)


def ref_preference_loss(loss_type, pc, pr, rc, rr, beta, ls=0.0, tau=0.05, bco_delta=None):
    pc, pr, rc, rr = (np.asarray(a, np.float64) for a in (pc, pr, rc, rr))
    cl = pc - rc  # chosen log-ratio
    rl = pr - rr  # rejected log-ratio
    logits = (pc - pr) - (rc - rr)
    z = beta * logits
    if loss_type == "sigmoid":
        return np_smoothed(z, ls)
    if loss_type == "robust":
        clean = (1.0 - ls) * -np_logsig(z)  # loss on the observed label
        flipped = ls * -np_logsig(-z)  # loss on the flipped label
        return (clean - flipped) / (1.0 - 2.0 * ls)
    if loss_type == "exo_pair":
        eps = ls if ls > 0 else 1e-3
        # KL(q || p) with q = (sigmoid(z), sigmoid(-z)) and p = (1 - eps, eps)
        qw, ql = np_sig(z), np_sig(-z)
        return qw * (np_logsig(z) - np.log(1.0 - eps)) + ql * (np_logsig(-z) - np.log(eps))
    if loss_type == "hinge":
        return np.maximum(0.0, 1.0 - z)
    if loss_type == "ipo":
        return (logits - 1.0 / (2.0 * beta)) ** 2
    if loss_type == "bco_pair":  # TRL 1.16: no shift unless a (running-mean) delta is given
        r_c, r_r = beta * cl, beta * rl
        delta = 0.0 if bco_delta is None else bco_delta
        return -np_logsig(r_c - delta) - np_logsig(delta - r_r)
    if loss_type == "sppo_hard":
        return (cl - 1.0 / (2.0 * beta)) ** 2 + (rl + 1.0 / (2.0 * beta)) ** 2
    if loss_type == "nca_pair":
        return -np_logsig(beta * cl) - 0.5 * np_logsig(-beta * cl) - 0.5 * np_logsig(-beta * rl)
    if loss_type in ("aot_unpaired", "aot_pair"):
        return np_smoothed(beta * (np.sort(cl) - np.sort(rl)), ls)
    if loss_type == "sigmoid_norm":  # TRL 1.16: -logsigmoid(beta * delta), no smoothing; the
        return -np_logsig(z)  # caller feeds length-averaged logps
    if loss_type == "aot":
        return np_smoothed(beta * (np.sort(pc - pr) - np.sort(rc - rr)), ls)
    if loss_type == "apo_zero":
        return (1.0 - np_sig(beta * cl)) + np_sig(beta * rl)
    if loss_type == "apo_down":
        return np_sig(beta * cl) + (1.0 - np_sig(beta * (cl - rl)))
    if loss_type == "discopop":
        m = np_sig(z / tau)
        return (1.0 - m) * -np_logsig(z) + m * np.exp(-z)
    if loss_type == "kto_pair":
        chosen_kl = max(np.mean(cl), 0.0)
        rejected_kl = max(np.mean(rl), 0.0)
        return np.concatenate(
            [1.0 - np_sig(beta * (cl - rejected_kl)), 1.0 - np_sig(beta * (chosen_kl - rl))]
        )
    raise KeyError(loss_type)


def ref_kto(pc, pr, pkl, rc, rr, rkl, beta, wd=1.0, wu=1.0):
    pc, pr, rc, rr = (np.asarray(a, np.float64) for a in (pc, pr, rc, rr))
    kl = (
        0.0
        if pkl is None
        else max(np.mean(np.asarray(pkl, np.float64) - np.asarray(rkl, np.float64)), 0.0)
    )
    chosen = 1.0 - np_sig(beta * ((pc - rc) - kl))
    rejected = 1.0 - np_sig(beta * (kl - (pr - rr)))
    return np.concatenate([wd * chosen, wu * rejected]), kl


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


# --------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------
def make_batch(kind, b=16, seed=0):
    """Four float32 [B] arrays (pc, pr, rc, rr) of log-probabilities."""
    rng = np.random.default_rng(seed)
    if kind == "small":
        x = rng.normal(scale=2.0, size=(4, b))
    elif kind == "seq":  # realistic summed logps: negative, tens of nats
        x = -rng.uniform(0.0, 50.0, size=(4, b))
    elif kind == "large":  # +-50, so logits reach ~+-200
        x = rng.uniform(-50.0, 50.0, size=(4, b))
    elif kind == "near_ref":  # policy close to reference
        base = -rng.uniform(5.0, 40.0, size=(2, b))
        x = np.concatenate([base + rng.normal(scale=0.3, size=(2, b)), base])
    else:
        raise KeyError(kind)
    return tuple(np.asarray(a, np.float32) for a in x)


BATCH_KINDS = ("small", "seq", "large", "near_ref")


# --------------------------------------------------------------------------
# values vs numpy references
# --------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("ls", [0.0, 0.1])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_matches_numpy_reference(loss_type, ls, beta):
    for i, kind in enumerate(BATCH_KINDS):
        pc, pr, rc, rr = make_batch(kind, seed=i)
        losses, cr, rr_ = preference_loss(
            loss_type, pc, pr, rc, rr, beta=beta, label_smoothing=ls, discopop_tau=0.05
        )
        expected = ref_preference_loss(loss_type, pc, pr, rc, rr, beta, ls, 0.05)
        b = pc.shape[0]
        assert losses.shape == ((2 * b,) if loss_type == "kto_pair" else (b,))
        assert losses.dtype == jnp.float32
        assert np.all(np.isfinite(np.asarray(losses)))
        np.testing.assert_allclose(np.asarray(losses), expected, rtol=RTOL, atol=ATOL, err_msg=kind)
        # batch loss
        np.testing.assert_allclose(float(losses.mean()), expected.mean(), rtol=RTOL, atol=ATOL)
        # rewards
        np.testing.assert_allclose(
            np.asarray(cr), beta * (pc.astype(np.float64) - rc), rtol=RTOL, atol=ATOL
        )
        np.testing.assert_allclose(
            np.asarray(rr_), beta * (pr.astype(np.float64) - rr), rtol=RTOL, atol=ATOL
        )


def test_discopop_other_tau():
    pc, pr, rc, rr = make_batch("small", seed=3)
    for tau in (0.5, 2.0):
        got = preference_loss("discopop", pc, pr, rc, rr, beta=0.5, discopop_tau=tau)[0]
        np.testing.assert_allclose(
            np.asarray(got),
            ref_preference_loss("discopop", pc, pr, rc, rr, 0.5, tau=tau),
            rtol=RTOL,
            atol=ATOL,
        )


def test_discopop_no_inf_times_zero():
    # beta * logits = -200: exp(200) overflows float32, but m = sigmoid(-4000) = 0.
    pc = np.array([-100.0], np.float32)
    zeros = np.zeros(1, np.float32)
    got = preference_loss("discopop", pc, zeros, zeros, zeros, beta=2.0)[0]
    np.testing.assert_allclose(np.asarray(got), [200.0], rtol=1e-6)


def test_bco_pair_explicit_delta():
    pc, pr, rc, rr = make_batch("small", seed=4)
    got = preference_loss("bco_pair", pc, pr, rc, rr, beta=0.2, bco_delta=0.37)[0]
    exp = ref_preference_loss("bco_pair", pc, pr, rc, rr, 0.2, bco_delta=0.37)
    np.testing.assert_allclose(np.asarray(got), exp, rtol=RTOL, atol=ATOL)


def test_bf16_inputs_are_upcast():
    pc, pr, rc, rr = make_batch("small", seed=5)
    args16 = [jnp.asarray(a, jnp.bfloat16) for a in (pc, pr, rc, rr)]
    losses, cr, rr_ = preference_loss("sigmoid", *args16, beta=0.1)
    assert losses.dtype == cr.dtype == rr_.dtype == jnp.float32
    exact = [np.asarray(a.astype(jnp.float32)) for a in args16]
    np.testing.assert_allclose(
        np.asarray(losses), ref_preference_loss("sigmoid", *exact, 0.1), rtol=RTOL, atol=ATOL
    )


# --------------------------------------------------------------------------
# hand-computed values
# --------------------------------------------------------------------------
def _z(n=3):
    return np.zeros(n, np.float32)


@pytest.mark.parametrize("ls", [0.0, 0.1, 0.3])
def test_dpo_at_zero_is_log2(ls):
    losses, cr, rr = preference_loss(
        "sigmoid", _z(), _z(), _z(), _z(), beta=0.1, label_smoothing=ls
    )
    np.testing.assert_allclose(np.asarray(losses), [math.log(2.0)] * 3, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(cr), 0.0)


def test_hand_values():
    one = np.ones(1, np.float32)
    z1 = _z(1)
    # DPO, beta=1, logits=1: -log sigmoid(1) = log(1 + e^-1)
    got = preference_loss("sigmoid", one, z1, z1, z1, beta=1.0)[0]
    np.testing.assert_allclose(np.asarray(got), [math.log1p(math.exp(-1.0))], rtol=1e-6)
    # cDPO, ls=0.25, logits=1: 0.75*log(1+e^-1) + 0.25*log(1+e)
    got = preference_loss("sigmoid", one, z1, z1, z1, beta=1.0, label_smoothing=0.25)[0]
    np.testing.assert_allclose(
        np.asarray(got), [0.75 * math.log1p(math.exp(-1.0)) + 0.25 * math.log1p(math.e)], rtol=1e-6
    )
    # rDPO, ls=0.25, logits=1: (0.75*log(1+e^-1) - 0.25*log(1+e)) / 0.5
    got = preference_loss("robust", one, z1, z1, z1, beta=1.0, label_smoothing=0.25)[0]
    np.testing.assert_allclose(
        np.asarray(got),
        [(0.75 * math.log1p(math.exp(-1.0)) - 0.25 * math.log1p(math.e)) / 0.5],
        rtol=1e-6,
    )
    # IPO with logits 0: (1 / (2 beta))^2; with logits = 1/(2 beta): 0
    got = preference_loss("ipo", _z(), _z(), _z(), _z(), beta=0.1)[0]
    np.testing.assert_allclose(np.asarray(got), [25.0] * 3, rtol=1e-6)
    five = np.full(1, 5.0, np.float32)
    got = preference_loss("ipo", five, z1, z1, z1, beta=0.1)[0]
    np.testing.assert_allclose(np.asarray(got), [0.0], atol=1e-10)
    # hinge: beta*logits = 1 -> 0, 0 -> 1, -1 -> 2
    pc = np.array([10.0, 0.0, -10.0], np.float32)
    got = preference_loss("hinge", pc, _z(), _z(), _z(), beta=0.1)[0]
    np.testing.assert_allclose(np.asarray(got), [0.0, 1.0, 2.0], rtol=1e-6, atol=1e-7)
    # at all-zero logps
    at0 = lambda lt, **kw: np.asarray(preference_loss(lt, _z(1), _z(1), _z(1), _z(1), **kw)[0])
    np.testing.assert_allclose(at0("sppo_hard", beta=0.1), [2 * 25.0], rtol=1e-6)
    np.testing.assert_allclose(at0("nca_pair", beta=0.1), [2 * math.log(2.0)], rtol=1e-6)
    np.testing.assert_allclose(at0("apo_zero", beta=0.1), [1.0], rtol=1e-6)
    np.testing.assert_allclose(at0("apo_down", beta=0.1), [1.0], rtol=1e-6)
    np.testing.assert_allclose(at0("bco_pair", beta=0.1), [2 * math.log(2.0)], rtol=1e-6)
    np.testing.assert_allclose(at0("discopop", beta=0.1), [0.5 * math.log(2.0) + 0.5], rtol=1e-6)
    exo = 0.5 * (math.log(0.5) - math.log(0.999)) + 0.5 * (math.log(0.5) - math.log(1e-3))
    np.testing.assert_allclose(at0("exo_pair", beta=0.1), [exo], rtol=1e-6)


def test_kto_pair_hand_case():
    # beta = 1; chosen log-ratios [1, 3] (mean 2), rejected log-ratios [-2, 0] (mean -1 -> clamped to 0)
    pc = np.array([1.0, 3.0], np.float32)
    pr = np.array([-2.0, 0.0], np.float32)
    z = _z(2)
    losses, cr, rr = preference_loss("kto_pair", pc, pr, z, z, beta=1.0)
    s = lambda x: 1.0 / (1.0 + math.exp(-x))
    expected = [1 - s(1 - 0), 1 - s(3 - 0), 1 - s(2 - (-2)), 1 - s(2 - 0)]
    np.testing.assert_allclose(np.asarray(losses), expected, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(cr), [1.0, 3.0])
    np.testing.assert_allclose(np.asarray(rr), [-2.0, 0.0])
    # all zero -> every entry 1 - sigmoid(0) = 0.5, shape [2B]
    losses = preference_loss("kto_pair", _z(), _z(), _z(), _z(), beta=0.1)[0]
    np.testing.assert_allclose(np.asarray(losses), [0.5] * 6, rtol=1e-6)


# --------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------
def _mean_loss(loss_type, **kw):
    def f(pc, pr, rc, rr):
        return preference_loss(loss_type, pc, pr, rc, rr, **kw)[0].mean()

    return f


@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_sigmoid_gradient_closed_form(ls):
    beta = 0.3
    pc, pr, rc, rr = make_batch("small", b=8, seed=7)
    grads = jax.grad(_mean_loss("sigmoid", beta=beta, label_smoothing=ls), argnums=(0, 1, 2, 3))(
        pc, pr, rc, rr
    )
    b = pc.shape[0]
    z = beta * ((pc.astype(np.float64) - pr) - (rc.astype(np.float64) - rr))
    # dL_i/dz_i = -(1 - ls) sigmoid(-z) + ls sigmoid(z); dz/dpc = beta, dz/dpr = -beta, dz/drc = -beta, dz/drr = beta
    d_pc = beta * (-(1.0 - ls) * np_sig(-z) + ls * np_sig(z)) / b
    for g, e in zip(grads, (d_pc, -d_pc, -d_pc, d_pc)):
        np.testing.assert_allclose(np.asarray(g), e, rtol=1e-5, atol=1e-8)


def _fd_grad(f, args, h=1e-5):
    """Central finite differences of a float64 numpy scalar function."""
    args = [np.asarray(a, np.float64) for a in args]
    out = []
    for k, a in enumerate(args):
        g = np.zeros_like(a)
        for i in range(a.size):
            up = [x.copy() for x in args]
            dn = [x.copy() for x in args]
            up[k][i] += h
            dn[k][i] -= h
            g[i] = (f(*up) - f(*dn)) / (2 * h)
        out.append(g)
    return out


@pytest.mark.parametrize(
    "loss_type,kw",
    [
        ("nca_pair", {}),
        ("discopop", {"discopop_tau": 0.5}),
        ("exo_pair", {"label_smoothing": 0.1}),
        ("robust", {"label_smoothing": 0.2}),
        ("kto_pair", {}),
        ("apo_down", {}),
        ("aot", {"label_smoothing": 0.1}),
        ("bco_pair", {"bco_delta": 0.25}),
    ],
)
def test_gradients_vs_finite_differences(loss_type, kw):
    beta = 0.7
    pc, pr, rc, rr = make_batch("small", b=6, seed=11)
    if loss_type == "kto_pair":  # keep both batch-mean KL terms away from the clamp kink
        pc = pc + 1.0
        pr = pr - 1.0
    got = jax.grad(_mean_loss(loss_type, beta=beta, **kw), argnums=(0, 1, 2, 3))(pc, pr, rc, rr)
    ref_kw = {"ls": kw.get("label_smoothing", 0.0), "tau": kw.get("discopop_tau", 0.05)}
    if "bco_delta" in kw:
        ref_kw["bco_delta"] = kw["bco_delta"]
    f = lambda *a: ref_preference_loss(loss_type, *a, beta, **ref_kw).mean()
    for g, e in zip(got, _fd_grad(f, (pc, pr, rc, rr))):
        np.testing.assert_allclose(np.asarray(g), e, rtol=1e-3, atol=1e-6)


def test_bco_traced_delta_is_stop_gradient():
    """A delta computed from the log-probs (the running mean) gets no gradient."""
    beta = 0.5
    pc, pr, rc, rr = make_batch("small", b=6, seed=12)
    delta = beta * np.mean(np.concatenate([pc - rc, pr - rr]).astype(np.float64))

    def traced(pc, pr, rc, rr):
        d = beta * jnp.mean(jnp.concatenate([pc - rc, pr - rr]))
        return preference_loss("bco_pair", pc, pr, rc, rr, beta=beta, bco_delta=d)[0].mean()

    got = jax.grad(traced, argnums=(0, 1, 2, 3))(pc, pr, rc, rr)
    f = lambda *a: ref_preference_loss("bco_pair", *a, beta, bco_delta=delta).mean()
    for g, e in zip(got, _fd_grad(f, (pc, pr, rc, rr))):
        np.testing.assert_allclose(np.asarray(g), e, rtol=1e-3, atol=1e-6)


def test_trl_1_16_hand_values():
    """Hand-derived values of TRL 1.16 ``_compute_loss`` (bco_pair without shift,
    sigmoid_norm on length-averaged logps, aot_unpaired = the old aot_pair)."""
    beta = 0.5
    # one pair: cl = pc - rc = 1, rl = pr - rr = -1
    pc, pr, rc, rr = (np.array([x], np.float32) for x in (-2.0, -5.0, -3.0, -4.0))
    # bco_pair with rl = -0.5: softplus(-beta cl) + softplus(beta rl) (the batch-mean shift
    # 0.125 of the old form would give softplus(-0.375) + softplus(-0.375))
    bco = math.log1p(math.exp(-0.5)) + math.log1p(math.exp(-0.25))
    got = preference_loss("bco_pair", pc, pr + 0.5, rc, rr, beta=beta)[0]
    np.testing.assert_allclose(np.asarray(got), [bco], rtol=1e-6)
    # sigmoid_norm on averaged logps: |y_c| = 2, |y_r| = 4 -> z = 0.5 * (1/2 - (-1)/4) = 0.375
    avg = [np.array([v / n], np.float32) for v, n in ((-2.0, 2), (-5.0, 4), (-3.0, 2), (-4.0, 4))]
    got = preference_loss("sigmoid_norm", *avg, beta=beta, label_smoothing=0.3)[0]
    np.testing.assert_allclose(np.asarray(got), [math.log1p(math.exp(-0.375))], rtol=1e-6)
    assert uses_average_logps("sigmoid_norm") and uses_average_logps("ipo")
    # aot_unpaired sorts the log-ratios separately: cl = (3, -1), rl = (0, 2) -> d = (-1, 1)
    two = [np.array(v, np.float32) for v in ((3.0, -1.0), (0.0, 2.0), (0.0, 0.0), (0.0, 0.0))]
    want = [math.log1p(math.exp(0.5)), math.log1p(math.exp(-0.5))]
    for name in ("aot_unpaired", "aot_pair"):
        got = preference_loss(name, *two, beta=beta)[0]
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


# Rewards come from one shared code path; check it through a few branches.
@pytest.mark.parametrize("loss_type", ["sigmoid", "bco_pair", "nca_pair", "aot", "kto_pair"])
def test_rewards_have_zero_gradient(loss_type):
    pc, pr, rc, rr = make_batch("small", b=5, seed=13)

    def rewards_sum(pc, pr, rc, rr):
        _, cr, rr_ = preference_loss(loss_type, pc, pr, rc, rr, beta=0.5)
        return cr.sum() + rr_.sum()

    grads = jax.grad(rewards_sum, argnums=(0, 1, 2, 3))(pc, pr, rc, rr)
    for g in grads:
        np.testing.assert_array_equal(np.asarray(g), 0.0)
    # ... while the loss itself does depend on the policy logps
    g_loss = jax.grad(_mean_loss(loss_type, beta=0.5))(pc, pr, rc, rr)
    assert np.any(np.asarray(g_loss) != 0.0)


# --------------------------------------------------------------------------
# jit
# --------------------------------------------------------------------------
def test_jit_static_config_matches_eager():
    pc, pr, rc, rr = make_batch("seq", b=8, seed=21)
    kw = dict(beta=0.1, label_smoothing=0.1)
    # every loss type, config static via functools.partial, one compiled program
    fns = {lt: functools.partial(preference_loss, lt, **kw) for lt in LOSS_TYPES}
    jitted = jax.jit(lambda *a: {lt: f(*a) for lt, f in fns.items()})(pc, pr, rc, rr)
    for lt in LOSS_TYPES:
        eager = preference_loss(lt, pc, pr, rc, rr, **kw)
        for a, b in zip(jitted[lt], eager):
            np.testing.assert_allclose(
                np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7, err_msg=lt
            )


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_jit_traced_hyperparameters_match_eager(loss_type):
    pc, pr, rc, rr = make_batch("seq", b=8, seed=21)
    eager = preference_loss(loss_type, pc, pr, rc, rr, beta=0.1, label_smoothing=0.1)
    # loss_type static, numeric hyper-parameters traced
    traced = jax.jit(preference_loss, static_argnames="loss_type")(
        loss_type, pc, pr, rc, rr, beta=jnp.float32(0.1), label_smoothing=jnp.float32(0.1)
    )
    for a, b in zip(traced, eager):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_exo_pair_traced_zero_label_smoothing_uses_default_eps():
    pc, pr, rc, rr = make_batch("small", b=8, seed=22)
    f = jax.jit(functools.partial(preference_loss, "exo_pair"))
    got = f(pc, pr, rc, rr, beta=0.3, label_smoothing=jnp.float32(0.0))[0]
    exp = ref_preference_loss("exo_pair", pc, pr, rc, rr, 0.3, 0.0)  # eps = 1e-3
    np.testing.assert_allclose(np.asarray(got), exp, rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------
def test_unknown_loss_type_lists_valid_names():
    with pytest.raises(ValueError) as err:
        preference_loss("dpo", _z(), _z(), _z(), _z(), beta=0.1)
    for name in ("sigmoid", "kto_pair", "ipo", "discopop"):
        assert name in str(err.value)
    with pytest.raises(ValueError, match="kto_pair"):
        uses_average_logps("not_a_loss")


@pytest.mark.parametrize("beta", [0.0, -0.1, float("nan")])
def test_bad_beta(beta):
    with pytest.raises(ValueError, match="beta"):
        preference_loss("sigmoid", _z(), _z(), _z(), _z(), beta=beta)
    with pytest.raises(ValueError, match="beta"):
        kto_loss(_z(), _z(), _z(), _z(), _z(), _z(), beta=beta)


def test_bad_label_smoothing_and_shapes():
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss("robust", _z(), _z(), _z(), _z(), beta=0.1, label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss("sigmoid", _z(), _z(), _z(), _z(), beta=0.1, label_smoothing=-0.1)
    with pytest.raises(AssertionError):
        preference_loss("sigmoid", _z(3), _z(4), _z(3), _z(3), beta=0.1)
    with pytest.raises(AssertionError):
        preference_loss(
            "sigmoid", np.zeros((2, 3), np.float32), *([np.zeros((2, 3), np.float32)] * 3), beta=0.1
        )


def test_uses_average_logps():
    assert uses_average_logps("ipo") is True
    assert uses_average_logps("sigmoid_norm") is True
    for lt in LOSS_TYPES:
        if lt not in ("ipo", "sigmoid_norm"):
            assert uses_average_logps(lt) is False


# --------------------------------------------------------------------------
# kto_loss (unpaired KTO)
# --------------------------------------------------------------------------
def _kto_data(nc, nr, nk, seed, kl_shift=0.0):
    rng = np.random.default_rng(seed)
    f = lambda n, s=0.0: np.asarray(-rng.uniform(0, 40, n) + s, np.float32)
    pc, pr, pkl = f(nc), f(nr), f(nk, kl_shift)
    rc = np.asarray(pc + rng.normal(scale=1.0, size=nc), np.float32)
    rr = np.asarray(pr + rng.normal(scale=1.0, size=nr), np.float32)
    rkl = np.asarray(pkl - kl_shift + rng.normal(scale=0.2, size=nk), np.float32)
    return pc, pr, pkl, rc, rr, rkl


@pytest.mark.parametrize("kl_shift", [-3.0, 0.0, 2.0])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 1.33), (0.5, 2.0)])
def test_kto_loss_matches_reference(kl_shift, weights):
    pc, pr, pkl, rc, rr, rkl = _kto_data(5, 7, 12, seed=31, kl_shift=kl_shift)
    beta = 0.2
    losses, cr, rr_, kl = kto_loss(
        pc,
        pr,
        pkl,
        rc,
        rr,
        rkl,
        beta=beta,
        desirable_weight=weights[0],
        undesirable_weight=weights[1],
    )
    exp_losses, exp_kl = ref_kto(pc, pr, pkl, rc, rr, rkl, beta, *weights)
    assert losses.shape == (12,) and cr.shape == (5,) and rr_.shape == (7,) and kl.shape == ()
    np.testing.assert_allclose(float(kl), exp_kl, rtol=1e-5, atol=1e-6)
    if kl_shift < 0:
        assert float(kl) == 0.0  # negative mean is clamped at 0
    if kl_shift > 0:
        assert float(kl) > 1.0
    np.testing.assert_allclose(np.asarray(losses), exp_losses, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(
        np.asarray(cr), beta * (pc.astype(np.float64) - rc), rtol=RTOL, atol=ATOL
    )
    np.testing.assert_allclose(
        np.asarray(rr_), beta * (pr.astype(np.float64) - rr), rtol=RTOL, atol=ATOL
    )


def test_kto_loss_hand_case():
    # beta = 1; kl = max(mean([1, 2]), 0) = 1.5; chosen logratio 2; rejected logratio -1
    losses, cr, rr, kl = kto_loss(
        np.array([2.0], np.float32),
        np.array([-1.0], np.float32),
        np.array([1.0, 2.0], np.float32),
        _z(1),
        _z(1),
        _z(2),
        beta=1.0,
        desirable_weight=2.0,
        undesirable_weight=3.0,
    )
    s = lambda x: 1.0 / (1.0 + math.exp(-x))
    np.testing.assert_allclose(float(kl), 1.5)
    np.testing.assert_allclose(
        np.asarray(losses), [2.0 * (1 - s(2 - 1.5)), 3.0 * (1 - s(1.5 + 1))], rtol=1e-6
    )
    # KL clamped: mean([-1, -2]) < 0 -> kl = 0
    _, _, _, kl = kto_loss(
        _z(1), _z(1), np.array([-1.0, -2.0], np.float32), _z(1), _z(1), _z(2), beta=1.0
    )
    assert float(kl) == 0.0
    # no KL batch -> kl = 0 (TRL calculate_KL=False)
    losses, _, _, kl = kto_loss(
        np.array([2.0], np.float32), _z(1), None, _z(1), _z(1), None, beta=1.0
    )
    assert float(kl) == 0.0
    np.testing.assert_allclose(np.asarray(losses), [1 - s(2.0), 0.5], rtol=1e-6)


@pytest.mark.parametrize("nc,nr", [(0, 4), (4, 0), (0, 0)])
def test_kto_loss_empty_sides(nc, nr):
    pc, pr, pkl, rc, rr, rkl = _kto_data(nc, nr, 6, seed=32, kl_shift=1.0)
    for fn in (kto_loss, jax.jit(functools.partial(kto_loss, beta=0.1, undesirable_weight=1.5))):
        out = (
            fn(pc, pr, pkl, rc, rr, rkl, beta=0.1, undesirable_weight=1.5)
            if fn is kto_loss
            else fn(pc, pr, pkl, rc, rr, rkl)
        )
        losses, cr, rr_, kl = out
        assert losses.shape == (nc + nr,) and cr.shape == (nc,) and rr_.shape == (nr,)
        exp_losses, exp_kl = ref_kto(pc, pr, pkl, rc, rr, rkl, 0.1, 1.0, 1.5)
        np.testing.assert_allclose(np.asarray(losses), exp_losses, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(float(kl), exp_kl, rtol=1e-5)


def test_kto_loss_gradients():
    pc, pr, pkl, rc, rr, rkl = _kto_data(3, 4, 5, seed=33, kl_shift=1.0)
    beta, wd, wu = 0.3, 1.0, 1.33

    def mean_loss(pc, pr, pkl):
        return kto_loss(
            pc, pr, pkl, rc, rr, rkl, beta=beta, desirable_weight=wd, undesirable_weight=wu
        )[0].mean()

    g_pc, g_pr, g_pkl = jax.grad(mean_loss, argnums=(0, 1, 2))(pc, pr, pkl)
    np.testing.assert_array_equal(np.asarray(g_pkl), 0.0)  # kl is stop_gradient-ed
    kl = max(np.mean(pkl.astype(np.float64) - rkl), 0.0)
    n = pc.size + pr.size
    # d/dpc [wd (1 - sigmoid(beta (cl - kl)))] / n = -wd beta s (1 - s) / n
    s_c = np_sig(beta * ((pc.astype(np.float64) - rc) - kl))
    s_r = np_sig(beta * (kl - (pr.astype(np.float64) - rr)))
    np.testing.assert_allclose(
        np.asarray(g_pc), -wd * beta * s_c * (1 - s_c) / n, rtol=1e-5, atol=1e-8
    )
    np.testing.assert_allclose(
        np.asarray(g_pr), wu * beta * s_r * (1 - s_r) / n, rtol=1e-5, atol=1e-8
    )


# --------------------------------------------------------------------------
# sequence_logps / token_logps
# --------------------------------------------------------------------------
def _seq_data(seed=41, b=3, t=7, v=11):
    rng = np.random.default_rng(seed)
    logits = np.asarray(rng.normal(scale=3.0, size=(b, t, v)), np.float32)
    labels = rng.integers(0, v, size=(b, t)).astype(np.int32)
    mask = (rng.uniform(size=(b, t)) < 0.7).astype(np.int32)
    mask[0, :] = 1  # one full row
    mask[1, :] = 0  # one empty row (average must not divide by zero)
    mask[2, 0] = 0
    mask[2, 1] = 1
    garbage = labels.copy()
    garbage[mask == 0] = np.where(rng.uniform(size=int((mask == 0).sum())) < 0.5, -100, v + 5)
    return logits, labels, garbage, mask


def _ref_seq(logits, labels, mask, average):
    lsm = np_log_softmax(logits)
    b, t = labels.shape
    tok = np.zeros((b, t))
    for i in range(b):
        for j in range(t):
            if mask[i, j]:
                tok[i, j] = lsm[i, j, labels[i, j]]
    tot = tok.sum(-1)
    return tot / np.maximum(mask.sum(-1), 1) if average else tot


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps_matches_numpy(average):
    logits, labels, garbage, mask = _seq_data()
    expected = _ref_seq(logits, labels, mask, average)
    for m in (mask, mask.astype(bool), mask.astype(np.float32)):
        got = sequence_logps(logits, garbage, m, average=average)
        assert got.shape == (3,) and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)
    assert float(sequence_logps(logits, garbage, mask, average=average)[1]) == 0.0
    jitted = jax.jit(sequence_logps, static_argnames="average")(
        logits, garbage, mask, average=average
    )
    np.testing.assert_allclose(np.asarray(jitted), expected, rtol=1e-5, atol=1e-5)


def test_token_logps_and_masked_nonfinite_logits():
    logits, labels, garbage, mask = _seq_data(seed=42)
    tok = token_logps(logits, labels)
    assert tok.shape == labels.shape and tok.dtype == jnp.float32
    lsm = np_log_softmax(logits)
    np.testing.assert_allclose(
        np.asarray(tok),
        np.take_along_axis(lsm, labels[..., None], -1)[..., 0],
        rtol=1e-5,
        atol=1e-5,
    )
    bad = logits.copy()
    bad[mask == 0] = np.nan  # e.g. garbage activations at padding positions
    got = sequence_logps(bad, garbage, mask)
    np.testing.assert_allclose(
        np.asarray(got), _ref_seq(logits, labels, mask, False), rtol=1e-5, atol=1e-5
    )


def test_sequence_logps_gradient():
    logits, labels, garbage, mask = _seq_data(seed=43)
    g = jax.grad(lambda x: sequence_logps(x, garbage, mask).sum())(logits)
    v = logits.shape[-1]
    onehot = np.eye(v)[np.clip(labels, 0, v - 1)]
    expected = mask[..., None] * (onehot - np.exp(np_log_softmax(logits)))
    np.testing.assert_allclose(np.asarray(g), expected, rtol=1e-5, atol=1e-6)


def test_sequence_logps_bf16_logits():
    logits, labels, garbage, mask = _seq_data(seed=44)
    lb = jnp.asarray(logits, jnp.bfloat16)
    got = sequence_logps(lb, garbage, mask)
    assert got.dtype == jnp.float32
    # tight against the exact bf16 values (computation is float32) ...
    exact = np.asarray(lb.astype(jnp.float32))
    np.testing.assert_allclose(
        np.asarray(got), _ref_seq(exact, labels, mask, False), rtol=1e-5, atol=1e-5
    )
    # ... and loose against the original float32 logits
    np.testing.assert_allclose(np.asarray(got), _ref_seq(logits, labels, mask, False), atol=0.2)


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps_memory(average):
    b, t, v = 4, 128, 32000
    s = jax.ShapeDtypeStruct
    compiled = (
        jax.jit(functools.partial(sequence_logps, average=average))
        .lower(s((b, t, v), jnp.float32), s((b, t), jnp.int32), s((b, t), jnp.float32))
        .compile()
    )
    stats = compiled.memory_analysis()
    if stats is None:
        pytest.skip(
            f"memory_analysis() returned None on backend {jax.default_backend()!r}: memory check NOT run"
        )
    full = b * t * v * 4
    assert stats.temp_size_in_bytes < 0.25 * full, (stats.temp_size_in_bytes, full)


# --- extreme inputs (Reliability J) -----------------------------------------------------------


F32_MAX = float(np.finfo(np.float32).max)


@pytest.mark.parametrize("loss_type", ["ipo", "sppo_hard"])
def test_squared_losses_saturate_with_exact_gradient_at_huge_margins(loss_type):
    # pc = -2e30 makes the margin ~2e30: its square (4e60) is not a float32; the value
    # saturates at f32max / B (B = 2: the mean stays finite) and the gradient is 2 * margin / B
    beta = 0.1
    pc = np.array([-2e30, -1.0], np.float32)
    pr, rc, rr = (np.array([-3.0, -2.0], np.float32) for _ in range(3))

    def mean_loss(pc):
        return losses.preference_loss(loss_type, pc, pr, rc, rr, beta=beta)[0].mean()

    value, grad = jax.value_and_grad(mean_loss)(jnp.asarray(pc))
    per_example = losses.preference_loss(loss_type, pc, pr, rc, rr, beta=beta)[0]
    # float64 reference, by hand: row 1 is small and exact
    p64, r64, c64, q64 = (x.astype(np.float64) for x in (pc, pr, rc, rr))
    if loss_type == "ipo":
        margin = (p64 - r64) - (c64 - q64) - 1 / (2 * beta)
        want_small, want_grad = margin[1] ** 2, 2 * margin / 2
        cap = F32_MAX / 2
    else:
        margin = (p64 - c64) - 0.5 / beta
        want_small = margin[1] ** 2 + ((r64 - q64)[1] + 0.5 / beta) ** 2
        want_grad = 2 * margin / 2
        cap = F32_MAX / 4
    assert np.isfinite(float(value))
    np.testing.assert_allclose(float(per_example[1]), want_small, rtol=1e-6)
    assert float(per_example[0]) == pytest.approx(cap, rel=1e-6)
    np.testing.assert_allclose(np.asarray(grad, np.float64), want_grad, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("loss_type", ["ipo", "sppo_hard"])
def test_low_precision_tiny_beta_does_not_overflow(loss_type, dtype):
    # beta = 1e-6 as a float16/bfloat16 array: 1 / (2 beta) = 5e5 overflowed float16 (inf)
    x = [jnp.asarray(v, dtype) for v in ([-1.0, -2.0], [-3.0, -1.0], [-3.0, -1.0], [-1.0, -2.0])]
    beta = jnp.asarray(1e-6, dtype)
    got = losses.preference_loss(loss_type, *x, beta=beta)[0]
    b = float(np.asarray(beta, np.float32))  # the beta the array holds (1e-6 rounded)
    pc, pr, rc, rr = (np.asarray(v, np.float64) for v in x)
    if loss_type == "ipo":
        want = ((pc - pr) - (rc - rr) - 1 / (2 * b)) ** 2
    else:
        want = (pc - rc - 0.5 / b) ** 2 + (pr - rr + 0.5 / b) ** 2
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-6)
