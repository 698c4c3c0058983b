"""The search's report: ``search.json`` (everything), ``search.md`` (tables), ``search.png`` (loss right after
pruning vs after the short distillation, per candidate)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

from minitron.io.files import atomic_write_json, atomic_write_text
from minitron.search.space import Candidate

log = logging.getLogger(__name__)

__all__ = ["write_report", "candidate_table", "dry_run_summary", "plot_search", "ranking_change"]


def _m(n: int) -> str:
    return f"{n / 1e6:,.1f}M" if n < 1e10 else f"{n / 1e9:,.2f}B"


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def candidate_table(rows: List[Dict[str, Any]], teacher_params: int, *, scored: bool) -> str:
    """Markdown table of the candidates (with their scores and distillation results when ``scored``)."""
    head = ["#", "candidate", "kind", "hidden", "MLP", "heads/KV", "layers", "params", "% teacher", "non-emb.",
            "memory"]
    if scored:
        head += ["dropped layers", "loss", "KL", "ppl", "cost (x teacher pass)", "loss distilled", "ppl distilled"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for i, r in enumerate(rows, 1):
        cells = [str(r.get("rank", i)), f"`{r['id']}`", r["kind"], str(r["hidden_size"]),
                 str(r["intermediate_size"]), f"{r['num_attention_heads']}/{r['num_key_value_heads']}",
                 str(r["num_hidden_layers"]), _m(r["parameters"]), f"{100 * r['parameters'] / teacher_params:.1f}%",
                 _m(r["non_embedding_parameters"]), _gib(r["memory_bytes"])]
        if scored:
            s, d = r.get("score") or {}, r.get("distilled") or {}
            dropped = s.get("dropped_layers") or []
            cells += [(f"{dropped[0]}-{dropped[-1]}" if len(dropped) > 1 else str(dropped[0])) if dropped else "-",
                      f"{s['loss']:.4f}" if s else "", f"{s['kl']:.4f}" if s else "", f"{s['ppl']:.1f}" if s else "",
                      f"{s['cost_vs_teacher_forward']:.2f}" if s else "",
                      f"{d['loss']:.4f}" if d else "", f"{d['ppl']:.1f}" if d else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _budget_text(spec: Dict[str, Any]) -> str:
    parts = []
    if spec.get("target_params") is not None:
        parts.append(f"{spec['target_params']:,} {'parameters' if spec['params_kind'] == 'total' else 'non-embedding parameters'}")
    if spec.get("target_memory") is not None:
        parts.append(f"{spec['target_memory']:,} bytes of weights + KV cache at {spec['memory_seq_len']} tokens x "
                     f"{spec['memory_batch']}")
    return " and ".join(parts)


def dry_run_summary(config: Any, spec: Any, candidates: List[Candidate], teacher: Candidate) -> Dict[str, Any]:
    """``search.json``-like record of an enumeration alone (no model loaded)."""
    rows = [c.to_dict() for c in candidates]
    sd = spec.to_dict()
    table = candidate_table(rows, teacher.parameters, scored=False)
    return {"dry_run": True, "model_type": getattr(config, "model_type", None), "teacher": teacher.to_dict(),
            "spec": sd, "budget": _budget_text(sd), "candidates": rows, "table": table}


def plot_search(path: Path, rows: List[Dict[str, Any]], finalists: List[str], key: str = "loss") -> Optional[Path]:
    """Loss right after pruning (every candidate) and after distillation (the finalists), one column each."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from minitron.io.plotting import save_figure

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    scored = [r for r in rows if r.get("score")]
    ax.scatter([0] * len(scored), [r["score"][key] for r in scored], s=14, color="0.6", zorder=2,
               label="every candidate, right after pruning")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    by_id = {r["id"]: r for r in rows}
    for i, cid in enumerate(finalists):
        r = by_id[cid]
        if not r.get("distilled"):
            continue
        ax.plot([0, 1], [r["score"][key], r["distilled"][key]], "o-", color=colours[i % len(colours)], lw=1.6,
                label=f"{cid} ({r['kind']})")
    ax.set_xticks([0, 1], ["right after pruning", f"after distillation"])
    ax.set_xlim(-0.3, 1.3)
    ax.set_yscale("log")
    ax.set_ylabel(f"held-out {'LM loss' if key == 'loss' else 'KL to the teacher'} (log scale)")
    ax.set_title("minitron search: candidates before and after short distillation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    try:
        return save_figure(fig, path)
    finally:
        plt.close(fig)


def _rows(candidates: List[Candidate], state: Dict[str, Any], rank_by: str) -> List[Dict[str, Any]]:
    rows = []
    for c in candidates:
        r = c.to_dict()
        r["score"] = state["scores"].get(c.id)
        r["distilled"] = state["distilled"].get(c.id)
        rows.append(r)
    rows.sort(key=lambda r: (r["score"][rank_by] if r["score"] else float("inf"), r["id"]))
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return rows


def _markdown(s: Dict[str, Any]) -> str:
    t, rc, sc = s["teacher"], s["ranking_change"], s["scoring_cost"]
    lines = [f"# minitron search: {s['model']}", "",
             f"Budget: {s['budget']}; limits: width <= {s['spec']['max_width_prune']:.0%}, depth <= "
             f"{s['spec']['max_depth_prune']:.0%}; grid: hidden x{s['spec']['hidden_multiple']}, MLP "
             f"x{s['spec']['mlp_multiple']}; tolerance {s['spec']['tolerance']:.0%} below the budget.", "",
             f"Teacher: {t['parameters']:,} parameters; held-out loss {t['loss']:.4f} (ppl {t['ppl']:.2f}) on "
             f"{t['tokens']:,} scoring tokens.", "",
             f"## Candidates ({len(s['candidates'])}, ranked by {s['spec']['rank_by']} right after pruning)", "",
             s["table"], "",
             f"## Finalists (top {len(rc['before'])}, {s['distill_tokens']:,} distillation tokens each)", "",
             "| candidate | rank before | loss before | KL before | rank after | loss after | KL after | ppl after |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    by_id = {r["id"]: r for r in s["candidates"]}
    for cid in rc["before"]:
        r = by_id[cid]
        lines.append(f"| `{cid}` | {rc['before'].index(cid) + 1} | {r['score']['loss']:.4f} | {r['score']['kl']:.4f} "
                     f"| {rc['after'].index(cid) + 1} | {r['distilled']['loss']:.4f} | {r['distilled']['kl']:.4f} | "
                     f"{r['distilled']['ppl']:.2f} |")
    lines += ["", f"Ranking change: {rc['discordant_pairs']} of {rc['pairs']} finalist pairs swapped order "
                  f"(Kendall tau {rc['kendall_tau']:.2f}); winner {'changed' if rc['winner_changed'] else 'unchanged'}"
                  f" by distillation. Winner: `{s['winner']}`.", "",
              f"Scoring cost per candidate (prune in memory + forward + loss/KL): mean {sc['mean']:.2f}x one teacher "
              f"pass over the scoring data (min {sc['min']:.2f}x, max {sc['max']:.2f}x; the evaluation alone "
              f"{sc['eval_mean']:.2f}x); the teacher's pass ({t['forward_s']:.1f}s) ran once, shared.", "",
              "Wall time per phase (s): " + ", ".join(f"{k} {v:.1f}" for k, v in s["timings"].items()), ""]
    return "\n".join(lines)


def ranking_change(before: List[str], after: List[str]) -> Dict[str, Any]:
    """How the finalists' order changed: discordant pairs, Kendall's tau, whether the winner changed."""
    pos = {k: i for i, k in enumerate(after)}
    pairs = [(a, b) for i, a in enumerate(before) for b in before[i + 1:]]
    disc = sum(1 for a, b in pairs if pos[a] > pos[b])
    return {"before": before, "after": after, "pairs": len(pairs), "discordant_pairs": disc,
            "kendall_tau": (1 - 2 * disc / len(pairs)) if pairs else 1.0,
            "changed": before != after, "winner_changed": bool(before) and before[0] != after[0]}


def write_report(work: Path, inp: Any, candidates: List[Candidate], state: Dict[str, Any], finalists: List[str],
                 after: List[str]) -> Dict[str, Any]:
    """Write ``search.json``, ``search.md`` and ``search.png`` into ``work``; returns the summary."""
    from minitron.search.space import _Space

    spec = inp.spec
    teacher = _Space(inp.teacher.config, spec).candidate(_Space(inp.teacher.config, spec).teacher)
    rows = _rows(candidates, state, spec.rank_by)
    costs = [r["score"]["cost_vs_teacher_forward"] for r in rows if r["score"]]
    evals = [r["score"]["eval_cost_vs_teacher_forward"] for r in rows if r["score"]]
    sd = spec.to_dict()
    summary = {
        "model": inp.label, "spec": sd, "budget": _budget_text(sd),
        "teacher": dict(teacher.to_dict(), **(state.get("teacher") or {})),
        "candidates": rows, "finalists": finalists, "winner": state["winner"],
        "ranking_change": ranking_change(finalists, after),
        "distill_tokens": state["distilled"][finalists[0]]["tokens"] if finalists else 0,
        "train": inp.train.to_dict(), "loss": inp.loss.to_dict(),
        "scoring_cost": {"mean": sum(costs) / len(costs), "min": min(costs), "max": max(costs),
                         "eval_mean": sum(evals) / len(evals), "unit": "one teacher pass over the scoring data"},
        "timings": dict(state["timings"]),
        "outputs": {"model": "model/ (winner, pruned)", "distilled": "distilled/ (winner, after distillation)"},
    }
    summary["table"] = candidate_table(rows, teacher.parameters, scored=True)
    atomic_write_json(work / "search.json", summary)
    atomic_write_text(work / "search.md", _markdown(summary))
    try:
        plot_search(work / "search.png", rows, finalists, spec.rank_by)
    except Exception as e:  # a plot never fails the search
        log.warning("could not plot the search: %s", e)
    return summary
