"""Unit tests of the benchmark harness logic (benchmarks/_harness.py): statistics, records, regression
comparison, device naming, discovery, memory measurement. No heavy benchmarking."""
from __future__ import annotations

import json
import math
import os
import sys
import textwrap

import pytest
import torch

from benchmarks import _harness as h


# ---------------------------------------------------------------------------------------------- stats


@pytest.mark.parametrize("q", [0.0, 0.2, 0.5, 0.8, 1.0])
def test_quantile_matches_numpy(q):
    np = pytest.importorskip("numpy")
    xs = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0, 7.5]
    assert h.quantile(xs, q) == pytest.approx(float(np.quantile(xs, q)))


def test_quantile_edge_cases():
    assert math.isnan(h.quantile([], 0.5))
    assert h.quantile([3.0], 0.2) == 3.0
    with pytest.raises(ValueError):
        h.quantile([1.0], 1.5)


def test_summarize():
    s = h.summarize([4.0, 1.0, 3.0, 2.0, 5.0])
    assert s["median_ms"] == 3.0
    assert s["p20_ms"] == pytest.approx(1.8)
    assert s["p80_ms"] == pytest.approx(4.2)
    assert s["min_ms"] == 1.0 and s["repeats"] == 5


# ---------------------------------------------------------------------------------------------- device names


@pytest.mark.parametrize("raw, slug", [
    ("NVIDIA H100 80GB HBM3", "nvidia-h100-80gb-hbm3"),
    ("NVIDIA H200", "nvidia-h200"),
    ("AMD EPYC", "amd-epyc"),
    ("AMD EPYC 7763 64-Core Processor", "amd-epyc-7763-64-core"),
    ("Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz", "intel-xeon-platinum-8375c"),
    ("  ", "unknown"),
    ("a/b\\c:d*e", "a-b-c-d-e"),
])
def test_sanitize(raw, slug):
    assert h.sanitize(raw) == slug
    assert "/" not in h.sanitize(raw) and " " not in h.sanitize(raw)


def test_environment_has_device_and_versions():
    env = h.environment("cpu")
    assert env["device_type"] == "cpu"
    assert env["device_slug"] == h.sanitize(env["device"])
    assert env["versions"]["torch"] == torch.__version__
    assert env["threads"] >= 1


# ---------------------------------------------------------------------------------------------- cases, records


def _noop_setup(case, device):
    return h.Bench(fn=lambda: None)


def _case(provider="minitron-cpp", **kw):
    base = dict(bench="kl_div", provider=provider, mode="full", shape={"N": 8, "V": 16}, dtype="float32",
                setup=_noop_setup, params={"kl_mode": "forward"}, reference="torch-eager")
    base.update(kw)
    return h.Case(**base)


def test_case_identity_and_ours():
    c = _case()
    assert c.ours is True
    assert _case(provider="torch-eager").ours is False
    assert c.case_key == "kl_div|full|N=8,V=16|float32|kl_mode=forward"
    assert c.id == c.case_key + "|minitron-cpp"
    assert c.x == 128
    with pytest.raises(ValueError, match="mode"):
        _case(mode="sideways")


def test_make_record_format_and_fractions():
    env = {"device": "AMD EPYC", "device_slug": "amd-epyc", "device_type": "cpu", "threads": 2,
           "git_commit": "abc", "versions": {"torch": "2.13.0"}}
    c = _case(bytes_moved=2e9, exps=1e9, flops=4e9)
    res = {"status": "ok", "median_ms": 1000.0, "p20_ms": 900.0, "p80_ms": 1100.0, "min_ms": 850.0, "repeats": 5,
           "peak_bytes": 1234, "peak_method": "rss-hwm(clear_refs)"}
    rec = h.make_record(c, res, env, "run1", {"copy_gbps": 4.0, "exp_gps": 2.0, "matmul_gflops": 8.0})
    json.dumps(rec)  # serialisable
    for key in ("run_id", "timestamp", "device", "device_type", "git_commit", "versions", "bench", "case",
                "provider", "ours", "mode", "shape", "dtype", "median_ms", "p20_ms", "p80_ms", "peak_bytes",
                "status", "reference"):
        assert key in rec, key
    assert rec["bw_frac"] == pytest.approx(0.5)
    assert rec["exp_frac"] == pytest.approx(0.5)
    assert rec["flop_frac"] == pytest.approx(0.5)
    bad = h.make_record(c, {"status": "unavailable", "error": "not built"}, env, "run1", {"copy_gbps": 4.0})
    assert bad["status"] == "unavailable" and bad["median_ms"] is None and "bw_frac" not in bad


def test_jsonl_roundtrip(tmp_path):
    path = tmp_path / "r" / "x.jsonl"
    h.append_jsonl(path, [{"a": 1}, {"b": 2}])
    h.append_jsonl(path, [{"c": 3}])
    assert h.load_jsonl(path) == [{"a": 1}, {"b": 2}, {"c": 3}]
    path.write_text('{"a": 1}\nnot json\n')
    with pytest.raises(ValueError, match=":2:"):
        h.load_jsonl(path)


# ---------------------------------------------------------------------------------------------- compare


def _rec(provider, ms, *, case="kl|full|N=8", run="r", device="AMD EPYC", device_type="cpu", peak=100 * 2**20,
         status="ok", ours=None):
    return {"kind": "result", "run_id": run, "case": case, "provider": provider, "median_ms": ms,
            "peak_bytes": peak, "status": status, "device": device, "device_type": device_type,
            "reference": "torch-eager", "ours": provider.startswith("minitron") if ours is None else ours}


def _pair(ours_ms, ref_ms, **kw):
    return [_rec("minitron-cpp", ours_ms, **kw), _rec("torch-eager", ref_ms, **{**kw, "peak": 500 * 2**20})]


def test_compare_cpu_uses_ratio_to_reference():
    base = _pair(100.0, 1000.0, run="b")
    # whole machine 2x slower, same ratio: pass
    rep = h.compare(_pair(200.0, 2000.0), base, 0.25)
    assert rep.ok and not rep.regressions
    assert any(f.kind == "time" and "torch-eager" in f.how for f in rep.findings)
    # ours 1.2x slower relative to eager: within 25%
    assert h.compare(_pair(120.0, 1000.0), base, 0.25).ok
    # 1.5x slower relative to eager: regression
    rep = h.compare(_pair(150.0, 1000.0), base, 0.25)
    assert not rep.ok
    assert [f.kind for f in rep.regressions] == ["time"]
    text = h.format_compare(rep)
    assert "REGRESSION" in text and "FAIL" in text and "minitron-cpp" in text
    # the same slowdown passes with a looser tolerance
    assert h.compare(_pair(150.0, 1000.0), base, 0.6).ok


def _classed(ours_ms, ref_ms, cls, **kw):
    recs = _pair(ours_ms, ref_ms, **kw)
    for r in recs:
        r["machine_class"] = cls
    return recs


def test_compare_uses_same_machine_class_else_cross_machine_tolerance():
    base = _classed(100.0, 1000.0, "A", run="b1") + _classed(300.0, 1000.0, "B", run="b2")
    # same class: only class A's records count (ratio 0.1), so 1.5x is a regression
    rep = h.compare(_classed(150.0, 1000.0, "A"), base, 0.25)
    assert not rep.ok and rep.regressions[0].baseline == pytest.approx(0.1) and not rep.note
    # class B's baseline ratio is 0.3: 0.35 passes there
    assert h.compare(_classed(350.0, 1000.0, "B"), base, 0.25).ok
    # an unknown class: every record (median ratio 0.2) with the cross-machine tolerance (+200%)
    rep = h.compare(_classed(500.0, 1000.0, "C"), base, 0.25)
    assert rep.ok and "machine class" in rep.note and "machine class" in h.format_compare(rep)
    rep = h.compare(_classed(700.0, 1000.0, "C"), base, 0.25)
    assert not rep.ok and rep.regressions[0].tolerance == pytest.approx(2.0)
    assert h.compare(_classed(700.0, 1000.0, "C"), base, 0.25, cross_machine_tolerance=3.0).ok


def test_machine_class_names_isa_threads_and_caches():
    env = h.environment("cpu")
    cls = env["machine_class"]
    assert cls.startswith(env["device"]) and f"threads={env['threads']}" in cls
    assert "ours=" in cls and "torch=" in cls and "L3=" in cls


def test_compare_gpu_absolute_same_name_and_ratio_across_gpus():
    base = _pair(1.0, 10.0, run="b", device="NVIDIA H100", device_type="cuda")
    # same GPU: absolute time counts even if the reference got slower too
    rep = h.compare(_pair(1.5, 15.0, device="NVIDIA H100", device_type="cuda"), base, 0.25)
    assert not rep.ok and rep.regressions[0].how == "absolute median ms"
    # another GPU: falls back to the ratio, which is unchanged
    rep = h.compare(_pair(1.5, 15.0, device="NVIDIA H200", device_type="cuda"), base, 0.25)
    assert rep.ok


def test_compare_memory_and_status_regressions():
    base = _pair(100.0, 1000.0, run="b")
    cur = _pair(100.0, 1000.0)
    cur[0]["peak_bytes"] = 200 * 2**20
    rep = h.compare(cur, base, 0.25)
    assert [f.kind for f in rep.regressions] == ["memory"]
    cur = _pair(100.0, 1000.0)
    cur[0]["peak_bytes"] = 100 * 2**20 + 2**20  # within the slack
    assert h.compare(cur, base, 0.25).ok
    cur = _pair(100.0, 1000.0)
    cur[0].update(status="unavailable", median_ms=None, error="extension not built")
    rep = h.compare(cur, base, 0.25)
    assert not rep.ok and rep.regressions[0].kind == "status"
    assert "extension not built" in h.format_compare(rep)


def test_compare_ignores_non_ours_and_reports_skips():
    base = _pair(100.0, 1000.0, run="b") + _pair(100.0, 1000.0, run="b", case="other")
    cur = _pair(100.0, 1000.0)
    cur[1]["median_ms"] = 100000.0  # eager got slower: ours' ratio improves, eager itself is not checked
    rep = h.compare(cur, base, 0.25)
    assert rep.ok
    assert any("other" in s and "not run now" in s for s in rep.skipped)
    assert all(f.provider == "minitron-cpp" for f in rep.findings)


def test_compare_with_nothing_in_common_says_so_and_passes():
    rep = h.compare(_pair(1.0, 2.0, case="a"), _pair(1.0, 2.0, run="b", case="b"), 0.25)
    text = h.format_compare(rep)
    assert rep.ok and "no baseline entry" in text
    assert "verdict: PASS: compared 0 cases" in text and "could not compare 1 without a baseline entry" in text
    assert "1 baseline cases not run now" in text


def test_compare_reports_cases_missing_from_a_baseline_with_the_command_that_records_them():
    base = _classed(100.0, 1000.0, "A", run="b")
    cur = _classed(100.0, 1000.0, "A") + _classed(100.0, 1000.0, "A", case="new")
    rep = h.compare(cur, base, 0.25)
    assert rep.ok and not rep.regressions and rep.unbaselined == ["new [minitron-cpp]"]
    text = h.format_compare(rep)
    assert "--save-baseline" in text and "compared 1 cases against a baseline of this machine class (A)" in text
    # a slower case beside the missing one still fails
    slow = _classed(200.0, 1000.0, "A") + _classed(100.0, 1000.0, "A", case="new")
    assert not h.compare(slow, base, 0.25).ok
    # another class: reported the same way, compared across classes
    cur = _classed(100.0, 1000.0, "B") + _classed(100.0, 1000.0, "B", case="new")
    rep = h.compare(cur, base, 0.25)
    assert rep.ok and any("new" in s and "no baseline entry" in s for s in rep.skipped)
    assert "against other machine classes at the cross-machine tolerance (no baseline of B)" in rep.verdict()


def test_compare_time_informational_still_gates_memory():
    base = _pair(100.0, 1000.0, run="b")
    rep = h.compare(_pair(300.0, 1000.0), base, 0.25, gate_time=False)
    assert rep.ok and "informational" in h.format_compare(rep)
    cur = _pair(300.0, 1000.0)
    cur[0]["peak_bytes"] *= 3
    rep = h.compare(cur, base, 0.25, gate_time=False)
    assert not rep.ok and [f.kind for f in rep.regressions] == ["memory"]


def test_runs_write_to_an_ignored_directory_and_save_refuses_a_dirty_tree(monkeypatch, capsys):
    import subprocess

    probe = h.SCRATCH_DIR / "amd-epyc.jsonl"
    out = subprocess.run(["git", "check-ignore", "-q", str(probe)], cwd=h.REPO_ROOT)
    if out.returncode == 128:
        pytest.skip("not a git checkout")
    assert out.returncode == 0, f"{probe} is not ignored by git: check runs would dirty the tree"
    assert h.RESULTS_DIR != h.SCRATCH_DIR
    from benchmarks import runner

    monkeypatch.setattr(runner, "git_commit", lambda: "0" * 40 + "-dirty")
    assert h.main(["--only", "kl", "--quick", "--save", "--device", "cpu"]) == 2
    assert "uncommitted changes" in capsys.readouterr().err


def test_make_record_prefers_the_setups_bytes_moved():
    env = {"device": "X", "device_type": "cpu"}
    res = {"status": "ok", "median_ms": 1000.0, "bytes_moved": 1e9}
    rec = h.make_record(_case(bytes_moved=4e9), res, env, "r", {"copy_gbps": 2.0})
    assert rec["bytes_moved"] == 1e9 and rec["bw_frac"] == pytest.approx(0.5)


def test_masked_importance_counts_only_the_rows_it_reads():
    from benchmarks import bench_importance as bi

    case = bi._case("minitron-cpp", 2, 64, 128, "float32", 1, True)
    bench = case.setup(case=case, device="cpu")
    x = bench.keep[0]
    assert bench.bytes_moved < case.bytes_moved  # the ragged mask drops rows
    res = h.run_case_inprocess(case, "cpu", warmup=0, repeats=1, max_time_s=1.0)
    assert res["status"] == "ok" and res["bytes_moved"] == bench.bytes_moved
    assert bench.bytes_moved >= x.shape[-1] * 4 * 16  # at least a quarter of each sequence counts


def test_compare_uses_median_over_baseline_runs():
    base = _pair(300.0, 1000.0, run="a") + _pair(100.0, 1000.0, run="b") + _pair(110.0, 1000.0, run="c")
    rep = h.compare(_pair(150.0, 1000.0), base, 0.25)  # baseline ratio = median(0.3, 0.1, 0.11) = 0.11
    assert not rep.ok and rep.findings[0].baseline == pytest.approx(0.11)
    assert h.compare(_pair(120.0, 1000.0), base, 0.25).ok
    # the latest status counts: a provider that stopped working in the baseline is skipped, not compared
    base += [_rec("minitron-cpp", None, run="d", status="error")]
    rep = h.compare(_pair(150.0, 1000.0), base, 0.25)
    assert any("baseline status error" in s for s in rep.skipped)


def test_markdown_and_summary():
    recs = _pair(100.0, 1000.0)
    for r in recs:
        r.update(bench="kl_div", shape={"N": 8, "V": 16}, params={}, dtype="float32", mode="full",
                 p20_ms=r["median_ms"], p80_ms=r["median_ms"], info={"grad_bytes": 50 * 2**20})
    recs.append({**recs[0], "provider": "minitron-cuda", "status": "unavailable", "error": "no GPU",
                 "median_ms": None})
    md = h.markdown_table(recs, {"copy_gbps": 1.0, "exp_gps": 1.0, "matmul_gflops": 1.0})
    assert "| kl_div | N=8,V=16 | float32 | - | full | minitron-cpp | 100.000 [100.000, 100.000] | 10.00x |" in md
    assert "unavailable: no GPU" in md
    assert "10.00x vs torch-eager, mem 0.200" in md
    assert "2.00 x gradient" in md


# ---------------------------------------------------------------------------------------------- measuring


def test_autograd_bench_modes():
    x = torch.randn(4, 3, requires_grad=True)

    def fwd():
        return (x * x).sum()

    out = h.autograd_bench(fwd, [x], "forward").fn()
    assert not out.requires_grad and x.grad is None
    b = h.autograd_bench(fwd, [x], "full")
    b.fn()
    torch.testing.assert_close(x.grad, 2 * x.detach())
    b.fn()  # gradients are dropped between calls, not accumulated
    torch.testing.assert_close(x.grad, 2 * x.detach())
    b = h.autograd_bench(fwd, [x], "backward")
    b.reset()
    assert x.grad is None
    b.prepare()
    b.fn()
    torch.testing.assert_close(x.grad, 2 * x.detach())
    with pytest.raises(ValueError):
        h.autograd_bench(fwd, [x], "sideways")


def test_measure_counts_samples_and_cpu_peak_memory():
    nbytes = 64 * 2**20

    def alloc():
        t = torch.ones(nbytes // 4)  # touched: resident
        return float(t[-1])

    res = h.measure(h.Bench(fn=alloc), "cpu", warmup=1, repeats=3, max_time_s=10.0)
    assert res["repeats"] == 3 and len(res["samples_ms"]) == 3
    assert res["p20_ms"] <= res["median_ms"] <= res["p80_ms"]
    # honest: the 64 MiB the call allocates are counted even though the warmup allocated (and freed) them first
    assert 0.9 * nbytes <= res["peak_bytes"] <= 1.5 * nbytes, res
    idle = h.measure(h.Bench(fn=lambda: None), "cpu", warmup=1, repeats=2)
    assert idle["peak_bytes"] < 8 * 2**20


def test_measure_single_repeat_uses_the_memory_call():
    calls = []
    res = h.measure(h.Bench(fn=lambda: calls.append(1)), "cpu", warmup=0, repeats=1)
    assert len(calls) == 1 and res["repeats"] == 1


def test_run_case_inprocess_classifies_failures():
    def unavailable(case, device):
        raise h.Unavailable("needs a GPU")

    def broken(case, device):
        raise RuntimeError("boom")

    assert h.run_case_inprocess(_case(setup=unavailable), "cpu", 0, 1, 1.0)["status"] == "unavailable"
    res = h.run_case_inprocess(_case(setup=broken), "cpu", 0, 1, 1.0)
    assert res["status"] == "error" and "boom" in res["error"]
    res = h.run_case_inprocess(_case(), "cpu", 0, 2, 1.0)
    assert res["status"] == "ok" and res["repeats"] == 2


FAKE_MODULE = '''
import torch
from benchmarks._harness import Bench, Case, Unavailable

def _setup(case, device):
    if case.provider == "missing":
        raise Unavailable("not installed here")
    n = case.shape["MiB"] * 2**20 // 4
    return Bench(fn=lambda: float(torch.ones(n)[-1]))

def cases(cfg):
    return [Case(bench="fake", provider=p, mode="forward", shape={"MiB": 32}, dtype="float32", setup=_setup,
                 reference="torch-eager") for p in ("torch-eager", "missing")]
'''


def test_subprocess_worker_roundtrip(tmp_path, monkeypatch):
    (tmp_path / "fake_bench_mod.py").write_text(textwrap.dedent(FAKE_MODULE))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.syspath_prepend(str(tmp_path))
    import fake_bench_mod  # noqa: F401

    cfg = h.BenchConfig(quick=True)
    ok_case, missing_case = sys.modules["fake_bench_mod"].cases(cfg)
    res = h.run_case_subprocess("fake_bench_mod", ok_case, cfg, 1, 2, 5.0, 120.0)
    assert res["status"] == "ok", res
    assert 28 * 2**20 <= res["peak_bytes"] <= 48 * 2**20, res
    res = h.run_case_subprocess("fake_bench_mod", missing_case, cfg, 1, 2, 5.0, 120.0)
    assert res["status"] == "unavailable" and "not installed here" in res["error"]


# ---------------------------------------------------------------------------------------------- discovery, CLI


def test_discover_finds_kl_benchmarks():
    mods = h.discover()
    for name in ("kl", "fused_linear_kl"):
        assert name in mods and not isinstance(mods[name], Exception), mods.get(name)
        assert hasattr(mods[name], "cases")
    with pytest.raises(SystemExit):
        h.discover(["no_such_benchmark"])


def test_kl_cases_include_headline_and_are_unique():
    from benchmarks import bench_fused_linear_kl, bench_kl

    full = h.module_cases(bench_kl, h.BenchConfig(device="cpu"))
    keys = {(c.shape["N"], c.shape["V"], c.dtype, c.mode, c.params["kl_mode"]) for c in full}
    for dtype in ("float32", "bfloat16"):
        assert (1024, 128256, dtype, "full", "forward") in keys
    assert {c.provider for c in full} >= {"minitron-cpp", "torch-eager", "torch-compile"}
    quick = h.module_cases(bench_kl, h.BenchConfig(device="cpu", quick=True))
    assert max(c.shape["N"] * c.shape["V"] for c in quick) <= 256 * 128256
    heavy = [c for c in h.module_cases(bench_fused_linear_kl, h.BenchConfig(device="cpu"))
             if c.shape == {"N": 4096, "Hs": 2048, "Ht": 2048, "V": 128256}]
    assert {c.provider for c in heavy} == {"minitron-cpp", "matmul+minitron-cpp", "torch-eager"}
    assert all(c.repeats == 1 for c in heavy)
    assert not [c for c in h.module_cases(bench_fused_linear_kl, h.BenchConfig(device="cpu", heavy=False))
                if c.shape["N"] == 4096]
    gpu = h.module_cases(bench_kl, h.BenchConfig(device="cuda", full=True))
    assert {c.shape["V"] for c in gpu} == {32000, 128256, 256000}
    assert {"minitron-cuda", "minitron-triton", "liger"} <= {c.provider for c in gpu}


def test_cli_list_and_missing_baseline(capsys, tmp_path):
    assert h.main(["--only", "kl", "--quick", "--list", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "kl_div|full|N=256,V=32000|float32" in out
    assert h.main(["--only", "kl", "--quick", "--compare", str(tmp_path / "nope.jsonl")]) == 2


def test_committed_cpu_baseline_is_valid():
    path = h.BENCH_DIR / "baselines" / "cpu.jsonl"
    if not path.exists():
        pytest.skip("no committed CPU baseline yet")
    recs = h.load_jsonl(path)
    results = [r for r in recs if r.get("kind") == "result"]
    assert results, "baseline has no result records"
    assert all(r["device_type"] == "cpu" for r in results)
    assert any(r["ours"] and r["status"] == "ok" for r in results), "baseline measured none of our providers"
    # a baseline names the code it measured: a clean commit, never a dirty tree
    dirty = {r.get("git_commit") for r in recs if not r.get("git_commit") or str(r["git_commit"]).endswith("-dirty")}
    assert not dirty, f"baseline records without a clean commit: {dirty}"


def test_compare_prefers_fastest_sample_ratio():
    base = _pair(100.0, 1000.0, run="b")
    base[0]["min_ms"], base[1]["min_ms"] = 90.0, 900.0
    cur = _pair(100.0, 400.0)  # the reference's median was disturbed ...
    cur[0]["min_ms"], cur[1]["min_ms"] = 90.0, 880.0  # ... its fastest sample was not
    rep = h.compare(cur, base, 0.25)
    assert rep.ok, h.format_compare(rep)
    assert "fastest" in rep.findings[0].how
    cur[0]["min_ms"] = 200.0
    assert not h.compare(cur, base, 0.25).ok


def test_confirm_time_regressions():
    base = _pair(100.0, 1000.0, run="b")
    rep = h.compare(_pair(200.0, 1000.0), base, 0.25)
    calls = []

    def noisy_then_fine(case, provider):
        calls.append((case, provider))
        return [None, 0.3, 0.11][len(calls) - 1]

    h.confirm_time_regressions(rep, noisy_then_fine, attempts=3)
    assert rep.ok and len(calls) == 3 and "passed when re-measured" in h.format_compare(rep)
    rep = h.compare(_pair(200.0, 1000.0), base, 0.25)
    h.confirm_time_regressions(rep, lambda c, p: 0.2, attempts=2)
    assert not rep.ok and "confirmed by 2 re-measurements" in h.format_compare(rep)
    # memory and status regressions are never re-measured away
    cur = _pair(100.0, 1000.0)
    cur[0]["peak_bytes"] *= 3
    rep = h.compare(cur, base, 0.25)
    h.confirm_time_regressions(rep, lambda c, p: 0.0, attempts=2)
    assert not rep.ok


def test_case_tolerance_overrides_run_tolerance():
    base = _pair(100.0, 1000.0, run="b")
    cur = _pair(180.0, 1000.0)
    assert not h.compare(cur, base, 0.25).ok
    cur[0]["tolerance"] = 1.0
    rep = h.compare(cur, base, 0.25)
    assert rep.ok and "case tolerance 100%" in h.format_compare(rep)
    cur[0]["median_ms"] = 250.0
    assert not h.compare(cur, base, 0.25).ok


def test_git_commit_outside_a_checkout_comes_from_the_environment(monkeypatch, tmp_path):
    from benchmarks import machine

    monkeypatch.setattr(machine, "REPO_ROOT", tmp_path)  # not a git checkout
    monkeypatch.delenv(machine.GIT_COMMIT_ENV, raising=False)
    assert machine.git_commit() is None
    monkeypatch.setenv(machine.GIT_COMMIT_ENV, "a" * 40)
    assert machine.git_commit() == "a" * 40
    monkeypatch.setenv(machine.GIT_COMMIT_ENV, "HEAD")
    with pytest.raises(ValueError, match="40-hex"):
        machine.git_commit()


def test_git_commit_ignores_the_committed_results_only(monkeypatch, tmp_path):
    import shutil
    import subprocess

    from benchmarks import machine

    if shutil.which("git") is None:
        pytest.skip("git not installed")

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "cpu.jsonl").write_text("{}\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "init")
    monkeypatch.setattr(machine, "REPO_ROOT", tmp_path)
    clean = machine.git_commit()
    assert clean and not clean.endswith("-dirty")
    (tmp_path / "benchmarks" / "results" / "cpu.jsonl").write_text("{}\n{}\n")  # a previous --save
    assert machine.git_commit() == clean
    (tmp_path / "code.py").write_text("x = 2\n")
    assert machine.git_commit() == clean + "-dirty"


def _planted_runs(tmp_path, baseline_records):
    """Run one real quick case (ours + reference, in process) against a planted baseline file; (exit code, text)."""
    import contextlib
    import io

    base = tmp_path / "planted.jsonl"
    base.write_text("".join(json.dumps(r) + "\n" for r in baseline_records))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = h.main(["--only", "slicing", "--quick", "--inprocess", "--no-save", "--repeats", "2", "--max-time", "0.5",
                     "--filter", "gather_slices|forward|R=4096,C=4096|float32|block=1,dim=0", "--compare", str(base),
                     "--time-informational", "--device", "cpu"])
    return rc, buf.getvalue()


def test_check_passes_on_a_machine_whose_baseline_lacks_a_case_or_has_none(tmp_path):
    """The README's `make check` gate (--compare ... --time-informational) on a machine class whose baseline lacks
    a case, on a machine class the baseline has never seen, and with an empty baseline: each passes, with a
    one-line verdict naming what it compared and what it could not, and the command that records the rest."""
    out = tmp_path / "full.jsonl"
    assert h.main(["--only", "slicing", "--quick", "--inprocess", "--no-save", "--repeats", "2", "--max-time", "0.5",
                   "--filter", "gather_slices|forward|R=4096,C=4096|float32|block=1,dim=0", "--device", "cpu",
                   "--save-baseline", str(out)]) == 0
    recs = h.load_jsonl(out)
    results = [r for r in recs if r.get("kind") == "result"]
    assert {r["provider"] for r in results} == {"minitron-cpp", "torch-index_select"}
    # 1. this machine class, but the baseline predates our case (only the reference provider was recorded)
    lacking = [r for r in recs if not (r.get("kind") == "result" and r.get("ours"))]
    rc, text = _planted_runs(tmp_path, lacking)
    assert rc == 0, text
    assert "verdict: PASS: compared 0 cases against a baseline of this machine class" in text
    assert "could not compare 1 without a baseline entry" in text and "--save-baseline" in text
    # 2. a machine class the baseline has never seen
    other = [dict(r, machine_class="Some other CPU|ours=avx2|threads=64") for r in recs]
    rc, text = _planted_runs(tmp_path, other)
    assert rc == 0, text
    assert "against other machine classes at the cross-machine tolerance (no baseline of" in text
    # 3. no baseline at all (an empty file)
    rc, text = _planted_runs(tmp_path, [])
    assert rc == 0, text
    assert "verdict: PASS: compared 0 cases" in text
    # ... while a real regression still fails: the planted baseline says the case used to need far less memory
    tight = [dict(r, peak_bytes=1) if r.get("kind") == "result" and r.get("ours") else r for r in recs]
    rc, text = _planted_runs(tmp_path, tight)
    assert rc == 1 and "verdict: FAIL" in text, text
