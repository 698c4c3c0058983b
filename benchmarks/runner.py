"""Running benchmarks: discovery of ``bench_*.py`` scripts, one subprocess worker per case, and the
``python -m benchmarks`` command line (records, reports, ``--compare``)."""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Optional, Sequence

from benchmarks.cases import BenchConfig, Case, Unavailable
from benchmarks.compare import CROSS_MACHINE_TOLERANCE, compare, confirm_time_regressions, format_compare
from benchmarks.machine import device_name, environment, git_commit, machine_limits, sanitize
from benchmarks.measure import measure
from benchmarks.paths import BENCH_DIR, RECORD_VERSION, REPO_ROOT, RESULTS_DIR, SCRATCH_DIR
from benchmarks.records import add_ratios, append_jsonl, load_jsonl, make_record
from benchmarks.summary import _mib, markdown_table, short_error, write_plots


def discover(only: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """``{name: module_or_exception}`` for every ``benchmarks/bench_<name>.py`` (filtered by ``only``)."""
    names = sorted(p.stem[len("bench_"):] for p in BENCH_DIR.glob("bench_*.py"))
    if only:
        unknown = [o for o in only if o not in names]
        if unknown:
            raise SystemExit(f"--only: unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(names)}")
        names = [n for n in names if n in only]
    out: dict[str, Any] = {}
    for name in names:
        try:
            out[name] = importlib.import_module(f"benchmarks.bench_{name}")
        except Exception as exc:  # noqa: BLE001 - report, keep the others running
            out[name] = exc
    return out


def module_cases(module: Any, cfg: BenchConfig) -> list[Case]:
    fn = getattr(module, "cases", None)
    if fn is None:
        return []
    cases = list(fn(cfg))
    ids = [c.id for c in cases]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise ValueError(f"{module.__name__}: duplicate case ids {sorted(dup)}")
    return cases


def _unavailable_types() -> tuple[type, ...]:
    types: list[type] = [Unavailable, ImportError]
    try:
        from minitron.ops._dispatch import BackendUnavailableError

        types.append(BackendUnavailableError)
    except Exception:  # noqa: BLE001
        pass
    try:
        from minitron._ext import ExtensionNotBuiltError

        types.append(ExtensionNotBuiltError)
    except Exception:  # noqa: BLE001
        pass
    return tuple(types)


def run_case_inprocess(case: Case, device: str, warmup: int, repeats: int, max_time_s: float) -> dict:
    """Set up and measure one case in this process; never raises for provider problems."""
    t0 = time.perf_counter()
    try:
        bench = case.setup(case=case, device=device)
    except _unavailable_types() as exc:
        return {"status": "unavailable", "error": f"{type(exc).__name__}: {exc}"}
    except Exception as exc:  # noqa: BLE001
        return {"status": "error", "error": "".join(traceback.format_exception_only(type(exc), exc)).strip()}
    try:
        inputs = bench.keep if isinstance(bench.keep, (list, tuple)) else []
        input_bytes = sum(t.numel() * t.element_size() for t in inputs if hasattr(t, "element_size"))
        res = measure(bench, device, warmup=case.warmup if case.warmup is not None else warmup,
                      repeats=case.repeats if case.repeats is not None else repeats,
                      max_time_s=case.max_time_s if case.max_time_s is not None else max_time_s)
        res["input_bytes"] = int(input_bytes)
        if bench.bytes_moved is not None:
            res["bytes_moved"] = float(bench.bytes_moved)
        res["status"] = "ok"
    except _unavailable_types() as exc:
        res = {"status": "unavailable", "error": f"{type(exc).__name__}: {exc}"}
    except Exception as exc:  # noqa: BLE001
        tb = traceback.format_exc(limit=6)
        res = {"status": "error", "error": tb.strip()[-2000:]}
    res["worker_s"] = round(time.perf_counter() - t0, 3)
    return res


def run_case_subprocess(module_name: str, case: Case, cfg: BenchConfig, warmup: int, repeats: int,
                        max_time_s: float, timeout_s: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="minitron-bench-") as tmp:
        out_path = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "benchmarks.runner", "--worker", "--module", module_name, "--case-id", case.id,
               "--cfg", json.dumps(cfg.to_json()), "--warmup", str(warmup), "--repeats", str(repeats),
               "--max-time", str(max_time_s), "--out", out_path]
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                                  timeout=case.timeout_s or timeout_s)
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "error": f"worker exceeded {case.timeout_s or timeout_s:.0f} s",
                    "worker_s": round(time.perf_counter() - t0, 3)}
        if os.path.exists(out_path):
            with open(out_path) as f:
                return json.load(f)
        tail = (proc.stdout + proc.stderr).strip()[-2000:]
        reason = f"worker exited with code {proc.returncode}"
        if proc.returncode in (-9, 137):
            reason += " (killed: out of memory?)"
        return {"status": "error", "error": f"{reason}\n{tail}", "worker_s": round(time.perf_counter() - t0, 3)}


def _worker_main(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks.runner --worker")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--module", required=True)
    ap.add_argument("--case-id", required=True)
    ap.add_argument("--cfg", required=True)
    ap.add_argument("--warmup", type=int, required=True)
    ap.add_argument("--repeats", type=int, required=True)
    ap.add_argument("--max-time", type=float, required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    cfg = BenchConfig(**json.loads(a.cfg))
    try:
        module = importlib.import_module(a.module)
        matches = [c for c in module_cases(module, cfg) if c.id == a.case_id]
        if not matches:
            res = {"status": "error", "error": f"case {a.case_id!r} not produced by {a.module}.cases(cfg) in the worker"}
        else:
            res = run_case_inprocess(matches[0], cfg.device, a.warmup, a.repeats, a.max_time)
    except Exception:  # noqa: BLE001
        res = {"status": "error", "error": traceback.format_exc(limit=6)[-2000:]}
    with open(a.out, "w") as f:
        json.dump(res, f)
    return 0


def _default_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run minitron's benchmarks (every benchmarks/bench_*.py): providers side by side, median time "
                    "[p20, p80] and peak memory, results appended to .bench-out/results/<device>.jsonl (untracked; "
                    "--save: the committed benchmarks/results/<device>.jsonl), a markdown table and plots; "
                    "--compare fails on regressions.")
    ap.add_argument("--only", default=None,
                    help="comma-separated benchmark names (file name without bench_), e.g. kl,fused_linear_kl")
    ap.add_argument("--quick", action="store_true", help="small shapes and few repeats (CI; a few minutes on CPU)")
    ap.add_argument("--full", action="store_true", help="the full shape sweep (meant for GPUs)")
    ap.add_argument("--skip-heavy", action="store_true",
                    help="leave out the heavy headline cases that take minutes on a CPU")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--filter", action="append", default=None,
                    help="only cases whose id contains this substring (repeat the option for several)")
    ap.add_argument("--providers", default=None, help="comma-separated providers to run")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls before timing (default 1)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per case (default 10, quick 5)")
    ap.add_argument("--max-time", type=float, default=None,
                    help="stop sampling a case after this many seconds (default 20, quick 3)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="kill a case's worker after this many seconds")
    ap.add_argument("--inprocess", action="store_true",
                    help="run cases in this process (faster; peak memory less trustworthy)")
    ap.add_argument("--results-dir", default=None,
                    help="where results, tables and plots go (default: the untracked .bench-out/results; "
                         "with --save: benchmarks/results)")
    ap.add_argument("--save", action="store_true",
                    help="append the records to the committed benchmarks/results/<device>.jsonl (and rewrite its "
                         "-latest.md and plots); refused on a tree with uncommitted changes")
    ap.add_argument("--allow-dirty", action="store_true",
                    help="with --save: allow a tree with uncommitted changes (the records say -dirty)")
    ap.add_argument("--no-save", action="store_true", help="do not write records, tables or plots anywhere")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--print-device-slug", action="store_true",
                    help="print the device's file name (results/<slug>.jsonl, baselines/<slug>.jsonl) and exit")
    ap.add_argument("--compare", default=None, metavar="BASELINE.jsonl",
                    help="compare with a baseline results file; exit 1 on regression")
    ap.add_argument("--tolerance", type=float, default=0.25, help="allowed relative slowdown (default 0.25)")
    ap.add_argument("--confirm", type=int, default=2,
                    help="re-measure a ratio-based time regression up to this many times before failing (default 2)")
    ap.add_argument("--cross-machine-tolerance", type=float, default=CROSS_MACHINE_TOLERANCE,
                    help="allowed relative growth of a CPU time ratio when the baseline has no records of this "
                         "machine class (default 2.0 = +200%%)")
    ap.add_argument("--time-informational", action="store_true",
                    help="with --compare: report time findings but do not fail on them (memory, status and "
                         "missing cases still fail); the CPU gate on time is benchmarks.instructions")
    ap.add_argument("--memory-tolerance", type=float, default=None,
                    help="allowed relative peak-memory growth (default: --tolerance)")
    ap.add_argument("--save-baseline", default=None, metavar="PATH",
                    help="also write this run's records to PATH (overwriting it), to serve as a baseline")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    device = args.device or _default_device()
    if args.print_device_slug:
        print(sanitize(device_name(device)))
        return 0
    cfg = BenchConfig(quick=args.quick, full=args.full, device=device, heavy=not args.skip_heavy)
    warmup = 1 if args.warmup is None else args.warmup
    repeats = args.repeats if args.repeats is not None else (5 if args.quick else 10)
    max_time_s = args.max_time if args.max_time is not None else (3.0 if args.quick else 20.0)
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    providers = {s.strip() for s in args.providers.split(",")} if args.providers else None
    if args.compare and not os.path.exists(args.compare):
        print(f"--compare: baseline file {args.compare} does not exist", file=sys.stderr)
        return 2
    if args.save and args.no_save:
        print("--save and --no-save contradict each other", file=sys.stderr)
        return 2
    if args.save and not args.allow_dirty and not args.list:
        commit = git_commit()
        if commit is None or commit.endswith("-dirty"):
            print("--save: the tree has uncommitted changes (or is not a git checkout), so the records could not "
                  "name the code they measured; commit first (or pass --allow-dirty)", file=sys.stderr)
            return 2

    modules = discover(only)
    plan: list[tuple[str, Case]] = []
    for name, mod in modules.items():
        if isinstance(mod, Exception):
            print(f"[{name}] import failed: {type(mod).__name__}: {mod}", file=sys.stderr)
            continue
        if not hasattr(mod, "cases"):
            print(f"[{name}] has no cases(cfg) entry point; skipped", file=sys.stderr)
            continue
        try:
            for c in module_cases(mod, cfg):
                if args.filter and not any(f in c.id for f in args.filter):
                    continue
                if providers and c.provider not in providers:
                    continue
                plan.append((mod.__name__, c))
        except Exception as exc:  # noqa: BLE001
            print(f"[{name}] cases() failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    if args.list:
        for mod_name, c in plan:
            print(f"{mod_name}: {c.id}")
        return 0
    if not plan:
        print("no benchmark cases selected", file=sys.stderr)
        return 2

    env = environment(device)
    run_id = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + f"-{os.getpid()}"
    print(f"# minitron benchmarks on {env['device']} ({device}, {env['threads']} threads), "
          f"{len(plan)} cases{' (quick)' if args.quick else ''}", flush=True)
    limits = machine_limits(device, quick=args.quick)
    print(f"# machine limits: {limits}", flush=True)
    machine_rec = {"v": RECORD_VERSION, "kind": "machine", "run_id": run_id,
                   "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **env,
                   "limits": limits, "quick": args.quick}
    records: list[dict] = []
    t_start = time.perf_counter()
    for i, (mod_name, case) in enumerate(plan, 1):
        if args.inprocess:
            res = run_case_inprocess(case, device, warmup, repeats, max_time_s)
        else:
            res = run_case_subprocess(mod_name, case, cfg, warmup, repeats, max_time_s, args.timeout)
        rec = make_record(case, res, env, run_id, limits)
        records.append(rec)
        if rec["status"] == "ok":
            msg = (f"{rec['median_ms']:10.3f} ms [{rec['p20_ms']:.3f}, {rec['p80_ms']:.3f}] "
                   f"peak {_mib(rec['peak_bytes'])} MiB")
        else:
            msg = f"{rec['status']}: {short_error(rec)}"
        print(f"[{i}/{len(plan)}] {case.id}: {msg}", flush=True)
    add_ratios(records)
    table = markdown_table(records, limits, env)
    print()
    print(table)
    print(f"# {len(records)} cases in {time.perf_counter() - t_start:.0f} s", flush=True)

    if not args.no_save:
        results_dir = Path(args.results_dir) if args.results_dir else (RESULTS_DIR if args.save else SCRATCH_DIR)
        slug = env["device_slug"]
        append_jsonl(results_dir / f"{slug}.jsonl", [machine_rec] + records)
        (results_dir / f"{slug}-latest.md").write_text(table)
        print(f"# appended to {results_dir / (slug + '.jsonl')}; table in {results_dir / (slug + '-latest.md')}")
        if not args.no_plots:
            paths = write_plots(records, results_dir / "plots", slug)
            print(f"# {len(paths)} plots in {results_dir / 'plots'}")
    if args.save_baseline:
        path = Path(args.save_baseline)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            for r in [machine_rec] + records:
                f.write(json.dumps(r, sort_keys=True) + "\n")
        print(f"# baseline written to {path}")
    if args.compare:
        rep = compare(records, load_jsonl(args.compare), args.tolerance, args.memory_tolerance,
                      args.cross_machine_tolerance, gate_time=not args.time_informational)
        by_id = {c.id: (m, c) for m, c in plan}

        def run(mod_name: str, case: Case) -> dict:
            if args.inprocess:
                return run_case_inprocess(case, device, warmup, repeats, max_time_s)
            return run_case_subprocess(mod_name, case, cfg, warmup, repeats, max_time_s, args.timeout)

        def remeasure(case_key: str, provider: str) -> Optional[float]:
            ours = by_id.get(f"{case_key}|{provider}")
            if ours is None or not ours[1].reference:
                return None
            ref = by_id.get(f"{case_key}|{ours[1].reference}")
            if ref is None:
                return None
            a, b = run(*ours), run(*ref)
            if a.get("status") != "ok" or b.get("status") != "ok" or not b.get("min_ms"):
                return None
            ratio = a["min_ms"] / b["min_ms"]
            print(f"# re-measured {case_key} [{provider}]: {ratio:.4g} x {ours[1].reference}", flush=True)
            return ratio

        if rep.regressions and args.confirm > 0:
            print(f"\n# {len(rep.regressions)} regression(s): re-measuring ratio regressions up to {args.confirm} "
                  "times to rule out noise", flush=True)
            confirm_time_regressions(rep, remeasure, args.confirm)
        print()
        print(format_compare(rep))
        return 0 if rep.ok else 1
    return 0


if __name__ == "__main__":
    # delegate to the importable module so bench scripts and the worker share one copy of the classes
    from benchmarks import runner as _r

    if "--worker" in sys.argv[1:]:
        sys.exit(_r._worker_main(sys.argv[1:]))
    sys.exit(_r.main(sys.argv[1:]))
