"""The KL op family's conventions, transforms, labels, edges and fp32 accuracy on CUDA tensors, through the CUDA
C++ and the compiled Triton backends (the CPU tests cover the same on the C++ / interpreted Triton paths).

Skipped on machines without a GPU.
"""
from __future__ import annotations

import os

import pytest
import torch

from minitron.ops import fused_linear_kl_div, fused_linear_kl_div_reference, kl_div, kl_div_reference
from minitron.ops._dispatch import op_backends

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
DEV = "cuda"
NINF = float("-inf")


@pytest.fixture(params=["cuda", "triton"])
def backend(request) -> str:
    try:
        op_backends("kl_div").select(request.param, DEV, torch.float32)
    except Exception as exc:  # noqa: BLE001 - report why the backend is missing
        pytest.fail(f"backend {request.param!r} must be available on a GPU runner: {exc}")
    return request.param


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(seed)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("shape", [(2, 7, 1000), (3, 130_000)], ids=["fused-rows", "split-rows"])
def test_jsd_matches_trl(backend, beta, shape):
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    g = _gen(1)
    s = torch.randn(*shape, device=DEV, generator=g, dtype=torch.float64) * 2
    t = torch.randn(*shape, device=DEV, generator=g, dtype=torch.float64) * 2
    labels = torch.zeros(shape[:-1], dtype=torch.long, device=DEV)
    r = s.clone().requires_grad_(True)
    ref = gkd.GKDTrainer.generalized_jsd_loss(r, t, labels=labels, beta=beta, temperature=1.5)
    ref.backward()
    a = s.float().requires_grad_(True)
    out = kl_div(a, t.float(), mode="jsd", beta=beta, temperature=1.5, labels=labels, scale_by_t2=False,
                 backend=backend)
    out.backward()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(a.grad.double(), r.grad, rtol=1e-4, atol=1e-5 * float(r.grad.abs().max()))


@pytest.mark.parametrize("beta,same_as", [(0.0, "forward"), (1.0, "reverse"), (1e-50, "forward"),
                                          (1.0 - 1e-12, "reverse")])
def test_jsd_ends(backend, beta, same_as):
    g = _gen(2)
    s, t = torch.randn(4, 5000, device=DEV, generator=g), torch.randn(4, 5000, device=DEV, generator=g)
    torch.testing.assert_close(kl_div(s, t, mode="jsd", beta=beta, backend=backend),
                               kl_div(s, t, mode=same_as, backend=backend), rtol=0, atol=0)


@pytest.mark.parametrize("tf", [dict(student_softcap=3.0, teacher_softcap=2.0),
                                dict(student_logit_scale=0.7, teacher_logit_scale=1.3, teacher_softcap=5.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_transforms(backend, tf, dtype):
    g = _gen(3)
    sh, th = torch.randn(37, 64, device=DEV, generator=g), torch.randn(37, 96, device=DEV, generator=g)
    sw, tw = torch.randn(3000, 64, device=DEV, generator=g) * 0.3, torch.randn(3000, 96, device=DEV, generator=g) * 0.3
    h = sh.to(dtype).requires_grad_(True)
    w = sw.to(dtype).requires_grad_(True)
    out = fused_linear_kl_div(h, w, th.to(dtype), tw.to(dtype), mode="jsd", beta=0.3, temperature=1.2,
                              chunk_size=16, backend=backend, **tf)
    out.backward()
    h64 = h.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    ref = fused_linear_kl_div_reference(h64, w64, th.to(dtype).double(), tw.to(dtype).double(), mode="jsd", beta=0.3,
                                        temperature=1.2, **tf)
    ref.backward()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), ref.detach(), rtol=tol, atol=1e-6)
    for got, want in ((h.grad, h64.grad), (w.grad, w64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * float(want.abs().max()))


@pytest.mark.parametrize("mode,beta", [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.5)])
@pytest.mark.parametrize("n,v", [(6, 3000), (2, 200_000)], ids=["fused-rows", "split-rows"])
def test_all_neg_inf_rows(backend, mode, beta, n, v):
    g = _gen(4)
    s, t = torch.randn(n, v, device=DEV, generator=g), torch.randn(n, v, device=DEV, generator=g)
    t[0] = NINF  # no target: 0, zero gradient
    a = s.clone().requires_grad_(True)
    loss = kl_div(a, t, mode=mode, beta=beta, reduction="none", backend=backend)
    loss.sum().backward()
    ref = kl_div_reference(s.double(), t.double(), mode=mode, beta=beta, reduction="none")
    assert loss[0].item() == 0.0 and (a.grad[0] == 0).all()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-6)
    s2 = s.clone()
    s2[1] = NINF  # no student distribution: NaN
    assert torch.isnan(kl_div(s2, t, mode=mode, beta=beta, reduction="none", backend=backend)[1])


@pytest.mark.parametrize("mode,beta", [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.1), ("jsd", 0.5),
                                       ("jsd", 0.9)])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 100.0])
def test_fp32_error_within_2x_torch(backend, mode, beta, temperature):
    pytest.importorskip("trl")
    from tests.ops.test_kl_accuracy import _assert_ok, _report, measure

    g = torch.Generator().manual_seed(5)
    s = (torch.randn(64, 32000, generator=g) * 3).to(DEV)
    t = (torch.randn(64, 32000, generator=g) * 3).to(DEV) + 0.5 * s
    mask = torch.rand(64, generator=g).to(DEV) < 0.7
    errs = []
    for reduction in ("mean", "sum", "none"):
        for m in (None, mask):
            errs += measure(s, t, mode=mode, beta=beta, temperature=temperature, reduction=reduction, mask=m,
                            backends=[backend], case=f"{mode}{beta} T={temperature} {reduction}")
    _report(errs)
    _assert_ok(errs)


def test_summed_forward_kl_over_16k_rows(backend):
    from tests.ops.test_kl_accuracy import _assert_ok, _report, measure

    g = torch.Generator().manual_seed(6)
    s = (torch.randn(16384, 2048, generator=g) * 3).to(DEV)
    t = (torch.randn(16384, 2048, generator=g) * 3).to(DEV) + 0.5 * s
    errs = measure(s, t, mode="forward", beta=0.5, temperature=1.0, reduction="sum", mask=None, backends=[backend],
                   case="forward sum 16384x2048")
    _report(errs)
    _assert_ok(errs)
