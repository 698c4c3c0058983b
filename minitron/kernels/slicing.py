"""Triton kernels of the structured slicing ops (``minitron.ops.slicing``).

One launch per element size gathers the kept rows/columns of *all* tensors of a call (a transformer
layer's matrices share one dtype: one launch). Every tensor gets a row of a descriptor table (int64:
source/destination/index addresses, canonical extents and strides, see ``csrc/common/slicing_math.h``:
tensors of up to 3 dims as groups x lines x elements in memory order, any one or two of the three axes cut)
uploaded asynchronously; program ``p`` finds its descriptor with one vector compare against the table's
program starts and copies a tile of ``BLOCK_L`` output lines x ``BLOCK_C`` output positions:

* outer selection (rows of a row-major matrix, head blocks): the ``BLOCK_L`` source lines are looked up
  once per program; the tile is ``BLOCK_L`` contiguous runs;
* inner selection (columns, head blocks of columns): the ``BLOCK_C`` source positions are computed once per
  program (index load and division per position, not per element); every line of the tile reuses them, so
  reads follow the sorted positions along each line and writes are contiguous -- no transpose.

Addresses are passed as integers and turned into typed pointers inside the kernel (valid on GPUs; under
``TRITON_INTERPRET=1`` on CPU tensors). ``UNIT_STRIDE`` compiles the common case (unit element strides
everywhere) without the stride multiplications.

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

from minitron.kernels._layout import col_major as _col_major
from minitron.kernels._layout import dim_order as _dim_order
from minitron.kernels._layout import layout as _layout

log = logging.getLogger(__name__)

__all__ = ["gather_slices_triton", "compact_triton"]

_NF = 24  # descriptor fields (int64), see _describe
_TILE = 4096  # elements per program: BLOCK_L lines x BLOCK_C positions
_MAX_BLOCK_C = 1024


@triton.jit
def _as_ptr(addr, ELEM_BYTES: tl.constexpr):
    if ELEM_BYTES == 1:
        p = addr.to(tl.pointer_type(tl.int8))
    elif ELEM_BYTES == 2:
        p = addr.to(tl.pointer_type(tl.int16))
    elif ELEM_BYTES == 4:
        p = addr.to(tl.pointer_type(tl.int32))
    else:
        p = addr.to(tl.pointer_type(tl.int64))
    return p


@triton.jit
def _gather_slices_kernel(desc_ptr, n_desc, NF: tl.constexpr, NDESC: tl.constexpr, ELEM_BYTES: tl.constexpr,
                          UNIT_STRIDE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program -> (descriptor, tile of BLOCK_L output lines x BLOCK_C output positions).

    The descriptor is found from the programs' start table in one vector compare (no per-program map on the
    host). Output line o is group o // nl, line o % nl (3-D tensors; one group otherwise); the source line of
    each of the BLOCK_L lines is looked up once (group and line selections, either optional), then a
    [BLOCK_L, BLOCK_C] tile is copied. Inner selection: the BLOCK_C source positions are computed once (one
    index load and division per position, not per element). UNIT_STRIDE: every descriptor of the launch has
    unit element strides (addresses contiguous along a line: vectorisable loads/stores on GPUs).
    """
    pid = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, NDESC)
    starts = tl.load(desc_ptr + offs_d * NF + 14, mask=offs_d < n_desc, other=2**62)
    t = (tl.sum((starts <= pid).to(tl.int32), axis=0) - 1).to(tl.int64)
    d = desc_ptr + t * NF
    src = _as_ptr(tl.load(d + 0), ELEM_BYTES)
    dst = _as_ptr(tl.load(d + 1), ELEM_BYTES)
    iidx_ptr = tl.load(d + 2).to(tl.pointer_type(tl.int64))
    lidx_ptr = tl.load(d + 3).to(tl.pointer_type(tl.int64))
    out_lines = tl.load(d + 4)
    out_inner = tl.load(d + 5)
    so = tl.load(d + 6)
    si = tl.load(d + 7)
    dso = tl.load(d + 8)
    dsi = tl.load(d + 9)
    mode = tl.load(d + 10)  # 0: whole lines, 1: select positions inside lines
    iblock = tl.load(d + 11)
    line0 = tl.load(d + 12)
    col_tiles = tl.load(d + 13)
    pstart = tl.load(d + 14)
    lblock = tl.load(d + 15)
    has_l = tl.load(d + 16)
    gidx_ptr = tl.load(d + 17).to(tl.pointer_type(tl.int64))
    gblock = tl.load(d + 18)
    has_g = tl.load(d + 19)
    nl = tl.load(d + 20)
    sg = tl.load(d + 21)
    dsg = tl.load(d + 22)

    local = pid - pstart
    a = local // col_tiles
    c = local - a * col_tiles
    o = a * BLOCK_L + tl.arange(0, BLOCK_L).to(tl.int64)  # local output lines
    j = c * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)  # output positions
    lm = o < out_lines
    jm = j < out_inner
    go = line0 + o  # global output lines
    grp = go // nl
    ln = go - grp * nl
    gsrc = tl.load(gidx_ptr + grp // gblock, mask=o < out_lines * has_g, other=0) * gblock + grp % gblock
    gsrc = tl.where(has_g != 0, gsrc, grp)
    lsrc = tl.load(lidx_ptr + ln // lblock, mask=o < out_lines * has_l, other=0) * lblock + ln % lblock
    lsrc = tl.where(has_l != 0, lsrc, ln)
    soff = gsrc * sg + lsrc * so
    doff = grp * dsg + ln * dso - line0 * dso
    if mode == 0:
        sj = j
    else:
        sj = tl.load(iidx_ptr + j // iblock, mask=jm, other=0) * iblock + j % iblock
    m = lm[:, None] & jm[None, :]
    if UNIT_STRIDE:
        v = tl.load(src + soff[:, None] + sj[None, :], mask=m)
        tl.store(dst + doff[:, None] + j[None, :], v, mask=m)
    else:
        v = tl.load(src + soff[:, None] + sj[None, :] * si, mask=m)
        tl.store(dst + doff[:, None] + j[None, :] * dsi, v, mask=m)


def _tile(out_inner: int) -> tuple[int, int]:
    """(BLOCK_L, BLOCK_C) for lines of ``out_inner`` output positions: ``_TILE`` elements per program."""
    block_c = max(16, min(_MAX_BLOCK_C, triton.next_power_of_2(max(out_inner, 1))))
    return _TILE // block_c, block_c


class _Canon:
    """A tensor of up to 3 dims in memory order (``csrc/common/slicing_math.h``): groups G, lines L, inner I.

    ``cuts`` maps a logical dim to its (sorted int64 index, block); ``out`` (optional) is the destination with
    the output's shape (any strides). Extents/strides of a missing axis are 1/0.
    """

    def __init__(self, t: Tensor, cuts: dict[int, tuple[Tensor, int]], out: Tensor | None = None) -> None:
        order = _dim_order(t.shape, t.stride())
        nd = t.dim()
        self.axes = ([order[0], order[1], order[2]] if nd == 3 else [-1, order[0], order[1]] if nd == 2
                     else [-1, -1, 0])
        gd, ld, idim = self.axes
        shape = list(t.shape)
        for dim, (idx, block) in cuts.items():
            shape[dim] = idx.numel() * block
        ext = lambda sizes, dd: 1 if dd < 0 else sizes[dd]  # noqa: E731
        std = lambda strides, dd: 0 if dd < 0 else strides[dd]  # noqa: E731
        self.ng, self.nl, self.ni = ext(shape, gd), ext(shape, ld), shape[idim]
        self.sg, self.so = std(t.stride(), gd), std(t.stride(), ld)
        self.si = 1 if t.shape[idim] <= 1 else t.stride(idim)
        self.cuts = cuts
        if out is not None:
            self.dsg, self.dso = std(out.stride(), gd), std(out.stride(), ld)
            self.dsi = 1 if shape[idim] <= 1 else out.stride(idim)

    def sel(self, axis: int) -> tuple[Tensor, int] | None:
        return self.cuts.get(self.axes[axis]) if self.axes[axis] >= 0 else None


def _describe(src: Tensor, cn: _Canon, dst: Tensor, dso: int, dsi: int, dsg: int, line0: int, n_lines: int,
              pstart: int, tile: tuple[int, int], dummy: Tensor) -> tuple[list[int], int, bool]:
    """Descriptor row for copying output lines ``[line0, line0 + n_lines)`` of ``src`` (canonical form ``cn``)
    to ``dst``, whose line ``l - line0`` of group 0 (line stride ``dso``, element stride ``dsi``, group stride
    ``dsg``, in elements) receives output line ``l``. Returns the row, the number of programs it needs (tiles
    of ``tile = (BLOCK_L, BLOCK_C)``) and whether its element strides are 1. ``dummy``: a valid int64 address
    for the index pointers of uncut axes (their loads are masked off)."""
    gsel, lsel, isel = cn.sel(0), cn.sel(1), cn.sel(2)
    out_inner = cn.ni
    block_l, block_c = tile
    col_tiles = max(1, triton.cdiv(out_inner, block_c))
    n_prog = triton.cdiv(n_lines, block_l) * col_tiles if out_inner > 0 else 0
    row = [0] * _NF
    row[0] = src.data_ptr()
    row[1] = dst.data_ptr()
    row[2] = (isel[0] if isel is not None and isel[0].numel() else dummy).data_ptr()
    row[3] = (lsel[0] if lsel is not None and lsel[0].numel() else dummy).data_ptr()
    row[4] = n_lines
    row[5] = out_inner
    row[6], row[7], row[8], row[9] = cn.so, cn.si, dso, dsi
    row[10] = 1 if isel is not None else 0
    row[11] = isel[1] if isel is not None else 1
    row[12] = line0
    row[13] = col_tiles
    row[14] = pstart
    row[15] = lsel[1] if lsel is not None else 1
    row[16] = 1 if lsel is not None else 0
    row[17] = (gsel[0] if gsel is not None and gsel[0].numel() else dummy).data_ptr()
    row[18] = gsel[1] if gsel is not None else 1
    row[19] = 1 if gsel is not None else 0
    row[20] = max(cn.nl, 1)
    row[21], row[22] = cn.sg, dsg
    return row, n_prog, cn.si == 1 and dsi == 1


def _to_device(host: Tensor, device: torch.device) -> Tensor:
    """Host metadata -> ``device``; to a GPU through pinned memory, asynchronously (no sync per call)."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _launch(rows: list[list[int]], total: int, elem_bytes: int, unit_stride: bool, tile: tuple[int, int],
            device: torch.device) -> None:
    if total == 0:
        return
    desc = _to_device(torch.tensor(rows, dtype=torch.int64), device)
    ndesc = max(2, triton.next_power_of_2(len(rows)))
    _gather_slices_kernel[(total,)](desc, len(rows), NF=_NF, NDESC=ndesc, ELEM_BYTES=elem_bytes,
                                    UNIT_STRIDE=unit_stride, BLOCK_L=tile[0], BLOCK_C=tile[1])


def gather_slices_triton(tensors: Sequence[Tensor], indices: Sequence[Tensor], dims: Sequence[int],
                         blocks: Sequence[int], outs: Sequence[Tensor], indices2: Sequence[Tensor] | None = None,
                         dims2: Sequence[int] | None = None, blocks2: Sequence[int] | None = None) -> None:
    """Fills ``outs[i]`` with the kept units of ``tensors[i]``: one launch per element size present (one
    launch for a transformer layer's matrices), tiles sized for the widest output line of the group.

    ``indices[i]``: sorted, distinct, in-range int64 on the tensors' device (checked by the caller); the
    optional second cuts ``indices2[i]`` / ``dims2[i]`` (-1: none) / ``blocks2[i]`` likewise.
    ``outs[i]``: allocated by the caller with the output shape (any strides). Tensors of up to 3 dims.
    """
    n = len(tensors)
    dims2 = list(dims2) if dims2 is not None else [-1] * n
    groups: dict[int, list[tuple[Tensor, _Canon, Tensor]]] = {}
    for k, (t, i, d, b, o) in enumerate(zip(tensors, indices, dims, blocks, outs)):
        if o.numel() == 0:
            continue
        cuts = {d: (i, b)}
        if dims2[k] >= 0:
            cuts[dims2[k]] = (indices2[k], blocks2[k])
        groups.setdefault(t.element_size(), []).append((t, _Canon(t, cuts, o), o))
    if not groups:
        return
    dummy = torch.zeros(1, dtype=torch.int64, device=tensors[0].device)
    for es, items in groups.items():
        tile = _tile(max(cn.ni for _, cn, _ in items))
        rows, pstart, unit_stride = [], 0, True
        for t, cn, o in items:
            row, n_prog, unit = _describe(t, cn, o, cn.dso, cn.dsi, cn.dsg, 0, cn.ng * cn.nl, pstart, tile, dummy)
            rows.append(row)
            pstart += n_prog
            unit_stride = unit_stride and unit
        _launch(rows, pstart, es, unit_stride, tile, tensors[0].device)


def compact_triton(tensor: Tensor, idx: Tensor, dim: int, block: int, shape: Sequence[int],
                   strides: Sequence[int], *, scratch_bytes: int) -> None:
    """In-place compaction of ``tensor`` into the view ``as_strided(shape, strides, offset)``.

    Extra memory: one scratch slab of at most ``scratch_bytes`` (at least one output line).
    """
    cm = _col_major(tensor)
    _, _, _, _, od, _ = _layout(tensor.shape, tensor.stride(), cm)
    cn = _Canon(tensor, {dim: (idx, block)})
    out_lines, out_inner = cn.nl, cn.ni
    if out_lines == 0 or out_inner == 0:
        return
    es = tensor.element_size()
    view = tensor.as_strided(shape, strides)
    per_slab = max(1, scratch_bytes // (out_inner * es))
    dummy = torch.zeros(1, dtype=torch.int64, device=tensor.device)
    log.debug("compact_triton: %d output lines in slabs of %d lines", out_lines, per_slab)
    for l0 in range(0, out_lines, per_slab):
        n = min(per_slab, out_lines - l0)
        scratch = torch.empty((n, out_inner), dtype=tensor.dtype, device=tensor.device)
        tile = _tile(out_inner)
        row, count, unit = _describe(tensor, cn, scratch, out_inner, 1, 0, l0, n, 0, tile, dummy)
        _launch([row], count, es, unit, tile, tensor.device)
        if od < 0:  # 1-D: a single line
            view.copy_(scratch.reshape(-1))
        elif od == 0:
            view.narrow(0, l0, n).copy_(scratch)
        else:
            view.narrow(1, l0, n).copy_(scratch.t())
