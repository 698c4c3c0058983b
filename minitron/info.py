"""``python -m minitron.info``: what was built and which backend each op uses.

Prints the versions of minitron, torch, triton and nvcc, whether the C++ extension was built (and with
CUDA), the CPU instruction set the CPU kernels use, and for every op the backend a CPU tensor and a
CUDA tensor would get (or why none can run).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import shutil
import subprocess
import sys

import torch


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _nvcc_version() -> str:
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if shutil.os.path.exists("/usr/local/cuda/bin/nvcc")
                                    else None)
    if nvcc is None:
        return "not found"
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "not runnable"
    for line in out.splitlines():
        if "release" in line:
            return line.split("release", 1)[1].split(",")[0].strip()
    return out.strip().splitlines()[-1] if out.strip() else "unknown"


def collect() -> dict:
    """All facts as a dict (used by :func:`main` and by benchmark result records)."""
    import minitron
    from minitron import _ext
    from minitron.ops import _dispatch, load_all

    ops_error = None
    try:
        load_all()
    except Exception as exc:  # an op module failing to import is reported, not fatal
        ops_error = f"{type(exc).__name__}: {exc}"
    info = _ext.build_info()
    facts = {
        "minitron": minitron.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda or "none",
        "cuda_available": torch.cuda.is_available(),
        "triton": _version("triton"),
        "nvcc": _nvcc_version(),
        "extension": _ext.extension_path() if _ext.available() else f"not built ({_ext.BUILD_HINT})",
        "extension_cuda": info.get("cuda") == "1",
        "cpu_isa": info.get("cpu_isa", "n/a"),
        "torch_threads": torch.get_num_threads(),
        "ops": {},
        "ops_error": ops_error,
    }
    for name, table in sorted(_dispatch.REGISTRY.items()):
        facts["ops"][name] = {"cpu": table.describe("cpu"), "cuda": table.describe("cuda")}
    return facts


def main(argv: list[str] | None = None) -> int:
    facts = collect()
    width = 16
    for key in ("minitron", "python", "torch", "torch_cuda", "cuda_available", "triton", "nvcc", "extension",
                "extension_cuda", "cpu_isa", "torch_threads"):
        print(f"{key:<{width}} {facts[key]}")
    if facts["ops_error"]:
        print(f"{'ops_error':<{width}} {facts['ops_error']}")
    print()
    print(f"{'op':<24} {'CPU tensor':<14} CUDA tensor")
    for name, where in facts["ops"].items():
        print(f"{name:<24} {where['cpu']:<14} {where['cuda']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
