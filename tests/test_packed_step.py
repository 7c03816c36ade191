"""Packed and prefix-shared batches train exactly like padded ones (issue: padding-free).

The padded step is checked against independent values elsewhere (test_train, test_sft,
test_memory); here every other layout must give the same loss, metrics, gradients (new
parameters) and reference as the padded layout on the same examples, to float tolerance:
for every loss type, KTO and SFT, soft and hard trust regions, 1 and 8 devices, gradient
accumulation, chunked log-probs with remat, and the eval step.
"""

import jax
import numpy as np
import pytest

from tr_align import losses, sharding
from tr_align.training import loop

LAYOUTS = ("packed", "prefix_shared")


def _host(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def _run(config, layout, n_steps, devices):
    config = config.copy_and_resolve_references()
    config.data.packing = layout
    built = loop.build(config, devices=devices, progress=False)
    it = built.train_iterator(config)
    state = built.init()
    metrics = []
    for _ in range(n_steps):
        state, m = built.train_step(state, sharding.put_batch(next(it), built.mesh))
        metrics.append(jax.device_get(m))
    zeros = tuple(np.zeros(len(built.data.eval), np.float32) for _ in range(2))
    evals, logps = loop._run_eval(
        built.eval_step,
        state,
        built.data,
        zeros,
        built.mesh,
        config.train.eval_batch_size,
        built.program.loader_kwargs(eval=True),
    )
    return _host(state), metrics, evals, logps


def _assert_same(got, want, *, rtol=2e-5, atol=2e-6):
    (s1, m1, e1, l1), (s0, m0, e0, l0) = got, want
    for i, (a, b) in enumerate(zip(m1, m0)):
        assert a.keys() == b.keys()
        for k in b:
            if i == 0 and k.endswith("accuracies"):
                # step 1: policy == reference, every reward is 0 up to float noise (ties), and
                # the sign of noise is no property of the layout
                continue
            np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=k)
    for k in e0:
        np.testing.assert_allclose(e1[k], e0[k], rtol=rtol, atol=atol, err_msg=k)
    for a, b in zip(l1, l0):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)
    assert (s1.ref_params is None) == (s0.ref_params is None)
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s0)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _config(tiny_config, preset="tr-soft", **overrides):
    # a reference that moves (tau 1) and a learning rate that moves the policy visibly
    return tiny_config(preset, **{"optimizer.learning_rate": 3e-3, **overrides})


# One paired loss per way the step's log-probs reach it. A paired loss sees the layout only
# through ``objectives.Logps`` (the per-sequence policy / reference log-probs the step
# computes, summed or, for ``losses.uses_average_logps`` types, length-averaged), so the
# layout-dependent code is the same for every type with the same inputs; the losses
# themselves are checked against TRL's formulas type by type in test_losses. Kept: summed
# (sigmoid), averaged (ipo; sigmoid_norm takes the same path), kto_pair (2E per-example
# terms), aot and aot_unpaired (sort across the batch, so they see the pair order); the
# other types (hinge, robust, exo_pair, nca_pair, bco_pair, sppo_hard, apo_zero, apo_down,
# discopop, sigmoid_norm) are elementwise functions of the same summed or averaged inputs.
LAYOUT_PATH_LOSSES = ("sigmoid", "ipo", "kto_pair", "aot", "aot_unpaired")


def test_layout_path_losses_are_loss_types_and_cover_both_logps_kinds():
    assert set(LAYOUT_PATH_LOSSES) <= set(losses.LOSS_TYPES)
    assert {losses.uses_average_logps(t) for t in LAYOUT_PATH_LOSSES} == {True, False}
    assert set(losses.AVERAGED_LOSSES) == {"ipo", "sigmoid_norm"}  # one path, ipo covers it


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", (*LAYOUT_PATH_LOSSES, "kto", "sft"))
def test_every_loss_trains_the_same_prefix_shared(tiny_config, loss_type):
    """prefix_shared for every objective (KTO, SFT) and every way a paired loss takes its
    log-probs (``LAYOUT_PATH_LOSSES``; ``packed`` for sigmoid, KTO and SFT below)."""
    config = _config(tiny_config, **{"loss.type": loss_type})
    devices = jax.devices()[:1]
    _assert_same(_run(config, "prefix_shared", 2, devices), _run(config, "none", 2, devices))


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ("sigmoid", "kto"))
def test_hard_update_and_vanilla_the_same_packed(tiny_config, loss_type):
    for preset, extra in (("tr-hard", {"trust_region.tau": 2}), ("vanilla", {})):
        config = _config(tiny_config, preset, **{"loss.type": loss_type, **extra})
        want = _run(config, "none", 3, jax.devices()[:1])
        _assert_same(_run(config, "prefix_shared", 3, jax.devices()[:1]), want)


@pytest.mark.slow
def test_packed_on_8_devices_matches_one_device(tiny_config):
    # a frozen reference: step-2 margins are a whole step's change, far from ties
    config = _config(tiny_config, "vanilla")
    want = _run(config, "none", 2, jax.devices()[:1])
    for layout in LAYOUTS:
        _assert_same(_run(config, layout, 2, jax.devices()), want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ("sigmoid", "sft", "kto"))
def test_grad_accumulation_packed_matches_padded(tiny_config, loss_type):
    """K = 2 microbatches on 2 devices, each microbatch its own packed rows: the same step
    as the padded layout with the same microbatches."""
    config = _config(tiny_config, **{"loss.type": loss_type, "train.grad_accum_steps": 2})
    want = _run(config, "none", 2, jax.devices()[:2])
    for layout in LAYOUTS:
        _assert_same(_run(config, layout, 2, jax.devices()[:2]), want)


@pytest.mark.slow
def test_sft_grad_accumulation_is_the_full_batch_token_mean(tiny_config):
    """SFT's loss is a token mean over the whole batch: with sums and counts added over
    microbatches, K = 4 gives the full-batch step (not the mean of microbatch means)."""
    config = _config(tiny_config, **{"loss.type": "sft"})
    want = _run(config, "none", 2, jax.devices()[:1])
    accum = config.copy_and_resolve_references()
    accum.train.grad_accum_steps = 4
    _assert_same(_run(accum, "packed", 2, jax.devices()[:1]), want)


@pytest.mark.slow
def test_prefix_shared_with_chunked_logps_and_remat(tiny_config):
    config = _config(tiny_config, **{"train.logps_chunk_size": 4, "model.remat": "full"})
    want = _run(config, "none", 2, jax.devices()[:1])
    _assert_same(_run(config, "prefix_shared", 2, jax.devices()[:1]), want)
