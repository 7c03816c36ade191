"""Multi-process start-up: join the JAX distributed runtime when the environment has one.

``initialize()`` must run before anything touches a device (``tr-align`` calls it first
thing). It picks, in order:

1. ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0), ``JAX_NUM_PROCESSES`` and
   ``JAX_PROCESS_ID`` set by the launcher (any GPU/CPU cluster, or local test processes);
2. a SLURM job step with ``SLURM_NTASKS > 1`` or an Open MPI job with
   ``OMPI_COMM_WORLD_SIZE > 1``: jax derives the coordinator, count and rank (and one
   GPU per local task) from the scheduler's variables;
3. a Cloud TPU VM (libtpu installed and TPU chips present): jax reads the pod's
   worker list from the TPU metadata (one process per host; a single host joins alone);
4. otherwise nothing: one process.

``TR_ALIGN_DISTRIBUTED=0`` skips it altogether. After it, ``jax.process_index()`` /
``jax.process_count()`` describe the job: every process runs the same program on its own
slice of each batch, only process 0 writes logs and plots, and all of them take part in
orbax checkpoints (a filesystem every host sees is required).
"""

from __future__ import annotations

import glob
import importlib.util
import os

import jax

from tr_align.errors import DistributedSetupError

ENV_KEYS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _int_env(env, key) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise DistributedSetupError(f"{key}={env[key]!r}: must be an integer") from None


def _on_tpu_vm() -> bool:
    has_chips = glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
    return bool(has_chips) and importlib.util.find_spec("libtpu") is not None


def plan(env=None) -> dict | None:
    """The ``jax.distributed.initialize`` arguments this environment asks for, or None.

    ``{}`` means "let jax detect everything" (SLURM, Open MPI, TPU pods).
    """
    env = os.environ if env is None else env
    if env.get("TR_ALIGN_DISTRIBUTED", "") == "0":
        return None
    given = [k for k in ENV_KEYS if env.get(k)]
    if given:
        missing = [k for k in ENV_KEYS if k not in given]
        if missing:
            raise DistributedSetupError(f"{', '.join(given)} set but {', '.join(missing)} missing")
        n, pid = _int_env(env, "JAX_NUM_PROCESSES"), _int_env(env, "JAX_PROCESS_ID")
        if not 0 <= pid < n:
            raise DistributedSetupError(
                f"JAX_PROCESS_ID={pid}: must be in [0, JAX_NUM_PROCESSES={n})"
            )
        if n == 1:
            return None
        return dict(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"], num_processes=n, process_id=pid
        )
    for key in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if env.get(key) and _int_env(env, key) > 1:
            return {}
    if _on_tpu_vm():
        return {}
    return None


def initialize(env=None) -> bool:
    """Joins the multi-process runtime if ``plan(env)`` asks for it; True if joined."""
    if jax.distributed.is_initialized():
        return True
    kwargs = plan(env)
    if kwargs is None:
        return False
    jax.distributed.initialize(**kwargs)
    return True
