"""``minitron search`` on a real model: SmolLM2-135M at the budget of the demo's depth student (about 60%).

Stages (each skipped when its output exists, so ``--resume`` continues a killed run; the search itself resumes
from its state file):

1. teacher correction, exactly as the real demo (3 LM steps of 4 x 512 tokens on WikiText-2 valid, lr 1e-4);
2. importance of the corrected teacher on WikiText-2 valid (the demo's calibration: 2 batches of 4 x 512 tokens,
   mean/l2 aggregation) with the LM-loss layer metric added (the search drops layers by it; ``depth_max_tokens``
   512 as the study's, which rounds up to one calibration batch: its 30 skip-one-layer passes run over 2,048 tokens);
3. ``minitron.api.search`` at 81,413,568 total parameters (the demo's depth student: 60.5% of the teacher), pruning
   limits 40% width and 50% depth (so that the demo's depth student, 15 of 30 layers, is itself a candidate),
   tolerance 1%, scoring on the last 1,024 tokens of WikiText-2 valid (held out), top-3 distilled for
   ``--distill-tokens`` each (default 4,096: 4 steps of 2 x 512, sized for 2 cores shared with many other jobs) from
   the corrected teacher, rescored; then WikiText-2 test perplexity (the demo's 8,176 tokens) of the distilled
   winner, compared with the demo's hand-picked width and depth students (``docs/demo/results.json``).

Usage::

    nice python benchmarks/search_real.py [--out runs/search-smollm2] [--records docs/search-smollm2] [--resume]

Writes ``results.json``/``results.md`` and copies ``search.json``/``search.md``/``search.png`` to ``--records``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict

if __name__ == "__main__" and not __package__:  # run as a file: make `minitron` importable from the checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

log = logging.getLogger("benchmarks.search_real")

ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN = 512
BUDGET = 81_413_568  # the real demo's depth student (docs/demo/results.json)
EVAL_TOKENS = 8192


def _data_dir(arg: str | None) -> Path:
    for d in ([Path(arg)] if arg else []) + [Path("/work/shared/data"), ROOT / "minitron" / "resources" / "data"]:
        if (d / "wikitext-2" / "valid.txt").is_file():
            return d
    raise FileNotFoundError("WikiText-2 not found; pass --data-dir DIR holding wikitext-2/{valid,test}.txt")


def _stage(timings: Dict[str, float], name: str, fn: Any) -> Any:
    """Run one stage; its wall time is recorded the first time it runs to completion (a resumed run keeps the
    times of the stages an earlier, interrupted process completed: ``OUT/timings.json``)."""
    t0 = time.time()
    out = fn()
    took = round(time.time() - t0, 1)
    timings.setdefault(name, took)
    log.info("stage %s: %.1fs", name, took)
    return out


def _evaluate(model: Any, test: Path) -> Dict[str, Any]:
    from minitron import api

    r = api.evaluate_perplexity(str(model), str(test), seq_len=SEQ_LEN, max_tokens=EVAL_TOKENS, batch_size=4,
                                device="cpu")
    return {k: r[k] for k in ("loss", "ppl", "tokens", "sequences")}


def _demo_rows() -> Dict[str, Any]:
    d = json.loads((ROOT / "docs" / "demo" / "results.json").read_text())
    return {r["label"]: r for r in d["rows"]}


def main(argv: Any = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", default="runs/search-smollm2")
    p.add_argument("--records", default="docs/search-smollm2")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--distill-tokens", type=int, default=4096)
    p.add_argument("--distill-batch", type=int, default=2)
    p.add_argument("--score-tokens", type=int, default=1024)
    p.add_argument("--tolerance", type=float, default=0.01)
    p.add_argument("--depth-max-tokens", type=int, default=512)
    p.add_argument("--max-depth-prune", type=float, default=0.5)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--docs-file", default=str(ROOT / "docs" / "search.md"), help="the doc whose generated block is "
                   "updated from --records")
    p.add_argument("--update-docs", action="store_true", help="only regenerate the block of docs/search.md from "
                   "--records")
    a = p.parse_args(argv)
    if a.update_docs:
        update_docs(Path(a.records), Path(a.docs_file))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from minitron import api
    from minitron.cli import _quiet_libraries

    _quiet_libraries()
    torch.set_num_threads(a.threads)
    data = _data_dir(a.data_dir)
    valid, test = data / "wikitext-2" / "valid.txt", data / "wikitext-2" / "test.txt"
    out = Path(a.out)
    if out.exists() and not a.resume:
        raise SystemExit(f"{out} exists; pass --resume to continue it or remove it")
    out.mkdir(parents=True, exist_ok=True)
    tfile = out / "timings.json"
    timings: Dict[str, float] = json.loads(tfile.read_text()) if tfile.is_file() else {}
    t_all, load0 = time.time(), os.getloadavg()
    teacher = Path(_stage(timings, "fetch", lambda: api.fetch(a.model)))
    corrected = out / "teacher_corrected"
    if not (corrected / "model" / "config.json").is_file():
        _stage(timings, "correct_teacher", lambda: api.correct_teacher(
            str(teacher), str(valid), output_dir=str(corrected), overwrite=corrected.exists(), seq_len=SEQ_LEN,
            train=dict(steps=3, batch_size=4, lr=1e-4, warmup_steps=1, min_lr_ratio=0.1, weight_decay=0.01,
                       log_every=1, device="cpu")))
    imp = out / "importance"
    if not (imp / "importance.json").is_file():
        _stage(timings, "importance", lambda: api.estimate_importance(
            str(corrected), str(valid), output_dir=str(imp), overwrite=imp.exists(), seq_len=SEQ_LEN, batch_size=4,
            max_batches=2, layer_metrics=("block_influence", "lm_loss"), depth_max_tokens=a.depth_max_tokens,
            device="cpu"))
    spec = api.SearchSpec(target_params=BUDGET, max_depth_prune=a.max_depth_prune, top_k=a.top_k,
                          distill_tokens=a.distill_tokens, score_tokens=a.score_tokens, tolerance=a.tolerance)
    dry = api.search(str(corrected), dry_run=True, options=spec)
    log.info("%d candidates:\n%s", len(dry.candidates), dry.table)
    sdir = out / "search"
    res = _stage(timings, "search", lambda: api.search(
        str(corrected), api.DataSpec(data=str(valid), seq_len=SEQ_LEN), importance=str(imp), output_dir=str(sdir),
        options=spec, resume=sdir.exists(), device="cpu",
        train=dict(batch_size=a.distill_batch, lr=4e-4, warmup_steps=1, min_lr_ratio=0.1, weight_decay=0.01,
                   log_every=1, save_every=0, keep_checkpoints=1, device="cpu")))
    evals = {}
    tfile.write_text(json.dumps(timings))
    for label, path in (("winner distilled", sdir / "distilled"), ("winner pruned", sdir / "model")):
        evals[label] = _stage(timings, f"evaluate {label}", lambda path=path: _evaluate(path, test))
        tfile.write_text(json.dumps(timings))
    timings.pop("total", None)
    timings["total"] = round(sum(timings.values()), 1)
    _write_records(Path(a.records), sdir, res, evals, timings, spec, a, [round(x, 2) for x in load0])
    update_docs(Path(a.records), Path(a.docs_file))
    return 0


def _comparison(res: Any, evals: Dict[str, Any]) -> list:
    demo = _demo_rows()
    win = next(r for r in res.rows if r["id"] == res.winner)
    rows = [dict(label="teacher (corrected; the demo's figure, same correction and evaluation)",
                 parameters=demo["teacher (corrected)"]["parameters"], ppl=demo["teacher (corrected)"]["ppl"])]
    rows += [dict(label=f"search winner `{res.winner}` pruned", parameters=win["parameters"],
                  ppl=evals["winner pruned"]["ppl"]),
             dict(label=f"search winner `{res.winner}` distilled ({res.summary['distill_tokens']:,} tokens)",
                  parameters=win["parameters"], ppl=evals["winner distilled"]["ppl"])]
    for k in ("width pruned", "width distilled", "depth pruned", "depth distilled"):
        rows.append(dict(label=f"demo {k}", parameters=demo[k]["parameters"], ppl=demo[k]["ppl"]))
    return rows


def _write_records(rec: Path, sdir: Path, res: Any, evals: Dict[str, Any], timings: Dict[str, float], spec: Any,
                   a: Any, load0: list) -> None:
    from minitron.demo import _git_commit, _versions

    rec.mkdir(parents=True, exist_ok=True)
    for f in ("search.json", "search.md", "search.png"):
        shutil.copyfile(sdir / f, rec / f)
    comp = _comparison(res, evals)
    teacher_params = res.summary["teacher"]["parameters"]
    rc = res.summary["ranking_change"]
    summary = {
        "command": "nice python benchmarks/search_real.py " + " ".join(sys.argv[1:]),
        "model": a.model, "budget_parameters": BUDGET, "budget_fraction": BUDGET / teacher_params,
        "spec": spec.to_dict(), "candidates": len(res.candidates), "winner": res.winner,
        "ranking_change": rc, "scoring_cost": res.summary["scoring_cost"], "search_timings": res.summary["timings"],
        "timings": timings, "evaluation": {"data": "WikiText-2 test", "seq_len": SEQ_LEN, "max_tokens": EVAL_TOKENS,
                                           **evals},
        "comparison": comp, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "load_average": {"start": load0, "end": [round(x, 2) for x in os.getloadavg()]},
        "versions": _versions(), "commit": _git_commit(),
    }
    (rec / "results.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    lines = ["| model | parameters | % of teacher | WikiText-2 test ppl |", "|---|---:|---:|---:|"]
    for r in comp:
        lines.append(f"| {r['label']} | {r['parameters']:,} | {100 * r['parameters'] / teacher_params:.1f}% | "
                     f"{r['ppl']:.1f} |")
    md = [f"# minitron search on {a.model} (generated by benchmarks/search_real.py)", "",
          f"Budget {BUDGET:,} parameters ({100 * BUDGET / teacher_params:.1f}% of the teacher); {len(res.candidates)} "
          f"candidates; top {len(rc['before'])} distilled for {res.summary['distill_tokens']:,} tokens each; winner "
          f"`{res.winner}`.", "", "\n".join(lines), "",
          f"Ranking change among the finalists: {rc['discordant_pairs']} of {rc['pairs']} pairs swapped; winner "
          f"{'changed' if rc['winner_changed'] else 'unchanged'}.", "",
          "Wall time (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()), "",
          "Search phases (s): " + ", ".join(f"{k} {v}" for k, v in res.summary["timings"].items()), "",
          f"Load average at start {load0}, end {summary['load_average']['end']} ({os.cpu_count()} cores, "
          f"{torch.get_num_threads()} torch threads).", ""]
    (rec / "results.md").write_text("\n".join(md))
    log.info("records written to %s", rec)


NL = "\n"
BEGIN, END = "<!-- search-smollm2 begin -->", "<!-- search-smollm2 end -->"


def docs_block(records: Path) -> str:
    """The real-model section of docs/search.md, from the records (``results.json``, ``search.json``)."""
    from minitron.search.report import candidate_table

    r = json.loads((records / "results.json").read_text())
    s = json.loads((records / "search.json").read_text())
    rc, sc, t = r["ranking_change"], r["scoring_cost"], s["teacher"]
    by_id = {c["id"]: c for c in s["candidates"]}
    fin = ["| finalist | kind | rank before | loss before | rank after | loss after | ppl after (held out) |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for cid in rc["before"]:
        c = by_id[cid]
        fin.append(f"| `{cid}` | {c['kind']} | {rc['before'].index(cid) + 1} | {c['score']['loss']:.3f} | "
                   f"{rc['after'].index(cid) + 1} | {c['distilled']['loss']:.3f} | {c['distilled']['ppl']:.1f} |")
    comp = ["| model | parameters | % of teacher | WikiText-2 test ppl |", "|---|---:|---:|---:|"]
    for row in r["comparison"]:
        comp.append(f"| {row['label']} | {row['parameters']:,} | {100 * row['parameters'] / t['parameters']:.1f}% | "
                    f"{row['ppl']:.1f} |")
    demo = json.loads((ROOT / "docs" / "demo" / "results.json").read_text())["students"]
    ranks = {c["id"]: c["rank"] for c in s["candidates"]}
    notes = []
    for name, st in demo.items():
        c = st["config"]
        cid = (f"h{c['hidden_size']}-i{c['intermediate_size']}-a{c['num_attention_heads']}-kv{c['num_key_value_heads']}"
               f"-l{c['num_hidden_layers']}")
        notes.append(f"the demo's {name} student `{cid}` is " + (
            f"candidate #{ranks[cid]} of {len(ranks)} (here its dropped block is chosen by the LM-loss drop; the demo "
            "used block influence)" if cid in ranks else "not a candidate (another budget)"))
    phases = ", ".join(f"{k} {v:.0f}" for k, v in r["timings"].items())
    search_phases = ", ".join(f"{k} {v:.0f}" for k, v in r["search_timings"].items())
    lines = [
        f"Budget {r['budget_parameters']:,} parameters ({100 * r['budget_fraction']:.1f}% of {t['parameters']:,}); "
        f"{r['candidates']} candidates; the teacher's held-out loss {t['loss']:.3f} on {t['tokens']:,} scoring tokens.",
        "", "All candidates, ranked by the held-out loss right after pruning (cost: one candidate's pruning + scoring "
        "in units of one teacher pass over the scoring data):", "", candidate_table(s["candidates"], t["parameters"],
                                                                                  scored=True),
        f"Finalists before and after {s['distill_tokens']:,} distillation tokens each:", "", NL.join(fin), "",
        f"**Ranking change**: {rc['discordant_pairs']} of {rc['pairs']} finalist pairs swapped order (Kendall tau "
        f"{rc['kendall_tau']:.2f}); the winner {'changed' if rc['winner_changed'] else 'did not change'}: "
        f"`{r['winner']}`.", "",
        "Of the demo's hand-picked shapes, " + "; ".join(notes) + ".", "",
        "The winner against the demo's hand-picked students (same WikiText-2 test tokens, same corrected teacher; the "
        "demo distilled its width student for 32,768 tokens and its depth student for 20,480):", "", NL.join(comp),
        "",
        f"**Scoring cost** per candidate: {sc['mean']:.2f}x one teacher pass over the scoring data on average "
        f"(min {sc['min']:.2f}x, max {sc['max']:.2f}x; pruning excluded {sc['eval_mean']:.2f}x).", "",
        f"**Wall time** (s): {phases}; inside the search: {search_phases}. {r['cpu_count']} cores, "
        f"{r['torch_threads']} torch threads, load average {r['load_average']['start']} at the start and "
        f"{r['load_average']['end']} at the end (other jobs shared the machine); commit {r['commit']}.",
        "", "![loss before vs after distillation](search-smollm2/search.png)",
    ]
    return "\n".join(lines) + "\n"


def update_docs(records: Path, doc: Path) -> None:
    text = doc.read_text()
    a, b = text.index(BEGIN), text.index(END)
    doc.write_text(text[:a + len(BEGIN)] + "\n" + docs_block(records) + text[b:])
    log.info("updated %s from %s", doc, records)


if __name__ == "__main__":
    sys.exit(main())
