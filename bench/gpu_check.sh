#!/usr/bin/env bash
# One command on a CUDA machine: the GPU test (no host syncs, every value lands)
# and the GPU step-loop benchmark. Packages the machine lacks come from .whl/
# (bench/gpu_wheels.sh, run where a package index is reachable). Results go to
# $OUT if set (the device tool), else bench-out/.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/kfs-site .whl/*.whl
    export PYTHONPATH="/tmp/kfs-site:$PWD"
    export PATH="/tmp/kfs-site/bin:$PATH"
else
    export PYTHONPATH="$PWD"
fi
out=${OUT:-bench-out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt" || true
python3 -m pytest -q -p no:cacheprovider tests/test_device.py 2>&1 | tee "$out/gpu_test.log"
python3 bench/gpu_step_loop.py --out "$out/gpu_step_loop.json" 2>&1 | tee "$out/gpu_bench.log"
