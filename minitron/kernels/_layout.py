"""The canonical memory layout of a sliced tensor (``csrc/common/slicing_math.h``: ``make_layout`` /
``is_col_major``), in plain Python on shapes and strides.

One copy for both layers: the Triton kernels (``minitron.kernels.slicing``) describe tensors with it and the op
layer (``minitron.ops.slicing``) shapes outputs with it. Imports only torch, so the op layer can use it without
Triton installed.
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor


def col_major(t: Tensor) -> bool:
    """Whether a 2-D tensor's lines (memory rows) are its columns (extent-1 dims never decide)."""
    return t.dim() == 2 and t.shape[0] > 1 and t.shape[1] > 1 and t.stride(0) < t.stride(1)


def layout(shape: Sequence[int], strides: Sequence[int], is_col_major: bool) -> tuple[int, int, int, int, int, int]:
    """``(outer, inner, so, si, outer_dim, inner_dim)``: lines, elements per line, their strides, and which
    dims they are (``outer_dim`` -1 for a 1-D tensor)."""
    if len(shape) == 1:
        outer, inner, so, si, od, idim = 1, shape[0], 0, strides[0], -1, 0
    else:
        od = 1 if is_col_major else 0
        idim = 1 - od
        outer, inner, so, si = shape[od], shape[idim], strides[od], strides[idim]
    if inner <= 1:
        si = 1
    if outer <= 1:
        so = inner * si
    return outer, inner, so, si, od, idim


def dim_order(shape: Sequence[int], strides: Sequence[int]) -> list[int]:
    """The dims of a tensor in memory order, outermost first (``csrc/common/slicing_math.h``: ``dim_order``).

    Dims of extent > 1 are ordered by decreasing stride (ties keep the logical order); dims of extent <= 1
    (whose strides mean nothing) stay at their logical positions. For a 2-D tensor this is ``[1, 0]`` exactly
    when :func:`col_major` holds, else ``[0, 1]``; for a permuted contiguous tensor it is the permutation.
    """
    big = sorted((d for d in range(len(shape)) if shape[d] > 1), key=lambda d: (-strides[d], d))
    it = iter(big)
    return [d if shape[d] <= 1 else next(it) for d in range(len(shape))]


def dense_strides(shape: Sequence[int], order: Sequence[int]) -> tuple[int, ...]:
    """Strides of a dense tensor of ``shape`` whose dims are laid out in ``order`` (outermost first)."""
    strides = [0] * len(shape)
    step = 1
    for d in reversed(order):
        strides[d] = step
        step *= max(shape[d], 1)
    return tuple(strides)
