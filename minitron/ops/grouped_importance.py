"""Grouped (segment) activation-importance reduction: per-expert neuron importance of mixture-of-experts layers.

A mixture-of-experts layer routes every token to ``k`` of its ``num_groups`` experts, so each expert sees a
ragged subset of the calibration tokens. This op generalises the dense reduction of
:mod:`minitron.ops.importance` (same magnitudes, same aggregations, same non-finite accounting) to groups whose
rows arrive as contiguous *segments*.

Definitions, for one update with routed rows ``x`` ``[N, units * group_size]``, router weights ``w`` ``[N]``
(1 when not given) and ``offsets`` ``[num_groups * num_samples + 1]``; segment ``j = g * num_samples + b``
holds rows ``offsets[j] <= r < offsets[j + 1]`` -- the tokens of sample ``b`` routed to group ``g``::

    m[r, u]    = |w[r] * x[r, u]|                                   group_size == 1
               = sqrt(sum_c (w[r] * x[r, u*G + c])^2)               group_size == G > 1
    v[j, u]    = SEQ_AGG  over the rows r of segment j of m[r, u]   (empty segment: does not count)
    I[g, u]    = BATCH_AGG over the counted segments j of group g (across every update) of v[j, u]

with the aggregations of the dense op (``"mean"``, ``"l2"``, ``"sum"``, ``"max"``, ``"var"``, population
variance). A group with no counted segment has importance 0. With ``num_groups == 1`` and one segment per
sample holding the sample's unmasked tokens this is exactly :class:`~minitron.ops.importance.ImportanceAccumulator`.

Per group the state also counts the counted segments (:attr:`GroupedImportanceAccumulator.num_samples`), the
routed rows (:attr:`GroupedImportanceAccumulator.num_rows`, the numerator of the routing frequency) and the
non-finite values of ``w[r] * x[r, c]`` (:attr:`GroupedImportanceAccumulator.num_nonfinite`;
:meth:`GroupedImportanceAccumulator.value` raises :class:`~minitron.ops.importance.NonFiniteActivationError`
when any is non-zero, unless ``allow_nonfinite=True``).

:func:`grouped_segments` turns the router's top-k ids ``[B, S, k]`` into the row order and offsets this op
expects. Backends: CPU C++ (``csrc/cpu/grouped_importance.cpp``), CUDA C++ (``csrc/cuda/grouped_importance.cu``),
Triton (``minitron/kernels/grouped_importance.py``) and the plain-torch ``reference``; the per-unit math is shared
with the dense op (``csrc/common/importance_math.h``).
"""
from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from minitron.ops._dispatch import native_unavailable, op_backends, triton_unavailable
from minitron.ops.importance import (AGGREGATIONS, NonFiniteActivationError, _check_agg, _check_backend, _check_int,
                                     _device, importance_reference)

__all__ = [
    "GroupedImportanceAccumulator",
    "grouped_importance_reference",
    "grouped_importance_update",
    "grouped_segments",
]

log = logging.getLogger(__name__)

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_STATE_VERSION = 1
_AGG_NAMES = {v: k for k, v in AGGREGATIONS.items()}


# ----------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------


def _check_rows(x: object, device: Optional[torch.device]) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must have dtype in (float32, bfloat16, float16), got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [rows, channels], got shape {tuple(x.shape)}")
    if device is not None and x.device != device:
        raise ValueError(f"x is on {x.device} but the accumulator state is on {device}")
    return x


def _check_offsets_meta(offsets: object, num_groups: int, device: torch.device) -> int:
    """Type/shape checks of ``offsets``; returns the number of samples per group."""
    if not isinstance(offsets, Tensor):
        raise TypeError(f"offsets must be an int64 torch.Tensor, got {type(offsets).__name__}")
    if offsets.dtype != torch.int64:
        raise TypeError(f"offsets must have dtype torch.int64, got {offsets.dtype}")
    if offsets.dim() != 1 or offsets.shape[0] < 1:
        raise ValueError(f"offsets must be 1-D with at least one entry, got shape {tuple(offsets.shape)}")
    segments = offsets.shape[0] - 1
    if segments % num_groups:
        raise ValueError(f"offsets must have num_groups * num_samples + 1 entries (num_groups={num_groups}), got "
                         f"{offsets.shape[0]}")
    if offsets.device != device:
        raise ValueError(f"offsets is on {offsets.device} but x is on {device}")
    return segments // num_groups


def _check_offsets_values(offsets: Tensor, rows: int) -> None:
    """``offsets[0] == 0``, non-decreasing, ``offsets[-1] == rows`` (one small host copy)."""
    o = offsets.detach().to("cpu")
    if int(o[0]) != 0:
        raise ValueError(f"offsets[0] must be 0, got {int(o[0])}")
    if int(o[-1]) != rows:
        raise ValueError(f"offsets[-1] must equal the number of rows of x ({rows}), got {int(o[-1])}")
    if o.shape[0] > 1:
        d = o.diff()
        if bool((d < 0).any()):
            j = int(torch.nonzero(d < 0)[0, 0])
            raise ValueError(f"offsets must be non-decreasing, but offsets[{j}]={int(o[j])} > "
                             f"offsets[{j + 1}]={int(o[j + 1])}")


def _check_weights(weights: object, rows: int, device: torch.device) -> Optional[Tensor]:
    if weights is None:
        return None
    if not isinstance(weights, Tensor):
        raise TypeError(f"weights must be a float torch.Tensor or None, got {type(weights).__name__}")
    if weights.dtype not in _DTYPES:
        raise TypeError(f"weights must have dtype in (float32, bfloat16, float16), got {weights.dtype}")
    if tuple(weights.shape) != (rows,):
        raise ValueError(f"weights must have shape [rows of x] = [{rows}], got {list(weights.shape)}")
    if weights.device != device:
        raise ValueError(f"weights is on {weights.device} but x is on {device}")
    return weights


# ----------------------------------------------------------------------------------------------
# segments from router ids
# ----------------------------------------------------------------------------------------------


def grouped_segments(topk_ids: Tensor, num_groups: int, mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Row order and segment offsets of routed tokens, for :meth:`GroupedImportanceAccumulator.update`.

    Args:
        topk_ids: integer ``[B, S, k]``: the experts each token is routed to (the router's top-k), each in
            ``[0, num_groups)``.
        num_groups: the number of experts.
        mask: ``None`` or bool (or integer, nonzero = counts) ``[B, S]``: False tokens (padding) are routed nowhere.

    Returns:
        ``(token_index, slot_index, offsets)``: int64 ``[N]`` row of the flattened ``[B*S]`` tokens, int64
        ``[N]`` index into the flattened ``[B*S*k]`` routing slots (to pick router weights), int64
        ``[num_groups*B + 1]`` offsets. Rows are sorted by (group, sample, position); segment
        ``g * B + b`` holds the tokens of sample ``b`` routed to group ``g``. So
        ``acc.update(h.reshape(B*S, -1)[token_index], offsets, weights.reshape(-1)[slot_index])``.
    """
    if not isinstance(topk_ids, Tensor):
        raise TypeError(f"topk_ids must be an integer torch.Tensor, got {type(topk_ids).__name__}")
    if topk_ids.dtype.is_floating_point or topk_ids.dtype.is_complex or topk_ids.dtype == torch.bool:
        raise TypeError(f"topk_ids must have an integer dtype, got {topk_ids.dtype}")
    if topk_ids.dim() != 3:
        raise ValueError(f"topk_ids must be 3-D [batch, seq, k], got shape {tuple(topk_ids.shape)}")
    _check_int("num_groups", num_groups, 1)
    b, s, k = topk_ids.shape
    device = topk_ids.device
    ids = topk_ids.reshape(-1).to(torch.int64)
    if ids.numel() and bool(((ids < 0) | (ids >= num_groups)).any()):
        bad = ids[(ids < 0) | (ids >= num_groups)][0]
        raise ValueError(f"topk_ids must lie in [0, num_groups={num_groups}), found {int(bad)}")
    slot = torch.arange(b * s * k, dtype=torch.int64, device=device)
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a bool torch.Tensor or None, got {type(mask).__name__}")
        if mask.dtype.is_floating_point or mask.dtype.is_complex:
            raise TypeError(f"mask must have dtype torch.bool (or an integer dtype), got {mask.dtype}")
        if tuple(mask.shape) != (b, s):
            raise ValueError(f"mask must have shape [batch, seq] = {[b, s]}, got {list(mask.shape)}")
        if mask.device != device:
            raise ValueError(f"mask is on {mask.device} but topk_ids is on {device}")
        keep = (mask != 0).reshape(-1).repeat_interleave(k)
        ids, slot = ids[keep], slot[keep]
    # unique keys: group-major, then slot (= token-major = sample, position, then the k slots of a token)
    order = torch.argsort(ids * max(b * s * k, 1) + slot)
    slot_index = slot[order]
    token_index = torch.div(slot_index, k, rounding_mode="floor")
    seg = ids[order] * b + torch.div(token_index, s, rounding_mode="floor") if s else ids[order]
    counts = torch.bincount(seg, minlength=num_groups * b)
    offsets = torch.zeros(num_groups * b + 1, dtype=torch.int64, device=device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return token_index, slot_index, offsets


# ----------------------------------------------------------------------------------------------
# the fp64 oracle
# ----------------------------------------------------------------------------------------------


def grouped_importance_reference(xs: Sequence[Tensor] | Tensor, offsets: Sequence[Tensor] | Tensor,
                                 weights: Optional[Sequence[Optional[Tensor]] | Tensor] = None, *, num_groups: int,
                                 group_size: int = 1, seq_agg: str = "mean", batch_agg: str = "l2",
                                 return_counts: bool = False) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """Grouped importance over a list of updates, from scratch in float64 (plain loops over groups and segments).

    Args:
        xs: routed rows ``[N_i, units * group_size]`` of each update (any float dtype), or one tensor.
        offsets: int64 ``[num_groups * num_samples_i + 1]`` per update (or one tensor), as in
            :meth:`GroupedImportanceAccumulator.update`.
        weights: ``None`` or per update ``None`` / ``[N_i]`` router weights (or one tensor).
        num_groups, group_size, seq_agg, batch_agg: as in :class:`GroupedImportanceAccumulator`.
        return_counts: also return int64 ``[num_groups]`` counted segments and routed rows.

    Returns:
        fp32 ``[num_groups, units]`` (0 for groups with no counted segment); with ``return_counts`` the tuple
        ``(importance, num_samples, num_rows)``.
    """
    if isinstance(xs, Tensor):
        xs = [xs]
    if isinstance(offsets, Tensor):
        offsets = [offsets]
    if weights is None or isinstance(weights, Tensor):
        weights = [weights] * len(xs)
    if not (len(xs) == len(offsets) == len(weights)) or len(xs) == 0:
        raise ValueError(f"xs, offsets and weights must be non-empty lists of one length, got {len(xs)}, "
                         f"{len(offsets)}, {len(weights)}")
    _check_int("num_groups", num_groups, 1)
    _check_int("group_size", group_size, 1)
    _check_agg("seq_agg", seq_agg)
    _check_agg("batch_agg", batch_agg)
    channels = xs[0].shape[-1]
    if channels % group_size:
        raise ValueError(f"the channel count {channels} is not a multiple of group_size={group_size}")
    per_group: list[list[Tensor]] = [[] for _ in range(num_groups)]
    rows = torch.zeros(num_groups, dtype=torch.int64)
    for x, off, w in zip(xs, offsets, weights):
        nb = _check_offsets_meta(off, num_groups, off.device)
        _check_offsets_values(off, x.shape[0])
        xw = x.to(torch.float64)
        if w is not None:
            xw = xw * w.to(torch.float64).unsqueeze(-1)
        o = off.tolist()
        for g in range(num_groups):
            for b in range(nb):
                j = g * nb + b
                seg = xw[o[j]:o[j + 1]]
                rows[g] += seg.shape[0]
                if seg.shape[0]:
                    per_group[g].append(seg.unsqueeze(0))
    units = channels // group_size
    out = torch.zeros(num_groups, units, dtype=torch.float32, device=xs[0].device)
    samples = torch.tensor([len(p) for p in per_group], dtype=torch.int64)
    for g in range(num_groups):
        if per_group[g]:
            out[g] = importance_reference(per_group[g], None, group_size, seq_agg, batch_agg)
    if return_counts:
        return out, samples, rows
    return out


# ----------------------------------------------------------------------------------------------
# grouped_importance_update: backends
# ----------------------------------------------------------------------------------------------

_gi_backends = op_backends("grouped_importance_update")


@_gi_backends.register("cpp", ("cpu",),
                       unavailable=lambda d: native_unavailable("_grouped_importance_update_native", d))
def _gi_cpp(state: Tensor, count: Tensor, x: Tensor, offsets: Tensor, weights: Optional[Tensor], group_size: int,
            seq_agg: int, batch_agg: int) -> None:
    torch.ops.minitron._grouped_importance_update_native(state, count, x, offsets, weights, group_size, seq_agg,
                                                         batch_agg)


@_gi_backends.register("cuda", ("cuda",),
                       unavailable=lambda d: native_unavailable("_grouped_importance_update_native", d))
def _gi_cuda(state: Tensor, count: Tensor, x: Tensor, offsets: Tensor, weights: Optional[Tensor], group_size: int,
             seq_agg: int, batch_agg: int) -> None:
    torch.ops.minitron._grouped_importance_update_native(state, count, x, offsets, weights, group_size, seq_agg,
                                                         batch_agg)


@_gi_backends.register("triton", ("cuda", "cpu"), unavailable=triton_unavailable)
def _gi_triton(state: Tensor, count: Tensor, x: Tensor, offsets: Tensor, weights: Optional[Tensor],
               group_size: int, seq_agg: int, batch_agg: int) -> None:
    from minitron.kernels.grouped_importance import grouped_importance_update as triton_grouped_importance_update

    triton_grouped_importance_update(state, count, x, offsets, weights, group_size, seq_agg, batch_agg)


def _segment_seq_aggregate(m: Tensor, offsets: Tensor, agg: str) -> tuple[Tensor, Tensor]:
    """Per-segment sequence aggregate ``[J, U]`` of row magnitudes ``m`` ``[N, U]``; returns (values, lengths)."""
    lengths = offsets.diff()
    j = lengths.shape[0]
    u = m.shape[1]
    seg = torch.repeat_interleave(torch.arange(j, device=m.device), lengths)
    n = lengths.clamp(min=1).to(m.dtype).unsqueeze(-1)
    zeros = torch.zeros(j, u, dtype=m.dtype, device=m.device)
    if agg in ("mean", "sum", "var"):
        v = zeros.index_add(0, seg, m)
        if agg == "mean":
            v = v / n
        elif agg == "var":  # two-pass
            mu = v / n
            v = zeros.index_add(0, seg, (m - mu[seg]).square()) / n
    elif agg == "l2":
        v = zeros.index_add(0, seg, m.square()).sqrt()
    else:
        v = zeros.scatter_reduce(0, seg.unsqueeze(-1).expand(-1, u), m, "amax", include_self=False)
    return v, lengths


@_gi_backends.register("reference", ("cpu", "cuda"))
def _gi_reference(state: Tensor, count: Tensor, x: Tensor, offsets: Tensor, weights: Optional[Tensor],
                  group_size: int, seq_agg: int, batch_agg: int) -> None:
    g_count, units = state.shape[0], state.shape[2]
    nb = (offsets.shape[0] - 1) // g_count
    if nb == 0:
        return
    xf = x.to(torch.float32)
    if weights is not None:
        xf = xf * weights.to(torch.float32).unsqueeze(-1)
    lengths = offsets.diff()
    row_group = torch.repeat_interleave(torch.arange(g_count * nb, device=x.device) // nb, lengths)
    bad = (~torch.isfinite(xf)).sum(1, dtype=torch.int64)
    count[1].index_add_(0, row_group, bad)
    count[2].add_(lengths.view(g_count, nb).sum(1))
    m = xf.abs() if group_size == 1 else xf.reshape(-1, units, group_size).square().sum(-1).sqrt()
    v, lengths = _segment_seq_aggregate(m, offsets, _AGG_NAMES[seq_agg])
    v = v.view(g_count, nb, units)
    valid = (lengths.view(g_count, nb) > 0).unsqueeze(-1)
    n1 = valid.sum(1, dtype=torch.int64).squeeze(-1)  # [G]
    zero = torch.zeros((), dtype=v.dtype, device=v.device)
    agg = _AGG_NAMES[batch_agg]
    a = state[:, 0]
    if agg in ("mean", "sum"):
        a.add_(torch.where(valid, v, zero).sum(1))
    elif agg == "l2":
        a.add_(torch.where(valid, v.square(), zero).sum(1))
    elif agg == "max":
        a.copy_(torch.maximum(a, torch.where(valid, v, zero).amax(1)))
    else:  # Chan et al. merge of (n0, mean, M2) with this update's statistics, per group
        v64 = v.to(torch.float64)
        n1f = n1.to(torch.float64).unsqueeze(-1)
        mean1 = torch.where(valid, v64, 0.0).sum(1) / n1f.clamp(min=1.0)
        m2_1 = torch.where(valid, (v64 - mean1.unsqueeze(1)).square(), 0.0).sum(1)
        n0 = count[0].to(torch.float64).unsqueeze(-1)
        mean0 = state[:, 0].to(torch.float64)
        m2_0 = state[:, 1].to(torch.float64)
        n = (n0 + n1f).clamp(min=1.0)
        delta = mean1 - mean0
        has = (n1 > 0).unsqueeze(-1)
        state[:, 0].copy_(torch.where(has, mean0 + delta * (n1f / n), mean0))
        state[:, 1].copy_(torch.where(has, m2_0 + m2_1 + delta.square() * (n0 * n1f / n), m2_0))
    count[0].add_(n1)


# ----------------------------------------------------------------------------------------------
# grouped_importance_update: the custom op
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("minitron::grouped_importance_update", mutates_args=("state", "count"))
def grouped_importance_update(state: Tensor, count: Tensor, x: Tensor, offsets: Tensor, weights: Optional[Tensor],
                              group_size: int, seq_agg: str, batch_agg: str, backend: str) -> None:
    """Fold one update of routed rows into the grouped importance state, in place.

    Args:
        state: fp32 ``[num_groups, 2, units]`` contiguous (rows A, B per group; see ``csrc/common/importance_math.h``).
        count: int64 ``[3, num_groups]`` contiguous: counted segments, non-finite values of ``w * x``, routed rows.
        x: ``[N, units * group_size]`` fp32/bf16/fp16 (any strides), same device as ``state``.
        offsets: int64 ``[num_groups * num_samples + 1]``: ``offsets[0] == 0``, non-decreasing, ``offsets[-1] == N``.
        weights: ``None`` or ``[N]`` fp32/bf16/fp16 per-row factors (router weights).
        group_size: channels per unit.
        seq_agg, batch_agg: names in :data:`~minitron.ops.importance.AGGREGATIONS`.
        backend: ``"auto"``, ``"cpp"``, ``"cuda"``, ``"triton"`` or ``"reference"``.
    """
    impl = _gi_backends.select(backend, x.device, x.dtype)
    _check_offsets_values(offsets, x.shape[0])  # the op body runs eagerly, also under torch.compile
    if x.shape[0] == 0 or offsets.shape[0] == 1:
        return
    impl.fn(state, count, x, offsets, weights, group_size, AGGREGATIONS[seq_agg], AGGREGATIONS[batch_agg])


@grouped_importance_update.register_fake
def _(state, count, x, offsets, weights, group_size, seq_agg, batch_agg, backend):
    return None


# ----------------------------------------------------------------------------------------------
# public accumulator
# ----------------------------------------------------------------------------------------------


class GroupedImportanceAccumulator:
    """Streams per-group (per-expert) activation-magnitude importance of ``num_units`` units.

    Args:
        num_groups: number of groups (experts), >= 1.
        num_units: units per group (expert neurons, or heads with ``group_size``), >= 1.
        group_size, seq_agg, batch_agg, device, backend: as in
            :class:`~minitron.ops.importance.ImportanceAccumulator`.

    State: fp32 ``[num_groups, 2, num_units]`` and int64 ``count`` ``[3, num_groups]`` (counted segments,
    non-finite values, routed rows). See the module docstring for the definitions.

    Example::

        tok, slot, offsets = grouped_segments(topk_ids, num_experts, mask)      # topk_ids [B, S, k]
        acc = GroupedImportanceAccumulator(num_experts, moe_intermediate_size)
        acc.update(act.reshape(B * S, -1)[tok], offsets, router_w.reshape(-1)[slot])
        scores = acc.value()                                                     # fp32 [num_experts, I]
    """

    def __init__(self, num_groups: int, num_units: int, *, group_size: int = 1, seq_agg: str = "mean",
                 batch_agg: str = "l2", device: torch.device | str | None = None, backend: str = "auto") -> None:
        self.num_groups = _check_int("num_groups", num_groups, 1)
        self.num_units = _check_int("num_units", num_units, 1)
        self.group_size = _check_int("group_size", group_size, 1)
        self.seq_agg = _check_agg("seq_agg", seq_agg)
        self.batch_agg = _check_agg("batch_agg", batch_agg)
        self.backend = _check_backend(backend)
        self.state = torch.zeros(num_groups, 2, num_units, dtype=torch.float32, device=_device(device))
        self.device = self.state.device
        self.count = torch.zeros(3, num_groups, dtype=torch.int64, device=self.device)

    def __repr__(self) -> str:
        return (f"GroupedImportanceAccumulator(num_groups={self.num_groups}, num_units={self.num_units}, "
                f"group_size={self.group_size}, seq_agg={self.seq_agg!r}, batch_agg={self.batch_agg!r}, "
                f"device={str(self.device)!r})")

    # -- streaming ------------------------------------------------------------------------------

    def update(self, x: Tensor, offsets: Tensor, weights: Optional[Tensor] = None) -> None:
        """Fold one batch of routed rows into the state.

        Args:
            x: ``[N, num_units * group_size]`` fp32/bf16/fp16 on :attr:`device` (any strides).
            offsets: int64 ``[num_groups * num_samples + 1]``, ``offsets[0] == 0``, non-decreasing,
                ``offsets[-1] == N``; segment ``g * num_samples + b`` = rows of sample ``b`` routed to group ``g``.
            weights: ``None`` or ``[N]`` float: each row is multiplied by its weight before the magnitude.
        """
        _check_rows(x, self.device)
        channels = self.num_units * self.group_size
        if x.shape[1] != channels:
            raise ValueError(f"x must have num_units * group_size = {self.num_units} * {self.group_size} = "
                             f"{channels} channels in its last dimension, got shape {tuple(x.shape)}")
        _check_offsets_meta(offsets, self.num_groups, x.device)
        weights = _check_weights(weights, x.shape[0], x.device)
        if weights is not None:
            weights = weights.detach()
        torch.ops.minitron.grouped_importance_update(self.state, self.count, x.detach(), offsets, weights,
                                                     self.group_size, self.seq_agg, self.batch_agg, self.backend)

    def value(self, allow_nonfinite: bool = False) -> Tensor:
        """fp32 ``[num_groups, num_units]`` (0 for groups with no counted segment).

        Raises:
            NonFiniteActivationError: some update saw NaN/inf values of ``w * x`` and ``allow_nonfinite`` is False.
        """
        if not allow_nonfinite:
            bad = self.num_nonfinite
            if bool((bad > 0).any()):
                which = {g: int(n) for g, n in enumerate(bad.tolist()) if n}
                raise NonFiniteActivationError(
                    f"x (times weights) held non-finite values (NaN/+inf/-inf) in {len(which)} group(s) "
                    f"({{group: values}} = {which}) of {self!r}; those groups' scores are NaN/inf. Find the source "
                    "(e.g. fp16 overflow), or call value(allow_nonfinite=True) to get the raw scores")
        a, b = self.state[:, 0], self.state[:, 1]
        n = self.count[0].to(torch.float32).clamp(min=1.0).unsqueeze(-1)
        if self.batch_agg == "mean":
            return a / n
        if self.batch_agg == "l2":
            return a.sqrt()
        if self.batch_agg == "var":
            return b / n
        return a.clone()

    @property
    def num_samples(self) -> Tensor:
        """int64 ``[num_groups]`` (CPU copy): counted (non-empty) segments per group."""
        return self.count[0].detach().cpu().clone()

    @property
    def num_nonfinite(self) -> Tensor:
        """int64 ``[num_groups]`` (CPU copy): non-finite values of ``w * x`` seen per group."""
        return self.count[1].detach().cpu().clone()

    @property
    def num_rows(self) -> Tensor:
        """int64 ``[num_groups]`` (CPU copy): rows routed to each group (routing-frequency numerator)."""
        return self.count[2].detach().cpu().clone()

    def reset(self) -> None:
        """Forget every update."""
        self.state.zero_()
        self.count.zero_()

    # -- combining --------------------------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        return {"num_groups": self.num_groups, "num_units": self.num_units, "group_size": self.group_size,
                "seq_agg": self.seq_agg, "batch_agg": self.batch_agg}

    def merge(self, other: "GroupedImportanceAccumulator") -> "GroupedImportanceAccumulator":
        """Fold ``other``'s segments into this accumulator (as if updated here); returns self."""
        if not isinstance(other, GroupedImportanceAccumulator):
            raise TypeError(f"other must be a GroupedImportanceAccumulator, got {type(other).__name__}")
        if other._config() != self._config():
            raise ValueError(f"other has a different configuration: {other._config()} vs {self._config()}")
        o_state = other.state.to(self.device)
        o_count = other.count.to(self.device)
        if self.batch_agg in ("mean", "sum", "l2"):
            self.state[:, 0].add_(o_state[:, 0])
        elif self.batch_agg == "max":
            torch.maximum(self.state[:, 0], o_state[:, 0], out=self.state[:, 0])
        else:
            na = self.count[0].to(torch.float64).unsqueeze(-1)
            nb = o_count[0].to(torch.float64).unsqueeze(-1)
            n = (na + nb).clamp(min=1.0)
            ma, mb = self.state[:, 0].to(torch.float64), o_state[:, 0].to(torch.float64)
            delta = mb - ma
            mean = ma + delta * (nb / n)
            m2 = self.state[:, 1].to(torch.float64) + o_state[:, 1].to(torch.float64) + delta.square() * (na * nb / n)
            self.state[:, 0].copy_(mean)
            self.state[:, 1].copy_(m2)
        self.count.add_(o_count)
        return self

    def all_reduce(self, group: Any = None) -> "GroupedImportanceAccumulator":
        """Combine the states of every rank of ``group`` (torch.distributed) in place; returns self.

        Collective: every rank calls it once per combination. Sum-type aggregations use SUM, ``max`` MAX,
        ``var`` combines (count, mean, M2) per group exactly with two SUM reductions.
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
            g = self.num_groups
            counts = self.count.to(torch.float64).reshape(-1)  # [3G], exact below 2**53
            n = self.count[0].to(torch.float64).unsqueeze(-1)
            mean = self.state[:, 0].to(torch.float64)
            buf = torch.cat([counts, (n * mean).reshape(-1)])
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
            n_tot = buf[:g].unsqueeze(-1)
            g_mean = buf[3 * g:].view(g, self.num_units) / n_tot.clamp(min=1.0)
            m2 = self.state[:, 1].to(torch.float64) + n * (mean - g_mean).square()
            dist.all_reduce(m2, op=dist.ReduceOp.SUM, group=group)
            self.state[:, 0].copy_(g_mean)
            self.state[:, 1].copy_(m2)
            self.count.copy_(buf[:3 * g].round().to(torch.int64).view(3, g))
        log.debug("grouped importance state all-reduced: %s segments", self.count[0].tolist())
        return self

    # -- checkpointing ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The configuration, the fp32 state ``[num_groups, 2, num_units]`` and the int64 ``[num_groups]`` counters
        (``"count"`` segments, ``"nonfinite"``, ``"rows"``), all CPU copies."""
        return {"version": _STATE_VERSION, **self._config(), "state": self.state.detach().cpu().clone(),
                "count": self.num_samples, "nonfinite": self.num_nonfinite, "rows": self.num_rows}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (configuration must match; the tensors are copied)."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        missing = {"state", "count", "nonfinite", "rows", *self._config()} - set(state_dict)
        if missing:
            raise ValueError(f"state_dict is missing {sorted(missing)}")
        cfg = {k: state_dict[k] for k in self._config()}
        if cfg != self._config():
            raise ValueError(f"state_dict has a different configuration: {cfg} vs {self._config()}")
        st = state_dict["state"]
        if not isinstance(st, Tensor) or tuple(st.shape) != (self.num_groups, 2, self.num_units):
            raise ValueError(f"state_dict['state'] must be a [{self.num_groups}, 2, {self.num_units}] tensor")
        for i, name in enumerate(("count", "nonfinite", "rows")):
            t = state_dict[name]
            if not isinstance(t, Tensor) or tuple(t.shape) != (self.num_groups,):
                raise ValueError(f"state_dict[{name!r}] must be a [{self.num_groups}] tensor")
            if bool((t < 0).any()):
                raise ValueError(f"state_dict[{name!r}] must be >= 0")
        self.state.copy_(st.to(torch.float32))
        for i, name in enumerate(("count", "nonfinite", "rows")):
            self.count[i].copy_(state_dict[name].to(torch.int64))
