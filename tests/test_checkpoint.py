"""Checkpoints you can trust: manifests checked on restore (flipped bytes, truncated, deleted
files, empty step directories), the newest good checkpoint used and every bad one reported in
one line; failed writes (not a directory, read-only, full) end within seconds with one line
naming the path and the OS error, the previous checkpoint intact; nothing hangs."""

import errno
import os
import resource
import shutil
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tr_align import errors
from tr_align.io.rundir import RunDir
from tr_align.training import checkpoint

N = 50_000  # floats per leaf: 200 kB, so a file-size limit can stop a write half-way


def _w(step):  # random values: they do not compress, so the files are ~200 kB
    return np.random.default_rng(step).standard_normal(N).astype(np.float32)


def _state(step):
    return {"w": jnp.asarray(_w(step)), "count": jnp.asarray(step, jnp.int32)}


def _abstract():
    s = _state(0)
    shardings = jax.tree.map(lambda x: x.sharding, s)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), s), shardings


def _ckpts(workdir, lines=None, **kw):
    report = lines.append if lines is not None else (lambda line: None)
    return checkpoint.Checkpoints(str(workdir), max_to_keep=5, report=report, **kw)


def _saved(tmp_path, steps=(1, 2), **kw):
    c = _ckpts(tmp_path, **kw)
    for step in steps:
        c.save(step, _state(step), {"pos": step}, {"k": [step]})
    c.close()
    return c


def _restore(tmp_path):
    lines = []
    out = _ckpts(tmp_path, lines).restore(*_abstract())
    return out, lines


def _biggest_file(step_dir):
    files = [
        os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs if f != checkpoint.MANIFEST
    ]
    return max(files, key=os.path.getsize)


def _flip(step_dir):
    path = _biggest_file(step_dir)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))


def _truncate(step_dir):
    path = _biggest_file(step_dir)
    os.truncate(path, os.path.getsize(path) // 3)


def _delete(step_dir):
    os.remove(_biggest_file(step_dir))


def test_save_writes_a_manifest_that_verifies(tmp_path):
    c = _saved(tmp_path)
    assert c.last_good == 2
    step_dir = tmp_path / "checkpoints" / "2"
    assert (step_dir / checkpoint.MANIFEST).is_file()
    assert checkpoint.verify(str(step_dir)) is None
    (step, state, data, extras), lines = _restore(tmp_path)
    assert step == 2 and data == {"pos": 2} and extras == {"k": [2]} and lines == []
    np.testing.assert_array_equal(state["w"], _w(2))


@pytest.mark.parametrize(
    "damage, reason",
    [
        (_flip, "does not match its SHA-256"),
        (_truncate, "bytes,"),
        (_delete, "is missing"),
        (lambda d: (shutil.rmtree(d), os.mkdir(d)), "empty: no files"),
    ],
    ids=["flipped-byte", "truncated", "deleted-file", "empty-dir"],
)
def test_a_damaged_newest_checkpoint_is_reported_and_the_older_one_used(tmp_path, damage, reason):
    _saved(tmp_path)
    damage(str(tmp_path / "checkpoints" / "2"))
    (step, state, data, _), lines = _restore(tmp_path)
    assert step == 1 and data == {"pos": 1}
    np.testing.assert_array_equal(state["w"], _w(1))  # the step-1 values
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert lines[0].startswith("tr-align: checkpoint 2 is unusable (") and reason in lines[0]
    assert lines[0].endswith("resuming from step 1")
    # set aside, so step 2 can be saved again and orbax no longer lists it
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2.unusable"]
    c = _ckpts(tmp_path)
    c.save(2, _state(2), {"pos": 2}, {})
    c.close()
    assert _restore(tmp_path)[0][0] == 2


def test_an_empty_step_dir_newer_than_all_others_does_not_block_resume(tmp_path):
    _saved(tmp_path)
    os.mkdir(tmp_path / "checkpoints" / "120")
    (step, _, _, _), lines = _restore(tmp_path)
    assert step == 2
    assert lines == [
        "tr-align: checkpoint 120 is unusable (empty: no files); moved to "
        f"{tmp_path / 'checkpoints' / '120.unusable'}; resuming from step 2"
    ]


def test_all_checkpoints_damaged_means_a_fresh_start(tmp_path):
    _saved(tmp_path)
    for step in (1, 2):
        _flip(str(tmp_path / "checkpoints" / str(step)))
    out, lines = _restore(tmp_path)
    assert out is None and len(lines) == 2
    assert all(line.endswith("no older checkpoint to use") for line in lines)


def test_a_checkpoint_without_manifest_is_restored_unverified(tmp_path):
    """Written by an older tr-align, or killed between orbax's commit and the manifest."""
    _saved(tmp_path)
    os.remove(tmp_path / "checkpoints" / "2" / checkpoint.MANIFEST)
    (step, _, _, _), lines = _restore(tmp_path)
    assert step == 2 and len(lines) == 1 and "restored unverified" in lines[0]


def test_non_finite_values_in_a_checkpoint_skip_it(tmp_path):
    c = _ckpts(tmp_path)
    c.save(1, _state(1), {}, {})
    c.save(2, {"w": jnp.full(N, jnp.nan), "count": jnp.asarray(2, jnp.int32)}, {}, {})
    c.close()
    (step, _, _, _), lines = _restore(tmp_path)
    assert step == 1 and "non-finite values" in lines[0]


def test_export_refuses_a_damaged_checkpoint(tmp_path):
    _saved(tmp_path)
    _flip(str(tmp_path / "checkpoints" / "2"))
    with pytest.raises(errors.CheckpointError, match=r"checkpoints/2: unusable: .*SHA-256"):
        RunDir(tmp_path).restore_params("policy", 2)


# ------------------------------------------------------------------------- write faults


def _assert_one_line_failure(e, path, oserror, last_good):
    text = str(e.value)
    assert "\n" not in text and str(path) in text and oserror in text, text
    assert text.endswith(last_good), text


def test_checkpoints_being_a_regular_file_fails_at_once(tmp_path):
    (tmp_path / "checkpoints").write_text("")
    t0 = time.time()
    with pytest.raises(errors.CheckpointError) as e:
        _ckpts(tmp_path)
    assert time.time() - t0 < 5
    assert str(e.value) == (
        f"{tmp_path / 'checkpoints'}: Not a directory (errno 20): a file where the checkpoint "
        "directory should be (move it away)"
    )


def test_a_full_disk_during_a_save_fails_in_seconds_and_keeps_the_previous(tmp_path):
    """RLIMIT_FSIZE stands in for a full disk: the write of step 2 fails with EFBIG."""
    c = _saved(tmp_path, steps=(1,))
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    t0 = time.time()
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, old_limit[1]))
        with pytest.raises(errors.CheckpointError) as e:
            c.save(2, _state(2), {}, {})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert time.time() - t0 < 10
    _assert_one_line_failure(
        e,
        tmp_path / "checkpoints" / "2",
        f"writing the checkpoint of step 2 failed: {os.strerror(errno.EFBIG)} (errno 27)",
        "the last good checkpoint is step 1",
    )
    assert os.listdir(tmp_path / "checkpoints") == ["1"]  # no temporary directory left
    assert checkpoint.verify(str(tmp_path / "checkpoints" / "1")) is None
    assert _restore(tmp_path)[0][0] == 1


def test_a_failed_async_save_surfaces_at_the_next_check(tmp_path):
    c = _saved(tmp_path, steps=(1,), async_save=True)
    assert c.last_good == 1
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, old_limit[1]))
        c.save(2, _state(2), {}, {})  # returns while the write runs
        t0 = time.time()
        with pytest.raises(errors.CheckpointError) as e:
            while time.time() - t0 < 30:
                c.check()
                time.sleep(0.05)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    _assert_one_line_failure(
        e, tmp_path / "checkpoints" / "2", "(errno 27)", "the last good checkpoint is step 1"
    )
    assert os.listdir(tmp_path / "checkpoints") == ["1"]


def test_a_read_only_checkpoint_directory_fails_in_seconds(tmp_path, monkeypatch):
    c = _saved(tmp_path, steps=(1,))
    ckpt_dir = tmp_path / "checkpoints"
    if os.geteuid() != 0:
        ckpt_dir.chmod(0o555)
        expected = f"{os.strerror(errno.EACCES)} (errno {errno.EACCES})"
    else:  # root ignores permission bits: a read-only filesystem, simulated at mkdir
        real_makedirs = os.makedirs

        def read_only(path, *a, **k):
            if os.fspath(path).startswith(str(ckpt_dir) + os.sep):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
            return real_makedirs(path, *a, **k)

        monkeypatch.setattr(os, "makedirs", read_only)
        expected = f"{os.strerror(errno.EROFS)} (errno {errno.EROFS})"
    t0 = time.time()
    try:
        with pytest.raises(errors.CheckpointError) as e:
            c.save(2, _state(2), {}, {})
    finally:
        ckpt_dir.chmod(0o755)
    assert time.time() - t0 < 10
    _assert_one_line_failure(e, ckpt_dir / "2", expected, "the last good checkpoint is step 1")
    assert os.listdir(ckpt_dir) == ["1"]


def test_a_stalled_save_is_ended_by_the_watchdog(tmp_path, monkeypatch):
    """A filesystem call that never returns: the watchdog fires after checkpoint.timeout_s
    (in the CLI it prints the line and exits 1; here it records the line and unblocks)."""
    c = _ckpts(tmp_path, timeout_s=0.5)
    release, fired = threading.Event(), []

    def on_timeout(message):
        fired.append(message)
        release.set()

    monkeypatch.setattr(checkpoint._Watchdog, "on_timeout", staticmethod(on_timeout))

    def stalled_save(*a, **k):
        release.wait(30)
        raise OSError(errno.EIO, "gave up")

    monkeypatch.setattr(c.mngr, "save", stalled_save)
    t0 = time.time()
    with pytest.raises(errors.CheckpointError):
        c.save(3, _state(3), {}, {})
    assert time.time() - t0 < 10 and fired
    assert fired[0] == (
        f"tr-align: checkpoint error: {tmp_path / 'checkpoints' / '3'}: writing the checkpoint "
        "of step 3 did not finish within 0.5 s (checkpoint.timeout_s; a stalled filesystem?); "
        "aborted; there is no checkpoint yet (a rerun starts from step 0)"
    )
