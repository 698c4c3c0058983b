"""Logit-only KD versus logit + hidden-state KD of a depth-pruned SmolLM2-135M, at the same token budget.

The teacher is SmolLM2-135M (``minitron.api.fetch("smollm2-135m")``, 30 layers, hidden 576). The student drops the
contiguous block of ``--drop`` layers whose removal costs the least LM loss (the ``lm_loss`` layer metric of
:func:`minitron.compress.importance.estimate_importance` on ``--calib-tokens`` tokens of WikiText-2 valid), as the
demo's depth student does; :func:`minitron.compress.prune.prune_depth` writes the pruning record that
``--layer-map auto`` reads. Both arms then distil the same pruned student from the same (uncorrected) teacher on
WikiText-2 valid, ``--steps x --batch x --seq`` tokens each, and differ only in the loss:

* ``logit``: forward KL on the final logits (fused linear KL; :class:`minitron.train.DistillConfig` defaults);
* ``logit+hidden``: the same plus ``--hidden-loss`` (cosine by default) between every student layer's output and
  the output of the teacher layer it was kept from (24 pairs for 24 kept layers), balanced dynamically
  (``hidden_balance="dynamic"``, ``hidden_weight`` 1: the hidden term weighs as much as the KL at every step).

Every arm runs with ``--seeds`` (the data order and the RNGs). Reported: WikiText-2 test perplexity (the first
``--eval-tokens`` tokens, the same for every row) of the teacher, the pruned student, and each distilled student;
the records go to ``--out`` (``results.json``, ``results.md``, one ``log-<arm>-seed<k>.jsonl`` per run).

Usage (2 shared cores; about 40 minutes with the defaults)::

    nice python -m benchmarks.hidden_kd_study --out docs/hidden-kd
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

if __name__ == "__main__" and not __package__:  # run as a file: make `minitron` importable from the checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

log = logging.getLogger("hidden_kd_study")

DATA = Path(__file__).resolve().parents[1] / "data" / "wikitext-2"


def _args(argv: Any = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--drop", type=int, default=6, help="contiguous layers dropped (default 6 of 30)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--hidden-loss", default="cosine", choices=["cosine", "mse"])
    p.add_argument("--hidden-weight", type=float, default=1.0)
    p.add_argument("--hidden-balance", default="dynamic", choices=["none", "dynamic"])
    p.add_argument("--calib-tokens", type=int, default=1024)
    p.add_argument("--layers-to-drop", default=None, help="skip the importance pass: drop these layers (comma-separated, "
                   "e.g. the block an earlier run of this script chose; recorded)")
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--hidden-backend", default="auto")
    p.add_argument("--out", default="docs/hidden-kd")
    return p.parse_args(argv)


def _ppl(model: torch.nn.Module, data: Any) -> Dict[str, float]:
    from minitron.eval.perplexity import perplexity

    t0 = time.time()
    r = perplexity(model, data, batch_size=4)
    return {"ppl": round(float(r["ppl"]), 4), "loss": round(float(r["loss"]), 5), "tokens": int(r["tokens"]),
            "seconds": round(time.time() - t0, 1)}


def _hidden_backend(name: str) -> str:
    from minitron.ops.hidden_loss import hidden_state_loss

    try:
        hidden_state_loss(torch.zeros(1, 2), torch.zeros(1, 2), backend=name)
        return name
    except Exception as e:  # the C++ kernel not built in this checkout: say so and use the reference explicitly
        log.warning("hidden_state_loss backend %r unavailable (%s); using backend='reference'", name,
                    str(e).splitlines()[0])
        return "reference"


def main(argv: Any = None) -> int:
    a = _args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    torch.set_num_threads(a.threads)
    from minitron import api
    from minitron.compress.importance import estimate_importance
    from minitron.compress.prune import prune_depth
    from minitron.io.data import load_packed
    from minitron.train import DistillConfig, TrainConfig, distill_model

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    path = api.fetch(a.model)
    teacher, tok, _ = api.load_model(str(path))
    teacher.float().eval()
    train_tokens = a.steps * a.batch * a.seq
    train = load_packed(str(DATA / "valid.txt"), tok, seq_len=a.seq, max_tokens=train_tokens + a.calib_tokens)
    test = load_packed(str(DATA / "test.txt"), tok, seq_len=a.seq, max_tokens=a.eval_tokens, drop_remainder=False)
    summary: Dict[str, Any] = {"model": a.model, "settings": vars(a), "train_tokens_per_run": train_tokens,
                               "torch_threads": torch.get_num_threads(), "runs": []}
    summary["teacher"] = _ppl(teacher, test)
    log.info("teacher: %s", summary["teacher"])

    # the depth student: drop the contiguous block with the least LM-loss importance
    n_cal = max(1, a.calib_tokens // a.seq)
    calib = [{"input_ids": train.input_ids[-n_cal:], "attention_mask": train.attention_mask[-n_cal:]}]
    t0 = time.time()
    L = teacher.config.num_hidden_layers
    if a.layers_to_drop:
        drop = [int(x) for x in a.layers_to_drop.split(",")]
        student0 = prune_depth(copy.deepcopy(teacher), num_hidden_layers=L - len(drop), layers_to_drop=drop)
        scores = None
    else:
        scores = estimate_importance(teacher, calib, layer_metrics=("lm_loss",), progress=False)
        student0 = prune_depth(copy.deepcopy(teacher), num_hidden_layers=L - a.drop, scores=scores, metric="lm_loss",
                               contiguous=True)
    kept = student0.config.minitron_pruning["kept_layers"]
    summary["pruning"] = {"dropped": [i for i in range(L) if i not in kept], "kept_layers": kept,
                          "importance_seconds": round(time.time() - t0, 1),
                          "lm_loss_scores": None if scores is None else
                          [round(float(x), 5) for x in scores.layer_scores("lm_loss")],
                          "given": a.layers_to_drop}
    log.info("dropped layers %s", summary["pruning"]["dropped"])
    summary["pruned"] = _ppl(student0, test)
    log.info("pruned student: %s", summary["pruned"])
    dist_data = type(train)(train.input_ids[:a.steps * a.batch], train.attention_mask[:a.steps * a.batch],
                            train.description)
    hb = _hidden_backend(a.hidden_backend)
    arms = {"logit": DistillConfig(),
            "logit+hidden": DistillConfig(hidden_loss=a.hidden_loss, hidden_weight=a.hidden_weight,
                                          hidden_balance=a.hidden_balance, hidden_backend=hb)}
    for seed in [int(s) for s in a.seeds.split(",")]:
        for arm, dcfg in arms.items():
            student = copy.deepcopy(student0)
            cfg = TrainConfig(steps=a.steps, batch_size=a.batch, lr=a.lr, warmup_steps=2, min_lr_ratio=0.1,
                              seed=seed, device="cpu", bf16=False)
            work = Path(tempfile.mkdtemp(prefix="hidden-kd-"))
            t0 = time.time()
            try:
                res = distill_model(student, teacher, dist_data, cfg, dcfg, work, tokenizers=(tok, tok))
                shutil.copy(work / "log.jsonl", out / f"log-{arm.replace('+', '-')}-seed{seed}.jsonl")
            finally:
                shutil.rmtree(work, ignore_errors=True)
            train_s = time.time() - t0
            ev = _ppl(student, test)
            recs = [r for r in res.history if r["type"] == "train"]
            run = {"arm": arm, "seed": seed, "test": ev, "train_seconds": round(train_s, 1),
                   "final_kl": recs[-1].get("kl"), "first_kl": recs[0].get("kl"),
                   "final_hidden": recs[-1].get("hidden"), "first_hidden": recs[0].get("hidden"),
                   "distill": dcfg.to_dict()}
            summary["runs"].append(run)
            log.info("%s seed %d: test ppl %.3f (train %.0fs)", arm, seed, ev["ppl"], train_s)
            _write(out, summary, t_start)
    _write(out, summary, t_start)
    return 0


def _write(out: Path, summary: Dict[str, Any], t_start: float) -> None:
    from minitron.io.files import atomic_write_json, atomic_write_text

    summary["total_seconds"] = round(time.time() - t_start, 1)
    atomic_write_json(out / "results.json", summary)
    atomic_write_text(out / "results.md", _markdown(summary))


def _markdown(s: Dict[str, Any]) -> str:
    a = s["settings"]
    lines = [f"# Logit-only vs logit + hidden-state KD: depth-pruned {s['model']}", "",
             f"Student: {s['model']} minus layers {s['pruning']['dropped']} (" + (
                 f"given, --layers-to-drop {a['layers_to_drop']}" if a.get("layers_to_drop") else
                 f"contiguous block of {a['drop']}, least LM-loss importance on {a['calib_tokens']} tokens") +
             "); distillation on WikiText-2 valid, "
             f"{s['train_tokens_per_run']:,} tokens per run ({a['steps']} steps x {a['batch']} x {a['seq']}), lr "
             f"{a['lr']}; hidden arm: {a['hidden_loss']} on all {len(s['pruning']['kept_layers'])} kept-layer pairs "
             f"(layer map auto), weight {a['hidden_weight']}, balance {a['hidden_balance']}. WikiText-2 test "
             f"perplexity on the first {s['teacher']['tokens']:,} predicted tokens (seq {a['seq']}).", "",
             "| model | seed | test ppl | test loss | first KL | final KL | first hidden | final hidden |",
             "|---|---|---|---|---|---|---|---|",
             f"| teacher | - | {s['teacher']['ppl']:.3f} | {s['teacher']['loss']:.4f} | | | | |",
             f"| pruned (no training) | - | {s['pruned']['ppl']:.3f} | {s['pruned']['loss']:.4f} | | | | |"]
    fmt = lambda v: "" if v is None else f"{v:.4f}"
    for r in s["runs"]:
        lines.append(f"| {r['arm']} | {r['seed']} | {r['test']['ppl']:.3f} | {r['test']['loss']:.4f} | "
                     f"{fmt(r['first_kl'])} | {fmt(r['final_kl'])} | {fmt(r['first_hidden'])} | "
                     f"{fmt(r['final_hidden'])} |")
    by: Dict[str, List[float]] = {}
    for r in s["runs"]:
        by.setdefault(r["arm"], []).append(r["test"]["ppl"])
    lines += ["", "Mean test perplexity: " + "; ".join(f"{k} {sum(v) / len(v):.3f} (n={len(v)})" for k, v in by.items()),
              "", f"Total {s['total_seconds'] / 60:.1f} min with {s['torch_threads']} torch threads (2 shared CPU "
              "cores, fp32)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
