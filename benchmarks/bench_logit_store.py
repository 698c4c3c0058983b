"""Figures of the teacher top-k logit store (:mod:`minitron.io.logit_store`): size and distortion per encoding.

1. **Size**: stored bytes per token at k=64 and k=128 for a 128256-token vocabulary (17-bit indices), per value
   encoding: the format's arithmetic and the bytes of an actual shard file (safetensors header included), against
   DistillKit's published ~300 bytes per token at k=128.
2. **Distortion**: per token, ``KL(exact top-k teacher || decoded top-k teacher)``, both in the two forms the
   sparse KL ops use: ``tail`` (the k entries plus one bucket for the remaining mass, an exact distribution on
   k+1 buckets) and ``renorm`` (the k entries renormalised). Exact = the fp64 log-softmax's top-k. Two sources:

   - ``random``: V=128256 logits ``sigma * randn`` with ``sigma`` uniform in [2, 5] per token (entropies from
     about 1 to 10 nats);
   - ``tiny-lm``: a small Llama (0.9M parameters) trained here for a few minutes on WikiText-2 valid (byte-level BPE vocabulary
     4096), its next-token distributions on WikiText-2 test text.

3. **Throughput**: encode+pack and unpack+decode of one training batch (8 x 2048 tokens, k=64, V=128256).

Writes a JSON record to ``.bench-out/results/logit_store.json`` (and prints a summary). Run from the repo root:
``python -m benchmarks.bench_logit_store [--quick]``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List

import torch

from benchmarks.paths import REPO_ROOT, SCRATCH_DIR

log = logging.getLogger("bench_logit_store")

VOCAB = 128256
KS = (64, 128)
DISTILLKIT_BYTES_PER_TOKEN_K128 = 300
DATA = REPO_ROOT / "data"  # WikiText-2 as shipped in the checkout


def size_figures(n_seq: int = 2, seq_len: int = 1024) -> List[Dict[str, Any]]:
    """Arithmetic and measured (one shard file) bytes per token for each k and encoding at V=128256."""
    from safetensors.torch import save

    from minitron.io.logit_store import VALUE_ENCODINGS, _encode_shard, bytes_per_token, index_bits

    rows = []
    g = torch.Generator().manual_seed(0)
    bits = index_bits(VOCAB)
    for k in KS:
        logits = torch.randn(n_seq * seq_len, 4096, generator=g) * 3  # values only matter for the u8 range
        lp = torch.log_softmax(logits, -1).topk(k).values.reshape(n_seq, seq_len, k)
        idx = torch.randint(0, VOCAB, (n_seq, seq_len, k), generator=g)
        for enc in VALUE_ENCODINGS:
            blob = save(_encode_shard(idx, lp, bits, enc), metadata={"minitron": "{}"})
            rows.append({"k": k, "vocab_size": VOCAB, "index_bits": bits, "value_encoding": enc,
                         "bytes_per_token": bytes_per_token(k, VOCAB, enc),
                         "measured_bytes_per_token": round(len(blob) / (n_seq * seq_len), 2),
                         "vs_distillkit_k128_300B": round(bytes_per_token(k, VOCAB, enc) / DISTILLKIT_BYTES_PER_TOKEN_K128, 3)})
    return rows


def _kl_terms(exact: torch.Tensor, decoded: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Per-token KL(exact || decoded) in the tail (k+1 buckets) and renormalised forms; fp64 inputs [N, k]."""
    e, d = exact.double(), decoded.double()
    p, q = e.exp(), d.exp()
    pt = (1 - p.sum(-1)).clamp_min(0)
    qt = (1 - q.sum(-1)).clamp_min(1e-300)
    body = torch.where(p > 0, p * (e - d), torch.zeros_like(p)).sum(-1)
    tail = torch.where(pt > 0, pt * (torch.log(pt.clamp_min(1e-300)) - torch.log(qt)), torch.zeros_like(pt))
    le, ld = torch.log_softmax(e, -1), torch.log_softmax(d, -1)
    pr = le.exp()
    renorm = torch.where(pr > 0, pr * (le - ld), torch.zeros_like(pr)).sum(-1)
    return {"tail": body + tail, "renorm": renorm, "mass": p.sum(-1)}


def distortion(chunks: Iterable[torch.Tensor], ks=KS) -> Dict[str, Any]:
    """Mean / max per-token KL for each k and encoding over logits chunks ``[n, V]`` (any float dtype)."""
    from minitron.io.logit_store import VALUE_ENCODINGS, decode_values, encode_values

    acc: Dict[str, Dict[str, List[torch.Tensor]]] = {}
    ent: List[torch.Tensor] = []
    mass: Dict[int, List[torch.Tensor]] = {k: [] for k in ks}
    for logits in chunks:
        lsm = torch.log_softmax(logits.double(), -1)
        ent.append(-(lsm.exp() * lsm).sum(-1))
        for k in ks:
            exact = lsm.topk(k, dim=-1).values
            fp32 = exact.float()
            for enc in VALUE_ENCODINGS:
                dec = decode_values(encode_values(fp32, enc), enc)
                terms = _kl_terms(exact, dec)
                slot = acc.setdefault(f"k{k}/{enc}", {"tail": [], "renorm": [], "abs_err": []})
                slot["tail"].append(terms["tail"])
                slot["renorm"].append(terms["renorm"])
                slot["abs_err"].append((dec.double() - exact).abs().amax(-1))
            mass[k].append(exact.exp().sum(-1))
        del lsm
    out: Dict[str, Any] = {"tokens": int(torch.cat(ent).numel()),
                           "entropy_nats_mean": round(float(torch.cat(ent).mean()), 3),
                           "entropy_nats_p10_p90": [round(float(x), 3) for x in
                                                    torch.quantile(torch.cat(ent).float(), torch.tensor([0.1, 0.9]))],
                           "topk_mass_mean": {str(k): round(float(torch.cat(mass[k]).mean()), 4) for k in ks},
                           "encodings": {}}
    for key, slot in acc.items():
        t, r, a = torch.cat(slot["tail"]), torch.cat(slot["renorm"]), torch.cat(slot["abs_err"])
        out["encodings"][key] = {"kl_tail_mean": float(t.mean()), "kl_tail_max": float(t.max()),
                                 "kl_renorm_mean": float(r.mean()), "kl_renorm_max": float(r.max()),
                                 "max_abs_logprob_err": float(a.max())}
    return out


def random_chunks(tokens: int, vocab: int = VOCAB, chunk: int = 128, seed: int = 0) -> Iterable[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    for s in range(0, tokens, chunk):
        n = min(chunk, tokens - s)
        sigma = 2 + 3 * torch.rand(n, 1, generator=g)
        yield torch.randn(n, vocab, generator=g) * sigma


def tiny_lm_chunks(steps: int, eval_tokens: int, seed: int = 0) -> tuple[Iterable[torch.Tensor], Dict[str, Any]]:
    """Train a small Llama on WikiText-2 valid; yield its logits on WikiText-2 test text."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from minitron.io.data import load_packed
    from minitron.io.tokenizer import train_bpe_tokenizer

    t0 = time.time()
    valid, test = DATA / "wikitext-2" / "valid.txt", DATA / "wikitext-2" / "test.txt"
    tok = train_bpe_tokenizer([valid], vocab_size=4096)
    seq = 128
    train_data = load_packed(valid, tok, seq_len=seq, max_tokens=steps * 16 * seq)
    eval_data = load_packed(test, tok, seq_len=seq, max_tokens=eval_tokens + seq)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    stream = train_data.stream(16, seed=seed)
    model.train()
    loss = float("nan")
    for step in range(steps):
        b = next(stream)
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["input_ids"])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss = float(out.loss.detach())
        if step % 50 == 0:
            log.info("tiny LM step %d loss %.3f", step, loss)
    model.eval()
    info = {"vocab_size": len(tok), "train_steps": steps, "final_train_loss": round(loss, 3),
            "params": sum(p.numel() for p in model.parameters()), "train_s": round(time.time() - t0, 1)}

    def gen():
        with torch.no_grad():
            done = 0
            for i in range(len(eval_data)):
                if done >= eval_tokens:
                    break
                b = eval_data.select([i])
                logits = model(**b).logits[0]
                yield logits
                done += logits.shape[0]

    return gen(), info


def throughput(batch: int = 8, seq_len: int = 2048, k: int = 64, repeats: int = 3) -> Dict[str, Any]:
    from minitron.io.logit_store import (VALUE_ENCODINGS, decode_values, encode_values, index_bits, pack_bits,
                                         unpack_bits)

    g = torch.Generator().manual_seed(0)
    n = batch * seq_len
    idx = torch.randint(0, VOCAB, (batch, seq_len * k), generator=g)
    lp = torch.log_softmax(torch.randn(n, 1024, generator=g) * 3, -1).topk(k).values
    bits = index_bits(VOCAB)
    out: Dict[str, Any] = {"batch": batch, "seq_len": seq_len, "k": k, "threads": torch.get_num_threads()}

    def best(fn):
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return min(ts)

    packed = pack_bits(idx, bits)
    out["pack_s"] = round(best(lambda: pack_bits(idx, bits)), 4)
    out["unpack_s"] = round(best(lambda: unpack_bits(packed, bits, seq_len * k)), 4)
    for enc in VALUE_ENCODINGS:
        e = encode_values(lp, enc)
        out[f"encode_{enc}_s"] = round(best(lambda: encode_values(lp, enc)), 4)
        out[f"decode_{enc}_s"] = round(best(lambda: decode_values(e, enc)), 4)
    return out


def main(argv=None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer tokens and training steps")
    p.add_argument("--out", default=str(SCRATCH_DIR / "logit_store.json"))
    p.add_argument("--lm-steps", type=int, default=None, help="training steps of the tiny LM (default 200, quick 40)")
    p.add_argument("--random-tokens", type=int, default=None, help="tokens of random logits (default 1024, quick 256)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    t0 = time.time()
    record: Dict[str, Any] = {"bench": "logit_store", "quick": args.quick,
                              "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        from benchmarks.machine import git_commit

        record["commit"] = git_commit()
    except Exception:  # pragma: no cover
        pass
    record["size"] = size_figures()
    log.info("size done (%.0fs)", time.time() - t0)
    record["distortion_random"] = distortion(random_chunks(args.random_tokens or (256 if args.quick else 1024)))
    log.info("random distortion done (%.0fs)", time.time() - t0)
    chunks, info = tiny_lm_chunks(steps=args.lm_steps or (40 if args.quick else 200),
                                  eval_tokens=1024 if args.quick else 4096)
    record["distortion_tiny_lm"] = distortion(chunks)
    record["distortion_tiny_lm"]["model"] = info
    log.info("tiny-LM distortion done (%.0fs)", time.time() - t0)
    record["throughput"] = throughput(repeats=1 if args.quick else 3)
    record["elapsed_s"] = round(time.time() - t0, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(summary(record))
    print(f"record: {out}")
    return record


def summary(r: Dict[str, Any]) -> str:
    lines = ["| k | encoding | bytes/token (format) | bytes/token (shard file) | vs DistillKit ~300 B (k=128) |",
             "| --- | --- | --- | --- | --- |"]
    for s in r["size"]:
        lines.append(f"| {s['k']} | {s['value_encoding']} | {s['bytes_per_token']:.1f} | "
                     f"{s['measured_bytes_per_token']:.1f} | {s['vs_distillkit_k128_300B']:.2f}x |")
    for src in ("distortion_random", "distortion_tiny_lm"):
        d = r[src]
        lines.append("")
        lines.append(f"{src}: {d['tokens']} tokens, entropy mean {d['entropy_nats_mean']} nats "
                     f"(p10-p90 {d['entropy_nats_p10_p90']}), top-k mass {d['topk_mass_mean']}")
        lines.append("| k/encoding | mean KL tail | max KL tail | mean KL renorm | max abs logprob err |")
        lines.append("| --- | --- | --- | --- | --- |")
        for key, e in d["encodings"].items():
            lines.append(f"| {key} | {e['kl_tail_mean']:.2e} | {e['kl_tail_max']:.2e} | {e['kl_renorm_mean']:.2e} | "
                         f"{e['max_abs_logprob_err']:.2e} |")
    lines.append("")
    lines.append(f"throughput: {r['throughput']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
