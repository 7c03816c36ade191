"""SFT (loss.type="sft"): the token-mean NLL of the chosen completions, no reference."""

import jax
import numpy as np

from tr_align import sharding
from tr_align.data import loader
from tr_align.training import loop


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_sft_step_loss_is_the_chosen_token_nll_and_holds_no_reference(tiny_config):
    config = tiny_config(**{"loss.type": "sft", "optimizer.learning_rate": 3e-3})
    built = loop.build(config, devices=jax.devices()[:1], progress=False)
    state = built.init()
    params0 = jax.tree.map(np.asarray, state.params)
    assert state.ref_params is None  # SFT uses no reference: the state holds none
    it = loader.train_iterator(built.data.train, batch_size=8, seed=0, buckets=built.data.buckets)
    batch = next(it)
    # independent value: numpy log-softmax of the logits over the chosen completion tokens
    ids, attn, mask = (batch[f"chosen_{k}"] for k in ("input_ids", "attention_mask", "loss_mask"))
    logits = np.asarray(built.apply_fn(params0, ids[:, :-1], attn[:, :-1]), np.float64)
    logp = np.take_along_axis(_log_softmax(logits), ids[:, 1:, None], -1)[..., 0]
    want = -(logp * mask[:, 1:]).sum() / mask[:, 1:].sum()
    state, m = built.train_step(state, sharding.put_batch(batch, built.mesh))
    np.testing.assert_allclose(float(m["loss"]), want, rtol=1e-5)
    losses = [float(m["loss"])]
    for _ in range(5):
        state, m = built.train_step(state, sharding.put_batch(batch, built.mesh))
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0]  # fitting one batch
    assert state.ref_params is None
