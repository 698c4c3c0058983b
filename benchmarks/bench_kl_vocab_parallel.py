"""Vocab-parallel ``kl_div(..., process_group=g)``: bytes exchanged per row and a small timing on gloo ranks.

Usage::

    python -m benchmarks.bench_kl_vocab_parallel [--world 2] [--n 256] [--v 32000] [--reps 5] [--backend cpp]

1. **Bytes per row** - every ``torch.distributed.all_reduce`` the op issues is counted in the ranks (a wrapper
   around ``dist.all_reduce`` adds up ``numel * element_size``), per call, then divided by the rows: the per-row
   part is compared with :func:`minitron.ops.kl.vp_bytes_per_row` (computed from the shapes) and with what the
   naive alternative moves, an all-gather of both logit slices so that every rank holds whole rows
   (``2 * (W - 1) / W * V * 4`` bytes received per row and rank at fp32). The fixed per-call part (the argument
   consistency check, independent of N and V) is reported separately.
2. **Timing** - per rank, one thread, the vocab-parallel loss + gradient (``full``: forward with the student
   requiring grad, then ``backward``) of an ``[N, V / W]`` slice, against the single-process op on the whole
   ``[N, V]`` rows with one thread (what one rank would do without vocab parallelism). Median of ``--reps``.

Results are printed as a markdown table (nothing is written to the results files).
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

MODES = (("forward", 0.5), ("reverse", 0.5), ("jsd", 0.5))


def _bounds(v: int, world: int) -> list[int]:
    return [v * r // world for r in range(world + 1)]


def _data(n: int, v: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(n, v, generator=g) * 3
    return s, s * 0.6 + torch.randn(n, v, generator=g) * 2


def _time(fn, reps: int) -> float:
    fn()  # warm-up
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def _worker(rank: int, world: int, store: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    from minitron.ops import kl_div

    counted = {"bytes": 0, "calls": 0}
    real = dist.all_reduce

    def counting(tensor, *a, **kw):
        counted["bytes"] += tensor.numel() * tensor.element_size()
        counted["calls"] += 1
        return real(tensor, *a, **kw)

    dist.all_reduce = counting
    try:
        s_full, t_full = _data(args.n, args.v)
        b = _bounds(args.v, world)
        s, t = s_full[:, b[rank]:b[rank + 1]].contiguous(), t_full[:, b[rank]:b[rank + 1]].contiguous()
        rows = []
        for mode, beta in MODES:
            def step(n_rows: int):
                leaf = s[:n_rows].clone().requires_grad_(True)
                kl_div(leaf, t[:n_rows], mode=mode, beta=beta, backend=args.backend,
                       process_group=dist.group.WORLD).backward()

            sizes = {}
            for n_rows in (args.n, args.n // 2):  # per-row part from two row counts; the rest is per call
                counted.update(bytes=0, calls=0)
                step(n_rows)
                sizes[n_rows] = (counted["bytes"], counted["calls"])
            per_row = (sizes[args.n][0] - sizes[args.n // 2][0]) / (args.n - args.n // 2)
            fixed = sizes[args.n][0] - per_row * args.n
            dist.barrier()
            t_vp = _time(lambda: step(args.n), args.reps)
            dist.barrier()
            rows.append(dict(mode=mode, per_row=per_row, fixed=fixed, calls=sizes[args.n][1], t_vp=t_vp))
        if rank == 0:
            for row in rows:
                def single():
                    leaf = s_full.clone().requires_grad_(True)
                    kl_div(leaf, t_full, mode=row["mode"], backend=args.backend).backward()

                row["t_single"] = _time(single, args.reps)
            torch.save(rows, out)
        dist.barrier()
    finally:
        dist.all_reduce = real
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--n", type=int, default=256, help="rows (tokens)")
    ap.add_argument("--v", type=int, default=32000, help="whole vocabulary (split over the ranks)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--backend", default="cpp")
    args = ap.parse_args(argv)
    from minitron.ops.kl import vp_bytes_per_row

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.pt")
        mp.spawn(_worker, args=(args.world, os.path.join(tmp, "store"), args, out), nprocs=args.world, join=True)
        rows = torch.load(out)
    w = args.world
    print(f"# vocab-parallel kl_div: {w} gloo ranks x 1 thread, N={args.n}, V={args.v} (V/W={args.v // w}), fp32, "
          f"backend={args.backend}\n")
    print("| mode | bytes/row sent per rank (counted) | from shapes | all-gather of both slices (bytes/row) | "
          "ratio | fixed bytes/call | all-reduces/call | vocab-parallel ms (per rank, V/W) | single process ms "
          "(V) |")
    print("|---|---|---|---|---|---|---|---|---|")
    gather = 2 * (w - 1) / w * args.v * 4
    for r in rows:
        print(f"| {r['mode']} | {r['per_row']:.0f} | {vp_bytes_per_row(r['mode'])} | {gather:.0f} | "
              f"{gather / r['per_row']:.0f}x | {r['fixed']:.0f} | {r['calls']} | {r['t_vp'] * 1e3:.1f} | "
              f"{r['t_single'] * 1e3:.1f} |")
    print("\nBytes per row for other vocabularies (the vocab-parallel exchange does not depend on V):\n")
    print("| V | vocab-parallel forward/reverse | JSD | all-gather of both slices, W=2 | W=8 |")
    print("|---|---|---|---|---|")
    for v in (32000, 128256, 256000):
        print(f"| {v} | {vp_bytes_per_row('forward')} | {vp_bytes_per_row('jsd')} | {2 * 1 / 2 * v * 4:.0f} | "
              f"{2 * 7 / 8 * v * 4:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
