"""GPT-NeoX (Pythia) decoder in Flax linen, plus Hugging Face config / weight conversion.

Semantics follow Hugging Face ``modeling_gpt_neox.py`` (transformers 5.23) so weights
map one-to-one:

  * LayerNorm with bias: ``(x - mean) * rsqrt(var + eps) * scale + bias``, in float32.
  * Fused ``query_key_value`` projection laid out PER HEAD as ``[q | k | v]``: its
    output is viewed as ``[H, 3*E]`` and split, not as three ``[D]`` blocks.
  * Partial RoPE in the "rotate_half" form on the first ``int(E * rotary_pct)`` dims of
    each head (``cos/sin = concat(freqs, freqs)``); the remaining dims pass through.
    Positions ``arange(T)`` (inputs are RIGHT-padded); in decoding mode, per-row
    positions ``[B, T]``. No rope scaling.
  * Multi-head attention scaled by ``1/sqrt(E)``; causal + key-padding mask with
    ``finfo(float32).min`` (never -inf), softmax in float32, no dropout.
  * MLP ``dense_4h_to_h(act(dense_h_to_4h(x)))``; ``hidden_act="gelu"`` is the exact erf
    form (HF ``ACT2FN``), the ``gelu_new``-style names are the tanh approximation.
  * Residual: parallel ``x + attn(ln1(x)) + mlp(ln2(x))`` when ``use_parallel_residual``,
    else sequential ``h = x + attn(ln1(x)); h + mlp(ln2(h))``.
  * Final LayerNorm, ``embed_out`` (or the ``embed_in`` transpose when tied).

Parameter tree (plain nested dict, float32; Dense kernels are ``[in, out]``, the
transpose of torch's ``weight``)::

  embed_in/embedding                                   [V, D]
  layers_{i}/input_layernorm/{scale,bias}              [D]
  layers_{i}/attention/query_key_value/kernel          [D, 3*D]  (HF per-head [q|k|v] columns)
  layers_{i}/attention/query_key_value/bias            [3*D]     (absent if not attention_bias)
  layers_{i}/attention/dense/kernel (+ bias)           [D, D]
  layers_{i}/post_attention_layernorm/{scale,bias}     [D]
  layers_{i}/mlp/dense_h_to_4h/{kernel,bias}           [D, F], [F]
  layers_{i}/mlp/dense_4h_to_h/{kernel,bias}           [F, D], [D]
  final_layer_norm/{scale,bias}                        [D]
  embed_out/kernel                                     [D, V]  (absent when tied)

Hugging Face conversion (``config_from_hf``, ``config_to_hf``, ``params_from_hf``,
``hf_tensor_names``, ``params_to_hf``) maps this tree to the safetensors names of
``GPTNeoXForCausalLM`` (``gpt_neox.layers.{i}.attention.query_key_value.weight``,
``embed_out.weight``, ...).

Decoding: ``init_cache`` / ``make_decode_fn`` give a KV-cache forward with the same
interface as ``tr_align.models.llama`` (used by ``tr_align.generate``).

Shape suffixes: B batch, T query length, S key length, D hidden, V vocab,
H heads, E head_dim, R rotary dims, F intermediate.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tr_align.models import decoder

# Hugging Face ACT2FN names (transformers/activations.py) -> the same function in JAX.
_ACTIVATIONS: dict[str, Callable] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # nn.functional.gelu (erf)
    "gelu_python": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),  # tanh approximation
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_python_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}
HF_MODEL_TYPE = "gpt_neox"
HF_ARCHITECTURE = "GPTNeoXForCausalLM"
# Non-parameter buffers that old GPT-NeoX checkpoints carry (causal-mask / rotary caches);
# a loader should skip tensor names ending in any of these.
IGNORED_HF_SUFFIXES = (".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq")
# Keys a rope_parameters / rope_scaling block may hold when it describes plain RoPE.
_ROPE_KEYS = ("rope_type", "type", "rope_theta", "partial_rotary_factor")


@dataclasses.dataclass(frozen=True)
class GPTNeoXConfig(decoder.ConfigDict):
    """Model hyper-parameters; field names equal Hugging Face ``config.json`` keys.

    ``rotary_pct`` / ``rotary_emb_base`` are the hub (Pythia) spelling; transformers 5
    writes them as ``rope_parameters.partial_rotary_factor`` / ``rope_theta``
    (``config_from_hf`` reads both). ``dtype`` is the compute dtype; params are float32.
    """

    model_type: ClassVar[str] = "gpt_neox"  # the Hugging Face architecture (not a field)

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    rotary_pct: float = 0.25
    rotary_emb_base: float = 10000.0
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True
    hidden_act: str = "gelu"
    tie_word_embeddings: bool = False
    attention_bias: bool = True
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    dtype: str = "float32"
    remat: str = "none"  # per-block rematerialisation: none | full | save_dots (not exported)

    def __post_init__(self):
        self.check_common()
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"GPTNeoXConfig.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        for name in ("use_parallel_residual", "tie_word_embeddings", "attention_bias"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"GPTNeoXConfig.{name} must be a bool, got {value!r}")
        if not 0.0 <= self.rotary_pct <= 1.0:
            raise ValueError(f"GPTNeoXConfig.rotary_pct must be in [0, 1], got {self.rotary_pct!r}")
        if 2 * -(-self.rotary_ndims // 2) > self.head_dim:
            raise ValueError(
                f"GPTNeoXConfig.rotary_pct ({self.rotary_pct}) rotates an odd number of dims "
                f"({self.rotary_ndims}) equal to head_dim; HF would rotate head_dim + 1"
            )
        if not self.rotary_emb_base > 0:
            raise ValueError(
                f"GPTNeoXConfig.rotary_emb_base must be > 0, got {self.rotary_emb_base!r}"
            )
        if not self.layer_norm_eps > 0:
            raise ValueError(
                f"GPTNeoXConfig.layer_norm_eps must be > 0, got {self.layer_norm_eps!r}"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"GPTNeoXConfig.hidden_act must be one of {sorted(_ACTIVATIONS)}, "
                f"got {self.hidden_act!r}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_ndims(self) -> int:
        """int(head_dim * rotary_pct), as HF computes it (see ``rope_cos_sin`` for odd values)."""
        return int(self.head_dim * self.rotary_pct)


# ----------------------------------------------------------------------------
# Pure functions.


def rope_cos_sin(
    positions_T: jax.Array, rotary_ndims: int, base: float
) -> tuple[jax.Array, jax.Array]:
    """HF rotary tables. positions [T] (or [B, T]) int -> (cos, sin) each [T, R] ([B, T, R]).

    inv_freq = base ** (-arange(0, r, 2) / r) with r = rotary_ndims; cos/sin of
    concat(freqs, freqs), so R = 2 * ceil(r / 2) (= r unless r is odd, where HF rotates
    r + 1 dims; replicated as is). r = 0 gives empty tables (no rotation).
    """
    exponents = jnp.arange(0, rotary_ndims, 2, dtype=jnp.float32) / max(rotary_ndims, 1)
    inv_freq = 1.0 / (base**exponents)
    freqs_TR2 = positions_T.astype(jnp.float32)[..., None] * inv_freq
    emb_TR = jnp.concatenate([freqs_TR2, freqs_TR2], axis=-1)
    return jnp.cos(emb_TR), jnp.sin(emb_TR)


def apply_partial_rope(x_BTHE: jax.Array, cos_TR: jax.Array, sin_TR: jax.Array) -> jax.Array:
    """Rotates the first R dims of each head (x*cos + rotate_half(x)*sin); the rest pass.

    rotate_half(x) = concat(-x2, x1) over the R rotated dims. Tables are [T, R] (shared
    positions) or [B, T, R] (per-row positions, e.g. decoding). Keeps x dtype.
    """
    r = cos_TR.shape[-1]
    if r == 0:
        return x_BTHE
    x_rot, x_pass = x_BTHE[..., :r], x_BTHE[..., r:]
    x1, x2 = x_rot[..., : r // 2], x_rot[..., r // 2 :]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    expand = (lambda c: c[None, :, None, :]) if cos_TR.ndim == 2 else (lambda c: c[:, :, None, :])
    cos = expand(cos_TR).astype(x_BTHE.dtype)
    sin = expand(sin_TR).astype(x_BTHE.dtype)
    return jnp.concatenate([x_rot * cos + rotated * sin, x_pass], axis=-1)


# ----------------------------------------------------------------------------
# Modules.


class LayerNorm(nn.Module):
    """(x - mean) * rsqrt(var + eps) * scale + bias, in float32. [..., D] -> [..., D]."""

    eps: float
    dtype: Any

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (d,), jnp.float32)
        x32 = x.astype(jnp.float32)
        centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(centred * centred, axis=-1, keepdims=True)
        y = centred * jax.lax.rsqrt(var + self.eps) * scale + bias
        return y.astype(self.dtype)


def _qkv(cfg: GPTNeoXConfig, x_ND):
    """q, k, v [N,H,E] from the fused projection, laid out per head as [q | k | v] (HF)."""
    h, e = cfg.num_attention_heads, cfg.head_dim
    qkv = decoder.dense(cfg, 3 * cfg.hidden_size, "query_key_value", cfg.attention_bias)(x_ND)
    qkv_NH3E = qkv.reshape(x_ND.shape[0], h, 3 * e)
    return qkv_NH3E[..., :e], qkv_NH3E[..., e : 2 * e], qkv_NH3E[..., 2 * e :]


class Mlp(nn.Module):
    """dense_4h_to_h(act(dense_h_to_4h(x))). [..., D] -> [..., D]."""

    cfg: GPTNeoXConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        y = decoder.dense(cfg, cfg.intermediate_size, "dense_h_to_4h", True)(x)
        y = _ACTIVATIONS[cfg.hidden_act](y)
        return decoder.dense(cfg, cfg.hidden_size, "dense_4h_to_h", True)(y)


FAMILY = decoder.Family(
    embed_name="embed_in",
    attention_name="attention",
    out_proj_name="dense",
    final_norm_name="final_layer_norm",
    head_name="embed_out",
    norm=lambda cfg, name: LayerNorm(cfg.layer_norm_eps, decoder.DTYPES[cfg.dtype], name=name),
    qkv=_qkv,
    mlp=Mlp,
    rope_tables=lambda cfg, positions: rope_cos_sin(
        positions, cfg.rotary_ndims, cfg.rotary_emb_base
    ),
    apply_rope=apply_partial_rope,
    kv_heads=lambda cfg: cfg.num_attention_heads,
    out_bias=lambda cfg: cfg.attention_bias,
    parallel_residual=lambda cfg: cfg.use_parallel_residual,
)


# Logical axes of every parameter (``decoder.param_axes``). The fused qkv columns are per
# head ([H, 3*E]), so splitting them over heads keeps each head's q, k, v together.
PARAM_AXES = decoder.param_axes(
    FAMILY,
    "(scale|bias)",
    (
        (r"layers_\d+/attention/query_key_value/kernel", ("embed", "heads")),
        (r"layers_\d+/attention/query_key_value/bias", ("heads",)),
        (r"layers_\d+/attention/dense/kernel", ("heads", "embed")),
        (r"layers_\d+/attention/dense/bias", ("embed",)),
        (r"layers_\d+/mlp/dense_h_to_4h/kernel", ("embed", "mlp")),
        (r"layers_\d+/mlp/dense_h_to_4h/bias", ("mlp",)),
        (r"layers_\d+/mlp/dense_4h_to_h/kernel", ("mlp", "embed")),
        (r"layers_\d+/mlp/dense_4h_to_h/bias", ("embed",)),
    ),
)


# ----------------------------------------------------------------------------
# Public API.


def head_logits(config: GPTNeoXConfig, params: dict, x: jax.Array) -> jax.Array:
    """The output projection alone: final-norm hidden [..., D] -> logits [..., V] float32
    (``embed_out``, or the ``embed_in`` transpose when tied), the same ops as the model's."""
    return decoder.head_logits(FAMILY, config, params, x)


def make_model(config: GPTNeoXConfig) -> tuple[Callable, Callable]:
    """(init_fn, apply_fn): see ``common.model_fns`` (tree in the module doc)."""
    return decoder.make_model(FAMILY, config)


def make_decode_fn(config: GPTNeoXConfig) -> Callable:
    """Cached forward for ``tr_align.generate``: see ``common.decode_fn``."""
    return decoder.make_decode_fn(FAMILY, config)


def init_cache(config: GPTNeoXConfig, batch: int, length: int, dtype=None) -> list[dict]:
    """Zeroed KV cache (``decoder.init_cache``): per layer {"k", "v"} [batch, length, H, E]."""
    return decoder.init_cache(FAMILY, config, batch, length, dtype)


# ----------------------------------------------------------------------------
# Hugging Face conversion.


def config_from_hf(d: dict[str, Any]) -> GPTNeoXConfig:
    """GPTNeoXConfig from a parsed Hugging Face ``config.json`` (``model_type`` gpt_neox).

    Reads the rotary settings the way transformers' GPTNeoXConfig does: a
    ``rope_scaling`` block, else ``rope_parameters`` (transformers 5), wins over the
    top-level hub spelling ``rotary_pct`` / ``rotary_emb_base`` (Pythia); a top-level
    ``rope_theta`` is ignored (HF ignores it for gpt_neox too). Missing optional keys take
    HF's GPTNeoXConfig defaults; keys that don't affect the forward pass (architectures,
    dropouts, token ids, dtype, use_cache, ...) are ignored. Raises ValueError naming the
    key for a missing size, another model_type, non-default RoPE (scaling) or a
    ``head_dim`` other than hidden_size // num_attention_heads.
    """
    model_type = d.get("model_type", HF_MODEL_TYPE)
    if model_type != HF_MODEL_TYPE:
        raise ValueError(
            f"config_from_hf: model_type must be {HF_MODEL_TYPE!r}, got {model_type!r}"
        )
    sizes = {}
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
    ):
        if key not in d:
            raise ValueError(f"config_from_hf: missing required key {key!r}")
        sizes[key] = d[key]

    rope_key = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
    rope = d.get(rope_key) or {}
    if not isinstance(rope, dict):
        raise ValueError(f"config_from_hf: {rope_key} must be a dict, got {rope!r}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(
            f"config_from_hf: {rope_key}.rope_type must be 'default' (no rope scaling), "
            f"got {rope_type!r}"
        )
    unsupported = sorted(set(rope) - set(_ROPE_KEYS))
    if unsupported:
        raise ValueError(
            f"config_from_hf: unsupported {rope_key} keys {unsupported} (only plain RoPE: "
            f"{list(_ROPE_KEYS)}); got {rope!r}"
        )
    theta = rope.get("rope_theta")
    if theta is None:
        theta = d.get("rotary_emb_base", 10000.0)
    pct = rope.get("partial_rotary_factor")
    if pct is None:
        pct = d.get("rotary_pct", 0.25)

    head_dim = d.get("head_dim")
    if head_dim is not None and head_dim != sizes["hidden_size"] // sizes["num_attention_heads"]:
        raise ValueError(
            f"config_from_hf: head_dim ({head_dim!r}) must equal hidden_size // "
            f"num_attention_heads for gpt_neox"
        )

    return GPTNeoXConfig(
        **sizes,
        rotary_pct=float(pct),
        rotary_emb_base=float(theta),
        layer_norm_eps=float(d.get("layer_norm_eps", 1e-5)),
        use_parallel_residual=d.get("use_parallel_residual", True),
        hidden_act=d.get("hidden_act", "gelu"),
        tie_word_embeddings=d.get("tie_word_embeddings", False),
        attention_bias=d.get("attention_bias", True),
        max_position_embeddings=d.get("max_position_embeddings", 2048),
        initializer_range=float(d.get("initializer_range", 0.02)),
    )


def config_to_hf(cfg: GPTNeoXConfig) -> dict[str, Any]:
    """A ``config.json`` dict that transformers loads as GPTNeoXForCausalLM.

    Writes the rotary settings both as ``rope_parameters`` (transformers 5) and as
    ``rotary_pct`` / ``rotary_emb_base`` (older readers); ``dtype`` float32 matches
    ``params_to_hf``. Our compute ``dtype`` is not exported.
    """
    return {
        "architectures": [HF_ARCHITECTURE],
        "model_type": HF_MODEL_TYPE,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "hidden_act": cfg.hidden_act,
        "layer_norm_eps": cfg.layer_norm_eps,
        "use_parallel_residual": cfg.use_parallel_residual,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias,
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": cfg.initializer_range,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": cfg.rotary_emb_base,
            "partial_rotary_factor": cfg.rotary_pct,
        },
        "rotary_pct": cfg.rotary_pct,
        "rotary_emb_base": cfg.rotary_emb_base,
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
        "use_cache": True,
        "dtype": cfg.dtype,
    }


def _hf_spec(cfg: GPTNeoXConfig) -> list[tuple[str, tuple[str, ...], tuple[int, ...], bool]]:
    """(HF tensor name, our param path, torch shape, transposed) for every tensor."""
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    spec = [("gpt_neox.embed_in.weight", ("embed_in", "embedding"), (v, d), False)]

    def linear(hf: str, path: tuple[str, ...], n_out: int, n_in: int, bias: bool = True):
        spec.append((f"{hf}.weight", (*path, "kernel"), (n_out, n_in), True))
        if bias:
            spec.append((f"{hf}.bias", (*path, "bias"), (n_out,), False))

    def layer_norm(hf: str, path: tuple[str, ...]):
        spec.append((f"{hf}.weight", (*path, "scale"), (d,), False))
        spec.append((f"{hf}.bias", (*path, "bias"), (d,), False))

    for i in range(cfg.num_hidden_layers):
        hf, ours = f"gpt_neox.layers.{i}", f"layers_{i}"
        layer_norm(f"{hf}.input_layernorm", (ours, "input_layernorm"))
        layer_norm(f"{hf}.post_attention_layernorm", (ours, "post_attention_layernorm"))
        qkv = (ours, "attention", "query_key_value")
        linear(f"{hf}.attention.query_key_value", qkv, 3 * d, d, cfg.attention_bias)
        dense = (ours, "attention", "dense")
        linear(f"{hf}.attention.dense", dense, d, d, cfg.attention_bias)
        linear(f"{hf}.mlp.dense_h_to_4h", (ours, "mlp", "dense_h_to_4h"), f, d)
        linear(f"{hf}.mlp.dense_4h_to_h", (ours, "mlp", "dense_4h_to_h"), d, f)
    layer_norm("gpt_neox.final_layer_norm", ("final_layer_norm",))
    if not cfg.tie_word_embeddings:
        linear("embed_out", ("embed_out",), v, d, bias=False)
    return spec


def hf_kernel_modules(cfg: GPTNeoXConfig) -> dict[str, str]:
    """{our kernel path: the HF module holding it as ``.weight``} (LoRA / PEFT names)."""
    return {
        "/".join(path): name.removesuffix(".weight")
        for name, path, _, transposed in _hf_spec(cfg)
        if transposed and path[-1] == "kernel"
    }


def hf_tensor_names(cfg: GPTNeoXConfig) -> list[str]:
    """Every HF tensor name ``params_from_hf`` reads (names ending in IGNORED_HF_SUFFIXES
    are buffers of old checkpoints, not parameters)."""
    return [name for name, _, _, _ in _hf_spec(cfg)]


def params_from_hf(get: Callable[[str], Any], cfg: GPTNeoXConfig) -> dict:
    """Our nested params from HF tensors; ``get(name)`` returns one tensor by its HF name.

    Torch ``[out, in]`` weights become ``[in, out]`` kernels (``.T``); ``query_key_value``
    keeps HF's per-head ``[q|k|v]`` column order. Tensors are only reshaped by ``.T``
    and checked by ``.shape``, so ``get`` may return lazy tensors (``tr_align.hf`` reads
    each device's slice on demand); the caller casts. A missing tensor propagates
    ``get``'s KeyError; a wrong shape raises ValueError naming the tensor and both shapes.
    """
    params: dict = {}
    for name, path, shape, transposed in _hf_spec(cfg):
        arr = get(name)
        if tuple(arr.shape) != tuple(shape):
            raise ValueError(f"HF tensor {name}: expected shape {shape}, got {tuple(arr.shape)}")
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = arr.T if transposed else arr
    return params


def params_to_hf(params: dict, cfg: GPTNeoXConfig) -> dict[str, np.ndarray]:
    """Inverse of ``params_from_hf``: {HF name: numpy array in torch layout, params' dtype}.

    Raises ValueError naming the parameter for a wrong shape, and for parameters the
    config does not have (e.g. ``embed_out`` on a tied config).
    """
    spec = _hf_spec(cfg)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    present = {tuple(k.key for k in path) for path, _ in leaves}
    unexpected = sorted("/".join(p) for p in present - {path for _, path, _, _ in spec})
    if unexpected:
        raise ValueError(f"params_to_hf: parameters not in the config's tree: {unexpected}")
    out = {}
    for name, path, shape, transposed in spec:
        node = params
        for key in path:
            node = node[key]
        arr = np.asarray(node)
        ours = tuple(reversed(shape)) if transposed else shape
        if arr.shape != ours:
            raise ValueError(
                f"params_to_hf: {'/'.join(path)} (HF {name}): expected shape {ours}, "
                f"got {arr.shape}"
            )
        out[name] = np.ascontiguousarray(arr.T if transposed else arr)
    return out
