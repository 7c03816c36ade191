"""trust_region.update_reference against the paper's rule, applied by hand in numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tr_align import trust_region


def _trees(seed=0):
    rng = np.random.default_rng(seed)
    ref = {
        "a": rng.normal(size=(3, 4)).astype(np.float32),
        "b": {"c": rng.normal(size=5).astype(np.float32)},
    }
    pol = {
        "a": rng.normal(size=(3, 4)).astype(np.float32),
        "b": {"c": rng.normal(size=5).astype(np.float32)},
    }
    return ref, pol


@pytest.mark.parametrize("alpha", [0.6, 0.25])
def test_soft_update_every_step(alpha):
    ref, pol = _trees()
    out = trust_region.update_reference(ref, pol, jnp.int32(7), alpha=alpha, tau=1)
    np.testing.assert_allclose(out["a"], alpha * pol["a"] + (1 - alpha) * ref["a"], rtol=1e-6)
    np.testing.assert_allclose(
        out["b"]["c"], alpha * pol["b"]["c"] + (1 - alpha) * ref["b"]["c"], rtol=1e-6
    )


def test_periodic_update_with_traced_step():
    ref, pol = _trees(1)
    f = jax.jit(lambda r, p, s: trust_region.update_reference(r, p, s, alpha=0.7, tau=3))
    for step in range(1, 8):
        out = f(ref, pol, jnp.int32(step))
        if step % 3 == 0:
            expect = 0.7 * pol["a"] + 0.3 * ref["a"]
        else:
            expect = ref["a"]
        np.testing.assert_allclose(out["a"], expect, rtol=1e-6, err_msg=f"step {step}")


def test_hard_update_copies_exactly():
    ref, pol = _trees(2)
    out = jax.jit(lambda r, p, s: trust_region.update_reference(r, p, s, alpha=1.0, tau=4))(
        ref, pol, jnp.int32(8)
    )
    np.testing.assert_array_equal(out["a"], pol["a"])
    np.testing.assert_array_equal(out["b"]["c"], pol["b"]["c"])


def test_alpha_zero_keeps_reference():
    ref, pol = _trees(3)
    out = trust_region.update_reference(ref, pol, jnp.int32(1), alpha=0.0, tau=1)
    np.testing.assert_array_equal(out["a"], ref["a"])


def test_reference_dtype_is_kept():
    ref, pol = _trees(4)
    ref16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), ref)
    out = trust_region.update_reference(ref16, pol, jnp.int32(1), alpha=0.5, tau=1)
    assert out["a"].dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(out["a"], np.float32),
        0.5 * pol["a"] + 0.5 * np.asarray(ref16["a"], np.float32),
        rtol=1e-2,
        atol=1e-2,
    )


@pytest.mark.parametrize(
    "alpha,tau,msg", [(1.5, 1, "alpha"), (-0.1, 1, "alpha"), (0.5, 0, "tau"), (0.5, 2.5, "tau")]
)
def test_invalid_settings(alpha, tau, msg):
    ref, pol = _trees()
    with pytest.raises(ValueError, match=msg):
        trust_region.update_reference(ref, pol, jnp.int32(1), alpha=alpha, tau=tau)


def test_presets_are_the_papers():
    assert trust_region.PRESETS["tr-soft"] == dict(enabled=True, alpha=0.6, tau=1)
    assert trust_region.PRESETS["tr-hard"] == dict(enabled=True, alpha=1.0, tau=512)
    assert trust_region.PRESETS["vanilla"]["enabled"] is False


def test_num_updates_and_distance():
    assert int(trust_region.num_updates(jnp.int32(10), enabled=True, tau=3)) == 3
    assert int(trust_region.num_updates(jnp.int32(10), enabled=False, tau=3)) == 0
    ref, pol = _trees(5)
    expect = np.sqrt(
        sum(
            np.sum((pol[k] - ref[k]) ** 2)
            if k == "a"
            else np.sum((pol["b"]["c"] - ref["b"]["c"]) ** 2)
            for k in ("a", "b")
        )
    )
    np.testing.assert_allclose(trust_region.param_distance(pol, ref), expect, rtol=1e-5)


# --- refused inputs (Reliability J) ------------------------------------------------------------


def test_integer_leaves_are_refused_not_truncated():
    ref = {"w": np.array([1, 2, 3], np.int32)}
    pol = {"w": np.array([2, 3, 4], np.int32)}
    with pytest.raises(TypeError, match=r"reference \['w'\] has dtype int32"):
        trust_region.update_reference(ref, pol, jnp.int32(1), alpha=0.5, tau=1)
    with pytest.raises(TypeError, match=r"policy \['w'\] has dtype int32"):
        trust_region.update_reference(
            {"w": np.zeros(3, np.float32)}, pol, jnp.int32(1), alpha=0.5, tau=1
        )


def test_shape_mismatch_is_refused_not_broadcast():
    ref = {"w": np.zeros(3, np.float32)}
    pol = {"w": np.ones((2, 3), np.float32)}
    with pytest.raises(ValueError, match=r"\['w'\] has shape \(3,\) in the reference but \(2, 3\)"):
        trust_region.update_reference(ref, pol, jnp.int32(1), alpha=0.5, tau=1)
    with pytest.raises(ValueError, match="differ in structure"):
        trust_region.update_reference(
            {"w": np.zeros(3, np.float32)}, {"v": np.zeros(3, np.float32)}, 1, alpha=0.5, tau=1
        )


@pytest.mark.parametrize("alpha", [True, False, "0.5", float("nan"), None, np.bool_(True)])
def test_alpha_must_be_a_real_number(alpha):
    ref, pol = _trees()
    with pytest.raises(ValueError, match="alpha"):
        trust_region.update_reference(ref, pol, jnp.int32(1), alpha=alpha, tau=1)
    with pytest.raises(ValueError, match="alpha"):
        trust_region.ReferenceUpdate(alpha=alpha, tau=1)


@pytest.mark.parametrize("tau", [True, 2.0, "3", -(2**40)])
def test_tau_must_be_a_positive_integer(tau):
    ref, pol = _trees()
    with pytest.raises(ValueError, match="tau"):
        trust_region.update_reference(ref, pol, jnp.int32(2), alpha=0.5, tau=tau)


def test_huge_tau_never_updates_and_does_not_overflow():
    ref, pol = _trees(6)
    f = jax.jit(lambda r, p, s: trust_region.update_reference(r, p, s, alpha=0.5, tau=2**40))
    for step in (1, 7, 2**31 - 1):
        out = f(ref, pol, jnp.int32(step))
        np.testing.assert_array_equal(out["a"], ref["a"])  # 2**40 divides no step in [1, 2**31)
    assert int(trust_region.num_updates(jnp.int32(2**31 - 1), enabled=True, tau=2**40)) == 0
    # numpy integers and an exactly representable big tau keep the rule
    out = trust_region.update_reference(ref, pol, jnp.int32(2**30), alpha=0.5, tau=np.int64(2**30))
    np.testing.assert_allclose(out["a"], 0.5 * pol["a"] + 0.5 * ref["a"], rtol=1e-6)
