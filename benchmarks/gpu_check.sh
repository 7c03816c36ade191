#!/usr/bin/env bash
# One command for a lent accelerator (NVIDIA H200: jax 0.11 with CUDA, torch, transformers,
# flax, optax, orbax, chex preinstalled; nothing can be downloaded there). Installs the
# carried wheels (benchmarks/wheels/*.whl: grain, ml-collections, tensorboardX, gguf,
# datasets, trl, ... built here with `bash benchmarks/gpu_check.sh --fetch-wheels`) and
# the project itself without dependencies, then runs benchmarks/gpu_check.py: model parity
# in float32 and bf16, TR-DPO tokens/s and MFU on a ~1.1B Llama (bf16, packed 1024-token
# rows), and TRL DPO/TR-DPO on the same device for the ratio. Results: OUT/gpu_check.json
# (default benchmarks/results/gpu). Budget: under 8 minutes on one H200.
#
#   bash benchmarks/gpu_check.sh [--out DIR] [--skip parity,trl]     # on the GPU host
#   bash benchmarks/gpu_check.sh --cpu-smoke --out /tmp/smoke       # here, CI: tiny, CPU
#   bash benchmarks/gpu_check.sh --fetch-wheels                      # here, before the run
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=benchmarks/wheels
if [[ "${1:-}" == "--fetch-wheels" ]]; then
  # the pure-Python packages the GPU host lacks (about 6 MB), without their dependencies
  python3 -m pip download -q --no-deps -d "$WHEELS" grain array-record portpicker \
    ml-collections tensorboardX gguf datasets dill multiprocess trl
  ls -la "$WHEELS"
  exit 0
fi
PY=${PYTHON:-python3}
if [[ " $* " != *" --cpu-smoke "* ]]; then
  if compgen -G "$WHEELS/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-deps --no-index "$WHEELS"/*.whl
  fi
  "$PY" -m pip install -q --no-deps --no-build-isolation -e .
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
elif [[ -x .venv/bin/python ]]; then
  PY=.venv/bin/python
fi
exec timeout 480 "$PY" benchmarks/gpu_check.py "$@"
