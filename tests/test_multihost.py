"""Two local processes (CPU, gloo collectives over 127.0.0.1) train TR-DPO as one job:
FSDP and the batch span both processes, only process 0 writes logs, orbax checkpoints
are written by both, and a stop + resume lands on the same losses and parameters as one
process with the same 4 devices and mesh."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO
from tr_align import distributed, hf, sharding
from tr_align.data import loader
from tr_align.io import export
from tr_align.training import checkpoint, loop
from tr_align.training.metrics import read_jsonl

TIMEOUT_S = 420


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(config_file, workdir, stop):
    port = _free_port()
    procs = []
    for pid in range(2):
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=2 "
            "--xla_backend_optimization_level=0",
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": str(pid),
        }
        cmd = [sys.executable, str(REPO / "tests" / "multihost_worker.py"), config_file, workdir]
        procs.append(
            subprocess.Popen(
                cmd + [str(stop)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"multi-process run did not finish in {TIMEOUT_S}s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs


def _assert_close(got, want):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def _losses(workdir):
    rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow
def test_two_processes_stop_resume_and_match_one_process(tiny_config, tmp_path):
    config = tiny_config(
        "tr-soft",
        **{"mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 2, "model.num_hidden_layers": 1},
    )
    config.data.num_eval = 32
    config.train.eval_every_steps = 6
    config_file = str(tmp_path / "config.json")
    with open(config_file, "w", encoding="utf-8") as f:
        f.write(config.to_json())
    multi = str(tmp_path / "multi")

    out0, out1 = _launch(config_file, multi, stop=3)
    assert "process 0/2, 2 local of 4 devices" in out0
    assert "resuming from step 3" in out0
    assert "tr-align:" not in out1  # only process 0 reports

    # The reference: one process, the same 4 devices and mesh, 6 uninterrupted steps.
    built = loop.build(config, devices=jax.devices()[:4])
    it = loader.train_iterator(
        built.data.train, batch_size=8, seed=config.train.seed, buckets=built.data.buckets
    )
    state, want = built.init(), []
    for _ in range(6):
        state, m = built.train_step(state, sharding.put_batch(next(it), built.mesh))
        want.append(float(m["loss"]))
    got = _losses(multi)
    assert sorted(got) == list(range(1, 7))
    np.testing.assert_allclose([got[s] for s in range(1, 7)], want, rtol=1e-5)

    mngr = checkpoint.manager(multi, max_to_keep=5)
    step, restored, _, _ = checkpoint.restore_latest(
        mngr, built.abstract_state, built.state_shardings
    )
    assert step == 6
    _assert_close(jax.device_get(restored), jax.device_get(state))

    # The 2-host checkpoint exports on this one process (read on the host, any topology).
    export.export(multi, str(tmp_path / "hf"))
    _, exported, _ = hf.load_pretrained(str(tmp_path / "hf"))
    _assert_close(jax.device_get(exported), jax.device_get(state.params))


def test_initialize_plan_from_the_environment(monkeypatch):
    monkeypatch.setattr(distributed, "_on_tpu_vm", lambda: False)
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4"}
    assert distributed.plan({**env, "JAX_PROCESS_ID": "3"}) == dict(
        coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3
    )
    with pytest.raises(ValueError, match=r"JAX_NUM_PROCESSES set but JAX_PROCESS_ID missing"):
        distributed.plan({**env})
    with pytest.raises(
        ValueError, match=r"JAX_PROCESS_ID=4: must be in \[0, JAX_NUM_PROCESSES=4\)"
    ):
        distributed.plan({**env, "JAX_PROCESS_ID": "4"})
    assert distributed.plan({**env, "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}) is None
    assert distributed.plan({"SLURM_NTASKS": "16", "SLURM_JOB_ID": "7"}) == {}  # jax detects
    assert distributed.plan({"SLURM_NTASKS": "1"}) is None
    assert distributed.plan({"SLURM_NTASKS": "16", "TR_ALIGN_DISTRIBUTED": "0"}) is None
    assert distributed.plan({}) is None
    assert not distributed.initialize({})  # one process: nothing to join
