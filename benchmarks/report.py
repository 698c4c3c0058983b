"""Generated performance tables: every figure in README.md / docs/performance.md comes from a committed record.

``python -m benchmarks.report`` rewrites each block between ``<!-- generated:NAME begin -->`` and
``<!-- generated:NAME end -->`` in the Markdown files of :data:`DOCS` from the records in
``benchmarks/results/<device>.jsonl``; ``--check`` only says (exit 1) which blocks differ from what it would
write (``tests/test_benchmark_report.py`` runs that). Nothing outside the markers is touched.

Rules (:func:`render_table`):

* A row shows one case (a record ``case`` key); all its cells come from ONE run (one ``run_id``), the latest run
  in the file that measured the row's first provider (ours) fine at a clean commit. Without such a run the
  latest run at any commit is used and the row is marked ``†`` (its commit is dirty or unknown: not
  traceable). Without any record the row says so.
* A cell is the median time and the peak memory beyond the inputs. **Bold** marks the fastest time and the
  smallest peak of the row, whoever's they are.
* Under each table: the runs used (commit, date, run id, device, threads, versions, machine limits), and for
  each run whose commit is older than the code the table measures (``code_paths``: git log <commit>..HEAD
  touches them), a line saying that the code changed since.
"""
from __future__ import annotations

import argparse
import difflib
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from benchmarks.paths import REPO_ROOT, RESULTS_DIR
from benchmarks.records import load_jsonl

DOCS = (REPO_ROOT / "README.md", REPO_ROOT / "docs" / "performance.md")
CPU_CODE = ("csrc/cpu", "csrc/common", "csrc/module.cpp", "csrc/kl_div_checks.h", "csrc/importance_checks.h",
            "minitron/ops")
GPU_CODE = ("csrc/cuda", "csrc/common", "csrc/module.cpp", "csrc/kl_div_checks.h", "csrc/importance_checks.h",
            "minitron/ops", "minitron/kernels")
MARK = re.compile(r"(<!-- generated:(?P<name>[\w.-]+) begin -->\n)(?P<body>.*?)(<!-- generated:(?P=name) end -->)",
                  re.S)


@dataclass
class Row:
    label: str
    case: str  # the record's case key


@dataclass
class TableSpec:
    name: str
    results: str  # file name in benchmarks/results, or "cpu": the CPU records of every file there
    providers: list[str]  # columns, ours first (the run of a row is chosen by the first provider)
    rows: list[Row]
    code_paths: Sequence[str] = CPU_CODE
    headers: Optional[list[str]] = None  # column titles (default: the provider names)
    caption: str = ""


_KL = "kl_div|{mode}|N=1024,V=128256|{dtype}|T=1.0,{params}"
_IMP = "importance|forward|B=8,S=2048,C=4096|{dtype}|batch_agg=l2,group_size={g},mask={m},seq_agg=mean"
_SL = "{op}|forward|R={r},C=4096|{dtype}|block={b},dim={d},keep={k}"
_FL = "fused_linear_kl_div|full|N={n},Hs={h},Ht={h},V={v}|{dtype}|T=1.0,{params}"

CPU_KL_IMP = TableSpec(
    "cpu-kl-importance", "cpu", ["minitron-cpp", "torch-eager", "torch-compile"],
    [Row("`kl_div` fwd+bwd N=1024 V=128256 fp32, forward KL", _KL.format(mode="full", dtype="float32",
                                                                          params="kl_mode=forward")),
     Row("same, bf16", _KL.format(mode="full", dtype="bfloat16", params="kl_mode=forward")),
     Row("same, fp32, reverse KL", _KL.format(mode="full", dtype="float32", params="kl_mode=reverse")),
     Row("same, fp32, JSD beta=0.5", _KL.format(mode="full", dtype="float32", params="beta=0.5,kl_mode=jsd")),
     Row("same, fp32, loss only (`no_grad`)", _KL.format(mode="forward", dtype="float32", params="kl_mode=forward")),
     Row("`ImportanceAccumulator.update` [8, 2048, 4096] fp32, channels",
         _IMP.format(dtype="float32", g=1, m=False)),
     Row("same, heads (group 128)", _IMP.format(dtype="float32", g=128, m=False)),
     Row("same, bf16 channels", _IMP.format(dtype="bfloat16", g=1, m=False)),
     Row("same, fp32 channels, ragged mask", _IMP.format(dtype="float32", g=1, m=True)),
     Row("same, bf16 heads, ragged mask", _IMP.format(dtype="bfloat16", g=128, m=True)),
     Row("`BlockInfluence.update` [8, 2048, 4096] fp32, masked", "block_influence|forward|B=8,S=2048,C=4096|float32|"
                                                                 "mask=True")],
    headers=["ours (CPU C++)", "torch eager", "torch.compile"])

CPU_SLICING = TableSpec(
    "cpu-slicing", "cpu", ["minitron-cpp", "torch-index_select"],
    [Row("`gather_slices` [14336, 4096] fp32, keep 1/2 rows", _SL.format(op="gather_slices", r=14336, dtype="float32",
                                                                          b=1, d=0, k=0.5)),
     Row("same, keep 3/4 columns", _SL.format(op="gather_slices", r=14336, dtype="float32", b=1, d=1, k=0.75)),
     Row("same, bf16, keep 3/4 columns", _SL.format(op="gather_slices", r=14336, dtype="bfloat16", b=1, d=1, k=0.75)),
     Row("`gather_slices` [4096, 4096] fp32, blocks of 128 rows, keep 3/4",
         _SL.format(op="gather_slices", r=4096, dtype="float32", b=128, d=0, k=0.75)),
     Row("`compact_` (in place) [14336, 4096] fp32, keep 1/2 rows", _SL.format(op="compact_", r=14336,
                                                                                dtype="float32", b=1, d=0, k=0.5)),
     Row("same, keep 3/4 columns", _SL.format(op="compact_", r=14336, dtype="float32", b=1, d=1, k=0.75)),
     Row("`gather_slices`, one Llama-3-8B layer, 7 bf16 tensors in one call",
         "gather_slices_layer|forward|layers=1,H=4096,ffn=14336|bfloat16|tensors=7")],
    headers=["ours (CPU C++)", "torch `index_select`"])

CPU_FUSED = TableSpec(
    "cpu-fused-linear", "cpu", ["minitron-cpp", "matmul+minitron-cpp", "torch-eager", "torch-compile",
                                           "trl"],
    [Row("`fused_linear_kl_div` fwd+bwd N=1024 H=1024 V=32000 fp32",
         _FL.format(n=1024, h=1024, v=32000, dtype="float32", params="kl_mode=forward")),
     Row("same, JSD beta=0.5", _FL.format(n=1024, h=1024, v=32000, dtype="float32", params="beta=0.5,kl_mode=jsd")),
     Row("N=4096 H=2048 V=128256 fp32 (one call each)",
         _FL.format(n=4096, h=2048, v=128256, dtype="float32", params="kl_mode=forward"))],
    headers=["ours (fused)", "matmul + our `kl_div`", "torch eager", "torch.compile", "TRL 1.16 (tiled JSD)"])

GPU_KL = TableSpec(
    "gpu-h200", "nvidia-h200.jsonl", ["minitron-cuda", "minitron-triton", "torch-eager", "torch-compile", "liger"],
    [Row("`kl_div` fwd+bwd N=4096 V=128256 fp32", "kl_div|full|N=4096,V=128256|float32|T=1.0,kl_mode=forward"),
     Row("same, bf16", "kl_div|full|N=4096,V=128256|bfloat16|T=1.0,kl_mode=forward"),
     Row("`fused_linear_kl_div` N=4096 H=4096 V=128256 bf16",
         _FL.format(n=4096, h=4096, v=128256, dtype="bfloat16", params="kl_mode=forward")),
     Row("same, fp32", _FL.format(n=4096, h=4096, v=128256, dtype="float32", params="kl_mode=forward")),
     Row("same, bf16, JSD beta=0.5", _FL.format(n=4096, h=4096, v=128256, dtype="bfloat16",
                                                params="beta=0.5,kl_mode=jsd")),
     Row("`ImportanceAccumulator.update` [8, 2048, 4096] fp32, channels",
         _IMP.format(dtype="float32", g=1, m=False))],
    code_paths=GPU_CODE, headers=["minitron-cuda", "minitron-triton", "torch eager", "torch.compile", "Liger"])

GPU_SLICING = TableSpec(
    "gpu-h200-slicing", "nvidia-h200.jsonl", ["minitron-cuda", "minitron-triton", "torch-index_select"],
    [Row("`gather_slices` [14336, 4096] fp32, keep 1/2 rows", _SL.format(op="gather_slices", r=14336, dtype="float32",
                                                                          b=1, d=0, k=0.5)),
     Row("same, keep 3/4 columns", _SL.format(op="gather_slices", r=14336, dtype="float32", b=1, d=1, k=0.75)),
     Row("`compact_` (in place), keep 1/2 rows", _SL.format(op="compact_", r=14336, dtype="float32", b=1, d=0,
                                                            k=0.5)),
     Row("`gather_slices`, one Llama-3-8B layer, 7 bf16 tensors",
         "gather_slices_layer|forward|layers=1,H=4096,ffn=14336|bfloat16|tensors=7")],
    code_paths=GPU_CODE, headers=["minitron-cuda", "minitron-triton", "torch `index_select`"])

TABLES = {t.name: t for t in (CPU_KL_IMP, CPU_SLICING, CPU_FUSED, GPU_KL, GPU_SLICING)}

#: The record of the README's real-model demo (``make demo``): the block ``demo`` is rendered from it.
DEMO_RECORD = REPO_ROOT / "docs" / "demo" / "results.json"
DEMO_CODE = ("minitron/demo.py",)


def render_demo(record_path: Path = DEMO_RECORD) -> str:
    """The real demo's table, budgets and continuations (as its ``results.md``) from the committed record, with
    where it came from; a record at a dirty or unknown commit is marked untraceable."""
    from minitron.demo import real_results_markdown

    shown = record_path.relative_to(REPO_ROOT) if record_path.is_relative_to(REPO_ROOT) else record_path
    if not record_path.is_file():
        return f"*No demo record ({shown}): run `make demo` and commit its results.*\n"
    record = json.loads(record_path.read_text())
    commit = record.get("commit")
    lines = [real_results_markdown(record).rstrip("\n"), ""]
    src = f"Generated from `{shown}`"
    if is_clean_commit(commit):
        src += f" (`minitron demo` at commit {commit[:10]}, torch {record['versions'].get('torch')}, " \
               f"transformers {record['versions'].get('transformers')})."
        if code_changed_since(commit, DEMO_CODE):
            src += " The demo's code changed since that commit."
    else:
        src += f" † (commit {commit or 'unknown'}: not traceable)."
    lines.append(src)
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# git
# ----------------------------------------------------------------------------------------------


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def code_changed_since(commit: str, paths: Sequence[str]) -> Optional[bool]:
    """Whether a commit after ``commit`` (up to HEAD) touches ``paths``; None when git cannot tell."""
    if _git("cat-file", "-e", f"{commit}^{{commit}}") is None:
        return None
    out = _git("log", "--format=%H", f"{commit}..HEAD", "--", *paths)
    return None if out is None else bool(out.strip())


def is_clean_commit(commit: Optional[str]) -> bool:
    return bool(commit) and not str(commit).endswith("-dirty") and re.fullmatch(r"[0-9a-f]{40}", str(commit)) is not None


# ----------------------------------------------------------------------------------------------
# rendering
# ----------------------------------------------------------------------------------------------


def _fmt_ms(ms: float) -> str:
    if ms >= 10000:
        return f"{ms / 1000:.1f} s"
    if ms >= 100:
        return f"{ms:.0f} ms"
    if ms >= 10:
        return f"{ms:.1f} ms"
    if ms >= 1:
        return f"{ms:.2f} ms"
    return f"{ms:.3f} ms"


def _fmt_mib(b: Optional[float]) -> str:
    if b is None:
        return "-"
    mib = b / 2**20
    return f"{mib:.1f} MiB" if mib < 10 else f"{mib:,.0f} MiB"


def _runs(records: list[dict]) -> tuple[dict, dict]:
    """(machine record per run id, {(run id, case, provider): result record}) in file order."""
    machines, results = {}, {}
    for r in records:
        if r.get("kind") == "machine":
            machines[r["run_id"]] = r
        elif r.get("kind", "result") == "result":
            results[(r["run_id"], r["case"], r["provider"])] = r
    return machines, results


def _pick_run(spec: TableSpec, row: Row, results: dict) -> tuple[Optional[str], bool]:
    """(run id, traceable) for a row: the latest run with our provider ok at a clean commit, else the latest."""
    ours = spec.providers[0]
    runs = sorted((r.get("timestamp") or "", rid) for (rid, case, prov), r in results.items()
                  if case == row.case and prov == ours and r.get("status") == "ok")
    runs = [rid for _, rid in runs]
    clean = [rid for rid in runs if is_clean_commit(results[(rid, row.case, ours)].get("git_commit"))]
    if clean:
        return clean[-1], True
    return (runs[-1], False) if runs else (None, False)


def render_table(spec: TableSpec, records: list[dict],
                 changed: Callable[[str, Sequence[str]], Optional[bool]] = code_changed_since) -> str:
    """The Markdown of one table (see the module docstring for the rules)."""
    machines, results = _runs(records)
    heads = spec.headers or spec.providers
    lines = ["| case | " + " | ".join(heads) + " | run |", "|---" * (len(heads) + 2) + "|"]
    used: dict[str, bool] = {}
    for row in spec.rows:
        rid, traceable = _pick_run(spec, row, results)
        if rid is None:
            lines.append(f"| {row.label} | " + " | ".join(["no record"] + [""] * (len(heads) - 1)) + " | - |")
            continue
        used[rid] = traceable
        cells = {p: results.get((rid, row.case, p)) for p in spec.providers}
        ok = {p: r for p, r in cells.items() if r is not None and r.get("status") == "ok" and r.get("median_ms")}
        # ties are judged on the printed figures: equal-looking entries are all bold
        best_t = _fmt_ms(min(r["median_ms"] for r in ok.values())) if len(ok) > 1 else None
        peaks = [r["peak_bytes"] for r in ok.values() if r.get("peak_bytes") is not None]
        best_m = _fmt_mib(min(peaks)) if len(peaks) > 1 else None
        out = []
        for p in spec.providers:
            r = cells[p]
            if r is None:
                out.append("")
            elif p not in ok:
                out.append(str(r.get("status")))
            else:
                t = _fmt_ms(r["median_ms"])
                t = f"**{t}**" if t == best_t else t
                m = _fmt_mib(r.get("peak_bytes"))
                m = f"**{m}**" if m == best_m and r.get("peak_bytes") is not None else m
                out.append(f"{t}, {m}")
        commit = (cells[spec.providers[0]] or {}).get("git_commit")
        tag = (commit[:7] if commit else "none") + ("" if traceable else " †")
        lines.append(f"| {row.label} | " + " | ".join(out) + f" | `{tag}` |")
    lines.append("")
    lines.append("Each cell: median time, peak memory beyond the inputs; **bold** = the row's fastest time and "
                 "smallest peak. Runs:")
    lines.append("")
    for rid in used:
        m = machines.get(rid, {})
        any_rec = next(r for (k, _c, _p), r in results.items() if k == rid)
        commit = any_rec.get("git_commit")
        v = any_rec.get("versions") or {}
        lim = m.get("limits") or {}
        extra = ""
        if lim.get("copy_gbps"):
            extra = f"; copy bandwidth {lim['copy_gbps']:,.1f} GB/s measured in the run"
        lines.append(f"- `{commit or 'no commit recorded'}` run `{rid}` ({(any_rec.get('timestamp') or '')[:10]}): "
                     f"{any_rec.get('device')}, {any_rec.get('threads')} threads, torch {v.get('torch')}"
                     f"{', triton ' + str(v.get('triton')) if v.get('triton') else ''}{extra}.")
        if not used[rid]:
            lines.append("  † Recorded from a tree with uncommitted changes or without a commit: not traceable to "
                         "code; to be re-recorded.")
        if is_clean_commit(commit):
            ch = changed(str(commit), spec.code_paths)
            if ch:
                lines.append(f"  The code measured here ({', '.join(spec.code_paths)}) has changed since this "
                             f"commit: these figures predate those changes.")
            elif ch is None:
                lines.append("  (This checkout's git history cannot say whether the code changed since.)")
        elif commit is None:
            lines.append("  No commit recorded: whether the code changed since cannot be known.")
    return "\n".join(lines) + "\n"


def load_results(name: str, results_dir: Path = RESULTS_DIR) -> list[dict]:
    """The records of ``results_dir/name``; ``name == "cpu"``: the CPU records of every ``*.jsonl`` there."""
    if name == "cpu":
        out: list[dict] = []
        for path in sorted(results_dir.glob("*.jsonl")):
            out += [r for r in load_jsonl(path) if r.get("device_type") == "cpu"]
        return out
    path = results_dir / name
    return load_jsonl(path) if path.exists() else []


def render_blocks(text: str, render: Callable[[str], str]) -> str:
    """``text`` with every generated block's body replaced by ``render(name)``."""
    def sub(m: re.Match) -> str:
        return m.group(1) + render(m.group("name")) + m.group(4)

    return MARK.sub(sub, text)


def default_render(results_dir: Path = RESULTS_DIR) -> Callable[[str], str]:
    cache: dict[str, list[dict]] = {}

    def render(name: str) -> str:
        if name == "demo":
            return render_demo()
        if name not in TABLES:
            raise KeyError(f"unknown generated block {name!r}; known: {', '.join(TABLES)}")
        spec = TABLES[name]
        if spec.results not in cache:
            cache[spec.results] = load_results(spec.results, results_dir)
        return render_table(spec, cache[spec.results])

    return render


def check(paths: Sequence[Path] = DOCS, results_dir: Path = RESULTS_DIR) -> list[str]:
    """Unified diffs of the files whose generated blocks are out of date (empty: all current)."""
    render = default_render(results_dir)
    diffs = []
    for p in paths:
        old = p.read_text()
        new = render_blocks(old, render)
        if new != old:
            diffs.append("".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), str(p), str(p))))
    return diffs


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report",
                                 description="Regenerate the performance tables between the generated-block markers "
                                             "of README.md and docs/performance.md from benchmarks/results/*.jsonl.")
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 and show the diff if out of date")
    ap.add_argument("--results-dir", default=str(RESULTS_DIR))
    ap.add_argument("files", nargs="*", help="Markdown files (default: README.md docs/performance.md)")
    a = ap.parse_args(argv)
    paths = [Path(f) for f in a.files] or list(DOCS)
    if a.check:
        diffs = check(paths, Path(a.results_dir))
        for d in diffs:
            print(d)
        print("generated tables are " + ("OUT OF DATE: run python -m benchmarks.report" if diffs else "current"))
        return 1 if diffs else 0
    render = default_render(Path(a.results_dir))
    for p in paths:
        old = p.read_text()
        new = render_blocks(old, render)
        if new != old:
            p.write_text(new)
            print(f"updated {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
