"""The CPU regression gate (benchmarks/instructions.py): comparison rules, the committed baseline, and - under
valgrind - that it passes repeated runs of unchanged code and fails a planted ~1.3x slowdown of one kernel."""
from __future__ import annotations

import shutil

import pytest

from benchmarks import instructions as gi

KL_FULL = "kl_div|full|N=32,V=4096|float32|T=1.0,kl_mode=forward"


def _r(case, n, cls="A", status="ok", provider="minitron-cpp"):
    return {"kind": "instructions", "case": case, "provider": provider, "instr_per_call": n, "status": status,
            "instr_class": cls, "error": None if status == "ok" else "boom"}


def test_gate_tolerance_and_median_baseline():
    base = [_r("a", 1000), _r("a", 1002), _r("a", 5000)]  # median 1002: one odd run does not move it
    assert gi.compare_instructions([_r("a", 1030)], base).ok
    rep = gi.compare_instructions([_r("a", 1040)], base)
    assert not rep.ok and rep.failures[0].verdict == "REGRESSION"
    assert "REGRESSION" in gi.format_gate(rep) and "FAIL" in gi.format_gate(rep)
    assert gi.compare_instructions([_r("a", 500)], base).ok  # fewer instructions is fine


def test_gate_missing_and_failed_cases():
    base = [_r("a", 1000)]
    rep = gi.compare_instructions([_r("a", 1000), _r("new", 10)], base)
    # same class: a case without an entry is reported with the command that records it, never a failure
    assert rep.ok and [f.verdict for f in rep.findings] == ["ok", "no-entry"]
    line = rep.verdict()
    assert line.startswith("verdict: PASS: compared 1 cases against this machine class")
    assert "could not compare 1 cases without a baseline entry" in line and "benchmarks.instructions --out" in line
    assert line in gi.format_gate(rep)
    rep = gi.compare_instructions([_r("a", None, status="error")], base)
    assert not rep.ok and rep.failures[0].verdict == "FAILED"
    rep = gi.compare_instructions([_r("a", 1000)], base + [_r("gone", 10)])
    assert rep.ok and "not run now" in rep.note


def test_gate_other_machine_class_uses_cross_class_tolerance():
    base = [_r("a", 1000, cls="A")]
    rep = gi.compare_instructions([_r("a", 1300, cls="B"), _r("new", 10, cls="B")], base)
    assert rep.ok and not rep.same_class and "machine class" in rep.note  # reported, missing not failed
    assert "compared 1 cases against other machine classes" in rep.verdict() and "(no baseline of B)" in rep.verdict()
    rep = gi.compare_instructions([_r("a", 1600, cls="B")], base)
    assert not rep.ok


def test_gate_with_no_baseline_at_all_passes_and_says_so():
    rep = gi.compare_instructions([_r("a", 1000), _r("b", 10)], [])
    assert rep.ok and not rep.same_class
    assert "compared 0 cases" in rep.verdict() and "could not compare 2 cases" in rep.verdict()
    rep = gi.compare_instructions([_r("a", None, status="error")], [])
    assert not rep.ok  # a case that fails to run fails with or without a baseline


def test_gate_cases_are_unique_small_and_ours():
    cases = gi.gate_cases()
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)) and all(c.provider == "minitron-cpp" for c in cases)
    assert {c.bench for c in cases} >= {"kl_div", "fused_linear_kl_div", "importance", "block_influence",
                                        "gather_slices", "compact_"}
    assert any(KL_FULL in i for i in ids)


def test_committed_instruction_baseline_covers_every_case():
    if not gi.BASELINE.exists():
        pytest.skip("no committed instruction baseline yet")
    recs = gi.load_records(gi.BASELINE)
    by_class: dict = {}
    for r in recs:
        assert r["kind"] == "instructions" and r["status"] == "ok" and r["instr_per_call"] > 0
        by_class.setdefault(r["instr_class"], set()).add(f"{r['case']}|{r['provider']}")
    want = {c.id for c in gi.gate_cases()}
    for cls, ids in by_class.items():
        assert ids == want, f"baseline class {cls}: missing {sorted(want - ids)}, extra {sorted(ids - want)}"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind not installed (CI installs it: .ci/run)")
def test_gate_passes_unchanged_runs_and_fails_a_planted_slowdown():
    cases = [c.id for c in gi.gate_cases() if c.case_key == KL_FULL]
    first = gi.run_gate(cases)
    second = gi.run_gate(cases)
    planted = gi.run_gate(cases, plant=KL_FULL)
    assert [r["status"] for r in first + second + planted] == ["ok"] * 3, first + second + planted
    rep = gi.compare_instructions(second, first)
    assert rep.ok, gi.format_gate(rep)
    assert abs(rep.findings[0].change) < 0.005, gi.format_gate(rep)  # counts repeat to well under 1%
    ratio = planted[0]["instr_per_call"] / first[0]["instr_per_call"]
    assert 1.2 < ratio < 1.45, ratio  # the planted extra pass is a ~1.3x slowdown of this kernel call
    rep = gi.compare_instructions(planted, first)
    assert not rep.ok and rep.failures[0].verdict == "REGRESSION", gi.format_gate(rep)
