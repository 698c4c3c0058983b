"""The hidden-state loss CUDA sources compile: csrc/cuda/hidden_loss.cu with nvcc for sm_80 and sm_90, and (when
CUDA torch headers are available) the torch glue csrc/cuda/hidden_loss_torch.cpp.

Mirrors tests/test_cuda_compile.py (which compiles every csrc/cuda/*.cu, this file's kernel included) so that the
kernel's own check lives beside it: no GPU is needed, only nvcc (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin), with
the flags setup.py gives nvcc; the glue check needs MINITRON_TORCH_CUDA_INCLUDE (tools/torch_cuda_headers.sh).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "csrc" / "cuda" / "hidden_loss.cu"
GLUE = ROOT / "csrc" / "cuda" / "hidden_loss_torch.cpp"
ARCHS = ("80", "90")
NVCC_FLAGS = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]  # as setup.py


def _find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            cand = Path(home) / "bin" / "nvcc"
            if cand.is_file() and os.access(cand, os.X_OK):
                return str(cand)
    return None


NVCC = _find_nvcc()
TORCH_CUDA_INCLUDE = [p for p in os.environ.get("MINITRON_TORCH_CUDA_INCLUDE", "").split(":") if p]


def test_sources_exist():
    assert SOURCE.is_file() and GLUE.is_file()
    assert (ROOT / "csrc" / "cuda" / "hidden_loss.cuh").is_file()
    assert (ROOT / "csrc" / "common" / "hidden_loss_math.h").is_file()


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
def test_nvcc_compiles_hidden_loss(tmp_path: Path):
    gencode = []
    for arch in ARCHS:
        gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    obj = tmp_path / "hidden_loss.o"
    cmd = [NVCC, *NVCC_FLAGS, *gencode, "-I", str(ROOT / "csrc"), "-c", str(SOURCE), "-o", str(obj)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, f"nvcc failed on {SOURCE.name}:\n$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    assert obj.is_file() and obj.stat().st_size > 0


@pytest.mark.skipif(not TORCH_CUDA_INCLUDE, reason="MINITRON_TORCH_CUDA_INCLUDE not set (CUDA torch headers)")
def test_torch_glue_compiles():
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    incs = []
    for inc in TORCH_CUDA_INCLUDE:
        incs += ["-I", inc, "-I", str(Path(inc) / "torch" / "csrc" / "api" / "include")]
    cuda_home = next((Path(h) for h in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda")
                      if h and (Path(h) / "include" / "cuda_runtime.h").is_file()), None)
    if cuda_home is None:
        pytest.skip("no CUDA toolkit headers ($CUDA_HOME/include/cuda_runtime.h)")
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-DMINITRON_WITH_CUDA=1", "-DTORCH_EXTENSION_NAME=_C",
           "-I", str(ROOT / "csrc"), *incs, "-I", str(cuda_home / "include"),
           "-I", sysconfig.get_paths()["include"], str(GLUE)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{GLUE.name} does not compile against CUDA torch:\n{proc.stderr[-4000:]}"
