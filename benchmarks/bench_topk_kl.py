"""Benchmark of ``minitron.ops.fused_linear_topk_kl_div`` (LM head + sparse top-k teacher KL, fwd+bwd).

What is compared (``full`` mode = forward + backward; gradients w.r.t. the student hidden states and LM-head
weight; the teacher is a stored top-k of log-probabilities, no bias)::

    minitron-<backend>   fused_linear_topk_kl_div(h, W, idx, lp, backend=<backend>)  (chunked, no [N, V] logits)
    gemms-only           the student's LM-head GEMMs alone: z = h @ W.T, grad_h = g @ W, grad_W = g.T @ h with a
                         fixed [N, V] g   <- the time target (fused <= 1.15x)
    torch-eager          z = h @ W.T, then the dense plain-torch expression of the loss
                         (minitron.ops.topk_kl.topk_kl_div_reference), autograd backward
    torch-compile        torch.compile of the torch-eager function

Shapes: CPU ``--quick``: N=256, H=256, V=32000, k=64. CPU default: N=1024, H=1024, V=32000 and the heavy headline
N=4096, H=2048, V=128256, k=64 fp32 (6.4 TFLOP per fwd+bwd: one call per provider, minutes each on 2 cores; the
materialised torch versions need ~20 GiB and are skipped when the machine has less available). CUDA: N=4096,
H=4096, V=128256, k=64 in fp32 and bf16.

Self-contained: ``cases(cfg)`` plugs into ``python -m benchmarks`` (the shared harness), and running this file
directly (``python -m benchmarks.bench_topk_kl [--quick] [--providers a,b]``) times the CPU headline (or quick)
case with a plain timer and prints one line per provider, without the harness.
"""
from __future__ import annotations

import argparse
import functools
import gc
import time
from typing import Any

BENCH = "topk_kl_div"
HEADLINE = {"N": 4096, "H": 2048, "V": 128256, "k": 64}
QUICK = {"N": 256, "H": 256, "V": 32000, "k": 64}
ELT = {"float32": 4, "bfloat16": 2, "float16": 2}


def make_inputs(n: int, h: int, v: int, k: int, dtype: str, device: str, seed: int = 0):
    """Student hidden [n, h] and weight [v, h] (both require grad; logits of std ~2), and a teacher's top-k
    (indices int64 [n, k], fp32 log-probabilities) drawn from a random teacher with a peaked distribution."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    hid = (torch.randn(n, h, generator=g)).to(device=device, dtype=dt).requires_grad_(True)
    w = (torch.randn(v, h, generator=g) * (2.0 / h ** 0.5)).to(device=device, dtype=dt).requires_grad_(True)
    # teacher: k random distinct ids per token holding 90% of the mass (cheap to draw at V=128256)
    idx = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(min(n, 64))])
    idx = idx.repeat((n + idx.shape[0] - 1) // idx.shape[0], 1)[:n]
    lp = torch.log_softmax(torch.randn(n, k, generator=g) * 2, -1) + torch.log(torch.tensor(0.9))
    return hid, w, idx.to(device), lp.to(device)


def loss_fn(provider: str, temperature: float = 1.0):
    import torch

    if provider.startswith("minitron-"):
        from minitron.ops import fused_linear_topk_kl_div

        return functools.partial(fused_linear_topk_kl_div, temperature=temperature, reduction="mean",
                                 backend=provider[len("minitron-"):])
    from minitron.ops import topk_kl_div_reference

    def eager(hid, w, idx, lp):
        return topk_kl_div_reference(hid @ w.t(), idx, lp, temperature=temperature, reduction="mean")

    if provider == "torch-eager":
        return eager
    if provider == "torch-compile":
        return torch.compile(eager, dynamic=False)
    raise ValueError(f"unknown provider {provider!r}")


def gemms_only(hid, w, g):
    """The three LM-head GEMMs of a fwd+bwd: logits, then the hidden and weight gradients from ``g``."""
    z = hid.detach() @ w.detach().t()
    gh = g @ w.detach()
    gw = g.t() @ hid.detach()
    return z, gh, gw


def estimated_bytes(provider: str, n: int, v: int, elt: int) -> float:
    nv = n * v * elt
    if provider.startswith("minitron-"):
        return 0.1 * nv
    if provider == "gemms-only":
        return 2.1 * nv
    return 9.0 * nv


def providers(device: str) -> list[str]:
    ours = ["cpp"] if device == "cpu" else ["cuda", "triton"]
    return [f"minitron-{b}" for b in ours] + ["gemms-only", "torch-eager", "torch-compile"]


# ----------------------------------------------------------------------------------------------
# harness plug-in (python -m benchmarks --only topk_kl)
# ----------------------------------------------------------------------------------------------


def _setup(case, device: str):
    from benchmarks._harness import Bench, autograd_bench, require_free_memory

    s = case.shape
    if not device.startswith("cuda"):
        weights = s["V"] * s["H"] * ELT[case.dtype] * 2
        require_free_memory(estimated_bytes(case.provider, s["N"], s["V"], ELT[case.dtype]) + weights + 2**30,
                            f"{case.provider} at {case.shape_str}")
    hid, w, idx, lp = make_inputs(s["N"], s["H"], s["V"], s["k"], case.dtype, device)
    if case.provider == "gemms-only":
        import torch

        g = torch.full((s["N"], s["V"]), 1e-6, dtype=hid.dtype, device=device)
        return Bench(fn=lambda: gemms_only(hid, w, g), keep=[hid, w, g])
    f = loss_fn(case.provider, case.params.get("T", 1.0))
    bench = autograd_bench(lambda: f(hid, w, idx, lp), [hid, w], case.mode)
    bench.keep = [hid, w, idx, lp]
    return bench


def _case(provider: str, mode: str, n: int, h: int, v: int, k: int, dtype: str, **kw: Any):
    from benchmarks._harness import Case

    e = ELT[dtype]
    flops = {"forward": 2 * n * v * h, "backward": 4 * n * v * h, "full": 6 * n * v * h}[mode]
    return Case(bench=BENCH, provider=provider, mode=mode, shape={"N": n, "H": h, "V": v, "k": k}, dtype=dtype,
                setup=_setup, params={"T": 1.0, "tail": True}, reference="gemms-only",
                bytes_moved=(n * h + v * h) * e * 2, exps=2 * n * v, flops=flops, size=n * v * h,
                size_label="tokens x vocab x hidden", info={"logits_bytes": n * v * e}, **kw)


def cases(cfg) -> list:
    dev = cfg.device
    out: list = []

    def add(sh: dict, dtype: str, heavy: bool = False, **kw: Any) -> None:
        for prov in providers(dev):
            if heavy and prov == "torch-compile" and not dev.startswith("cuda"):
                continue  # compiling the materialised expression at the headline shape takes minutes more
            out.append(_case(prov, "full", sh["N"], sh["H"], sh["V"], sh["k"], dtype, **kw))

    if dev.startswith("cuda"):
        big = {"N": 4096, "H": 4096, "V": 128256, "k": 64}
        add(big, "float32")
        add(big, "bfloat16")
        return out
    if cfg.quick:
        add(QUICK, "float32")
        return out
    add({"N": 1024, "H": 1024, "V": 32000, "k": 64}, "float32")
    if cfg.heavy:
        add(HEADLINE, "float32", heavy=True, warmup=0, repeats=1, timeout_s=3600, note="heavy: one call per provider")
    return out


# ----------------------------------------------------------------------------------------------
# standalone timing (no harness)
# ----------------------------------------------------------------------------------------------


def _available_bytes() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")


def _time_provider(provider: str, sh: dict, repeats: int) -> tuple[float, str]:
    import torch

    n, v = sh["N"], sh["V"]
    need = estimated_bytes(provider, n, v, 4) + v * sh["H"] * 8 + 2**30
    if need > _available_bytes():
        return float("nan"), f"skipped: needs ~{need / 2**30:.1f} GiB, {_available_bytes() / 2**30:.1f} available"
    hid, w, idx, lp = make_inputs(n, sh["H"], v, sh["k"], "float32", "cpu")
    if provider == "gemms-only":
        g = torch.full((n, v), 1e-6)
        fn = functools.partial(gemms_only, hid, w, g)
    else:
        f = loss_fn(provider)

        def fn():
            hid.grad = None
            w.grad = None
            f(hid, w, idx, lp).backward()

    times = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="fused_linear_topk_kl_div fwd+bwd vs the LM-head GEMMs alone (CPU)")
    ap.add_argument("--quick", action="store_true", help=f"small shape {QUICK} instead of the headline {HEADLINE}")
    ap.add_argument("--providers", default=None, help="comma-separated subset of " + ",".join(providers("cpu")))
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args(argv)
    sh = QUICK if args.quick else HEADLINE
    provs = args.providers.split(",") if args.providers else providers("cpu")
    import torch

    print(f"fused_linear_topk_kl_div fwd+bwd, fp32, CPU, {sh}, threads={torch.get_num_threads()}")
    res = {}
    for p in provs:
        t, why = _time_provider(p, sh, args.repeats)
        res[p] = t
        ratio = t / res["gemms-only"] if "gemms-only" in res and res["gemms-only"] == res["gemms-only"] else None
        print(f"  {p:16s} {t:9.2f} s" + (f"  ({ratio:.3f}x gemms-only)" if ratio else "") + (f"  {why}" if why else ""),
              flush=True)
    if "minitron-cpp" in res and "gemms-only" in res:
        print(f"minitron-cpp / gemms-only = {res['minitron-cpp'] / res['gemms-only']:.3f} (target <= 1.15)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
