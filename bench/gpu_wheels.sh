#!/usr/bin/env bash
# Download, here, the wheels a CUDA machine without a package index needs for
# bench/gpu_check.sh: what the client, the sidecar and wandb import beyond what
# such a machine's image usually has (torch, msgpack, typer, rich, protobuf,
# psutil, requests, pytest, hypothesis). Versions: the ones in this project's .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
pip=".venv/bin/python -m pip"
dest=${1:-.whl}
mkdir -p "$dest"
names="pyzmq wandb gitpython gitdb smmap pydantic pydantic-core annotated-types typing-inspection sentry-sdk platformdirs pytest-timeout"
specs=()
for n in $names; do
    v=$($pip show "$n" 2>/dev/null | awk '/^Version:/ {print $2}')
    specs+=("$n${v:+==$v}")
done
$pip download -q --no-deps --only-binary=:all: --python-version "${PYVER:-3.12}" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" "${specs[@]}"
echo "wheels in $dest: $(find "$dest" -name "*.whl" | wc -l) files, $(du -sh "$dest" | cut -f1)"
