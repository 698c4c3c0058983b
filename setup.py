"""Build script for minitron and its C++/CUDA extension ``minitron._C``.

CPU sources (``csrc/*.cpp`` and ``csrc/cpu/*.cpp``) are always built. CUDA sources
(``csrc/cuda/*.cu`` plus the torch glue ``csrc/cuda/*_torch.cpp``) are built only when the
installed torch has CUDA or ``FORCE_CUDA=1`` is set; ``TORCH_CUDA_ARCH_LIST`` is honoured and
defaults to sm_80 and sm_90.

The CPU kernels are compiled for baseline x86-64 and pick AVX-512/AVX2 code paths at run time
(function-level ``target`` attributes plus ``__builtin_cpu_supports``), so the build never emits
instructions an older CPU cannot run.
"""
from __future__ import annotations

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _ext_modules():
    if os.environ.get("MINITRON_NO_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME
    except ImportError:  # pragma: no cover - torch is a hard requirement of the build
        print("minitron: torch is not importable; building without the C++ extension", file=sys.stderr)
        return [], {}

    with_cuda = os.environ.get("FORCE_CUDA") == "1" or (torch.cuda.is_available() or torch.version.cuda is not None)
    with_cuda = with_cuda and CUDA_HOME is not None and os.environ.get("MINITRON_NO_CUDA") != "1"

    cpu_sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    include_dirs = [os.path.join(ROOT, "csrc")]
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno", "-DMINITRON_VERSION=\"%s\"" % VERSION]
    link_flags = ["-fopenmp"]
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        cuda_sources = _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*_torch.cpp")
        ext = CUDAExtension(
            "minitron._C",
            cpu_sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=[("MINITRON_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]},
            extra_link_args=link_flags,
            py_limited_api=True,
        )
    else:
        ext = CppExtension(
            "minitron._C",
            cpu_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
            py_limited_api=True,
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _ext_modules()

setup(
    name="minitron",
    version=VERSION,
    description="Custom-kernel toolkit for Minitron-style pruning and distillation of LLMs",
    packages=find_packages(include=["minitron", "minitron.*"]),
    # the demo/study text data (3.4 MB, licences in its README), found via importlib.resources
    package_data={"minitron.resources": ["data/README.md", "data/*/*.txt", "architectures/*.json", "models.json"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.13,<2.15",
        "transformers>=5.25",
        "datasets>=3.0",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "numpy",
        "tqdm",
        "pyyaml",
        "matplotlib",
        "gguf>=0.19",
    ],
    extras_require={"triton": ["triton>=3.0"]},
    entry_points={"console_scripts": ["minitron=minitron.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
    zip_safe=False,
)
