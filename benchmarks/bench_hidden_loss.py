"""Benchmark of ``minitron.ops.hidden_loss.hidden_state_loss`` (fused cosine / MSE hidden-state distillation loss).

Run through the shared harness: ``python -m benchmarks --only hidden_loss [--quick]`` (or this file directly,
which forwards its arguments to the harness with ``--only hidden_loss``).

Target (issue 23): ``>= 3x`` the plain-torch expression on CPU at ``[8, 2048, 4096]``, forward + backward, and no
``[tokens, hidden]`` temporaries beyond the gradient.

Providers
---------
* ``minitron-<backend>``: ``hidden_state_loss(s, t, mask, loss=..., backend=<backend>)`` (``cpp`` on CPU;
  ``cuda`` and ``triton`` on CUDA): one pass per token computes the loss and the student gradient; backward
  only rescales it (a no-op for the mean).
* ``torch-eager``: :func:`eager_hidden_loss`, the plain torch expression such a loss is usually written as
  (``1 - F.cosine_similarity`` / ``F.mse_loss(reduction="none").mean(-1)``, masked mean over the tokens),
  backward by autograd.
* ``torch-compile``: ``torch.compile`` of exactly that function (default mode).

Peak memory: the harness measures the RSS growth of one timed call (CUDA: allocator peak). A fused provider's
floor is the student gradient itself, ``tokens x hidden x element size`` (256 MiB at the fp32 headline); the
records carry ``grad_mib`` (that floor) so ``peak_mib - grad_mib`` is what the call allocated beyond the
gradient (for ours: O(tokens) only).

Shapes
------
CPU default (the headline): fp32 ``[8, 2048, 4096]``, both losses, ``full`` mode (forward + backward) with a
ragged padding mask; also bf16 cosine and the ``forward`` (loss only, under ``no_grad``) mode of the fp32
cosine (``--skip-heavy``: ``[2, 2048, 4096]`` instead). ``--quick``: ``[2, 256, 1024]`` fp32, both losses,
``full`` (torch.compile only for the cosine).
``bytes_moved`` is the compulsory traffic of a fused implementation: read both inputs (the counted rows) and,
when a gradient is computed, write it.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Optional

if __name__ == "__main__" and not __package__:  # run as a file: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._harness import BenchConfig, Bench, Case, Unavailable, autograd_bench, dtype_of, our_backends
from benchmarks._harness import require_free_memory

BENCH = "hidden_loss"
HEADLINE = (8, 2048, 4096)
ELT = {"float32": 4, "bfloat16": 2, "float16": 2}


def eager_hidden_loss(s, t, mask: Optional[Any], loss: str):
    """The plain torch expression: per-token ``1 - cos`` (or mean squared error over the hidden axis), masked mean
    over the tokens."""
    import torch.nn.functional as F

    if loss == "cosine":
        per = 1.0 - F.cosine_similarity(s, t, dim=-1)
    else:
        per = F.mse_loss(s, t, reduction="none").mean(-1)
    if mask is None:
        return per.float().mean()
    w = mask.to(per.dtype)
    return (per * w).float().sum() / w.float().sum().clamp(min=1)


def _inputs(shape: dict, dtype: str, with_mask: bool, device: str):
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    b, s, d = shape["B"], shape["S"], shape["D"]
    t = torch.randn(b, s, d, generator=g)
    st = (t + 0.5 * torch.randn(b, s, d, generator=g)).to(device=device, dtype=dtype_of(dtype))
    t = t.to(device=device, dtype=dtype_of(dtype))
    st.requires_grad_(True)
    mask = None
    if with_mask:
        lengths = torch.randint(s // 2, s + 1, (b,), generator=g)
        mask = (torch.arange(s).unsqueeze(0) < lengths.unsqueeze(1)).to(device)
    return st, t, mask


def _setup(case: Case, device: str) -> Bench:
    import torch

    p = case.params
    b, s, d = case.shape["B"], case.shape["S"], case.shape["D"]
    elt = ELT[case.dtype]
    # inputs + gradient, and eager's temporaries (a few fp32 [tokens, D] tensors)
    require_free_memory(b * s * d * (3 * elt + (16 if case.provider != "minitron-cpp" else 0)), "this case")
    st, t, mask = _inputs(case.shape, case.dtype, p["mask"], device)
    rows = b * s if mask is None else int(mask.sum())
    moved = float(2 * rows * d * elt + (b * s * d * elt if case.mode != "forward" else 0))
    if case.provider.startswith("minitron-"):
        from minitron.ops.hidden_loss import hidden_state_loss

        backend = case.provider[len("minitron-"):]
        hidden_state_loss(st[:1, :1].detach(), t[:1, :1], loss=p["loss"], backend=backend)  # backend check

        def fwd():
            return hidden_state_loss(st, t, mask, loss=p["loss"], backend=backend)
    elif case.provider in ("torch-eager", "torch-compile"):
        fn = eager_hidden_loss
        if case.provider == "torch-compile":
            fn = torch.compile(eager_hidden_loss, dynamic=False)

        def fwd():
            return fn(st, t, mask, p["loss"])
    else:
        raise Unavailable(f"unknown provider {case.provider!r}")
    bench = autograd_bench(fwd, [st], case.mode)
    bench.keep = [st, t, mask]
    bench.bytes_moved = moved
    return bench


def providers(device: str) -> list[str]:
    return [f"minitron-{b}" for b in our_backends(device)] + ["torch-eager", "torch-compile"]


def _case(provider: str, mode: str, shape: tuple, dtype: str, loss: str, mask: bool, **kw: Any) -> Case:
    b, s, d = shape
    e = ELT[dtype]
    moved = 2 * b * s * d * e + (b * s * d * e if mode != "forward" else 0)
    return Case(bench=BENCH, provider=provider, mode=mode, shape={"B": b, "S": s, "D": d}, dtype=dtype,
                setup=_setup, params={"loss": loss, "mask": mask, "grad_mib": round(b * s * d * e / 2 ** 20, 1)},
                reference="torch-eager", bytes_moved=moved, size=b * s * d, size_label="batch x seq x hidden", **kw)


def cases(cfg: BenchConfig) -> list[Case]:
    provs = providers(cfg.device)
    out: list[Case] = []
    if cfg.quick:
        for loss in ("cosine", "mse"):
            for prov in provs:
                if prov == "torch-compile" and loss != "cosine":
                    continue  # compilation dominates a quick run
                out.append(_case(prov, "full", (2, 256, 1024), "float32", loss, True, warmup=1))
        return out
    if cfg.device.startswith("cuda"):
        shapes = [HEADLINE, (16, 4096, 8192)]
    else:  # --skip-heavy: a quarter of the headline (eager's cosine takes seconds per call at the headline)
        shapes = [HEADLINE] if cfg.heavy else [(2, 2048, 4096)]
    for shape in shapes:
        for loss in ("cosine", "mse"):
            for prov in provs:
                # eager cosine fwd+bwd takes seconds per call on a CPU: fewer samples, no regression noise
                out.append(_case(prov, "full", shape, "float32", loss, True, warmup=1, tolerance=0.3))
        for prov in provs:
            out.append(_case(prov, "full", shape, "bfloat16", "cosine", True, warmup=1, tolerance=0.3))
            out.append(_case(prov, "forward", shape, "float32", "cosine", True, warmup=1, tolerance=0.3))
    return out


if __name__ == "__main__":
    from benchmarks._harness import main

    sys.exit(main(["--only", "hidden_loss"] + sys.argv[1:]))
