"""One run's report: the Markdown table (``<device>-latest.md``), the speed-up summary and the plots. The
README/docs tables are generated from committed records by :mod:`benchmarks.report` instead."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from benchmarks.machine import sanitize
from benchmarks.records import add_ratios


def short_error(rec: dict) -> str:
    """One line about a failed record: the last line of a traceback, the first line of other messages."""
    lines = [ln.strip() for ln in (rec.get("error") or "").splitlines() if ln.strip()]
    if not lines:
        return ""
    return lines[-1] if rec.get("status") == "error" else lines[0]


def _mib(b: Optional[float]) -> str:
    return "-" if b is None else f"{b / 2**20:,.1f}"


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def markdown_table(records: list[dict], limits: Optional[dict] = None, env: Optional[dict] = None) -> str:
    add_ratios(records)
    lines = []
    if env:
        v = env.get("versions", {})
        lines.append(f"Device: **{env.get('device')}** ({env.get('device_type')}, {env.get('threads')} threads); "
                     f"torch {v.get('torch')}, triton {v.get('triton')}, minitron {v.get('minitron')}; "
                     f"commit {env.get('git_commit')}")
        lines.append("")
    if limits:
        lines.append(f"Machine limits measured in this run: copy {limits.get('copy_gbps')} GB/s (read+write), "
                     f"exp {limits.get('exp_gps')} G/s (fp32), matmul {limits.get('matmul_gflops')} GFLOP/s (fp32)")
        lines.append("")
    lines.append("| bench | shape | dtype | params | mode | provider | median ms [p20, p80] | vs ref | "
                 "peak MiB | mem vs ref | %copy BW | %exp | %matmul |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in records:
        if r.get("kind", "result") != "result":
            continue
        shape = ",".join(f"{k}={v}" for k, v in r["shape"].items())
        params = ",".join(f"{k}={v}" for k, v in sorted(r.get("params", {}).items())) or "-"
        if r.get("status") != "ok":
            msg = short_error(r)[:160].replace("|", "/")
            lines.append(f"| {r['bench']} | {shape} | {r['dtype']} | {params} | {r['mode']} | {r['provider']} | "
                         f"{r.get('status')}: {msg} | - | - | - | - | - | - |")
            continue
        ratio = r.get("ref_ratio")
        vs = "-" if ratio is None or r["provider"] == r.get("reference") else f"{1 / ratio:.2f}x"
        mratio = r.get("ref_mem_ratio")
        mvs = "-" if mratio is None or r["provider"] == r.get("reference") else f"{mratio:.3f}"
        lines.append(
            f"| {r['bench']} | {shape} | {r['dtype']} | {params} | {r['mode']} | {r['provider']} | "
            f"{r['median_ms']:.3f} [{r['p20_ms']:.3f}, {r['p80_ms']:.3f}] | {vs} | {_mib(r.get('peak_bytes'))} | "
            f"{mvs} | {_pct(r.get('bw_frac'))} | {_pct(r.get('exp_frac'))} | {_pct(r.get('flop_frac'))} |")
    summary = speedup_summary(records)
    if summary:
        lines.append("")
        lines.append("Our providers against every other provider measured in the same run (speedup = their time / "
                     "ours; memory = our peak / theirs):")
        lines.append("")
        lines.extend(summary)
    lines.append("")
    lines.append("vs ref = reference provider time / this time (>1: faster than the reference); peak = memory beyond "
                 "the inputs during one call (CPU: RSS high-water mark, subprocess per provider).")
    return "\n".join(lines) + "\n"


def speedup_summary(records: list[dict]) -> list[str]:
    """Markdown bullet lines: per case, each of our providers against each other provider."""
    by_case: dict = {}
    for r in records:
        if r.get("kind", "result") == "result" and r.get("status") == "ok":
            by_case.setdefault((r["run_id"], r["case"]), []).append(r)
    lines = []
    for (_, case), rs in by_case.items():
        for ours in (r for r in rs if r.get("ours")):
            parts = []
            for other in rs:
                if other is ours:
                    continue
                sp = other["median_ms"] / ours["median_ms"] if ours["median_ms"] else float("nan")
                mem = ""
                if ours.get("peak_bytes") is not None and other.get("peak_bytes"):
                    mem = f", mem {ours['peak_bytes'] / other['peak_bytes']:.3f}"
                parts.append(f"{sp:.2f}x vs {other['provider']}{mem}")
            extra = ""
            grad = (ours.get("info") or {}).get("grad_bytes")
            if grad and ours.get("peak_bytes") is not None:
                extra = f"; peak {_mib(ours['peak_bytes'])} MiB = {ours['peak_bytes'] / grad:.2f} x gradient"
            for key, label in (("bw_frac", "copy BW"), ("exp_frac", "exp"), ("flop_frac", "matmul")):
                if ours.get(key) is not None:
                    extra += f"; {100 * ours[key]:.0f}% of {label}"
            lines.append(f"- `{case}` **{ours['provider']}** {ours['median_ms']:.2f} ms: "
                         + ("; ".join(parts) or "no other provider") + extra)
    return lines


def write_plots(records: list[dict], out_dir: Path, slug: str) -> list[Path]:
    """Time and peak memory vs size, one line per provider, one PNG per (bench, mode, dtype, params)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullLocator
    except ImportError:
        return []
    groups: dict = {}
    for r in records:
        if r.get("kind", "result") != "result" or r.get("status") != "ok":
            continue
        params = ",".join(f"{k}={v}" for k, v in sorted(r.get("params", {}).items()))
        groups.setdefault((r["bench"], r["mode"], r["dtype"], params), []).append(r)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for (bench, mode, dtype, params), rs in sorted(groups.items()):
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
        for provider in sorted({r["provider"] for r in rs}):
            pts = sorted((r["size"], r["median_ms"], r["p20_ms"], r["p80_ms"], r.get("peak_bytes"))
                         for r in rs if r["provider"] == provider)
            xs = [p[0] for p in pts]
            ax_t.errorbar(xs, [p[1] for p in pts], yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]],
                          marker="o", label=provider, capsize=3)
            mem = [(p[0], p[4] / 2**20) for p in pts if p[4] is not None]
            if mem:
                ax_m.plot([m[0] for m in mem], [m[1] for m in mem], marker="o", label=provider)
        label = rs[0].get("size_label") or "size"
        ticks = sorted({r["size"]: ",".join(f"{k}={v}" for k, v in r["shape"].items()) for r in rs}.items())
        for ax, ylabel in ((ax_t, "median time (ms) [p20, p80]"), (ax_m, "peak memory beyond inputs (MiB)")):
            ax.set_xscale("log")
            ax.set_yscale("symlog" if ax is ax_m else "log")
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticks([t[0] for t in ticks])
            ax.set_xticklabels([t[1] for t in ticks], rotation=25, ha="right", fontsize=7)
            ax.set_xlabel(label)
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"{bench} {mode} {dtype} {params} on {slug}")
        fig.tight_layout()
        name = sanitize(f"{slug}-{bench}-{mode}-{dtype}-{params}") + ".png"
        path = out_dir / name
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths
