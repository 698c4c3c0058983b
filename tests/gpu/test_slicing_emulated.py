"""The CUDA slicing kernel (csrc/cuda/slicing.cu) run on the CPU: compiled with g++ against a tiny CUDA shim
and launched by an emulation that runs every thread of every CTA one after the other (exact for this kernel:
its threads never cooperate -- no shared memory, no barriers). No GPU needed; it runs wherever g++ does.

It checks the kernel's index arithmetic and every path (outer/inner selection, 16-byte vector and element
paths, aligned/misaligned, strided, multi-descriptor tables, slab offsets as compact_ uses them) against
``index_select``. The real GPU behaviour (speed, memory model) is for tests/gpu/test_cuda_ops.py on a GPU.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
GXX = shutil.which("g++")
pytestmark = pytest.mark.skipif(GXX is None, reason="g++ not found")

SHIM = r"""
#pragma once
#include <cstdint>
#include <cstring>
struct dim3 { unsigned x = 1, y = 1, z = 1; };
struct uint4 { unsigned x, y, z, w; };
typedef int cudaError_t;
typedef void* cudaStream_t;
constexpr cudaError_t cudaSuccess = 0;
static dim3 threadIdx, blockIdx, gridDim, blockDim;
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
template <class T> inline T __ldg(const T* p) { return *p; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
"""

DRIVER = r"""
#include "cuda/slicing.cu"
#include <vector>
using namespace minitron::slicing_cuda;
// params: n rows of 19 int64: src, dst, gidx, lidx, iidx (0: axis not cut), gblock, lblock, iblock, out_lines,
// lines_per_group, out_inner, sg, so, si, dsg, dso, dsi, line0, es
extern "C" __attribute__((visibility("default"))) int emu_gather(const int64_t* params, int n) {
  std::vector<GatherDesc> descs;
  int64_t total = 0;
  for (int i = 0; i < n; ++i) {
    const int64_t* p = params + 19 * i;
    GatherDesc d{};
    d.src = reinterpret_cast<const char*>(p[0]);
    d.dst = reinterpret_cast<char*>(p[1]);
    d.gidx = reinterpret_cast<const int64_t*>(p[2]);
    d.lidx = reinterpret_cast<const int64_t*>(p[3]);
    d.iidx = reinterpret_cast<const int64_t*>(p[4]);
    d.gblock = p[5]; d.lblock = p[6]; d.iblock = p[7];
    d.out_lines = p[8]; d.lines_per_group = p[9]; d.out_inner = p[10];
    d.sg = p[11]; d.so = p[12]; d.si = p[13]; d.dsg = p[14]; d.dso = p[15]; d.dsi = p[16];
    d.line0 = p[17]; d.es = static_cast<int32_t>(p[18]); d.select_inner = d.iidx != nullptr ? 1 : 0;
    const int64_t c = gather_ctas(d);
    if (c == 0) continue;
    d.cta_start = total;
    total += c;
    descs.push_back(d);
  }
  return launch_gather_slices(descs.data(), static_cast<int>(descs.size()), total, nullptr);
}
"""


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    d = tmp_path_factory.mktemp("slicing_emu")
    (d / "cuda_runtime.h").write_text(SHIM)
    (d / "driver.cpp").write_text(DRIVER)
    lib = d / "libslicing_emu.so"
    extra = os.environ.get("MINITRON_EMU_CFLAGS", "").split()  # e.g. -fsanitize=address (with LD_PRELOAD)
    # private symbols: the importance emulation library in the same process must not bind to our shim globals
    # (inline variables are STB_GNU_UNIQUE: global even under RTLD_LOCAL; that crashed a full test run)
    cmd = [GXX, "-O1", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-fno-gnu-unique",
           "-DMINITRON_SLICING_EMULATE", *extra, "-I", str(d), "-I", str(ROOT / "csrc"), str(d / "driver.cpp"), "-o",
           str(lib)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    fn = ctypes.CDLL(str(lib)).emu_gather
    fn.argtypes = [ctypes.POINTER(ctypes.c_int64), ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def _desc(src: torch.Tensor, idx: torch.Tensor, dim: int, block: int, dst: torch.Tensor, line0: int = 0,
          n_lines: int | None = None, dst_canon: tuple[int, int] | None = None,
          cut2: tuple[torch.Tensor, int, int] | None = None) -> list[int]:
    """Descriptor row as slicing_torch.cpp's describe() builds it (canonical axes of the source's memory order;
    ``cut2`` = (index, dim, block) of a second cut; ``dst_canon`` = (line stride, element stride) of a
    one-group staging destination)."""
    from minitron.kernels.slicing import _Canon

    cuts = {dim: (idx, block)}
    if cut2 is not None:
        cuts[cut2[1]] = (cut2[0], cut2[2])
    cn = _Canon(src, cuts, dst if dst_canon is None else None)
    if dst_canon is not None:
        cn.dsg, (cn.dso, cn.dsi) = 0, dst_canon
    sel = [cn.sel(a) for a in range(3)]
    ptrs = [s[0].data_ptr() if s is not None else 0 for s in sel]
    blocks = [s[1] if s is not None else 1 for s in sel]
    lines = cn.ng * cn.nl if n_lines is None else n_lines
    return [src.data_ptr(), dst.data_ptr(), *ptrs, *blocks, lines, max(cn.nl, 1), cn.ni, cn.sg, cn.so, cn.si,
            cn.dsg, cn.dso, cn.dsi, line0, src.element_size()]


def _run(emu, rows: list[list[int]]) -> None:
    arr = (ctypes.c_int64 * (19 * len(rows)))(*[v for r in rows for v in r])
    assert emu(arr, len(rows)) == 0


def _expected(t, idx, dim, block):
    rows = (idx[:, None] * block + torch.arange(block)).reshape(-1)
    return t.index_select(dim, rows)


def _rand(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(-100, 100, shape, generator=g).to(dtype)


def _index(units: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randperm(units, generator=g)[:k]).values.contiguous()


DTYPES = [torch.float32, torch.bfloat16, torch.int8, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("block", [1, 2, 8])
@pytest.mark.parametrize("layout", ["row", "col", "offset", "strided"])
@pytest.mark.parametrize("aligned", [True, False])
def test_emulated_kernel_matches_index_select(emu, dtype, dim, block, layout, aligned):
    seed = hash((str(dtype), dim, block, layout, aligned)) % 1000
    other = (4096 if dtype == torch.int8 else 1056) if aligned else (4099 if dtype == torch.int8 else 1061)
    keep_dim = 40 * block if aligned else 39 * block
    shape = (keep_dim, other) if dim == 0 else (37 if not aligned else 64, keep_dim)
    base = _rand((shape[0] + 3, shape[1] + 5), dtype, seed)
    if layout == "row":
        t = base[: shape[0], : shape[1]].contiguous()
    elif layout == "col":
        t = base[: shape[1], : shape[0]].contiguous().t() if shape[1] <= base.shape[0] else \
            _rand(shape[::-1], dtype, seed).t()
    elif layout == "offset":  # misaligned data pointer and line stride: element paths
        t = base[1: shape[0] + 1, 3: shape[1] + 3]
    else:
        t = _rand((shape[0], 2 * shape[1]), dtype, seed)[:, ::2]
    units = t.shape[dim] // block
    idx = _index(units, max(1, units * 3 // 4), seed)
    exp = _expected(t, idx, dim, block)
    from minitron.ops.slicing import _col_major

    out_shape = list(t.shape)
    out_shape[dim] = idx.numel() * block
    out = torch.empty(out_shape, dtype=dtype) if not _col_major(t) else torch.empty(out_shape[::-1], dtype=dtype).t()
    out.zero_()
    _run(emu, [_desc(t, idx, dim, block, out)])
    assert torch.equal(out, exp)


def test_emulated_multi_tensor_table(emu):
    """Several descriptors of different dtypes and work shapes in one launch (a layer's 7 matrices, small)."""
    specs = [((64, 48), torch.bfloat16, 0, 8, 6), ((16, 48), torch.bfloat16, 0, 8, 1),
             ((48, 64), torch.bfloat16, 1, 8, 6), ((200, 48), torch.float32, 0, 1, 130),
             ((48, 200), torch.float16, 1, 1, 130), ((33,), torch.int8, 0, 1, 20)]
    rows, outs, exps = [], [], []
    for i, (shape, dtype, dim, block, k) in enumerate(specs):
        t = _rand(shape, dtype, i)
        idx = _index(shape[dim] // block, k, i)
        exp = _expected(t, idx, dim, block)
        out = torch.zeros_like(exp)
        rows.append(_desc(t, idx, dim, block, out))
        outs.append((out, t, idx))
        exps.append(exp)
    _run(emu, rows)
    for (out, _, _), exp in zip(outs, exps):
        assert torch.equal(out, exp)


@pytest.mark.parametrize("dim", [0, 1])
def test_emulated_slabs_as_compact_uses_them(emu, dim):
    """compact_'s staging: output lines [l0, l0 + n) into a dense [n, out_inner] scratch (line0 = l0)."""
    t = _rand((300, 70), torch.float32, 5)
    units = t.shape[dim]
    idx = _index(units, units // 2, 5)
    exp = _expected(t, idx, dim, 1)
    out_lines = exp.shape[0]
    out_inner = exp.shape[1]
    got = torch.empty_like(exp)
    for l0 in range(0, out_lines, 37):
        n = min(37, out_lines - l0)
        scratch = torch.zeros(n, out_inner)
        _run(emu, [_desc(t, idx, dim, 1, scratch, line0=l0, n_lines=n, dst_canon=(out_inner, 1))])
        got[l0:l0 + n] = scratch
    assert torch.equal(got, exp)


def _dense_like(shape, src: torch.Tensor, dtype) -> torch.Tensor:
    """An output of ``shape`` laid out in ``src``'s memory order (as gather_slices allocates it)."""
    from minitron.kernels._layout import dense_strides, dim_order

    return torch.zeros(shape, dtype=dtype).as_strided(shape, dense_strides(shape, dim_order(src.shape, src.stride())))


def _expected2(t, cuts):
    for idx, dim, block in cuts:
        t = _expected(t, idx, dim, block)
    return t


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int8])
@pytest.mark.parametrize("dims", [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2)])
@pytest.mark.parametrize("layout", ["contiguous", "permuted", "sliced"])
def test_emulated_3d(emu, dtype, dims, layout):
    """3-D tensors, one or two cut dims (group / line / inner axes, vector and element paths)."""
    seed = hash((str(dtype), dims, layout)) % 1000
    shape = (6, 24, 40)
    if layout == "contiguous":
        t = _rand(shape, dtype, seed)
    elif layout == "permuted":
        t = _rand((shape[2], shape[0], shape[1]), dtype, seed).permute(1, 2, 0)
    else:
        t = _rand((shape[0] + 1, shape[1], shape[2] + 8), dtype, seed)[1:, :, 3:3 + shape[2]]
    blocks = {0: 1, 1: 4, 2: 2}
    cuts = [(_index(shape[d] // blocks[d], max(1, shape[d] // blocks[d] * 2 // 3), seed + d), d, blocks[d])
            for d in dims]
    exp = _expected2(t, cuts)
    out = _dense_like(list(exp.shape), t, dtype)
    idx, dim, block = cuts[0]
    _run(emu, [_desc(t, idx, dim, block, out, cut2=cuts[1] if len(cuts) > 1 else None)])
    assert torch.equal(out, exp)


def test_emulated_moe_pair(emu):
    """gate_up [E, 2I, H] by experts and neurons (rows cat(keep, I + keep)) and down [E, H, I] by experts and
    neurons, one launch."""
    E, I, H = 8, 48, 64
    gu, dn = _rand((E, 2 * I, H), torch.bfloat16, 1), _rand((E, H, I), torch.bfloat16, 2)
    ke, kn = _index(E, 4, 3), _index(I, 36, 4)
    rows = torch.cat([kn, I + kn])
    o1 = torch.zeros(4, 72, H, dtype=torch.bfloat16)
    o2 = torch.zeros(4, H, 36, dtype=torch.bfloat16)
    _run(emu, [_desc(gu, ke, 0, 1, o1, cut2=(rows, 1, 1)), _desc(dn, ke, 0, 1, o2, cut2=(kn, 2, 1))])
    assert torch.equal(o1, gu[ke][:, rows])
    assert torch.equal(o2, dn[ke][:, :, kn])
