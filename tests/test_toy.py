"""The toy overoptimization experiment (tr_align/toy.py): exact probabilities, P_OOD, outputs,
reference behaviour. References are hand values and numpy re-computations."""

import json
import math
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO
from tr_align import lora
from tr_align.errors import ConfigError
from tr_align.experiments import toy

TINY = dict(vocab=3, length=3, sft_steps=3, steps=3, seeds=2, lr=1e-2, embed_dim=4, hidden=8)
TINY["pairs"] = (((0, 1, 2), (0, 2, 2)), ((1, 2, 0), (1, 1, 0)))


def _np_logps(logits, seqs):
    """log pi(y) = sum_t log softmax(logits[y, t])[y_t], float64 numpy."""
    logits = np.asarray(logits, np.float64)
    logz = np.log(np.exp(logits).sum(-1))
    picked = np.take_along_axis(logits, seqs[..., None], -1)[..., 0]
    return (picked - logz).sum(-1)


@pytest.mark.parametrize("model", ["mlp", "llama"])
def test_all_sequence_probabilities_are_exact_and_sum_to_one(model):
    s = toy.ToySettings(**{**TINY, "model": model})
    init_fn, apply_fn = toy.make_policy(s)
    apply_fn = jax.jit(apply_fn)
    params = jax.jit(init_fn)(jax.random.key(1))
    # Random init is near uniform; scale the weights up so the check is not trivial.
    params = jax.tree.map(lambda x: 4.0 * x, params)
    seqs = toy.all_sequences(s.vocab, s.length)
    assert seqs.shape == (27, 3)
    logp = np.asarray(
        jax.jit(toy.all_logps, static_argnums=(0, 3))(apply_fn, params, seqs, s.vocab)
    )
    # The strided forward equals a plain forward over every sequence (causality).
    full = _np_logps(apply_fn(params, seqs), seqs)
    np.testing.assert_allclose(logp, full, atol=1e-5)
    np.testing.assert_allclose(np.exp(logp).sum(), 1.0, atol=1e-5)
    assert np.exp(logp).std() > 1e-3  # not uniform
    # Changing the last token must not change the logits (the policy is causal).
    other = seqs.copy()
    other[:, -1] = (other[:, -1] + 1) % s.vocab
    np.testing.assert_allclose(apply_fn(params, seqs), apply_fn(params, other), atol=1e-6)


def test_sequence_index_and_ood_mass_by_hand():
    seqs = toy.all_sequences(2, 2)
    np.testing.assert_array_equal(seqs, [[0, 0], [0, 1], [1, 0], [1, 1]])
    assert [toy.sequence_index(q, 2) for q in seqs] == [0, 1, 2, 3]
    assert toy.sequence_index((2, 0, 1), 3) == 19
    probs = np.array([0.1, 0.2, 0.3, 0.4])
    # data = rows 1 and 3 (row 3 twice): P_OOD = 1 - (0.2 + 0.4)
    assert float(toy.ood_mass(probs, np.array([1, 3, 3]))) == pytest.approx(0.4)
    assert float(toy.ood_mass(probs, np.array([0, 1, 2, 3]))) == pytest.approx(0.0, abs=1e-7)


def test_value_at_kl_interpolates_first_crossing():
    kl = [0.0, 0.4, 1.2, 0.8, 3.0]
    vals = [0.0, 1.0, 3.0, 9.0, 9.0]
    # first crossing of 1.0 is between steps 1 and 2: w = 0.6/0.8 -> 1 + 0.75 * 2
    assert toy.value_at_kl(kl, vals, 1.0) == pytest.approx(2.5)
    assert toy.value_at_kl(kl, vals, 0.0) == 0.0
    assert math.isnan(toy.value_at_kl(kl, vals, 5.0))


@pytest.mark.slow
def test_reference_frozen_for_vanilla_and_mixed_for_soft():
    s = toy.ToySettings(**{**TINY, "steps": 1})
    sft = toy.make_sft(s)(jax.random.split(jax.random.key(0), s.seeds))
    curves, policy, ref = toy.make_train(s, "DPO")(sft)
    jax.tree.map(np.testing.assert_array_equal, ref, sft)  # frozen
    # Step 0 is pi_sft: KL 0, DPO loss log 2 (policy == reference).
    np.testing.assert_allclose(curves["kl_to_sft"][:, 0], 0.0, atol=1e-6)
    np.testing.assert_allclose(curves["loss"][:, 0], math.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(
        curves["p_chosen"] + curves["p_rejected"] + curves["p_ood"], 1.0, atol=1e-5
    )
    _, soft_policy, soft_ref = toy.make_train(s, "TR-DPO-soft")(sft)
    # The first update is the same for both (the reference is pi_sft during step 1) ...
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), soft_policy, policy)
    # ... after it, ref = 0.6 * policy + 0.4 * pi_sft.
    jax.tree.map(
        lambda r, p, s0: np.testing.assert_allclose(r, 0.6 * p + 0.4 * s0, atol=1e-6),
        soft_ref,
        soft_policy,
        sft,
    )
    assert not np.allclose(jax.tree.leaves(soft_ref)[0], jax.tree.leaves(sft)[0])


@pytest.mark.slow
def test_tiny_run_writes_results_and_figure(tmp_path):
    s = toy.ToySettings(**{**TINY, "hard_tau": 100})  # hard copy never happens in 3 steps
    lines = []
    results = toy.main(str(tmp_path), s, ["DPO", "TR-DPO-soft", "TR-DPO-hard"], log=lines.append)
    with open(tmp_path / "toy_results.json") as f:
        saved = json.load(f)
    assert (tmp_path / "toy_overoptimization.png").stat().st_size > 10_000
    assert saved["settings"]["num_sequences"] == 27
    assert set(saved["methods"]) == {"DPO", "TR-DPO-soft", "TR-DPO-hard"}
    for e in saved["methods"].values():
        assert set(e) >= {"per_step", "at_step", "at_kl", "per_seed_final", "loss_type"}
        for key in ("p_chosen", "p_rejected", "p_ood", "kl_to_sft", "loss"):
            assert len(e["per_step"][key]["mean"]) == s.steps + 1
            assert len(e["per_seed_final"][key]) == s.seeds
        assert set(e["at_step"]) == {"1", "3"}
    dpo, soft, hard = (
        saved["methods"][m]["per_step"] for m in ("DPO", "TR-DPO-soft", "TR-DPO-hard")
    )
    # Hard TR that never copies is vanilla DPO; soft TR differs once the reference has moved.
    np.testing.assert_allclose(hard["p_ood"]["mean"], dpo["p_ood"]["mean"], atol=1e-7)
    assert not np.allclose(soft["loss"]["mean"][2:], dpo["loss"]["mean"][2:], atol=1e-6)
    text = "\n".join(lines)
    assert "| TR-DPO-soft |" in text and "P_OOD @ KL" in text
    assert results["methods"]["DPO"]["reference"] == "vanilla"


def test_notebook_is_valid_and_calls_the_experiment():
    nb = json.loads((REPO / "notebooks" / "toy_overoptimization.ipynb").read_text())
    assert nb["nbformat"] == 4
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    assert "toy.main(" in code
    assert "toy_overoptimization.png" in code


def test_cli_rejects_unknown_method_in_one_line(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "tr_align", "toy", f"--workdir={tmp_path}", "--methods=DPO,Nope"],
        cwd=REPO,
        env={**os.environ, "XLA_FLAGS": ""},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "config error: --methods: unknown ['Nope']" in out.stderr
    assert not (tmp_path / "toy_results.json").exists()


# ---------------------------------------------------------------- LoRA (issue 14)

# Curves of the code before LoRA was added (commit 028b8c6), TINY settings, MLP policy, seed
# 0 and 1: LoRA off (lora_rank=0) must leave them as they were.
BEFORE_LORA = {
    "DPO": {
        "p_ood": [[0.8184302, 0.8175229, 0.8157072, 0.8129284],
                  [0.7778072, 0.7791574, 0.7800728, 0.7803688]],
        "kl_to_sft": [[0.0, 0.0025493, 0.0104591, 0.0252687],
                      [0.0, 0.000821, 0.0028674, 0.0065486]],
        "loss": [[0.6931472, 0.689121, 0.6846051, 0.679485],
                 [0.6931472, 0.6875213, 0.6821758, 0.6769426]],
    },
    "TR-DPO-soft": {
        "p_ood": [[0.8184302, 0.8175229, 0.8158421, 0.8134035],
                  [0.7778072, 0.7791574, 0.7800744, 0.7803604]],
        "kl_to_sft": [[0.0, 0.0025493, 0.0107419, 0.0265701],
                      [0.0, 0.000821, 0.0028675, 0.0065611]],
        "loss": [[0.6931472, 0.691469, 0.6905108, 0.689813],
                 [0.6931472, 0.6909314, 0.6901537, 0.6898462]],
    },
}  # fmt: skip


@pytest.mark.slow
def test_lora_off_leaves_the_toy_results_as_they_were():
    s = toy.ToySettings(**TINY)
    assert s.lora_rank == 0
    sft = toy.make_sft(s)(jax.random.split(jax.random.key(0), s.seeds))
    for method, expected in BEFORE_LORA.items():
        curves = jax.device_get(toy.make_train(s, method)(sft)[0])
        assert set(curves) == set(toy.TRACKED)  # no drift without LoRA
        for key, values in expected.items():
            np.testing.assert_allclose(curves[key], values, rtol=2e-5, atol=2e-6)


def _lora_run(s, method):
    sft = toy.make_sft(s)(jax.random.split(jax.random.key(0), s.seeds))
    curves, adapters, refs = toy.make_train(s, method)(sft, toy.lora_keys(s))
    return sft, jax.device_get(curves), jax.device_get(adapters), jax.device_get(refs)


def _factors(adapters, seed=None):
    """{target path: (A, B)} float64 numpy (of one seed of stacked adapters)."""
    pick = (lambda x: x) if seed is None else (lambda x: x[seed])
    return {
        p: (np.asarray(pick(ab["lora_a"]), np.float64), np.asarray(pick(ab["lora_b"]), np.float64))
        for p, ab in lora.flat_adapters(adapters).items()
    }


@pytest.mark.slow
def test_lora_hard_copy_has_exactly_zero_drift():
    # alpha = 1: the factor copy (A, B) and the exact delta s A @ B are the same reference.
    s = toy.ToySettings(**{**TINY, "model": "llama", "lora_rank": 2, "hard_tau": 1})
    _, curves, adapters, refs = _lora_run(s, "TR-DPO-hard")
    assert set(curves) == set(toy.TRACKED) | set(toy.LORA_TRACKED)
    np.testing.assert_array_equal(curves["drift"], 0.0)
    assert (curves["ref_delta_norm"][:, 0] == 0).all()
    assert (curves["ref_delta_norm"][:, 1:] > 1e-4).all()  # the reference moved
    # the llama's seven projections are the targets, the head and embedding are not
    assert sorted(_factors(adapters, 0)) == [
        "layers_0/mlp/down_proj/kernel",
        "layers_0/mlp/gate_proj/kernel",
        "layers_0/mlp/up_proj/kernel",
        "layers_0/self_attn/k_proj/kernel",
        "layers_0/self_attn/o_proj/kernel",
        "layers_0/self_attn/q_proj/kernel",
        "layers_0/self_attn/v_proj/kernel",
    ]
    scale = s.lora_alpha / s.lora_rank
    for seed in range(s.seeds):
        for p, (a, b) in _factors(adapters, seed).items():
            merged = lora.flat_leaves(refs["merged"])[p][seed]
            np.testing.assert_allclose(merged, scale * a @ b, atol=1e-6)
    assert (curves["kl_to_sft"][:, -1] > 1e-3).all()


@pytest.mark.slow
@pytest.mark.parametrize("driver", ["factors", "merged"])
def test_lora_drift_after_one_soft_update_is_the_cross_term(driver):
    # tau 2: the references stay at the policy's step-0 factors (A0, B0 = 0) until step 2,
    # then one soft update with the policy's (A1, B1) after step 2:
    #   exact   D = a s A1 B1 + (1 - a) s A0 B0
    #   factors D = s (a A1 + (1 - a) A0) (a B1 + (1 - a) B0)
    a = 0.6
    s = toy.ToySettings(
        **{**TINY, "steps": 2, "lora_rank": 2, "lora_alpha": 3.0, "soft_alpha": a, "soft_tau": 2,
           "lora_mode": driver}
    )  # fmt: skip
    sft, curves, adapters, refs = _lora_run(s, "TR-DPO-soft")
    scale = 1.5  # lora_alpha / rank
    # the MLP's three Dense kernels are the targets; A0 is the adapters' init (B0 = 0)
    lo = lora.Lora(rank=2, alpha=3.0, targets=(r"(fc1|fc2|out)/kernel",))
    assert sorted(_factors(adapters, 0)) == ["fc1/kernel", "fc2/kernel", "out/kernel"]
    for seed in range(s.seeds):
        base = jax.tree.map(lambda x: x[seed], sft)  # noqa: B023
        start = _factors(lo.init_adapters(toy.lora_keys(s)[seed], base))
        num = den = 0.0
        for p, (a1, b1) in _factors(adapters, seed).items():
            a0, b0 = start[p]
            assert not np.allclose(a1, a0)  # A moved by step 2 (not at step 1: B0 = 0)
            exact = a * scale * a1 @ b1 + (1 - a) * scale * a0 @ b0
            fact = scale * (a * a1 + (1 - a) * a0) @ (a * b1 + (1 - a) * b0)
            merged = lora.flat_leaves(refs["merged"])[p][seed]
            np.testing.assert_allclose(merged, exact, rtol=1e-5, atol=1e-7)
            ref_a, ref_b = _factors(refs["factors"], seed)[p]
            np.testing.assert_allclose(ref_a, a * a1 + (1 - a) * a0, rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(ref_b, a * b1 + (1 - a) * b0, rtol=1e-6, atol=1e-7)
            assert not b0.any()
            num += np.sum((fact - exact) ** 2)
            den += np.sum(exact**2)
        expected = np.sqrt(num) / np.sqrt(den)
        assert expected > 1e-4  # the cross term is not negligible here
        assert curves["drift"][seed, 2] == pytest.approx(expected, rel=1e-3)
        assert curves["ref_delta_norm"][seed, 2] == pytest.approx(np.sqrt(den), rel=1e-5)
        # steps 0 and 1: both references are still the base (0 / 0 = 0)
        np.testing.assert_array_equal(curves["drift"][seed, :2], 0.0)
        np.testing.assert_array_equal(curves["ref_delta_norm"][seed, :2], 0.0)


def test_lora_drift_of_hand_deltas():
    exact = {"w": np.array([[3.0, 0.0], [0.0, 4.0]])}  # ||exact|| = 5
    factors = {"w": np.array([[3.0, 1.0], [0.0, 4.0]])}  # ||diff|| = 1
    drift, norm = toy.reference_drift(factors, exact)
    assert float(drift) == pytest.approx(0.2) and float(norm) == pytest.approx(5.0)
    zero = {"w": np.zeros((2, 2))}
    assert float(toy.reference_drift(zero, zero)[0]) == 0.0  # 0 / 0 at step 0
    assert math.isinf(float(toy.reference_drift(factors, zero)[0]))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("lora_mode", "exact", "toy: lora_mode='exact'; expected one of factors, merged"),
        ("lora_rank", -1, "toy: lora_rank=-1; expected an integer >= 0"),
        ("lora_alpha", 0.0, "toy: lora_alpha=0.0; expected a number > 0"),
        ("lora_alpha", float("nan"), "toy: lora_alpha=nan; expected a number > 0"),
        ("lora_alpha", "8", "toy: lora_alpha='8'; expected a number > 0"),
    ],
)
def test_lora_settings_are_checked(field, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        toy.ToySettings(**{field: value}).validate()


def _cli(tmp_path, *flags):
    return subprocess.run(
        [sys.executable, "-m", "tr_align", "toy", f"--workdir={tmp_path}", *flags],
        cwd=REPO,
        env={**os.environ, "XLA_FLAGS": ""},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_cli_rejects_a_bad_lora_mode_in_one_line(tmp_path):
    out = _cli(tmp_path, "--lora_rank=4", "--lora_mode=exact")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "tr-align: config error: toy: lora_mode='exact'; expected one of factors, merged"
    ]
    assert not (tmp_path / "toy_results.json").exists()


@pytest.mark.slow
def test_cli_lora_flags_reach_the_run_and_the_results(tmp_path):
    out = _cli(
        tmp_path, "--steps=2", "--seeds=1", "--methods=TR-DPO-soft", "--lora_rank=3",
        "--lora_alpha=6", "--lora_mode=merged", "--soft_tau=2", "--lr=1e-3",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    saved = json.loads((tmp_path / "toy_results.json").read_text())
    st = saved["settings"]
    assert (st["lora_rank"], st["lora_alpha"], st["lora_mode"], st["soft_tau"]) == (
        3,
        6.0,
        "merged",
        2,
    )
    assert "rank 3, alpha 6.0 (scale 2)" in st["lora"]
    drift = saved["methods"]["TR-DPO-soft"]["drift"]
    assert drift["lora_mode"] == "merged"
    assert len(drift["per_step"]["drift"]["mean"]) == 3
    assert set(drift["at_step"]) == {"2"}
    assert drift["per_step"]["drift"]["mean"][:2] == [0.0, 0.0]
    assert drift["per_step"]["drift"]["mean"][2] > 0
    assert "| TR-DPO-soft |" in out.stdout and "drift @ 2" in out.stdout
