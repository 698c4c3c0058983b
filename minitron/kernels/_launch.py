"""Host-side helpers shared by the Triton loss kernels (``kl_div``, ``topk_kl``): the vocabulary block size,
the warp count, the interpreter requirement on CPU tensors, and the launch on the tensors' device.

Imports torch and triton only (no kernel module).
"""
from __future__ import annotations

import os
from typing import Callable

import torch
import triton

MAX_BLOCK_V = 2048  # 8 warps x 8 elements per thread: no register spills on sm_80/sm_90
MIN_BLOCK_V = 16


def block_v(v: int, requested: int | None) -> int:
    """The vocabulary chunk of one program: ``requested`` (a power of two; tests force multi-chunk rows with it)
    or the next power of two of ``v``, clamped to [``MIN_BLOCK_V``, ``MAX_BLOCK_V``]."""
    if requested is not None:
        if requested < 1 or requested & (requested - 1):
            raise ValueError(f"block_v must be a positive power of two, got {requested}")
        return requested
    return max(MIN_BLOCK_V, min(triton.next_power_of_2(v), MAX_BLOCK_V))


def num_warps(block: int) -> int:
    """Warps per program for a vocabulary chunk of ``block`` elements."""
    return 4 if block <= 1024 else 8


def require_interpreter(device: torch.device, op: str) -> None:
    """Raise ``RuntimeError`` for CPU tensors unless the Triton interpreter is on."""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"Triton {op} on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")


def launch(device: torch.device, fn: Callable[[], None]) -> None:
    """Run ``fn`` (a kernel launch) with ``device`` current when it is a CUDA device."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            fn()
    else:
        fn()
