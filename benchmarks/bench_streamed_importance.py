"""Throughput of layer-streamed importance vs in-memory importance, and vs the machine's fp32 matmul rate.

Writes a random-weight bf16 Llama-shaped checkpoint (default hidden 2048, MLP 5632, 16 heads / 4 KV heads,
4 layers, vocabulary 8192) to a temporary directory, then times on the same calibration batches
(block-influence depth metric, no LM-loss pass):

* ``streamed-fp32``: :func:`minitron.compress.streaming.estimate_importance_streaming` (``compute_dtype``
  fp32; the bf16 shards are read memory-mapped, one layer at a time);
* ``in-memory-fp32``: :func:`minitron.compress.importance.estimate_importance` on the model loaded in fp32;
* ``streamed-bf16`` / ``in-memory-bf16`` (``--bf16``): the same computing in bf16 (the path the issue
  measured at ~20 GFLOP/s on a CPU without bf16 units; fast on CPUs with AMX-BF16), as a fraction of the
  bf16 matmul rate.

and the machine's fp32 GEMM rate (``torch.mm`` on ``[seq, hidden] x [hidden, mlp]``, best of 5) in the same
run, sampled before every timed run and at the end; the best sample is the reference (a shared machine's
busy moments lower single samples). Reported per provider: seconds, tokens/s per layer (``tokens * layers / seconds``), the
GFLOP/s of the decoder layers' linear layers (``2 * tokens * linear weights``; attention score FLOPs are
left out, so the figure is a lower bound) and that rate as a fraction of the measured matmul rate.

Usage::

    python benchmarks/bench_streamed_importance.py [--layers 4] [--hidden 2048] [--tokens 1024] [--seq 256]
        [--threads N] [--bf16] [--lm-loss] [--memory] [--ranks 2] [--json results.json]

``--memory`` adds the peak anonymous memory (sampled every 5 ms, above the level after the imports) and the peak
resident file pages of streamed and in-memory fp32 importance, each in a fresh process.

``--model PATH_OR_NAME`` times a real checkpoint instead of random weights (a local checkpoint directory, or a
catalogue name of ``minitron fetch`` such as ``smollm2-135m``, fetched or taken from the cache): its own shape
(``--hidden`` etc. are ignored) and real text as calibration data (``--data``, default WikiText-2 test, packed
with the checkpoint's tokenizer). Example (the figures in ``docs/study.md``)::

    python benchmarks/bench_streamed_importance.py --model smollm2-135m --tokens 2048 --seq 512 --threads 2 \
        --bf16 --repeats 2 --json docs/study-smollm2/bench_importance.json

``--ranks N`` adds the torch.distributed figure (issue 12): in-memory importance on 1 and N gloo processes
with one thread each (the batches sharded over the ranks), the speedup and scaling efficiency, and the
bytes each rank all-reduces (once per run, computed from the shapes).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a file: make `minitron` importable from the checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch


def matmul_gflops(m: int, k: int, n: int, *, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Best-of-``repeats`` ``torch.mm`` rate for ``[m, k] x [k, n]`` in ``dtype``, in GFLOP/s."""
    a = torch.randn(m, k).to(dtype)
    b = torch.randn(k, n).to(dtype)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2.0 * m * k * n / best / 1e9


def write_checkpoint(path: Path, *, hidden: int, mlp: int, heads: int, kv_heads: int, layers: int, vocab: int) -> int:
    """A random bf16 Llama checkpoint (sharded at 200 MB); returns the number of linear weights per layer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(str(path), max_shard_size="200MB")
    layer = model.model.layers[0]
    linear = sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
    del model
    return linear


def _rank_worker(rank: int, world: int, tmp: str, ckpt: str, n_batches: int, seq: int, vocab: int) -> None:
    """One rank of the ``--ranks`` measurement: in-memory importance on this rank's share of the batches."""
    from datetime import timedelta

    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from minitron.compress.importance import estimate_importance

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous-{world}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    try:
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
        g = torch.Generator().manual_seed(0)
        batches = [{"input_ids": torch.randint(0, vocab, (1, seq), generator=g)} for _ in range(n_batches)]
        kw = dict(layer_metrics=("block_influence",), progress=False)
        estimate_importance(model, batches[:world], **kw)  # warm-up (one batch per rank)
        dist.barrier()
        t = time.perf_counter()
        estimate_importance(model, batches, **kw)
        dist.barrier()
        if rank == 0:
            Path(tmp, f"time-{world}").write_text(str(time.perf_counter() - t))
    finally:
        dist.destroy_process_group()


def rank_scaling(ckpt: Path, tmp: str, ranks: int, n_batches: int, seq: int, vocab: int) -> dict:
    """Seconds of in-memory importance on 1 and ``ranks`` gloo processes (one thread each), and the efficiency."""
    ctx = torch.multiprocessing.get_context("spawn")
    out = {}
    for world in (1, ranks):
        procs = [ctx.Process(target=_rank_worker, args=(r, world, tmp, str(ckpt), n_batches, seq, vocab))
                 for r in range(world)]
        for pr in procs:
            pr.start()
        for pr in procs:
            pr.join()
        if any(pr.exitcode != 0 for pr in procs):
            raise RuntimeError(f"a rank of the {world}-process run failed: exit codes {[pr.exitcode for pr in procs]}")
        out[world] = float(Path(tmp, f"time-{world}").read_text())
    speedup = out[1] / out[ranks]
    return {"seconds": out, "speedup": speedup, "efficiency": speedup / ranks}


def allreduce_bytes(hidden: int, mlp: int, heads: int, layers: int) -> int:
    """Bytes each rank all-reduces once per run: fp32 [2, units] states + int64 [2] counts of every
    accumulator, the float64 block-influence sums and int64 [2, layers] counts, the 3 int64 totals."""
    acc = lambda units: 2 * units * 4 + 2 * 8  # noqa: E731
    return (layers * (acc(heads) + acc(mlp)) + (2 * layers + 1) * acc(hidden)
            + layers * 8 + 2 * layers * 8 + 3 * 8)


_MEMORY_CHILD = """
import sys, threading, time, torch
torch.set_num_threads(1)
from pathlib import Path
mode, ckpt, n, seq, vocab = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
peak = {"RssAnon": 0, "RssFile": 0}
stop = False
def status():
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in peak:
            out[k] = int(v.split()[0]) * 1024
    return out
def sample():
    while not stop:
        for k, v in status().items():
            peak[k] = max(peak[k], v)
        time.sleep(0.005)
from transformers import AutoModelForCausalLM, LlamaForCausalLM
from minitron.compress.importance import estimate_importance
from minitron.compress.streaming import estimate_importance_streaming
g = torch.Generator().manual_seed(0)
batches = [{"input_ids": torch.randint(0, vocab, (1, seq), generator=g)} for _ in range(n)]
kw = dict(layer_metrics=("block_influence",), progress=False)
base = status()  # after the imports: the figures are what the run itself allocates
th = threading.Thread(target=sample, daemon=True); th.start()
if mode == "streamed":
    estimate_importance_streaming(ckpt, batches, **kw)
else:
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    estimate_importance(model, batches, **kw)
stop = True; th.join()
print("PEAK", peak["RssAnon"] - base["RssAnon"], peak["RssFile"])
"""


def peak_memory(ckpt: Path, n_batches: int, seq: int, vocab: int) -> dict:
    """Peak anonymous memory (above the level after the imports, sampled every 5 ms) and peak resident file pages
    of streamed vs in-memory fp32 importance, each in a fresh process."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    out = {}
    for mode in ("streamed", "in-memory"):
        proc = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, mode, str(ckpt), str(n_batches), str(seq),
                               str(vocab)], capture_output=True, text=True, env=env, cwd=root)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("PEAK ")]
        if proc.returncode != 0 or not line:
            raise RuntimeError(f"memory measurement of {mode} failed: {proc.stderr[-2000:]}")
        anon, file = (int(v) for v in line[0].split()[1:])
        out[mode] = {"peak_anon_bytes": anon, "peak_file_bytes": file}
    return out


def model_layer_linear(model: torch.nn.Module) -> int:
    """Weights of the linear layers of one decoder layer (the first) of a loaded causal LM."""
    from minitron.models import get_adapter

    layer = list(get_adapter(model).layers(model))[0]
    return sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))


def real_checkpoint(name: str) -> Path:
    """A local checkpoint directory as given, else :func:`minitron.api.fetch` of the catalogue name."""
    p = Path(name).expanduser()
    if p.is_dir():
        return p
    from minitron.api import fetch

    return Path(fetch(name))


def real_batches(ckpt: Path, data: Path | None, tokens: int, seq: int) -> list:
    """``tokens // seq`` batches of one ``seq``-token sequence of real text, packed with the checkpoint's
    tokenizer (default text: the shipped WikiText-2 test)."""
    from transformers import AutoTokenizer

    from minitron.io.data import load_packed

    if data is None:
        from benchmarks.study.experiment import resolve_data_path

        data = resolve_data_path("wikitext-2/test.txt")
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    packed = load_packed(str(data), tok, seq_len=seq, max_tokens=tokens)
    if len(packed) < max(1, tokens // seq):
        raise ValueError(f"{data} holds only {len(packed)} sequences of {seq} tokens; lower --tokens")
    return [{"input_ids": packed.input_ids[i: i + 1]} for i in range(max(1, tokens // seq))]


def cases(cfg: object) -> list:
    """No harness cases: this is a standalone script (``python benchmarks/bench_streamed_importance.py``),
    discovered by ``python -m benchmarks`` only to be skipped quietly."""
    return []


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--mlp", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--tokens", type=int, default=1024, help="calibration tokens in all (multiple of --seq)")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: stable figures on a shared machine; GEMM is measured with the same)")
    ap.add_argument("--bf16", action="store_true", help="also time the in-memory path computing in bf16")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed rounds over the providers, after one warm-up round (the best time is reported)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    ap.add_argument("--lm-loss", action="store_true",
                    help="also time both fp32 paths with the LM-loss-drop depth metric (seconds only)")
    ap.add_argument("--memory", action="store_true",
                    help="also measure peak anonymous memory of streamed vs in-memory importance (fresh processes)")
    ap.add_argument("--model", default=None,
                    help="a real checkpoint (local directory or catalogue name, e.g. smollm2-135m) instead of random "
                         "weights; its shape replaces --hidden/--mlp/--heads/--kv-heads/--layers/--vocab")
    ap.add_argument("--max-layers", type=int, default=None,
                    help="with --model: time only its first N decoder layers (a truncated fp32 copy in a temporary "
                         "directory; the per-layer figures are unchanged, the run shorter)")
    ap.add_argument("--data", type=Path, default=None,
                    help="calibration text of --model (default: the shipped WikiText-2 test)")
    ap.add_argument("--ranks", type=int, default=0,
                    help="also time in-memory importance on 1 and RANKS gloo processes (one thread each)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from minitron.compress.importance import estimate_importance
    from minitron.compress.streaming import estimate_importance_streaming

    n_batches = max(1, args.tokens // args.seq)
    real_ckpt = real_checkpoint(args.model) if args.model else None
    if real_ckpt is not None:
        from transformers import AutoConfig

        c = AutoConfig.from_pretrained(str(real_ckpt))
        args.hidden, args.mlp, args.heads = c.hidden_size, c.intermediate_size, c.num_attention_heads
        args.kv_heads, args.layers, args.vocab = c.num_key_value_heads, c.num_hidden_layers, c.vocab_size
        batches = real_batches(real_ckpt, args.data, n_batches * args.seq, args.seq)
    else:
        g = torch.Generator().manual_seed(0)
        batches = [{"input_ids": torch.randint(0, args.vocab, (1, args.seq), generator=g)} for _ in range(n_batches)]
    tokens = n_batches * args.seq
    kw = dict(layer_metrics=("block_influence",), progress=False)
    results: dict = {"shape": {k: getattr(args, k) for k in ("hidden", "mlp", "heads", "kv_heads", "layers", "vocab")},
                     "tokens": tokens, "threads": args.threads, "providers": {}}
    if real_ckpt is not None:
        results["model"] = {"name": args.model, "checkpoint": str(real_ckpt),
                            "data": str(args.data) if args.data else "WikiText-2 test (shipped)"}
    with tempfile.TemporaryDirectory(prefix="minitron-bench-stream-") as tmp:
        if real_ckpt is not None:
            ckpt = real_ckpt
            probe = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)
            linear = model_layer_linear(probe)
            if args.max_layers is not None and args.max_layers < args.layers:
                from minitron.models import get_adapter

                keep = list(get_adapter(probe).layers(probe))[: args.max_layers]
                probe.model.layers = torch.nn.ModuleList(keep)
                probe.config.num_hidden_layers = args.max_layers
                ckpt = Path(tmp) / "ckpt"
                probe.save_pretrained(str(ckpt))
                args.layers = args.max_layers
                results["shape"]["layers"] = args.max_layers
                results["model"]["layers_timed"] = f"the first {args.max_layers} of {c.num_hidden_layers}"
            del probe
        else:
            ckpt = Path(tmp) / "ckpt"
            linear = write_checkpoint(ckpt, hidden=args.hidden, mlp=args.mlp, heads=args.heads,
                                      kv_heads=args.kv_heads, layers=args.layers, vocab=args.vocab)
        flops = 2.0 * tokens * linear * args.layers
        # the machine's GEMM rate (the shape of one batch's MLP), sampled before every timed run and at the
        # end: the best sample is the reference (on a shared machine a single sample may catch a busy moment)
        rates = {torch.float32: [], torch.bfloat16: []}

        def sample_rates() -> None:
            rates[torch.float32].append(matmul_gflops(args.seq, args.hidden, args.mlp))
            if args.bf16:
                rates[torch.bfloat16].append(matmul_gflops(args.seq, args.hidden, args.mlp, dtype=torch.bfloat16))

        sample_rates()
        mm = max(rates[torch.float32])
        results["matmul_fp32_gflops"] = mm
        results["layer_linear_gflop"] = flops / 1e9

        providers = {"streamed-fp32": lambda: estimate_importance_streaming(ckpt, batches, **kw)}
        models = {"fp32": AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()}
        providers["in-memory-fp32"] = lambda: estimate_importance(models["fp32"], batches, **kw)
        if args.bf16:
            providers["streamed-bf16"] = lambda: estimate_importance_streaming(ckpt, batches,
                                                                               compute_dtype=torch.bfloat16, **kw)
            models["bf16"] = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.bfloat16).eval()
            providers["in-memory-bf16"] = lambda: estimate_importance(models["bf16"], batches, **kw)
        # round robin (one untimed warm-up round first), so that a busy spell of a shared machine does not
        # land on one provider only; the best time of each is reported
        best = {name: float("inf") for name in providers}
        for round_ in range(args.repeats + 1):
            for name, fn in providers.items():
                sample_rates()
                t = time.perf_counter()
                fn()
                if round_:
                    best[name] = min(best[name], time.perf_counter() - t)
        models.clear()
        for name, secs in best.items():
            rate = flops / secs / 1e9
            results["providers"][name] = {"seconds": secs, "tokens_per_s_per_layer": tokens * args.layers / secs,
                                          "gflops": rate}
        if args.lm_loss:
            kw_loss = dict(layer_metrics=("block_influence", "lm_loss"), progress=False)
            t = time.perf_counter()
            estimate_importance_streaming(ckpt, batches, **kw_loss)
            t_stream = time.perf_counter() - t
            model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
            t = time.perf_counter()
            estimate_importance(model, batches, **kw_loss)
            t_mem = time.perf_counter() - t
            del model
            results["lm_loss_seconds"] = {"streamed-fp32": t_stream, "in-memory-fp32": t_mem}
        if args.memory:
            results["memory"] = peak_memory(ckpt, n_batches, args.seq, args.vocab)
            results["checkpoint_bytes"] = sum(f.stat().st_size for f in Path(ckpt).glob("*.safetensors"))
        if args.ranks > 1:
            results["ranks"] = rank_scaling(ckpt, tmp, args.ranks, n_batches, args.seq, args.vocab)
            results["ranks"]["allreduce_bytes_per_rank"] = allreduce_bytes(args.hidden, args.mlp, args.heads,
                                                                           args.layers)
        # the GEMM rate again after the runs (the machine may be shared): the best of both measurements
        sample_rates()
        mm = max(rates[torch.float32])
        results["matmul_fp32_gflops"] = mm
        results["matmul_fp32_samples"] = rates[torch.float32]
        mm_bf16 = max(rates[torch.bfloat16]) if args.bf16 else None
        results["matmul_bf16_samples"] = rates[torch.bfloat16]
        results["matmul_bf16_gflops"] = mm_bf16
        for name, r in results["providers"].items():
            ref = mm_bf16 if name.endswith("bf16") else mm
            r["fraction_of_matmul"] = r["gflops"] / ref

    if "model" in results:
        print(f"model {results['model']['name']} ({results['model']['checkpoint']}), real text")
    print(f"shape {results['shape']}, {tokens} tokens ({n_batches} x {args.seq}), {args.threads} thread(s)")
    print(f"fp32 matmul: {mm:.1f} GFLOP/s" + (f", bf16 matmul: {mm_bf16:.1f} GFLOP/s" if mm_bf16 else "")
          + f"; decoder linear work {flops / 1e9:.1f} GFLOP (bf16 providers: fraction of the bf16 matmul rate)")
    print(f"{'provider':<16} {'seconds':>8} {'tok/s/layer':>12} {'GFLOP/s':>8} {'of matmul':>10}")
    for name, r in results["providers"].items():
        print(f"{name:<16} {r['seconds']:8.2f} {r['tokens_per_s_per_layer']:12.0f} {r['gflops']:8.1f} "
              f"{r['fraction_of_matmul']:10.0%}")
    if "lm_loss_seconds" in results:
        r = results["lm_loss_seconds"]
        print(f"with the LM-loss-drop metric: streamed-fp32 {r['streamed-fp32']:.2f} s (L(L+1)/2 layer passes per "
              f"batch), in-memory-fp32 {r['in-memory-fp32']:.2f} s (L(L+1) layer passes per batch)")
    if "memory" in results:
        mib = 2 ** 20
        print(f"peak memory (checkpoint {results['checkpoint_bytes'] / mib:.0f} MiB on disk, bf16): "
              + "; ".join(f"{m}: anonymous +{v['peak_anon_bytes'] / mib:.0f} MiB, resident file pages "
                          f"{v['peak_file_bytes'] / mib:.0f} MiB" for m, v in results["memory"].items()))
    if "ranks" in results:
        r = results["ranks"]
        print(f"in-memory importance on 1 vs {args.ranks} processes (1 thread each): "
              + ", ".join(f"{w}: {t:.2f} s" for w, t in r["seconds"].items())
              + f"; speedup {r['speedup']:.2f}, efficiency {r['efficiency']:.0%}; all-reduced once per run: "
              f"{r['allreduce_bytes_per_rank']} bytes per rank")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
