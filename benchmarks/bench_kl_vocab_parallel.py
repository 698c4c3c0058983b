"""Vocab-parallel ``kl_div(..., process_group=g)``: bytes exchanged per row and a small timing on gloo ranks.

Usage::

    python -m benchmarks.bench_kl_vocab_parallel [--world 2] [--rows 256] [--vocab 32000] [--reps 5] [--backend cpp]
    torchrun --nproc-per-node 2 -m benchmarks.bench_kl_vocab_parallel    # the same on torchrun's ranks (parts 1-2)

1. **Bytes per row** - every ``torch.distributed.all_reduce`` the op issues is counted in the ranks (a wrapper
   around ``dist.all_reduce`` adds up ``numel * element_size``), per call, then divided by the rows: the per-row
   part is compared with :func:`minitron.ops.kl.vp_bytes_per_row` (computed from the shapes) and with what the
   naive alternative moves, an all-gather of both logit slices so that every rank holds whole rows
   (``2 * (W - 1) / W * V * 4`` bytes received per row and rank at fp32). The fixed per-call part (the argument
   consistency check, independent of N and V) is reported separately.
2. **Timing** - per rank, one thread, the vocab-parallel loss + gradient (``full``: forward with the student
   requiring grad, then ``backward``) of an ``[N, V / W]`` slice, against the single-process op on the whole
   ``[N, V]`` rows with one thread (what one rank would do without vocab parallelism). Median of ``--reps``.

3. **Local cost** (one process, one thread, the ``[N, V / W]`` slice): the pieces' kernels (stats, JSD sums,
   slice loss + gradient) against the fused single-process kernel on the same columns, and a whole loss + gradient
   step through a one-rank gloo group (consistency check and collectives included, no other rank to wait for)
   against the single-process op.

Results are printed as markdown tables (nothing is written to the results files).
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


def cases(cfg: object) -> list:
    """No cases for the shared harness (``python -m benchmarks`` runs single-process cases): this benchmark
    spawns its own ranks; run it directly (see the module docstring)."""
    return []


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
    try:
        rows = _measure(rank, world, args)
        if rank == 0:
            torch.save(rows, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _measure(rank: int, world: int, args: argparse.Namespace) -> list[dict]:
    """The byte counts and timings of this rank (the process group is initialised); rank 0's rows also carry the
    single-process timings."""
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
        dist.barrier()
    finally:
        dist.all_reduce = real
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--rows", dest="n", type=int, default=256, help="rows (tokens), N")
    ap.add_argument("--vocab", dest="v", type=int, default=32000, help="whole vocabulary V (split over the ranks)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--backend", default="cpp")
    args = ap.parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun: one process per rank
        torch.set_num_threads(1)
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
        try:
            args.world = dist.get_world_size()
            rows = _measure(dist.get_rank(), args.world, args)
            if dist.get_rank() == 0:
                _print_tables(args, rows)
            dist.barrier()
        finally:
            dist.destroy_process_group()
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.pt")
        mp.spawn(_worker, args=(args.world, os.path.join(tmp, "store"), args, out), nprocs=args.world, join=True)
        rows = torch.load(out)
    _print_tables(args, rows)
    _local_costs(args)
    return 0


def _print_tables(args: argparse.Namespace, rows: list[dict]) -> None:
    from minitron.ops.kl import vp_bytes_per_row

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


def _local_one_rank(rank: int, store: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        from minitron.ops import kl_div
        from minitron.ops.kl import MODES as MODE_IDS

        v = args.v // args.world
        s_full, t_full = _data(args.n, args.v)
        s, t = s_full[:, :v].contiguous(), t_full[:, :v].contiguous()
        w = torch.full((args.n,), 1.0 / args.n)
        ops = torch.ops.minitron
        rows = []
        for mode, beta in MODES:
            m = MODE_IDS[mode]
            st = ops.kl_div_stats(s, t, w, m, 1.0, args.backend)
            sums = ops.kl_div_jsd_sums(s, t, w, st, 1.0, beta, args.backend) if m == 2 else None
            t_stats = _time(lambda: ops.kl_div_stats(s, t, w, m, 1.0, args.backend), args.reps)
            t_sums = _time(lambda: ops.kl_div_jsd_sums(s, t, w, st, 1.0, beta, args.backend), args.reps) \
                if m == 2 else 0.0
            t_vp = _time(lambda: ops.kl_div_vp_fwd(s, t, w, st, sums, m, 1.0, beta, 1.0, args.backend, True),
                         args.reps)
            t_fused = _time(lambda: ops.kl_div_fwd(s, t, w, m, 1.0, beta, 1.0, args.backend, True), args.reps)

            def step(group):
                leaf = s.clone().requires_grad_(True)
                kl_div(leaf, t, mode=mode, beta=beta, backend=args.backend, process_group=group).backward()

            t_single = _time(lambda: step(None), args.reps)
            t_group = _time(lambda: step(dist.group.WORLD), args.reps)
            rows.append(dict(mode=mode, stats=t_stats, sums=t_sums, vp=t_vp, fused=t_fused, single=t_single,
                             group=t_group))
        torch.save(rows, out)
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _local_costs(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "local.pt")
        mp.spawn(_local_one_rank, args=(os.path.join(tmp, "store"), args, out), nprocs=1, join=True)
        rows = torch.load(out)
    v = args.v // args.world
    print(f"\nLocal cost of one rank's slice, one thread, N={args.n}, V/W={v}, fp32 (ms):\n")
    print("| mode | stats | JSD sums | slice loss+grad | pieces total | fused kernel, same columns | ratio | "
          "step via 1-rank group | single-process step | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        tot = r["stats"] + r["sums"] + r["vp"]
        print(f"| {r['mode']} | {r['stats'] * 1e3:.1f} | {r['sums'] * 1e3:.1f} | {r['vp'] * 1e3:.1f} | "
              f"{tot * 1e3:.1f} | {r['fused'] * 1e3:.1f} | {tot / r['fused']:.2f}x | {r['group'] * 1e3:.1f} | "
              f"{r['single'] * 1e3:.1f} | {r['group'] / r['single']:.2f}x |")


if __name__ == "__main__":
    raise SystemExit(main())
