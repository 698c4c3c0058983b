"""Structured weight slicing: keep rows / columns / head blocks of many weight tensors at once.

Two public ops, both ``torch.library`` custom ops (``torch.ops.minitron.gather_slices`` and
``torch.ops.minitron.compact_``) with thin Python wrappers:

* :func:`gather_slices` -- out of place, many tensors in one call (one kernel launch, like torch's
  ``_foreach`` ops): ``out[i] = tensors[i].index_select(dims[i], rows(indices[i]))``.
* :func:`compact_` -- the same selection for one tensor, done in place in the tensor's own storage,
  so pruning a model whose weights fill memory never needs a second copy of a matrix.

Index semantics (both ops). An index is a 1-D int32/int64 tensor of *unit* numbers; unit ``u``
stands for the ``block`` consecutive positions ``[u * block, (u + 1) * block)`` along the cut dim
(rows for ``dim=0``, columns for ``dim=1`` of a matrix) -- attention heads are kept with
``block = head_dim``. The index is a *set*: it is sorted before use, so the kept positions keep their
original relative order (which is what keeps e.g. ``q_proj`` rows and ``o_proj`` columns consistent).
Duplicate entries, entries outside ``[0, size // block)``, a ``block`` that does not divide the size,
a ``dim`` outside ``range(t.dim())`` and tensors that are not 1-D/2-D/3-D raise :class:`ValueError`
naming the argument; wrong types raise :class:`TypeError`. An empty index is allowed (the result has
size 0 along ``dim``).

3-D tensors and two cut dims (:func:`gather_slices`). Tensors may be 1-D, 2-D or 3-D. A tensor may be
cut along two distinct dims in the same call: ``indices[i] = (idx_a, idx_b)``, ``dims[i] = (da, db)``
and ``block[i]`` an int (both cuts) or a pair; the result is the selection along both dims (e.g. the
fused experts of a mixture-of-experts layer, ``gate_up_proj`` ``[E, 2*I, H]``, cut to kept experts
along dim 0 and kept neurons along dim 1 at once), one kernel launch on every backend. The custom
op carries the second cut in two optional trailing lists ``dims2``/``blocks2`` (``dims2[i] = -1``: no
second cut of tensor ``i``), and their indices follow the first cuts' in ``indices``
(``len(tensors)`` first-cut indices, then one per tensor with a second cut, in tensor order); a call
without second cuts is the op's original form.

Dtypes: any dtype with 1/2/4/8-byte elements in :data:`SLICE_DTYPES` (the copy is bitwise);
fp32/bf16/fp16 are the ones the weights use. Inputs may be non-contiguous: a tensor is read in its
memory order (a transposed matrix's columns are rows of its storage), and results of
:func:`gather_slices` are dense in the memory order of their input: row-major (contiguous), or
column-major when the input is column-major (``t.stride(0) < t.stride(1)``, e.g. a transposed
matrix). In general (3-D) the output's dims are laid out in the input's order of decreasing stride
(:func:`minitron.kernels._layout.dim_order`; dims of extent 1 keep their place): a permuted
contiguous tensor gives an output with the same permutation, a contiguous or sliced (non-dense)
tensor gives a contiguous output. Zero strides (``expand``) are fine for :func:`gather_slices` (a
broadcast dim sorts innermost, as for 2-D).

:func:`compact_` on a 3-D tensor (one cut dim) works on a 2-D view of the same memory; tensors whose
dims on either side of the cut dim cannot be merged raise ``ValueError`` (see :func:`compact_`).
Overview and examples: ``docs/slicing.md``.

Not differentiable: weights are cut under ``torch.no_grad()``; the wrappers run the ops under
``no_grad`` and the results never require grad (no autograd formula is registered).

Backends (``backend=``): ``"cpp"`` (CPU C++, multi-threaded, AVX-512/AVX2 picked at run time),
``"cuda"`` (CUDA C++), ``"triton"`` (GPU; CPU only under ``TRITON_INTERPRET=1``), ``"reference"``
(plain torch, never chosen automatically), ``"auto"`` (CPU -> cpp; CUDA -> cuda, else triton).
"""
from __future__ import annotations

import logging
import math
import os
import weakref
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from minitron.kernels._layout import col_major as _col_major
from minitron.kernels._layout import dense_strides as _dense_strides
from minitron.kernels._layout import dim_order as _dim_order
from minitron.kernels._layout import layout as _layout
from minitron.ops._dispatch import BackendUnavailableError, native_unavailable, op_backends, triton_unavailable

log = logging.getLogger(__name__)

__all__ = ["SLICE_DTYPES", "gather_slices", "compact_", "gather_slices_reference"]

#: dtypes the slicing ops accept (bitwise copies of 1/2/4/8-byte elements).
SLICE_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32, torch.bfloat16, torch.float16, torch.float64,
    torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool,
)
_INDEX_DTYPES = (torch.int32, torch.int64)

#: Scratch bound of the GPU compact_ (bytes), overridable with MINITRON_COMPACT_SCRATCH_BYTES.
DEFAULT_COMPACT_SCRATCH_BYTES = 64 << 20

IntOrInts = Union[int, Sequence[int]]
#: Per tensor: one index, or a pair of them (two cut dims).
IndexSpec = Union[Tensor, Sequence[Union[Tensor, Sequence[Tensor]]]]
#: Per tensor: one int, or a pair of them (two cut dims).
IntSpec = Union[int, Sequence[Union[int, Sequence[int]]]]

#: Largest tensor rank the slicing ops accept.
MAX_DIM = 3

# ----------------------------------------------------------------------------------------------
# canonical memory layout (csrc/common/slicing_math.h; one copy in minitron.kernels._layout)
# ----------------------------------------------------------------------------------------------


def _packed_strides(shape: Sequence[int], col_major: bool) -> tuple[int, ...]:
    """Strides of a dense tensor of ``shape`` in row-major or column-major order."""
    if len(shape) == 1:
        return (1,)
    n0, n1 = shape
    return (1, max(n0, 1)) if col_major else (max(n1, 1), 1)


def _gather_out_layout(t: Tensor, cuts: Sequence[tuple[int, int]]) -> tuple[list[int], tuple[int, ...]]:
    """Shape and strides of the output of cutting ``t`` to ``new_size`` along ``dim`` for each ``(dim, new_size)``
    of ``cuts``: dense, its dims laid out in ``t``'s memory order (row-/column-major for a matrix)."""
    shape = list(t.shape)
    for dim, new_size in cuts:
        shape[dim] = new_size
    return shape, _dense_strides(shape, _dim_order(t.shape, t.stride()))


def _compact_geometry(t: Tensor, dim: int, new_size: int) -> tuple[list[int], tuple[int, ...]]:
    """Shape and strides of the view :func:`compact_` returns (same storage offset as ``t``).

    Selecting inside the lines of a dense tensor (columns of a contiguous matrix, rows of a
    transposed one, entries of a contiguous vector) packs the result densely in the same memory
    order. Otherwise the result keeps ``t``'s strides: kept lines move down over dropped ones, or
    each line compacts inside itself; nothing outside ``t``'s own elements is ever written.
    """
    shape = list(t.shape)
    shape[dim] = new_size
    cm = _col_major(t)
    outer, inner, so, si, _, inner_dim = _layout(t.shape, t.stride(), cm)
    if dim == inner_dim and si == 1 and so == inner:
        return shape, _packed_strides(shape, cm)
    return shape, tuple(t.stride())


class _Compact2d:
    """How :func:`compact_` runs on a 3-D tensor: on a 2-D view of the same memory.

    The tensor is seen in memory order (``p = t.permute(order)``); the dims on each side of the cut dim
    are merged (a cut of the middle dim keeps blocks of ``block * inner`` columns of ``[outer, mid * inner]``).
    That needs the merged dims to be mergeable in memory (``view`` succeeds: e.g. any permutation of a
    contiguous tensor, or slices along the outermost dim); otherwise :func:`compact_` refuses the tensor.
    For 1-D/2-D tensors the view is the tensor itself.
    """

    def __init__(self, t: Tensor, dim: int, block: int, tname: str = "tensor") -> None:
        self.order: Optional[list[int]] = None
        self.unit = block  # positions per index entry along the tensor's own cut dim
        if t.dim() < 3:
            self.view, self.dim, self.block = t, dim, block
            return
        order = _dim_order(t.shape, t.stride())
        p = t.permute(order)
        c = order.index(dim)
        n0, n1, n2 = p.shape
        try:
            if c == 2:
                v, vdim, vblock = p.view(n0 * n1, n2), 1, block
            else:
                v, vdim, vblock = p.view(n0, n1 * n2), c, block * (n2 if c == 1 else 1)
        except RuntimeError:
            merged = "the outer two" if c == 2 else "the inner two"
            raise ValueError(
                f"compact_ of the 3-D {tname} (shape {tuple(t.shape)}, strides {tuple(t.stride())}) along dim "
                f"{dim} needs {merged} dims in memory order to be mergeable (a view of a dense block); use "
                "gather_slices for this tensor") from None
        self.order, self.canon, self.c = order, list(p.shape), c
        self.view, self.dim, self.block = v, vdim, vblock

    def result(self, k: int) -> Tensor:
        """The compacted view of the tensor (``k`` units kept along the cut dim)."""
        v = self.view.detach()
        shape, strides = _compact_geometry(v, self.dim, k * self.block)
        r = v.as_strided(shape, strides)
        if self.order is None:
            return r
        canon = list(self.canon)
        canon[self.c] = k * self.unit
        inverse = [self.order.index(d) for d in range(3)]
        return r.view(canon).permute(inverse)


def _non_overlapping(t: Tensor) -> bool:
    outer, inner, so, si, _, _ = _layout(t.shape, t.stride(), _col_major(t))
    if inner > 1 and si < 1:
        return False
    if outer > 1 and so < ((inner - 1) * si + 1 if inner > 0 else 1):
        return False
    return True


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


def _check_one(t: object, index: object, dim: object, block: object, names: tuple[str, str, str, str]) -> int:
    """Static checks of one (tensor, index, dim, block); returns the number of units."""
    tname, iname, dname, bname = names
    if not isinstance(t, Tensor):
        raise TypeError(f"{tname} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SLICE_DTYPES:
        names_ = ", ".join(str(d).replace("torch.", "") for d in SLICE_DTYPES)
        raise TypeError(f"{tname} has dtype {t.dtype}, expected one of ({names_})")
    if t.dim() not in range(1, MAX_DIM + 1):
        raise ValueError(f"{tname} must be 1-D, 2-D or 3-D, got shape {tuple(t.shape)}")
    dim = _check_int(dname, dim)
    if t.dim() == 1 and dim != 0:
        raise ValueError(f"{dname}={dim} is invalid for the 1-D {tname} (only dim=0)")
    if dim not in range(t.dim()):
        what = "0 (rows) or 1 (columns)" if t.dim() == 2 else f"in range({t.dim()})"
        raise ValueError(f"{dname} must be {what} for the {t.dim()}-D {tname}, got {dim}")
    block = _check_int(bname, block)
    if block < 1:
        raise ValueError(f"{bname} must be >= 1, got {block}")
    size = t.shape[dim]
    if size % block != 0:
        raise ValueError(f"{bname}={block} does not divide {tname}.shape[{dim}]={size}")
    if not isinstance(index, Tensor):
        raise TypeError(f"{iname} must be a 1-D int32/int64 torch.Tensor, got {type(index).__name__}")
    if index.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{iname} must have dtype int32 or int64, got {index.dtype}")
    if index.dim() != 1:
        raise ValueError(f"{iname} must be 1-D, got shape {tuple(index.shape)}")
    return size // block


# Prepared indices by identity: id(index) -> (weak reference to it, its version counter, units, device,
# prepared index). A call that passes the same, unmodified index tensor again (the same head index for
# q/k/v/o, every layer of a sweep, a benchmark loop) reuses the checked, sorted copy: no validation work, no
# host synchronisation. In-place changes through torch bump ``index._version`` and invalidate the entry.
_INDEX_CACHE: dict[int, tuple[weakref.ref, int, int, torch.device, Tensor]] = {}
_INDEX_CACHE_MAX = 256


def _cached_index(index: Tensor, units: int, device: torch.device) -> Optional[Tensor]:
    hit = _INDEX_CACHE.get(id(index))
    if hit is None:
        return None
    ref, version, n_units, dev, prepared = hit
    if ref() is not index or version != index._version or n_units != units or dev != device:
        del _INDEX_CACHE[id(index)]
        return None
    return prepared


def _remember_index(index: Tensor, units: int, device: torch.device, prepared: Tensor) -> None:
    if type(index) is not torch.Tensor or torch.compiler.is_compiling():
        return
    if len(_INDEX_CACHE) >= _INDEX_CACHE_MAX:  # drop dead entries, then the oldest
        for key in [k for k, v in _INDEX_CACHE.items() if v[0]() is None]:
            del _INDEX_CACHE[key]
        while len(_INDEX_CACHE) >= _INDEX_CACHE_MAX:
            del _INDEX_CACHE[next(iter(_INDEX_CACHE))]
    try:
        _INDEX_CACHE[id(index)] = (weakref.ref(index), index._version, units, device, prepared)
    except TypeError:  # not weak-referenceable: just don't cache
        pass


def _prepare_index(index: Tensor, units: int, block: int, iname: str, device: torch.device) -> Tensor:
    """Checks the values of ``index`` and returns it sorted, int64, contiguous, on ``device``.

    Never modifies ``index``. Host synchronisation: none for a host (CPU) index -- it is checked and
    sorted on the host and copied to the device asynchronously through pinned memory; one small
    device-to-host read for an index already on the accelerator (the common sorted, in-range case then
    needs no copy of the index; anything that fails that check takes the host path, which sorts it or
    names the problem). Either way the result is remembered for the same unmodified index tensor
    (:data:`_INDEX_CACHE`), so repeated calls with it do no index work at all.
    """
    if index.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    cached = _cached_index(index, units, device)
    if cached is not None:
        return cached
    if index.device.type != "cpu" and index.device == device:
        dev = index.detach().to(torch.int64)
        ok = torch.stack([dev.min() >= 0, dev.max() < units,
                          (dev[1:] > dev[:-1]).all() if dev.numel() > 1 else dev.new_ones((), dtype=torch.bool)])
        if bool(ok.all()):
            prepared = dev.contiguous()
            _remember_index(index, units, device, prepared)
            return prepared
    host = index.detach().to(device="cpu", dtype=torch.int64)
    if host.numel() > 1 and not bool((host[1:] > host[:-1]).all()):
        host = torch.sort(host).values
        dup = host[1:] == host[:-1]
        if bool(dup.any()):
            value = int(host[1:][dup][0])
            raise ValueError(f"{iname} has duplicate entries (e.g. {value}); each kept unit must appear once")
    if host.numel() > 0:
        lo, hi = int(host[0]), int(host[-1])
        if lo < 0 or hi >= units:
            raise ValueError(
                f"{iname} has entries outside [0, {units}) (min {lo}, max {hi}); entries number blocks of "
                f"{block} rows/columns, so the valid range is size // block = {units}"
            )
    host = host.contiguous()
    if device.type == "cuda":  # asynchronous copy: no wait for the device's queued work
        prepared = host.pin_memory().to(device, non_blocking=True)
    else:
        prepared = host.to(device)
    _remember_index(index, units, device, prepared)
    return prepared


def _check_compactable(t: Tensor, tname: str) -> None:
    if not _non_overlapping(t):
        raise ValueError(
            f"{tname} has overlapping or interleaved memory (strides {tuple(t.stride())}, e.g. from expand); "
            "compact_ needs a tensor whose rows/columns occupy disjoint memory"
        )


def _normalize_gather_args(tensors: object, indices: object, dims: object, block: object
                           ) -> tuple[list[Tensor], list[object], list[object], list[object]]:
    """Per-tensor lists of the public arguments (entries may still be pairs: two cut dims)."""
    if isinstance(tensors, Tensor) or not isinstance(tensors, (list, tuple)):
        raise TypeError(f"tensors must be a list or tuple of tensors, got {type(tensors).__name__}")
    n = len(tensors)

    def per_tensor(name: str, value: object, scalar_type: type) -> list:
        if isinstance(value, scalar_type) and not isinstance(value, bool):
            return [value] * n
        if isinstance(value, (list, tuple)):
            if len(value) != n:
                hint = (f" (two cut dims of one tensor are one entry: {name}=[({value[0]!r}, {value[1]!r})])"
                        if n == 1 and len(value) == 2 and name == "dims" else "")
                raise ValueError(f"{name} has {len(value)} entries but tensors has {n}{hint}")
            return list(value)
        raise TypeError(f"{name} must be a {scalar_type.__name__} or a list of them, got {type(value).__name__}")

    idx_list = per_tensor("indices", indices, Tensor)
    dim_list = per_tensor("dims", dims, int)
    block_list = per_tensor("block", block, int)
    return list(tensors), idx_list, dim_list, block_list


_NO_INDEX = torch.empty(0, dtype=torch.int64)


def _empty_index(like: object) -> Tensor:
    """The placeholder index of "no second cut" (empty int64, on ``like``'s device when it is a tensor)."""
    return torch.empty(0, dtype=torch.int64, device=like.device if isinstance(like, Tensor) else "cpu")


def _flatten_cuts(idx_list: Sequence[object], dim_list: Sequence[object], block_list: Sequence[object]
                  ) -> tuple[list, list, list, Optional[list], Optional[list], Optional[list]]:
    """Per-tensor entries (one cut, or pairs for two cut dims) -> the op's lists: first cuts, and second cuts
    (``None`` when no tensor has one; else ``dims2[i] = -1`` and an empty index where tensor i has none)."""
    idx1, dims1, blocks1, idx2, dims2, blocks2 = [], [], [], [], [], []
    for i, (ix, d, b) in enumerate(zip(idx_list, dim_list, block_list)):
        pair_d = isinstance(d, (list, tuple))
        if pair_d:
            if len(d) not in (1, 2):
                raise ValueError(f"dims[{i}] must be an int or a pair of ints (two cut dims), got {len(d)} entries")
            d = list(d)
            if isinstance(ix, Tensor):
                raise ValueError(f"indices[{i}] must be a tuple of {len(d)} index tensors (one per dim of dims[{i}]), "
                                 "got a single tensor")
            if not isinstance(ix, (list, tuple)):
                raise TypeError(f"indices[{i}] must be a tuple of 1-D int32/int64 tensors, got {type(ix).__name__}")
            if len(ix) != len(d):
                raise ValueError(f"indices[{i}] has {len(ix)} index tensors but dims[{i}] has {len(d)} dims")
            if isinstance(b, (list, tuple)):
                if len(b) != len(d):
                    raise ValueError(f"block[{i}] has {len(b)} entries but dims[{i}] has {len(d)} dims")
                b = list(b)
            else:
                b = [b] * len(d)
            ix = list(ix)
        else:
            if isinstance(ix, (list, tuple)) and ix and all(isinstance(x, Tensor) for x in ix):
                raise ValueError(f"indices[{i}] is a tuple of {len(ix)} index tensors but dims[{i}] is one dim; "
                                 f"give dims[{i}] as a pair for two cut dims")
            if isinstance(b, (list, tuple)):
                raise ValueError(f"block[{i}] is a pair but dims[{i}] is one dim")
            ix, d, b = [ix], [d], [b]
        idx1.append(ix[0])
        dims1.append(d[0])
        blocks1.append(b[0])
        idx2.append(ix[1] if len(d) == 2 else _empty_index(ix[0]))
        dims2.append(d[1] if len(d) == 2 else -1)
        blocks2.append(b[1] if len(d) == 2 else 1)
    if all(d == -1 for d in dims2):
        return idx1, dims1, blocks1, None, None, None
    return idx1, dims1, blocks1, idx2, dims2, blocks2


def _cut_names(i: int, two: bool, which: int) -> tuple[str, str, str, str]:
    if not two:
        return f"tensors[{i}]", f"indices[{i}]", f"dims[{i}]", f"block[{i}]"
    return f"tensors[{i}]", f"indices[{i}][{which}]", f"dims[{i}][{which}]", f"block[{i}][{which}]"


def _check_gather(tensors: Sequence[Tensor], indices: Sequence[Tensor], dims: Sequence[int],
                  blocks: Sequence[int], indices2: Optional[Sequence[Tensor]] = None,
                  dims2: Optional[Sequence[int]] = None, blocks2: Optional[Sequence[int]] = None
                  ) -> tuple[list[int], list[int]]:
    """Checks every argument; returns the number of units of each tensor's first and second cut (0: none)."""
    n = len(tensors)
    if not (len(indices) == len(dims) == len(blocks) == n):
        raise ValueError(f"tensors ({n}), indices ({len(indices)}), dims ({len(dims)}) and block ({len(blocks)}) "
                         "must have the same length")
    if dims2 is not None or blocks2 is not None:
        if dims2 is None or blocks2 is None:
            raise ValueError("dims2 and blocks2 (the second cuts) must be given together")
        if not (len(indices2) == len(dims2) == len(blocks2) == n):
            raise ValueError(f"dims2 ({len(dims2)}) and blocks2 ({len(blocks2)}) must have one entry per tensor ({n})")
        has2 = [_check_int(f"dims2[{i}]", dims2[i]) != -1 for i in range(n)]
    else:
        has2 = [False] * n
    units, units2 = [], []
    for i in range(n):
        units.append(_check_one(tensors[i], indices[i], dims[i], blocks[i], _cut_names(i, has2[i], 0)))
        if has2[i]:
            names = _cut_names(i, True, 1)
            units2.append(_check_one(tensors[i], indices2[i], dims2[i], blocks2[i], names))
            if dims2[i] == dims[i]:
                raise ValueError(f"dims[{i}] cuts dim {dims[i]} twice; the two cut dims must differ")
        else:
            units2.append(0)
    for i in range(1, n):
        if tensors[i].device != tensors[0].device:
            raise ValueError(f"tensors[{i}] is on {tensors[i].device} but tensors[0] is on {tensors[0].device}; "
                             "one call handles tensors of one device")
    return units, units2


def _expand_units(idx: Tensor, block: int) -> Tensor:
    """Unit numbers -> row/column numbers (``[k] -> [k * block]``)."""
    if block == 1:
        return idx
    return (idx.unsqueeze(1) * block + torch.arange(block, device=idx.device)).reshape(-1)


# ----------------------------------------------------------------------------------------------
# backends
# ----------------------------------------------------------------------------------------------

_gather_backends = op_backends("gather_slices")
_compact_backends = op_backends("compact_")


# Gather backends: fn(tensors, idx, dims, blocks, outs, idx2, dims2, blocks2). ``idx`` are prepared (sorted,
# int64, on the device); ``idx2``/``dims2``/``blocks2`` hold the second cuts (``dims2[i] == -1``: none, with
# an empty ``idx2[i]``); ``outs`` are allocated with the output layout.


def _native_gather(tensors: list[Tensor], idx: list[Tensor], dims: list[int], blocks: list[int], outs: list[Tensor],
                   idx2: list[Tensor], dims2: list[int], blocks2: list[int]) -> None:
    """``_gather_slices_native`` (CPU and CUDA): the original 5-argument form when no tensor has a second cut
    and none is 3-D (so an extension built before 3-D slicing still serves those calls)."""
    op = torch.ops.minitron._gather_slices_native
    if all(d == -1 for d in dims2) and all(t.dim() <= 2 for t in tensors):
        op(tensors, idx, dims, blocks, outs)
        return
    if len(op.default._schema.arguments) < 7:
        raise BackendUnavailableError("the built extension predates 3-D / two-dim gather_slices: rebuild it "
                                      "(`make build`)")
    op(tensors, _pack_indices(idx, idx2, dims2), dims, blocks, outs, dims2, blocks2)


@_gather_backends.register("cpp", ("cpu",), dtypes=SLICE_DTYPES,
                           unavailable=lambda d: native_unavailable("_gather_slices_native", d))
def _gather_cpp(tensors: list[Tensor], idx: list[Tensor], dims: list[int], blocks: list[int], outs: list[Tensor],
                idx2: list[Tensor], dims2: list[int], blocks2: list[int]) -> None:
    _native_gather(tensors, idx, dims, blocks, outs, idx2, dims2, blocks2)


@_gather_backends.register("cuda", ("cuda",), dtypes=SLICE_DTYPES,
                           unavailable=lambda d: native_unavailable("_gather_slices_native", d))
def _gather_cuda(tensors: list[Tensor], idx: list[Tensor], dims: list[int], blocks: list[int], outs: list[Tensor],
                 idx2: list[Tensor], dims2: list[int], blocks2: list[int]) -> None:
    _native_gather(tensors, idx, dims, blocks, outs, idx2, dims2, blocks2)


@_gather_backends.register("triton", ("cuda", "cpu"), dtypes=SLICE_DTYPES, unavailable=triton_unavailable)
def _gather_triton(tensors: list[Tensor], idx: list[Tensor], dims: list[int], blocks: list[int], outs: list[Tensor],
                   idx2: list[Tensor], dims2: list[int], blocks2: list[int]) -> None:
    from minitron.kernels.slicing import gather_slices_triton

    gather_slices_triton(tensors, idx, dims, blocks, outs, idx2, dims2, blocks2)


@_gather_backends.register("reference", ("cpu", "cuda"), dtypes=SLICE_DTYPES)
def _gather_reference(tensors: list[Tensor], idx: list[Tensor], dims: list[int], blocks: list[int],
                      outs: list[Tensor], idx2: list[Tensor], dims2: list[int], blocks2: list[int]) -> None:
    for t, i, d, b, o, i2, d2, b2 in zip(tensors, idx, dims, blocks, outs, idx2, dims2, blocks2):
        x = t.index_select(d, _expand_units(i, b))
        if d2 >= 0:
            x = x.index_select(d2, _expand_units(i2, b2))
        o.copy_(x)


@_compact_backends.register("cpp", ("cpu",), dtypes=SLICE_DTYPES,
                            unavailable=lambda d: native_unavailable("_compact_native", d))
def _compact_cpp(t: Tensor, idx: Tensor, dim: int, block: int, shape: list[int], strides: tuple[int, ...]) -> None:
    torch.ops.minitron._compact_native(t, idx, dim, block, list(strides))


@_compact_backends.register("cuda", ("cuda",), dtypes=SLICE_DTYPES,
                            unavailable=lambda d: native_unavailable("_compact_native", d))
def _compact_cuda(t: Tensor, idx: Tensor, dim: int, block: int, shape: list[int], strides: tuple[int, ...]) -> None:
    torch.ops.minitron._compact_native(t, idx, dim, block, list(strides))


@_compact_backends.register("triton", ("cuda", "cpu"), dtypes=SLICE_DTYPES, unavailable=triton_unavailable)
def _compact_triton(t: Tensor, idx: Tensor, dim: int, block: int, shape: list[int],
                    strides: tuple[int, ...]) -> None:
    from minitron.kernels.slicing import compact_triton

    compact_triton(t, idx, dim, block, shape, strides, scratch_bytes=_scratch_bytes())


@_compact_backends.register("reference", ("cpu", "cuda"), dtypes=SLICE_DTYPES)
def _compact_reference(t: Tensor, idx: Tensor, dim: int, block: int, shape: list[int],
                       strides: tuple[int, ...]) -> None:
    """Oracle: gathers the kept part into a temporary (result-sized), then writes it back."""
    kept = t.index_select(dim, _expand_units(idx, block))
    t.as_strided(shape, strides).copy_(kept)


def _scratch_bytes() -> int:
    raw = os.environ.get("MINITRON_COMPACT_SCRATCH_BYTES")
    if not raw:
        return DEFAULT_COMPACT_SCRATCH_BYTES
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"MINITRON_COMPACT_SCRATCH_BYTES must be an integer, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"MINITRON_COMPACT_SCRATCH_BYTES must be >= 1, got {value}")
    return value


# ----------------------------------------------------------------------------------------------
# custom ops
# ----------------------------------------------------------------------------------------------


def _eager(tensors: Sequence[Tensor]) -> bool:
    """True for plain tensors in eager mode (not traced by dynamo/AOT/make_fx): the public wrappers then call
    the implementations directly, without the custom-op dispatch (tens of microseconds per call)."""
    if torch.compiler.is_compiling() or any(type(t) is not torch.Tensor for t in tensors):
        return False
    modes = torch._C._TorchDispatchModeKey
    return all(torch._C._get_dispatch_mode(k) is None for k in (modes.PROXY, modes.FAKE, modes.FUNCTIONAL))


def _pack_indices(indices: Sequence[Tensor], indices2: Optional[Sequence[Tensor]], dims2: Optional[Sequence[int]]
                  ) -> list[Tensor]:
    """The op's ``indices``: the first cuts', then the second cuts' of the tensors that have one."""
    if dims2 is None:
        return list(indices)
    return list(indices) + [i for i, d in zip(indices2, dims2) if d != -1]


def _unpack_indices(n: int, indices: Sequence[Tensor], dims2: Optional[Sequence[int]]
                    ) -> tuple[list[Tensor], Optional[list[Tensor]]]:
    """Inverse of :func:`_pack_indices` (placeholders where a tensor has no second cut)."""
    if dims2 is None:
        return list(indices), None
    if len(dims2) != n:
        raise ValueError(f"dims2 has {len(dims2)} entries but tensors has {n}")
    m = sum(1 for d in dims2 if d != -1)
    if len(indices) != n + m:
        raise ValueError(f"indices has {len(indices)} entries; with {m} second cuts (dims2 != -1) on {n} tensors "
                         f"it needs {n + m} (first cuts, then second cuts in tensor order)")
    rest = iter(indices[n:])
    return list(indices[:n]), [next(rest) if d != -1 else _empty_index(indices[0] if n else None) for d in dims2]


@torch.library.custom_op("minitron::gather_slices", mutates_args=())
def _gather_slices_op(tensors: list[Tensor], indices: list[Tensor], dims: list[int], blocks: list[int],
                      backend: str, dims2: Optional[list[int]] = None,
                      blocks2: Optional[list[int]] = None) -> list[Tensor]:
    """Kept units of every tensor, in one launch. See :func:`gather_slices` (sorted-index semantics).

    ``dims2``/``blocks2`` (both or neither): a second cut per tensor, ``dims2[i] == -1`` for none; the second
    cuts' indices follow the ``len(tensors)`` first ones in ``indices``, in tensor order.
    """
    i1, i2 = _unpack_indices(len(tensors), indices, dims2)
    units, units2 = _check_gather(tensors, i1, dims, blocks, i2, dims2, blocks2)
    return _gather_slices_impl(tensors, i1, dims, blocks, backend, units, i2, dims2, blocks2, units2)


def _out_cuts(d: int, n1: int, d2: int, n2: int) -> list[tuple[int, int]]:
    return [(d, n1)] + ([(d2, n2)] if d2 >= 0 else [])


def _gather_slices_impl(tensors: Sequence[Tensor], indices: Sequence[Tensor], dims: Sequence[int],
                        blocks: Sequence[int], backend: str, units: list[int],
                        indices2: Optional[Sequence[Tensor]] = None, dims2: Optional[Sequence[int]] = None,
                        blocks2: Optional[Sequence[int]] = None, units2: Optional[list[int]] = None) -> list[Tensor]:
    """The op's work once the arguments passed :func:`_check_gather` (which returned ``units``, ``units2``)."""
    if not tensors:
        return []
    n = len(tensors)
    device = tensors[0].device
    impl = _gather_backends.select(backend, device, tensors[0].dtype)
    idx = [_prepare_index(indices[i], units[i], blocks[i], _cut_names(i, dims2 is not None and dims2[i] >= 0, 0)[1],
                          device) for i in range(n)]
    if dims2 is None:
        dims2, blocks2 = [-1] * n, [1] * n
        idx2 = [_NO_INDEX.to(device)] * n
    else:
        idx2 = [_prepare_index(indices2[i], units2[i], blocks2[i], _cut_names(i, True, 1)[1], device)
                if dims2[i] >= 0 else _NO_INDEX.to(device) for i in range(n)]
    outs = []
    for t, i, d, b, i2, d2, b2 in zip(tensors, idx, dims, blocks, idx2, dims2, blocks2):
        shape, strides = _gather_out_layout(t, _out_cuts(d, i.numel() * b, d2, i2.numel() * b2))
        outs.append(torch.empty_strided(shape, strides, dtype=t.dtype, device=device))
    if any(o.numel() for o in outs):
        log.debug("gather_slices: %d tensors on %s via %s (%d output bytes)", n, device, impl.name,
                  sum(o.numel() * o.element_size() for o in outs))
        impl.fn(list(tensors), idx, list(dims), list(blocks), outs, idx2, list(dims2), list(blocks2))
    return outs


@_gather_slices_op.register_fake
def _(tensors, indices, dims, blocks, backend, dims2=None, blocks2=None):
    indices, indices2 = _unpack_indices(len(tensors), indices, dims2)
    _check_gather(tensors, indices, dims, blocks, indices2, dims2, blocks2)
    outs = []
    for j, (t, i, d, b) in enumerate(zip(tensors, indices, dims, blocks)):
        d2 = dims2[j] if dims2 is not None else -1
        n2 = indices2[j].shape[0] * blocks2[j] if d2 >= 0 else 0
        shape, strides = _gather_out_layout(t, _out_cuts(d, i.shape[0] * b, d2, n2))
        outs.append(torch.empty_strided(shape, strides, dtype=t.dtype, device=t.device))
    return outs


@torch.library.custom_op("minitron::compact_", mutates_args=("tensor",))
def _compact_op(tensor: Tensor, index: Tensor, dim: int, block: int, backend: str) -> None:
    """In-place compaction of ``tensor``'s storage. See :func:`compact_` for the resulting view."""
    units, c2 = _check_compact(tensor, index, dim, block)
    _compact_impl(c2.view, index, c2.dim, c2.block, backend, units, c2.unit)


def _check_compact(tensor: object, index: object, dim: object, block: object) -> tuple[int, _Compact2d]:
    """Checks of :func:`compact_`; returns the number of units and the 2-D view the kernels work on."""
    units = _check_one(tensor, index, dim, block, ("tensor", "index", "dim", "block"))
    c2 = _Compact2d(tensor, dim, block)
    _check_compactable(c2.view, "tensor")
    return units, c2


def _compact_impl(tensor: Tensor, index: Tensor, dim: int, block: int, backend: str, units: int,
                  unit_block: Optional[int] = None) -> None:
    """The op's work on a 1-D/2-D ``tensor`` (or the 2-D view of a 3-D one) once the arguments passed
    :func:`_check_compact`."""
    impl = _compact_backends.select(backend, tensor.device, tensor.dtype)
    idx = _prepare_index(index, units, block if unit_block is None else unit_block, "index", tensor.device)
    new_size = idx.numel() * block
    if new_size == tensor.shape[dim]:  # everything kept (the index is then exactly 0..units-1)
        return
    shape, strides = _compact_geometry(tensor, dim, new_size)
    if math.prod(shape) == 0:
        return
    log.debug("compact_: %s %s dim=%d block=%d -> %s strides %s via %s", tuple(tensor.shape), tensor.dtype, dim,
              block, tuple(shape), tuple(strides), impl.name)
    impl.fn(tensor, idx, dim, block, shape, strides)


@_compact_op.register_fake
def _(tensor, index, dim, block, backend):
    _check_compact(tensor, index, dim, block)
    return None


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------


def gather_slices(tensors: Sequence[Tensor], indices: IndexSpec, dims: IntSpec, *,
                  block: IntSpec = 1, backend: str = "auto") -> list[Tensor]:
    """Keep the listed rows/columns (or blocks of them) of many tensors in one call.

    Args:
        tensors: list/tuple of 1-D, 2-D or 3-D tensors on one device (dtypes may differ; any of
            :data:`SLICE_DTYPES`; any strides).
        indices: per tensor, one 1-D int32/int64 tensor -- or, to cut two dims of that tensor at once,
            a tuple of two (one per dim of ``dims[i]``); or a single tensor shared by all (one cut each).
            Entries are unit numbers in ``[0, tensors[i].shape[dim] // block)``; sorted before use
            (duplicates and out-of-range entries raise ``ValueError``). May be empty.
        dims: per tensor, the cut dim (``0 <= dim < tensors[i].dim()``; for a matrix 0 keeps rows and
            1 keeps columns) or a tuple of two distinct dims; or one int for all.
        block: positions per index entry (e.g. ``head_dim`` to keep attention heads), per tensor (an
            int for both cuts, or a pair for two cut dims) or one int for all; must divide the size
            along the dim.
        backend: ``"auto"``, ``"cpp"``, ``"cuda"``, ``"triton"`` or ``"reference"``.

    Returns:
        ``out[i]`` of ``tensors[i]``'s dtype and device with ``out[i].shape[d] == k * b`` for each cut
        (``d``, ``k`` index entries, block ``b``), equal to ``tensors[i].index_select(d, rows)`` for the
        sorted rows/columns (chained over both cuts); dense in ``tensors[i]``'s memory order (row-major,
        column-major for a column-major matrix; for 3-D the input's dim order by decreasing stride). New
        memory (never aliases the inputs); never requires grad.

    Example (mixture-of-experts layer, ``E`` experts of ``I`` neurons, hidden ``H``)::

        gate_up, down = gather_slices(
            [experts.gate_up_proj, experts.down_proj],          # [E, 2*I, H], [E, H, I]
            [(kept_experts, torch.cat([kept, I + kept])), (kept_experts, kept)],
            [(0, 1), (0, 2)])
    """
    ts, idx, ds, bs = _normalize_gather_args(tensors, indices, dims, block)
    i1, d1, b1, i2, d2, b2 = _flatten_cuts(idx, ds, bs)
    units, units2 = _check_gather(ts, i1, d1, b1, i2, d2, b2)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    with torch.no_grad():
        if _eager(ts) and _eager(i1) and (i2 is None or _eager(i2)):
            return _gather_slices_impl(ts, i1, d1, b1, backend, units, i2, d2, b2, units2)
        if i2 is None:  # the schema of one cut per tensor (as before two cut dims existed)
            return list(torch.ops.minitron.gather_slices(ts, i1, d1, b1, backend))
        return list(torch.ops.minitron.gather_slices(ts, _pack_indices(i1, i2, d2), d1, b1, backend, d2, b2))


def compact_(tensor: Tensor, index: Tensor, dim: int, *, block: int = 1, backend: str = "auto") -> Tensor:
    """Keep the listed rows/columns of ``tensor`` in place; return the compacted view.

    Same selection as :func:`gather_slices` for one tensor, but the kept data are moved inside
    ``tensor``'s own storage (no allocation of the tensor's size, peak memory stays ~1x). Returns a
    tensor of the new shape viewing that storage at ``tensor``'s storage offset:

    * selecting inside the memory lines of a *dense* tensor (columns of a contiguous matrix, rows of
      a transposed one, a contiguous vector) packs the result densely (contiguous, resp. transposed-
      contiguous): its first ``new numel`` elements;
    * otherwise the result keeps ``tensor``'s strides (``tensor[:k]``-like), so nothing outside
      ``tensor``'s own elements (e.g. the rest of a larger matrix it is a slice of) is touched.

    After the call ``tensor`` itself holds the compacted data followed by stale values; use the
    returned view (e.g. ``param.data = compact_(param.data, idx, 0)``). The storage keeps its size
    until its last user lets it go. Other views of the same storage see the moved data.

    Why in place is safe: the index is sorted, so every kept row/column moves to a position at or
    before its source, and moving data in increasing order never overwrites data still to be read.
    The C++ kernel runs work items (chunks of rows/columns) in parallel but lets an item write only
    after every earlier item that reads the memory it writes has finished (in practice only the
    first items of a tensor ever wait; see ``csrc/cpu/slicing.cpp``). The GPU backends stage bounded
    slabs of the result (``MINITRON_COMPACT_SCRATCH_BYTES``, default 64 MiB) and write them back in
    order.

    3-D tensors: one cut dim (``compact_`` has no two-dim form; cut twice, or use :func:`gather_slices`).
    The tensor is compacted as a 2-D view of the same memory (the dims before and after the cut dim,
    in memory order, merged); that needs them to be mergeable -- true for a contiguous tensor, any
    permutation of one, and slices of one along its outermost dim; other 3-D layouts raise
    ``ValueError``. The returned view has the tensor's dim order.

    Args:
        tensor: 1-D, 2-D or 3-D tensor (any of :data:`SLICE_DTYPES`) whose rows/columns occupy disjoint
            memory (no ``expand``-ed tensors).
        index: 1-D int32/int64 unit numbers (see :func:`gather_slices`); sorted before use.
        dim: the cut dim: 0 (rows) or 1 (columns) of a matrix; ``range(tensor.dim())``.
        block: rows/columns per index entry.
        backend: as for :func:`gather_slices`.

    Returns:
        the compacted view, ``shape[dim] == index.numel() * block``; never requires grad.
    """
    units, c2 = _check_compact(tensor, index, dim, block)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    with torch.no_grad():
        if _eager([tensor, index]):
            _compact_impl(c2.view, index, c2.dim, c2.block, backend, units, c2.unit)
            torch.autograd.graph.increment_version(tensor)  # what the custom op's mutation would record
        else:
            torch.ops.minitron.compact_(tensor, index, dim, block, backend)
        return c2.result(index.shape[0])


def gather_slices_reference(tensors: Sequence[Tensor], indices: IndexSpec, dims: IntSpec, *,
                            block: IntSpec = 1) -> list[Tensor]:
    """Plain-torch :func:`gather_slices` (chained ``index_select`` of the sorted, block-expanded indices); the
    oracle. Results have the layout ``index_select`` gives them (not necessarily :func:`gather_slices`')."""
    ts, idx, ds, bs = _normalize_gather_args(tensors, indices, dims, block)
    i1, d1, b1, i2, d2, b2 = _flatten_cuts(idx, ds, bs)
    units, units2 = _check_gather(ts, i1, d1, b1, i2, d2, b2)
    out = []
    for i, (t, d, b) in enumerate(zip(ts, d1, b1)):
        two = i2 is not None and d2[i] >= 0
        rows = _prepare_index(i1[i], units[i], b, _cut_names(i, two, 0)[1], t.device)
        x = t.index_select(d, _expand_units(rows, b))
        if two:
            rows2 = _prepare_index(i2[i], units2[i], b2[i], _cut_names(i, True, 1)[1], t.device)
            x = x.index_select(d2[i], _expand_units(rows2, b2[i]))
        out.append(x)
    return out
