"""Device mesh and sharding by rules: logical axis names -> mesh axes.

The mesh has three named axes: ``data`` (pure data parallelism), ``fsdp`` (data
parallelism whose devices also shard parameters, reference and optimizer state) and
``tensor`` (model parallelism). Every parameter dimension and the activations at block
boundaries carry a *logical* name (``vocab``, ``embed``, ``mlp``, ``heads``,
``kv_heads``, ``norm``; ``batch``, ``length``); a rules table maps names to mesh axes::

    DEFAULT_RULES = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"),
                     ("heads", "tensor"), ("kv_heads", "tensor"), ("vocab", "tensor"),
                     ("length", None), ("head_dim", None), ("norm", None))

Resolving one array (``logical_to_spec``), rules are tried in order (first match wins,
as in flax's ``logical_axis_rules``). A rule is skipped for a dimension when

  * one of its mesh axes is already used by another dimension of the same array (so the
    activations' ``embed`` is not split over ``fsdp`` once ``batch`` holds it), or
  * the dimension's size is not divisible by the product of its mesh axes' sizes.

A dimension no rule fits is replicated. So a non-divisible dimension falls back to the
next rule for its name, then to replication; never to an uneven split. ``param_specs``
reports such parameter fallbacks so they are not silent (the loop logs them).

Which logical names a parameter has comes from its model module's ``PARAM_AXES``: regexes
over the "/"-joined parameter path (full match, first wins) -> one name per dimension
(big_vision style). A parameter that no regex matches is an error naming its path.

``state_shardings`` shards the policy, the reference and every optimizer-state subtree
that mirrors the parameters (Adam's moments) identically; other leaves (step counts,
the PRNG key) are replicated.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import re

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
LOGICAL_AXES = ("batch", "length", "embed", "mlp", "heads", "kv_heads", "head_dim", "vocab", "norm")
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("length", None),
    ("head_dim", None),
    ("norm", None),
)
ACTIVATION_BTD = ("batch", "length", "embed")  # the residual stream between blocks


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
    """Resolves a ``{data, fsdp, tensor}`` config (one entry may be -1) to a shape."""
    shape = [int(mesh_cfg[a]) for a in AXES]
    free = [i for i, s in enumerate(shape) if s == -1]
    if len(free) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(
            f"mesh={dict(zip(AXES, shape))}: each axis must be a positive size, at most one may be -1"
        )
    known = math.prod(s for s in shape if s != -1)
    if free:
        if num_devices % known:
            raise ValueError(f"mesh={dict(zip(AXES, shape))} does not divide {num_devices} devices")
        shape[free[0]] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"mesh={dict(zip(AXES, shape))} needs {math.prod(shape)} devices, {num_devices} available"
        )
    return tuple(shape)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # noqa: BLE001 - topology-unaware fallback (e.g. CPU subsets)
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the data-parallel axes."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# ----------------------------------------------------------------------------
# Rules.


def _as_axes(mesh_axes) -> tuple[str, ...]:
    if mesh_axes is None:
        return ()
    return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def make_rules(overrides=()) -> tuple:
    """``overrides`` (e.g. config ``mesh.rules``, pairs [logical, mesh axes]) take
    precedence over ``DEFAULT_RULES`` for the names they mention."""
    return tuple((str(name), axes) for name, axes in overrides) + DEFAULT_RULES


def check_rules(rules) -> str | None:
    """None if ``rules`` is a valid list of [logical name, mesh axes] pairs, else the problem."""
    if not isinstance(rules, (list, tuple)):
        return "must be a list of [logical axis, mesh axes] pairs"
    for rule in rules:
        if not isinstance(rule, (list, tuple)) or len(rule) != 2:
            return f"entry {rule!r} is not a [logical axis, mesh axes] pair"
        name, axes = rule
        if name not in LOGICAL_AXES:
            return f"unknown logical axis {name!r}; expected one of {', '.join(LOGICAL_AXES)}"
        ok = axes is None or isinstance(axes, str) or isinstance(axes, (list, tuple))
        if not ok or any(a not in AXES for a in _as_axes(axes)):
            return f"{name!r}: mesh axes {axes!r} must be None or names from {', '.join(AXES)}"
        if len(set(_as_axes(axes))) != len(_as_axes(axes)):
            return f"{name!r}: mesh axes {axes!r} repeat an axis"
    return None


def logical_to_spec(names, shape, axis_sizes, rules=DEFAULT_RULES, fallbacks=None) -> P:
    """PartitionSpec of an array whose dimensions have logical ``names`` (see module doc).

    Args:
      names: one logical name (or None) per dimension.
      shape: the array's shape.
      axis_sizes: mesh axis name -> size (``dict(mesh.shape)``).
      rules: ordered (logical name, None | mesh axis | tuple of mesh axes) pairs.
      fallbacks: optional list; gets (dim, name, mesh axes) for every dimension a rule with
        more than one device was skipped for because the size does not divide.
    """
    if len(names) != len(shape):
        raise ValueError(f"logical axes {tuple(names)} do not match the shape {tuple(shape)}")
    out, done, used = [None] * len(shape), [False] * len(shape), set()
    for name, mesh_axes in rules:
        axes = _as_axes(mesh_axes)
        for i, n in enumerate(names):
            if done[i] or n != name or used & set(axes):
                continue
            size = math.prod(axis_sizes[a] for a in axes)
            if shape[i] % size:
                if fallbacks is not None:
                    fallbacks.append((i, name, axes))
                continue
            done[i] = True
            used |= set(axes)
            out[i] = None if not axes else axes[0] if len(axes) == 1 else axes
    return P(*out)


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def param_logical_axes(params, table):
    """Tree of logical-name tuples, one per parameter, from a model's ``PARAM_AXES`` table."""

    def one(path, x):
        name = _path_str(path)
        for pattern, names in table:
            if re.fullmatch(pattern, name):
                if len(names) != len(x.shape):
                    raise ValueError(
                        f"parameter {name}: PARAM_AXES gives {names} for shape {tuple(x.shape)}"
                    )
                return tuple(names)
        raise ValueError(f"parameter {name}: no PARAM_AXES rule matches its path")

    return jax.tree_util.tree_map_with_path(one, params)


def param_specs(params, table, axis_sizes, rules=DEFAULT_RULES):
    """(tree of PartitionSpec, fallback notes) for a params tree (arrays or ShapeDtypeStructs).

    Notes are "path dim k (name): size s not divisible by axes ... -> replicated/next rule".
    """
    axes_tree = param_logical_axes(params, table)
    notes = []

    def one(path, x, names):
        fb = []
        spec = logical_to_spec(names, x.shape, axis_sizes, rules, fb)
        for i, name, axes in fb:
            n = math.prod(axis_sizes[a] for a in axes)
            if n > 1:
                notes.append(
                    f"{_path_str(path)} dim {i} ({name}, size {x.shape[i]}) not divisible by "
                    f"{'*'.join(axes)}={n}"
                )
        return spec

    specs = jax.tree_util.tree_map_with_path(
        one, params, axes_tree, is_leaf=lambda x: isinstance(x, tuple)
    )
    return specs, notes


def state_shardings(mesh: Mesh, abstract_state, param_axes=None, rules=DEFAULT_RULES):
    """NamedSharding of every leaf of a ``TrainState`` (of arrays or ShapeDtypeStructs).

    ``params``, ``ref_params`` (when the state holds a reference) and ``base`` (a LoRA
    run's frozen base) get the specs from ``param_axes`` (a model's ``PARAM_AXES`` table;
    for LoRA ``tr_align.lora.Lora.param_axes`` of it, which also names the adapters) and
    ``rules``; so does every subtree of ``opt_state`` with the params' tree structure and
    shapes (Adam's mu and nu). Everything else (step, rng, the objective's ``loss_state``)
    is replicated. ``param_axes=None`` replicates the parameters too.
    """

    def tree_shardings(tree):
        if tree is None:
            return None
        if param_axes is None:
            specs = jax.tree.map(lambda _: P(), tree)
        else:
            specs, _ = param_specs(tree, param_axes, dict(mesh.shape), rules)
        return jax.tree.map(lambda s: NamedSharding(mesh, s), specs)

    params = abstract_state.params
    param_sh = tree_shardings(params)
    treedef = jax.tree.structure(params)
    shapes = [x.shape for x in jax.tree.leaves(params)]

    def mirrors_params(node):
        return (
            jax.tree.structure(node) == treedef
            and [getattr(x, "shape", None) for x in jax.tree.leaves(node)] == shapes
        )

    opt_sh = jax.tree.map(
        lambda node: param_sh if mirrors_params(node) else replicated(mesh),
        abstract_state.opt_state,
        is_leaf=mirrors_params,
    )
    return abstract_state.replace(
        step=replicated(mesh),
        params=param_sh,
        ref_params=tree_shardings(abstract_state.ref_params),
        opt_state=opt_sh,
        rng=replicated(mesh),
        loss_state=jax.tree.map(lambda _: replicated(mesh), abstract_state.loss_state),
        base=tree_shardings(getattr(abstract_state, "base", None)),
    )


# ----------------------------------------------------------------------------
# Activation constraints (no-ops unless a mesh and rules are active while tracing).

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("tr_align_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules=DEFAULT_RULES):
    """Within this context, ``constrain`` pins activations to ``mesh`` by ``rules``."""
    token = _ACTIVE.set((mesh, tuple(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def with_activation_sharding(fn, mesh: Mesh, rules=DEFAULT_RULES):
    """``fn`` (e.g. a model's apply_fn) traced inside ``activation_sharding(mesh, rules)``."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with activation_sharding(mesh, rules):
            return fn(*args, **kwargs)

    return wrapped


def constrain(x, names=ACTIVATION_BTD):
    """``with_sharding_constraint`` of ``x`` by its logical ``names``; identity outside
    ``activation_sharding`` (plain calls, decoding)."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = logical_to_spec(names, x.shape, dict(mesh.shape), rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def put_batch(batch, mesh: Mesh):
    """Host-local numpy batch -> global jax arrays split over the data-parallel axes."""
    sh = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sh, np.asarray(v)) for k, v in batch.items()}
