"""Scale benchmark: prune real-size (random-weight) Llama-3.1-8B and Mistral-NeMo-12B checkpoints on this machine.

Usage::

    python -m benchmarks.bench_scale [--models llama-3.1-8b,mistral-nemo-12b] [--scratch /work/scale-scratch]
        [--importance random|streaming] [--in-memory auto|yes|no] [--calib-tokens 512] [--bandwidth-bytes 2e9]
        [--overrides '{"num_hidden_layers": 8}'] [--importance-backend auto|reference]

Per model (``llama-3.1-8b`` -> Llama-3.1-Minitron-4B-Width and -4B-Depth; ``mistral-nemo-12b`` ->
Mistral-NeMo-Minitron-8B; the mixtures of experts ``qwen3-30b-a3b`` -> half the experts and 3/4 of the expert
width, ``mixtral-8x7b`` -> 6 of 8 experts and 3/4 of the expert width), each stage in its own subprocess.
Mixture-of-experts checkpoints are written as transformers saves them (one 2-D tensor per expert and projection).
Qwen3-30B-A3B is 61 GB in bf16 and Mixtral-8x7B 93 GB: where input plus output do not fit the scratch disk,
``--overrides '{"num_hidden_layers": N}'`` keeps every per-layer shape and reduces the layer count (the summary and
the record say so):

1. ``write``: a random-weight bf16 checkpoint (:mod:`benchmarks.write_checkpoint`, ``--init pool``);
2. ``importance``: layer-streamed importance on WikiText-2 calibration tokens
   (``minitron.compress.streaming.estimate_importance_streaming``, imported lazily) or, with
   ``--importance random``, random scores of the right shapes (the pruning cost does not depend on them);
3. ``prune_<preset>``: :func:`minitron.compress.stream_prune.prune_checkpoint_streaming` (depth presets drop
   the contiguous block of least block influence);
4. ``in_memory_<preset>`` (first width preset; ``--in-memory auto`` runs it only when the machine's available
   memory exceeds 1.25x the checkpoint + 2 GiB): load the whole model, ``prune_width``, ``save_model``;
5. ``generate_<preset>``: plain transformers (a process that never imports minitron) loads the pruned
   checkpoint and generates 8 tokens with a KV cache.

Measured per stage: wall time; peak anonymous memory and peak resident file pages of the stage's whole
process tree (``RssAnon``/``RssFile`` of ``/proc/PID/status``, summed over the process and its descendants,
sampled every 20 ms); bytes read and written (``/proc/self/io`` of the stage process at its end: ``rchar``/
``wchar`` through syscalls, ``read_bytes``/``write_bytes`` reaching the block device). The machine's sequential
write bandwidth (write + fsync of ``--bandwidth-bytes`` in 64 MiB blocks) is measured in the same run, and the
load average is recorded around every stage (the machine may be shared). One JSON record goes to
``.bench-out/scale-<time>.json``. Each model's files are deleted after its stages (``--keep`` keeps them).

This is a standalone script: ``python -m benchmarks`` discovers the file but it defines no harness cases (its
stages take minutes and write tens of GB).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger("minitron.benchmarks.scale")

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    "llama-3.1-8b": ["llama-3.1-minitron-4b-width", "llama-3.1-minitron-4b-depth"],
    "mistral-nemo-12b": ["mistral-nemo-minitron-8b"],
    "qwen3-8b": [],
    # Minitron-SSM: Nemotron-H-8B -> the Nemotron-H-4B shape (target in architectures/nemotron-h-4b-target.json)
    "nemotron-h-8b": ["nemotron-h-4b-target"],
    "qwen3-30b-a3b": ["qwen3-30b-a3b-half-experts"],
    "mixtral-8x7b": ["mixtral-8x7b-6-experts"],
}
SAMPLE_S = 0.02


# ---------------------------------------------------------------------------------------------- /proc sampling
def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    out += [int(x) for x in f.read().split()]
            except OSError:
                pass
    except OSError:
        pass
    return out


def _tree(pid: int) -> list[int]:
    seen, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.append(p)
        todo += _children(p)
    return seen


def _rss(pid: int) -> tuple[int, int]:
    """(RssAnon, RssFile) of one process in bytes (0, 0 if gone)."""
    anon = file = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) * 1024
                elif line.startswith("RssFile:"):
                    file = int(line.split()[1]) * 1024
    except OSError:
        pass
    return anon, file


class TreeSampler(threading.Thread):
    """Samples the summed RssAnon / RssFile of a process tree every ``SAMPLE_S`` seconds; keeps the peaks."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak_anon = self.peak_file = self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            anon = file = 0
            for p in _tree(self.pid):
                a, f = _rss(p)
                anon += a
                file += f
            self.peak_anon = max(self.peak_anon, anon)
            self.peak_file = max(self.peak_file, file)
            self.samples += 1
            self._halt.wait(SAMPLE_S)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def _loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def _meminfo() -> dict[str, int]:
    out = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            k, v = line.split(":", 1)
            if k in ("MemTotal", "MemAvailable", "Cached", "Dirty"):
                out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def _self_io() -> dict[str, int]:
    out = {}
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            k, v = line.split(":")
            out[k.strip()] = int(v)
    except OSError:
        pass
    return out


# ---------------------------------------------------------------------------------------------- stage runner (parent)
def run_stage(name: str, args: dict[str, Any], *, env_extra: Optional[dict[str, str]] = None,
              module: str = "benchmarks.bench_scale", timeout: float = 7200) -> dict[str, Any]:
    """Run stage ``name`` in a subprocess (``python -m benchmarks.bench_scale --stage``), measuring it."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="minitron-scale-") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", module, "--stage", name, "--stage-args", json.dumps(args), "--result", str(result)]
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.update(env_extra or {})
        load0, mem0 = _loadavg(), _meminfo()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=str(REPO_ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        lines: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            log.info("[%s] %s", name, line.rstrip())
        try:
            proc.wait(timeout=timeout)
        finally:
            sampler.stop()
        wall = time.perf_counter() - t0
        rec: dict[str, Any] = {
            "stage": name, "returncode": proc.returncode, "wall_s": round(wall, 3),
            "peak_anon_bytes": sampler.peak_anon, "peak_file_bytes": sampler.peak_file, "samples": sampler.samples,
            "loadavg_before": load0, "loadavg_after": _loadavg(), "mem_available_before": mem0.get("MemAvailable"),
        }
        if result.is_file():
            rec.update(json.loads(result.read_text()))
        if proc.returncode != 0:
            rec["error"] = "".join(lines[-30:])
        return rec


# ---------------------------------------------------------------------------------------------- stages (child)
def _finish(result: str, data: dict[str, Any]) -> None:
    data["io"] = _self_io()
    Path(result).write_text(json.dumps(data))


def stage_bandwidth(a: dict[str, Any]) -> dict[str, Any]:
    """Sequential write bandwidth: write + fsync ``bytes`` in 64 MiB blocks; the file is deleted."""
    path = Path(a["dir"]) / ".bandwidth-probe"
    block = os.urandom(64 << 20)
    n = max(1, int(a["bytes"]) // len(block))
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(n):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    dt = time.perf_counter() - t0
    path.unlink()
    return {"bytes": n * len(block), "seconds": dt, "write_bytes_per_s": n * len(block) / dt}


def stage_write(a: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.write_checkpoint import write_random_checkpoint
    from minitron.resources.architectures import architecture_dict

    arch: Any = a["arch"]
    if a.get("overrides"):
        from transformers import AutoConfig

        d = architecture_dict(arch)
        d.update(a["overrides"])
        arch = AutoConfig.for_model(d.pop("model_type"), **d)
    out = write_random_checkpoint(arch, a["out"], init=a.get("init", "pool"), shard_bytes=int(a["shard_bytes"]),
                                  overwrite=True, progress=False)
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return {"checkpoint_bytes": size}


def _calibration(ckpt: str, tokens: int, seq: int) -> list[dict[str, Any]]:
    import torch
    from transformers import AutoTokenizer

    from minitron.resources import data_file

    tok = AutoTokenizer.from_pretrained(ckpt)
    text = data_file("wikitext-2", "valid.txt").read_text(encoding="utf-8")
    ids = tok(text[: tokens * 8], return_tensors="pt").input_ids[0][:tokens]
    return [{"input_ids": ids[i: i + seq][None].clone()} for i in range(0, len(ids) - seq + 1, seq)]


def stage_importance(a: dict[str, Any]) -> dict[str, Any]:
    from minitron.compress.moe_layout import validate_checkpoint
    from minitron.compress.stream_prune import random_importance
    from minitron.io.shards import ShardedCheckpoint

    ck = validate_checkpoint(ShardedCheckpoint(a["ckpt"]))
    info: dict[str, Any] = {"method": a["method"]}
    if a["method"] == "random":
        scores = random_importance(ck.config, seed=0)
    else:
        from minitron.compress.streaming import estimate_importance_streaming  # another helper's module

        batches = _calibration(a["ckpt"], int(a["tokens"]), int(a["seq"]))
        t0 = time.perf_counter()
        scores = estimate_importance_streaming(a["ckpt"], batches, layer_metrics=("block_influence",), progress=False,
                                               backend=a.get("backend", "auto"))
        dt = time.perf_counter() - t0
        n = sum(int(b["input_ids"].numel()) for b in batches)
        L = int(ck.config.num_hidden_layers)
        info.update(tokens=n, seconds=dt, tokens_per_s_per_layer=n * L / dt, backend=a.get("backend", "auto"),
                    compute_dtype=scores.meta.get("compute_dtype"), has_expert_scores=scores.experts is not None)
    scores.save(a["out"], overwrite=True)
    return info


def _depth_drop(config: Any, scores: Any, keep: int) -> list[int]:
    from minitron.compress.prune import plan_depth

    return plan_depth(config, num_hidden_layers=keep, scores=scores, metric="block_influence", contiguous=True)


def stage_prune(a: dict[str, Any]) -> dict[str, Any]:
    from minitron.compress.importance import ImportanceScores
    from minitron.compress.stream_prune import prune_checkpoint_streaming
    from minitron.io.shards import ShardedCheckpoint

    scores = ImportanceScores.load(a["scores"])
    config = ShardedCheckpoint(a["ckpt"]).config
    drop = None
    if a.get("num_hidden_layers") and int(a["num_hidden_layers"]) != int(config.num_hidden_layers):
        drop = _depth_drop(config, scores, int(a["num_hidden_layers"]))
    t0 = time.perf_counter()
    out = prune_checkpoint_streaming(a["ckpt"], a["out"], scores=scores, width_targets=a.get("width"),
                                     drop_layers=drop, shard_bytes=int(a["shard_bytes"]), overwrite=True,
                                     progress=False)
    dt = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in Path(out).glob("*.safetensors"))
    return {"output_bytes": size, "prune_seconds": dt, "output_bytes_per_s": size / dt, "dropped_layers": drop}


def _expendable() -> None:
    """Make this process the first the kernel's OOM killer picks (the machine is shared; raising is allowed)."""
    try:
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:
        pass


def stage_in_memory(a: dict[str, Any]) -> dict[str, Any]:
    from minitron.compress.importance import ImportanceScores
    from minitron.compress.prune import prune_width
    from minitron.io.checkpoint import load_model, save_model

    _expendable()
    scores = ImportanceScores.load(a["scores"])
    t0 = time.perf_counter()
    model, _ = load_model(a["ckpt"], dtype="bfloat16")
    t1 = time.perf_counter()
    prune_width(model, scores, **a["width"])
    t2 = time.perf_counter()
    save_model(model, a["out"], tokenizer_dir=a["ckpt"], overwrite=True)
    t3 = time.perf_counter()
    return {"load_s": t1 - t0, "prune_s": t2 - t1, "save_s": t3 - t2}


_GENERATE = """
import json, sys, time, torch
open("/proc/self/oom_score_adj", "w").write("1000")  # the machine is shared: be the OOM killer's first pick
torch.set_num_threads(int(sys.argv[3]))
from transformers import AutoModelForCausalLM
t0 = time.perf_counter()
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16).eval()
t1 = time.perf_counter()
ids = torch.tensor([[72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100]])
with torch.no_grad():
    out = m.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
t2 = time.perf_counter()
assert out.shape == (1, ids.shape[1] + 8), out.shape
assert "minitron" not in sys.modules
json.dump({"load_s": t1 - t0, "generate_s": t2 - t1, "new_tokens": int(out.shape[1] - ids.shape[1]),
           "tokens": out[0].tolist(), "minitron_imported": "minitron" in sys.modules,
           "num_parameters": sum(p.numel() for p in m.parameters())}, open(sys.argv[2], "w"))
"""


def stage_generate(a: dict[str, Any]) -> dict[str, Any]:
    """Plain transformers, in a grandchild process that never imports minitron (env without PYTHONPATH)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        res = Path(tmp) / "gen.json"
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        r = subprocess.run([sys.executable, "-c", _GENERATE, a["ckpt"], str(res), str(a.get("threads", 2))], env=env,
                           cwd=tmp, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(r.stderr[-3000:])
        return json.loads(res.read_text())


STAGES = {"bandwidth": stage_bandwidth, "write": stage_write, "importance": stage_importance, "prune": stage_prune,
          "in_memory": stage_in_memory, "generate": stage_generate}


# ---------------------------------------------------------------------------------------------- driver
def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def _preset(name: str) -> dict[str, Any]:
    """A pruning preset of ``presets.json``, or the ``target`` block of ``architectures/<name>.json`` (hybrid
    targets: the width dict also holds the Mamba targets, ``mamba_num_heads`` / ``mamba_head_dim``)."""
    from minitron.resources.architectures import _read, pruning_preset

    try:
        return pruning_preset(name)
    except KeyError:
        t = _read(name).get("target")
        if not t:
            raise
        width = dict(t["width"])
        width.update({k: v for k, v in (t.get("mamba") or {}).items() if k in ("mamba_num_heads", "mamba_head_dim")})
        return {"base": t["base"], "width": width, "num_hidden_layers": t["num_hidden_layers"], "source": name}


def run_model(arch: str, scratch: Path, args: argparse.Namespace, overrides: Optional[dict[str, Any]] = None,
              preset_overrides: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    from minitron.resources.architectures import architecture_dict

    base = scratch / arch
    ckpt, scores_dir = base / "checkpoint", base / "importance"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    rec: dict[str, Any] = {"arch": arch, "overrides": overrides, "preset_overrides": preset_overrides, "stages": {}}
    st = rec["stages"]
    try:
        st["write"] = run_stage("write", {"arch": arch, "out": str(ckpt), "shard_bytes": args.shard_bytes,
                                          "overrides": overrides})
        if st["write"]["returncode"]:
            return rec
        st["importance"] = run_stage("importance", {"ckpt": str(ckpt), "out": str(scores_dir),
                                                    "method": args.importance, "tokens": args.calib_tokens,
                                                    "seq": args.calib_seq, "backend": args.importance_backend})
        if st["importance"]["returncode"]:
            return rec
        ckpt_bytes = st["write"].get("checkpoint_bytes", _du(ckpt))
        did_in_memory = False
        for preset_name in MODELS[arch]:
            preset = _preset(preset_name)
            po = (preset_overrides or {}).get(preset_name, {})
            width = po.get("width", preset["width"])
            layers = po.get("num_hidden_layers", preset["num_hidden_layers"])
            arch_layers = architecture_dict(arch).get("num_hidden_layers") or len(
                architecture_dict(arch).get("hybrid_override_pattern") or "")
            if overrides and overrides.get("num_hidden_layers"):
                arch_layers = overrides["num_hidden_layers"]
            if "num_hidden_layers" not in po and layers in (arch_layers, architecture_dict(arch).get("num_hidden_layers")):
                layers = None  # a width-only preset keeps every layer
            out = base / preset_name
            if "prune" in args.stages:
                st[f"prune_{preset_name}"] = run_stage("prune", {
                    "ckpt": str(ckpt), "scores": str(scores_dir), "out": str(out), "width": width,
                    "num_hidden_layers": layers, "shard_bytes": args.shard_bytes})
                if st[f"prune_{preset_name}"]["returncode"] == 0 and "generate" in args.stages:
                    st[f"generate_{preset_name}"] = run_stage("generate", {"ckpt": str(out)})
            if width and not did_in_memory and args.in_memory != "no":
                avail = _meminfo().get("MemAvailable", 0)
                need = int(1.25 * ckpt_bytes) + (2 << 30)
                if args.in_memory == "yes" or avail > need:
                    did_in_memory = True
                    mem_out = base / f"{preset_name}-in-memory"
                    st[f"in_memory_{preset_name}"] = run_stage("in_memory", {
                        "ckpt": str(ckpt), "scores": str(scores_dir), "out": str(mem_out), "width": width})
                    shutil.rmtree(mem_out, ignore_errors=True)
                else:
                    rec[f"in_memory_{preset_name}_skipped"] = (
                        f"MemAvailable {avail / 2**30:.1f} GiB <= 1.25 x checkpoint + 2 GiB = {need / 2**30:.1f} GiB")
            rec.setdefault("disk_peak_bytes", 0)
            rec["disk_peak_bytes"] = max(rec["disk_peak_bytes"], _du(base))
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
        return rec
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


def summarize(record: dict[str, Any]) -> list[str]:
    """Human-readable lines: per model and stage, time, peak memory, throughput vs bandwidth."""
    bw = (record.get("bandwidth") or {}).get("write_bytes_per_s")
    bw_end = (record.get("bandwidth_end") or {}).get("write_bytes_per_s")
    lines = [f"write bandwidth: {bw / 1e6:.0f} MB/s" if bw else "write bandwidth: n/a"]
    if bw_end:
        lines[0] += f" (at the end: {bw_end / 1e6:.0f} MB/s)"
    for m in record.get("models", []):
        layers = (m.get("overrides") or {}).get("num_hidden_layers")
        if layers is not None:
            from minitron.resources.architectures import architecture_dict

            full = architecture_dict(m["arch"])["num_hidden_layers"]
            lines.append(f"{m['arch']}: {layers} of its {full} layers (every per-layer shape exact; --overrides)")
        for name, s in m["stages"].items():
            extra = ""
            if name == "importance" and s.get("seconds"):
                extra = (f", {s['tokens']} tokens in {s['seconds']:.1f} s = {s['tokens_per_s_per_layer']:.0f} "
                         f"token-layers/s ({s.get('compute_dtype')}, backend {s.get('backend')})")
            if name.startswith("prune_") and s.get("output_bytes_per_s"):
                frac = f" = {s['output_bytes_per_s'] / bw:.0%} of bandwidth" if bw else ""
                extra = f", wrote {s['output_bytes'] / 1e9:.2f} GB at {s['output_bytes_per_s'] / 1e6:.0f} MB/s{frac}"
            if name.startswith("generate_") and "generate_s" in s:
                extra = f", load {s['load_s']:.1f} s, 8 tokens in {s['generate_s']:.1f} s"
            lines.append(f"{m['arch']} {name}: rc={s['returncode']} {s['wall_s']:.1f} s, peak anon "
                         f"{s['peak_anon_bytes'] / 2**30:.2f} GiB, peak file {s['peak_file_bytes'] / 2**30:.2f} GiB{extra}")
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--stage-args", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--models", default="llama-3.1-8b,mistral-nemo-12b")
    ap.add_argument("--scratch", default="/work/scale-scratch")
    ap.add_argument("--importance", default="random", choices=("random", "streaming"))
    ap.add_argument("--in-memory", default="auto", choices=("auto", "yes", "no"))
    ap.add_argument("--importance-backend", default="auto", help="kernel backend of streamed importance")
    ap.add_argument("--calib-tokens", type=int, default=512)
    ap.add_argument("--calib-seq", type=int, default=256)
    ap.add_argument("--bandwidth-bytes", type=float, default=2e9)
    ap.add_argument("--shard-bytes", type=float, default=5e9)
    ap.add_argument("--overrides", default=None, help="JSON config overrides (scaled-down test runs)")
    ap.add_argument("--preset-overrides", default=None,
                    help='JSON {preset: {"width": {...}, "num_hidden_layers": n}} (scaled-down test runs)')
    ap.add_argument("--out", default=None, help="JSON record path (default .bench-out/scale-<time>.json)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints in --scratch")
    ap.add_argument("--stages", default="prune,generate",
                    help="which of prune,generate to run after write+importance (default both; in_memory: --in-memory)")
    args = ap.parse_args(argv)
    args.stages = {x.strip() for x in args.stages.split(",") if x.strip()}
    if args.stage:
        logging.basicConfig(level=logging.WARNING)
        data = STAGES[args.stage](json.loads(args.stage_args))
        _finish(args.result, data)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    overrides = json.loads(args.overrides) if args.overrides else None
    preset_overrides = json.loads(args.preset_overrides) if args.preset_overrides else None
    record: dict[str, Any] = {
        "benchmark": "scale", "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.bench_scale"] + (argv or sys.argv[1:])),
        "machine": {"nproc": os.cpu_count(), **_meminfo(), "loadavg": _loadavg(),
                    "disk_free_bytes": shutil.disk_usage(scratch).free},
        "settings": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items()
                     if k not in ("stage", "stage_args", "result")},
    }
    try:
        import subprocess as sp

        record["commit"] = sp.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    bw = run_stage("bandwidth", {"dir": str(scratch), "bytes": args.bandwidth_bytes})
    record["bandwidth"] = bw
    record["models"] = []
    for arch in [m.strip() for m in args.models.split(",") if m.strip()]:
        if arch not in MODELS:
            raise SystemExit(f"--models: unknown {arch!r}; available: {', '.join(MODELS)}")
        record["models"].append(run_model(arch, scratch, args, overrides, preset_overrides))
    # the machine may be shared: measure the bandwidth again at the end and report both
    record["bandwidth_end"] = run_stage("bandwidth", {"dir": str(scratch), "bytes": args.bandwidth_bytes})
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    record["loadavg_end"] = _loadavg()
    out = Path(args.out) if args.out else REPO_ROOT / ".bench-out" / f"scale-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1, default=str) + "\n")
    for line in summarize(record):
        print(line)
    print(f"record: {out}")
    failed = [n for m in record["models"] for n, s in m["stages"].items() if s.get("returncode")]
    return 1 if failed or bw.get("returncode") else 0


if __name__ == "__main__":
    sys.exit(main())
