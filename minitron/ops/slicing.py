"""Structured weight slicing: keep rows / columns / head blocks of many weight tensors at once.

Two public ops, both ``torch.library`` custom ops (``torch.ops.minitron.gather_slices`` and
``torch.ops.minitron.compact_``) with thin Python wrappers:

* :func:`gather_slices` -- out of place, many tensors in one call (one kernel launch, like torch's
  ``_foreach`` ops): ``out[i] = tensors[i].index_select(dims[i], rows(indices[i]))``.
* :func:`compact_` -- the same selection for one tensor, done in place in the tensor's own storage,
  so pruning a model whose weights fill memory never needs a second copy of a matrix.

Index semantics (both ops). An index is a 1-D int32/int64 tensor of *unit* numbers; unit ``u``
stands for the ``block`` consecutive rows (``dim=0``) or columns (``dim=1``)
``[u * block, (u + 1) * block)`` -- attention heads are kept with ``block = head_dim``. The index is
a *set*: it is sorted before use, so the kept rows/columns keep their original relative order
(which is what keeps e.g. ``q_proj`` rows and ``o_proj`` columns consistent). Duplicate entries,
entries outside ``[0, size // block)``, a ``block`` that does not divide the size, a ``dim`` other
than 0/1, ``dim=1`` on a 1-D tensor and tensors that are not 1-D/2-D raise :class:`ValueError`
naming the argument; wrong types raise :class:`TypeError`. An empty index is allowed (the result
has size 0 along ``dim``).

Dtypes: any dtype with 1/2/4/8-byte elements in :data:`SLICE_DTYPES` (the copy is bitwise);
fp32/bf16/fp16 are the ones the weights use. Inputs may be non-contiguous: a tensor is read in its
memory order (a transposed matrix's columns are rows of its storage), and results of
:func:`gather_slices` have the memory order of their input: row-major (contiguous), or
column-major when the input is column-major (``t.stride(0) < t.stride(1)``, e.g. a transposed
matrix).

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
from minitron.kernels._layout import layout as _layout
from minitron.ops._dispatch import native_unavailable, op_backends, triton_unavailable

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

# ----------------------------------------------------------------------------------------------
# canonical memory layout (csrc/common/slicing_math.h; one copy in minitron.kernels._layout)
# ----------------------------------------------------------------------------------------------


def _packed_strides(shape: Sequence[int], col_major: bool) -> tuple[int, ...]:
    """Strides of a dense tensor of ``shape`` in row-major or column-major order."""
    if len(shape) == 1:
        return (1,)
    n0, n1 = shape
    return (1, max(n0, 1)) if col_major else (max(n1, 1), 1)


def _gather_out_layout(t: Tensor, dim: int, new_size: int) -> tuple[list[int], tuple[int, ...]]:
    shape = list(t.shape)
    shape[dim] = new_size
    return shape, _packed_strides(shape, _col_major(t))


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
    if t.dim() not in (1, 2):
        raise ValueError(f"{tname} must be 1-D or 2-D, got shape {tuple(t.shape)}")
    dim = _check_int(dname, dim)
    if dim not in (0, 1):
        raise ValueError(f"{dname} must be 0 (rows) or 1 (columns), got {dim}")
    if dim >= t.dim():
        raise ValueError(f"{dname}={dim} is invalid for the 1-D {tname} (only dim=0)")
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
                           ) -> tuple[list[Tensor], list[Tensor], list[int], list[int]]:
    if isinstance(tensors, Tensor) or not isinstance(tensors, (list, tuple)):
        raise TypeError(f"tensors must be a list or tuple of tensors, got {type(tensors).__name__}")
    n = len(tensors)

    def per_tensor(name: str, value: object, scalar_type: type) -> list:
        if isinstance(value, scalar_type) and not isinstance(value, bool):
            return [value] * n
        if isinstance(value, (list, tuple)):
            if len(value) != n:
                raise ValueError(f"{name} has {len(value)} entries but tensors has {n}")
            return list(value)
        raise TypeError(f"{name} must be a {scalar_type.__name__} or a list of them, got {type(value).__name__}")

    idx_list = per_tensor("indices", indices, Tensor)
    dim_list = per_tensor("dims", dims, int)
    block_list = per_tensor("block", block, int)
    return list(tensors), idx_list, dim_list, block_list


def _check_gather(tensors: Sequence[Tensor], indices: Sequence[Tensor], dims: Sequence[int],
                  blocks: Sequence[int]) -> list[int]:
    n = len(tensors)
    if not (len(indices) == len(dims) == len(blocks) == n):
        raise ValueError(f"tensors ({n}), indices ({len(indices)}), dims ({len(dims)}) and block ({len(blocks)}) "
                         "must have the same length")
    units = [
        _check_one(tensors[i], indices[i], dims[i], blocks[i], (f"tensors[{i}]", f"indices[{i}]", f"dims[{i}]",
                                                               f"block[{i}]"))
        for i in range(n)
    ]
    for i in range(1, n):
        if tensors[i].device != tensors[0].device:
            raise ValueError(f"tensors[{i}] is on {tensors[i].device} but tensors[0] is on {tensors[0].device}; "
                             "one call handles tensors of one device")
    return units


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


@_gather_backends.register("cpp", ("cpu",), dtypes=SLICE_DTYPES,
                           unavailable=lambda d: native_unavailable("_gather_slices_native", d))
def _gather_cpp(tensors: list[Tensor], idx: list[Tensor], dims: list[int], blocks: list[int],
                outs: list[Tensor]) -> None:
    torch.ops.minitron._gather_slices_native(tensors, idx, dims, blocks, outs)


@_gather_backends.register("cuda", ("cuda",), dtypes=SLICE_DTYPES,
                           unavailable=lambda d: native_unavailable("_gather_slices_native", d))
def _gather_cuda(tensors: list[Tensor], idx: list[Tensor], dims: list[int], blocks: list[int],
                 outs: list[Tensor]) -> None:
    torch.ops.minitron._gather_slices_native(tensors, idx, dims, blocks, outs)


@_gather_backends.register("triton", ("cuda", "cpu"), dtypes=SLICE_DTYPES, unavailable=triton_unavailable)
def _gather_triton(tensors: list[Tensor], idx: list[Tensor], dims: list[int], blocks: list[int],
                   outs: list[Tensor]) -> None:
    from minitron.kernels.slicing import gather_slices_triton

    gather_slices_triton(tensors, idx, dims, blocks, outs)


@_gather_backends.register("reference", ("cpu", "cuda"), dtypes=SLICE_DTYPES)
def _gather_reference(tensors: list[Tensor], idx: list[Tensor], dims: list[int], blocks: list[int],
                      outs: list[Tensor]) -> None:
    for t, i, d, b, o in zip(tensors, idx, dims, blocks, outs):
        o.copy_(t.index_select(d, _expand_units(i, b)))


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


@torch.library.custom_op("minitron::gather_slices", mutates_args=())
def _gather_slices_op(tensors: list[Tensor], indices: list[Tensor], dims: list[int], blocks: list[int],
                      backend: str) -> list[Tensor]:
    """Kept units of every tensor, in one launch. See :func:`gather_slices` (sorted-index semantics)."""
    units = _check_gather(tensors, indices, dims, blocks)
    return _gather_slices_impl(tensors, indices, dims, blocks, backend, units)


def _gather_slices_impl(tensors: Sequence[Tensor], indices: Sequence[Tensor], dims: Sequence[int],
                        blocks: Sequence[int], backend: str, units: list[int]) -> list[Tensor]:
    """The op's work once the arguments passed :func:`_check_gather` (which returned ``units``)."""
    if not tensors:
        return []
    device = tensors[0].device
    impl = _gather_backends.select(backend, device, tensors[0].dtype)
    idx = [_prepare_index(indices[i], units[i], blocks[i], f"indices[{i}]", device) for i in range(len(tensors))]
    outs = []
    for t, i, d, b in zip(tensors, idx, dims, blocks):
        shape, strides = _gather_out_layout(t, d, i.numel() * b)
        outs.append(torch.empty_strided(shape, strides, dtype=t.dtype, device=device))
    if any(o.numel() for o in outs):
        log.debug("gather_slices: %d tensors on %s via %s (%d output bytes)", len(tensors), device, impl.name,
                  sum(o.numel() * o.element_size() for o in outs))
        impl.fn(list(tensors), idx, list(dims), list(blocks), outs)
    return outs


@_gather_slices_op.register_fake
def _(tensors, indices, dims, blocks, backend):
    _check_gather(tensors, indices, dims, blocks)
    outs = []
    for t, i, d, b in zip(tensors, indices, dims, blocks):
        shape, strides = _gather_out_layout(t, d, i.shape[0] * b)
        outs.append(torch.empty_strided(shape, strides, dtype=t.dtype, device=t.device))
    return outs


@torch.library.custom_op("minitron::compact_", mutates_args=("tensor",))
def _compact_op(tensor: Tensor, index: Tensor, dim: int, block: int, backend: str) -> None:
    """In-place compaction of ``tensor``'s storage. See :func:`compact_` for the resulting view."""
    units = _check_one(tensor, index, dim, block, ("tensor", "index", "dim", "block"))
    _check_compactable(tensor, "tensor")
    _compact_impl(tensor, index, dim, block, backend, units)


def _compact_impl(tensor: Tensor, index: Tensor, dim: int, block: int, backend: str, units: int) -> None:
    """The op's work once the arguments passed :func:`_check_one` and :func:`_check_compactable`."""
    impl = _compact_backends.select(backend, tensor.device, tensor.dtype)
    idx = _prepare_index(index, units, block, "index", tensor.device)
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
    _check_one(tensor, index, dim, block, ("tensor", "index", "dim", "block"))
    return None


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------


def gather_slices(tensors: Sequence[Tensor], indices: Union[Tensor, Sequence[Tensor]], dims: IntOrInts, *,
                  block: IntOrInts = 1, backend: str = "auto") -> list[Tensor]:
    """Keep the listed rows/columns (or blocks of them) of many tensors in one call.

    Args:
        tensors: list/tuple of 1-D or 2-D tensors on one device (dtypes may differ; any of
            :data:`SLICE_DTYPES`; any strides).
        indices: one 1-D int32/int64 tensor per tensor, or a single one shared by all. Entries are
            unit numbers in ``[0, tensors[i].shape[dims[i]] // block)``; sorted before use
            (duplicates and out-of-range entries raise ``ValueError``). May be empty.
        dims: 0 (keep rows) or 1 (keep columns; 2-D tensors only), per tensor or one for all.
        block: rows/columns per index entry (e.g. ``head_dim`` to keep attention heads), per tensor
            or one for all; must divide the size along the dim.
        backend: ``"auto"``, ``"cpp"``, ``"cuda"``, ``"triton"`` or ``"reference"``.

    Returns:
        ``out[i]`` of ``tensors[i]``'s dtype and device with ``out[i].shape[dims[i]] ==
        indices[i].numel() * block[i]``, equal to ``tensors[i].index_select(dims[i], rows)`` for the
        sorted rows/columns; row-major, or column-major when ``tensors[i]`` is column-major. New
        memory (never aliases the inputs); never requires grad.
    """
    ts, idx, ds, bs = _normalize_gather_args(tensors, indices, dims, block)
    units = _check_gather(ts, idx, ds, bs)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    with torch.no_grad():
        if _eager(ts) and _eager(idx):
            return _gather_slices_impl(ts, idx, ds, bs, backend, units)
        return list(torch.ops.minitron.gather_slices(ts, idx, ds, bs, backend))


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

    Args:
        tensor: 1-D or 2-D tensor (any of :data:`SLICE_DTYPES`) whose rows/columns occupy disjoint
            memory (no ``expand``-ed tensors).
        index: 1-D int32/int64 unit numbers (see :func:`gather_slices`); sorted before use.
        dim: 0 (rows) or 1 (columns).
        block: rows/columns per index entry.
        backend: as for :func:`gather_slices`.

    Returns:
        the compacted view, ``shape[dim] == index.numel() * block``; never requires grad.
    """
    units = _check_one(tensor, index, dim, block, ("tensor", "index", "dim", "block"))
    _check_compactable(tensor, "tensor")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    with torch.no_grad():
        if _eager([tensor, index]):
            _compact_impl(tensor, index, dim, block, backend, units)
            torch.autograd.graph.increment_version(tensor)  # what the custom op's mutation would record
        else:
            torch.ops.minitron.compact_(tensor, index, dim, block, backend)
        shape, strides = _compact_geometry(tensor, dim, index.shape[0] * block)
        return tensor.detach().as_strided(shape, strides)


def gather_slices_reference(tensors: Sequence[Tensor], indices: Union[Tensor, Sequence[Tensor]], dims: IntOrInts,
                            *, block: IntOrInts = 1) -> list[Tensor]:
    """Plain-torch :func:`gather_slices` (``index_select`` of the sorted, block-expanded index); the oracle."""
    ts, idx, ds, bs = _normalize_gather_args(tensors, indices, dims, block)
    units = _check_gather(ts, idx, ds, bs)
    out = []
    for i, (t, d, b) in enumerate(zip(ts, ds, bs)):
        rows = _prepare_index(idx[i], units[i], b, f"indices[{i}]", t.device)
        out.append(t.index_select(d, _expand_units(rows, b)))
    return out
