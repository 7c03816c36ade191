"""LoRA as a transform of the parameter pytree, and the trust-region reference with LoRA.

A LoRA run trains small adapters on top of a frozen base (Hu et al. 2021). For every target
matrix ``W`` [in, out] (a Dense kernel whose "/"-joined path full-matches one of
``lora.targets``) the policy's effective weight is

    W_eff = W + (alpha / rank) * A @ B,     A [in, rank], B [rank, out]

with ``A`` uniform in +-1/sqrt(in) (PEFT's kaiming-uniform with a = sqrt(5)) and ``B`` zero,
so the policy starts as the base. ``merge(base, deltas)`` builds the model's full parameter
tree from the base and the per-target deltas inside the jitted step, so every model, the
chunked head and the sharding rules work unchanged: the train step
(``tr_align.training.step``) differentiates with respect to the adapters only
(``TrainState.params``), the optimizer state mirrors the adapters, and the base
(``TrainState.base``, optionally bfloat16: ``lora.base_dtype``) gets no gradient, no
optimizer state and is never checkpointed (a run rebuilds it from ``model.pretrained``, or
from the seed for a model from scratch: ``make_base``).

Adapter tree: the base's nesting with each target kernel replaced by
``{"lora_a": A, "lora_b": B}`` (``layers_0/self_attn/q_proj/kernel/lora_a``); their logical
axes come from the kernel's (``param_axes``): A [in, rank] shards like W's input dimension,
B [rank, out] like its output, the rank dimension is replicated.

The reference (``trust_region.lora_mode``) is the same frozen base plus:

* no reference adapters at all for a frozen reference (vanilla DPO: the reference *is* the
  base; zero extra memory);
* ``factors`` (default): reference adapters (A_ref, B_ref), updated by the paper's rule on
  each factor separately (``trust_region.update_reference``): a hard update (alpha = 1)
  copies the policy's adapters exactly; a soft one gives
  A_ref <- a A + (1 - a) A_ref, B_ref <- a B + (1 - a) B_ref, whose product is *not* the
  EMA of the products (cross terms a (1 - a) (A B_ref + A_ref B)); O(adapter) memory;
* ``merged``: the reference's delta itself, a dense [in, out] buffer per target updated as
  the exact EMA  D_ref <- a * (alpha / rank) A @ B + (1 - a) * D_ref  (memory of the
  targets of a full model).

Either way the reference's effective weights are base + its delta (``reference_deltas``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp

from tr_align import trust_region
from tr_align.defaults import DEFAULTS
from tr_align.defaults import get as get_optional
from tr_align.errors import ConfigError
from tr_align.models.common import FactoredKernel

A, B = "lora_a", "lora_b"
# The attention and MLP projections of both families: Llama q/k/v/o_proj, gate/up/down_proj;
# GPT-NeoX query_key_value, dense, dense_h_to_4h, dense_4h_to_h.
DEFAULT_TARGETS = DEFAULTS["lora.targets"].value
MODES = ("factors", "merged")


def path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


@dataclasses.dataclass(frozen=True)
class Lora:
    """The ``lora`` config block (and ``trust_region.lora_mode``) as the transform."""

    rank: int
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    base_dtype: str = "float32"
    mode: str = "factors"
    # the model's compute dtype (model.dtype): merged weights are made in it (the model
    # would cast W + delta to it anyway), so a bfloat16 run's merged targets take 2 bytes
    compute_dtype: str = "float32"

    @property
    def scale(self) -> float:
        return float(self.alpha) / int(self.rank)

    # ------------------------------------------------------------------ structure

    def target_paths(self, params) -> list[str]:
        """The "/"-joined paths of the 2-D parameters ``targets`` selects, in tree order."""
        pats = [re.compile(t) for t in self.targets]
        out = []
        for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
            name = path_str(path)
            if len(getattr(x, "shape", ())) == 2 and any(p.fullmatch(name) for p in pats):
                out.append(name)
        return out

    def check_targets(self, params) -> list[str]:
        """``target_paths``, or a ConfigError naming the regex that selects nothing."""
        paths = self.target_paths(params)
        for t in self.targets:
            if not any(re.fullmatch(t, p) for p in paths):
                raise ConfigError(
                    f"lora.targets: {t!r} matches no 2-D parameter of the model (paths look "
                    f"like {_example_paths(params)})"
                )
        return paths

    # ------------------------------------------------------------------ init

    def make_base(self, params):
        """The frozen base: ``params`` in ``base_dtype``."""
        dtype = jnp.dtype(self.base_dtype)
        return jax.tree.map(lambda x: jnp.asarray(x, dtype), params)

    def init_adapters(self, rng, base):
        """Fresh adapters for ``base``: A uniform(+-1/sqrt(in)), B zero, float32."""
        flat = {}
        for i, path in enumerate(self.check_targets(base)):
            shape = _get(base, path).shape
            key = jax.random.fold_in(rng, i)
            bound = 1.0 / math.sqrt(shape[0])
            flat[path] = {
                A: jax.random.uniform(key, (shape[0], self.rank), jnp.float32, -bound, bound),
                B: jnp.zeros((self.rank, shape[1]), jnp.float32),
            }
        return _nest(flat)

    def init_reference(self, adapters, *, enabled: bool, dtype=None):
        """The reference's state at step 0 (its delta is 0 = the policy's): None for a frozen
        reference; a copy of the adapters (factors); zero [in, out] deltas (merged)."""
        if not enabled:
            return None
        if self.mode == "factors":
            return jax.tree.map(lambda x: jnp.array(x, dtype=dtype or x.dtype, copy=True), adapters)
        return _nest(
            {
                p: jnp.zeros((ab[A].shape[0], ab[B].shape[1]), dtype or jnp.float32)
                for p, ab in flat_adapters(adapters).items()
            }
        )

    # ------------------------------------------------------------------ views

    def policy_deltas(self, adapters, dropout_rng=None) -> dict:
        """{path: (alpha / rank) * A @ B} float32. With ``dropout`` > 0 and ``dropout_rng``,
        the adapter's input features are dropped (a row mask on A, kept rows scaled by
        1 / (1 - dropout)), one mask per step."""
        return {
            path: self.scale * (a @ b.astype(jnp.float32))
            for path, (a, b) in self._dropped(adapters, dropout_rng).items()
        }

    def reference_deltas(self, ref) -> dict:
        """{path: the reference's delta}: {} for None (the base), the product of the
        reference factors, or the merged buffers."""
        if ref is None:
            return {}
        if self.mode == "factors":
            return self.policy_deltas(ref)
        return {p: d.astype(jnp.float32) for p, d in flat_leaves(ref).items()}

    def _dropped(self, adapters, dropout_rng):
        """{path: (A, B)} float32, A with the dropout row mask of ``policy_deltas``."""
        out = {}
        for i, (path, ab) in enumerate(flat_adapters(adapters).items()):
            a = ab[A].astype(jnp.float32)
            if self.dropout and dropout_rng is not None:
                keep = jax.random.bernoulli(
                    jax.random.fold_in(dropout_rng, i), 1.0 - self.dropout, (a.shape[0], 1)
                )
                a = jnp.where(keep, a / (1.0 - self.dropout), 0.0)
            out[path] = (a, ab[B])
        return out

    def policy_view(self, base, adapters, dropout_rng=None):
        """The policy's parameter tree for the forward inside the step: each target kernel
        as ``FactoredKernel(W, A, B, scale)``, applied factor by factor by the model's
        projections (``x @ W + scale (x @ A) @ B``: no [in, out] merged weight or gradient is
        ever formed); a 2-D target that is not a projection kernel (an embedding) merged."""
        return _view(base, self._dropped(adapters, dropout_rng), self.scale, self.compute_dtype)

    def reference_view(self, base, ref):
        """The reference's tree for the forward: factors as in ``policy_view``; merged
        deltas (``lora_mode="merged"``) added to the base; the base for None."""
        if ref is None:
            return base
        if self.mode == "factors":
            return self.policy_view(base, ref)
        return self.reference(base, ref)

    def policy(self, base, adapters, dropout_rng=None):
        """The policy's full parameter tree: base + its deltas."""
        return merge(base, self.policy_deltas(adapters, dropout_rng), self.compute_dtype)

    def reference(self, base, ref):
        """The reference's full parameter tree: base + its delta (the base for None)."""
        return merge(base, self.reference_deltas(ref), self.compute_dtype)

    # ------------------------------------------------------------------ sharding

    def param_axes(self, table) -> tuple:
        """A ``PARAM_AXES``-style table covering the base (``table``), the adapters (A: the
        kernel's input name and None, B: None and its output name) and the merged buffers
        (the kernels' own paths)."""
        extra = []
        for pattern, names in table:
            if len(names) == 2:
                extra.append((pattern + "/" + A, (names[0], None)))
                extra.append((pattern + "/" + B, (None, names[1])))
        return tuple(extra) + tuple(table)


def _example_paths(params, n: int = 3) -> str:
    paths = [path_str(p) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]]
    return ", ".join(paths[:n]) + (", ..." if len(paths) > n else "")


def _get(tree, path: str):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def _nest(flat: dict) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        keys = path.split("/")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return out


def flat_leaves(tree) -> dict:
    """{"/"-joined path: leaf} of a tree (e.g. merged reference buffers)."""
    return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def flat_adapters(adapters) -> dict:
    """{target path: {"lora_a": A, "lora_b": B}} of an adapter tree, in tree order."""
    out: dict = {}
    for path, x in flat_leaves(adapters).items():
        target, _, which = path.rpartition("/")
        out.setdefault(target, {})[which] = x
    return out


def merge(base, deltas: dict, dtype: str = "float32"):
    """``base`` with ``W + delta`` (summed in float32, then cast to ``dtype``, the model's
    compute dtype) at every path of ``deltas``; other leaves as they are (the model casts
    them to its compute dtype)."""
    if not deltas:
        return base

    def one(path, w):
        d = deltas.get(path_str(path))
        if d is None:
            return w
        return (w.astype(jnp.promote_types(w.dtype, jnp.float32)) + d).astype(dtype)

    return jax.tree_util.tree_map_with_path(one, base)


def _view(base, factors: dict, scale: float, dtype: str):
    """``base`` with every projection kernel of ``factors`` ({path: (A, B)}) as a
    ``FactoredKernel`` and any other target merged (``merge``)."""
    kernels = {p: ab for p, ab in factors.items() if p.rsplit("/", 1)[-1] == "kernel"}
    others = {p: scale * (a @ b.astype(jnp.float32)) for p, (a, b) in factors.items()
              if p not in kernels}  # fmt: skip
    tree = merge(base, others, dtype)

    def one(path, w):
        ab = kernels.get(path_str(path))
        return w if ab is None else FactoredKernel(w, ab[0], ab[1], scale)

    return jax.tree_util.tree_map_with_path(one, tree)


def delta_distance(lora: Lora, adapters, ref) -> jax.Array:
    """L2 distance between the policy's and the reference's effective weights (the base
    cancels): sqrt(sum over targets of ||delta_policy - delta_ref||^2), float32."""
    pol, refd = lora.policy_deltas(adapters), lora.reference_deltas(ref)
    total = jnp.zeros((), jnp.float32)
    for p, d in pol.items():
        diff = d - refd[p] if p in refd else d
        total = total + jnp.sum(jnp.square(diff))
    return jnp.sqrt(total)


@dataclasses.dataclass(frozen=True)
class LoraReferenceUpdate:
    """The trust-region rule on the reference of a LoRA run (``TrainState.apply_gradients``
    calls ``update(ref, adapters, step)`` as for a full model): ``factors`` mixes the
    factors A and B separately; ``merged`` mixes the dense deltas exactly. Every ``tau``
    steps, soft for alpha < 1, a copy for alpha = 1."""

    alpha: float
    tau: int
    lora: Lora

    def __post_init__(self):
        trust_region.validate(self.alpha, self.tau)

    def update(self, ref, adapters, step):
        if self.lora.mode == "factors":
            return trust_region.update_reference(
                ref, adapters, step, alpha=self.alpha, tau=self.tau
            )

        def mix(r):
            policy = _nest(self.lora.policy_deltas(adapters))
            return trust_region.update_reference(r, policy, step, alpha=self.alpha, tau=1)

        if self.tau == 1:
            return mix(ref)
        is_sync = trust_region.num_updates(step, enabled=True, tau=self.tau) * self.tau == step
        return jax.lax.cond(is_sync, mix, lambda r: r, ref)

    def num_updates(self, step):
        return trust_region.num_updates(step, enabled=True, tau=self.tau)


def from_config(config) -> Lora | None:
    """The config's ``Lora`` (``lora.*`` keys, ``trust_region.lora_mode``), None when
    ``lora.rank`` is 0 (full fine-tuning)."""
    rank = get_optional(config, "lora.rank")
    if not rank:
        return None
    return Lora(
        rank=int(rank),
        alpha=float(get_optional(config, "lora.alpha")),
        dropout=float(get_optional(config, "lora.dropout")),
        targets=tuple(get_optional(config, "lora.targets")),
        base_dtype=get_optional(config, "lora.base_dtype"),
        mode=get_optional(config, "trust_region.lora_mode"),
        compute_dtype=get_optional(config, "model.dtype"),
    )


def reference_update(lora: Lora, tr_cfg) -> LoraReferenceUpdate | None:
    """The ``trust_region`` block's update for a LoRA run, None for a frozen reference."""
    if not tr_cfg.enabled:
        return None
    return LoraReferenceUpdate(alpha=float(tr_cfg.alpha), tau=int(tr_cfg.tau), lora=lora)


def count(adapters: Any) -> int:
    """Trainable parameters of an adapter tree."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(adapters))
