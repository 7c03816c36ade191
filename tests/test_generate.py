"""KV-cache generation against full recomputation, plus sampling semantics."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from tr_align import generate, hf
from tr_align.models import llama

FIXTURES = REPO / "tests" / "fixtures" / "hf"
PROMPTS = [[5, 17, 3, 40, 22, 9], [11, 2], [33, 33, 1, 60]]


@functools.cache
def _model(name):
    apply_fn, params, config = hf.load_pretrained(str(FIXTURES / name))
    return (
        jax.jit(apply_fn),
        params,
        config,
        llama.make_decode_fn(config),
        functools.partial(llama.init_cache, config),
    )


def _greedy_by_recompute(apply_fn, params, prompt, n, eos_id=None):
    """Reference: re-run the full forward on the growing (unpadded) sequence each step."""
    seq, out = list(prompt), []
    for _ in range(n):
        logits = apply_fn(params, jnp.asarray([seq], jnp.int32), jnp.ones((1, len(seq)), jnp.int32))
        tok = int(jnp.argmax(logits[0, -1]))
        out.append(tok)
        seq.append(tok)
        if tok == eos_id:
            break
    return out


@pytest.mark.parametrize("name", ["llama_gqa", "mistral_sliding", "qwen2"])
def test_greedy_with_cache_equals_full_recompute(name):
    apply_fn, params, _, decode_fn, init_cache = _model(name)
    tokens, lengths = generate.generate(decode_fn, init_cache, params, PROMPTS, max_new_tokens=12)
    for row, prompt in enumerate(PROMPTS):  # left-padded batch == each prompt alone
        assert tokens[row].tolist() == _greedy_by_recompute(apply_fn, params, prompt, 12)
    assert lengths.tolist() == [12, 12, 12]


def test_cached_logits_equal_full_forward():
    apply_fn, params, config, decode_fn, init_cache = _model("llama_gqa")
    seq = [7, 8, 9, 10, 11, 12, 13]
    cache = init_cache(1, len(seq))
    kv_mask = jnp.ones((1, len(seq)), jnp.int32)
    full = apply_fn(params, jnp.asarray([seq]), jnp.ones((1, len(seq)), jnp.int32))[0]
    logits, cache = decode_fn(
        params, jnp.asarray([seq[:3]]), jnp.arange(3)[None], cache, 0, kv_mask
    )
    np.testing.assert_allclose(logits[0], full[:3], atol=1e-5)
    for i in range(3, len(seq)):  # one token at a time
        logits, cache = decode_fn(
            params, jnp.asarray([[seq[i]]]), jnp.asarray([[i]]), cache, i, kv_mask
        )
        np.testing.assert_allclose(logits[0, 0], full[i], atol=1e-5)


def test_eos_stops_a_row_and_pads_it():
    apply_fn, params, _, decode_fn, init_cache = _model("llama_gqa")
    free = _greedy_by_recompute(apply_fn, params, PROMPTS[0], 10)
    eos = free[3]
    tokens, lengths = generate.generate(
        decode_fn, init_cache, params, PROMPTS, max_new_tokens=10, eos_id=eos, pad_id=0
    )
    first = free.index(eos)
    assert tokens[0, : first + 1].tolist() == free[: first + 1]
    assert (tokens[0, first + 1 :] == 0).all() and lengths[0] == first + 1
    for row in (1, 2):
        want = _greedy_by_recompute(apply_fn, params, PROMPTS[row], 10, eos_id=eos)
        assert tokens[row, : len(want)].tolist() == want and lengths[row] == len(want)


def test_sampling_is_seeded_and_top_k1_is_greedy():
    _, params, _, decode_fn, init_cache = _model("llama_gqa")
    run = functools.partial(
        generate.generate, decode_fn, init_cache, params, PROMPTS, max_new_tokens=16
    )
    a, _ = run(temperature=1.0, seed=1)
    b, _ = run(temperature=1.0, seed=1)
    c, _ = run(temperature=1.0, seed=2)
    assert (a == b).all() and (a != c).any()
    greedy, _ = run()
    assert (run(temperature=1.0, top_k=1, seed=3)[0] == greedy).all()
    assert (run(temperature=0.7, top_p=1e-6, seed=4)[0] == greedy).all()


def test_top_k_and_top_p_keep_the_right_support():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.asarray(np.log(probs)[None].repeat(4000, 0), jnp.float32)
    rng = jax.random.PRNGKey(0)
    for kw in (dict(top_k=2, top_p=1.0), dict(top_k=0, top_p=0.6)):  # both keep {0, 1}
        tok = np.asarray(generate.sample_logits(logits, rng, temperature=1.0, **kw))
        assert set(tok.tolist()) == {0, 1}
        np.testing.assert_allclose((tok == 0).mean(), 0.5 / 0.8, atol=0.03)
    tok = np.asarray(generate.sample_logits(logits, rng, temperature=1.0, top_k=0, top_p=1.0))
    np.testing.assert_allclose(np.bincount(tok, minlength=4) / 4000, probs, atol=0.03)


def test_bad_arguments():
    _, params, _, decode_fn, init_cache = _model("llama_gqa")
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        generate.generate(decode_fn, init_cache, params, PROMPTS, max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p=1.5"):
        generate.generate(decode_fn, init_cache, params, PROMPTS, max_new_tokens=2, top_p=1.5)
    with pytest.raises(ValueError, match="at least one token"):
        generate.generate(decode_fn, init_cache, params, [[1], []], max_new_tokens=2)
