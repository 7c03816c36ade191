"""Checkpoints with orbax: train state + data-iterator position + small JSON extras.

Each checkpoint is a step directory under ``WORKDIR/checkpoints`` written
atomically by orbax (a failed or interrupted save never replaces the last good
one). Restoring goes straight into the target shardings given by an abstract
state (``jax.ShapeDtypeStruct`` leaves with ``.sharding``). ``saved_steps`` and
``restore_host`` read a finished run on one host, whatever mesh or hosts wrote it.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

CHECKPOINT_DIR = "checkpoints"  # under the run directory; one step directory per checkpoint


def directory(workdir: str) -> str:
    return os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))


def manager(workdir: str, *, max_to_keep: int) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        directory(workdir),
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


def saved_steps(workdir: str) -> list[int]:
    """The steps of the finished checkpoints of ``workdir``, oldest first (``[]`` when there
    are none); creates nothing."""
    path = directory(workdir)
    return sorted(ocp.utils.checkpoint_steps(path)) if os.path.isdir(path) else []


def restore_host(workdir: str, step: int, key: str):
    """``state.<key>`` (e.g. ``"params"``) of the checkpoint at ``step`` as host numpy arrays,
    whatever mesh or hosts saved it (only that subtree is read); None when the state holds
    None there (a run without a reference)."""
    path = epath.Path(directory(workdir)) / str(step) / "state"
    handler = ocp.PyTreeCheckpointHandler()
    subtree = handler.metadata(path).tree.get(key)
    if subtree is None:
        return None
    item = {key: subtree}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
    return handler.restore(path, args=args)[key]
