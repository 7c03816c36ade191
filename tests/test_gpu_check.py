"""benchmarks/gpu_check.sh runs end to end in its CPU smoke mode (the GPU run is done by hand
on a lent accelerator; this keeps the script from rotting)."""

import json
import os
import subprocess

import pytest

from conftest import REPO


@pytest.mark.slow
def test_gpu_check_cpu_smoke_writes_its_report(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu-smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    ours = report["tr_align"]
    assert "error" not in ours, ours.get("traceback")
    assert ours["layout"] == "prefix_shared" and ours["real_tokens_per_s"] > 0
    # real tokens count the prompt for chosen and rejected; the shared layout computes fewer
    assert ours["real_tokens_per_s"] > ours["processed_tokens_per_s"]
    assert "parity" in report
