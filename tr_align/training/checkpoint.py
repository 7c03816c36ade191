"""Checkpoints with orbax: train state + data-iterator position + small JSON extras.

Each checkpoint is a step directory under ``WORKDIR/checkpoints`` written
atomically by orbax (a failed or interrupted save never replaces the last good
one). Restoring goes straight into the target shardings given by an abstract
state (``jax.ShapeDtypeStruct`` leaves with ``.sharding``).
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


def manager(workdir: str, *, max_to_keep: int) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_names=("state", "data", "extras"),
    )


def save(mngr: ocp.CheckpointManager, step: int, state, data_state: dict, extras: dict) -> None:
    """Saves (asynchronously after the device-to-host copy) unless ``step`` is already saved."""
    if step in mngr.all_steps():
        return
    mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            extras=ocp.args.JsonSave(extras),
        ),
    )


def restore_latest(mngr: ocp.CheckpointManager, abstract_state, shardings):
    """Returns ``(step, state, data_state, extras)`` of the newest checkpoint, or None."""
    step = mngr.latest_step()
    if step is None:
        return None
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
    )
    out = mngr.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target),
            data=ocp.args.JsonRestore(),
            extras=ocp.args.JsonRestore(),
        ),
    )
    return step, out["state"], out["data"], out["extras"]
