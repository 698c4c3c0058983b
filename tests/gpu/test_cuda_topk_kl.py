"""Sparse (top-k teacher) KL ops on CUDA tensors, through the CUDA C++ and the compiled Triton backends.

Skipped on machines without a GPU; compares against the plain-torch references computed in fp64.
"""
from __future__ import annotations

import pytest
import torch

from minitron.ops import fused_linear_topk_kl_div, fused_linear_topk_kl_div_reference, topk_kl_div, topk_kl_div_reference
from minitron.ops._dispatch import op_backends

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEV = "cuda"
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (5e-3, 5e-3)}


@pytest.fixture(params=["cuda", "triton"])
def backend(request) -> str:
    try:
        op_backends("topk_kl_div").select(request.param, DEV, torch.float32)
    except Exception as exc:  # noqa: BLE001 - report why the backend is missing
        pytest.fail(f"backend {request.param!r} of topk_kl_div must be available on a GPU runner: {exc}")
    return request.param


def _teacher(n, v, k, g):
    t = torch.randn(n, v, generator=g, device=DEV) * 3
    lp, idx = torch.log_softmax(t, -1).topk(k, -1)
    return idx.flip(-1).contiguous(), lp.flip(-1).contiguous()  # not sorted


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("k", [1, 64])
@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("v", [1000, 128256])
def test_topk_kl_div(backend, dtype, k, tail, v):
    g = torch.Generator(device=DEV).manual_seed(k + v)
    n = 7
    s = (torch.randn(n, v, generator=g, device=DEV) * 2).to(dtype)
    idx, lp = _teacher(n, v, k, g)
    mask = torch.ones(n, dtype=torch.bool, device=DEV)
    mask[3] = False
    a = s.clone().requires_grad_(True)
    out = topk_kl_div(a, idx, lp, mask=mask, tail=tail, temperature=1.5, reduction="sum", backend=backend)
    out.backward()
    b = s.double().requires_grad_(True)
    ref = topk_kl_div_reference(b, idx, lp.double(), mask=mask, tail=tail, temperature=1.5, reduction="sum")
    ref.backward()
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(a.grad.double(), b.grad, rtol=rtol, atol=atol * float(b.grad.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_linear_topk_kl_div(backend, dtype):
    g = torch.Generator(device=DEV).manual_seed(1)
    n, h, v, k = 300, 64, 5003, 16
    hid = torch.randn(n, h, generator=g, device=DEV).to(dtype)
    w = (torch.randn(v, h, generator=g, device=DEV) / 8).to(dtype)
    idx, lp = _teacher(n, v, k, g)
    labels = torch.randint(0, v, (n,), generator=g, device=DEV)
    labels[::5] = -100
    a, wa = hid.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = fused_linear_topk_kl_div(a, wa, idx, lp, labels=labels, ce_weight=0.5, temperature=2.0, chunk_size=64,
                                   backend=backend)
    out.backward()
    b, wb = hid.double().requires_grad_(True), w.double().requires_grad_(True)
    ref = fused_linear_topk_kl_div_reference(b, wb, idx, lp.double(), labels=labels, ce_weight=0.5, temperature=2.0)
    ref.backward()
    rtol, atol = (2e-4, 2e-5) if dtype == torch.float32 else (5e-2, 2e-2)
    torch.testing.assert_close(out.double(), ref.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(a.grad.double(), b.grad, rtol=rtol, atol=atol * float(b.grad.abs().max()))
    torch.testing.assert_close(wa.grad.double(), wb.grad, rtol=rtol, atol=atol * float(wb.grad.abs().max()))
