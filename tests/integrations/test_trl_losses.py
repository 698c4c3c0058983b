"""minitron.integrations.trl against TRL's own loss functions: value and student gradient, on a grid.

* ``generalized_jsd_loss`` vs ``trl.experimental.gkd.GKDTrainer.generalized_jsd_loss``: beta in
  {0, 0.1, 0.5, 0.9, 1} x T in {0.5, 1, 2} x {no labels, labels with -100} x every reduction x V in {1000, 32003}.
* ``chunked_divergence_loss`` vs ``trl.trainer.distillation_trainer._chunked_divergence_loss``: biases, a wider
  teacher, num_items_in_batch, the entropy sum, and logit-scaled / soft-capped heads.
"""
from __future__ import annotations

import inspect

import pytest
import torch

from tests.integrations.conftest import require_new_jsd, require_transforms

trl = pytest.importorskip("trl")
from trl.experimental.gkd import GKDTrainer  # noqa: E402
from trl.trainer import distillation_trainer  # noqa: E402

from minitron.integrations import trl as mtrl  # noqa: E402

BETAS = (0.0, 0.1, 0.5, 0.9, 1.0)
TEMPERATURES = (0.5, 1.0, 2.0)
VOCABS = (1000, 32003)


def _logits(b: int, s: int, v: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    student = 2.0 * torch.randn(b, s, v, generator=g)
    teacher = 0.7 * student + 2.0 * torch.randn(b, s, v, generator=g)  # correlated, like a real student/teacher
    labels = torch.randint(0, v, (b, s), generator=g)
    labels[0, :2] = -100
    labels[-1, -1] = -100
    return student, teacher, labels


def _value_and_grad(fn, student: torch.Tensor, upstream_seed: int, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """Value and the student gradient of ``sum(w * out)`` for a random upstream ``w`` (not uniform for "none")."""
    x = student.clone().requires_grad_(True)
    out = fn(x, **kw)
    if fn is _trl_jsd and kw.get("reduction") == "none" and kw.get("num_items_in_batch") is None:
        out = out.sum(-1)  # TRL's "none" keeps the vocabulary axis; ours is its sum over the vocabulary
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(upstream_seed))
    (out * w).sum().backward()
    return out.detach(), x.grad


def _trl_jsd(x, **kw):
    return GKDTrainer.generalized_jsd_loss(x, **kw)


def _ours_jsd(x, **kw):
    return mtrl.generalized_jsd_loss(x, **kw)


def _close(ours: torch.Tensor, ref: torch.Tensor, what: str, rtol: float = 2e-5) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != TRL's {tuple(ref.shape)}"
    scale = ref.abs().max().item() if ref.numel() else 0.0
    torch.testing.assert_close(ours.double(), ref.double(), rtol=rtol, atol=rtol * scale + 1e-9,
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("beta", BETAS)
def test_generalized_jsd_loss_matches_trl(beta: float, temperature: float, vocab: int) -> None:
    require_new_jsd(beta)
    student, teacher, labels = _logits(2, 3, vocab, seed=vocab + int(10 * beta) + int(4 * temperature))
    for with_labels in (False, True):
        for reduction in mtrl.TRL_REDUCTIONS:
            kw = dict(teacher_logits=teacher, labels=labels if with_labels else None, beta=beta,
                      temperature=temperature, reduction=reduction)
            what = f"beta={beta} T={temperature} V={vocab} labels={with_labels} reduction={reduction}"
            # TRL's function run in fp64 is the oracle; its fp32 run is itself off by ~1e-4 of the largest
            # gradient entry on peaked (T = 0.5) rows, so ours (fp32) is held to fp64 TRL tightly, to fp32 TRL loosely.
            ref, ref_grad = _value_and_grad(_trl_jsd, student.double(), 1, **dict(kw, teacher_logits=teacher.double()))
            ours, our_grad = _value_and_grad(_ours_jsd, student, 1, **kw)
            assert torch.isfinite(ref).all() and ref.abs().sum() > 0, what  # a meaningful comparison
            _close(ours, ref, what + " (value)")
            _close(our_grad, ref_grad, what + " (student gradient)")
            if vocab <= 1000:  # TRL's fp32 run too (slow at V = 32003: ~0.5 s a call on this CPU)
                ref32, ref32_grad = _value_and_grad(_trl_jsd, student, 1, **kw)
                _close(ours, ref32, what + " (value vs TRL fp32)", rtol=1e-4)
                _close(our_grad, ref32_grad, what + " (student gradient vs TRL fp32)", rtol=1e-3)


@pytest.mark.parametrize("num_items", [7, torch.tensor(7)])
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "none"])
def test_num_items_in_batch_overrides_reduction(reduction: str, num_items) -> None:
    student, teacher, labels = _logits(2, 4, 257, seed=3)
    kw = dict(teacher_logits=teacher, labels=labels, beta=0.5, reduction=reduction, num_items_in_batch=num_items)
    ref, ref_grad = _value_and_grad(_trl_jsd, student, 2, **kw)
    ours, our_grad = _value_and_grad(_ours_jsd, student, 2, **kw)
    _close(ours, ref, "value")
    _close(our_grad, ref_grad, "gradient")


def test_fully_masked_batch_matches_trl() -> None:
    student, teacher, labels = _logits(2, 3, 100, seed=5)
    labels[:] = -100
    for reduction in ("batchmean", "sum"):  # 0 with a zero gradient (TRL clamps the batchmean count to 1)
        ours, grad = _value_and_grad(_ours_jsd, student, 0, teacher_logits=teacher, labels=labels, reduction=reduction)
        assert ours.item() == 0.0 and grad.abs().max().item() == 0.0
    ref = GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, reduction="mean")
    ours = mtrl.generalized_jsd_loss(student, teacher, labels=labels, reduction="mean")
    assert torch.isnan(ref) and torch.isnan(ours)  # TRL's empty .mean() is NaN; so is ours


def test_bf16_is_close_to_trl_in_fp32() -> None:
    student, teacher, labels = _logits(2, 5, 3001, seed=9)
    ref = GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=0.5, temperature=2.0)
    ours = mtrl.generalized_jsd_loss(student.bfloat16(), teacher.bfloat16(), labels=labels, beta=0.5, temperature=2.0)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=2e-2, atol=1e-4)


def test_bad_arguments_name_the_argument() -> None:
    s, t, labels = _logits(1, 2, 10, seed=0)
    with pytest.raises(ValueError, match="reduction"):
        mtrl.generalized_jsd_loss(s, t, reduction="avg")
    with pytest.raises(ValueError, match="beta"):
        mtrl.generalized_jsd_loss(s, t, beta=1.5)
    with pytest.raises(ValueError, match="labels"):
        mtrl.generalized_jsd_loss(s, t, labels=labels[:, :1])
    with pytest.raises(TypeError, match="completion_mask"):
        mtrl.chunked_divergence_loss(s, s, torch.zeros(10, 10), torch.zeros(10, 10), [1, 1], 0.5)
    h = torch.zeros(1, 2, 4)
    with pytest.raises(ValueError, match="completion_mask"):
        mtrl.chunked_divergence_loss(h, h, torch.zeros(10, 4), torch.zeros(10, 4), torch.ones(1, 3), 0.5)
    with pytest.raises(ValueError, match="teacher_hidden_states"):
        mtrl.chunked_divergence_loss(h, h[:, :1], torch.zeros(10, 4), torch.zeros(10, 4), torch.ones(1, 2), 0.5)


# ----------------------------------------------------------------------------------------------
# DistillationTrainer's chunked loss
# ----------------------------------------------------------------------------------------------


def _heads(b: int, k: int, hs: int, ht: int, v: int, seed: int, bias: bool):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(b, k, hs, generator=g)
    h_t = torch.randn(b, k, ht, generator=g)
    w_s = torch.randn(v, hs, generator=g) / hs ** 0.5 * 3
    w_t = torch.randn(v, ht, generator=g) / ht ** 0.5 * 3
    b_s = 0.5 * torch.randn(v, generator=g) if bias else None
    b_t = 0.5 * torch.randn(v, generator=g) if bias else None
    mask = torch.ones(b, k, dtype=torch.long)
    mask[0, :3] = 0
    mask[-1, -1] = 0
    return h_s, h_t, w_s, w_t, b_s, b_t, mask


def _run_chunked(fn, h_s, w_s, b_s, **kw):
    leaves = [h_s.clone().requires_grad_(True), w_s.clone().requires_grad_(True)]
    if b_s is not None:
        leaves.append(b_s.clone().requires_grad_(True))
    loss, entropy, n_valid = fn(leaves[0], kw.pop("h_t"), leaves[1], kw.pop("w_t"), kw.pop("mask"), kw.pop("beta"),
                                student_lm_head_bias=leaves[2] if b_s is not None else None, **kw)
    loss.backward()
    return loss.detach(), entropy, n_valid, [x.grad for x in leaves]


CHUNKED_CASES = {
    "plain": dict(),
    "bias+T2": dict(bias=True, temperature=2.0),
    "num_items": dict(num_items_in_batch=11, temperature=0.5),
    "num_items_tensor": dict(num_items_in_batch=torch.tensor(11), bias=True),
    "logit_scale": dict(student_logit_scale=0.5, teacher_logit_scale=1.7, transforms=True),
    "softcap": dict(student_final_logit_softcapping=3.0, teacher_final_logit_softcapping=4.0, transforms=True,
                    temperature=1.5),
    "scale+softcap+bias": dict(student_logit_scale=2.0, teacher_logit_scale=0.8, student_final_logit_softcapping=5.0,
                               teacher_final_logit_softcapping=2.5, bias=True, temperature=2.0, transforms=True),
}


def _chunked_fp64(h_s, w_s, b_s, *, h_t, w_t, mask, beta, teacher_lm_head_bias=None, num_items_in_batch=None,
                  student_logit_scale=1.0, teacher_logit_scale=1.0, student_final_logit_softcapping=None,
                  teacher_final_logit_softcapping=None, temperature=1.0):
    """fp64 autograd oracle of TRL's documented math: loss and student (hidden, weight, bias) gradients."""
    leaves = [t.double().requires_grad_(True) for t in (h_s, w_s) + ((b_s,) if b_s is not None else ())]

    def transform(z, scale, cap):
        z = z * scale
        if cap is not None:
            z = cap * torch.tanh(z / cap)
        return z / temperature

    b_t = teacher_lm_head_bias.double() if teacher_lm_head_bias is not None else None
    zs = torch.nn.functional.linear(leaves[0], leaves[1], leaves[2] if b_s is not None else None)
    zt = torch.nn.functional.linear(h_t.double(), w_t.double(), b_t)
    lq = transform(zs, student_logit_scale, student_final_logit_softcapping).log_softmax(-1)
    lp = transform(zt, teacher_logit_scale, teacher_final_logit_softcapping).log_softmax(-1)
    if beta == 0.0:
        per_tok = (lp.exp() * (lp - lq)).sum(-1)
    elif beta == 1.0:
        per_tok = (lq.exp() * (lq - lp)).sum(-1)
    else:
        lm = torch.logaddexp(lp + torch.log(torch.tensor(beta, dtype=torch.float64)),
                             lq + torch.log(torch.tensor(1.0 - beta, dtype=torch.float64)))
        per_tok = beta * (lp.exp() * (lp - lm)).sum(-1) + (1 - beta) * (lq.exp() * (lq - lm)).sum(-1)
    total = (per_tok * (mask != 0)).sum()
    loss = total / (num_items_in_batch if num_items_in_batch is not None else (mask != 0).sum().clamp(min=1))
    loss.backward()
    return loss.detach(), [x.grad for x in leaves]


@pytest.mark.parametrize("case", list(CHUNKED_CASES))
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 1.0])
def test_chunked_divergence_loss_matches_trl(case: str, beta: float) -> None:
    require_new_jsd(beta)
    kw = dict(CHUNKED_CASES[case])
    if kw.pop("transforms", False):
        require_transforms()
    bias = kw.pop("bias", False)
    h_s, h_t, w_s, w_t, b_s, b_t, mask = _heads(2, 6, 16, 24, 1003, seed=len(case), bias=bias)
    common = dict(h_t=h_t, w_t=w_t, mask=mask, beta=beta, teacher_lm_head_bias=b_t, **kw)
    ref = _run_chunked(distillation_trainer._chunked_divergence_loss, h_s, w_s, b_s, **dict(common))
    ours = _run_chunked(mtrl.chunked_divergence_loss, h_s, w_s, b_s, **dict(common))
    exact, exact_grads = _chunked_fp64(h_s, w_s, b_s, **dict(common))
    assert ref[0].item() > 1e-3  # a meaningful comparison
    _close(ours[0], ref[0], f"{case} beta={beta}: loss")
    _close(ours[0], exact, f"{case} beta={beta}: loss vs fp64")
    _close(ours[1], ref[1], f"{case} beta={beta}: entropy_sum")
    assert ref[1].item() > 1.0
    assert int(ours[2]) == int(ref[2]) == int((mask != 0).sum())
    for name, g_ours, g_ref, g_exact in zip(("hidden", "weight", "bias"), ours[3], ref[3], exact_grads):
        # TRL's own chunked JSD gradient is off fp64 by up to ~6e-4 of its largest entry (ours: ~1e-5),
        # so ours is held to the fp64 oracle tightly and to TRL at TRL's accuracy.
        _close(g_ours, g_exact, f"{case} beta={beta}: student {name} gradient vs fp64", rtol=5e-5)
        _close(g_ours, g_ref, f"{case} beta={beta}: student {name} gradient vs TRL", rtol=2e-3)


def test_chunked_entropy_can_be_skipped() -> None:
    h_s, h_t, w_s, w_t, _, _, mask = _heads(2, 5, 8, 8, 50, seed=1, bias=False)
    loss, entropy, n_valid = mtrl.chunked_divergence_loss(h_s, h_t, w_s, w_t, mask, 0.5, compute_entropy=False)
    assert entropy.item() == 0.0 and loss.item() > 0 and int(n_valid) == 6


def test_chunked_signature_is_trls() -> None:
    """Every parameter of TRL's function exists in ours with the same default (drop-in by keyword)."""
    ref = inspect.signature(distillation_trainer._chunked_divergence_loss).parameters
    ours = inspect.signature(mtrl.chunked_divergence_loss).parameters
    assert list(ref) == list(ours)[: len(ref)]
    for name, p in ref.items():
        assert ours[name].default == p.default, name


def test_patch_distillation_trainer_swaps_and_restores() -> None:
    original = distillation_trainer._chunked_divergence_loss
    h_s, h_t, w_s, w_t, _, _, mask = _heads(2, 5, 8, 8, 50, seed=2, bias=False)
    with mtrl.patch_distillation_trainer(compute_entropy=False):
        patched = distillation_trainer._chunked_divergence_loss
        assert patched is not original
        loss, entropy, _ = patched(h_s, h_t, w_s, w_t, mask, 0.5)
        assert entropy.item() == 0.0 and loss.item() > 0
    assert distillation_trainer._chunked_divergence_loss is original
    ref, _, _ = original(h_s, h_t, w_s, w_t, mask, 0.5)
    _close(loss, ref, "patched loss")
