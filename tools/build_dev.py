"""Build a development copy of the extension from a subset of the C++ sources.

Several people (or sessions) work on different kernels in one checkout; building the whole
``minitron._C`` while another kernel is half-written would fail or race on the shared .so. This
builds only the named sources (plus ``csrc/module.cpp``) into ``/tmp/minitron-dev/<name>/`` and
prints the library path. Load it in tests with ``MINITRON_EXT=<path>``:

    python tools/build_dev.py kl csrc/cpu/kl_div.cpp
    MINITRON_EXT=/tmp/minitron-dev/kl/minitron_dev_kl.so pytest tests/ops/test_kl_div.py

The real build is ``make build`` (all sources, ``setup.py``).
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", help="short name for this build (directory and library name)")
    ap.add_argument("sources", nargs="+", help="C++ sources relative to the repository root")
    args = ap.parse_args(argv)

    from torch.utils.cpp_extension import load

    build_dir = os.path.join("/tmp/minitron-dev", args.name)
    os.makedirs(build_dir, exist_ok=True)
    sources = [os.path.join(ROOT, "csrc", "module.cpp")] + [os.path.join(ROOT, s) for s in args.sources]
    lib_name = f"minitron_dev_{args.name}"
    load(
        name=lib_name,
        sources=sources,
        extra_include_paths=[os.path.join(ROOT, "csrc")],
        extra_cflags=["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno"],
        extra_ldflags=["-fopenmp"],
        build_directory=build_dir,
        is_python_module=False,
        verbose=False,
    )
    path = os.path.join(build_dir, lib_name + ".so")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
