"""Benchmark of ``minitron.ops.gather_slices`` / ``compact_`` (structured weight slicing) against torch.

Providers
---------
* ``minitron-<backend>``: ``gather_slices([w], idx, dim, backend=<backend>)`` (out of place) or
  ``compact_(w, idx, dim, backend=<backend>)`` (in place; the matrix is restored, untimed, before every
  call) for every backend of the device (``cpp`` on CPU; ``cuda`` and ``triton`` on CUDA).
* ``torch-index_select`` (the reference): ``w.index_select(dim, rows)`` with the block-expanded index,
  one call per tensor. For ``compact_`` this is what pruning does without it: a new matrix of the kept
  size (peak memory = the result).

Cases
-----
Headline (the Llama-3-8B MLP matrix, ``[14336, 4096]`` fp32): keep a random half of the rows, and a random
3/4 of the columns; the same two selections with ``compact_``. Default run adds: attention heads
(``[4096, 4096]``, keep 24 of 32 blocks of 128 rows) and a whole bf16 Llama-3-8B layer in one
``gather_slices`` call (q/k/v rows and o columns by heads, gate/up rows and down columns by neurons:
7 tensors, one launch) against a loop of ``index_select``. ``--quick``: ``[4096, 4096]`` fp32 rows/columns
for both ops.

``bytes_moved`` = read + write of the kept data (2 x result bytes), the compulsory traffic; the harness
reports it as a fraction of the copy bandwidth it measures in the same run (``dst.copy_(src)``). Note
that out-of-place results are fresh memory: their first-touch page faults are part of every
out-of-place provider's time (the C++ kernel asks for transparent huge pages to make them cheaper).

Run: ``python -m benchmarks --only slicing [--quick]`` or ``python benchmarks/bench_slicing.py [--quick]``.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._harness import BenchConfig, Bench, Case, our_backends  # noqa: E402

ELT = {"float32": 4, "bfloat16": 2, "float16": 2}
REF = "torch-index_select"

# Llama-3-8B layer: hidden 4096, 32 query heads / 8 kv heads of 128, MLP 14336 -> pruned to
# 24 heads / 6 kv groups and MLP 9216 (Minitron-style width pruning).
LAYER = {"H": 4096, "heads": 32, "kv": 8, "hd": 128, "ffn": 14336, "keep_heads": 24, "keep_kv": 6, "keep_ffn": 9216}


def _index(n_units: int, k: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randperm(n_units, generator=g)[:k]).values


def _expand(idx, block: int):
    import torch

    if block == 1:
        return idx
    return (idx[:, None] * block + torch.arange(block, device=idx.device)).reshape(-1)


def _matrix(shape, dtype: str, device: str):
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randn(*shape, generator=g).to(device=device, dtype=getattr(torch, dtype))


def _setup_gather(provider: str, shape: tuple, dim: int, keep: float, block: int, dtype: str, case: Case,
                  device: str) -> Bench:
    w = _matrix(shape, dtype, device)
    units = shape[dim] // block
    idx = _index(units, int(round(units * keep)), seed=dim).to(device)
    if provider.startswith("minitron-"):
        from minitron.ops import gather_slices

        backend = provider[len("minitron-"):]
        gather_slices([w], idx, dim, block=block, backend=backend)  # fail early if unavailable
        return Bench(fn=lambda: gather_slices([w], idx, dim, block=block, backend=backend), keep=[w])
    rows = _expand(idx, block)
    return Bench(fn=lambda: w.index_select(dim, rows), keep=[w])


def _setup_compact(provider: str, shape: tuple, dim: int, keep: float, block: int, dtype: str, case: Case,
                   device: str) -> Bench:
    pristine = _matrix(shape, dtype, device)
    w = pristine.clone()
    units = shape[dim] // block
    idx = _index(units, int(round(units * keep)), seed=dim).to(device)
    state: dict[str, Any] = {}

    def restore() -> None:
        state.pop("out", None)
        w.copy_(pristine)

    if provider.startswith("minitron-"):
        from minitron.ops import compact_

        backend = provider[len("minitron-"):]
        compact_(w, idx, dim, block=block, backend=backend)  # fail early if unavailable

        def fn() -> None:
            state["out"] = compact_(w, idx, dim, block=block, backend=backend)

        return Bench(fn=fn, prepare=restore, reset=restore, keep=[w])
    rows = _expand(idx, block)

    def fn_ref() -> None:
        state["out"] = w.index_select(dim, rows)  # what pruning does without compact_: a new matrix

    return Bench(fn=fn_ref, prepare=restore, reset=restore, keep=[w])


def _layer_specs() -> list[tuple[tuple[int, int], int, int, int, int]]:
    """(shape, dim, block, units, kept units) of the 7 matrices of one Llama-3-8B layer."""
    c = LAYER
    h, hd = c["H"], c["hd"]
    return [
        ((c["heads"] * hd, h), 0, hd, c["heads"], c["keep_heads"]),  # q_proj rows
        ((c["kv"] * hd, h), 0, hd, c["kv"], c["keep_kv"]),  # k_proj rows
        ((c["kv"] * hd, h), 0, hd, c["kv"], c["keep_kv"]),  # v_proj rows
        ((h, c["heads"] * hd), 1, hd, c["heads"], c["keep_heads"]),  # o_proj columns
        ((c["ffn"], h), 0, 1, c["ffn"], c["keep_ffn"]),  # gate_proj rows
        ((c["ffn"], h), 0, 1, c["ffn"], c["keep_ffn"]),  # up_proj rows
        ((h, c["ffn"]), 1, 1, c["ffn"], c["keep_ffn"]),  # down_proj columns
    ]


def _setup_layer(provider: str, dtype: str, case: Case, device: str) -> Bench:
    specs = _layer_specs()
    ws = [_matrix(shape, dtype, device) for shape, *_ in specs]
    idxs = [_index(units, k, seed=i).to(device) for i, (_, _, _, units, k) in enumerate(specs)]
    dims = [s[1] for s in specs]
    blocks = [s[2] for s in specs]
    if provider.startswith("minitron-"):
        from minitron.ops import gather_slices

        backend = provider[len("minitron-"):]
        gather_slices(ws[:1], idxs[:1], dims[:1], block=blocks[:1], backend=backend)
        return Bench(fn=lambda: gather_slices(ws, idxs, dims, block=blocks, backend=backend), keep=ws)
    rows = [_expand(i, b) for i, b in zip(idxs, blocks)]
    return Bench(fn=lambda: [w.index_select(d, r) for w, d, r in zip(ws, dims, rows)], keep=ws)


def _out_bytes(shape: tuple, dim: int, keep: float, block: int, dtype: str) -> int:
    units = shape[dim] // block
    kept = int(round(units * keep)) * block
    other = shape[1 - dim]
    return kept * other * ELT[dtype]


def cases(cfg: BenchConfig) -> list[Case]:
    provs = ["minitron-" + b for b in our_backends(cfg.device)] + [REF]
    out: list[Case] = []

    def add(op: str, shape: tuple, dim: int, keep: float, block: int, dtype: str) -> None:
        setup = _setup_gather if op == "gather_slices" else _setup_compact
        moved = 2 * _out_bytes(shape, dim, keep, block, dtype)
        for p in provs:
            out.append(Case(
                bench=op, provider=p, mode="forward", shape={"R": shape[0], "C": shape[1]}, dtype=dtype,
                params={"dim": dim, "keep": keep, "block": block},
                setup=functools.partial(setup, p, shape, dim, keep, block, dtype), reference=REF,
                bytes_moved=moved, size=shape[0] * shape[1], size_label="matrix elements",
                note="keep rows" if dim == 0 else "keep columns"))

    if cfg.quick:
        for op in ("gather_slices", "compact_"):
            add(op, (4096, 4096), 0, 0.5, 1, "float32")
            add(op, (4096, 4096), 1, 0.75, 1, "float32")
        return out
    for op in ("gather_slices", "compact_"):
        add(op, (14336, 4096), 0, 0.5, 1, "float32")
        add(op, (14336, 4096), 1, 0.75, 1, "float32")
    add("gather_slices", (4096, 4096), 0, 0.75, 128, "float32")
    add("gather_slices", (14336, 4096), 1, 0.75, 1, "bfloat16")
    layer_moved = 0
    for shape, dim, block, units, k in _layer_specs():
        layer_moved += 2 * (k * block) * shape[1 - dim] * ELT["bfloat16"]
    for p in provs:
        out.append(Case(
            bench="gather_slices_layer", provider=p, mode="forward", shape={"layers": 1, "H": LAYER["H"],
                                                                              "ffn": LAYER["ffn"]},
            dtype="bfloat16", params={"tensors": 7}, setup=functools.partial(_setup_layer, p, "bfloat16"),
            reference=REF, bytes_moved=layer_moved, size=1,
            note="Llama-3-8B layer, 32->24 heads, 8->6 kv groups, MLP 14336->9216, one call"))
    return out


if __name__ == "__main__":
    from benchmarks import _harness

    sys.exit(_harness.main(["--only", "slicing"] + sys.argv[1:]))
