"""Benchmark of ``minitron.ops.kl_div`` (fused KL / JSD over the vocabulary) against torch and other libraries.

Providers
---------
* ``minitron-<backend>``: ``minitron.ops.kl_div(..., backend=<backend>)`` for every backend of the device
  (``cpp`` on CPU; ``cuda`` and ``triton`` on CUDA).
* ``torch-eager``: :func:`eager_kl_div` - ``log_softmax`` of both inputs (after ``/ T`` when ``T != 1``) and
  ``F.kl_div(..., log_target=True, reduction="batchmean")`` (times ``T**2``), computed in the input dtype;
  reverse KL swaps the arguments, JSD goes through the log of the mixture. Backward by autograd.
* ``torch-compile``: ``torch.compile`` of exactly that function (default mode).
* ``liger`` (CUDA, when ``liger_kernel`` is installed): ``LigerKLDIVLoss(log_target=True)`` / ``LigerJSD`` on
  torch ``log_softmax`` outputs.

Modes (see :func:`benchmarks._harness.autograd_bench`): ``forward`` = loss only under ``no_grad``;
``backward`` = ``loss.backward()`` after an untimed forward; ``full`` = forward + backward (the headline).
Note minitron computes the gradient in the forward pass when the student requires grad, so its ``backward``
is a cheap in-place rescale and ``full`` is the fair comparison.

Shapes
------
CPU default: fp32 N=1024 x V=32000 and the headline N=1024 x V=128256 (fp32 and bf16, all modes, forward KL,
plus reverse KL and JSD in ``full`` mode) and N=256 x V=256000. ``--quick``: N=256 x V=32000 (fp32 all modes,
bf16, JSD) and N=64 x V=128256, torch.compile only in the fp32 ``full`` case (compilation dominates otherwise). ``--full`` (GPUs): V in {32000, 128256, 256000} x N in {512, 1024, 2048, 4096, 8192},
fp32 and bf16, all three modes.

Machine-limit fractions: ``bytes_moved`` counts the compulsory traffic of a fused implementation (read both
logit tensors, write the gradient when one is computed); ``exps`` the lower bound of 2 exponentials per
element (one softmax per input).
"""
from __future__ import annotations

import functools
import math
from typing import Any

from benchmarks._harness import BenchConfig, Bench, Case, Unavailable, autograd_bench, dtype_of, our_backends

BENCH = "kl_div"
HEADLINE = {"N": 1024, "V": 128256}
ELT = {"float32": 4, "bfloat16": 2, "float16": 2}


def eager_kl_div(student, teacher, kl_mode: str = "forward", temperature: float = 1.0, beta: float = 0.5):
    """The plain torch loss minitron's kl_div replaces (mean over tokens, times T**2)."""
    import torch
    import torch.nn.functional as F

    if temperature != 1.0:
        student = student / temperature
        teacher = teacher / temperature
    lq = F.log_softmax(student, dim=-1)
    lp = F.log_softmax(teacher, dim=-1)
    if kl_mode == "forward":  # KL(P || Q): input = log Q, target = log P
        loss = F.kl_div(lq, lp, reduction="batchmean", log_target=True)
    elif kl_mode == "reverse":  # KL(Q || P)
        loss = F.kl_div(lp, lq, reduction="batchmean", log_target=True)
    elif kl_mode == "jsd":  # beta * KL(P || M) + (1 - beta) * KL(Q || M), M = (1 - beta) P + beta Q
        lm = torch.logaddexp(lp + math.log(1.0 - beta), lq + math.log(beta))
        loss = beta * F.kl_div(lm, lp, reduction="batchmean", log_target=True) + \
            (1.0 - beta) * F.kl_div(lm, lq, reduction="batchmean", log_target=True)
    else:
        raise ValueError(f"unknown kl_mode {kl_mode!r}")
    return loss * (temperature * temperature)


def make_inputs(n: int, v: int, dtype: str, device: str, seed: int = 0):
    """Student logits (requires grad) and teacher logits, ``[n, v]``, logit scale ~2."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    s = (torch.randn(n, v, generator=g) * 2.0).to(device=device, dtype=dtype_of(dtype))
    t = (torch.randn(n, v, generator=g) * 2.0 + 0.5).to(device=device, dtype=dtype_of(dtype))
    s.requires_grad_(True)
    return s, t


def loss_fn(provider: str, kl_mode: str, temperature: float, beta: float):
    """``f(student, teacher) -> loss`` for ``provider``; raises Unavailable when it cannot run here."""
    import torch

    if provider.startswith("minitron-"):
        backend = provider[len("minitron-"):]
        from minitron.ops import kl_div

        return functools.partial(kl_div, mode=kl_mode, temperature=temperature, beta=beta, reduction="mean",
                                 backend=backend)
    eager = functools.partial(eager_kl_div, kl_mode=kl_mode, temperature=temperature, beta=beta)
    if provider == "torch-eager":
        return eager
    if provider == "torch-compile":
        return torch.compile(eager, dynamic=False)
    if provider == "liger":
        try:
            from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss
        except ImportError as exc:
            raise Unavailable(f"liger_kernel is not installed ({exc})") from exc
        if kl_mode == "jsd":
            if beta != 0.5:
                raise Unavailable("liger JSD is compared at beta=0.5 only (its beta convention differs)")
            jsd = LigerJSD(beta=beta)

            def liger_jsd(s, t):
                return jsd(torch.log_softmax(s.float() / temperature, -1),
                           torch.log_softmax(t.float() / temperature, -1)) * temperature ** 2

            return liger_jsd
        kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)

        def liger_kl(s, t):
            lq = torch.log_softmax(s / temperature, -1)
            lp = torch.log_softmax(t / temperature, -1)
            return (kl(lq, lp) if kl_mode == "forward" else kl(lp, lq)) * temperature ** 2

        return liger_kl
    raise Unavailable(f"unknown provider {provider!r}")


def _setup(case: Case, device: str) -> Bench:
    p = case.params
    if case.provider == "liger" and not device.startswith("cuda"):
        raise Unavailable("liger kernels run on CUDA only")
    f = loss_fn(case.provider, p["kl_mode"], p["T"], p.get("beta", 0.5))
    s, t = make_inputs(case.shape["N"], case.shape["V"], case.dtype, device)
    return autograd_bench(lambda: f(s, t), [s], case.mode)


def providers(device: str) -> list[str]:
    out = [f"minitron-{b}" for b in our_backends(device)] + ["torch-eager", "torch-compile"]
    if device.startswith("cuda"):
        out.append("liger")
    return out


def _case(provider: str, mode: str, n: int, v: int, dtype: str, kl_mode: str = "forward", temperature: float = 1.0,
          beta: float = 0.5, **kw: Any) -> Case:
    e = ELT[dtype]
    nv = n * v
    moved = {"forward": 2 * nv * e, "backward": 2 * nv * e, "full": 3 * nv * e}[mode]
    params = {"kl_mode": kl_mode, "T": temperature}
    if kl_mode == "jsd":
        params["beta"] = beta
    return Case(bench=BENCH, provider=provider, mode=mode, shape={"N": n, "V": v}, dtype=dtype, setup=_setup,
                params=params, reference="torch-eager", bytes_moved=moved, exps=2 * nv if mode != "backward" else None,
                size_label="tokens x vocab", info={"grad_bytes": nv * e}, **kw)


def cases(cfg: BenchConfig) -> list[Case]:
    dev = cfg.device
    provs = providers(dev)
    out: list[Case] = []

    def add(n: int, v: int, dtype: str, modes=("full",), kl_modes=("forward",), provs_=None, **kw: Any) -> None:
        for kl_mode in kl_modes:
            for mode in modes:
                for prov in provs_ or provs:
                    out.append(_case(prov, mode, n, v, dtype, kl_mode, **kw))

    if dev.startswith("cuda"):
        ns = [512, 1024, 2048, 4096, 8192] if cfg.full else ([1024] if cfg.quick else [1024, 4096])
        vs = [32000, 128256, 256000] if not cfg.quick else [32000, 128256]
        modes = ("forward", "backward", "full") if not cfg.quick else ("full",)
        for dtype in ("float32", "bfloat16"):
            for v in vs:
                for n in ns:
                    add(n, v, dtype, modes)
        if not cfg.quick:
            add(1024, 128256, "float32", ("full",), ("reverse", "jsd"))
        return out

    if cfg.quick:
        # torch.compile costs ~10-30 s of compilation per worker on this CPU: only in the one headline-like case
        no_compile = [p for p in provs if p != "torch-compile"]
        add(256, 32000, "float32", ("full",))
        # The forward (loss only, under no_grad) and backward (an in-place rescale) cases take 0.2-4 ms here,
        # and torch eager's time in them is dominated by page faults of its fresh temporaries (156 MiB in
        # forward): over six idle quick runs of the same code the forward ratio ranged 0.044-0.207 and the
        # backward one 0.019-0.055 (eager's fastest forward 32.7-89.4 ms, ours 2.9-4.0 ms). Their time ratios
        # only guard against a gross (5x) slowdown; the loss-only path is guarded by peak memory (0.2 MiB;
        # 31 MiB if it computed the gradient), checked at the normal tolerance.
        add(256, 32000, "float32", ("forward", "backward"), provs_=no_compile, tolerance=4.0)
        add(256, 32000, "bfloat16", ("full",), provs_=no_compile)
        add(64, 128256, "float32", ("full",), provs_=no_compile)
        add(256, 32000, "float32", ("full",), ("jsd",), provs_=no_compile)
        return out
    add(1024, 32000, "float32", ("full",))
    add(HEADLINE["N"], HEADLINE["V"], "float32", ("full", "forward", "backward"))
    add(HEADLINE["N"], HEADLINE["V"], "bfloat16", ("full", "forward", "backward"))
    add(HEADLINE["N"], HEADLINE["V"], "float32", ("full",), ("reverse", "jsd"))
    add(256, 256000, "float32", ("full",))
    return out
