"""The machine a run measures: device names, git commit, versions, machine class, and the machine limits
(copy bandwidth, exp and matmul throughput) measured in the same run."""
from __future__ import annotations

import importlib
import os
import platform
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Optional

from benchmarks.measure import _sync
from benchmarks.paths import REPO_ROOT


def sanitize(name: str) -> str:
    """File-name-safe lower-case device name: ``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    s = re.sub(r"\((r|tm|c)\)", "", name.strip().lower())
    s = re.sub(r"\b(cpu|processor)\b", " ", s)
    s = re.sub(r"@.*$", "", s)
    s = re.sub(r"[^a-z0-9.]+", "-", s).strip("-.")
    s = re.sub(r"-{2,}", "-", s)
    return s or "unknown"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: str) -> str:
    """Human device name: the CPU model string, or the CUDA device name."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return cpu_model()


GIT_COMMIT_ENV = "MINITRON_GIT_COMMIT"


def git_commit() -> Optional[str]:
    """HEAD's hash, with ``-dirty`` when tracked files (other than ``benchmarks/results/``) have uncommitted
    changes; None outside a git checkout.

    Where the tree is a copy without ``.git`` (a lent GPU machine), ``$MINITRON_GIT_COMMIT`` names the commit the
    copy was made from (whoever copies it vouches that it is that commit's clean tree); without it, None.
    """
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            commit = out.stdout.strip()
            # the committed results themselves do not change what is measured: several --save runs in a row
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                    ":(exclude)benchmarks/results"], cwd=REPO_ROOT, capture_output=True, text=True,
                                   timeout=10)
            return commit + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    given = os.environ.get(GIT_COMMIT_ENV, "").strip()
    if given:
        if not re.fullmatch(r"[0-9a-f]{40}(-dirty)?", given):
            raise ValueError(f"${GIT_COMMIT_ENV} must be a full 40-hex commit hash (optionally -dirty), got {given!r}")
        return given
    return None


def versions() -> dict:
    out: dict = {"python": platform.python_version()}
    for mod in ("minitron", "torch", "triton"):
        try:
            out[mod] = importlib.import_module(mod).__version__
        except Exception:  # noqa: BLE001 - optional packages
            out[mod] = None
    return out


def environment(device: str) -> dict:
    import torch

    env = {
        "device": device_name(device),
        "device_type": "cuda" if device.startswith("cuda") else "cpu",
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "git_commit": git_commit(),
        "versions": versions(),
        "host": platform.node(),
    }
    env["device_slug"] = sanitize(env["device"])
    env["machine_class"] = machine_class(env)
    return env


def _cpu_cache_kib(level: int) -> Optional[int]:
    """Size of CPU 0's unified cache of ``level`` (KiB) from sysfs; None where unknown."""
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for idx in sorted(base.glob("index*")):
            if (idx / "level").read_text().strip() == str(level) and (idx / "type").read_text().strip() != "Instruction":
                raw = (idx / "size").read_text().strip().upper()
                mult = 1024 if raw.endswith("M") else 1
                return int(raw.rstrip("KM")) * mult
    except (OSError, ValueError):
        pass
    return None


def machine_class(env: dict) -> str:
    """What must match for CPU time ratios of two runs to be comparable with the normal tolerance.

    Ratios to torch in the same run cancel machine speed and load only to first order: the ISA our
    kernels and torch's run (AVX-512 vs AVX2), the caches and the thread count change them by up to
    2.5x (measured: forcing AVX2 on the AVX-512 dev VM moved the bf16 kl_div ratio +125%; the CI runner
    moved four quick cases by +48% to +154%). GPUs are compared by name (absolute times).
    """
    if env.get("device_type") == "cuda":
        return str(env.get("device"))
    isa = "n/a"
    try:
        from minitron import _ext

        isa = _ext.build_info().get("cpu_isa", "n/a") if _ext.available() else "no-extension"
    except Exception:  # noqa: BLE001 - the class is informative; never fail a run over it
        pass
    try:
        import torch

        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001
        cap = "n/a"
    return (f"{env.get('device')}|ours={isa}|torch={cap}|threads={env.get('threads')}|"
            f"L2={_cpu_cache_kib(2)}K|L3={_cpu_cache_kib(3)}K")


def machine_limits(device: str, quick: bool = False) -> dict:
    """Copy bandwidth (GB/s, read+write), exp throughput (G exp/s, fp32) and fp32 matmul GFLOP/s."""
    import torch

    dev = torch.device(device)

    def best_time(fn: Callable[[], Any], reps: int) -> float:
        fn()
        _sync(device)
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            best = min(best, time.perf_counter() - t0)
        return best

    out: dict = {}
    n_copy = (64 if quick else 256) * 2**20 // 4 if dev.type == "cpu" else 1024 * 2**20 // 4
    src = torch.ones(n_copy, device=dev)
    dst = torch.empty_like(src)
    t = best_time(lambda: dst.copy_(src), 3 if quick else 7)
    out["copy_gbps"] = 2 * n_copy * 4 / t / 1e9
    del src, dst
    # exp: a buffer that fits in the caches (L2 on CPU) so the exp units, not memory, are the limit. Measured
    # with all threads and with one; the limit is the larger of the two and threads x the single-thread rate
    # (on a shared, oversubscribed CPU the multi-threaded number collapses first).
    n_exp = 2**16 * max(1, torch.get_num_threads()) if dev.type == "cpu" else 2**26
    x = torch.rand(n_exp, device=dev) * -20.0
    y = torch.empty_like(x)
    inner = 20

    def exps() -> None:
        for _ in range(inner):
            torch.exp(x, out=y)

    t = best_time(exps, 3 if quick else 7)
    out["exp_gps_all_threads"] = n_exp * inner / t / 1e9
    out["exp_gps"] = out["exp_gps_all_threads"]
    if dev.type == "cpu":
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            t1 = best_time(exps, 3 if quick else 7)
        finally:
            torch.set_num_threads(threads)
        out["exp_gps_1_thread"] = n_exp * inner / t1 / 1e9
        out["exp_gps"] = max(out["exp_gps_all_threads"], out["exp_gps_1_thread"] * threads)
    del x, y
    m = 1024 if (quick and dev.type == "cpu") else (2048 if dev.type == "cpu" else 8192)
    a = torch.randn(m, m, device=dev)
    b = torch.randn(m, m, device=dev)
    c = torch.empty(m, m, device=dev)
    t = best_time(lambda: torch.mm(a, b, out=c), 2 if quick else 5)
    out["matmul_gflops"] = 2 * m**3 / t / 1e9
    if dev.type == "cuda":
        a16, b16 = a.bfloat16(), b.bfloat16()
        t = best_time(lambda: torch.mm(a16, b16), 5)
        out["matmul_bf16_gflops"] = 2 * m**3 / t / 1e9
    out["threads"] = torch.get_num_threads()
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in out.items()}
