"""The README's real-teacher study table, generated from the study's records.

``python -m benchmarks.study.tables`` rewrites the block between ``<!-- study-table:study-real begin -->`` and
``<!-- study-table:study-real end -->`` in ``README.md`` (section "## The papers in miniature"; the block is
inserted at the top of the section when missing) from ``docs/study-smollm2/results.json``, the records of
``python -m benchmarks.minitron_study --teacher smollm2-135m``. ``--check`` only reports whether the block is
current (exit 1 when not).

The marker is not ``generated:NAME``: :mod:`benchmarks.report` owns those blocks and refuses names it does not
know.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from benchmarks.study.experiment import ARMS, MAGNITUDE, PAPERS_BEST, REPO_ROOT, evaluate_claims, summarize

NAME = "study-real"
BEGIN = f"<!-- study-table:{NAME} begin -->"
END = f"<!-- study-table:{NAME} end -->"
SECTION = "## The papers in miniature"
DEFAULT_RESULTS = REPO_ROOT / "docs" / "study-smollm2" / "results.json"
DEFAULT_README = REPO_ROOT / "README.md"


def _fmt(values: Sequence[float], digits: int = 1) -> str:
    s = summarize(values)
    if s["mean"] is None:
        return "not run"
    out = f"{s['mean']:,.{digits}f}"
    if s["sd"] is not None:
        out += f" ± {s['sd']:,.{digits}f}"
    return out


def _arm_label(key: str, arm: Dict[str, Any], results: Dict[str, Any]) -> str:
    shape = arm.get("shape") or {}
    if key == "d":
        kept = shape.get("num_hidden_layers") or results.get("shapes", {}).get("depth", {}).get("num_hidden_layers")
        total = results.get("teacher", {}).get("config", {}).get("num_hidden_layers")
        return f"({key}) depth-pruned ({kept} of {total} layers, one contiguous block) + distillation"
    text = {
        "a": "student architecture trained from scratch, LM loss",
        "b": "width-pruned + LM-loss fine-tuning",
        "c": "width-pruned + distillation",
        "e": "as (c) without teacher correction",
    }.get(key, ARMS.get(key, (arm.get("label", key), ""))[1])
    return f"({key}) {text}"


def render(results: Dict[str, Any], *, source: str = "docs/study-smollm2/results.json") -> str:
    """The Markdown of the block (without the markers), from the study's ``results.json``."""
    cfg = results["config"]
    t = results.get("teacher", {})
    arms = results.get("arms", {})
    seeds = [str(s) for s in cfg["seeds"]]
    done = {k: sorted(a.get("seeds", {})) for k, a in arms.items()}
    complete = all(done.get(k) == sorted(seeds) for k in ARMS if k in arms) and bool(results.get("summary"))
    budget = cfg["student_steps"] * cfg["batch_size"] * cfg["seq_len"]
    timing = results.get("timing_s", {})
    env = results.get("environment", {})
    corrected = t.get("corrected", {}).get("test_ppl")
    lines: List[str] = []
    w = results.get("shapes", {}).get("width", {})
    lines.append(
        f"**With a real teacher** (`python -m benchmarks.minitron_study --teacher {cfg['teacher_model']}`; "
        f"records `{source}`, report `docs/study-smollm2/results.md`): the pretrained SmolLM2-135M-Instruct "
        f"({t.get('parameters', 0) / 1e6:.1f}M parameters, {t.get('non_embedding_parameters', 0) / 1e6:.1f}M "
        f"non-embedding) as teacher, corrected on the training text ({t.get('correction_tokens', 0):,} tokens); "
        f"width student hidden {w.get('hidden_size')}, MLP {w.get('intermediate_size')}, "
        f"{w.get('num_attention_heads')} heads / {w.get('num_key_value_heads')} KV heads. "
        f"Budget: {budget:,} training tokens per arm ({cfg['student_steps']} steps x {cfg['batch_size']} x "
        f"{cfg['seq_len']}) from WikiText-2 valid + Tiny Shakespeare; test perplexity on the first "
        f"{results.get('data', {}).get('test_tokens', 0):,} tokens of WikiText-2 test; "
        f"{len(seeds)} seeds planned. {'Whole run' if complete else 'Run time so far'}: "
        f"{timing.get('total', 0) / 60:.0f} minutes on "
        f"{env.get('cpus')} shared cores ({env.get('threads')} threads; load average at start "
        f"{(env.get('load_average_at_start') or [float('nan')])[0]:.1f})."
    )
    if not complete:
        finished = ", ".join(f"{k}: seed{'s' if len(v) != 1 else ''} {', '.join(v) or 'none'}"
                             for k, v in done.items())
        lines.append("")
        lines.append(f"*Partial run*: the records hold {finished}; the rest did not finish in the session.")
    lines.append("")
    n_label = f"{len(seeds)} seeds" if len(seeds) > 1 else "1 seed"
    lines.append(f"| arm | params (non-emb.) | val ppl right after pruning | test ppl (mean ± sd, {n_label}) | "
                 "÷ corrected teacher |")
    lines.append("| --- | --- | --- | --- | --- |")
    for key in [k for k in arms if k in ARMS] + [k for k in arms if k not in ARMS]:
        arm = arms[key]
        per = list(arm.get("seeds", {}).values())
        tp = [s["test_ppl"] for s in per if s.get("test_ppl") is not None]
        start = "random init" if key.startswith("a") else _fmt([s["start_val_ppl"] for s in per
                                                                if s.get("start_val_ppl") is not None], 0)
        ratio = f"{statistics.fmean(tp) / corrected:.2f}x" if tp and corrected else "—"
        n_seeds = f" ({len(tp)} seed{'s' if len(tp) != 1 else ''})" if len(tp) != len(seeds) else ""
        params = (f"{arm['parameters'] / 1e6:.1f}M ({arm.get('non_embedding_parameters', 0) / 1e6:.1f}M)"
                  if arm.get("parameters") else "—")
        lines.append(f"| {_arm_label(key, arm, results)} | {params} | {start} | **{_fmt(tp, 2)}**{n_seeds} | {ratio} |")
    orig = t.get("original", {}).get("test_ppl")
    lines.append(f"| teacher before / after correction | {t.get('parameters', 0) / 1e6:.1f}M "
                 f"({t.get('non_embedding_parameters', 0) / 1e6:.1f}M) | — | "
                 f"{orig if orig is None else f'{orig:.2f}'} / {corrected if corrected is None else f'{corrected:.2f}'}"
                 " | 1 |")
    lines.append("")
    agg = {k: list(v.values()) for k, v in results.get("aggregation", {}).items() if v}
    act = {k: statistics.fmean(v) for k, v in agg.items() if k != MAGNITUDE}
    if act:
        ranked = sorted(act.items(), key=lambda kv: kv[1])
        best_pair = "/".join(PAPERS_BEST)
        rank = 1 + [k for k, _ in ranked].index(best_pair) if best_pair in act else None
        seeds_f = max(len(v) for v in agg.values())
        s = (f"(f) Perplexity right after width pruning, before training ({seeds_f} seed{'s' if seeds_f > 1 else ''}; "
             f"first {results.get('data', {}).get('sweep_test_tokens', 0):,} test tokens), over {len(act)} "
             f"sequence x batch aggregation pairs: {ranked[0][1]:,.0f} ({ranked[0][0].replace('/', ' / ')}) to "
             f"{ranked[-1][1]:,.0f} ({ranked[-1][0].replace('/', ' / ')})")
        if rank is not None:
            s += f"; the papers' best, seq mean / batch L2: {act[best_pair]:,.0f} ({rank} of {len(act)})"
        if MAGNITUDE in agg:
            s += f"; plain weight-magnitude importance: {statistics.fmean(agg[MAGNITUDE]):,.0f}"
        lines.append(s + ".")
        lines.append("")
    def mean_ppl(key: str) -> Optional[float]:
        vals = [s["test_ppl"] for s in arms.get(key, {}).get("seeds", {}).values() if s.get("test_ppl") is not None]
        return statistics.fmean(vals) if vals else None

    c, a = mean_ppl("c"), mean_ppl("a")
    if c is not None and corrected:
        s = (f"Target: the width student after distillation, (c), is at {c / corrected:.2f}x the corrected teacher's "
             f"perplexity")
        if a is not None:
            s += f"; training the same architecture from scratch on the same {budget:,} tokens, (a), is {a / c:,.0f}x worse"
        lines.append(s + ".")
        lines.append("")
    claims = [x for x in (results.get("claims") or evaluate_claims(results)) if x["verdict"] != "not measured"]
    if claims:
        def one(c: Dict[str, Any]) -> str:
            text = f"{c['claim']} ({c['comparison']}): {c['verdict']}"
            if c["comparison"] == "f":  # the rule weighs the range against the largest seed sd of any pair
                sd = c["evidence"].split("largest seed sd ")[-1].split(")")[0]
                text += f" (the rule compares the spread with the largest seed sd of any pair, here {sd})"
            return text

        lines.append("Verdicts (paired by seed, the study's rules): " + "; ".join(one(c) for c in claims) + ".")
        lines.append("")
    lic = results.get("licences") or {}
    if lic:
        lines.append("Licences: " + "; ".join(f"{k} {v}" for k, v in lic.items()) + ".")
        lines.append("")
    return "\n".join(lines)


def rewrite(text: str, body: str) -> str:
    """``text`` with the block's body replaced (the block inserted at the top of the section when missing)."""
    block = f"{BEGIN}\n{body.rstrip()}\n\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        return head + block + tail
    if SECTION not in text:
        raise ValueError(f"the README has no {SECTION!r} section to put the study table in")
    head, tail = text.split(SECTION, 1)
    return head + SECTION + "\n\n" + block + "\n\n" + tail.lstrip("\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.study.tables", description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    ap.add_argument("--readme", type=Path, default=DEFAULT_README)
    ap.add_argument("--check", action="store_true", help="exit 1 when the block is not current; write nothing")
    args = ap.parse_args(argv)
    results = json.loads(args.results.read_text(encoding="utf-8"))
    try:
        source = str(args.results.resolve().relative_to(REPO_ROOT))
    except ValueError:
        source = str(args.results)
    old = args.readme.read_text(encoding="utf-8")
    new = rewrite(old, render(results, source=source))
    if args.check:
        if new != old:
            print(f"{args.readme}: the {NAME} table is out of date; run `python -m benchmarks.study.tables`")
            return 1
        return 0
    if new != old:
        args.readme.write_text(new, encoding="utf-8")
        print(f"{args.readme}: {NAME} table rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
