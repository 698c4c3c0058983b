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

Mixture-of-experts cases (``gather_slices_moe``; 3-D tensors, two cut dims in one call): the fused experts of
one Qwen3-30B-A3B layer in bf16, ``gate_up_proj`` ``[128, 1536, 2048]`` -> 64 experts and 576 of 768 neurons
(rows ``cat(keep, 768 + keep)``: ``[64, 1152, 2048]``) and ``down_proj`` ``[128, 2048, 768]`` -> ``[64, 2048,
576]``, each alone and both in one call (``tensor=layer``). Providers: ours; ``torch-index_select`` (the
reference: ``w.index_select(0, experts).index_select(1, rows)``), ``torch-indexing`` (advanced indexing,
``w[experts][:, rows]``) and ``torch-compile`` (``torch.compile`` of the ``index_select`` chain; unavailable
where inductor cannot compile). ``--quick``: a tiny ``[16, 192, 256]`` / ``[16, 256, 96]`` pair in one call,
without ``torch-compile`` (whose compilation alone takes tens of seconds), so the case stays a few seconds.

``bytes_moved`` = read + write of the kept data (2 x result bytes), the compulsory traffic; the harness
reports it as a fraction of the copy bandwidth it measures in the same run (``dst.copy_(src)``). Note
that out-of-place results are fresh memory: their first-touch page faults are part of every
out-of-place provider's time (the C++ kernel asks for transparent huge pages to make them cheaper).

Run: ``python -m benchmarks --only slicing [--quick]`` or ``python benchmarks/bench_slicing.py [--quick]``.
"""
from __future__ import annotations

import functools
import math
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._harness import BenchConfig, Bench, Case, our_backends  # noqa: E402

ELT = {"float32": 4, "bfloat16": 2, "float16": 2}
REF = "torch-index_select"
MOE_TORCH = ["torch-indexing", "torch-compile"]

# Qwen3-30B-A3B experts of one layer: E experts of I neurons, hidden H -> keep E/2 experts and 3/4 of the neurons.
MOE = {"E": 128, "I": 768, "H": 2048, "keep_E": 64, "keep_I": 576}
MOE_QUICK = {"E": 16, "I": 96, "H": 256, "keep_E": 8, "keep_I": 72}

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


def _moe_specs(c: dict) -> dict[str, tuple[tuple[int, int, int], int, int]]:
    """name -> (shape, neuron dim, output bytes) of the fused expert tensors (bf16)."""
    e, i, h, ke, ki = c["E"], c["I"], c["H"], c["keep_E"], c["keep_I"]
    return {"gate_up": ((e, 2 * i, h), 1, ke * 2 * ki * h * 2), "down": ((e, h, i), 2, ke * h * ki * 2)}


def _setup_moe(provider: str, c: dict, which: str, case: Case, device: str) -> Bench:
    import torch

    from benchmarks._harness import Unavailable, require_free_memory

    specs = _moe_specs(c)
    names = list(specs) if which == "layer" else [which]
    need = sum(math.prod(specs[n][0]) * 2 + specs[n][2] for n in names)
    require_free_memory(2.5 * need, "the MoE slicing case")
    ws = [_matrix(specs[n][0], "bfloat16", device) for n in names]
    experts = _index(c["E"], c["keep_E"], seed=1).to(device)
    neurons = _index(c["I"], c["keep_I"], seed=2).to(device)
    rows = {"gate_up": torch.cat([neurons, c["I"] + neurons]), "down": neurons}
    ndims = [specs[n][1] for n in names]
    nidx = [rows[n] for n in names]
    if provider.startswith("minitron-"):
        from minitron.ops import gather_slices

        backend = provider[len("minitron-"):]
        indices = [(experts, r) for r in nidx]
        dims = [(0, d) for d in ndims]
        gather_slices(ws, indices, dims, backend=backend)  # fail early if unavailable
        return Bench(fn=lambda: gather_slices(ws, indices, dims, backend=backend), keep=ws)
    if provider == "torch-indexing":
        def index_one(w, d, r):
            return w[experts][:, r] if d == 1 else w[experts][:, :, r]

        return Bench(fn=lambda: [index_one(w, d, r) for w, d, r in zip(ws, ndims, nidx)], keep=ws)

    def chain(w, d, r):
        return w.index_select(0, experts).index_select(d, r)

    if provider == "torch-compile":
        try:
            fn = torch.compile(lambda: [chain(w, d, r) for w, d, r in zip(ws, ndims, nidx)], fullgraph=True)
            fn()
        except Exception as exc:  # inductor needs a working C++ toolchain
            raise Unavailable(f"torch.compile failed: {type(exc).__name__}: {str(exc)[:200]}") from None
        return Bench(fn=fn, keep=ws)
    return Bench(fn=lambda: [chain(w, d, r) for w, d, r in zip(ws, ndims, nidx)], keep=ws)


def _moe_cases(cfg: BenchConfig, provs: list[str]) -> list[Case]:
    c = MOE_QUICK if cfg.quick else MOE
    specs = _moe_specs(c)
    out = []
    for which in (["layer"] if cfg.quick else ["gate_up", "down", "layer"]):
        names = list(specs) if which == "layer" else [which]
        moved = 2 * sum(specs[n][2] for n in names)
        # --quick leaves out torch-compile: its compilation alone takes tens of seconds here
        for p in provs + (MOE_TORCH[:1] if cfg.quick else MOE_TORCH):
            out.append(Case(
                bench="gather_slices_moe", provider=p, mode="forward",
                shape={"E": c["E"], "I": c["I"], "H": c["H"]}, dtype="bfloat16",
                params={"tensor": which, "keep_E": c["keep_E"], "keep_I": c["keep_I"]},
                setup=functools.partial(_setup_moe, p, c, which), reference=REF, bytes_moved=moved,
                size=sum(math.prod(specs[n][0]) for n in names), size_label="input elements",
                note=f"Qwen3-30B-A3B experts {which}: experts {c['E']}->{c['keep_E']}, neurons "
                     f"{c['I']}->{c['keep_I']} (two cut dims, one call)"))
    return out


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
        return out + _moe_cases(cfg, provs)
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
    return out + _moe_cases(cfg, provs)


if __name__ == "__main__":
    from benchmarks import _harness

    sys.exit(_harness.main(["--only", "slicing"] + sys.argv[1:]))
