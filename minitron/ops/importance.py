"""Fused activation-magnitude importance reduction and block influence (Minitron calibration).

Importance of width units (Muralidharan et al., 2024, "Compact Language Models via Pruning and Knowledge
Distillation", NeurIPS 2024, arXiv:2407.14679, Sec. 2.2): a unit -- an embedding channel, an MLP neuron, or
an attention head -- is scored by the magnitude of its activations over a calibration set, aggregated
first over the sequence of each sample, then over the samples. Sec. 4.2 ("Best Aggregation Metric", Best
Practice #2) compares mean, L2 norm and variance on both axes in Table 13 (zero-shot LM loss and
WikiText2 perplexity of Nemotron-4 15B pruned to the Nemotron-3 8B shape): (batch=L2, seq=mean) and
(mean, mean) do best, (L2, L2) poorly, and the paper uses (batch=L2, seq=mean) -- the defaults here.

Definitions, for ``x`` ``[batch, seq, units * group_size]`` and a boolean ``mask`` ``[batch, seq]``::

    m[b, s, u] = |x[b, s, u]|                                    group_size == 1 (channels, neurons)
               = sqrt(sum_g x[b, s, u*G + g]^2)                  group_size == G > 1 (heads: G = head_dim)
    v[b, u]    = SEQ_AGG  over the counted tokens s of sample b of m[b, s, u]
    I[u]       = BATCH_AGG over the counted samples b (across every update) of v[b, u]

with ``AGG`` one of ``"mean"``, ``"l2"`` (square root of the sum of squares), ``"sum"``, ``"max"`` and
``"var"`` (*population* variance: divided by the number of counted items, not that number minus one).
Masked tokens do not count; a sample with no counted token does not count at all (it changes neither
the state nor :attr:`ImportanceAccumulator.num_samples`). Before any counted sample the importance is 0.
NaN magnitudes propagate (also through ``max``).

Non-finite activations (NaN, +inf, -inf) are *counted and reported*, never silently folded in: every
backend counts, in the same fused pass (no extra pass over ``x``, no host synchronisation), the non-finite
values of ``x`` at counted positions (masked tokens never count, whatever they hold) into the state
(:attr:`ImportanceAccumulator.num_nonfinite`; for :class:`BlockInfluence` per block, values of ``h_in``
and ``h_out`` together). :meth:`ImportanceAccumulator.value` and :meth:`BlockInfluence.value` then raise
:class:`NonFiniteActivationError` naming the argument and how many values were non-finite (the affected
scores would be NaN/inf and any ranking built on them meaningless); ``value(allow_nonfinite=True)``
returns the raw scores anyway. The counter is merged, all-reduced, saved and restored with the state.

Everything happens in one pass over ``x`` (magnitude, masking, sequence aggregation, batch aggregation)
and is accumulated into fp32 state that persists across calibration batches; the state is mergeable
(:meth:`ImportanceAccumulator.merge`, :meth:`ImportanceAccumulator.all_reduce`) and resumable
(``state_dict``). The per-unit math is shared by the C++ and CUDA kernels
(``csrc/common/importance_math.h``) and mirrored by the Triton kernels.

Block influence (depth pruning, "Block Importance" in the same paper, after ShortGPT): per transformer
block, the mean over all counted calibration tokens of ``1 - cos(h_in, h_out)`` between the block's input
and output hidden states. Zero vectors: both zero -> 0 (the block left the token unchanged); exactly one
zero -> 1 (cos taken as 0). ``cos`` is clamped to [-1, 1], so each term lies in [0, 2].
"""
from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from minitron.ops._dispatch import BACKENDS, native_unavailable, op_backends, triton_unavailable

__all__ = [
    "AGGREGATIONS",
    "NonFiniteActivationError",
    "ImportanceAccumulator",
    "BlockInfluence",
    "importance_reference",
    "block_influence_reference",
    "importance_update",
    "block_influence_update",
]

log = logging.getLogger(__name__)

#: Aggregation names and the codes the kernels use (``csrc/common/importance_math.h``: enum Agg).
AGGREGATIONS = {"mean": 0, "l2": 1, "sum": 2, "max": 3, "var": 4}
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_STATE_VERSION = 2  # 2: non-finite counters ("nonfinite"); version-1 state dicts load with zero counters


class NonFiniteActivationError(ValueError):
    """Activations folded into an accumulator held NaN/inf values at counted positions (see the module doc)."""


# ----------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_agg(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if value not in AGGREGATIONS:
        raise ValueError(f"{name} must be one of {list(AGGREGATIONS)}, got {value!r}")
    return value


def _check_backend(backend: object) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    return backend


def _check_activation(name: str, x: object, device: Optional[torch.device],
                      dtypes: tuple[torch.dtype, ...] = _DTYPES) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {x.dtype}")
    if x.dim() != 3:
        raise ValueError(f"{name} must be 3-D [batch, seq, channels], got shape {tuple(x.shape)}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} is on {x.device} but the accumulator state is on {device}")
    return x


def _check_mask(mask: object, batch: int, seq: int, device: torch.device) -> Optional[Tensor]:
    """``None`` or a bool ``[batch, seq]`` mask (integer masks such as HF attention masks: ``!= 0``)."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a bool torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        if mask.dtype.is_floating_point or mask.dtype.is_complex:
            raise TypeError(f"mask must have dtype torch.bool (or an integer dtype), got {mask.dtype}")
        mask = mask != 0
    if tuple(mask.shape) != (batch, seq):
        raise ValueError(f"mask must have shape [batch, seq] = {[batch, seq]}, got {list(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but the activations are on {device}")
    return mask


def _device(device: object) -> torch.device:
    if device is None:
        return torch.device("cpu")
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str, torch.device or None, got {type(device).__name__}")
    return torch.device(device)


# ----------------------------------------------------------------------------------------------
# plain-torch references (test oracles, float64)
# ----------------------------------------------------------------------------------------------


def _magnitude(x: Tensor, group_size: int, dtype: torch.dtype) -> Tensor:
    """``[B, S, U*G] -> [B, S, U]`` magnitudes in ``dtype``."""
    b, s, c = x.shape
    if group_size == 1:
        return x.to(dtype).abs()
    return x.to(dtype).reshape(b, s, c // group_size, group_size).square().sum(-1).sqrt()


def _seq_aggregate(m: Tensor, w: Optional[Tensor], agg: str) -> tuple[Tensor, Tensor]:
    """Per-sample sequence aggregate ``[B, U]`` of magnitudes ``m`` ``[B, S, U]`` over counted tokens.

    Returns ``(values, counts)`` with ``counts`` ``[B]`` the counted tokens per sample (values of
    samples with count 0 are meaningless).
    """
    b, s, _ = m.shape
    if w is None:
        w = torch.ones(b, s, dtype=torch.bool, device=m.device)
    w3 = w.unsqueeze(-1)
    counts = w.sum(1)
    n = counts.clamp(min=1).to(m.dtype).unsqueeze(-1)
    zero = torch.zeros((), dtype=m.dtype, device=m.device)
    mz = torch.where(w3, m, zero)
    if agg == "mean":
        v = mz.sum(1) / n
    elif agg == "sum":
        v = mz.sum(1)
    elif agg == "l2":
        v = mz.square().sum(1).sqrt()
    elif agg == "max":
        v = mz.amax(1) if s > 0 else mz.sum(1)
    else:  # var, two-pass
        mu = mz.sum(1, keepdim=True) / n.unsqueeze(1)
        v = torch.where(w3, (m - mu).square(), zero).sum(1) / n
    return v, counts


def importance_reference(xs: Sequence[Tensor] | Tensor, masks: Optional[Sequence[Optional[Tensor]]] = None,
                         group_size: int = 1, seq_agg: str = "mean", batch_agg: str = "l2") -> Tensor:
    """Importance of every unit over a list of calibration batches, from scratch in float64.

    Args:
        xs: list of activations ``[batch_i, seq_i, units * group_size]`` (any float dtype), or one tensor.
        masks: ``None`` or a list (same length) of ``None`` / bool ``[batch_i, seq_i]`` masks.
        group_size, seq_agg, batch_agg: as in :class:`ImportanceAccumulator`.

    Returns:
        fp32 ``[units]`` on the device of ``xs[0]``; 0 for every unit when no sample counts.
    """
    if isinstance(xs, Tensor):
        xs = [xs]
        if masks is not None and (isinstance(masks, Tensor)):
            masks = [masks]
    if len(xs) == 0:
        raise ValueError("xs must hold at least one tensor")
    _check_int("group_size", group_size, 1)
    _check_agg("seq_agg", seq_agg)
    _check_agg("batch_agg", batch_agg)
    if masks is None:
        masks = [None] * len(xs)
    if len(masks) != len(xs):
        raise ValueError(f"masks must have one entry per tensor in xs ({len(xs)}), got {len(masks)}")
    channels = xs[0].shape[-1]
    if channels % group_size:
        raise ValueError(f"the channel count {channels} is not a multiple of group_size={group_size}")
    units = channels // group_size
    vals = []
    for x, mk in zip(xs, masks):
        if x.dim() != 3 or x.shape[-1] != channels:
            raise ValueError(f"every x must be [batch, seq, {channels}], got {tuple(x.shape)}")
        mk = _check_mask(mk, x.shape[0], x.shape[1], x.device)
        v, counts = _seq_aggregate(_magnitude(x, group_size, torch.float64), mk, seq_agg)
        vals.append(v[counts > 0])
    v = torch.cat(vals)
    if v.shape[0] == 0:
        return torch.zeros(units, dtype=torch.float32, device=xs[0].device)
    if batch_agg == "mean":
        out = v.mean(0)
    elif batch_agg == "sum":
        out = v.sum(0)
    elif batch_agg == "l2":
        out = v.square().sum(0).sqrt()
    elif batch_agg == "max":
        out = v.amax(0)
    else:
        out = v.var(0, unbiased=False)
    return out.to(torch.float32)


def _one_minus_cos(a: Tensor, b: Tensor) -> Tensor:
    """``1 - cos`` along the last axis with the zero-vector convention of the module docstring."""
    dot = (a * b).sum(-1)
    na = a.square().sum(-1)
    nb = b.square().sum(-1)
    cos = (dot / (na.sqrt() * nb.sqrt())).clamp(-1.0, 1.0)
    out = 1.0 - cos
    out = torch.where((na == 0) & (nb == 0), torch.zeros_like(out), out)
    out = torch.where((na == 0) ^ (nb == 0), torch.ones_like(out), out)
    return out


def block_influence_reference(h_ins: Sequence[Tensor] | Tensor, h_outs: Sequence[Tensor] | Tensor,
                              masks: Optional[Sequence[Optional[Tensor]]] = None) -> Tensor:
    """Block influence of one block over a list of batches, from scratch in float64.

    Args:
        h_ins, h_outs: lists of ``[batch_i, seq_i, hidden]`` block inputs and outputs (or one tensor each).
        masks: ``None`` or a list of ``None`` / bool ``[batch_i, seq_i]`` masks.

    Returns:
        fp32 scalar on the inputs' device: mean over the counted tokens of ``1 - cos(h_in, h_out)``; NaN when
        no token counts.
    """
    if isinstance(h_ins, Tensor):
        h_ins, h_outs = [h_ins], [h_outs]  # type: ignore[list-item]
        if isinstance(masks, Tensor):
            masks = [masks]
    if len(h_ins) != len(h_outs):
        raise ValueError("h_ins and h_outs must have the same length")
    if masks is None:
        masks = [None] * len(h_ins)
    device = h_ins[0].device if len(h_ins) else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for a, b, mk in zip(h_ins, h_outs, masks):
        if a.shape != b.shape or a.dim() != 3:
            raise ValueError(f"h_in and h_out must be the same [batch, seq, hidden] shape, got {tuple(a.shape)} "
                             f"and {tuple(b.shape)}")
        mk = _check_mask(mk, a.shape[0], a.shape[1], a.device)
        d = _one_minus_cos(a.to(torch.float64), b.to(torch.float64))
        if mk is not None:
            d = d[mk]
        total += d.sum()
        count += d.numel()
    if count == 0:
        return torch.tensor(float("nan"), dtype=torch.float32, device=device)
    return (total / count).to(torch.float32)


# ----------------------------------------------------------------------------------------------
# importance_update: backends
# ----------------------------------------------------------------------------------------------

_imp_backends = op_backends("importance_update")


@_imp_backends.register("cpp", ("cpu",), unavailable=lambda d: native_unavailable("_importance_update_native", d))
def _imp_cpp(state: Tensor, count: Tensor, x: Tensor, mask: Optional[Tensor], group_size: int, seq_agg: int,
             batch_agg: int) -> None:
    torch.ops.minitron._importance_update_native(state, count, x, mask, group_size, seq_agg, batch_agg)


@_imp_backends.register("cuda", ("cuda",), unavailable=lambda d: native_unavailable("_importance_update_native", d))
def _imp_cuda(state: Tensor, count: Tensor, x: Tensor, mask: Optional[Tensor], group_size: int, seq_agg: int,
              batch_agg: int) -> None:
    torch.ops.minitron._importance_update_native(state, count, x, mask, group_size, seq_agg, batch_agg)


@_imp_backends.register("triton", ("cuda", "cpu"), unavailable=triton_unavailable)
def _imp_triton(state: Tensor, count: Tensor, x: Tensor, mask: Optional[Tensor], group_size: int, seq_agg: int,
                batch_agg: int) -> None:
    from minitron.kernels.importance import importance_update as triton_importance_update

    triton_importance_update(state, count, x, mask, group_size, seq_agg, batch_agg)


def _count_nonfinite(x: Tensor, mask: Optional[Tensor]) -> Tensor:
    """int64 scalar: non-finite values of ``x`` ``[B, S, C]`` at the tokens ``mask`` ``[B, S]`` counts."""
    bad = ~torch.isfinite(x)
    if mask is not None:
        bad = bad & mask.unsqueeze(-1)
    return bad.sum(dtype=torch.int64)


@_imp_backends.register("reference", ("cpu", "cuda"))
def _imp_reference(state: Tensor, count: Tensor, x: Tensor, mask: Optional[Tensor], group_size: int, seq_agg: int,
                   batch_agg: int) -> None:
    names = {v: k for k, v in AGGREGATIONS.items()}
    count[1] += _count_nonfinite(x, mask)
    v, counts = _seq_aggregate(_magnitude(x, group_size, torch.float32), mask, names[seq_agg])
    v = v[counts > 0]
    nb = v.shape[0]
    if nb == 0:
        return
    agg = names[batch_agg]
    a = state[0]
    if agg in ("mean", "sum"):
        a.add_(v.sum(0))
    elif agg == "l2":
        a.add_(v.square().sum(0))
    elif agg == "max":
        a.copy_(torch.maximum(a, v.amax(0)))
    else:  # Chan et al. merge of (n0, mean, M2) with this batch's statistics
        n0 = count[0].to(torch.float64)
        n1 = float(nb)
        mean1 = v.to(torch.float64).mean(0)
        m2_1 = (v.to(torch.float64) - mean1).square().sum(0)
        mean0 = state[0].to(torch.float64)
        m2_0 = state[1].to(torch.float64)
        n = n0 + n1
        delta = mean1 - mean0
        state[0].copy_(mean0 + delta * (n1 / n))
        state[1].copy_(m2_0 + m2_1 + delta.square() * (n0 * n1 / n))
    count[0] += nb


# ----------------------------------------------------------------------------------------------
# importance_update: the custom op
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("minitron::importance_update", mutates_args=("state", "count"))
def importance_update(state: Tensor, count: Tensor, x: Tensor, mask: Optional[Tensor], group_size: int,
                      seq_agg: str, batch_agg: str, backend: str) -> None:
    """Fold one calibration batch into the importance state, in place.

    Args:
        state: fp32 ``[2, units]`` contiguous (rows A, B; see ``csrc/common/importance_math.h``).
        count: int64 ``[2]`` contiguous: ``count[0]`` the counted samples so far, ``count[1]`` the
            non-finite values of ``x`` at counted positions so far (both incremented).
        x: ``[batch, seq, units * group_size]`` fp32/bf16/fp16, same device as ``state``.
        mask: ``None`` or bool ``[batch, seq]`` (True = the token counts).
        group_size: channels per unit (1: channels/neurons; head_dim: heads).
        seq_agg, batch_agg: names in :data:`AGGREGATIONS`.
        backend: ``"auto"``, ``"cpp"``, ``"cuda"``, ``"triton"`` or ``"reference"``.
    """
    impl = _imp_backends.select(backend, x.device, x.dtype)
    if x.numel() == 0:
        return
    impl.fn(state, count, x, mask, group_size, AGGREGATIONS[seq_agg], AGGREGATIONS[batch_agg])


@importance_update.register_fake
def _(state, count, x, mask, group_size, seq_agg, batch_agg, backend):
    return None


# ----------------------------------------------------------------------------------------------
# block_influence_update: backends and custom op
# ----------------------------------------------------------------------------------------------

_bi_backends = op_backends("block_influence_update")


@_bi_backends.register("cpp", ("cpu",), unavailable=lambda d: native_unavailable("_block_influence_update_native", d))
def _bi_cpp(state: Tensor, count: Tensor, h_in: Tensor, h_out: Tensor, mask: Optional[Tensor], layer: int) -> None:
    torch.ops.minitron._block_influence_update_native(state, count, h_in, h_out, mask, layer)


@_bi_backends.register("cuda", ("cuda",),
                       unavailable=lambda d: native_unavailable("_block_influence_update_native", d))
def _bi_cuda(state: Tensor, count: Tensor, h_in: Tensor, h_out: Tensor, mask: Optional[Tensor], layer: int) -> None:
    torch.ops.minitron._block_influence_update_native(state, count, h_in, h_out, mask, layer)


@_bi_backends.register("triton", ("cuda", "cpu"), unavailable=triton_unavailable)
def _bi_triton(state: Tensor, count: Tensor, h_in: Tensor, h_out: Tensor, mask: Optional[Tensor],
               layer: int) -> None:
    from minitron.kernels.importance import block_influence_update as triton_block_influence_update

    triton_block_influence_update(state, count, h_in, h_out, mask, layer)


@_bi_backends.register("reference", ("cpu", "cuda"))
def _bi_reference(state: Tensor, count: Tensor, h_in: Tensor, h_out: Tensor, mask: Optional[Tensor],
                  layer: int) -> None:
    d = _one_minus_cos(h_in.to(torch.float32), h_out.to(torch.float32))
    if mask is not None:
        d = d[mask]
    state[layer] += d.to(torch.float64).sum()
    count[0, layer] += d.numel()
    count[1, layer] += _count_nonfinite(h_in, mask) + _count_nonfinite(h_out, mask)


@torch.library.custom_op("minitron::block_influence_update", mutates_args=("state", "count"))
def block_influence_update(state: Tensor, count: Tensor, h_in: Tensor, h_out: Tensor, mask: Optional[Tensor],
                           layer_idx: int, backend: str) -> None:
    """Add ``sum(1 - cos(h_in, h_out))`` over counted tokens to ``state[layer_idx]``, in place.

    Args:
        state: float64 ``[num_layers]`` running sums; count: int64 ``[2, num_layers]`` contiguous:
            row 0 the counted tokens, row 1 the non-finite values of ``h_in`` and ``h_out`` at counted tokens.
        h_in, h_out: ``[batch, seq, hidden]`` fp32/bf16/fp16, same shape and dtype.
        mask: ``None`` or bool ``[batch, seq]``.
        layer_idx: the block's index in ``[0, num_layers)``.
        backend: ``"auto"``, ``"cpp"``, ``"cuda"``, ``"triton"`` or ``"reference"``.
    """
    impl = _bi_backends.select(backend, h_in.device, h_in.dtype)
    if h_in.numel() == 0:
        return
    impl.fn(state, count, h_in, h_out, mask, layer_idx)


@block_influence_update.register_fake
def _(state, count, h_in, h_out, mask, layer_idx, backend):
    return None


# ----------------------------------------------------------------------------------------------
# public accumulators
# ----------------------------------------------------------------------------------------------


class ImportanceAccumulator:
    """Streams activation-magnitude importance of ``num_units`` units over calibration batches.

    Args:
        num_units: number of units (channels, neurons or heads), >= 1.
        group_size: channels per unit; the magnitude of a unit is ``|x|`` for 1 and the L2 norm over its
            ``group_size`` consecutive channels otherwise (attention heads: ``group_size = head_dim``).
        seq_agg: aggregation over the counted tokens of a sample: ``"mean"`` (default), ``"l2"``,
            ``"sum"``, ``"max"`` or ``"var"`` (population variance).
        batch_agg: aggregation over the counted samples, same choices; default ``"l2"`` (the paper's best
            width recipe with ``seq_agg="mean"``).
        device: where the fp32 state lives (default CPU); activations must be on this device.
        backend: kernel choice for every update: ``"auto"`` (CPU -> C++, CUDA -> CUDA C++ or Triton), or
            ``"cpp"``, ``"cuda"``, ``"triton"``, ``"reference"``.

    State: fp32 ``[2, num_units]`` plus int64 ``count`` ``[2]``: the counted samples (exact; the fp32
    per-sample math treats it as fp32, exact up to 2**24 samples) and the non-finite activation values seen
    at counted positions (:attr:`num_nonfinite`). See the module docstring for the definitions.

    Example::

        acc = ImportanceAccumulator(num_heads, group_size=head_dim)
        for batch in calibration:
            acc.update(attn_out, mask=batch["attention_mask"])   # [B, S, num_heads * head_dim]
        scores = acc.value()                                      # fp32 [num_heads]
    """

    def __init__(self, num_units: int, *, group_size: int = 1, seq_agg: str = "mean", batch_agg: str = "l2",
                 device: torch.device | str | None = None, backend: str = "auto") -> None:
        self.num_units = _check_int("num_units", num_units, 1)
        self.group_size = _check_int("group_size", group_size, 1)
        self.seq_agg = _check_agg("seq_agg", seq_agg)
        self.batch_agg = _check_agg("batch_agg", batch_agg)
        self.backend = _check_backend(backend)
        self.state = torch.zeros(2, num_units, dtype=torch.float32, device=_device(device))
        self.device = self.state.device  # resolved ("cuda" -> "cuda:<current>")
        self.count = torch.zeros(2, dtype=torch.int64, device=self.device)  # [samples, non-finite values]

    def __repr__(self) -> str:
        return (f"ImportanceAccumulator(num_units={self.num_units}, group_size={self.group_size}, "
                f"seq_agg={self.seq_agg!r}, batch_agg={self.batch_agg!r}, device={str(self.device)!r})")

    # -- streaming ------------------------------------------------------------------------------

    def update(self, x: Tensor, mask: Optional[Tensor] = None) -> None:
        """Fold one batch of activations into the state.

        Args:
            x: ``[batch, seq, num_units * group_size]`` fp32/bf16/fp16 on :attr:`device` (any strides).
            mask: ``None`` (every token counts) or ``[batch, seq]`` bool (or integer, nonzero = counts).
        """
        _check_activation("x", x, self.device)
        channels = self.num_units * self.group_size
        if x.shape[2] != channels:
            raise ValueError(f"x must have num_units * group_size = {self.num_units} * {self.group_size} = "
                             f"{channels} channels in its last dimension, got shape {tuple(x.shape)}")
        mask = _check_mask(mask, x.shape[0], x.shape[1], x.device)
        torch.ops.minitron.importance_update(self.state, self.count, x.detach(), mask, self.group_size,
                                             self.seq_agg, self.batch_agg, self.backend)

    def value(self, allow_nonfinite: bool = False) -> Tensor:
        """The importance of every unit: fp32 ``[num_units]`` (zeros before any counted sample).

        Raises:
            NonFiniteActivationError: some update saw NaN/inf activations at counted positions (the
                message says how many) and ``allow_nonfinite`` is False; with True the scores are returned
                as they are (the affected units' scores are then NaN or inf).
        """
        if not allow_nonfinite:
            bad = self.num_nonfinite
            if bad:
                raise NonFiniteActivationError(
                    f"x held {bad} non-finite value(s) (NaN/+inf/-inf) at counted (unmasked) positions over the "
                    f"{self.num_samples} counted samples of this accumulator ({self!r}); the scores of the units "
                    "they belong to are NaN/inf and a ranking built on them is meaningless. Find the source (e.g. "
                    "fp16 overflow in the model), mask those tokens, or call value(allow_nonfinite=True) to get "
                    "the raw scores")
        a, b = self.state[0], self.state[1]
        n = self.count[0].to(torch.float32).clamp(min=1.0)
        if self.batch_agg == "mean":
            return a / n
        if self.batch_agg == "l2":
            return a.sqrt()
        if self.batch_agg == "var":
            return b / n
        return a.clone()

    @property
    def num_samples(self) -> int:
        """Number of samples counted so far (samples with at least one counted token)."""
        return int(self.count[0].item())

    @property
    def num_nonfinite(self) -> int:
        """Number of non-finite values (NaN, +inf, -inf) of ``x`` at counted positions seen so far."""
        return int(self.count[1].item())

    def reset(self) -> None:
        """Forget every update (state back to zero)."""
        self.state.zero_()
        self.count.zero_()

    # -- combining --------------------------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        return {"num_units": self.num_units, "group_size": self.group_size, "seq_agg": self.seq_agg,
                "batch_agg": self.batch_agg}

    def merge(self, other: "ImportanceAccumulator") -> "ImportanceAccumulator":
        """Fold ``other``'s samples into this accumulator (as if they had been updated here); returns self."""
        if not isinstance(other, ImportanceAccumulator):
            raise TypeError(f"other must be an ImportanceAccumulator, got {type(other).__name__}")
        if other._config() != self._config():
            raise ValueError(f"other has a different configuration: {other._config()} vs {self._config()}")
        o_state = other.state.to(self.device)
        o_count = other.count.to(self.device)
        if self.batch_agg in ("mean", "sum", "l2"):
            self.state[0].add_(o_state[0])
        elif self.batch_agg == "max":
            torch.maximum(self.state[0], o_state[0], out=self.state[0])
        else:
            na = self.count[0].to(torch.float64)
            nb = o_count[0].to(torch.float64)
            n = (na + nb).clamp(min=1.0)
            ma, mb = self.state[0].to(torch.float64), o_state[0].to(torch.float64)
            delta = mb - ma
            mean = ma + delta * (nb / n)
            m2 = self.state[1].to(torch.float64) + o_state[1].to(torch.float64) + delta.square() * (na * nb / n)
            self.state[0].copy_(mean)
            self.state[1].copy_(m2)
        self.count.add_(o_count)
        return self

    def all_reduce(self, group: Any = None) -> "ImportanceAccumulator":
        """Combine the states of every rank of ``group`` (torch.distributed) in place; returns self.

        Afterwards every rank holds the state one process would have after seeing all ranks' samples
        (up to fp32 rounding). Collective: every rank must call it, once per combination (calling it
        again would count the samples again). Sum-type aggregations use SUM, ``max`` uses MAX, ``var``
        combines (count, mean, M2) exactly with two SUM reductions.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("all_reduce needs an initialised torch.distributed process group")
        if self.batch_agg in ("mean", "sum", "l2"):
            dist.all_reduce(self.state, op=dist.ReduceOp.SUM, group=group)
            dist.all_reduce(self.count, op=dist.ReduceOp.SUM, group=group)
        elif self.batch_agg == "max":
            dist.all_reduce(self.state, op=dist.ReduceOp.MAX, group=group)
            dist.all_reduce(self.count, op=dist.ReduceOp.SUM, group=group)
        else:
            counts = self.count.to(torch.float64)  # [samples, non-finite]: exact in float64 below 2**53
            n = counts[:1]
            mean = self.state[0].to(torch.float64)
            buf = torch.cat([counts, n * mean])
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
            n_tot = buf[:1]
            g_mean = buf[2:] / n_tot.clamp(min=1.0)
            m2 = self.state[1].to(torch.float64) + n * (mean - g_mean).square()
            dist.all_reduce(m2, op=dist.ReduceOp.SUM, group=group)
            self.state[0].copy_(g_mean)
            self.state[1].copy_(m2)
            self.count.copy_(buf[:2].round().to(torch.int64))
        log.debug("importance state all-reduced: %d samples", self.num_samples)
        return self

    # -- checkpointing ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: the configuration, the fp32 state (CPU copy), the sample count and the
        non-finite count (``"nonfinite"``; absent from version-1 state dicts, which load with 0)."""
        counts = self.count.tolist()
        return {"version": _STATE_VERSION, **self._config(), "state": self.state.detach().cpu().clone(),
                "count": int(counts[0]), "nonfinite": int(counts[1])}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (configuration must match; the tensors are copied)."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        missing = {"state", "count", *self._config()} - set(state_dict)
        if missing:
            raise ValueError(f"state_dict is missing {sorted(missing)}")
        cfg = {k: state_dict[k] for k in self._config()}
        if cfg != self._config():
            raise ValueError(f"state_dict has a different configuration: {cfg} vs {self._config()}")
        st = state_dict["state"]
        if not isinstance(st, Tensor) or tuple(st.shape) != (2, self.num_units):
            raise ValueError(f"state_dict['state'] must be a [2, {self.num_units}] tensor")
        cnt = state_dict["count"]
        cnt = int(cnt.item()) if isinstance(cnt, Tensor) else cnt
        _check_int("state_dict['count']", cnt, 0)
        bad = state_dict.get("nonfinite", 0)
        bad = int(bad.item()) if isinstance(bad, Tensor) else bad
        _check_int("state_dict['nonfinite']", bad, 0)
        self.state.copy_(st.to(torch.float32))
        self.count.copy_(torch.tensor([cnt, bad], dtype=torch.int64))


class BlockInfluence:
    """Streams the block influence ``mean(1 - cos(h_in, h_out))`` of ``num_layers`` blocks.

    Args:
        num_layers: number of blocks, >= 1.
        device: where the state lives (default CPU); hidden states must be on this device.
        backend: as in :class:`ImportanceAccumulator`.

    State: float64 ``[num_layers]`` sums of ``1 - cos`` and int64 ``count`` ``[2, num_layers]``: the counted
    tokens (row 0) and the non-finite values of ``h_in``/``h_out`` at counted tokens (row 1) of each block.
    """

    def __init__(self, num_layers: int, *, device: torch.device | str | None = None, backend: str = "auto") -> None:
        self.num_layers = _check_int("num_layers", num_layers, 1)
        self.backend = _check_backend(backend)
        self.state = torch.zeros(num_layers, dtype=torch.float64, device=_device(device))
        self.device = self.state.device
        self.count = torch.zeros(2, num_layers, dtype=torch.int64, device=self.device)  # [tokens; non-finite]

    def __repr__(self) -> str:
        return f"BlockInfluence(num_layers={self.num_layers}, device={str(self.device)!r})"

    def update(self, layer_idx: int, h_in: Tensor, h_out: Tensor, mask: Optional[Tensor] = None) -> None:
        """Fold one batch of a block's input and output hidden states into its running mean.

        Args:
            layer_idx: the block, in ``[0, num_layers)``.
            h_in, h_out: ``[batch, seq, hidden]`` fp32/bf16/fp16, same shape and dtype, on :attr:`device`.
            mask: ``None`` or ``[batch, seq]`` bool (or integer, nonzero = counts).
        """
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int):
            raise TypeError(f"layer_idx must be an int, got {type(layer_idx).__name__}")
        if not 0 <= layer_idx < self.num_layers:
            raise ValueError(f"layer_idx must be in [0, {self.num_layers}), got {layer_idx}")
        _check_activation("h_in", h_in, self.device)
        _check_activation("h_out", h_out, self.device)
        if h_in.shape != h_out.shape:
            raise ValueError(f"h_in and h_out must have the same shape, got {tuple(h_in.shape)} and "
                             f"{tuple(h_out.shape)}")
        if h_in.dtype != h_out.dtype:
            raise TypeError(f"h_in and h_out must have the same dtype, got {h_in.dtype} and {h_out.dtype}")
        mask = _check_mask(mask, h_in.shape[0], h_in.shape[1], h_in.device)
        torch.ops.minitron.block_influence_update(self.state, self.count, h_in.detach(), h_out.detach(), mask,
                                                  layer_idx, self.backend)

    def value(self, allow_nonfinite: bool = False) -> Tensor:
        """fp32 ``[num_layers]``: mean ``1 - cos`` per block; NaN for blocks with no counted token yet.

        Raises:
            NonFiniteActivationError: some block's ``h_in``/``h_out`` held NaN/inf values at counted tokens
                (the message names the blocks and counts) and ``allow_nonfinite`` is False; with True the
                values are returned as they are (NaN for the affected blocks).
        """
        if not allow_nonfinite:
            bad = self.num_nonfinite
            if bool((bad > 0).any()):
                which = {i: int(n) for i, n in enumerate(bad.tolist()) if n}
                raise NonFiniteActivationError(
                    f"h_in/h_out held non-finite values (NaN/+inf/-inf) at counted (unmasked) tokens of "
                    f"{len(which)} block(s) ({{block: values}} = {which}); their influence is NaN. Find the source "
                    "(e.g. fp16 overflow), mask those tokens, or call value(allow_nonfinite=True)")
        tokens = self.count[0]
        out = self.state / tokens.to(torch.float64)
        return torch.where(tokens > 0, out, torch.full_like(out, float("nan"))).to(torch.float32)

    @property
    def num_tokens(self) -> Tensor:
        """int64 ``[num_layers]`` (CPU copy): counted tokens per block."""
        return self.count[0].detach().cpu().clone()

    @property
    def num_nonfinite(self) -> Tensor:
        """int64 ``[num_layers]`` (CPU copy): non-finite values of ``h_in`` and ``h_out`` at counted tokens."""
        return self.count[1].detach().cpu().clone()

    def reset(self) -> None:
        """Forget every update."""
        self.state.zero_()
        self.count.zero_()

    def merge(self, other: "BlockInfluence") -> "BlockInfluence":
        """Fold ``other``'s tokens into this accumulator; returns self."""
        if not isinstance(other, BlockInfluence):
            raise TypeError(f"other must be a BlockInfluence, got {type(other).__name__}")
        if other.num_layers != self.num_layers:
            raise ValueError(f"other has num_layers={other.num_layers}, expected {self.num_layers}")
        self.state.add_(other.state.to(self.device))
        self.count.add_(other.count.to(self.device))
        return self

    def all_reduce(self, group: Any = None) -> "BlockInfluence":
        """SUM the states of every rank of ``group`` in place (collective, once per combination)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("all_reduce needs an initialised torch.distributed process group")
        dist.all_reduce(self.state, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(self.count, op=dist.ReduceOp.SUM, group=group)
        return self

    def state_dict(self) -> dict[str, Any]:
        """The configuration, the float64 sums, the int64 token counts and the int64 non-finite counts
        (``"nonfinite"``; absent from version-1 state dicts, which load with zeros), all CPU copies."""
        return {"version": _STATE_VERSION, "num_layers": self.num_layers, "state": self.state.detach().cpu().clone(),
                "count": self.num_tokens, "nonfinite": self.num_nonfinite}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (``num_layers`` must match)."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        missing = {"num_layers", "state", "count"} - set(state_dict)
        if missing:
            raise ValueError(f"state_dict is missing {sorted(missing)}")
        if state_dict["num_layers"] != self.num_layers:
            raise ValueError(f"state_dict has num_layers={state_dict['num_layers']}, expected {self.num_layers}")
        st, cnt = state_dict["state"], state_dict["count"]
        bad = state_dict.get("nonfinite", torch.zeros(self.num_layers, dtype=torch.int64))
        for name, t in (("state", st), ("count", cnt), ("nonfinite", bad)):
            if not isinstance(t, Tensor) or tuple(t.shape) != (self.num_layers,):
                raise ValueError(f"state_dict[{name!r}] must be a [{self.num_layers}] tensor")
        self.state.copy_(st.to(torch.float64))
        self.count[0].copy_(cnt.to(torch.int64))
        self.count[1].copy_(bad.to(torch.int64))
