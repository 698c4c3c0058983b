"""Benchmark of ``minitron.ops.fused_linear_kl_div`` (LM heads + KL without materialising the logits).

What is compared (all fwd+bwd in ``full`` mode; gradients w.r.t. the student hidden states and LM-head weight;
the teacher side is frozen, no bias)::

    minitron-<backend>          fused_linear_kl_div(h_s, W_s, h_t, W_t, backend=<backend>)
    matmul+minitron-<backend>   z_s = h_s @ W_s.T;  with no_grad: z_t = h_t @ W_t.T;  kl_div(z_s, z_t, backend=...)
                                backward: our kl_div gradient, then autograd's two matmuls
                                (grad h_s = g @ W_s, grad W_s = g.T @ h_s)   <- the time target (fused <= 1.3x)
    torch-eager                 the same two matmuls + benchmarks.bench_kl.eager_kl_div (log_softmax x2 +
                                F.kl_div(log_target=True)), autograd backward   <- the memory target (fused <= 1/8)
    torch-compile               torch.compile of the torch-eager function (not at the heavy CPU shape)
    trl                         TRL 1.16's tiled fused-linear generalised JSD (DistillationTrainer's
                                _chunked_divergence_loss; Triton on CUDA, its torch tile path on CPU), JSD
                                beta=0.5 cases only (TRL's beta convention agrees with ours there; T=1)
    liger                       LigerFusedLinearJSD (CUDA, JSD beta=0.5 cases, when liger_kernel is installed)

So the fused op and ``matmul+minitron`` do the same four [N x V x H] matmuls (two forward, two backward) and
the same KL math; the fused op's extra cost is whatever recomputation/chunking it does, its gain is never
holding the [N, V] logits (and their gradient).

Shapes: CPU ``--quick``: N=256, H=256, V=32000. CPU default: N=1024, H=1024, V=32000 (forward KL, and JSD
beta=0.5 with TRL) and the heavy headline
N=4096, H_s=H_t=2048, V=128256 fp32 (8.6 TFLOP per fwd+bwd: one untimed-warmup-free call per provider,
~1-3 minutes each on 2 cores; the unfused torch version needs ~15 GiB and is skipped with a message when the
machine has less available; ``--skip-heavy`` leaves the case out). CUDA: N=4096, H=4096, V=128256 in fp32 and
bf16; ``--full`` sweeps N in {1024, 4096, 8192}, H in {2048, 4096, 8192}, V in {32000, 128256, 256000} (bf16).
"""
from __future__ import annotations

import functools
from typing import Any

from benchmarks._harness import (BenchConfig, Bench, Case, Unavailable, autograd_bench, dtype_of, our_backends,
                                 require_free_memory)
from benchmarks.bench_kl import ELT, eager_kl_div

BENCH = "fused_linear_kl_div"
HEADLINE = {"N": 4096, "Hs": 2048, "Ht": 2048, "V": 128256}


def make_inputs(n: int, hs: int, ht: int, v: int, dtype: str, device: str, seed: int = 0):
    """Student hidden [n, hs] and weight [v, hs] (both require grad), teacher hidden [n, ht] and weight [v, ht];
    weights scaled so the logits have a standard deviation of about 2."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    dt = dtype_of(dtype)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dt)

    h_s = rnd(n, hs).requires_grad_(True)
    w_s = rnd(v, hs, scale=2.0 / hs ** 0.5).requires_grad_(True)
    h_t = rnd(n, ht)
    w_t = rnd(v, ht, scale=2.0 / ht ** 0.5)
    return h_s, w_s, h_t, w_t


def unfused(kl, h_s, w_s, h_t, w_t):
    """The unfused pipeline: student logits with grad, teacher logits without, then ``kl``."""
    import torch

    z_s = h_s @ w_s.t()
    with torch.no_grad():
        z_t = h_t @ w_t.t()
    return kl(z_s, z_t)


def loss_fn(provider: str, kl_mode: str, temperature: float, beta: float):
    import torch

    if provider.startswith("minitron-"):
        from minitron.ops import fused_linear_kl_div

        return functools.partial(fused_linear_kl_div, mode=kl_mode, temperature=temperature, beta=beta,
                                 reduction="mean", backend=provider[len("minitron-"):])
    if provider.startswith("matmul+minitron-"):
        from minitron.ops import kl_div

        kl = functools.partial(kl_div, mode=kl_mode, temperature=temperature, beta=beta, reduction="mean",
                               backend=provider[len("matmul+minitron-"):])
        return functools.partial(unfused, kl)
    eager = functools.partial(unfused, functools.partial(eager_kl_div, kl_mode=kl_mode, temperature=temperature,
                                                         beta=beta))
    if provider == "torch-eager":
        return eager
    if provider == "torch-compile":
        return torch.compile(eager, dynamic=False)
    if provider == "liger":
        try:
            from liger_kernel.transformers import LigerFusedLinearJSD
        except ImportError as exc:
            raise Unavailable(f"liger_kernel is not installed ({exc})") from exc
        if kl_mode != "jsd" or beta != 0.5:
            raise Unavailable("LigerFusedLinearJSD is compared in jsd mode at beta=0.5 only")
        jsd = LigerFusedLinearJSD(jsd_beta=beta, temperature=temperature)
        return lambda h_s, w_s, h_t, w_t: jsd(h_s, w_s, h_t, w_t)
    if provider == "trl":
        return trl_loss_fn(kl_mode, temperature, beta)
    raise Unavailable(f"unknown provider {provider!r}")


def trl_loss_fn(kl_mode: str, temperature: float, beta: float):
    """TRL 1.16's tiled fused-linear generalised JSD (``DistillationTrainer``'s loss; Triton on GPUs, its torch
    tile path on CPU) as ``f(h_s, w_s, h_t, w_t) -> mean loss``. Compared at JSD beta=0.5 only, where TRL's
    mixture ``M = beta P + (1 - beta) Q`` and ours agree, and at T=1 (TRL has no ``T**2`` factor)."""
    import torch

    try:
        from trl.trainer.distillation_trainer import _chunked_divergence_loss
    except ImportError as exc:
        raise Unavailable(f"trl (>= 1.16, with DistillationTrainer) is not installed ({exc})") from exc
    if kl_mode != "jsd" or beta != 0.5 or temperature != 1.0:
        raise Unavailable("TRL's chunked divergence is compared in jsd mode at beta=0.5, T=1 only")

    def f(h_s, w_s, h_t, w_t):
        mask = torch.ones(1, h_s.shape[0], dtype=torch.long, device=h_s.device)
        loss, _entropy, _n = _chunked_divergence_loss(h_s.unsqueeze(0), h_t.unsqueeze(0), w_s, w_t, mask, beta)
        return loss

    return f


def estimated_bytes(provider: str, n: int, v: int, elt: int) -> float:
    """Rough peak beyond the inputs, to refuse cases that cannot fit instead of swapping / being OOM-killed."""
    nv = n * v * elt
    if provider.startswith("minitron-"):
        return 0.1 * nv
    if provider.startswith("matmul+"):
        return 3.2 * nv
    return 7.5 * nv


def _setup(case: Case, device: str) -> Bench:
    p, s = case.params, case.shape
    if case.provider == "liger" and not device.startswith("cuda"):
        raise Unavailable("liger kernels run on CUDA only")
    if not device.startswith("cuda"):
        weights = s["V"] * (2 * s["Hs"] + s["Ht"]) * ELT[case.dtype]
        require_free_memory(estimated_bytes(case.provider, s["N"], s["V"], ELT[case.dtype]) + weights + 2**30,
                            f"{case.provider} at {case.shape_str}")
    f = loss_fn(case.provider, p["kl_mode"], p["T"], p.get("beta", 0.5))
    h_s, w_s, h_t, w_t = make_inputs(s["N"], s["Hs"], s["Ht"], s["V"], case.dtype, device)
    bench = autograd_bench(lambda: f(h_s, w_s, h_t, w_t), [h_s, w_s], case.mode)
    bench.keep = [h_s, w_s, h_t, w_t]
    return bench


def providers(device: str, heavy: bool = False, jsd: bool = False) -> list[str]:
    """Providers of a case; ``jsd``: a JSD beta=0.5 case, which TRL (and Liger on CUDA) join."""
    ours = our_backends(device)
    out = [f"minitron-{b}" for b in ours] + [f"matmul+minitron-{b}" for b in ours] + ["torch-eager"]
    if not heavy or device.startswith("cuda"):
        out.append("torch-compile")
    if jsd:
        out.append("trl")
        if device.startswith("cuda"):
            out.append("liger")
    return out


def _case(provider: str, mode: str, n: int, hs: int, ht: int, v: int, dtype: str, kl_mode: str = "forward",
          temperature: float = 1.0, beta: float = 0.5, **kw: Any) -> Case:
    e = ELT[dtype]
    fwd_flops = 2 * n * v * (hs + ht)
    flops = {"forward": fwd_flops, "backward": 4 * n * v * hs, "full": fwd_flops + 4 * n * v * hs}[mode]
    inputs = (n * hs + v * hs + n * ht + v * ht) * e
    grads = (n * hs + v * hs) * e
    params = {"kl_mode": kl_mode, "T": temperature}
    if kl_mode == "jsd":
        params["beta"] = beta
    return Case(bench=BENCH, provider=provider, mode=mode, shape={"N": n, "Hs": hs, "Ht": ht, "V": v}, dtype=dtype,
                setup=_setup, params=params, reference="torch-eager",
                bytes_moved=inputs + (grads if mode != "forward" else 0), exps=2 * n * v, flops=flops,
                size=n * v * (hs + ht), size_label="tokens x vocab x (Hs + Ht)",
                info={"grad_bytes": grads, "logits_bytes": n * v * e}, **kw)


def cases(cfg: BenchConfig) -> list[Case]:
    dev = cfg.device
    out: list[Case] = []

    def add(n: int, hs: int, ht: int, v: int, dtype: str, modes=("full",), kl_modes=("forward",), heavy=False,
            **kw: Any) -> None:
        for kl_mode in kl_modes:
            for mode in modes:
                for prov in providers(dev, heavy, jsd=kl_mode == "jsd"):
                    out.append(_case(prov, mode, n, hs, ht, v, dtype, kl_mode, **kw))

    if dev.startswith("cuda"):
        if cfg.full:
            for n in (1024, 4096, 8192):
                for h in (2048, 4096, 8192):
                    for v in (32000, 128256, 256000):
                        add(n, h, h, v, "bfloat16")
        elif cfg.quick:
            add(1024, 2048, 2048, 32000, "bfloat16")
        add(4096, 4096, 4096, 128256, "float32", ("full", "forward"))
        add(4096, 4096, 4096, 128256, "bfloat16", ("full", "forward"))
        add(4096, 4096, 4096, 128256, "bfloat16", ("full",), ("jsd",))
        return out

    if cfg.quick:
        add(256, 256, 256, 32000, "float32", ("full",))
        return out
    add(1024, 1024, 1024, 32000, "float32", ("full",))
    add(1024, 1024, 1024, 32000, "float32", ("full",), ("jsd",))
    if cfg.heavy:
        h = HEADLINE
        add(h["N"], h["Hs"], h["Ht"], h["V"], "float32", ("full",), heavy=True, warmup=0, repeats=1, timeout_s=3600,
            note="heavy: one call per provider")
    return out
