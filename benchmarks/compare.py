"""Wall-clock regression comparison of a run with a baseline (``--compare``): time ratios (CPU) or absolute
times (same GPU), peak memory, status, missing cases; re-measurement of time regressions; the report text.
The CPU gate proper counts instructions instead: :mod:`benchmarks.instructions`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

from benchmarks.records import add_ratios
from benchmarks.stats import quantile


@dataclass
class Finding:
    case: str
    provider: str
    kind: str  # "time" | "memory" | "status"
    baseline: Optional[float]
    current: Optional[float]
    how: str  # "ratio to <ref>" | "absolute ms" | "peak bytes" | ...
    regressed: bool
    detail: str = ""
    tolerance: Optional[float] = None  # the tolerance applied when not the report's

    @property
    def change(self) -> Optional[float]:
        if self.baseline and self.current is not None:
            return self.current / self.baseline - 1.0
        return None


@dataclass
class CompareReport:
    findings: list[Finding] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    tolerance: float = 0.25
    note: str = ""
    unbaselined: list[str] = field(default_factory=list)  # current cases of ours with no baseline entry
    machine_class: Optional[str] = None
    cross: bool = False  # no baseline records of this run's machine class: compared across classes

    @property
    def regressions(self) -> list[Finding]:
        return [f for f in self.findings if f.regressed]

    @property
    def ok(self) -> bool:
        """No regression. A case without a baseline entry, or a run that shares no case with the baseline, is
        reported (see :meth:`verdict`), never a failure: the baseline, not the user's machine, lacks something."""
        return not self.regressions

    def verdict(self) -> str:
        """One line: what was compared, against which baseline class, and what could not be compared."""
        compared = sorted({(f.case, f.provider) for f in self.findings})
        where = (f"against other machine classes at the cross-machine tolerance (no baseline of {self.machine_class})"
                 if self.cross else f"against a baseline of this machine class ({self.machine_class})")
        cannot = []
        if self.unbaselined:
            cannot.append(f"{len(self.unbaselined)} without a baseline entry (record: {RECORD_BASELINE_CMD})")
        not_run = [s for s in self.skipped if "not run now" in s]
        if not_run:
            cannot.append(f"{len(not_run)} baseline cases not run now")
        tail = "; could not compare " + ", ".join(cannot) if cannot else ""
        return (f"verdict: {'PASS' if self.ok else 'FAIL'}: compared {len(compared)} cases "
                f"{where}{tail}")


RATIO_HOW = "time /"
# how a machine records (or extends) the wall-clock baseline: several runs on a clean commit, appended
RECORD_BASELINE_CMD = ("for i in 1 2 3; do python -m benchmarks --quick --no-save --save-baseline /tmp/b$i.jsonl; "
                       "done; cat /tmp/b?.jsonl >> benchmarks/baselines/cpu.jsonl")
MEMORY_SLACK_BYTES = 4 * 2**20  # RSS is page/allocator granular: ignore growth below this


def _latest(records: Iterable[dict]) -> dict:
    """Latest record per (case, provider) (file order breaks timestamp ties)."""
    out: dict = {}
    for r in records:
        if r.get("kind", "result") != "result":
            continue
        out[(r["case"], r["provider"])] = r
    return out


def _aggregate(records: Iterable[dict]) -> dict:
    """Per (case, provider): the latest record, with its time ratios, median time and peak replaced by the
    median over every run in ``records`` that measured it (a baseline made of several runs is robust to one
    disturbed run)."""
    runs: dict = {}
    for r in records:
        if r.get("kind", "result") == "result":
            runs.setdefault((r["case"], r["provider"]), []).append(r)
    out = {}
    for key, rs in runs.items():
        agg = dict(rs[-1])
        ok = [r for r in rs if r.get("status") == "ok"]
        if ok and agg.get("status") == "ok":
            for field_ in ("ref_ratio_min", "ref_ratio", "median_ms", "peak_bytes"):
                vals = [r[field_] for r in ok if r.get(field_) is not None]
                if vals:
                    agg[field_] = quantile(vals, 0.5)
            agg["runs"] = len(ok)
        out[key] = agg
    return out


CROSS_MACHINE_TOLERANCE = 2.0


def compare(current: list[dict], baseline: list[dict], tolerance: float = 0.25,
            memory_tolerance: Optional[float] = None,
            cross_machine_tolerance: float = CROSS_MACHINE_TOLERANCE, gate_time: bool = True) -> CompareReport:
    """Compare our providers' records in ``current`` against ``baseline``.

    Time: on CPU (or when the GPU names differ) the ratio of our time to the reference provider's time in the
    same run must not grow by more than ``tolerance`` (relative). The ratio uses each provider's fastest sample
    (``ref_ratio_min``; falls back to medians): on a shared CPU interference only ever adds time, so the
    fastest samples are the most reproducible. On the same GPU the absolute median must not grow. Memory: peak bytes must not grow by more than ``memory_tolerance`` (defaults
    to ``tolerance``) plus 4 MiB. Baseline values are medians over all runs the baseline file holds for a
    case (see :func:`_aggregate`); several quick runs make a robust baseline. A case measured fine in the baseline that is now unavailable/failing is a
    regression. Baseline cases not run now are listed as skipped.

    Machine classes (:func:`machine_class`): ratios measured on another kind of CPU are not comparable at
    ``tolerance``. When the baseline holds records of the current run's class, only those are used; when it
    holds none, all of its records are used and a time ratio fails only past ``cross_machine_tolerance``
    (default +200%: catches a lost kernel or a fallback to a slow path, not a 25% slowdown). The report says
    which applied.

    A case of ours in ``current`` that the baseline lacks is listed as skipped and counted in the verdict with
    the command that records it, never a failure (a new case, or a machine class the baseline predates, is
    the baseline's gap, not a regression). ``gate_time=False``: time findings are reported (their
    verdict in the detail) but never fail; memory, status and missing cases still do.
    """
    mem_tol = tolerance if memory_tolerance is None else memory_tolerance
    add_ratios(current)
    add_ratios(baseline)
    cur = _latest(current)
    classes = {r.get("machine_class") for r in current if r.get("kind", "result") == "result"}
    cur_class = next(iter(classes)) if len(classes) == 1 else None
    # records without a class (older files) match each other, as before classes existed
    same = [r for r in baseline if len(classes) == 1 and r.get("kind", "result") == "result"
            and r.get("machine_class") == cur_class]
    cross = not same
    base = _aggregate(same if same else baseline)
    rep = CompareReport(tolerance=tolerance, machine_class=cur_class, cross=cross)
    if cross:
        known = sorted({str(r.get("machine_class")) for r in baseline if r.get("kind", "result") == "result"})
        rep.note = (f"no baseline records of this machine class ({cur_class}); baseline classes: "
                    f"{', '.join(known) or 'none'}. CPU time ratios are compared with the cross-machine tolerance "
                    f"{cross_machine_tolerance:.0%} (ratios differ across CPUs).")
    for key, b in base.items():
        if not b.get("ours"):
            continue
        c = cur.get(key)
        if c is None:
            rep.skipped.append(f"{key[0]} [{key[1]}]: not run now")
            continue
        if b.get("status") != "ok":
            rep.skipped.append(f"{key[0]} [{key[1]}]: baseline status {b.get('status')}")
            continue
        if c.get("status") != "ok":
            rep.findings.append(Finding(key[0], key[1], "status", None, None, "status", True,
                                        f"was ok, now {c.get('status')}: {c.get('error') or ''}".strip()))
            continue
        same_gpu = (c.get("device_type") == "cuda" and b.get("device_type") == "cuda"
                    and c.get("device") == b.get("device"))
        if same_gpu:
            bv, cv, how = b["median_ms"], c["median_ms"], "absolute median ms"
        elif b.get("ref_ratio_min") is not None and c.get("ref_ratio_min") is not None:
            bv, cv, how = b["ref_ratio_min"], c["ref_ratio_min"], f"{RATIO_HOW} {c.get('reference')} fastest time"
        elif b.get("ref_ratio") is not None and c.get("ref_ratio") is not None:
            bv, cv, how = b["ref_ratio"], c["ref_ratio"], f"{RATIO_HOW} {c.get('reference')} median time"
        else:
            rep.skipped.append(f"{key[0]} [{key[1]}]: no reference ratio to compare (time)")
            bv = cv = None
            how = ""
        tol = max(tolerance, c.get("tolerance") or 0.0)
        if cross and not same_gpu:
            tol = max(tol, cross_machine_tolerance)
        if bv is not None and cv is not None:
            rep.findings.append(Finding(key[0], key[1], "time", bv, cv, how, cv > bv * (1.0 + tol),
                                        tolerance=tol))
        bp, cp = b.get("peak_bytes"), c.get("peak_bytes")
        if bp is not None and cp is not None:
            limit = bp * (1.0 + mem_tol) + MEMORY_SLACK_BYTES
            rep.findings.append(Finding(key[0], key[1], "memory", bp, cp, "peak bytes", cp > limit))
    for key, c in cur.items():
        if not c.get("ours") or key in base:
            continue
        rep.unbaselined.append(f"{key[0]} [{key[1]}]")
        rep.skipped.append(f"{key[0]} [{key[1]}]: no baseline entry "
                           f"({'baseline of another machine class' if cross else 'not measured in the baseline'})")
    if not gate_time:
        for f in rep.findings:
            if f.kind == "time" and f.regressed:
                f.regressed = False
                f.detail = (f.detail + " (time is informational: over the tolerance, not gated)").strip()
    return rep


def confirm_time_regressions(rep: CompareReport, remeasure: Callable[[str, str], Optional[float]],
                             attempts: int) -> None:
    """Re-measure each ratio-based time regression up to ``attempts`` times (``remeasure(case, provider)``
    returns the new ratio, or None when it could not be measured); a finding whose re-measured ratio is within
    the tolerance is cleared (noise), otherwise it stays, with the re-measured ratios in its detail."""
    for f in rep.findings:
        if not (f.regressed and f.kind == "time" and f.how.startswith(RATIO_HOW)) or attempts <= 0:
            continue
        seen = []
        for _ in range(attempts):
            ratio = remeasure(f.case, f.provider)
            if ratio is None:
                continue
            seen.append(ratio)
            if ratio <= f.baseline * (1.0 + (f.tolerance if f.tolerance is not None else rep.tolerance)):
                f.regressed = False
                f.current = ratio
                f.detail = f"(passed when re-measured: {', '.join(f'{x:.4g}' for x in seen)})"
                break
        else:
            f.detail = (f"(confirmed by {len(seen)} re-measurements: {', '.join(f'{x:.4g}' for x in seen)})"
                        if seen else "(could not be re-measured)")


def format_compare(rep: CompareReport) -> str:
    lines = [f"Regression check (tolerance {rep.tolerance:.0%}): {len(rep.findings)} checks, "
             f"{len(rep.regressions)} regressions, {len(rep.skipped)} skipped"]
    if rep.note:
        lines.append(f"  note: {rep.note}")

    def fmt(v: Optional[float], kind: str) -> str:
        if v is None:
            return "-"
        if kind == "memory":
            return f"{v / 2**20:.1f} MiB"
        return f"{v:.4g}"

    for f in rep.findings:
        tag = "REGRESSION" if f.regressed else "ok"
        ch = f" ({f.change:+.1%})" if f.change is not None else ""
        if f.tolerance is not None and f.tolerance != rep.tolerance:
            ch += f" [case tolerance {f.tolerance:.0%}]"
        lines.append(f"  [{tag:>10}] {f.case} [{f.provider}] {f.kind}: {f.how}: baseline {fmt(f.baseline, f.kind)}"
                     f" -> now {fmt(f.current, f.kind)}{ch} {f.detail}".rstrip())
    for s in rep.skipped:
        lines.append(f"  [   skipped] {s}")
    if not rep.findings:
        lines.append("  nothing could be compared: no case of the baseline was measured in this run")
    if rep.unbaselined:
        lines.append(f"  note: {len(rep.unbaselined)} cases have no baseline entry; to record them on this machine "
                     f"(clean commit): {RECORD_BASELINE_CMD}")
    lines.append(rep.verdict())
    lines.append("RESULT: " + ("PASS" if rep.ok else "FAIL"))
    return "\n".join(lines)
