"""The toy overoptimization experiment (tr_align/toy.py): exact probabilities, P_OOD, outputs,
reference behaviour. References are hand values and numpy re-computations."""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO
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
