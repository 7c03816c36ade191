"""Checkpoints with orbax: train state + data-iterator position + small JSON extras.

Each checkpoint is a step directory under ``WORKDIR/checkpoints`` written atomically by orbax
(written under a temporary name and renamed when complete, so a failed or interrupted save
never replaces the last good one; leftover temporary directories are removed when the next
run opens the directory). Restoring goes straight into the target shardings given by an
abstract state (``jax.ShapeDtypeStruct`` leaves with ``.sharding``). ``saved_steps`` and
``restore_host`` read a finished run on one host, whatever mesh or hosts wrote it.

Trust (``Checkpoints``, used by the training loop):

- After a save has completed, process 0 writes ``STEP/tr_align_manifest.json``: the size and
  SHA-256 of every file of the step directory (orbax checks only its own shard indexes, not
  the data). ``verify`` checks it; a restore takes the newest checkpoint that verifies,
  restores without error and holds only finite values, reports every newer one it skips in
  one line (``checkpoint 120 is unusable (...)``) and renames it to ``STEP.unusable`` so the
  step can be saved again. A checkpoint without a manifest (written by an older tr-align, or
  the process was killed between orbax's commit and the manifest) is used when it restores
  cleanly, reported as unverified.
- Writes fail fast: orbax creates the directories in the calling thread (its asynchronous
  directory creation waits on signals for 300 s when the ``mkdir`` fails), every failure
  becomes one ``CheckpointError`` line naming the path, the OS error and the last good
  checkpoint, and the failed step's temporary directory is removed.
- Nothing blocks forever: orbax's commit has a deadline (``checkpoint.timeout_s``), and a
  watchdog ends the process (exit 1, one line) when a save or restore call itself stalls
  longer than that (a hung filesystem call cannot be interrupted from Python).
- ``checkpoint.async_save=True`` lets the step continue while the checkpoint is written;
  its errors surface at the next step (``check``), the next save or the end of the run.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from etils import epath

from tr_align.errors import CheckpointError

CHECKPOINT_DIR = "checkpoints"  # under the run directory; one step directory per checkpoint
MANIFEST = "tr_align_manifest.json"  # in each step directory, written after the save
UNUSABLE_SUFFIX = ".unusable"  # a step directory that failed verification, renamed
TMP_MARKER = ".orbax-checkpoint-tmp"  # orbax's name for a step directory being written
DEFAULT_TIMEOUT_S = 1200  # orbax's own default deadline for an async commit


def directory(workdir: str) -> str:
    return os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))


def manager(
    workdir: str, *, max_to_keep: int, timeout_s: float = DEFAULT_TIMEOUT_S
) -> ocp.CheckpointManager:
    """The orbax manager of ``WORKDIR/checkpoints`` (created if missing; leftover temporary
    directories of killed saves are removed). Raises CheckpointError when the directory
    cannot be created or is not a directory."""
    path = directory(workdir)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise CheckpointError(
            f"{path}: {_os_error_text(NotADirectoryError(errno.ENOTDIR, ''))}: a file where the "
            "checkpoint directory should be (move it away)"
        )
    try:
        return ocp.CheckpointManager(
            path,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                create=True,
                cleanup_tmp_directories=True,
                enable_async_checkpointing=True,
                async_options=ocp.AsyncOptions(
                    timeout_secs=max(1, math.ceil(timeout_s)),
                    create_directories_asynchronously=False,
                ),
            ),
            item_names=("state", "data", "extras"),
        )
    except Exception as e:  # noqa: BLE001 - any failure to open the directory
        raise CheckpointError(
            f"{path}: cannot open the checkpoint directory: {_os_error_text(e)}"
        ) from e


def _save_args(state, data_state: dict, extras: dict):
    return ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        extras=ocp.args.JsonSave(extras),
    )


def save(mngr: ocp.CheckpointManager, step: int, state, data_state: dict, extras: dict) -> None:
    """Saves (asynchronously after the device-to-host copy) unless ``step`` is already saved;
    the plain orbax save (no manifest, no error translation): ``Checkpoints.save`` is the
    training loop's."""
    if step in mngr.all_steps():
        return
    mngr.save(step, args=_save_args(state, data_state, extras))


def _restore_args(abstract_state, shardings):
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
    )
    return ocp.args.Composite(
        state=ocp.args.StandardRestore(target),
        data=ocp.args.JsonRestore(),
        extras=ocp.args.JsonRestore(),
    )


def restore_latest(mngr: ocp.CheckpointManager, abstract_state, shardings, *, report=None):
    """Returns ``(step, state, data_state, extras)`` of the newest good checkpoint, or None
    when there is none. Newer checkpoints that fail ``verify``, fail to restore or hold
    non-finite values are reported through ``report`` (one line each; default: stderr of
    process 0) and renamed to ``STEP.unusable``."""
    report = report or _report
    bad = []
    chosen = None
    for step in sorted(mngr.all_steps(), reverse=True):
        step_dir = os.path.join(str(mngr.directory), str(step))
        problem = verify(step_dir) if jax.process_index() == 0 else None
        problem = _agree(problem)
        if problem not in (None, UNVERIFIED):
            bad.append((step, problem))
            continue
        try:
            out = mngr.restore(step, args=_restore_args(abstract_state, shardings))
        except Exception as e:  # noqa: BLE001 - a damaged checkpoint, whatever orbax raises
            bad.append((step, f"restore failed: {_first_line(e)}"))
            continue
        if not _all_finite(out["state"]):
            bad.append((step, "non-finite values in the saved state"))
            continue
        chosen = (step, out["state"], out["data"], out["extras"])
        if problem == UNVERIFIED:
            report(
                f"tr-align: checkpoint {step} has no {MANIFEST} (an older tr-align, or the "
                "run was killed before writing it); restored unverified"
            )
        break
    for step, problem in bad:
        moved = _set_aside(mngr, step)
        report(
            f"tr-align: checkpoint {step} is unusable ({problem}); "
            + (f"moved to {moved}; " if moved else "")
            + (f"resuming from step {chosen[0]}" if chosen else "no older checkpoint to use")
        )
    if bad:
        if jax.process_count() > 1:  # every process lists the steps after process 0 moved them
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("tr_align_checkpoints_set_aside")
        mngr.reload()
    return chosen


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


# ----------------------------------------------------------------------------- manifests

UNVERIFIED = "no manifest"  # verify(): a checkpoint without a manifest (not an error by itself)


def _files(step_dir: str) -> list[str]:
    out = []
    for root, dirs, files in os.walk(step_dir):
        dirs.sort()
        for name in sorted(files):
            rel = os.path.relpath(os.path.join(root, name), step_dir)
            if not rel.startswith(MANIFEST):  # the manifest and its temporary file
                out.append(rel)
    return out


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(step_dir: str) -> None:
    """Writes ``step_dir/tr_align_manifest.json`` (size and SHA-256 of every file), atomically
    (a temporary file renamed into place)."""
    files = {
        rel: {"size": os.path.getsize(os.path.join(step_dir, rel))} for rel in _files(step_dir)
    }
    for rel, entry in files.items():
        entry["sha256"] = _sha256(os.path.join(step_dir, rel))
    tmp = os.path.join(step_dir, MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"format": 1, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(step_dir, MANIFEST))


def verify(step_dir: str) -> str | None:
    """None when ``step_dir`` matches its manifest; ``UNVERIFIED`` when it has none; else a
    short description of the first problem (an empty directory, a missing, truncated or
    changed file)."""
    if not os.path.isdir(step_dir):
        return "not a directory"
    names = _files(step_dir)
    if not names:
        return "empty: no files"
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.exists(path):
        return UNVERIFIED
    try:
        with open(path, encoding="utf-8") as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} unreadable: {_first_line(e)}"
    for rel, entry in files.items():
        full = os.path.join(step_dir, rel)
        if not os.path.isfile(full):
            return f"{rel} is missing"
        size = os.path.getsize(full)
        if size != entry["size"]:
            return f"{rel} has {size} bytes, {entry['size']} were written"
        if _sha256(full) != entry["sha256"]:
            return f"{rel} does not match its SHA-256 (changed on disk)"
    return None


def _agree(problem):
    """Process 0's verdict on every process (they must restore the same step)."""
    if jax.process_count() == 1:
        return problem
    from jax.experimental import multihost_utils

    code = np.frombuffer(json.dumps(problem).encode()[:1024].ljust(1024), np.uint8)
    code = np.asarray(multihost_utils.broadcast_one_to_all(code))
    return json.loads(bytes(code).decode().rstrip())


def _all_finite(state) -> bool:
    leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
    return all(bool(jax.device_get(jnp.isfinite(x).all())) for x in leaves)


def _set_aside(mngr, step: int) -> str | None:
    """Renames a bad step directory to ``STEP.unusable`` (``.unusable-2`` ... when taken) so
    orbax no longer lists it; the path, or None when it could not be renamed."""
    if jax.process_index() != 0:
        return None
    src = os.path.join(str(mngr.directory), str(step))
    dst, n = src + UNUSABLE_SUFFIX, 1
    while os.path.lexists(dst):
        n += 1
        dst = f"{src}{UNUSABLE_SUFFIX}-{n}"
    try:
        os.rename(src, dst)
    except OSError:
        return None
    return dst


def remove_tmp_dirs(workdir: str) -> list[str]:
    """Removes orbax's temporary step directories (saves that did not complete); returns
    their paths."""
    path = directory(workdir)
    if not os.path.isdir(path):
        return []
    removed = []
    for name in os.listdir(path):
        if TMP_MARKER in name:
            shutil.rmtree(os.path.join(path, name), ignore_errors=True)
            removed.append(os.path.join(path, name))
    return removed


# ----------------------------------------------------------------------------- errors


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


_TS_OS_ERROR = re.compile(r"\[os_error_code='(\d+)'\]")


def _os_error_text(e: BaseException) -> str:
    """The OS error behind ``e`` as ``strerror (errno N)``: from an OSError in its chain, or
    the ``os_error_code`` of a tensorstore message; else its first line."""
    seen, cur = set(), e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno:
            return f"{os.strerror(cur.errno)} (errno {cur.errno})"
        m = _TS_OS_ERROR.search(str(cur))
        if m:
            code = int(m.group(1))
            return f"{os.strerror(code)} (errno {code})"
        if isinstance(cur, TimeoutError):
            return "timed out"
        cur = cur.__cause__ or cur.__context__
    return _first_line(e)


def describe_last_good(step: int | None) -> str:
    if step is None:
        return "there is no checkpoint yet (a rerun starts from step 0)"
    return f"the last good checkpoint is step {step}"


def _report(line: str) -> None:
    if jax.process_index() == 0:
        print(line, file=sys.stderr, flush=True)


def _hard_exit(message: str) -> None:  # pragma: no cover - replaced in tests
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)


class _Watchdog:
    """Calls ``on_timeout(message)`` (default: print it and ``os._exit(1)``) unless the
    ``with`` body finishes within ``timeout_s``."""

    on_timeout = staticmethod(_hard_exit)

    def __init__(self, timeout_s: float, message: str):
        self.timeout_s, self.message = timeout_s, message
        self._done = threading.Event()

    def __enter__(self):
        def watch():
            if not self._done.wait(self.timeout_s):
                type(self).on_timeout(self.message)

        threading.Thread(target=watch, name="tr_align_checkpoint_watchdog", daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._done.set()


class _DropOrbaxErrors(logging.Filter):
    """Drops orbax's ERROR logs (a traceback per failed thread of a failed save: hundreds of
    lines) while absl logs at WARNING or less: the CheckpointError line says what failed."""

    def filter(self, record):
        if record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname:
            return absl_logging.get_verbosity() >= absl_logging.INFO
        return True


def quiet_orbax_errors() -> None:
    """Installs ``_DropOrbaxErrors`` on absl's logger (once)."""
    logger = logging.getLogger("absl")
    if not any(isinstance(f, _DropOrbaxErrors) for f in logger.filters):
        logger.addFilter(_DropOrbaxErrors())


# ----------------------------------------------------------------------------- the loop's


class Checkpoints:
    """The training loop's checkpoints of one run directory: saves with manifests and
    one-line errors, ``restore`` of the newest good one, ``last_good`` (the newest step known
    to be complete on disk, None before the first)."""

    def __init__(
        self,
        workdir: str,
        *,
        max_to_keep: int,
        async_save: bool = False,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        report=None,
    ):
        self.workdir = workdir
        self.path = directory(workdir)
        self.async_save = bool(async_save)
        self.timeout_s = float(timeout_s)
        self.report = report or _report
        quiet_orbax_errors()
        self.mngr = manager(workdir, max_to_keep=max_to_keep, timeout_s=timeout_s)
        self.last_good: int | None = None
        self._pending: int | None = None  # a started save not yet known to be complete

    def step_dir(self, step: int) -> str:
        return os.path.join(self.path, str(step))

    def restore(self, abstract_state, shardings):
        """``(step, state, data_state, extras)`` of the newest good checkpoint, or None."""
        with _Watchdog(
            self.timeout_s,
            f"tr-align: checkpoint error: {self.path}: reading the checkpoints did not finish "
            f"within {self.timeout_s:g} s (checkpoint.timeout_s; a stalled filesystem?); aborted",
        ):
            out = restore_latest(self.mngr, abstract_state, shardings, report=self.report)
        if out is not None:
            self.last_good = out[0]
        return out

    def save(self, step: int, state, data_state: dict, extras: dict) -> None:
        """Saves ``step`` (unless saved already): waits for the previous save first; without
        ``async_save`` also for this one. Raises CheckpointError when a save failed."""
        self.finish()
        if step in self.mngr.all_steps():
            return
        with self._watchdog(step):
            try:
                self.mngr.save(step, args=_save_args(state, data_state, extras))
            except Exception as e:  # noqa: BLE001
                self._failed(step, e)
        self._pending = step
        if not self.async_save:
            self.finish()

    def check(self) -> None:
        """Non-blocking: raises CheckpointError if an async save has failed; writes the
        manifest of one that has completed."""
        if self._pending is None:
            return
        try:
            self.mngr.check_for_errors()
        except Exception as e:  # noqa: BLE001
            step, self._pending = self._pending, None
            self._failed(step, e)
        if not self.mngr.is_saving_in_progress():
            self.finish()

    def finish(self) -> None:
        """Waits for the save in flight (bounded) and writes its manifest."""
        if self._pending is None:
            return
        step = self._pending
        with self._watchdog(step):
            try:
                self.mngr.wait_until_finished()
                self.mngr.check_for_errors()
            except Exception as e:  # noqa: BLE001
                self._pending = None
                self._failed(step, e)
        self._pending = None
        if jax.process_index() == 0:
            try:
                write_manifest(self.step_dir(step))
            except OSError as e:
                raise CheckpointError(
                    f"{self.step_dir(step)}: the checkpoint of step {step} is complete but its "
                    f"manifest could not be written: {_os_error_text(e)}; the run stopped"
                ) from e
        self.last_good = step

    def close(self, *, failing: bool = False) -> None:
        """Finishes the save in flight. ``failing``: the run is already ending on an error, so
        a failed save in flight is reported in one line instead of raised over it."""
        if not failing:
            self.finish()
            return
        try:
            self.finish()
        except CheckpointError as e:
            self.report(f"tr-align: checkpoint error: {e}")

    def _watchdog(self, step: int) -> _Watchdog:
        return _Watchdog(
            self.timeout_s,
            f"tr-align: checkpoint error: {self.step_dir(step)}: writing the checkpoint of step "
            f"{step} did not finish within {self.timeout_s:g} s (checkpoint.timeout_s; a "
            f"stalled filesystem?); aborted; {describe_last_good(self.last_good)}",
        )

    def _failed(self, step: int, e: BaseException):
        if jax.process_index() == 0:
            remove_tmp_dirs(self.workdir)
        raise CheckpointError(
            f"{self.step_dir(step)}: writing the checkpoint of step {step} failed: "
            f"{_os_error_text(e)}; the run stopped; {describe_last_good(self.last_good)}"
        ) from None
