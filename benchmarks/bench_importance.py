"""Benchmark of the fused importance reduction (``ImportanceAccumulator.update``) and ``BlockInfluence.update``.

Run through the shared harness: ``python -m benchmarks --only importance [--quick]`` (or this file directly,
which forwards its arguments to the harness with ``--only importance``).

Providers
---------
* ``minitron-<backend>``: ``ImportanceAccumulator(..., backend=<backend>).update(x, mask)`` (``cpp`` on CPU;
  ``cuda`` and ``triton`` on CUDA) -- one pass over ``x``, fp32 state updated in place.
* ``torch-eager``: :func:`eager_importance_update`, the plain torch expression the op replaces (magnitude,
  masked sequence mean, L2 over samples added into an fp32 state).
* ``torch-compile``: ``torch.compile`` of exactly that function.

Block influence: ``minitron-*`` = ``BlockInfluence.update``; ``torch-eager`` / ``torch-compile`` =
:func:`eager_block_influence` (``1 - F.cosine_similarity`` masked and summed into a float64 state).

Shapes
------
Headline (CPU default): x fp32 ``[8, 2048, 4096]``, sequence ``mean`` / batch ``l2``, channels
(``group_size=1``) and heads (``group_size=128``: 32 heads); also bf16 channels and a ragged padding mask.
``--quick``: ``[4, 512, 4096]``. ``bytes_moved`` is the compulsory traffic: reading ``x`` (and the mask) once
(with a mask, only the rows it keeps: the setup counts them, so no fraction exceeds 100% for bytes never read),
so ``bw_frac`` is the achieved fraction of the copy bandwidth measured in the same run (the harness counts
copy bandwidth as read + write bytes; ``bytes_moved / time`` here is read bandwidth).
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Any, Optional

if __name__ == "__main__" and not __package__:  # run as a file: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._harness import BenchConfig, Bench, Case, Unavailable, dtype_of, our_backends, require_free_memory

BENCH = "importance"
BENCH_BI = "block_influence"
ELT = {"float32": 4, "bfloat16": 2, "float16": 2}


def eager_importance_update(state, x, mask: Optional[Any], group_size: int) -> None:
    """Plain torch: fp32 magnitudes, masked sequence mean per sample, sum of squares over samples into ``state``."""
    import torch

    b, s, c = x.shape
    xf = x.float()
    m = xf.abs() if group_size == 1 else xf.view(b, s, c // group_size, group_size).norm(dim=-1)
    if mask is None:
        seq = m.mean(1)
    else:
        w = mask.unsqueeze(-1).to(m.dtype)
        seq = (m * w).sum(1) / mask.sum(1, keepdim=True).clamp(min=1).to(m.dtype)
        seq = seq[mask.any(1)]
    state.add_(seq.square().sum(0))


def eager_block_influence(state, layer: int, h_in, h_out, mask: Optional[Any]) -> None:
    """Plain torch block influence: masked sum of ``1 - cos`` added into ``state[layer]`` (float64)."""
    import torch.nn.functional as F

    d = 1.0 - F.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
    if mask is not None:
        d = d[mask]
    state[layer] += d.double().sum()


def _inputs(shape: dict, dtype: str, with_mask: bool, device: str, seed: int = 0):
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    b, s, c = shape["B"], shape["S"], shape["C"]
    x = torch.randn(b, s, c, generator=g).to(device=device, dtype=dtype_of(dtype))
    mask = None
    if with_mask:
        lengths = torch.randint(s // 4, s + 1, (b,), generator=g)
        mask = (torch.arange(s).unsqueeze(0) < lengths.unsqueeze(1)).to(device)
    return x, mask


def _moved(x, mask, tensors: int) -> float:
    """Compulsory bytes of one update: the activation rows the mask keeps (a kernel never reads the others) of
    ``tensors`` tensors like ``x``, plus the mask itself."""
    b, s, c = x.shape
    rows = b * s if mask is None else int(mask.sum())
    return float(tensors * rows * c * x.element_size() + (0 if mask is None else mask.numel() * mask.element_size()))


def _setup_importance(case: Case, device: str) -> Bench:
    import torch

    p = case.params
    g = p["group_size"]
    elt = ELT[case.dtype]
    require_free_memory(case.shape["B"] * case.shape["S"] * case.shape["C"] * (elt + 12), "this case")
    x, mask = _inputs(case.shape, case.dtype, p["mask"], device)
    units = case.shape["C"] // g
    if case.provider.startswith("minitron-"):
        from minitron.ops import ImportanceAccumulator

        acc = ImportanceAccumulator(units, group_size=g, seq_agg="mean", batch_agg="l2", device=device,
                                    backend=case.provider[len("minitron-"):])
        acc.update(x[:1, :1], None if mask is None else mask[:1, :1])  # backend check before timing
        return Bench(fn=lambda: acc.update(x, mask), keep=[x], bytes_moved=_moved(x, mask, 1))
    state = torch.zeros(units, dtype=torch.float32, device=device)
    fn = functools.partial(eager_importance_update, group_size=g)
    if case.provider == "torch-compile":
        fn = torch.compile(fn, dynamic=False)
    elif case.provider != "torch-eager":
        raise Unavailable(f"unknown provider {case.provider!r}")
    return Bench(fn=lambda: fn(state, x, mask), keep=[x], bytes_moved=_moved(x, mask, 1))


def _setup_block_influence(case: Case, device: str) -> Bench:
    import torch

    p = case.params
    elt = ELT[case.dtype]
    require_free_memory(case.shape["B"] * case.shape["S"] * case.shape["C"] * (2 * elt + 12), "this case")
    h_in, mask = _inputs(case.shape, case.dtype, p["mask"], device, seed=1)
    h_out = (h_in.float() + 0.5 * torch.randn_like(h_in, dtype=torch.float32)).to(h_in.dtype)
    if case.provider.startswith("minitron-"):
        from minitron.ops import BlockInfluence

        bi = BlockInfluence(2, device=device, backend=case.provider[len("minitron-"):])
        bi.update(0, h_in[:1, :1], h_out[:1, :1])
        return Bench(fn=lambda: bi.update(1, h_in, h_out, mask), keep=[h_in, h_out],
                     bytes_moved=_moved(h_in, mask, 2))
    state = torch.zeros(2, dtype=torch.float64, device=device)
    fn = eager_block_influence
    if case.provider == "torch-compile":
        fn = torch.compile(fn, dynamic=False)
    elif case.provider != "torch-eager":
        raise Unavailable(f"unknown provider {case.provider!r}")
    return Bench(fn=lambda: fn(state, 1, h_in, h_out, mask), keep=[h_in, h_out], bytes_moved=_moved(h_in, mask, 2))


def providers(device: str) -> list[str]:
    return [f"minitron-{b}" for b in our_backends(device)] + ["torch-eager", "torch-compile"]


def _case(provider: str, b: int, s: int, c: int, dtype: str, group_size: int, mask: bool) -> Case:
    moved = b * s * c * ELT[dtype] + (b * s if mask else 0)
    return Case(bench=BENCH, provider=provider, mode="forward", shape={"B": b, "S": s, "C": c}, dtype=dtype,
                setup=_setup_importance, params={"group_size": group_size, "seq_agg": "mean", "batch_agg": "l2",
                                                 "mask": mask},
                reference="torch-eager", bytes_moved=moved, size=b * s * c, size_label="batch x seq x channels",
                warmup=2)


def _bi_case(provider: str, b: int, s: int, c: int, dtype: str, mask: bool) -> Case:
    moved = 2 * b * s * c * ELT[dtype] + (b * s if mask else 0)
    return Case(bench=BENCH_BI, provider=provider, mode="forward", shape={"B": b, "S": s, "C": c}, dtype=dtype,
                setup=_setup_block_influence, params={"mask": mask}, reference="torch-eager", bytes_moved=moved,
                size=b * s * c, size_label="batch x seq x hidden", warmup=2)


def cases(cfg: BenchConfig) -> list[Case]:
    provs = providers(cfg.device)
    out: list[Case] = []
    if cfg.device.startswith("cuda"):
        shapes = [(8, 2048, 4096)] if cfg.quick else [(8, 2048, 4096), (16, 4096, 8192)]
    elif cfg.quick:
        shapes = [(4, 512, 4096)]
    else:
        shapes = [(8, 2048, 4096)]
    for b, s, c in shapes:
        for prov in provs:
            out.append(_case(prov, b, s, c, "float32", 1, False))
            out.append(_case(prov, b, s, c, "float32", 128, False))
            if not cfg.quick:
                out.append(_case(prov, b, s, c, "bfloat16", 1, False))
                out.append(_case(prov, b, s, c, "float32", 1, True))
                out.append(_case(prov, b, s, c, "bfloat16", 128, True))
        for prov in provs:
            if cfg.quick and prov == "torch-compile":
                continue
            out.append(_bi_case(prov, b, s, c, "float32", not cfg.quick))
    return out


if __name__ == "__main__":
    from benchmarks._harness import main

    sys.exit(main(["--only", "importance"] + sys.argv[1:]))
