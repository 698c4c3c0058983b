"""Result records: one JSON object per case and provider (:func:`make_record`), ratios to the reference
provider of the same run, and JSONL files."""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Iterable, Optional

from benchmarks.cases import Case
from benchmarks.paths import RECORD_VERSION


def make_record(case: Case, result: dict, env: dict, run_id: str, limits: Optional[dict] = None) -> dict:
    """One result line. Fields: record version, run id, timestamp, device (name, slug, type), threads, git
    commit, versions, bench, case key, provider, ours, reference provider, mode, shape, params, dtype,
    status ("ok" | "unavailable" | "error" | "timeout"), error, median/p20/p80/min ms, repeats, samples,
    peak bytes + method, input bytes, bytes_moved / exps / flops, achieved fractions of the machine limits."""
    rec = {
        "v": RECORD_VERSION,
        "kind": "result",
        "run_id": run_id,
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": env.get("device"),
        "device_slug": env.get("device_slug"),
        "device_type": env.get("device_type"),
        "threads": env.get("threads"),
        "machine_class": env.get("machine_class"),
        "git_commit": env.get("git_commit"),
        "versions": env.get("versions"),
        "bench": case.bench,
        "case": case.case_key,
        "provider": case.provider,
        "ours": bool(case.ours),
        "reference": case.reference,
        "mode": case.mode,
        "shape": dict(case.shape),
        "params": dict(case.params),
        "dtype": case.dtype,
        "size": case.x,
        "size_label": case.size_label or "x".join(case.shape),
        "note": case.note,
        "info": dict(case.info),
        "tolerance": case.tolerance,
        "status": result.get("status", "ok"),
        "error": result.get("error"),
    }
    for key in ("median_ms", "p20_ms", "p80_ms", "min_ms", "repeats", "samples_ms", "peak_bytes", "peak_method",
                "input_bytes", "worker_s"):
        rec[key] = result.get(key)
    moved = result.get("bytes_moved", case.bytes_moved)
    rec["bytes_moved"] = moved
    rec["exps"] = case.exps
    rec["flops"] = case.flops
    med = rec["median_ms"]
    if rec["status"] == "ok" and med and limits:
        sec = med / 1e3
        if moved and limits.get("copy_gbps"):
            rec["bw_frac"] = round(moved / sec / 1e9 / limits["copy_gbps"], 4)
        if case.exps and limits.get("exp_gps"):
            rec["exp_frac"] = round(case.exps / sec / 1e9 / limits["exp_gps"], 4)
        if case.flops and limits.get("matmul_gflops"):
            rec["flop_frac"] = round(case.flops / sec / 1e9 / limits["matmul_gflops"], 4)
    return rec


def add_ratios(records: list[dict]) -> None:
    """Set ``ref_ratio`` = median time / the reference provider's median time (same run, same case key) on each
    record, ``ref_ratio_min`` the same with the fastest samples, and ``ref_mem_ratio`` for peak memory."""
    by_key = {(r["run_id"], r["case"], r["provider"]): r for r in records if r.get("kind") == "result"}
    for r in records:
        if r.get("kind") != "result" or r.get("status") != "ok" or not r.get("reference"):
            continue
        ref = by_key.get((r["run_id"], r["case"], r["reference"]))
        if ref is not None and ref.get("status") == "ok" and ref.get("median_ms"):
            r["ref_ratio"] = round(r["median_ms"] / ref["median_ms"], 5)
            if r.get("min_ms") and ref.get("min_ms"):
                r["ref_ratio_min"] = round(r["min_ms"] / ref["min_ms"], 5)
            if r.get("peak_bytes") is not None and ref.get("peak_bytes"):
                r["ref_mem_ratio"] = round(r["peak_bytes"] / ref["peak_bytes"], 5)


def append_jsonl(path: Path, records: Iterable[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True) + "\n")


def load_jsonl(path: Path | str) -> list[dict]:
    out = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{i}: not valid JSON ({exc})") from exc
    return out
