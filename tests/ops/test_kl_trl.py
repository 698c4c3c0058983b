"""The KL op family against TRL: the generalised JSD convention (GKD's ``generalized_jsd_loss``), the logit
transforms (``_chunked_divergence_loss``), masks from labels, and the argument checks of those features."""
from __future__ import annotations

import os

import pytest
import torch

from minitron.ops import (BackendUnavailableError, FusedLinearKLDivLoss, KLDivLoss, fused_linear_kl_div,
                          fused_linear_kl_div_reference, kl_div, kl_div_reference)
from minitron.ops._dispatch import op_backends

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
distill = pytest.importorskip("trl.trainer.distillation_trainer")

BACKENDS = ["cpp", "triton", "reference"]
BETAS = [0.0, 0.1, 0.5, 0.9, 1.0]


def _available(backend: str) -> bool:
    try:
        op_backends("kl_div").select(backend, "cpu", torch.float32)
        return True
    except BackendUnavailableError:
        return False


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    if not _available(request.param):
        pytest.skip(f"backend {request.param} unavailable")
    return request.param


def _trl_jsd(s: torch.Tensor, t: torch.Tensor, beta: float, temperature: float, labels=None) -> torch.Tensor:
    return gkd.GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta, temperature=temperature,
                                               reduction="batchmean")


# ------------------------------------------------------------------------------------------------
# 1. generalised JSD convention == TRL GKD
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_matches_trl_generalized_jsd_loss(backend, beta, temperature):
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 5, 97, generator=g, dtype=torch.float64) * 2
    t = torch.randn(2, 5, 97, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, 97, (2, 5), generator=g)
    labels[0, :2] = -100
    s_trl = s.clone().requires_grad_(True)
    ref = _trl_jsd(s_trl, t, beta, temperature, labels=labels)  # fp64: sum over counted tokens / their count
    ref.backward()
    a = s.float().requires_grad_(True)
    ours = kl_div(a, t.float(), mode="jsd", beta=beta, temperature=temperature, labels=labels, scale_by_t2=False,
                  backend=backend)
    ours.backward()
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(a.grad.double(), s_trl.grad, rtol=1e-4, atol=1e-7)
    # our fp64 reference agrees too
    torch.testing.assert_close(kl_div_reference(s, t, mode="jsd", beta=beta, temperature=temperature,
                                                labels=labels, scale_by_t2=False), ref.detach(), rtol=1e-12,
                               atol=1e-14)


def test_jsd_ends_are_forward_and_reverse_kl(backend):
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(4, 50, generator=g), torch.randn(4, 50, generator=g)
    for beta, mode in ((0.0, "forward"), (1.0, "reverse"), (1e-60, "forward"), (1.0 - 1e-10, "reverse")):
        torch.testing.assert_close(kl_div(s, t, mode="jsd", beta=beta, backend=backend),
                                   kl_div(s, t, mode=mode, backend=backend), rtol=0, atol=0)


def test_fused_linear_jsd_matches_trl(backend):
    g = torch.Generator().manual_seed(5)
    sh, th = torch.randn(9, 16, generator=g), torch.randn(9, 24, generator=g)
    sw, tw = torch.randn(70, 16, generator=g) * 0.4, torch.randn(70, 24, generator=g) * 0.4
    for beta in BETAS:
        ref = _trl_jsd((sh.double() @ sw.double().t()).unsqueeze(0), (th.double() @ tw.double().t()).unsqueeze(0),
                       beta, 1.5, labels=torch.zeros(1, 9, dtype=torch.long))  # batchmean: per counted token
        ours = fused_linear_kl_div(sh, sw, th, tw, mode="jsd", beta=beta, temperature=1.5, scale_by_t2=False,
                                   chunk_size=4, backend=backend)
        torch.testing.assert_close(ours.double(), ref, rtol=2e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# 2. logit transforms == TRL _chunked_divergence_loss (value and student gradients)
# ------------------------------------------------------------------------------------------------
TRANSFORMS = [
    dict(student_logit_scale=0.5, teacher_logit_scale=1.0),
    dict(student_logit_scale=1.0, teacher_logit_scale=2.0),
    dict(student_softcap=3.0),
    dict(teacher_softcap=2.5),
    dict(student_logit_scale=1.7, teacher_logit_scale=0.6, student_softcap=4.0, teacher_softcap=2.0),
    dict(student_logit_scale=-0.8, student_softcap=5.0),
]


def _trl_chunked(sh, th, sw, tw, mask, beta, temperature, sb=None, tb=None, **tf):
    loss, _, _ = distill._chunked_divergence_loss(
        sh, th, sw, tw, mask, beta, None, sb, tb,
        student_logit_scale=tf.get("student_logit_scale", 1.0), teacher_logit_scale=tf.get("teacher_logit_scale", 1.0),
        student_final_logit_softcapping=tf.get("student_softcap"),
        teacher_final_logit_softcapping=tf.get("teacher_softcap"), temperature=temperature)
    return loss


@pytest.mark.parametrize("tf", TRANSFORMS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_fused_linear_transforms_match_trl_chunked_divergence(backend, tf, beta):
    g = torch.Generator().manual_seed(6)
    b, k, hs, ht, v = 2, 6, 16, 20, 90
    sh = (torch.randn(b, k, hs, generator=g)).requires_grad_(True)
    th = torch.randn(b, k, ht, generator=g)
    sw = (torch.randn(v, hs, generator=g) * 0.5).requires_grad_(True)
    tw = torch.randn(v, ht, generator=g) * 0.5
    sb = (torch.randn(v, generator=g) * 0.1).requires_grad_(True)
    tb = torch.randn(v, generator=g) * 0.1
    mask = torch.ones(b, k, dtype=torch.long)
    mask[1, 4:] = 0
    temperature = 1.3
    ref = _trl_chunked(sh, th, sw, tw, mask, beta, temperature, sb, tb, **tf)
    ref_grads = torch.autograd.grad(ref, (sh, sw, sb))
    ours = fused_linear_kl_div(sh, sw, th, tw, student_bias=sb, teacher_bias=tb, mode="jsd", beta=beta,
                               temperature=temperature, mask=mask.bool(), scale_by_t2=False, chunk_size=5,
                               backend=backend, **tf)
    our_grads = torch.autograd.grad(ours, (sh, sw, sb))
    torch.testing.assert_close(ours, ref.float(), rtol=1e-4, atol=1e-6)
    for name, got, want in zip(("hidden", "weight", "bias"), our_grads, ref_grads):
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=2e-4, atol=1e-5 * scale, msg=lambda m: f"{name}: {m}")
    # the unfused reference (autograd through the transforms in fp64) agrees
    ref64 = fused_linear_kl_div_reference(sh.double(), sw.double(), th.double(), tw.double(), student_bias=sb.double(),
                                          teacher_bias=tb.double(), mode="jsd", beta=beta, temperature=temperature,
                                          mask=mask.bool(), scale_by_t2=False, **tf)
    torch.testing.assert_close(ours.double(), ref64, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("tf", TRANSFORMS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
@pytest.mark.parametrize("mode", ["forward", "reverse", "jsd"])
def test_kl_div_transforms_match_fp64_reference(backend, tf, mode):
    g = torch.Generator().manual_seed(7)
    s, t = torch.randn(3, 4, 61, generator=g) * 4, torch.randn(3, 4, 61, generator=g) * 4
    for dtype in (torch.float32, torch.bfloat16):
        a = s.to(dtype).clone().requires_grad_(True)
        loss = kl_div(a, t.to(dtype), mode=mode, beta=0.3, temperature=0.7, backend=backend, **tf)
        loss.backward()
        r = a.detach().double().requires_grad_(True)
        ref = kl_div_reference(r, t.to(dtype).double(), mode=mode, beta=0.3, temperature=0.7, **tf)
        ref.backward()
        tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)
        torch.testing.assert_close(loss.double(), ref.detach(), **tol)
        assert a.grad.dtype == dtype
        torch.testing.assert_close(a.grad.double(), r.grad, rtol=tol["rtol"],
                                   atol=tol["atol"] * max(1.0, r.grad.abs().max().item()))


def test_transforms_change_the_loss_and_identity_is_free(backend):
    g = torch.Generator().manual_seed(8)
    s, t = torch.randn(5, 40, generator=g) * 6, torch.randn(5, 40, generator=g) * 6
    plain = kl_div(s, t, backend=backend)
    assert torch.equal(kl_div(s, t, student_logit_scale=1.0, teacher_logit_scale=1.0, backend=backend), plain)
    assert not torch.allclose(kl_div(s, t, student_softcap=2.0, backend=backend), plain)
    # scaling both by c is a temperature of 1/c (the T**2 factor aside)
    torch.testing.assert_close(kl_div(s, t, student_logit_scale=0.5, teacher_logit_scale=0.5, scale_by_t2=False,
                                      backend=backend),
                               kl_div(s, t, temperature=2.0, scale_by_t2=False, backend=backend), rtol=1e-5,
                               atol=1e-7)


def test_modules_take_transforms_and_labels(backend):
    g = torch.Generator().manual_seed(9)
    s, t = torch.randn(2, 3, 30, generator=g), torch.randn(2, 3, 30, generator=g)
    labels = torch.tensor([[1, -100, 2], [3, 4, -100]])
    mod = KLDivLoss(mode="jsd", beta=0.2, student_softcap=3.0, teacher_logit_scale=1.5, backend=backend)
    torch.testing.assert_close(mod(s, t, labels=labels),
                               kl_div_reference(s, t, mode="jsd", beta=0.2, student_softcap=3.0,
                                                teacher_logit_scale=1.5, mask=labels != -100), rtol=1e-5, atol=1e-7)
    sh, th = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    sw, tw = torch.randn(30, 8, generator=g), torch.randn(30, 8, generator=g)
    fmod = FusedLinearKLDivLoss(mode="reverse", teacher_softcap=2.0, ignore_index=4, backend=backend)
    torch.testing.assert_close(fmod(sh, sw, th, tw, labels=labels),
                               fused_linear_kl_div_reference(sh, sw, th, tw, mode="reverse", teacher_softcap=2.0,
                                                             mask=labels != 4), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# 3. masks from labels
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_labels_equal_mask(backend, reduction):
    g = torch.Generator().manual_seed(10)
    s, t = torch.randn(3, 4, 25, generator=g), torch.randn(3, 4, 25, generator=g)
    labels = torch.randint(0, 25, (3, 4), generator=g)
    labels[0, 1] = labels[2, 3] = -100
    labels[1, 0] = 7
    for ignore_index in (-100, 7):
        mask = labels != ignore_index
        a, b = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
        la = kl_div(a, t, labels=labels, ignore_index=ignore_index, reduction=reduction, backend=backend)
        lb = kl_div(b, t, mask=mask, reduction=reduction, backend=backend)
        assert torch.equal(la, lb)
        la.sum().backward()
        lb.sum().backward()
        assert torch.equal(a.grad, b.grad)
    sh, th = torch.randn(3, 4, 6, generator=g), torch.randn(3, 4, 6, generator=g)
    sw, tw = torch.randn(25, 6, generator=g), torch.randn(25, 6, generator=g)
    assert torch.equal(fused_linear_kl_div(sh, sw, th, tw, labels=labels, reduction=reduction, backend=backend),
                       fused_linear_kl_div(sh, sw, th, tw, mask=labels != -100, reduction=reduction,
                                           backend=backend))


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(labels=torch.zeros(2, 3, dtype=torch.long), mask=torch.ones(2, 3, dtype=torch.bool)), ValueError,
     ("mask", "labels")),
    (dict(labels=torch.zeros(2, 4, dtype=torch.long)), ValueError, ("labels",)),
    (dict(labels=torch.zeros(2, 3)), TypeError, ("labels",)),
    (dict(labels=torch.zeros(2, 3, dtype=torch.bool)), TypeError, ("labels",)),
    (dict(labels=[1, 2]), TypeError, ("labels",)),
    (dict(labels=torch.zeros(2, 3, dtype=torch.long), ignore_index=1.5), TypeError, ("ignore_index",)),
    (dict(student_logit_scale=0.0), ValueError, ("student_logit_scale",)),
    (dict(teacher_logit_scale=float("inf")), ValueError, ("teacher_logit_scale",)),
    (dict(teacher_logit_scale=float("nan")), ValueError, ("teacher_logit_scale",)),
    (dict(student_logit_scale="2"), TypeError, ("student_logit_scale",)),
    (dict(student_softcap=0.0), ValueError, ("student_softcap",)),
    (dict(teacher_softcap=-1.0), ValueError, ("teacher_softcap",)),
    (dict(teacher_softcap=float("inf")), ValueError, ("teacher_softcap",)),
    (dict(student_softcap=True), TypeError, ("student_softcap",)),
])
def test_bad_transform_and_label_arguments(kwargs, exc, words):
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    sh, sw = torch.randn(2, 3, 4), torch.randn(5, 4)
    for call in (lambda: kl_div(s, t, **kwargs), lambda: kl_div_reference(s, t, **kwargs),
                 lambda: fused_linear_kl_div(sh, sw, sh, sw, **kwargs)):
        with pytest.raises(exc) as info:
            call()
        for w in words:
            assert w in str(info.value), (w, str(info.value))


# ------------------------------------------------------------------------------------------------
# custom-op rules with the new arguments: opcheck and torch.compile(fullgraph=True)
# ------------------------------------------------------------------------------------------------
def test_fused_linear_opcheck_with_transforms():
    g = torch.Generator().manual_seed(11)
    sh, th = torch.randn(6, 8, generator=g), torch.randn(6, 12, generator=g)
    sw, tw = torch.randn(33, 8, generator=g), torch.randn(33, 12, generator=g)
    weight = torch.full((6,), 1 / 6)
    for backend in [b for b in ("cpp", "reference") if _available(b)]:
        torch.library.opcheck(torch.ops.minitron.fused_linear_kl_div_fwd.default,
                              (sh.clone().requires_grad_(True), sw.clone().requires_grad_(True), th, tw, None, None,
                               weight, 2, 1.3, 0.3, 1.0, 4, backend, True, 0.7, 1.2, 3.0, None),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_torch_compile_fullgraph_with_transforms_and_labels(backend):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(12)
    s, t = torch.randn(3, 5, 29, generator=g) * 3, torch.randn(3, 5, 29, generator=g) * 3
    labels = torch.randint(0, 29, (3, 5), generator=g)
    labels[1, 2:] = -100
    kw = dict(mode="jsd", beta=0.3, temperature=1.5, student_logit_scale=0.8, teacher_softcap=4.0,
              student_softcap=5.0)

    cf = torch.compile(lambda a, b, lab: kl_div(a, b, labels=lab, backend=backend, **kw), fullgraph=True,
                       backend="aot_eager")
    a = s.clone().requires_grad_(True)
    out = cf(a, t, labels)
    out.backward()
    r = s.clone().requires_grad_(True)
    ref = kl_div_reference(r, t, labels=labels, **kw)
    ref.backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a.grad, r.grad, rtol=1e-4, atol=1e-6)

    torch._dynamo.reset()
    sh, th = torch.randn(3, 5, 8, generator=g), torch.randn(3, 5, 12, generator=g)
    sw, tw = torch.randn(29, 8, generator=g), torch.randn(29, 12, generator=g)
    cfl = torch.compile(lambda h, w: fused_linear_kl_div(h, w, th, tw, labels=labels, chunk_size=4, backend=backend,
                                                         **kw), fullgraph=True, backend="aot_eager")
    h = sh.clone().requires_grad_(True)
    out = cfl(h, sw)
    out.backward()
    h2 = sh.clone().requires_grad_(True)
    ref = fused_linear_kl_div_reference(h2, sw, th, tw, labels=labels, **kw)
    ref.backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-4, atol=1e-6)
