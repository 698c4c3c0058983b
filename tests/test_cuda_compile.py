"""Every CUDA source (csrc/cuda/*.cu) compiles with nvcc for sm_80 and sm_90.

No GPU is needed: this only compiles (``-c``), with the flags setup.py gives nvcc, into a temporary
directory. The kernels share their math with the CPU kernels through csrc/common/, so a header change
made for the CPU side is caught here too. Skipped only when nvcc is not installed (looked up on PATH,
then under $CUDA_HOME/bin and /usr/local/cuda/bin).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CU_FILES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
ARCHS = ("80", "90")
# as in setup.py (nvcc extra_compile_args), plus the two architectures
NVCC_FLAGS = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]


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


def test_cuda_sources_exist():
    assert CU_FILES, "no csrc/cuda/*.cu found"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin): "
                                         "CUDA sources are not compile-checked")
@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: p.name)
def test_nvcc_compiles(source: Path, tmp_path: Path):
    gencode = []
    for arch in ARCHS:
        gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    obj = tmp_path / (source.stem + ".o")
    cmd = [NVCC, *NVCC_FLAGS, *gencode, "-I", str(ROOT / "csrc"), "-c", str(source), "-o", str(obj)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, f"nvcc failed on {source.name}:\n$ {' '.join(cmd)}\n" \
                                 f"{proc.stdout}\n{proc.stderr}"
    assert obj.is_file() and obj.stat().st_size > 0


# The torch glue (csrc/cuda/*_torch.cpp) includes torch's CUDA headers, which the CPU torch wheel lacks.
# Point MINITRON_TORCH_CUDA_INCLUDE at the include folders of a CUDA torch wheel (':'-separated; e.g. the
# unpacked wheel's torch/include plus the cuBLAS/cuSPARSE/cuSOLVER wheels' include folder, as
# tools/torch_cuda_headers.sh prepares them) to syntax-check the glue here too.
GLUE_FILES = sorted((ROOT / "csrc" / "cuda").glob("*_torch.cpp"))
TORCH_CUDA_INCLUDE = [p for p in os.environ.get("MINITRON_TORCH_CUDA_INCLUDE", "").split(":") if p]


@pytest.mark.skipif(not TORCH_CUDA_INCLUDE, reason="MINITRON_TORCH_CUDA_INCLUDE not set (CUDA torch headers)")
@pytest.mark.parametrize("source", GLUE_FILES, ids=lambda p: p.name)
def test_torch_glue_compiles(source: Path):
    import sysconfig

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
           "-I", sysconfig.get_paths()["include"], str(source)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{source.name} does not compile against CUDA torch:\n{proc.stderr[-4000:]}"
