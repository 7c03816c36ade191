"""launch/: the commands each script prints in dry-run mode, and the SLURM / local wrappers
run for real against stand-in srun / tr-align programs (no gcloud, SLURM or GPU needed)."""

import os
import shlex
import subprocess

import pytest

from conftest import REPO


def _fake_bin(tmp_path, name, body):
    d = tmp_path / "bin"
    d.mkdir(parents=True, exist_ok=True)
    f = d / name
    f.write_text("#!/bin/sh\n" + body + "\n")
    f.chmod(0o755)
    return d


def _launch(script, *args, env=None, tmp_path=None):
    """Runs launch/SCRIPT; returns (returncode, printed commands as argv lists, stdout, stderr).

    A stand-in ``gcloud`` / ``srun`` on PATH records any call, so a dry run that runs
    something is caught.
    """
    bin_dir = _fake_bin(tmp_path, "gcloud", f"echo gcloud >> {tmp_path}/called")
    _fake_bin(tmp_path, "srun", f"echo srun >> {tmp_path}/called")
    full_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", **(env or {})}
    proc = subprocess.run(
        ["bash", str(REPO / "launch" / script), *args],
        cwd=tmp_path,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    commands = [shlex.split(line[2:]) for line in proc.stdout.splitlines() if line[:2] == "+ "]
    return proc.returncode, commands, proc.stdout, proc.stderr


def test_tpu_pod_dry_run_prints_create_copy_install_and_train_on_all_workers(tmp_path):
    rc, cmds, out, err = _launch(
        "tpu_pod.sh",
        "--dry-run",
        "--name=trx",
        "--zone=us-east5-a",
        "--accelerator-type",
        "v5p-32",
        "--spot",
        "--bucket=gs://my-bucket",
        "--",
        "--config.train.steps=10",
        "--config.loss.type=ipo",
        tmp_path=tmp_path,
    )
    assert rc == 0, err
    assert not (tmp_path / "called").exists()  # nothing was run
    tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
    where = ["trx", "--zone=us-east5-a"]
    assert cmds[0] == tpu + ["describe", *where]
    assert cmds[1] == tpu + [
        "create",
        *where,
        "--accelerator-type=v5p-32",
        "--version=v2-alpha-tpuv5",
        "--spot",
    ]
    assert cmds[2][:2] == ["tar", "-czf"]
    assert cmds[3] == tpu + [
        "scp",
        cmds[2][2],
        "trx:tr_align_code.tgz",
        "--zone=us-east5-a",
        "--worker=all",
    ]
    ssh = [c for c in cmds if c[:5] == tpu + ["ssh"]]
    assert len(ssh) == 4  # unpack, install, mount the bucket, train
    assert all(c[5:8] == [*where, "--worker=all"] for c in ssh)
    remote = [c[8].removeprefix("--command=") for c in ssh]
    assert "pip install -q -e . " in remote[1] and "jax[tpu]" in remote[1]
    assert "gcsfuse --implicit-dirs my-bucket /mnt/gcs" in remote[2]
    train = shlex.split(remote[3].split("; do ", 1)[1].split(" 2>&1 ")[0])
    assert train == [
        "python3",
        "-m",
        "tr_align",
        "train",
        "--config=configs/default.py",
        "--workdir=/mnt/gcs/tr_align/trx",
        "--config.train.steps=10",
        "--config.loss.type=ipo",
    ]
    assert remote[3].startswith("cd ~/tr_align && for attempt in $(seq 0 3); do python3 ")
    assert "tee -a ~/tr_align_train.log" in remote[3]
    # rerun while it exits 75 (stopped with a checkpoint), then pass its code on
    assert "rc=${PIPESTATUS[0]}; [ $rc = 75 ] || break;" in remote[3]
    assert remote[3].endswith("done; exit $rc")


def test_tpu_pod_v5e_git_clone_and_bad_options(tmp_path):
    rc, cmds, _, err = _launch(
        "tpu_pod.sh",
        "--dry-run",
        "--zone=us-west4-a",
        "--accelerator-type=v5e-64",
        "--repo=https://example.com/tr_align.git",
        "--branch=dev",
        "--workdir=/mnt/nfs/run",
        "--config=configs/default.py:tr-hard",
        tmp_path=tmp_path,
    )
    assert rc == 0, err
    assert cmds[1][-2:] == ["--accelerator-type=v5litepod-64", "--version=v2-alpha-tpuv5-lite"]
    assert "git clone -q --branch dev https://example.com/tr_align.git ~/tr_align" in cmds[2][-1]
    assert not any(c[0] == "tar" or "scp" in c for c in cmds)
    assert "--config=configs/default.py:tr-hard --workdir=/mnt/nfs/run 2>&1" in cmds[-1][-1]

    rc, _, _, err = _launch("tpu_pod.sh", "--dry-run", tmp_path=tmp_path)
    assert rc == 2 and "--zone is required" in err
    rc, _, _, err = _launch("tpu_pod.sh", "--zone=z", "--size=8", tmp_path=tmp_path)
    assert rc == 2 and "unknown option --size" in err
    assert not (tmp_path / "called").exists()


def test_gpu_local_dry_run(tmp_path):
    rc, cmds, out, err = _launch(
        "gpu_local.sh",
        "--dry-run",
        "--gpus=0,1",
        "--workdir",
        "runs/g",
        "--",
        "--config.mesh.data=1",
        "--config.mesh.fsdp=2",
        tmp_path=tmp_path,
    )
    assert rc == 0, err
    assert cmds[:3] == [
        ["python3", "-m", "venv", ".venv"],
        [".venv/bin/pip", "install", "-q", "-U", "pip"],
        [".venv/bin/pip", "install", "-q", "-e", ".", "jax[cuda12]"],
    ]
    assert out.splitlines()[-1] == (
        "+ env CUDA_VISIBLE_DEVICES=0,1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 .venv/bin/tr-align "
        "train --config=configs/default.py --workdir=runs/g --config.mesh.data=1 "
        "--config.mesh.fsdp=2 2>&1 | tee -a runs/g/train.log"
    )


def test_gpu_local_runs_train_and_keeps_the_log(tmp_path):
    venv = tmp_path / "venv"
    _fake_bin(venv, "tr-align", 'echo "fraction=$XLA_PYTHON_CLIENT_MEM_FRACTION args=$*"')
    workdir = tmp_path / "run"
    rc, _, out, err = _launch(
        "gpu_local.sh",
        "--no-install",
        f"--venv={venv}",
        f"--workdir={workdir}",
        "--mem-fraction=0.9",
        tmp_path=tmp_path,
    )
    assert rc == 0, err
    expected = f"fraction=0.9 args=train --config=configs/default.py --workdir={workdir}"
    assert (workdir / "train.log").read_text().strip() == expected
    assert out.splitlines()[-1] == expected


def _slurm_env(tmp_path, **extra):
    bin_dir = _fake_bin(tmp_path, "scontrol", 'printf "gpu01\\ngpu02\\n"')
    return {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "gpu[01-02]",
        "SLURM_NNODES": "2",
        "SLURM_JOB_ID": "77",
        "SLURM_SUBMIT_DIR": str(REPO),
        **extra,
    }


def test_slurm_dry_run_prints_the_distributed_env_and_srun(tmp_path):
    env = _slurm_env(tmp_path, DRY_RUN="1", VENV="/shared/venv")
    rc, cmds, out, err = _launch(
        "slurm.sbatch", "--config=configs/default.py:tr-hard", env=env, tmp_path=tmp_path
    )
    assert rc == 0, err
    assert not (tmp_path / "called").exists()
    assert cmds[2] == ["/shared/venv/bin/pip", "install", "-q", "-e", ".", "jax[cuda12]"]
    assert ["export", "JAX_COORDINATOR_ADDRESS=gpu01:12345"] in cmds
    assert ["export", "JAX_NUM_PROCESSES=2"] in cmds
    assert cmds[-1] == [
        "srun",
        "--nodes=2",
        "--ntasks=2",
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
        "bash",
        "-c",
        'export JAX_PROCESS_ID=$SLURM_PROCID; exec "$@"',
        "tr-align-task",
        "/shared/venv/bin/tr-align",
        "train",
        "--config=configs/default.py:tr-hard",
        "--workdir=runs/slurm-77",
    ]


def test_slurm_gives_each_task_its_process_id(tmp_path):
    """Real run with stand-ins: srun starts its command as tasks 0 and 1, tr-align echoes."""
    venv = tmp_path / "venv"
    _fake_bin(
        venv,
        "tr-align",
        'echo "$JAX_COORDINATOR_ADDRESS $JAX_NUM_PROCESSES $JAX_PROCESS_ID $*"',
    )
    srun = (
        'while [ "${1#--}" != "$1" ]; do shift; done\n'
        'for i in 0 1; do SLURM_PROCID=$i "$@"; done\n'
        "exit 0"
    )
    env = _slurm_env(tmp_path, VENV=str(venv), JAX_PORT="2222")
    env["PATH"] = f"{_fake_bin(tmp_path / 'stand-in', 'srun', srun)}:{env['PATH']}"
    rc, _, out, err = _launch("slurm.sbatch", "--workdir=/shared/run", env=env, tmp_path=tmp_path)
    assert rc == 0, err
    lines = [line for line in out.splitlines() if not line.startswith("+ ")]
    args = "train --config=configs/default.py --workdir=/shared/run"
    assert lines == [f"gpu01:2222 2 0 {args}", f"gpu01:2222 2 1 {args}"]


def _counting_tr_align(tmp_path, codes):
    """A stand-in tr-align that exits with codes[k] on its k-th run (the last one after)."""
    venv = tmp_path / "venv"
    table = " ".join(str(c) for c in codes)
    _fake_bin(
        venv,
        "tr-align",
        f"n=$(cat {tmp_path}/runs 2>/dev/null || echo 0); echo $((n + 1)) > {tmp_path}/runs\n"
        f'set -- {table}; shift $(( n < $# ? n : $# - 1 )); echo "run $n"; exit $1',
    )
    return venv


@pytest.mark.parametrize(
    "codes, extra, runs, rc",
    [
        ((75, 75, 0), [], 3, 0),  # resumed twice, then done
        ((75,), ["--max-restarts=1"], 2, 75),  # gives up after its restarts
        ((1, 0), [], 1, 1),  # a failure is not retried
    ],
)
def test_gpu_local_reruns_on_exit_75(tmp_path, codes, extra, runs, rc):
    venv = _counting_tr_align(tmp_path, codes)
    got, _, out, err = _launch(
        "gpu_local.sh",
        "--no-install",
        f"--venv={venv}",
        f"--workdir={tmp_path / 'run'}",
        *extra,
        tmp_path=tmp_path,
    )
    assert got == rc, err
    assert int((tmp_path / "runs").read_text()) == runs
    assert err.count("resuming, restart") == runs - 1


def test_slurm_reruns_srun_on_exit_75(tmp_path):
    venv = _counting_tr_align(tmp_path, (75, 0))
    srun = 'while [ "${1#--}" != "$1" ]; do shift; done\n"$@"'
    env = _slurm_env(tmp_path, VENV=str(venv))
    env["PATH"] = f"{_fake_bin(tmp_path / 'stand-in', 'srun', srun)}:{env['PATH']}"
    rc, _, out, err = _launch("slurm.sbatch", "--workdir=/shared/run", env=env, tmp_path=tmp_path)
    assert rc == 0, err
    assert int((tmp_path / "runs").read_text()) == 2 and "resuming, restart 1/3" in err
    env["MAX_RESTARTS"] = "0"
    (tmp_path / "runs").unlink()
    rc, _, _, err = _launch("slurm.sbatch", "--workdir=/shared/run", env=env, tmp_path=tmp_path)
    assert rc == 75 and int((tmp_path / "runs").read_text()) == 1
