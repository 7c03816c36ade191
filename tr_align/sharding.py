"""Device mesh and shardings.

The mesh has three named axes: ``data`` (pure data parallelism), ``fsdp``
(data parallelism whose devices will also shard parameters) and ``tensor``
(model parallelism). Batches are split over ``("data", "fsdp")``. For now every
parameter, the reference and the optimizer state are replicated; per-parameter
sharding rules (FSDP / tensor) plug in at ``state_shardings``.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


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


def state_shardings(mesh: Mesh, abstract_state):
    """Sharding of every leaf of the train state (all replicated for now)."""
    return jax.tree.map(lambda _: replicated(mesh), abstract_state)


def put_batch(batch, mesh: Mesh):
    """Host-local numpy batch -> global jax arrays split over the data-parallel axes."""
    sh = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sh, np.asarray(v)) for k, v in batch.items()}
