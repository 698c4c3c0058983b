"""Triton kernels of the structured slicing ops (``minitron.ops.slicing``).

One launch gathers the kept rows/columns of *all* tensors of a call. Every tensor gets a row of a
descriptor table (int64: source/destination/index addresses, canonical extents and strides, see
``csrc/common/slicing_math.h``); program ``p`` copies one chunk of one output line of the tensor
``prog_tensor[p]``. The copy is bitwise: all tensors are addressed in *units* of the smallest
element size of the call (an fp32 element is two 16-bit units next to bf16 tensors), so tensors of
different dtypes share one compiled kernel and one launch. Addresses are passed as integers and
turned into pointers inside the kernel (valid on GPUs; under ``TRITON_INTERPRET=1`` on CPU
tensors).

``compact_triton`` (in place) stages bounded slabs of the result: it gathers output lines
``[l0, l1)`` into a scratch buffer, then copies the slab to its final place. Slabs go in increasing
order and a slab's destination never reaches the source of a later line (sorted index, see
``minitron.ops.slicing.compact_``), so the extra memory is the scratch bound, not the tensor size.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

log = logging.getLogger(__name__)

__all__ = ["gather_slices_triton", "compact_triton"]

_NF = 16  # descriptor fields (int64), see _describe


# Canonical memory layout of csrc/common/slicing_math.h (make_layout / is_col_major). Defined here, not
# imported from minitron.ops.slicing: kernels are the lower layer and never import the ops built on them.
# tests/ops/test_slicing.py checks that this copy and the ops' copy agree on every layout.


def _col_major(t: Tensor) -> bool:
    """Whether a 2-D tensor's lines (memory rows) are its columns (extent-1 dims never decide)."""
    return t.dim() == 2 and t.shape[0] > 1 and t.shape[1] > 1 and t.stride(0) < t.stride(1)


def _layout(shape: Sequence[int], strides: Sequence[int], col_major: bool) -> tuple[int, int, int, int, int, int]:
    """``(outer, inner, so, si, outer_dim, inner_dim)`` of slicing_math.h ``make_layout``."""
    if len(shape) == 1:
        outer, inner, so, si, od, idim = 1, shape[0], 0, strides[0], -1, 0
    else:
        od = 1 if col_major else 0
        idim = 1 - od
        outer, inner, so, si = shape[od], shape[idim], strides[od], strides[idim]
    if inner <= 1:
        si = 1
    if outer <= 1:
        so = inner * si
    return outer, inner, so, si, od, idim
_BLOCK = 1024  # units per program


@triton.jit
def _as_ptr(addr, UNIT_BYTES: tl.constexpr):
    if UNIT_BYTES == 1:
        p = addr.to(tl.pointer_type(tl.int8))
    elif UNIT_BYTES == 2:
        p = addr.to(tl.pointer_type(tl.int16))
    elif UNIT_BYTES == 4:
        p = addr.to(tl.pointer_type(tl.int32))
    else:
        p = addr.to(tl.pointer_type(tl.int64))
    return p


@triton.jit
def _gather_slices_kernel(desc_ptr, prog_ptr, NF: tl.constexpr, UNIT_BYTES: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(prog_ptr + pid).to(tl.int64)
    d = desc_ptr + t * NF
    src = _as_ptr(tl.load(d + 0), UNIT_BYTES)
    dst = _as_ptr(tl.load(d + 1), UNIT_BYTES)
    idx_ptr = tl.load(d + 2).to(tl.pointer_type(tl.int64))
    lw = tl.load(d + 3)  # log2(units per element)
    out_inner = tl.load(d + 5)
    so = tl.load(d + 6)
    si = tl.load(d + 7)
    dso = tl.load(d + 8)
    dsi = tl.load(d + 9)
    mode = tl.load(d + 10)  # 0: select lines, 1: select positions inside lines
    block = tl.load(d + 11)
    line0 = tl.load(d + 12)
    cpl = tl.load(d + 13)  # programs per output line
    pstart = tl.load(d + 14)

    local = pid.to(tl.int64) - pstart
    o = local // cpl
    c = local - o * cpl
    u = c * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    m = u < (out_inner << lw)
    j = u >> lw
    sub = u & ((1 << lw) - 1)
    g = line0 + o
    if mode == 0:
        sline = tl.load(idx_ptr + g // block) * block + g % block
        sj = j
    else:
        sline = g
        sj = tl.load(idx_ptr + j // block, mask=m, other=0) * block + j % block
    soff = ((sline * so + sj * si) << lw) + sub
    doff = ((o * dso + j * dsi) << lw) + sub
    v = tl.load(src + soff, mask=m)
    tl.store(dst + doff, v, mask=m)




def _describe(src: Tensor, idx: Tensor, dim: int, block: int, dst: Tensor, dso: int, dsi: int, unit: int,
              line0: int, n_lines: int, pstart: int) -> tuple[list[int], int]:
    """Descriptor row for copying output lines ``[line0, line0 + n_lines)`` of ``src`` (lines in the
    canonical orientation of ``src``) to ``dst``, whose line ``l - line0`` (line stride ``dso``,
    element stride ``dsi``, in elements) receives output line ``l``. Returns the row and the number
    of programs it needs."""
    cm = _col_major(src)
    outer, inner, so, si, od, idim = _layout(src.shape, src.stride(), cm)
    k = idx.numel()
    select_inner = dim == idim
    out_inner = k * block if select_inner else inner
    es = src.element_size()
    w = es // unit
    lw = w.bit_length() - 1
    cpl = triton.cdiv(out_inner * w, _BLOCK)
    n_prog = n_lines * cpl
    row = [0] * _NF
    row[0] = src.data_ptr()
    row[1] = dst.data_ptr()
    row[2] = idx.data_ptr()
    row[3] = lw
    row[4] = n_lines
    row[5] = out_inner
    row[6], row[7], row[8], row[9] = so, si, dso, dsi
    row[10] = 1 if select_inner else 0
    row[11] = block
    row[12] = line0
    row[13] = max(cpl, 1)
    row[14] = pstart
    return row, n_prog


def _to_device(host: Tensor, device: torch.device) -> Tensor:
    """Host metadata -> ``device``; to a GPU through pinned memory, asynchronously (no sync per call)."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _launch(rows: list[list[int]], counts: list[int], unit: int, device: torch.device) -> None:
    total = sum(counts)
    if total == 0:
        return
    desc = _to_device(torch.tensor(rows, dtype=torch.int64), device)
    prog = _to_device(torch.repeat_interleave(torch.arange(len(rows), dtype=torch.int32),
                                              torch.tensor(counts, dtype=torch.int64)), device)
    _gather_slices_kernel[(total,)](desc, prog, NF=_NF, UNIT_BYTES=unit, BLOCK=_BLOCK)


def gather_slices_triton(tensors: Sequence[Tensor], indices: Sequence[Tensor], dims: Sequence[int],
                         blocks: Sequence[int], outs: Sequence[Tensor]) -> None:
    """Fills ``outs[i]`` with the kept units of ``tensors[i]`` (one launch for all tensors).

    ``indices[i]``: sorted, distinct, in-range int64 on the tensors' device (checked by the caller).
    ``outs[i]``: allocated by the caller with the output shape (any strides).
    """
    if not tensors:
        return
    unit = min(t.element_size() for t in tensors)
    rows, counts, pstart = [], [], 0
    for t, i, d, b, o in zip(tensors, indices, dims, blocks, outs):
        if o.numel() == 0:
            continue
        cm = _col_major(t)
        outer, _, _, _, _, idim = _layout(t.shape, t.stride(), cm)
        n_lines = outer if d == idim else i.numel() * b
        _, _, dso, dsi, _, _ = _layout(o.shape, o.stride(), cm)
        row, n = _describe(t, i, d, b, o, dso, dsi, unit, 0, n_lines, pstart)
        rows.append(row)
        counts.append(n)
        pstart += n
    _launch(rows, counts, unit, tensors[0].device)


def compact_triton(tensor: Tensor, idx: Tensor, dim: int, block: int, shape: Sequence[int],
                   strides: Sequence[int], *, scratch_bytes: int) -> None:
    """In-place compaction of ``tensor`` into the view ``as_strided(shape, strides, offset)``.

    Extra memory: one scratch slab of at most ``scratch_bytes`` (at least one output line).
    """
    cm = _col_major(tensor)
    outer, inner, _, _, od, idim = _layout(tensor.shape, tensor.stride(), cm)
    k = idx.numel()
    select_inner = dim == idim
    out_lines = outer if select_inner else k * block
    out_inner = k * block if select_inner else inner
    if out_lines == 0 or out_inner == 0:
        return
    es = tensor.element_size()
    view = tensor.as_strided(shape, strides)
    per_slab = max(1, scratch_bytes // (out_inner * es))
    log.debug("compact_triton: %d output lines in slabs of %d lines", out_lines, per_slab)
    for l0 in range(0, out_lines, per_slab):
        n = min(per_slab, out_lines - l0)
        scratch = torch.empty((n, out_inner), dtype=tensor.dtype, device=tensor.device)
        row, count = _describe(tensor, idx, dim, block, scratch, out_inner, 1, es, l0, n, 0)
        _launch([row], [count], es, tensor.device)
        if od < 0:  # 1-D: a single line
            view.copy_(scratch.reshape(-1))
        elif od == 0:
            view.narrow(0, l0, n).copy_(scratch)
        else:
            view.narrow(1, l0, n).copy_(scratch.t())
