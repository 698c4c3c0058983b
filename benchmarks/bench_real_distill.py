"""Distillation throughput on a real teacher: fused-linear KL versus materialised logits, tokens/s and peak memory.

One distillation step = teacher forward (no grad) + student forward and backward + AdamW step, on ``--batch`` x
``--seq`` tokens of real text (WikiText-2 valid, packed with the teacher's tokenizer). The teacher is a real
checkpoint (default ``smollm2-135m``, fetched or taken from the cache; or a local checkpoint directory); the
student is the study's width student of it (SmolLM2: hidden 384, MLP 1024, 6 heads, 2 KV heads; other models: the
study's half-size width targets), pruned with weight-magnitude importance (the kept units do not change the
cost). The loss, three ways:

* ``fused``: :func:`minitron.ops.fused_linear_kl_div` on the final hidden states and the two LM heads (the path
  :func:`minitron.train.distill_model` takes; the [tokens, vocabulary] logits are never held);
* ``materialised``: both logits computed (``F.linear``), then :func:`minitron.ops.kl_div`;
* ``torch``: both logits, then ``log_softmax`` twice and ``F.kl_div(log_target=True)`` (plain torch).

Each provider runs in a fresh process (``--only``), so its peak anonymous memory (sampled every 5 ms, above the
level after the models and data are loaded) is its own: the figures include the optimizer state created at the
first step, the same for all three. Reported: median seconds per step over ``--steps`` timed steps after one
warm-up step, tokens/s, peak memory.

Usage::

    python -m benchmarks.bench_real_distill [--model smollm2-135m] [--seq 512] [--batch 1] [--steps 3]
        [--threads 2] [--json docs/study-smollm2/bench_distill.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

if __name__ == "__main__" and not __package__:  # run as a file: make `minitron` importable from the checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F

PROVIDERS = ("fused", "materialised", "torch")


def _rss() -> Dict[str, int]:
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("RssAnon", "RssFile"):
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


class _PeakSampler:
    """Peak RssAnon while active (every 5 ms), in a daemon thread."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, _rss().get("RssAnon", 0))
            time.sleep(0.005)

    def __enter__(self) -> "_PeakSampler":
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop = True
        self._t.join()


def load_pair(model: str) -> Any:
    """``(teacher, student, tokenizer, checkpoint path)``: the real teacher (fp32) and its width student."""
    from minitron.compress.prune import prune_width

    from benchmarks.study.experiment import REAL_WIDTH, _load_real_teacher, weight_magnitude_scores, width_targets

    teacher, tok, src = _load_real_teacher(model)
    teacher.eval()
    shape = dict(REAL_WIDTH) if model == "smollm2-135m" else width_targets(teacher.config, 0.5, 0.75)
    student = prune_width(copy.deepcopy(teacher), weight_magnitude_scores(teacher), **shape)
    student.train()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher, student, tok, src, shape


def step_fn(provider: str, teacher: torch.nn.Module, student: torch.nn.Module, opt: torch.optim.Optimizer,
            backend: str) -> Any:
    from minitron.ops import fused_linear_kl_div, kl_div
    from minitron.train.distill import final_hidden_and_head

    def step(batch: Dict[str, torch.Tensor]) -> float:
        mask = batch["attention_mask"] != 0
        with torch.no_grad():
            th, tw, _ = final_hidden_and_head(teacher, batch)
        sh, sw, _ = final_hidden_and_head(student, batch)
        if provider == "fused":
            loss = fused_linear_kl_div(sh, sw, th, tw, reduction="mean", mask=mask, backend=backend)
        else:
            zs = F.linear(sh, sw).reshape(-1, sw.shape[0])
            with torch.no_grad():
                zt = F.linear(th, tw).reshape(-1, tw.shape[0])
            m = mask.reshape(-1)
            if provider == "materialised":
                loss = kl_div(zs, zt, reduction="mean", mask=m, backend=backend)
            else:
                per_tok = F.kl_div(F.log_softmax(zs, -1), F.log_softmax(zt, -1), log_target=True,
                                   reduction="none").sum(-1)
                loss = (per_tok * m).sum() / m.sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def run_one(provider: str, args: argparse.Namespace) -> Dict[str, Any]:
    """Time one provider in this process."""
    from minitron.io.data import load_packed

    from benchmarks.study.experiment import non_embedding_parameters, resolve_data_path, total_parameters

    torch.set_num_threads(args.threads)
    teacher, student, tok, src, shape = load_pair(args.model)
    data = Path(args.data) if args.data else resolve_data_path("wikitext-2/valid.txt")
    n = args.batch * (args.steps + 1)
    packed = load_packed(str(data), tok, seq_len=args.seq, max_tokens=n * args.seq)
    batches = [packed.select(torch.arange(i, i + args.batch)) for i in range(0, n, args.batch)]
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    step = step_fn(provider, teacher, student, opt, args.backend)
    base = _rss().get("RssAnon", 0)
    times: List[float] = []
    losses: List[float] = []
    with _PeakSampler() as peak:
        for i, b in enumerate(batches):
            t = time.perf_counter()
            losses.append(step(b))
            if i:  # the first step is the warm-up (and creates the optimizer state)
                times.append(time.perf_counter() - t)
    sec = statistics.median(times)
    tokens = args.batch * args.seq
    return {
        "provider": provider, "seconds_per_step": sec, "step_seconds": times, "tokens_per_step": tokens,
        "tokens_per_s": tokens / sec, "peak_anon_bytes_above_loaded": max(0, peak.peak - base), "losses": losses,
        "teacher": {"checkpoint": str(src), "parameters": total_parameters(teacher),
                    "non_embedding_parameters": non_embedding_parameters(teacher)},
        "student": {"shape": shape, "parameters": total_parameters(student),
                    "non_embedding_parameters": non_embedding_parameters(student)},
        "vocab_size": int(teacher.config.vocab_size),
    }


def cases(cfg: object) -> list:
    """No harness cases: a standalone script (``python -m benchmarks.bench_real_distill``)."""
    return []


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="teacher: catalogue name or local checkpoint directory")
    ap.add_argument("--data", default=None, help="text file (default: the shipped WikiText-2 valid)")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per provider (after one warm-up step)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", default="auto", help="kernel backend of the minitron ops")
    ap.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma-separated subset of {PROVIDERS}")
    ap.add_argument("--only", default=None, choices=PROVIDERS, help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    return ap


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.only:
        res = run_one(args.only, args)
        print("RESULT " + json.dumps(res))
        return res
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    for p in providers:
        if p not in PROVIDERS:
            raise SystemExit(f"unknown provider {p!r}; choose from {PROVIDERS}")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    passthrough = ["--model", args.model, "--seq", str(args.seq), "--batch", str(args.batch), "--steps",
                   str(args.steps), "--threads", str(args.threads), "--backend", args.backend]
    if args.data:
        passthrough += ["--data", args.data]
    out: Dict[str, Any] = {"model": args.model, "seq": args.seq, "batch": args.batch, "steps": args.steps,
                           "threads": args.threads, "backend": args.backend, "cpus": os.cpu_count(),
                           "torch": torch.__version__,
                           "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                           "providers": {}}
    for p in providers:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_real_distill", "--only", p] + passthrough,
                              capture_output=True, text=True, env=env, cwd=root)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            raise RuntimeError(f"provider {p} failed: {proc.stderr[-3000:]}")
        r = json.loads(line[-1][len("RESULT "):])
        for k in ("teacher", "student", "vocab_size", "tokens_per_step"):
            out.setdefault(k, r.pop(k))
            r.pop(k, None)
        out["providers"][p] = r
    out["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    if "fused" in out["providers"]:
        f = out["providers"]["fused"]
        for p, r in out["providers"].items():
            r["speed_vs_fused"] = r["tokens_per_s"] / f["tokens_per_s"]
            r["memory_vs_fused"] = (r["peak_anon_bytes_above_loaded"] / f["peak_anon_bytes_above_loaded"]
                                    if f["peak_anon_bytes_above_loaded"] else None)
    mib = 2 ** 20
    print(f"teacher {args.model} ({out['teacher']['parameters']:,} params), student {out['student']['shape']} "
          f"({out['student']['parameters']:,} params), vocabulary {out['vocab_size']}, {args.batch} x {args.seq} "
          f"tokens per step, {args.threads} thread(s)")
    print(f"{'provider':<14} {'s/step':>8} {'tokens/s':>9} {'peak MiB':>9}")
    for p, r in out["providers"].items():
        print(f"{p:<14} {r['seconds_per_step']:8.2f} {r['tokens_per_s']:9.1f} "
              f"{r['peak_anon_bytes_above_loaded'] / mib:9.0f}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
