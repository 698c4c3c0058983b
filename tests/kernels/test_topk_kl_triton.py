"""Triton sparse (top-k teacher) KL kernel (minitron.kernels.topk_kl) vs the torch reference backend in float64.

Runs on CUDA tensors with compiled Triton on a GPU, and on CPU tensors under the Triton interpreter otherwise
(TRITON_INTERPRET=1, set by tests/conftest.py before triton is imported, only when there is no GPU). Small
``block_v`` values force multi-block rows and partial last blocks.
"""
import os

import pytest
import torch

pytest.importorskip("triton")

from minitron.kernels.topk_kl import topk_kl_div_fwd  # noqa: E402
from minitron.ops.topk_kl import _fwd_reference, _sorted_teacher  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 (set before triton import) or a GPU", allow_module_level=True)

pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|divide by zero) encountered:RuntimeWarning")

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def _inputs(n, v, k, seed, dtype=torch.float32, ce=False):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, v, generator=g) * 3).to(dtype)
    t = torch.randn(n, v, generator=g) * 3
    lp, idx = torch.log_softmax(t, -1).topk(k, -1)
    perm = torch.randperm(k, generator=g)
    idx, lp = _sorted_teacher(idx[:, perm], lp[:, perm])
    w = torch.rand(n, generator=g)
    w[0] = 0.0  # a row without KL (CE only when ce)
    if ce:
        labels = torch.randint(0, v, (n,), generator=g)
        labels[1 % n] = idx[1 % n, 0]  # a label inside the index set
        cw = torch.rand(n, generator=g)
        cw[-1] = 0.0
    else:
        labels, cw = torch.empty(0, dtype=torch.long), torch.empty(0)
    return [x.to(DEVICE) for x in (s, idx, lp, w, labels, cw)]


def _compare(args, inv_t, tail, block_v, dtype):
    s, idx, lp, w, labels, cw = args
    loss, grad = topk_kl_div_fwd(s, idx, lp, w, labels, cw, inv_t, tail, block_v=block_v)
    rl, rg = _fwd_reference(s.double(), idx, lp, w, labels, cw, inv_t, tail)
    torch.testing.assert_close(loss.double(), rl.double(), rtol=1e-4, atol=1e-5)
    assert grad.dtype == dtype
    tol = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (1e-2, 2e-3), torch.float16: (2e-3, 2e-4)}[dtype]
    scale = float(rg.abs().max())
    torch.testing.assert_close(grad.double(), rg, rtol=tol[0], atol=tol[1] * max(scale, 1e-3))


@pytest.mark.parametrize("k", [1, 7, 64])
@pytest.mark.parametrize("tail", [True, False])
def test_kernel_matches_reference(k, tail):
    _compare(_inputs(3, 203, k, seed=k), 1.0 / 1.5, tail, block_v=64, dtype=torch.float32)


@pytest.mark.parametrize("inv_t", [1.0, 0.5])
def test_kernel_with_cross_entropy(inv_t):
    _compare(_inputs(4, 150, 9, seed=3, ce=True), inv_t, True, block_v=32, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_kernel_16bit(dtype):
    _compare(_inputs(3, 99, 5, seed=4, dtype=dtype, ce=True), 1.0, False, block_v=None, dtype=dtype)


def test_kernel_all_vocab_in_index_set_and_loss_only():
    s, idx, lp, w, labels, cw = _inputs(2, 40, 40, seed=5)
    _compare((s, idx, lp, w, labels, cw), 1.0, True, block_v=16, dtype=torch.float32)
    loss, grad = topk_kl_div_fwd(s, idx, lp, w, labels, cw, 1.0, True, need_grad=False)
    assert grad.shape == (0, 40)
    torch.testing.assert_close(loss.double(), _fwd_reference(s.double(), idx, lp, w, labels, cw, 1.0, True)[0].double(),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="block_v"):
        topk_kl_div_fwd(s, idx, lp, w, labels, cw, 1.0, True, block_v=24)
