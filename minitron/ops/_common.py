"""Helpers shared by the loss op modules (``kl``, ``kl_vocab_parallel``, ``fused_linear_kl``, ``topk_kl``).

* argument checks, row views, per-token weights (:func:`token_weights`), the per-token loss reduction
  (:func:`reduce_token_loss`);
* the autograd of the row-loss ops (:func:`register_row_loss_autograd`): their gradient is made in the forward
  pass and only rescaled in backward, in place;
* the **fused-linear skeleton**: one loss family's fused-linear op is its schema (a Python function), a
  :class:`FusedLinearSpec` naming its differentiable inputs, and a per-chunk loss; :func:`fused_linear_op`
  supplies the custom-op registration, the fake kernel, the loss-only (``need_grad=False``) outputs,
  ``setup_context`` and the backward that rescales the stored gradients; :func:`fused_linear_chunks` runs the
  token-chunk loop (logits of one chunk at a time, gradients accumulated with :func:`add_chunk_grads_`).

Adding a fused-linear loss (see ``fused_linear_kl.py`` for a complete one)::

    SPEC = FusedLinearSpec(name="minitron::fused_linear_my_loss_fwd", public="fused_linear_my_loss")

    @fused_linear_op(SPEC)
    def fused_linear_my_loss_fwd(student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor],
                                 targets: Tensor, weight: Tensor, chunk_size: int, backend: str,
                                 need_grad: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        def chunk_loss(logits, rows):       # logits [C, V] of the chunk; rows: the per-row tensors, sliced
            return my_row_loss(logits, rows["targets"], rows["weight"], need_grad)   # (loss [C], grad [C, V])
        return fused_linear_chunks(student_hidden, student_weight, student_bias, weight != 0,
                                   {"targets": targets, "weight": weight}, chunk_size, need_grad, chunk_loss)

Private to ``minitron.ops``; nothing here imports an op module.
"""
from __future__ import annotations

import inspect
import math
import typing
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

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


def _schema_arg_names(op) -> tuple[str, ...]:
    """The argument names of a ``torch.library.custom_op`` op, in schema order."""
    return tuple(a.name for a in op._opoverload._schema.arguments)


def _grads_by_name(names: tuple[str, ...], grads: Mapping[str, Optional[Tensor]]) -> tuple[Optional[Tensor], ...]:
    """The tuple ``backward`` returns: ``grads[name]`` for the named inputs, None for every other input."""
    return tuple(grads.get(n) for n in names)


def rescale_rows_(grad: Tensor, grad_loss: Tensor) -> Tensor:
    """``grad [N, ...] * grad_loss [N]`` per row; in place (and returned) in eager mode, where the saved gradient
    belongs to this graph node and is handed out once; out of place while tracing."""
    if grad.numel() == 0 or is_one(grad_loss):
        return grad
    if not eager(grad):
        return grad * grad_loss.to(grad.dtype).unsqueeze(-1)
    scale_rows_(grad, grad_loss.to(torch.float32))
    return grad


def register_row_loss_autograd(op, *, grad_arg: str = "student", need_grad_arg: str = "need_grad") -> None:
    """Autograd for a row-loss op ``op(student [N, V], ...) -> (loss [N], grad [N, V])`` whose ``grad`` (the
    gradient of ``loss.sum()`` w.r.t. the input ``grad_arg``, made in the forward pass) is saved and only rescaled
    by the upstream gradient in backward; ``need_grad_arg`` names the op's loss-only flag."""
    name = f"minitron::{getattr(op, '_name', op)}"
    names = _schema_arg_names(op)
    if grad_arg not in names or need_grad_arg not in names:
        raise ValueError(f"{name} has no argument {grad_arg!r} or {need_grad_arg!r} (arguments: {names})")

    def setup_context(ctx, inputs, output):
        _, grad = output
        ctx.need_grad = dict(zip(names, inputs)).get(need_grad_arg, True)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(grad)
        # The gradient output is never differentiated: don't let autograd fill an [N, V] zero tensor for it.
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_loss: Optional[Tensor], _unused: Optional[Tensor]):
        (grad,) = ctx.saved_tensors
        if grad_loss is None:  # the loss was not used: no gradient
            return _grads_by_name(names, {})
        if not ctx.need_grad:
            raise RuntimeError(f"{name} was called with need_grad=False: it computed no gradient (the functional "
                               "API passes need_grad=True whenever the student requires grad)")
        return _grads_by_name(names, {grad_arg: rescale_rows_(grad, grad_loss)})

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


# ----------------------------------------------------------------------------------------------
# shared argument checks and the per-token reduction of the loss ops' functional APIs
# ----------------------------------------------------------------------------------------------


def check_reduction(reduction: str, allowed: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming ``reduction`` unless it is one of ``allowed``."""
    if reduction not in allowed:
        raise ValueError(f"reduction must be one of {list(allowed)}, got {reduction!r}")


def check_temperature(temperature: object) -> None:
    """Raise ``TypeError``/``ValueError`` naming ``temperature`` unless it is a finite float > 0."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")


def check_vocab_size(vocab_size: object, widths: Mapping[str, int]) -> None:
    """Raise ``TypeError``/``ValueError`` naming ``vocab_size`` unless it is None or an int in ``[1, min(widths)]``;
    ``widths`` maps each vocabulary-axis input's name to its width (every column ``>= vocab_size`` is padding)."""
    if vocab_size is None:
        return
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int or None, got {type(vocab_size).__name__}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    for name, width in widths.items():
        if width < vocab_size:
            raise ValueError(f"vocab_size ({vocab_size}) exceeds {name}'s vocabulary width ({width}): both sides "
                             "must hold at least the real vocabulary (columns >= vocab_size are padding)")


def vocab_view(x: Optional[Tensor], vocab_size: Optional[int], dim: int = -1) -> Optional[Tensor]:
    """``x`` narrowed to its first ``vocab_size`` entries along ``dim`` (a view; unchanged when ``vocab_size`` is
    None or ``x`` is None). The dropped (padding) entries get no probability mass and a zero gradient."""
    if x is None or vocab_size is None or x.shape[dim] == vocab_size:
        return x
    return x.narrow(dim, 0, vocab_size)


def check_chunk_size(chunk_size: object) -> None:
    """Raise ``ValueError`` naming ``chunk_size`` unless it is None or a positive int."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def check_lm_head(who: str, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                  allowed: tuple[torch.dtype, ...], hidden_name: str = "H") -> None:
    """Checks of one model's LM head in a fused-linear op (``who`` is ``"student"`` or ``"teacher"``, naming the
    arguments ``{who}_hidden [..., H]``, ``{who}_weight [V, H]``, ``{who}_bias [V]`` or None): float tensors of
    ``allowed`` dtypes sharing one dtype, matching shapes. ``hidden_name`` names H in errors."""
    h, w, b = f"{who}_hidden", f"{who}_weight", f"{who}_bias"
    check_float_tensor(h, hidden, allowed)
    check_float_tensor(w, weight, allowed)
    if bias is not None:
        check_float_tensor(b, bias, allowed)
    if weight.dim() != 2:
        raise ValueError(f"{w} must be 2-D [V, {hidden_name}], got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{h}'s last dimension ({hidden.shape[-1] if hidden.dim() else None}) must equal "
                         f"{w}.shape[1] ({weight.shape[1]})")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{b} must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise TypeError(f"{h} ({hidden.dtype}), {w} ({weight.dtype}) and {b} must share a dtype")


def needs_grad(*tensors: Optional[Tensor]) -> bool:
    """Whether a gradient can flow to any of ``tensors`` (grad mode on and one of them requires grad): the
    loss ops compute the loss only otherwise (no gradient pass)."""
    return bool(torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


def reduce_reference(per_token: Tensor, counted: Optional[Tensor], reduction: str) -> Tensor:
    """The reduction of the plain-torch reference losses (the tests' oracles): ``per_token [...]`` zeroed where
    the bool ``counted [...]`` is False (None: every token counts), then kept (``"none"``), summed, or averaged
    over the counted tokens (``"mean"``; 0 when none counts)."""
    if counted is not None:
        per_token = torch.where(counted, per_token, torch.zeros_like(per_token))
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    count = per_token.numel() if counted is None else counted.sum()
    return per_token.sum() / torch.clamp(torch.as_tensor(count, device=per_token.device), min=1)


def reduce_token_loss(loss_tok: Tensor, lead: torch.Size, reduction: str, *,
                      uniform_grad_op: Optional[str] = None) -> Tensor:
    """The result of a loss op from its weighted per-token loss ``[N]`` (the weights carry the mean):
    ``[...]`` for ``reduction="none"``, else the sum. ``uniform_grad_op``: the fused-linear op's name, whose
    per-token result must then get a uniform upstream gradient (checked by a hook, eager only)."""
    if reduction != "none":
        return loss_tok.sum()
    out = loss_tok.reshape(lead)
    if uniform_grad_op is not None and out.requires_grad and not torch.compiler.is_compiling():
        out.register_hook(uniform_grad_hook(uniform_grad_op))
    return out


# ----------------------------------------------------------------------------------------------
# the fused-linear custom-op skeleton
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FusedLinearSpec:
    """Declarative description of one fused-linear loss op for :func:`fused_linear_op`.

    The op's schema is its Python signature; the spec names, in that signature, the inputs the skeleton treats
    specially. Every other input (teacher tensors, per-token weights, scalars, ``backend``, ...) gets no
    gradient and is only passed through to the op's body.

    Attributes:
        name: qualified op name, e.g. ``"minitron::fused_linear_kl_div_fwd"``.
        public: the functional API that calls the op (named in errors).
        hidden: the student hidden states ``[N, H]`` (gets a gradient).
        weight: the student LM-head weight ``[V, H]`` (gets a gradient).
        bias: the optional student LM-head bias ``[V]`` (gets a gradient when given).
        need_grad: the bool flag; False computes the loss only (empty gradient outputs).
    """

    name: str
    public: str
    hidden: str = "student_hidden"
    weight: str = "student_weight"
    bias: str = "student_bias"
    need_grad: str = "need_grad"

    @property
    def grad_inputs(self) -> tuple[str, str, str]:
        """The inputs that get gradients, in output order (after the loss)."""
        return (self.hidden, self.weight, self.bias)


def _resolved_signature(fn: Callable) -> inspect.Signature:
    """``fn``'s signature with its (possibly stringified) annotations evaluated: the schema torch infers."""
    sig = inspect.signature(fn)
    hints = typing.get_type_hints(fn)
    params = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in sig.parameters.values()]
    return sig.replace(parameters=params, return_annotation=hints.get("return", sig.return_annotation))


def _loss_only_outputs(hidden: Tensor, weight: Tensor, loss: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return (loss, hidden.new_empty((0, hidden.shape[1])), weight.new_empty((0, weight.shape[1])),
            hidden.new_empty(0))


def fused_linear_op(spec: FusedLinearSpec) -> Callable[[Callable], Any]:
    """Decorator turning a fused-linear loss body into the ``torch.library`` custom op ``spec.name``.

    The body has the op's signature (the schema; it must contain ``spec.hidden``, ``spec.weight``, ``spec.bias``
    and ``spec.need_grad``) and returns ``(loss [N] fp32, grad_hidden [N, H], grad_weight [V, H],
    grad_bias [V] or None)`` — typically :func:`fused_linear_chunks`; the gradients may be None when
    ``need_grad`` is False and may be fp32 accumulators. The op returns ``(loss, grad_hidden, grad_weight,
    grad_bias)`` with the gradients in the input dtypes (``grad_bias`` empty without a bias; all three empty
    ``[0, ...]`` tensors when ``need_grad`` is False). The skeleton registers the fake kernel and the autograd:
    the gradients are saved and only scaled by the (uniform) upstream gradient in backward; only the three
    ``spec.grad_inputs`` get gradients.
    """
    def decorate(body: Callable) -> Any:
        sig = _resolved_signature(body)
        names = tuple(sig.parameters)
        missing = [n for n in (*spec.grad_inputs, spec.need_grad) if n not in names]
        if missing:
            raise TypeError(f"{spec.name}: the op's signature lacks the argument(s) {missing} named by its spec")

        def bind(args: tuple, kwargs: dict) -> dict[str, Any]:
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            return bound.arguments

        def impl(*args, **kwargs):
            a = bind(args, kwargs)
            hidden, weight, bias = (a[n] for n in spec.grad_inputs)
            loss, gh, gw, gb = body(**a)
            if not a[spec.need_grad]:
                return _loss_only_outputs(hidden, weight, loss)
            gb = gb.to(bias.dtype) if gb is not None else hidden.new_zeros(0)
            return loss, gh, gw.to(weight.dtype), gb

        impl.__signature__ = sig
        for attr in ("__name__", "__qualname__", "__module__", "__doc__"):
            setattr(impl, attr, getattr(body, attr))
        op = torch.library.custom_op(spec.name, impl, mutates_args=())

        @op.register_fake
        def _fake(*args, **kwargs):
            a = bind(args, kwargs)
            hidden, weight, bias = (a[n] for n in spec.grad_inputs)
            loss = hidden.new_empty((hidden.shape[0],), dtype=torch.float32)
            if not a[spec.need_grad]:
                return _loss_only_outputs(hidden, weight, loss)
            gb = torch.empty_like(bias) if bias is not None else hidden.new_empty(0)
            return loss, torch.empty_like(hidden), torch.empty_like(weight), gb

        def setup_context(ctx, inputs, output):
            a = dict(zip(names, inputs))  # torch fills in the defaults
            _, gh, gw, gb = output
            ctx.has_bias = a[spec.bias] is not None
            ctx.need_grad = a.get(spec.need_grad, True)
            ctx.save_for_backward(gh, gw, gb)
            ctx.mark_non_differentiable(gh, gw, gb)
            ctx.set_materialize_grads(False)  # no zero-filled [V, H] gradients for the non-differentiable outputs

        def backward(ctx, grad_loss: Optional[Tensor], *_unused):
            gh, gw, gb = ctx.saved_tensors
            if grad_loss is None:  # the loss was not used: no gradient
                return _grads_by_name(names, {})
            if not ctx.need_grad:
                raise RuntimeError(f"{spec.name} was called with need_grad=False: it computed no gradient "
                                   f"({spec.public} passes need_grad=True whenever a student input requires grad)")
            # The functional API reduces the per-token loss with a sum (the weights carry the mean), so the
            # upstream gradient is uniform (reduction="none" with a non-uniform one is refused by its hook).
            if grad_loss.numel() > 0 and not is_one(grad_loss):
                c = grad_loss.reshape(-1)[0]
                gh, gw, gb = gh * c.to(gh.dtype), gw * c.to(gw.dtype), gb * c.to(gb.dtype)
            return _grads_by_name(names, {spec.hidden: gh, spec.weight: gw,
                                          spec.bias: gb if ctx.has_bias else None})

        op.register_autograd(backward, setup_context=setup_context)
        return op

    return decorate


ChunkLoss = Callable[[Tensor, dict[str, Optional[Tensor]]], tuple[Tensor, Optional[Tensor]]]


def fused_linear_chunks(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], active: Tensor,
                        per_row: Mapping[str, Optional[Tensor]], chunk_size: int, need_grads: bool,
                        chunk_loss: ChunkLoss, *, fp32_out_gemm: bool = True
                        ) -> tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """The token-chunk loop of a fused-linear loss: only one chunk's logits ever exist.

    Args:
        hidden: ``[N, H]`` student hidden states; weight: ``[V, H]``; bias: ``[V]`` or None.
        active: bool ``[N]``: the tokens to compute (the others get loss 0 and no gradient; never read).
        per_row: the op's other per-token tensors (``[N, ...]``), handed to ``chunk_loss`` sliced to the chunk's
            rows (None entries stay None).
        chunk_size: tokens per chunk (>= 1). need_grads: False computes the loss only.
        chunk_loss: ``(logits [C, V], rows) -> (loss [C] fp32, grad [C, V] or None)``: the chunk's per-token loss
            and its gradient w.r.t. the logits (in the hidden dtype; ignored when ``need_grads`` is False).
        fp32_out_gemm: see :func:`accumulate_fp32_`.

    Returns:
        ``(loss [N] fp32, grad_hidden [N, H], grad_weight fp32 [V, H], grad_bias fp32 [V] or None)``; the three
        gradients are None when ``need_grads`` is False.
    """
    n = hidden.shape[0]
    device = hidden.device
    loss = torch.zeros(n, dtype=torch.float32, device=device)
    grad_h = torch.zeros_like(hidden) if need_grads else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=device) if need_grads else None
    grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=device) if (need_grads and bias is not None) \
        else None
    counted = torch.nonzero(active).flatten() if n else active.new_zeros(0, dtype=torch.long)
    chunk = max(1, int(chunk_size))
    for start in range(0, counted.numel(), chunk):
        rows = counted[start:start + chunk]
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        if hi - lo == rows.numel():  # consecutive tokens: views instead of gathers
            span: Optional[tuple[int, int]] = (lo, hi)
            h = hidden[lo:hi]
            rows_c = {k: None if t is None else t[lo:hi] for k, t in per_row.items()}
        else:
            span = None
            h = hidden.index_select(0, rows)
            rows_c = {k: None if t is None else t.index_select(0, rows) for k, t in per_row.items()}
        logits = h @ weight.t()
        if bias is not None:
            logits += bias
        loss_c, g = chunk_loss(logits, rows_c)
        del logits
        add_chunk_grads_(loss, loss_c, rows, span, g if need_grads else None, h, weight, grad_h, grad_w, grad_b,
                         fp32_out_gemm=fp32_out_gemm)
        del g
    return loss, grad_h, grad_w, grad_b
