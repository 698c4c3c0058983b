"""The CPU regression gate: instructions retired per op call, counted under valgrind (deterministic).

Why
===
Wall-clock ratios on the shared 2-core development VM spread 1.2-2.2x between idle runs of the same code, so a
time gate there has to tolerate +100% and lets a 1.9x slowdown of a kernel pass. The number of instructions
one op call executes does not depend on the neighbours' load: counted under ``valgrind --tool=callgrind`` it
repeats to a fraction of a percent, so it can be gated at a few percent (:data:`DEFAULT_TOLERANCE`).

How
===
* One worker process (``python -m benchmarks.instructions --worker``) runs under
  ``valgrind --tool=callgrind --instr-atstart=no --collect-atstart=no`` with one thread
  (``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``), ``PYTHONHASHSEED=0`` and the garbage collector off
  while counting. Interpreter start-up and imports run uninstrumented (fast); a tiny C helper compiled on
  first use (:func:`helper_library`, ``<valgrind/callgrind.h>`` client requests through ``ctypes``) starts
  the instrumentation after the imports and toggles collection around the op calls only.
* Per case (:func:`gate_cases`: small shapes of every CPU op, ``minitron-cpp`` provider, built with the
  same setup functions as the benchmark scripts): setup and two warm-up calls uncollected, then
  :data:`CALLS` calls collected (each case's ``prepare()`` hook runs uncollected between them), then a dump
  named after the case. ``instructions per call`` = the dump's ``Ir`` / ``CALLS``.
* valgrind reports a CPU without AVX-512, so the AVX2 kernels run (the CI runner's path).

Records are ``{"kind": "instructions", ...}`` lines (see :func:`run_gate`); the committed baseline is
``benchmarks/baselines/cpu-instructions.jsonl``. :func:`compare_instructions` fails when a case's count grows
by more than the tolerance (against a baseline of the same machine class, :func:`instr_class`: valgrind
version, torch version, our ISA level, compiler; across classes only past the cross-class tolerance) and when
a case fails to run. A case without a baseline entry is reported with the command that records it, never
failed; the report's ``verdict:`` line says how many cases were compared and how many could not be.

Planting a slowdown (for the gate's own test): ``MINITRON_GATE_PLANT=<substring of a case id>[:fraction]``
makes the worker add, to every call of the matching case, one loss-only call of the same op on the first
``fraction`` (default :data:`PLANT_FRACTION`) of its rows: an extra pass over part of the input. Read only here.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import functools
import gc
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from benchmarks.cases import Case
from benchmarks.machine import environment
from benchmarks.paths import REPO_ROOT

log = logging.getLogger("benchmarks.instructions")

CALLS = 4
WARMUP = 2
DEFAULT_TOLERANCE = 0.03
CROSS_CLASS_TOLERANCE = 0.5
PLANT_ENV = "MINITRON_GATE_PLANT"
PLANT_FRACTION = 0.35  # 11 of 32 rows: +30% instructions on the fp32 kl_div fwd+bwd gate case
OUT_DIR = REPO_ROOT / ".bench-out"
BASELINE = REPO_ROOT / "benchmarks" / "baselines" / "cpu-instructions.jsonl"
# how a machine records (or extends) the instruction baseline: runs on a clean commit, appended
RECORD_GATE_CMD = ("for i in 1 2 3; do python -m benchmarks.instructions --out /tmp/g$i.jsonl; done; "
                   "cat /tmp/g?.jsonl >> benchmarks/baselines/cpu-instructions.jsonl")
RECORD_VERSION = 1

_HELPER_C = r"""
#include <valgrind/callgrind.h>
void mt_start(void) { CALLGRIND_START_INSTRUMENTATION; }
void mt_toggle(void) { CALLGRIND_TOGGLE_COLLECT; }
void mt_dump(const char *name) { CALLGRIND_DUMP_STATS_AT(name); }
int mt_on_valgrind(void) { return RUNNING_ON_VALGRIND; }
"""


class GateUnavailable(RuntimeError):
    """valgrind, its headers or a C compiler is missing: the gate cannot run here."""


# ----------------------------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------------------------


def gate_cases() -> list[Case]:
    """The gated cases: small shapes of every CPU op (``minitron-cpp``), a few million instructions each."""
    from benchmarks import bench_fused_linear_kl as flk
    from benchmarks import bench_importance as imp
    from benchmarks import bench_kl as kl
    from benchmarks import bench_slicing as sl
    from benchmarks import bench_topk_kl as tk

    p = "minitron-cpp"
    out = [
        kl._case(p, "full", 32, 4096, "float32"),
        kl._case(p, "forward", 32, 4096, "float32"),
        kl._case(p, "full", 32, 4096, "bfloat16"),
        kl._case(p, "full", 32, 4096, "float32", "reverse"),
        kl._case(p, "full", 32, 4096, "float32", "jsd"),
        flk._case(p, "full", 32, 64, 64, 2048, "float32"),
        imp._case(p, 2, 128, 1024, "float32", 1, False),
        imp._case(p, 2, 128, 1024, "float32", 128, True),
        imp._bi_case(p, 2, 128, 1024, "float32", True),
        tk._case(p, "full", 32, 64, 2048, 16, "float32"),
    ]
    for op, setup in (("gather_slices", sl._setup_gather), ("compact_", sl._setup_compact)):
        for dim, keep in ((0, 0.5), (1, 0.75)):
            shape = (1024, 1024)
            out.append(Case(bench=op, provider=p, mode="forward", shape={"R": shape[0], "C": shape[1]},
                            dtype="float32", params={"dim": dim, "keep": keep, "block": 1},
                            setup=functools.partial(setup, p, shape, dim, keep, 1, "float32")))
    return out


def _plant(case: Case, spec: str) -> Optional[Callable[[], None]]:
    """The extra work of a planted slowdown for ``case`` (None when ``spec`` does not select it)."""
    target, _, frac = spec.partition(":")
    if not target or target not in case.id:
        return None
    fraction = float(frac) if frac else PLANT_FRACTION
    import torch

    if case.bench == "kl_div":
        from benchmarks.bench_kl import make_inputs
        from minitron.ops import kl_div

        n = max(1, int(round(case.shape["N"] * fraction)))
        s, t = make_inputs(case.shape["N"], case.shape["V"], case.dtype, "cpu", seed=1)
        s, t = s.detach()[:n], t[:n]
        p = case.params

        def extra() -> None:
            with torch.no_grad():
                kl_div(s, t, mode=p["kl_mode"], temperature=p["T"], beta=p.get("beta", 0.5), backend="cpp")

        return extra
    raise ValueError(f"{PLANT_ENV}: planting is implemented for kl_div cases only, not {case.id!r}")


# ----------------------------------------------------------------------------------------------
# the worker (runs under valgrind)
# ----------------------------------------------------------------------------------------------


def helper_library(cache_dir: Path = OUT_DIR) -> Path:
    """Compile (once) the client-request helper; raises :class:`GateUnavailable` without a compiler/headers."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        raise GateUnavailable("no C compiler (cc/gcc) to build the valgrind client-request helper")
    cache_dir.mkdir(parents=True, exist_ok=True)
    lib = cache_dir / "libmt_callgrind.so"
    src = cache_dir / "mt_callgrind.c"
    if lib.exists() and src.exists() and src.read_text() == _HELPER_C:
        return lib
    src.write_text(_HELPER_C)
    tmp = lib.with_suffix(f".{os.getpid()}.so")
    proc = subprocess.run([cc, "-O1", "-shared", "-fPIC", "-o", str(tmp), str(src)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise GateUnavailable(f"could not compile the valgrind helper (is valgrind's callgrind.h installed?): "
                              f"{proc.stderr.strip()[-500:]}")
    os.replace(tmp, lib)
    return lib


def _worker(case_ids: Optional[Sequence[str]], lib_path: str, out_path: str) -> int:
    import torch

    torch.set_num_threads(1)
    import minitron  # noqa: F401  (loads the extension before counting starts)

    lib = ctypes.CDLL(lib_path)
    lib.mt_dump.argtypes = [ctypes.c_char_p]
    on_valgrind = bool(lib.mt_on_valgrind())
    cases = [c for c in gate_cases() if not case_ids or c.id in case_ids]
    plant = os.environ.get(PLANT_ENV, "")
    results: dict[str, dict] = {}
    lib.mt_start()
    for i, case in enumerate(cases):
        try:
            bench = case.setup(case=case, device="cpu")
            extra = _plant(case, plant) if plant else None
            fn = bench.fn
            if extra is not None:
                def fn(_f=bench.fn, _e=extra) -> None:
                    _f()
                    _e()
            for _ in range(WARMUP):
                if bench.prepare is not None:
                    bench.prepare()
                fn()
            gc.collect()
            gc.disable()
            try:
                for _ in range(CALLS):
                    if bench.prepare is not None:
                        bench.prepare()
                    lib.mt_toggle()
                    fn()
                    lib.mt_toggle()
            finally:
                gc.enable()
            lib.mt_dump(f"case{i}".encode())
            results[case.id] = {"status": "ok", "dump": f"case{i}", "planted": extra is not None}
        except Exception as exc:  # noqa: BLE001 - one failing case is reported, the others still run
            lib.mt_dump(f"case{i}".encode())
            results[case.id] = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:2000]}
    with open(out_path, "w") as f:
        json.dump({"on_valgrind": on_valgrind, "results": results}, f)
    return 0


# ----------------------------------------------------------------------------------------------
# the driver
# ----------------------------------------------------------------------------------------------


def valgrind_version() -> Optional[str]:
    exe = shutil.which("valgrind")
    if exe is None:
        return None
    out = subprocess.run([exe, "--version"], capture_output=True, text=True)
    return out.stdout.strip() or None


def _compiler_version() -> str:
    cc = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cc is None:
        return "n/a"
    out = subprocess.run([cc, "--version"], capture_output=True, text=True)
    return (out.stdout.splitlines() or ["n/a"])[0].strip()


def cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def instr_class(env: dict, vg: Optional[str]) -> str:
    """What must match for instruction counts to be compared at the gate's tolerance: valgrind, the CPU vendor
    (torch's BLAS picks code paths by vendor; valgrind hides AVX-512 either way), torch, our extension's ISA
    level and the C++ compiler that built it, the Python version."""
    isa = "n/a"
    try:
        from minitron import _ext

        isa = _ext.build_info().get("cpu_isa", "n/a") if _ext.available() else "no-extension"
    except Exception:  # noqa: BLE001 - informative only
        pass
    v = env.get("versions") or {}
    return (f"{vg}|{platform.machine()}|{cpu_vendor()}|python={v.get('python')}|torch={v.get('torch')}|ours={isa}|"
            f"cxx={_compiler_version()}")


def _parse_dump(path: Path) -> int:
    """The ``Ir`` total of one callgrind dump file."""
    text = path.read_text(errors="replace")
    m = re.search(r"^totals:\s*(\d+)", text, re.M) or re.search(r"^summary:\s*(\d+)", text, re.M)
    if m is None:
        raise ValueError(f"{path}: no totals/summary line (not a callgrind dump?)")
    return int(m.group(1))


def _dumps_by_name(out_dir: Path, stem: str) -> dict[str, int]:
    found: dict[str, int] = {}
    for p in sorted(out_dir.glob(stem + ".*")):
        text = p.read_text(errors="replace")
        m = re.search(r"^desc: Trigger: Client Request: (\S+)", text, re.M)
        if m:
            found[m.group(1)] = _parse_dump(p)
    return found


def run_gate(case_ids: Optional[Sequence[str]] = None, *, plant: Optional[str] = None,
             work_dir: Optional[Path] = None, timeout_s: float = 1200.0) -> list[dict]:
    """Count instructions per call of the gate cases (all, or ``case_ids``) in one valgrind run.

    Returns one record per case: ``kind="instructions"``, ``case``/``provider`` (as the benchmark records),
    ``instr_per_call``, ``calls``, ``status``, ``error``, ``instr_class``, ``git_commit``, ``versions``,
    ``valgrind``, ``timestamp``, ``run_id``, ``wall_s`` (the whole valgrind run), ``planted``.
    """
    vg = valgrind_version()
    if vg is None:
        raise GateUnavailable("valgrind is not installed (apt-get install -y valgrind)")
    lib = helper_library()
    env = environment("cpu")
    cls = instr_class(env, vg)
    run_id = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + f"-{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="minitron-gate-", dir=work_dir) as tmp:
        tmpd = Path(tmp)
        out_json = tmpd / "worker.json"
        cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--collect-atstart=no",
               f"--callgrind-out-file={tmpd / 'cg.out'}", sys.executable, "-m", "benchmarks.instructions",
               "--worker", "--lib", str(lib), "--out", str(out_json)]
        for cid in case_ids or []:
            cmd += ["--case", cid]
        wenv = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
        wenv["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + wenv["PYTHONPATH"] if wenv.get("PYTHONPATH") else "")
        wenv.pop(PLANT_ENV, None)
        if plant:
            wenv[PLANT_ENV] = plant
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=wenv, capture_output=True, text=True, timeout=timeout_s)
        wall = round(time.perf_counter() - t0, 1)
        if not out_json.exists():
            raise RuntimeError(f"the valgrind worker failed (exit {proc.returncode}):\n"
                               f"{(proc.stdout + proc.stderr)[-3000:]}")
        worker = json.loads(out_json.read_text())
        dumps = _dumps_by_name(tmpd, "cg.out")
    if not worker.get("on_valgrind"):
        raise RuntimeError("the worker did not run under valgrind")
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    by_id = {c.id: c for c in gate_cases()}
    records = []
    for cid, res in worker["results"].items():
        case = by_id[cid]
        rec = {"v": RECORD_VERSION, "kind": "instructions", "run_id": run_id, "timestamp": stamp,
               "case": case.case_key, "provider": case.provider, "bench": case.bench, "calls": CALLS,
               "status": res["status"], "error": res.get("error"), "instr_per_call": None,
               "instr_class": cls, "valgrind": vg, "git_commit": env.get("git_commit"),
               "versions": env.get("versions"), "wall_s": wall, "planted": bool(res.get("planted"))}
        if res["status"] == "ok":
            ir = dumps.get(res["dump"])
            if ir is None:
                rec.update(status="error", error=f"no callgrind dump named {res['dump']}")
            else:
                rec["instr_per_call"] = round(ir / CALLS)
        records.append(rec)
    return records


# ----------------------------------------------------------------------------------------------
# comparison
# ----------------------------------------------------------------------------------------------


@dataclass
class GateFinding:
    case: str
    provider: str
    baseline: Optional[float]
    current: Optional[float]
    verdict: str  # "ok" | "REGRESSION" | "FAILED" | "no-entry" (reported, never a failure) | "info"
    detail: str = ""

    @property
    def change(self) -> Optional[float]:
        if self.baseline and self.current is not None:
            return self.current / self.baseline - 1.0
        return None


@dataclass
class GateReport:
    findings: list[GateFinding] = field(default_factory=list)
    tolerance: float = DEFAULT_TOLERANCE
    same_class: bool = True
    note: str = ""
    classes: str = ""  # this run's machine class(es)

    @property
    def failures(self) -> list[GateFinding]:
        return [f for f in self.findings if f.verdict in ("REGRESSION", "FAILED")]

    @property
    def ok(self) -> bool:
        """No regression and no case that failed to run. A case without a baseline entry, or a machine class
        the baseline has never seen, is reported in :meth:`verdict`, never a failure."""
        return not self.failures

    def verdict(self) -> str:
        """One line: how many cases were compared, at which tolerance, and what could not be compared."""
        compared = [f for f in self.findings if f.verdict in ("ok", "REGRESSION")]
        missing = [f for f in self.findings if f.verdict in ("no-entry", "info")]
        where = (f"against this machine class at +{self.tolerance:.1%}" if self.same_class else
                 f"against other machine classes at the cross-class tolerance (no baseline of {self.classes})")
        tail = (f"; could not compare {len(missing)} cases without a baseline entry (record: {RECORD_GATE_CMD})"
                if missing else "")
        return f"verdict: {'PASS' if self.ok else 'FAIL'}: compared {len(compared)} cases {where}{tail}"


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def compare_instructions(current: list[dict], baseline: list[dict], tolerance: float = DEFAULT_TOLERANCE,
                         cross_class_tolerance: float = CROSS_CLASS_TOLERANCE) -> GateReport:
    """Gate ``current`` instruction records against ``baseline`` (median over the baseline's runs per case).

    Same machine class (:func:`instr_class`) in the baseline: a count above ``baseline * (1 + tolerance)``
    and a case that no longer runs fail; a current case without a baseline entry is reported with the command
    that records it (never a failure: the baseline lacks it, not the code). No records of this class in
    the baseline (another compiler, torch, CPU vendor...): the baseline's records of all classes are pooled and
    a count fails only above ``baseline * (1 + cross_class_tolerance)`` (a lost kernel or a slow fallback, not a
    30% slowdown); cases without a baseline entry are reported. A case that fails to run always fails.
    """
    cur = [r for r in current if r.get("kind") == "instructions"]
    classes = {r.get("instr_class") for r in cur}
    same = [r for r in baseline if r.get("kind") == "instructions" and r.get("instr_class") in classes]
    rep = GateReport(tolerance=tolerance, same_class=bool(same), classes=", ".join(sorted(map(str, classes))))
    pool = same or [r for r in baseline if r.get("kind") == "instructions"]
    if not same:
        known = sorted({str(r.get("instr_class")) for r in pool})
        rep.note = (f"no baseline records of this machine class ({', '.join(sorted(map(str, classes)))}); "
                    f"baseline classes: {', '.join(known) or 'none'}: counts are gated at the cross-class tolerance "
                    f"{cross_class_tolerance:.0%} only (record a baseline of this class for the tight gate)")
    base: dict[tuple[str, str], list[float]] = {}
    for r in pool:
        if r.get("status") == "ok" and r.get("instr_per_call"):
            base.setdefault((r["case"], r["provider"]), []).append(float(r["instr_per_call"]))
    seen = set()
    for r in cur:
        key = (r["case"], r["provider"])
        seen.add(key)
        b = _median(base[key]) if key in base else None
        if r.get("status") != "ok":
            rep.findings.append(GateFinding(*key, b, None, "FAILED", str(r.get("error") or "")[:300]))
            continue
        c = float(r["instr_per_call"])
        tol = tolerance if rep.same_class else cross_class_tolerance
        if b is None:
            rep.findings.append(GateFinding(*key, None, c, "no-entry" if rep.same_class else "info",
                                            "no baseline entry for this case (reported, not gated)"))
        else:
            rep.findings.append(GateFinding(*key, b, c, "REGRESSION" if c > b * (1.0 + tol) else "ok",
                                            "" if rep.same_class else f"[other class: tolerance {tol:.0%}]"))
    for key in sorted(base):
        if key not in seen and rep.same_class:
            rep.note += (" " if rep.note else "") + f"baseline case not run now: {key[0]} [{key[1]}]."
    return rep


def format_gate(rep: GateReport) -> str:
    lines = [f"Instruction-count gate (tolerance {rep.tolerance:.1%}): {len(rep.findings)} cases, "
             f"{len(rep.failures)} failures"]
    if rep.note:
        lines.append(f"  note: {rep.note}")
    for f in rep.findings:
        ch = f" ({f.change:+.2%})" if f.change is not None else ""
        b = "-" if f.baseline is None else f"{f.baseline:,.0f}"
        c = "-" if f.current is None else f"{f.current:,.0f}"
        lines.append(f"  [{f.verdict:>10}] {f.case} [{f.provider}]: instructions/call baseline {b} -> now {c}{ch}"
                     f" {f.detail}".rstrip())
    lines.append(rep.verdict())
    lines.append("RESULT: " + ("PASS" if rep.ok else "FAIL"))
    return "\n".join(lines)


def load_records(path: Path | str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_records(path: Path | str, records: list[dict], append: bool = False) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "a" if append else "w") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.instructions",
                                 description="Instruction counts per op call under valgrind; --compare gates them.")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--lib", help=argparse.SUPPRESS)
    ap.add_argument("--out", help="worker: result JSON; driver: also write this run's records here (JSONL)")
    ap.add_argument("--case", action="append", default=None, help="only this case id (repeatable)")
    ap.add_argument("--list", action="store_true", help="list the gate's case ids and exit")
    ap.add_argument("--compare", metavar="BASELINE.jsonl", default=None,
                    help=f"gate against this baseline (e.g. {BASELINE.relative_to(REPO_ROOT)}); exit 1 on failure")
    ap.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                    help=f"allowed relative growth of instructions per call (default {DEFAULT_TOLERANCE})")
    ap.add_argument("--cross-class-tolerance", type=float, default=CROSS_CLASS_TOLERANCE,
                    help="the same, against a baseline of another machine class")
    ap.add_argument("--save-baseline", metavar="PATH", default=None,
                    help="append this run's records to PATH (a baseline: several runs, median per case)")
    ap.add_argument("--plant", default=None, help=f"plant a slowdown (as {PLANT_ENV}; for testing the gate)")
    a = ap.parse_args(argv)
    if a.worker:
        return _worker(a.case, a.lib, a.out)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.list:
        for c in gate_cases():
            print(c.id)
        return 0
    if a.compare and not os.path.exists(a.compare):
        print(f"--compare: baseline file {a.compare} does not exist", file=sys.stderr)
        return 2
    try:
        recs = run_gate(a.case, plant=a.plant)
    except GateUnavailable as exc:
        print(f"instruction gate unavailable: {exc}", file=sys.stderr)
        return 2
    for r in recs:
        val = f"{r['instr_per_call']:>14,}" if r["status"] == "ok" else f"{r['status']}: {r['error']}"
        print(f"{r['case']} [{r['provider']}]: {val}")
    print(f"# valgrind run: {recs[0]['wall_s'] if recs else 0} s; class {recs[0]['instr_class'] if recs else '-'}")
    if a.out:
        write_records(a.out, recs)
    if a.save_baseline:
        write_records(a.save_baseline, recs, append=True)
        print(f"# appended to {a.save_baseline}")
    if a.compare:
        rep = compare_instructions(recs, load_records(a.compare), a.tolerance, a.cross_class_tolerance)
        print(format_gate(rep))
        return 0 if rep.ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
