"""Benchmark of the grouped (segment) importance reduction (``GroupedImportanceAccumulator.update``): per-expert
neuron importance of a mixture-of-experts layer.

Run through the shared harness: ``python -m benchmarks --only grouped_importance [--quick]`` (or this file
directly, which forwards its arguments to the harness with ``--only grouped_importance``).

Workload
--------
Hidden states ``[B, S, H]`` routed top-``k`` among ``E`` experts: ``N = B * S * k`` routed rows. Each routed row
carries the expert's intermediate activation (width ``C`` = the expert neuron count, e.g. 768 =
Qwen3-30B-A3B's ``moe_intermediate_size``) and its router weight. Rows are sorted by (expert, sample) with
:func:`minitron.ops.grouped_segments` (untimed: the MoE layer's dispatch does this anyway). One update folds every
row: sequence ``mean`` per (expert, sample) over the router-weighted magnitudes, batch ``l2`` over samples.
Headline (issue 21): ``B=8, S=2048``, ``E=64``, ``k=8`` -> 131,072 rows, ``C`` in {768, 2048}.

Providers
---------
* ``minitron-<backend>``: ``GroupedImportanceAccumulator(E, C, backend=<backend>).update(x, offsets, w)``.
* ``torch-loop``: :func:`torch_loop_update`, a fair plain-torch loop over experts: per expert its contiguous rows,
  the weighted magnitudes, the per-sample sums with one ``index_add_``, divided by the segment lengths, squared and
  summed into the expert's fp32 state (vectorised within an expert).
* ``torch-loop-compile``: ``torch.compile(dynamic=True)`` of the per-expert body of ``torch-loop``.
* ``dense-per-expert``: the dense :class:`minitron.ops.ImportanceAccumulator` (C++ backend) called once per
  expert on the expert's rows padded to ``[B, longest segment, C]`` with a mask (padding included in the time):
  what one would do without a grouped op.

``bytes_moved`` is the compulsory traffic: reading ``x`` and the weights once.
"""
from __future__ import annotations

import os
import sys
from typing import Any

if __name__ == "__main__" and not __package__:  # run as a file: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._harness import BenchConfig, Bench, Case, Unavailable, dtype_of, our_backends, require_free_memory

BENCH = "grouped_importance"
ELT = {"float32": 4, "bfloat16": 2, "float16": 2}


def routed_inputs(b: int, s: int, experts: int, k: int, width: int, dtype: str, device: str = "cpu", seed: int = 0):
    """Random top-k routing and routed rows: ``(x [N, width], offsets [E*B+1], w [N])``, rows sorted by (expert,
    sample, position). ``x`` is random (the activations' values do not change the work)."""
    import torch

    from minitron.ops.grouped_importance import grouped_segments

    g = torch.Generator(device="cpu").manual_seed(seed)
    logits = torch.randn(b, s, experts, generator=g)
    probs, ids = logits.softmax(-1).topk(k, dim=-1)
    _, slot, offsets = grouped_segments(ids, experts)
    w = probs.reshape(-1)[slot].contiguous()
    x = torch.randn(slot.numel(), width, generator=g).to(dtype_of(dtype))
    return x.to(device), offsets.to(device), w.to(device)


def _expert_body(xe, we, sample_idx, lens, state_e) -> None:
    """One expert: weighted magnitudes, per-sample mean over its rows, L2 over its non-empty samples."""
    import torch

    m = (xe.float() * we.float().unsqueeze(-1)).abs()
    sums = torch.zeros(lens.shape[0], m.shape[1], dtype=torch.float32, device=m.device).index_add_(0, sample_idx, m)
    seq = sums / lens.clamp(min=1).to(torch.float32).unsqueeze(-1)
    seq = torch.where((lens > 0).unsqueeze(-1), seq, torch.zeros((), dtype=seq.dtype, device=seq.device))
    state_e.add_(seq.square().sum(0))


def torch_loop_update(state, count, x, offsets, w, num_samples: int, body=_expert_body) -> None:
    """Plain torch per-expert loop (``state`` fp32 ``[E, C]``: sums of squares; ``count`` int64 ``[E]``)."""
    import torch

    experts = state.shape[0]
    lens_all = offsets.diff().view(experts, num_samples)
    bounds = offsets[::num_samples].tolist()  # expert e's rows: [bounds[e], bounds[e + 1])
    sample_ids = torch.arange(num_samples, device=x.device)
    for e in range(experts):
        r0, r1 = bounds[e], bounds[e + 1]
        if r1 == r0:
            continue
        lens = lens_all[e]
        sample_idx = torch.repeat_interleave(sample_ids, lens, output_size=r1 - r0)
        body(x[r0:r1], w[r0:r1], sample_idx, lens, state[e])
    count.add_((lens_all > 0).sum(1))


def dense_per_expert_update(accs, x, offsets, w, num_samples: int) -> None:
    """The dense ImportanceAccumulator once per expert, on its rows padded to ``[B, longest, C]`` with a mask."""
    import torch

    experts = len(accs)
    lens_all = offsets.diff().view(experts, num_samples)
    lens_host = lens_all.tolist()
    bounds = offsets[::num_samples].tolist()
    sample_ids = torch.arange(num_samples, device=x.device)
    for e in range(experts):
        r0, r1 = bounds[e], bounds[e + 1]
        longest = max(lens_host[e])
        if longest == 0:
            continue
        lens = lens_all[e]
        sample_idx = torch.repeat_interleave(sample_ids, lens, output_size=r1 - r0)
        starts = offsets[e * num_samples:(e + 1) * num_samples]
        pos = torch.arange(r0, r1, device=x.device) - starts[sample_idx]
        padded = torch.zeros(num_samples, longest, x.shape[1], dtype=x.dtype, device=x.device)
        padded[sample_idx, pos] = x[r0:r1] * w[r0:r1].unsqueeze(-1).to(x.dtype)
        mask = torch.arange(longest, device=x.device).unsqueeze(0) < lens.unsqueeze(1)
        accs[e].update(padded, mask)


def _setup(case: Case, device: str) -> Bench:
    import torch

    sh = case.shape
    b, s, e, k, c = sh["B"], sh["S"], sh["E"], sh["k"], sh["C"]
    n = b * s * k
    require_free_memory(n * c * (ELT[case.dtype] + 12), "this case")
    x, offsets, w = routed_inputs(b, s, e, k, c, case.dtype, device)
    moved = float(x.numel() * x.element_size() + w.numel() * w.element_size())
    prov = case.provider
    if prov.startswith("minitron-"):
        from minitron.ops.grouped_importance import GroupedImportanceAccumulator

        acc = GroupedImportanceAccumulator(e, c, seq_agg="mean", batch_agg="l2", device=device,
                                           backend=prov[len("minitron-"):])
        acc.update(x[:0], torch.zeros(e * b + 1, dtype=torch.int64, device=device))  # backend check before timing
        return Bench(fn=lambda: acc.update(x, offsets, w), keep=[x], bytes_moved=moved)
    state = torch.zeros(e, c, dtype=torch.float32, device=device)
    count = torch.zeros(e, dtype=torch.int64, device=device)
    if prov == "torch-loop":
        return Bench(fn=lambda: torch_loop_update(state, count, x, offsets, w, b), keep=[x], bytes_moved=moved)
    if prov == "torch-loop-compile":
        body = torch.compile(_expert_body, dynamic=True)
        return Bench(fn=lambda: torch_loop_update(state, count, x, offsets, w, b, body), keep=[x], bytes_moved=moved)
    if prov == "dense-per-expert":
        from minitron.ops import ImportanceAccumulator

        backend = "cpp" if device == "cpu" else "auto"
        accs = [ImportanceAccumulator(c, seq_agg="mean", batch_agg="l2", device=device, backend=backend)
                for _ in range(e)]
        return Bench(fn=lambda: dense_per_expert_update(accs, x, offsets, w, b), keep=[x], bytes_moved=moved)
    raise Unavailable(f"unknown provider {prov!r}")


def providers(device: str) -> list[str]:
    return [f"minitron-{b}" for b in our_backends(device)] + ["torch-loop", "torch-loop-compile", "dense-per-expert"]


def _case(provider: str, b: int, s: int, e: int, k: int, c: int, dtype: str, quick: bool) -> Case:
    n = b * s * k
    return Case(bench=BENCH, provider=provider, mode="forward", shape={"B": b, "S": s, "E": e, "k": k, "C": c},
                dtype=dtype, setup=_setup, params={"seq_agg": "mean", "batch_agg": "l2", "weights": True},
                reference="torch-loop", bytes_moved=n * c * ELT[dtype] + n * 4, size=n * c,
                size_label="routed rows x width", warmup=1 if not quick else 2)


def cases(cfg: BenchConfig) -> list[Case]:
    provs = providers(cfg.device)
    if cfg.quick:
        shapes: list[tuple[Any, ...]] = [(2, 128, 8, 2, 256, "float32")]
    else:
        shapes = [(8, 2048, 64, 8, 768, "float32"), (8, 2048, 64, 8, 2048, "float32"),
                  (8, 2048, 64, 8, 768, "bfloat16")]
    out = []
    for b, s, e, k, c, dt in shapes:
        for prov in provs:
            if dt != "float32" and prov in ("torch-loop-compile", "dense-per-expert"):
                continue
            out.append(_case(prov, b, s, e, k, c, dt, cfg.quick))
    return out


if __name__ == "__main__":
    from benchmarks._harness import main

    sys.exit(main(["--only", "grouped_importance"] + sys.argv[1:]))
