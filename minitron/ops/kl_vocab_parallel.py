"""Vocab-parallel KL (tensor-parallel LM heads): ``minitron.ops.kl.kl_div(..., process_group=g)``.

Each rank holds a contiguous slice ``[v0, v1)`` of the vocabulary of every row; the ranks exchange O(1) numbers
per row (20 bytes, JSD 40: :func:`vp_bytes_per_row`), never a row. This module holds the three ops of that
exchange (``kl_div_stats``, ``kl_div_jsd_sums``, ``kl_div_vp_fwd``), the process-group path that runs them and
the cross-rank argument check. Definitions and conventions: :mod:`minitron.ops.kl` and docs/kl.md,
"Vocab-parallel".
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from minitron.ops._common import register_row_loss_autograd
from minitron.ops._dispatch import native_unavailable, op_backends, triton_unavailable
from minitron.ops.kl import MODES, REDUCTIONS, _jsd_end, _log_mixture

__all__ = ["VP_STATS", "kl_div_stats", "kl_div_jsd_sums", "kl_div_vp_fwd", "vp_bytes_per_row",
           "vocab_parallel_token_loss"]

# ----------------------------------------------------------------------------------------------
# vocab-parallel pieces: each rank holds the columns [v0, v1) of every row (see kl_div(process_group=...))
# ----------------------------------------------------------------------------------------------
#
# Per row the ranks exchange O(1) numbers (docs/kl.md, "Vocab-parallel"):
#   1. stats  = kl_div_stats(local slice): the online-softmax state (m_a, s_a, m_b, s_b, c) of the slice, with
#      a = student / T, b = teacher / T, s = sum exp(x - m), c the forward/reverse cross sum relative to its
#      weights' max (csrc/common/kl_math.h KlState);
#   2. all-reduce MAX of (m_a, m_b), rescale the sums to the global maxima, all-reduce SUM of (s_a, s_b[, c]):
#      every rank now holds the global state, hence both log-sum-exps and (forward / reverse) the divergence;
#   3. JSD only: kl_div_jsd_sums(local slice, global state) -> the slice's (loss, sum Q g, sum Q), all-reduce
#      SUM (the mixture's log is per element, so the loss itself is a sum over the vocabulary);
#   4. kl_div_vp_fwd(local slice, global state[, global sums]) -> per-row loss (the same on every rank) and the
#      gradient of the local slice.

#: Columns of a per-row statistics row: max and sum of exp of the student, the same of the teacher, cross sum.
VP_STATS = ("m_student", "s_student", "m_teacher", "s_teacher", "cross")

_stats_backends = op_backends("kl_div_stats")
_jsd_sums_backends = op_backends("kl_div_jsd_sums")
_vp_backends = op_backends("kl_div_vp_fwd")


def _global_rows(stats: Tensor, mode: int) -> dict[str, Tensor]:
    """Per-row log-sum-exps, their difference and the forward/reverse divergence from the global statistics
    (fp32; as csrc/common/kl_math.h kl_finalize). ``bad``: NaN rows; ``empty``: all -inf teacher rows."""
    ma, sa, mb, sb, c = stats.to(torch.float32).unbind(1)
    empty = (sb == 0) & (sa > 0) & (sa < float("inf")) & torch.isfinite(ma)
    bad = ~((sa > 0) & (sb > 0)) & ~empty
    lse_a = ma + torch.log(sa)
    lse_b = mb + torch.log(sb)
    lse_diff = (ma - mb) + torch.log(sa / sb)
    if mode == MODES["forward"]:
        div = c / sb + lse_diff
    elif mode == MODES["reverse"]:
        div = c / sa - lse_diff
    else:
        div = torch.zeros_like(lse_a)
    nan = torch.full_like(lse_a, float("nan"))
    return dict(lse_a=torch.where(bad, nan, lse_a), lse_b=torch.where(bad, nan, lse_b),
                lse_diff=torch.where(bad, nan, lse_diff), div=torch.where(bad, nan, div), empty=empty)


@_stats_backends.register("cpp", ("cpu",), unavailable=lambda d: native_unavailable("_kl_div_stats_native", d))
def _stats_cpp(s: Tensor, t: Tensor, w: Tensor, mode: int, inv_t: float) -> Tensor:
    return torch.ops.minitron._kl_div_stats_native(s, t, w, mode, inv_t)


@_stats_backends.register("cuda", ("cuda",), unavailable=lambda d: native_unavailable("_kl_div_stats_native", d))
def _stats_cuda(s: Tensor, t: Tensor, w: Tensor, mode: int, inv_t: float) -> Tensor:
    return torch.ops.minitron._kl_div_stats_native(s, t, w, mode, inv_t)


@_stats_backends.register("triton", ("cuda", "cpu"), unavailable=triton_unavailable)
def _stats_triton(s: Tensor, t: Tensor, w: Tensor, mode: int, inv_t: float) -> Tensor:
    from minitron.kernels.kl_div import kl_div_stats as stats

    return stats(s, t, w, mode, inv_t)


@_stats_backends.register("reference", ("cpu", "cuda"))
def _stats_reference(s: Tensor, t: Tensor, w: Tensor, mode: int, inv_t: float) -> Tensor:
    """Torch version: the slice's max and sum of exp of both inputs, and the cross sum (fp32)."""
    a = s.to(torch.float32) * inv_t
    b = t.to(torch.float32) * inv_t

    def max_sum(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        m = x.amax(-1)
        m_safe = torch.where(m == float("-inf"), torch.zeros_like(m), m)
        e = torch.exp(x - m_safe.unsqueeze(-1))
        return m, e.sum(-1), e

    ma, sa, ea = max_sum(a)
    mb, sb, eb = max_sum(b)
    zero = torch.zeros((), dtype=torch.float32, device=s.device)
    if mode == MODES["forward"]:
        c = torch.where(eb == 0, zero, eb * (b - a)).sum(-1)
    elif mode == MODES["reverse"]:
        c = torch.where(ea == 0, zero, ea * (a - b)).sum(-1)
    else:
        c = torch.zeros_like(sa)
    out = torch.stack([ma, sa, mb, sb, c], dim=1)
    skipped = torch.tensor([float("-inf"), 0.0, float("-inf"), 0.0, 0.0], device=s.device)
    return torch.where((w == 0).unsqueeze(-1), skipped, out)


@torch.library.custom_op("minitron::kl_div_stats", mutates_args=())
def kl_div_stats(student: Tensor, teacher: Tensor, weight: Tensor, mode: int, temperature: float,
                 backend: str) -> Tensor:
    """Online-softmax statistics of a slice of the vocabulary (the first step of vocab-parallel KL).

    Args:
        student, teacher: ``[N, V_local]`` logits (fp32/bf16/fp16, unit stride along V).
        weight: ``[N]`` fp32; rows with weight 0 are skipped (statistics ``(-inf, 0, -inf, 0, 0)``).
        mode: 0 forward KL, 1 reverse KL, 2 JSD (the cross sum is only formed for 0 and 1).
    Returns:
        fp32 ``[N, 5]``: per row ``(m_a, s_a, m_b, s_b, c)`` (see :data:`VP_STATS`) with ``a = student / T``,
        ``b = teacher / T``, ``m`` the max over the slice, ``s = sum exp(x - m)`` and ``c`` the cross sum
        ``sum exp(b - m_b) (b - a)`` (forward) or ``sum exp(a - m_a) (a - b)`` (reverse), 0 for JSD; statistics of
        disjoint slices combine exactly as in csrc/common/kl_math.h ``kl_state_merge``.
    """
    impl = _stats_backends.select(backend, student.device, student.dtype)
    if student.shape[0] == 0:
        return torch.zeros((0, 5), dtype=torch.float32, device=student.device)
    return impl.fn(student, teacher, weight, mode, 1.0 / temperature)


@kl_div_stats.register_fake
def _(student, teacher, weight, mode, temperature, backend):
    return student.new_empty((student.shape[0], 5), dtype=torch.float32)


@_jsd_sums_backends.register("cpp", ("cpu",), unavailable=lambda d: native_unavailable("_kl_div_jsd_sums_native", d))
def _jsd_sums_cpp(s: Tensor, t: Tensor, w: Tensor, stats: Tensor, inv_t: float, beta: float) -> Tensor:
    return torch.ops.minitron._kl_div_jsd_sums_native(s, t, w, stats, inv_t, beta)


@_jsd_sums_backends.register("cuda", ("cuda",),
                             unavailable=lambda d: native_unavailable("_kl_div_jsd_sums_native", d))
def _jsd_sums_cuda(s: Tensor, t: Tensor, w: Tensor, stats: Tensor, inv_t: float, beta: float) -> Tensor:
    return torch.ops.minitron._kl_div_jsd_sums_native(s, t, w, stats, inv_t, beta)


@_jsd_sums_backends.register("triton", ("cuda", "cpu"), unavailable=triton_unavailable)
def _jsd_sums_triton(s: Tensor, t: Tensor, w: Tensor, stats: Tensor, inv_t: float, beta: float) -> Tensor:
    from minitron.kernels.kl_div import kl_div_jsd_sums as sums

    return sums(s, t, w, stats, inv_t, beta)


def _jsd_local_reference(s: Tensor, t: Tensor, stats: Tensor, inv_t: float, beta: float):
    """Per element of a slice: Q, the loss terms and g = (1 - beta) log(Q / M) (0 where Q = 0), from the global
    statistics."""
    rows = _global_rows(stats, MODES["jsd"])
    a = s.to(torch.float32) * inv_t
    b = t.to(torch.float32) * inv_t
    lq = a - rows["lse_a"].unsqueeze(-1)
    lp = b - rows["lse_b"].unsqueeze(-1)
    lm = _log_mixture(lp, lq, beta)
    zero = torch.zeros((), dtype=torch.float32, device=s.device)
    p, q = lp.exp(), lq.exp()
    terms = beta * torch.where(p == 0, zero, p * (lp - lm)) + (1.0 - beta) * torch.where(q == 0, zero, q * (lq - lm))
    g = torch.where(q == 0, zero, (1.0 - beta) * (lq - lm))
    return rows, q, terms, g


@_jsd_sums_backends.register("reference", ("cpu", "cuda"))
def _jsd_sums_reference(s: Tensor, t: Tensor, w: Tensor, stats: Tensor, inv_t: float, beta: float) -> Tensor:
    rows, q, terms, g = _jsd_local_reference(s, t, stats, inv_t, beta)
    q64 = q.to(torch.float64)
    out = torch.stack([terms.sum(-1).to(torch.float64), (q64 * g.to(torch.float64)).sum(-1), q64.sum(-1)], dim=1)
    skip = ((w == 0) | rows["empty"]).unsqueeze(-1)
    return torch.where(skip, torch.zeros((), dtype=torch.float64, device=s.device), out)


@torch.library.custom_op("minitron::kl_div_jsd_sums", mutates_args=())
def kl_div_jsd_sums(student: Tensor, teacher: Tensor, weight: Tensor, stats: Tensor, temperature: float,
                    beta: float, backend: str) -> Tensor:
    """JSD partial sums of a slice of the vocabulary, given the global statistics (vocab-parallel step 3).

    Args:
        student, teacher: ``[N, V_local]``; weight: ``[N]`` fp32 (rows with weight 0 give zeros);
        stats: fp32 ``[N, 5]`` global statistics (:func:`kl_div_stats` combined over the group).
        beta: the JSD weight, strictly between 0 and 1 in float32.
    Returns:
        fp64 ``[N, 3]``: per row ``(sum of the divergence terms, sum_k Q_k g_k, sum_k Q_k)`` over the slice, with
        ``g_k = (1 - beta) log(Q_k / M_k)`` (see csrc/common/kl_math.h ``JsdPartial``); zeros for skipped rows and
        rows whose teacher is entirely -inf.
    """
    impl = _jsd_sums_backends.select(backend, student.device, student.dtype)
    if student.shape[0] == 0:
        return torch.zeros((0, 3), dtype=torch.float64, device=student.device)
    return impl.fn(student, teacher, weight, stats, 1.0 / temperature, beta)


@kl_div_jsd_sums.register_fake
def _(student, teacher, weight, stats, temperature, beta, backend):
    return student.new_empty((student.shape[0], 3), dtype=torch.float64)


@_vp_backends.register("cpp", ("cpu",), unavailable=lambda d: native_unavailable("_kl_div_vp_fwd_native", d))
def _vp_cpp(s, t, w, stats, sums, mode, inv_t, beta, scale, need_grad):
    return torch.ops.minitron._kl_div_vp_fwd_native(s, t, w, stats, sums, mode, inv_t, beta, scale, need_grad)


@_vp_backends.register("cuda", ("cuda",), unavailable=lambda d: native_unavailable("_kl_div_vp_fwd_native", d))
def _vp_cuda(s, t, w, stats, sums, mode, inv_t, beta, scale, need_grad):
    return torch.ops.minitron._kl_div_vp_fwd_native(s, t, w, stats, sums, mode, inv_t, beta, scale, need_grad)


@_vp_backends.register("triton", ("cuda", "cpu"), unavailable=triton_unavailable)
def _vp_triton(s, t, w, stats, sums, mode, inv_t, beta, scale, need_grad):
    from minitron.kernels.kl_div import kl_div_vp_fwd as vp

    return vp(s, t, w, stats, sums, mode, inv_t, beta, scale, need_grad=need_grad)


@_vp_backends.register("reference", ("cpu", "cuda"))
def _vp_reference(s, t, w, stats, sums, mode, inv_t, beta, scale, need_grad):
    """Torch version: loss from the global statistics (and sums), the slice's gradient in closed form."""
    zero = torch.zeros((), dtype=torch.float32, device=s.device)
    if mode == MODES["jsd"]:
        rows, q, _, g = _jsd_local_reference(s, t, stats, inv_t, beta)
        sums = sums.to(torch.float64)
        div = sums[:, 0].to(torch.float32)
        div = torch.where(torch.isnan(rows["lse_a"]), torch.full_like(div, float("nan")), div)
        centre = torch.where(sums[:, 2] > 0, sums[:, 1] / sums[:, 2], torch.zeros_like(sums[:, 1]))
        hi = centre.to(torch.float32)
        lo = (centre - hi.to(torch.float64)).to(torch.float32)
        grad = torch.where(q == 0, zero, q * ((g - hi.unsqueeze(-1)) - lo.unsqueeze(-1)))
    else:
        rows = _global_rows(stats, mode)
        div = rows["div"]
        a = s.to(torch.float32) * inv_t
        b = t.to(torch.float32) * inv_t
        q = torch.exp(a - rows["lse_a"].unsqueeze(-1))
        if mode == MODES["forward"]:
            grad = q - torch.exp(b - rows["lse_b"].unsqueeze(-1))
        else:
            log_ratio = (a - b) - rows["lse_diff"].unsqueeze(-1)
            grad = torch.where(q == 0, zero, q * (log_ratio - div.unsqueeze(-1)))
    counted = (w != 0) & ~rows["empty"]
    ws = w * scale
    loss = torch.where(counted, ws * div, zero)
    if not need_grad:
        return loss, s.new_empty((0, s.shape[-1]))
    grad = torch.where(counted.unsqueeze(-1), grad * (ws * inv_t).unsqueeze(-1), zero)
    return loss, grad.to(s.dtype).contiguous()


@torch.library.custom_op("minitron::kl_div_vp_fwd", mutates_args=())
def kl_div_vp_fwd(student: Tensor, teacher: Tensor, weight: Tensor, stats: Tensor, jsd_sums: Optional[Tensor],
                  mode: int, temperature: float, beta: float, scale: float, backend: str,
                  need_grad: bool = True) -> tuple[Tensor, Tensor]:
    """Per-row loss and the gradient of a vocabulary slice, given the global statistics (vocab-parallel step 4).

    Args:
        student, teacher: ``[N, V_local]`` logits; weight: ``[N]`` fp32 (rows with weight 0 are skipped).
        stats: fp32 ``[N, 5]`` global statistics (:func:`kl_div_stats` combined over the group).
        jsd_sums: mode 2: fp64 ``[N, 3]`` global :func:`kl_div_jsd_sums`; else None.
        mode: 0 forward, 1 reverse, 2 JSD with ``0 < beta < 1`` in float32 (the ends are run as 0 / 1).
    Returns:
        ``loss [N]`` fp32 = weight * scale * D (the whole row's divergence: the same on every rank) and
        ``grad [N, V_local]`` (student dtype) = d loss / d student for the slice (``[0, V_local]`` when
        ``need_grad`` is False).
    """
    impl = _vp_backends.select(backend, student.device, student.dtype)
    if student.shape[0] == 0:
        return (torch.zeros(0, dtype=torch.float32, device=student.device),
                torch.empty((0, student.shape[1]), dtype=student.dtype, device=student.device))
    return impl.fn(student, teacher, weight, stats, jsd_sums, mode, 1.0 / temperature, beta, scale, need_grad)


@kl_div_vp_fwd.register_fake
def _(student, teacher, weight, stats, jsd_sums, mode, temperature, beta, scale, backend, need_grad=True):
    grad_rows = student.shape[0] if need_grad else 0
    return (student.new_empty((student.shape[0],), dtype=torch.float32),
            torch.empty((grad_rows, student.shape[1]), dtype=student.dtype, device=student.device))


register_row_loss_autograd(kl_div_vp_fwd)


def vp_bytes_per_row(mode: str, beta: float = 0.5) -> int:
    """Bytes each rank contributes per row to the all-reduces of vocab-parallel :func:`kl_div` (from the
    shapes): MAX of 2 fp32 maxima, SUM of 3 fp32 sums (2 for JSD, which has no cross sum), and for the JSD
    (0 < beta < 1) a SUM of 3 fp64 partial sums. Independent of the vocabulary size."""
    if mode == "jsd" and _jsd_end(beta) is None:
        return 2 * 4 + 2 * 4 + 3 * 8
    return 2 * 4 + 3 * 4


def _combine_stats(stats: Tensor, mode: int, group) -> Tensor:
    """The global ``[N, 5]`` statistics from every rank's slice statistics: all-reduce MAX of the two maxima,
    rescale the sums to them, all-reduce SUM of the sums."""
    import torch.distributed as dist

    m = stats[:, [0, 2]].contiguous()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    r = torch.where(m == float("-inf"), torch.zeros_like(m), torch.exp(stats[:, [0, 2]] - m))
    cols = [stats[:, 1] * r[:, 0], stats[:, 3] * r[:, 1]]
    if mode != MODES["jsd"]:
        c = stats[:, 4]
        rc = r[:, 1] if mode == MODES["forward"] else r[:, 0]
        cols.append(torch.where(c == float("inf"), c, c * rc))  # a +inf cross sum stays +inf when rc is 0
    sums = torch.stack(cols, dim=1)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    c = sums[:, 2] if mode != MODES["jsd"] else torch.zeros_like(sums[:, 0])
    return torch.stack([m[:, 0], sums[:, 0], m[:, 1], sums[:, 1], c], dim=1)


_REDUCTION_CODES = {r: i for i, r in enumerate(REDUCTIONS)}
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _consistency_values(n: int, mask: Optional[Tensor], args: dict[str, float]) -> tuple[list[str], list[float]]:
    if mask is None:
        counted, checksum = float(n), 0.0
    else:
        flat = mask.reshape(-1)
        counted = float(flat.sum())
        # positions of the counted tokens, weighted so that moving a token changes the sum
        idx = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64)
        checksum = float((idx * flat.to(torch.float64) * torch.cos(idx)).sum())
    names = ["student_logits rows (N)", "mask/labels (counted tokens)", "mask/labels (positions)"] + list(args)
    return names, [float(n), counted, checksum] + [float(v) for v in args.values()]


_CONSISTENCY_ARGS = ("mode", "temperature", "beta", "reduction", "scale_by_t2", "dtype", "student_logit_scale",
                     "teacher_logit_scale", "student_softcap", "teacher_softcap")


def _group_max(group, vals: list[float], device: torch.device) -> tuple[list[float], list[float]]:
    """(max, min) over the group of each value: one all-reduce MAX of the values and their negatives."""
    import torch.distributed as dist

    x = torch.tensor(vals + [-v for v in vals], dtype=torch.float64, device=device)
    dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    k = len(vals)
    return x[:k].tolist(), (-x[k:]).tolist()


def _check_group_consistency(group, n: int, mask: Optional[Tensor], device: torch.device,
                             args: dict[str, float]) -> None:
    """One small all-reduce (MAX of 14 values and their negatives: 224 bytes) checks that every rank passed the
    same rows, mask and arguments and that none rejected its own (:func:`signal_local_error`); raises
    ``ValueError`` naming the first thing that differs."""
    names, vals = _consistency_values(n, mask, args)
    hi, lo = _group_max(group, [0.0] + vals, device)
    if hi[0] != 0.0:
        raise ValueError("kl_div(process_group=...): another rank of the group rejected its arguments (its own error "
                         "says why); every rank must pass valid, matching arguments")
    for name, a, b, own in zip(names, hi[1:], lo[1:], vals):
        if a != b:
            raise ValueError(f"kl_div(process_group=...): {name} differs across the ranks of the group (this rank "
                             f"has {own:g}, the group ranges over [{b:g}, {a:g}]); every rank must pass the same "
                             "rows and arguments, each with its own slice of the vocabulary")


def signal_local_error(group, student_logits: object) -> None:
    """A rank whose own arguments are invalid still joins the consistency all-reduce, with its error flag set,
    so the other ranks raise too instead of waiting for the process-group timeout."""
    device = student_logits.device if isinstance(student_logits, Tensor) else torch.device("cpu")
    _group_max(group, [1.0] + [0.0] * (3 + len(_CONSISTENCY_ARGS)), device)


def check_process_group(group) -> None:
    """Raise unless ``group`` is a ``torch.distributed.ProcessGroup`` of an initialised default group."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group was given but torch.distributed is not initialised "
                         "(call torch.distributed.init_process_group first)")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup (e.g. dist.group.WORLD or "
                        f"dist.new_group(...)), got {type(group).__name__}")


def _kl_div_vocab_parallel(student: Tensor, teacher: Tensor, weight: Tensor, mode: str, temperature: float,
                           beta: float, scale: float, backend: str, need_grad: bool, group) -> Tensor:
    """Per-token loss ``[N]`` of vocab-parallel :func:`kl_div` (every rank gets the same values; the gradient
    reaches each rank's own slice of ``student``)."""
    m = MODES[mode]
    if m == MODES["jsd"]:
        end = _jsd_end(beta)
        m = MODES[end] if end is not None else m
    s_const = student.detach()
    stats = torch.ops.minitron.kl_div_stats(s_const, teacher, weight, m, temperature, backend)
    stats = _combine_stats(stats, m, group)
    sums = None
    if m == MODES["jsd"]:
        import torch.distributed as dist

        sums = torch.ops.minitron.kl_div_jsd_sums(s_const, teacher, weight, stats, temperature, beta, backend)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    loss, _ = torch.ops.minitron.kl_div_vp_fwd(student, teacher, weight, stats, sums, m, temperature, beta, scale,
                                               backend, need_grad)
    return loss



def vocab_parallel_token_loss(student: Tensor, teacher: Tensor, weight: Tensor, mask: Optional[Tensor], *, mode: str,
                              temperature: float, beta: float, scale: float, reduction: str, scale_by_t2: bool,
                              dtype: torch.dtype, backend: str, need_grad: bool, group,
                              transforms: dict[str, Optional[float]]) -> Tensor:
    """Per-token loss ``[N]`` fp32 of vocab-parallel :func:`minitron.ops.kl.kl_div` from the rank's rows
    ``student``/``teacher`` ``[N, V_local]`` (already transformed) and per-token ``weight`` ``[N]`` fp32: first the
    cross-rank check that every rank passed the same rows, ``mask`` and arguments (``reduction``,
    ``scale_by_t2``, the input ``dtype`` and the logit ``transforms`` enter only that check), then the exchange."""
    _check_group_consistency(
        group, student.shape[0], mask, student.device,
        {"mode": MODES[mode], "temperature": temperature, "beta": beta, "reduction": _REDUCTION_CODES[reduction],
         "scale_by_t2": float(scale_by_t2), "dtype": _DTYPE_CODES[dtype],
         "student_logit_scale": transforms["student_logit_scale"],
         "teacher_logit_scale": transforms["teacher_logit_scale"],
         "student_softcap": -1.0 if transforms["student_softcap"] is None else transforms["student_softcap"],
         "teacher_softcap": -1.0 if transforms["teacher_softcap"] is None else transforms["teacher_softcap"]})
    return _kl_div_vocab_parallel(student, teacher, weight, mode, temperature, beta, scale, backend, need_grad, group)
