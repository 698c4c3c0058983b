"""The shared loss-op skeleton (minitron.ops._common) and the KL family's module split / public bounds."""
from __future__ import annotations

from typing import Optional

import pytest
import torch
from torch import Tensor

import minitron.ops as ops
from minitron.ops._common import FusedLinearSpec, fused_linear_chunks, fused_linear_op, needs_grad

# ---------------------------------------------------------------------------------------------------------------
# a new fused-linear loss written on the skeleton: cross-entropy of hidden @ weight.T (+ bias), in a few lines
# ---------------------------------------------------------------------------------------------------------------

_CE = FusedLinearSpec(name="minitron_test::fused_linear_ce_fwd", public="fused_linear_ce")


def _ce_rows(logits: Tensor, labels: Tensor, weight: Tensor, need_grad: bool) -> tuple[Tensor, Optional[Tensor]]:
    z = logits.to(torch.float32)
    lse = torch.logsumexp(z, dim=-1)
    loss = weight * (lse - z.gather(-1, labels.unsqueeze(-1)).squeeze(-1))
    if not need_grad:
        return loss, None
    g = torch.softmax(z, dim=-1)
    g.scatter_add_(-1, labels.unsqueeze(-1), -torch.ones_like(labels, dtype=g.dtype).unsqueeze(-1))
    return loss, (g * weight.unsqueeze(-1)).to(logits.dtype)


@fused_linear_op(_CE)
def fused_linear_ce_fwd(student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor],
                        labels: Tensor, weight: Tensor, chunk_size: int,
                        need_grad: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    def chunk_loss(logits, rows):
        return _ce_rows(logits, rows["labels"], rows["weight"], need_grad)

    return fused_linear_chunks(student_hidden, student_weight, student_bias, weight != 0,
                               {"labels": labels, "weight": weight}, chunk_size, need_grad, chunk_loss)


def fused_linear_ce(h: Tensor, w: Tensor, b: Optional[Tensor], labels: Tensor, chunk_size: int = 3) -> Tensor:
    n = h.shape[0]
    weight = torch.full((n,), 1.0 / n)
    loss, _, _, _ = torch.ops.minitron_test.fused_linear_ce_fwd(h, w, b, labels, weight, chunk_size,
                                                                needs_grad(h, w, b))
    return loss.sum()


def _inputs(bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(7, 5, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(11, 5, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(11, generator=g, dtype=torch.float64).requires_grad_() if bias else None
    labels = torch.randint(0, 11, (7,), generator=g)
    return h, w, b, labels


@pytest.mark.parametrize("bias", [False, True])
def test_skeleton_loss_and_gradients_match_autograd(bias):
    h, w, b, labels = _inputs(bias)
    (3.0 * fused_linear_ce(h, w, b, labels)).backward()  # the upstream gradient 3 rescales the stored ones
    got = [h.grad, w.grad] + ([b.grad] if bias else [])
    ref_inputs = [t.detach().clone().requires_grad_() for t in (h, w) + ((b,) if bias else ())]
    logits = torch.nn.functional.linear(ref_inputs[0], ref_inputs[1], ref_inputs[2] if bias else None)
    ref = torch.nn.functional.cross_entropy(logits, labels)
    (3.0 * ref).backward()
    with torch.no_grad():
        assert torch.allclose(fused_linear_ce(h, w, b, labels), ref.float().to(torch.float32), atol=1e-6)
    for g_got, t in zip(got, ref_inputs):
        assert g_got.dtype == t.dtype
        assert torch.allclose(g_got, t.grad, atol=1e-5), (g_got - t.grad).abs().max()


def test_skeleton_non_contiguous_token_selection():
    """Tokens with weight 0 are skipped: the chunks gather rows (index_select path) and the gradients still match."""
    h, w, _, labels = _inputs(False, seed=1)
    weight = torch.tensor([1, 0, 1, 1, 0, 0, 1], dtype=torch.float32)
    loss, gh, gw, gb = torch.ops.minitron_test.fused_linear_ce_fwd(h.detach(), w.detach(), None, labels, weight, 2)
    logits = h.detach() @ w.detach().t()
    ref = torch.nn.functional.cross_entropy(logits, labels, reduction="none") * weight
    assert torch.allclose(loss, ref.float(), atol=1e-6)
    assert gb.numel() == 0 and gh.shape == h.shape and gw.shape == w.shape
    assert torch.equal(gh[weight == 0], torch.zeros_like(gh[weight == 0]))


def test_skeleton_loss_only_and_refused_backward():
    h, w, _, labels = _inputs(False)
    weight = torch.full((7,), 1.0 / 7)
    with torch.no_grad():
        loss, gh, gw, gb = torch.ops.minitron_test.fused_linear_ce_fwd(h, w, None, labels, weight, 3, False)
    assert gh.shape == (0, 5) and gw.shape == (0, 5) and gb.numel() == 0 and loss.shape == (7,)
    loss, *_ = torch.ops.minitron_test.fused_linear_ce_fwd(h, w, None, labels, weight, 3, False)
    with pytest.raises(RuntimeError, match="need_grad=False.*fused_linear_ce"):
        loss.sum().backward()


@pytest.mark.parametrize("bias", [False, True])
def test_skeleton_opcheck(bias):
    h, w, b, labels = _inputs(bias)
    weight = torch.full((7,), 1.0 / 7, dtype=torch.float32)
    torch.library.opcheck(torch.ops.minitron_test.fused_linear_ce_fwd, (h, w, b, labels, weight, 3, True))
    # loss only: inputs that need no gradient (a backward through need_grad=False is refused by design)
    hd, wd, bd = (None if t is None else t.detach() for t in (h, w, b))
    torch.library.opcheck(torch.ops.minitron_test.fused_linear_ce_fwd, (hd, wd, bd, labels, weight, 4, False))


def test_skeleton_compiles_fullgraph():
    h, w, b, labels = _inputs(True)
    compiled = torch.compile(fused_linear_ce, fullgraph=True, backend="aot_eager")
    loss = compiled(h, w, b, labels)
    loss.backward()
    h2, w2, b2 = (t.detach().clone().requires_grad_() for t in (h, w, b))
    ref = fused_linear_ce(h2, w2, b2, labels)
    ref.backward()
    assert torch.allclose(loss, ref)
    for a, r in ((h, h2), (w, w2), (b, b2)):
        assert torch.allclose(a.grad, r.grad)


def test_spec_naming_a_missing_argument_is_refused():
    spec = FusedLinearSpec(name="minitron_test::bad_fwd", public="bad", bias="lm_bias")
    with pytest.raises(TypeError, match="lm_bias"):
        @fused_linear_op(spec)
        def bad_fwd(student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor],
                    need_grad: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            raise AssertionError("never called")


# ---------------------------------------------------------------------------------------------------------------
# the split of minitron.ops.kl and the declared bounds
# ---------------------------------------------------------------------------------------------------------------


def test_moved_names_still_importable_from_kl():
    from minitron.ops import fused_linear_kl, kl, kl_vocab_parallel
    for name in ("fused_linear_kl_div", "fused_linear_kl_div_reference", "FusedLinearKLDivLoss"):
        assert getattr(kl, name) is getattr(fused_linear_kl, name) is getattr(ops, name)
    assert kl.vp_bytes_per_row is kl_vocab_parallel.vp_bytes_per_row is ops.vp_bytes_per_row
    with pytest.raises(AttributeError):
        kl.no_such_name  # noqa: B018


def test_importing_kl_registers_every_kl_op():
    import minitron.ops.kl  # noqa: F401
    for name in ("kl_div_fwd", "kl_div_stats", "kl_div_jsd_sums", "kl_div_vp_fwd", "fused_linear_kl_div_fwd"):
        assert hasattr(torch.ops.minitron, name)


def test_declared_bounds_are_public():
    assert ops.MAX_TEMPERATURE == 100.0
    assert ops.KL_MODES == ("forward", "reverse", "jsd")
    assert ops.KL_REDUCTIONS == ("mean", "sum", "none")
    assert ops.BETA_RANGE == (0.0, 1.0)
    for mode in ops.KL_MODES:
        ops.check_kl_options(mode, ops.MAX_TEMPERATURE, ops.BETA_RANGE[1], "sum")


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(temperature=100.5), ValueError, "MAX_TEMPERATURE"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature="2"), TypeError, "temperature"),
    (dict(mode="kl"), ValueError, "mode"),
    (dict(beta=1.5), ValueError, "beta"),
    (dict(reduction="avg"), ValueError, "reduction"),
])
def test_check_kl_options_raises_what_the_op_raises(kwargs, exc, match):
    with pytest.raises(exc, match=match) as early:
        ops.check_kl_options(**kwargs)
    s = torch.zeros(2, 4)
    with pytest.raises(exc, match=match) as late:
        ops.kl_div(s, s, backend="reference", **kwargs)
    assert str(early.value) == str(late.value)
