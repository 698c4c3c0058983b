#!/usr/bin/env bash
# Download, HERE (a machine with package-index access), the wheels that tools/gpu_check.sh installs on the lent
# GPU machine, which has a CUDA torch, Triton and nvcc but no package index. The wheels land in .whl/ at the
# repository root (an ignored folder: never commit them); the device tool carries that folder to the GPU machine
# (`carry: [".whl"]`, 64 MiB at most, so only small pure-Python wheels belong here).
#
# Usage: bash tools/fetch_gpu_wheels.sh [NAME==VERSION ...]   (default: the list below)
#   PIP=...      pip command (default: python3 -m pip; the project venv works: /work/main/.venv/bin/python -m pip)
#   PY_VERSION=  target Python (default 3.12, the GPU machine's)
#
# What and why: liger-kernel (Liger's KL/JSD kernels, benchmark comparison providers), trl (TRL's distillation
# losses, comparison tests), accelerate (a trl requirement that a plain CUDA-torch machine lacks). Versions are
# the ones the project's CPU venv pins (requirements-dev.txt: trl>=1.16,<2). They install with --no-deps: trl's
# other requirements (transformers, datasets, ...) must already be on the GPU machine; gpu_check.sh reports which
# imports work.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST="$ROOT/.whl"
PIP=${PIP:-python3 -m pip}
PY_VERSION=${PY_VERSION:-3.12}
if [ $# -gt 0 ]; then
  SPECS=("$@")
else
  SPECS=("liger-kernel==0.8.5" "trl==1.16.0" "accelerate==1.16.0")
fi
mkdir -p "$DEST"
for spec in "${SPECS[@]}"; do
  # one at a time: a failure names the package
  $PIP download --quiet --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 -d "$DEST" "$spec"
done
ls -l "$DEST"
total=$(du -sk "$DEST" | cut -f1)
echo "== $(ls "$DEST"/*.whl | wc -l) wheels, ${total} KiB in $DEST"
if [ "$total" -gt 32768 ]; then
  echo "warning: .whl/ holds more than 32 MiB; the device tool carries at most 64 MiB in all" >&2
fi
