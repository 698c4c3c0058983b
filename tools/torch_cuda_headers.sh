#!/usr/bin/env bash
# Fetch the headers of a CUDA build of torch (and the cuBLAS/cuSPARSE/cuSOLVER headers it includes) so
# that the CUDA torch glue (csrc/cuda/*_torch.cpp) can be syntax-checked on a machine with the CPU wheel:
#   bash tools/torch_cuda_headers.sh [DIR] [TORCH_VERSION]
#   MINITRON_TORCH_CUDA_INCLUDE=$(bash tools/torch_cuda_headers.sh) pytest tests/test_cuda_compile.py
# Downloads about 1.5 GB once (cached in DIR); prints the ':'-separated include folders.
set -euo pipefail
DIR=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/minitron-torch-cuda}
VER=${2:-2.11.0}
PY=${PYTHON:-python3}
mkdir -p "$DIR"
if [ ! -d "$DIR/torch/include" ]; then
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
    -d "$DIR/whl" "torch==$VER" >&2
  unzip -q -o "$DIR"/whl/torch-*.whl 'torch/include/*' -d "$DIR" >&2
fi
if [ ! -d "$DIR/nvidia" ]; then
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    -d "$DIR/whl" nvidia-cusparse nvidia-cublas nvidia-cusolver >&2
  for w in "$DIR"/whl/nvidia_*.whl; do unzip -q -o "$w" '*.h' -d "$DIR" >&2; done
fi
inc=$(find -L "$DIR/nvidia" -type d -name include | head -1)
echo "$DIR/torch/include:$inc"
