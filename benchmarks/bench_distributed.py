"""Distillation throughput with 1 and 2 ranks (gloo, CPU, one thread per rank) and communication volume.

Runs :func:`minitron.train.distill_model` on a small Llama-style teacher/student pair, as one process and as
N processes (``--strategy ddp`` or ``fsdp2``, rendezvous through a ``file://`` store), with the same per-rank
batch (weak scaling), and reports training tokens/s (from the loop's own log, the first steps excluded),
the scaling efficiency ``tps_N / (N * tps_1)``, and the bytes each rank sends per optimizer step, computed from
the parameter shapes for bandwidth-optimal ring collectives, next to the theoretical minimum:

- DDP: one all-reduce of the student's gradients per step (``no_sync`` on the other micro-batches):
  ``2 (N-1)/N * G`` bytes per rank; the minimum for replicated data parallelism is that same all-reduce.
- FSDP2 (``reshard_after_forward=True``; the root group stays unsharded between forward and backward):
  per micro-batch an all-gather of every student layer in forward and again in backward, the root group once,
  the teacher's parameters once (forward only); per step one reduce-scatter of the gradients. The minimum for
  fully sharded parameters is one all-gather of the student and teacher per micro-batch plus the reduce-scatter.

Usage::

    python benchmarks/bench_distributed.py                    # ddp and fsdp2, 1 and 2 ranks
    python benchmarks/bench_distributed.py --strategy ddp --steps 12 --json out.json

Not a test: numbers on a shared 2-core machine are noisy; run it on an idle machine for figures to quote.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List

import torch

ROOT = Path(__file__).resolve().parents[1]

MODEL = dict(vocab=4096, hidden=128, teacher_layers=4, student_layers=2, seq=128)


def _llama(layers: int, seed: int, tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    h = MODEL["hidden"]
    cfg = LlamaConfig(vocab_size=MODEL["vocab"], hidden_size=h, intermediate_size=4 * h, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MODEL["seq"],
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).float()


def _models():
    return _llama(MODEL["teacher_layers"], 1, False).eval(), _llama(MODEL["student_layers"], 2, True)


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist

    from minitron.io.data import PackedDataset
    from minitron.train import DistillConfig, TrainConfig, distill_model

    world, rank = args.world, args.rank
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{args.init_file}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=120))
    try:
        teacher, student = _models()
        g = torch.Generator().manual_seed(0)
        n = args.batch_size * world * (args.steps + 1)
        ids = torch.randint(3, MODEL["vocab"], (n, MODEL["seq"]), generator=g)
        data = PackedDataset(ids, torch.ones_like(ids))
        cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=1e-3,
                          warmup_steps=1, strategy=args.strategy if world > 1 else None)
        res = distill_model(student, teacher, data, cfg, DistillConfig(), args.out)
        if rank == 0:
            recs = [r for r in res.history if r.get("type") == "train"]
            a, b = recs[args.skip - 1], recs[-1]
            tps = (b["tokens"] - a["tokens"]) / (b["elapsed_s"] - a["elapsed_s"])
            Path(args.result).write_text(json.dumps({"tokens_per_s": tps, "steps_timed": len(recs) - args.skip}))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run(strategy: str, world: int, ns: argparse.Namespace, tmp: Path) -> float:
    tag = f"{strategy}-{world}"
    result = tmp / f"{tag}.json"
    cmd = [sys.executable, __file__, "--worker", "--world", str(world), "--strategy", strategy,
           "--steps", str(ns.steps), "--batch-size", str(ns.batch_size), "--grad-accum", str(ns.grad_accum),
           "--skip", str(ns.skip), "--init-file", str(tmp / f"{tag}.init"), "--out", str(tmp / tag),
           "--result", str(result)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen(cmd + ["--rank", str(r)], env=env, cwd=ROOT) for r in range(world)]
    rcs = [p.wait() for p in procs]
    if any(rcs):
        raise SystemExit(f"{tag}: a rank failed ({rcs})")
    return float(json.loads(result.read_text())["tokens_per_s"])


def _groups(model: torch.nn.Module) -> Dict[str, int]:
    """Parameter bytes (fp32) of the FSDP2 groups: all decoder layers, and the root group (the rest)."""
    layers = sum(p.numel() for layer in model.model.layers for p in layer.parameters())
    total = sum(p.numel() for p in model.parameters())  # tied weights counted once
    return {"layers": 4 * layers, "root": 4 * (total - layers), "total": 4 * total}


def comm_bytes(world: int, grad_accum: int) -> Dict[str, Any]:
    """Bytes sent per rank per optimizer step (ring collectives), from the shapes."""
    teacher, student = _models()
    s, t = _groups(student), _groups(teacher)
    f = (world - 1) / world
    ddp = 2 * f * s["total"]
    fsdp = f * (grad_accum * (2 * s["layers"] + s["root"] + t["total"]) + s["total"])
    fsdp_min = f * (grad_accum * (s["total"] + t["total"]) + s["total"])
    return {"student_param_bytes": s["total"], "teacher_param_bytes": t["total"],
            "ddp_bytes_per_step": ddp, "ddp_min_bytes_per_step": ddp,
            "fsdp2_bytes_per_step": fsdp, "fsdp2_min_bytes_per_step": fsdp_min}


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strategy", choices=["ddp", "fsdp2", "both"], default="both")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--skip", type=int, default=3, help="first steps excluded from the timing")
    ap.add_argument("--batch-size", type=int, default=4, help="sequences per rank per micro-batch")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--init-file", default="", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    ap.add_argument("--result", default="", help=argparse.SUPPRESS)
    ns = ap.parse_args(argv)
    if ns.worker:
        worker(ns)
        return 0
    strategies = ["ddp", "fsdp2"] if ns.strategy == "both" else [ns.strategy]
    report: Dict[str, Any] = {"model": MODEL, "batch_size_per_rank": ns.batch_size, "grad_accum": ns.grad_accum,
                              "steps": ns.steps, "skip": ns.skip, "world": ns.world}
    with tempfile.TemporaryDirectory(prefix="bench-dist-") as d:
        tmp = Path(d)
        tps1 = _run("ddp", 1, ns, tmp)
        report["one_rank_tokens_per_s"] = tps1
        for strat in strategies:
            tpsn = _run(strat, ns.world, ns, tmp)
            report[f"{strat}_tokens_per_s"] = tpsn
            report[f"{strat}_scaling_efficiency"] = tpsn / (ns.world * tps1)
    report.update(comm_bytes(ns.world, ns.grad_accum))
    text = json.dumps(report, indent=2)
    print(text)
    if ns.json:
        ns.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
