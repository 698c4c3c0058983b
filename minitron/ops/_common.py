"""Helpers shared by the loss op modules (``kl``, ``topk_kl``): argument checks, row views, per-token weights,
chunk sizing for the fused-linear forms and their per-chunk loss scatter and gradient accumulation
(``add_chunk_grads_``), and the in-place row scaling used by their backward passes.

Private to ``minitron.ops``; nothing here imports an op module.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

# Budget for one chunk's temporaries of the fused-linear ops (logits, logit gradient; fp32-sized). Small chunks
# turn the logit matmuls into skinny GEMMs that re-read the whole [V, H] weight per chunk, which is slow
# on CPUs; this keeps chunks large while their temporaries stay a small fraction of the full logits.
# GPUs get a larger budget: every chunk also pays one pass over the fp32 [V, H] weight-gradient
# accumulator, and skinny GEMMs under-fill the SMs (measured on an H200: 261-token chunks at V=128256,
# H=4096 made the fused op 1.27x (fp32) to 3x (bf16) slower than two plain matmuls plus kl_div).
CHUNK_BYTES = 384 << 20
CHUNK_BYTES_CUDA = 1536 << 20


def check_float_tensor(name: str, t: object, allowed: tuple[torch.dtype, ...]) -> None:
    """Raise ``TypeError`` naming ``name`` unless ``t`` is a tensor of one of the ``allowed`` dtypes."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name} must have a floating dtype in ({names}), got {t.dtype}")


def eager(t: Tensor) -> bool:
    """True when ``t`` is a plain tensor in eager mode (not traced by dynamo/AOT/make_fx, not fake): only then
    may host-side value checks read it."""
    if torch.compiler.is_compiling() or type(t) is not torch.Tensor:
        return False
    modes = torch._C._TorchDispatchModeKey
    return all(torch._C._get_dispatch_mode(k) is None for k in (modes.PROXY, modes.FAKE, modes.FUNCTIONAL))


def is_one(g: Tensor) -> bool:
    """Whether every element of ``g`` is exactly 1 (host check; False while tracing)."""
    return eager(g) and bool((g == 1).all())


def as_rows(x: Tensor) -> Tensor:
    """``[..., V] -> [N, V]`` with unit stride along V (the row stride may be anything)."""
    v = x.shape[-1]
    x2 = x.reshape(-1, v)
    if x2.stride(-1) != 1 and x2.numel() > 0:
        x2 = x2.contiguous()
    return x2


def token_weights(counted: Optional[Tensor], n: int, device: torch.device, reduction: str) -> Tensor:
    """fp32 ``[N]`` per-token weights from a bool ``counted`` mask (None: every token counts): 0 for tokens that
    do not count, ``1 / count`` for ``reduction="mean"``, else 1."""
    if counted is None:
        w = torch.ones(n, dtype=torch.float32, device=device)
        if reduction == "mean" and n > 0:
            w.mul_(1.0 / n)
        return w
    w = counted.reshape(n).to(torch.float32)
    if reduction == "mean":
        w = w / torch.clamp(w.sum(), min=1.0)
    return w.contiguous()


def default_chunk_size(n: int, vocab: int, hidden: int, device_type: str, temporaries: int) -> int:
    """Tokens per chunk of a fused-linear op: the larger of ``ceil(N / ceil(V / H))`` (logits about the size of
    the hidden states) and what fits the device's budget for ``temporaries`` fp32-sized ``[chunk, V]`` buffers,
    at most N."""
    if n <= 0:
        return 1
    budget = CHUNK_BYTES_CUDA if device_type == "cuda" else CHUNK_BYTES
    inc = max(1, -(-vocab // max(hidden, 1)))
    by_hidden = max(1, -(-n // inc))
    by_budget = max(16, budget // (temporaries * 4 * max(vocab, 1)))
    return max(1, min(max(by_hidden, by_budget), n))


def uniform_grad_hook(op_name: str):
    """A tensor hook for ``reduction="none"`` outputs of fused-linear ops: their gradients are made in the
    forward pass, so the upstream gradient must be the same for every token."""
    def hook(grad: Tensor) -> Tensor:
        if grad.numel() > 1 and not bool((grad == grad.reshape(-1)[0]).all()):
            raise RuntimeError(f"{op_name}(reduction='none'): the gradient of the per-token loss must be uniform "
                               "across tokens (reduce it with .sum()/.mean(), or use per-token weights via mask)")
        return grad
    return hook


def register_row_loss_autograd(op, num_inputs: int, need_grad_input: int) -> None:
    """Autograd for a row-loss op ``op(student [N, V], ...) -> (loss [N], grad [N, V])`` whose ``grad`` (the
    gradient of ``loss.sum()`` w.r.t. the student, made in the forward pass) is saved and only rescaled by the
    upstream gradient in backward; ``inputs[need_grad_input]`` is the op's ``need_grad`` flag (default True)."""
    name = f"minitron::{getattr(op, '_name', op)}"

    def setup_context(ctx, inputs, output):
        _, grad = output
        ctx.need_grad = inputs[need_grad_input] if len(inputs) > need_grad_input else True
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(grad)
        # The gradient output is never differentiated: don't let autograd fill an [N, V] zero tensor for it.
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_loss: Optional[Tensor], _unused: Optional[Tensor]):
        (grad,) = ctx.saved_tensors
        rest = (None,) * (num_inputs - 1)
        if grad_loss is None:  # the loss was not used: no gradient
            return (None,) + rest
        if not ctx.need_grad:
            raise RuntimeError(f"{name} was called with need_grad=False: it computed no gradient (the functional "
                               "API passes need_grad=True whenever the student requires grad)")
        if grad.numel() > 0 and not is_one(grad_loss):
            if not eager(grad):
                grad = grad * grad_loss.to(grad.dtype).unsqueeze(-1)
            else:  # in place: the gradient buffer belongs to this graph node and is handed out once
                scale_rows_(grad, grad_loss.to(torch.float32))
        return (grad,) + rest

    op.register_autograd(backward, setup_context=setup_context)


@torch.library.custom_op("minitron::_scale_rows_", mutates_args=("grad",))
def scale_rows_(grad: Tensor, row_scale: Tensor) -> None:
    """In place ``grad[i, ...] *= row_scale[i]`` (``row_scale`` fp32 ``[N]`` or ``[1]``)."""
    if row_scale.numel() == 1:
        grad.mul_(row_scale.reshape(()).to(grad.dtype))
    else:
        grad.mul_(row_scale.reshape((-1,) + (1,) * (grad.dim() - 1)).to(grad.dtype))


@scale_rows_.register_fake
def _(grad, row_scale):
    return None


# Whether torch.addmm(..., out_dtype=float32, out=acc) works for 16-bit inputs on CUDA (cuBLAS writes
# the fp32 product straight into the fp32 accumulator); no entry until first tried.
_ADDMM_FP32_OUT: dict[str, bool] = {}


def accumulate_fp32_(acc: Tensor, a: Tensor, b: Tensor, *, fp32_out_gemm: bool = True) -> None:
    """``acc += a @ b`` with ``acc`` fp32 and ``a``, ``b`` of any float dtype. ``fp32_out_gemm``: without a [V, H]
    temporary where the device allows it (CUDA 16-bit inputs: fp32-output GEMM); otherwise (and always when
    False) via a product in the input dtype."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if fp32_out_gemm and acc.device.type == "cuda" and _ADDMM_FP32_OUT.get("cuda", True):
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            _ADDMM_FP32_OUT["cuda"] = True
            return
        except (RuntimeError, TypeError):  # older torch: no out_dtype overload
            _ADDMM_FP32_OUT["cuda"] = False
    acc.add_((a @ b).to(acc.dtype))


def add_chunk_grads_(loss: Tensor, loss_c: Tensor, rows: Tensor, span: Optional[tuple[int, int]],
                     g: Optional[Tensor], h: Tensor, sw: Tensor, grad_h: Optional[Tensor],
                     grad_w: Optional[Tensor], grad_b: Optional[Tensor], *, fp32_out_gemm: bool = True) -> None:
    """One token chunk of a fused-linear loss op, into the whole-batch outputs (in place).

    Args:
        loss: fp32 ``[N]``; ``loss_c``: fp32 ``[C]``, the chunk's per-token losses.
        rows: long ``[C]`` the chunk's token indices; ``span``: ``(lo, hi)`` when they are ``lo..hi-1`` (slice
            writes instead of ``index_copy_``), else None.
        g: ``[C, V]`` d loss / d chunk logits (None: loss only, the gradients are not touched);
        h: ``[C, H]`` the chunk's hidden states; sw: ``[V, H]`` the LM-head weight.
        grad_h: ``[N, H]`` (rows of the chunk written: ``g @ sw``); grad_w: fp32 ``[V, H]`` (``+= g.T @ h``, see
            :func:`accumulate_fp32_` for ``fp32_out_gemm``); grad_b: fp32 ``[V]`` (``+= g.sum(0)``) or None.
    """
    if span is not None:
        loss[span[0]:span[1]] = loss_c
    else:
        loss.index_copy_(0, rows, loss_c)
    if g is None:
        return
    gh = g @ sw
    if span is not None:
        grad_h[span[0]:span[1]] = gh
    else:
        grad_h.index_copy_(0, rows, gh)
    accumulate_fp32_(grad_w, g.t(), h, fp32_out_gemm=fp32_out_gemm)
    if grad_b is not None:
        grad_b.add_(g.sum(0, dtype=torch.float32))
