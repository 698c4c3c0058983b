"""Structured width and depth pruning of Hugging Face decoder-only models (Minitron).

Width (:func:`prune_width`): keep the most important embedding channels, MLP neurons, query heads and
key/value groups (scores from :func:`minitron.compress.importance.estimate_importance`), cutting every weight
consistently with :func:`minitron.ops.gather_slices`. Depth (:func:`prune_depth`): drop decoder layers
by LM-loss drop or block influence, singly or as one contiguous block.

Both prune **in place** and return the same model object (so peak memory stays near one copy of the
model plus one layer's cut weights). Every argument is validated before any weight is touched; a
refused target leaves the model unmodified. The result is a plain transformers model: its config holds
the new sizes (``head_dim`` written explicitly), ``save_pretrained`` output reloads with
``AutoModelForCausalLM.from_pretrained`` without minitron.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

from minitron.compress.importance import ImportanceScores, _check_layer_list
from minitron.models import get_adapter
from minitron.models.base import MOE_WIDTH_FIELDS, Dims, ModelAdapter, MoeAdapter, RowSpan

log = logging.getLogger(__name__)

__all__ = ["validate_width_targets", "prune_width", "prune_depth", "plan_width", "plan_depth", "WidthPlan",
           "DEPTH_METRICS", "Cut", "CutPlan", "width_cut_plan", "apply_cuts", "width_config_update",
           "depth_config_update", "layer_rename", "PRUNING_RECORD", "pruning_record", "update_pruning_record",
           "apply_width_transforms", "ExpertCut", "MOE_WIDTH_FIELDS", "MAMBA_WIDTH_FIELDS"]

DEPTH_METRICS = ("lm_loss", "block_influence")
_WIDTH_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
#: Width targets of hybrid Mamba models (:meth:`ModelAdapter.extra_width_sizes`; see :mod:`minitron.compress.mamba`).
MAMBA_WIDTH_FIELDS = ("mamba_num_heads", "mamba_head_dim")


# ---------------------------------------------------------------------------------------------- width targets
def _resolve_targets(config: Any, targets: dict[str, Any]) -> tuple[ModelAdapter, Dims, dict[str, int]]:
    """Validate width targets against ``config``; return the adapter, current dims and the new sizes."""
    config = getattr(config, "config", config)
    adapter = get_adapter(config)
    d = adapter.dims(config)
    current = {
        "hidden_size": d.hidden_size,
        "intermediate_size": d.intermediate_size,
        "num_attention_heads": d.num_attention_heads,
        "num_key_value_heads": d.num_key_value_heads,
    }
    moe = adapter.moe_dims(config)
    if moe is not None:
        current.update(num_experts=moe.num_experts, moe_intermediate_size=moe.moe_intermediate_size)
        if moe.shared_expert_intermediate_size is not None:
            current["shared_expert_intermediate_size"] = moe.shared_expert_intermediate_size
    current.update(adapter.extra_width_sizes(config))
    for name, value in targets.items():
        if value is None:
            continue
        if name in MAMBA_WIDTH_FIELDS and name not in current:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{name}={value!r} ({flag}): a {adapter.model_type} model has no Mamba layers to prune")
        if name in MOE_WIDTH_FIELDS and name not in current:
            what = "experts" if moe is None else "shared expert"
            raise ValueError(f"{name}={value!r}: a {adapter.model_type} model has no {what} to prune")
        if isinstance(value, (list, tuple)) and name in MOE_WIDTH_FIELDS:
            raise TypeError(f"{name} must be one int, got {value!r}: transformers' fused expert format holds one MLP "
                            "width for every expert of every layer (the same count of neurons is kept per expert)")
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int or None, got {type(value).__name__} {value!r}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
        if value > current[name]:
            raise ValueError(
                f"{name}={value} is larger than the model's {name}={current[name]}: pruning can only shrink"
            )
    new = {k: (current[k] if targets.get(k) is None else int(targets[k])) for k in current}
    if targets.get("num_key_value_heads") is None and d.num_key_value_heads == d.num_attention_heads:
        # multi-head attention (one query head per KV head): heads and KV heads are pruned together
        new["num_key_value_heads"] = new["num_attention_heads"]
    nh, nkv = new["num_attention_heads"], new["num_key_value_heads"]
    if nh % nkv != 0:
        raise ValueError(
            f"num_attention_heads={nh} is not a multiple of num_key_value_heads={nkv}: every KV group must "
            f"keep the same number of query heads"
        )
    if nh // nkv > d.heads_per_group:
        raise ValueError(
            f"num_attention_heads={nh} with num_key_value_heads={nkv} needs {nh // nkv} query heads per KV "
            f"group, but the model's groups have only {d.heads_per_group} "
            f"({d.num_attention_heads} heads / {d.num_key_value_heads} KV heads); with {nkv} kept groups "
            f"num_attention_heads must be a multiple of {nkv} and at most {nkv * d.heads_per_group}"
        )
    if moe is not None:
        _check_moe_targets(adapter, moe, new, current)
    changed = {k: v for k, v in new.items() if v != current[k]}
    if changed:
        adapter.check_config(adapter.pruned_config(config, **new))
    return adapter, d, new


def _check_moe_targets(adapter: ModelAdapter, moe: Any, new: dict[str, int], current: dict[str, int]) -> None:
    """MoE rules: at least num_experts_per_tok experts; no dense width target on a model without dense MLP layers."""
    if new["num_experts"] < moe.num_experts_per_tok:
        raise ValueError(f"num_experts={new['num_experts']} is below num_experts_per_tok={moe.num_experts_per_tok}: "
                         f"every token is routed to {moe.num_experts_per_tok} distinct experts, so num_experts must be "
                         f"in [{moe.num_experts_per_tok}, {moe.num_experts}]")
    if new["intermediate_size"] != current["intermediate_size"] and all(moe.moe_layers):
        raise ValueError(f"intermediate_size={new['intermediate_size']}: this {adapter.model_type} model has no dense "
                         "MLP layer (every layer is a MoE layer); the experts' MLP width is moe_intermediate_size")


def validate_width_targets(
    config: Any,
    *,
    hidden_size: Optional[int] = None,
    intermediate_size: Optional[int] = None,
    num_attention_heads: Optional[int] = None,
    num_key_value_heads: Optional[int] = None,
    num_experts: Optional[int] = None,
    moe_intermediate_size: Optional[int] = None,
    shared_expert_intermediate_size: Optional[int] = None,
    mamba_num_heads: Optional[int] = None,
    mamba_head_dim: Optional[int] = None,
) -> None:
    """Raise ``ValueError``/``TypeError`` if the width targets cannot be reached from ``config``.

    Checks: each target an int in [1, current]; num_attention_heads a multiple of num_key_value_heads
    and at most (kept groups x the model's heads per group); the family's config rules (Llama
    hidden_size % num_attention_heads == 0, Phi-3 longrope rotary size, transformers' own config
    validation). For a multi-head-attention model (KV heads == heads) an omitted
    num_key_value_heads follows num_attention_heads. Mixture-of-experts models (:class:`MoeAdapter`) also take
    num_experts (in [num_experts_per_tok, num_experts]), moe_intermediate_size (one int: the fused format holds
    one width for all experts) and shared_expert_intermediate_size (families with a shared expert); a dense
    family refuses them, and a model without dense MLP layers refuses intermediate_size. Hybrid Mamba models
    (Nemotron-H) also take mamba_num_heads (a multiple of n_groups: every SSM group keeps the same number of heads)
    and mamba_head_dim; other families refuse them.
    """
    _resolve_targets(config, {
        "mamba_num_heads": mamba_num_heads,
        "mamba_head_dim": mamba_head_dim,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "num_experts": num_experts,
        "moe_intermediate_size": moe_intermediate_size,
        "shared_expert_intermediate_size": shared_expert_intermediate_size,
    })


# ---------------------------------------------------------------------------------------------- width plan
@dataclass
class WidthPlan:
    """What width pruning keeps (int64 CPU index tensors, increasing unless noted; ``None`` = keep all).

    Attributes:
        hidden: [new_hidden_size] kept embedding channels.
        heads: per layer, [new_num_attention_heads] kept query heads, grouped by kept KV group (in the
            order of ``kv``), increasing within a group.
        kv: per layer, [new_num_key_value_heads] kept KV groups.
        neurons: per layer, [new_intermediate_size] kept MLP neurons (dense-MLP layers only).
        sizes: the new hidden_size, intermediate_size, num_attention_heads, num_key_value_heads (and, for a
            mixture-of-experts model, num_experts, moe_intermediate_size, shared_expert_intermediate_size).
        experts: per layer, [new_num_experts] kept experts (MoE layers; empty list for a dense model).
        expert_neurons: per layer, [new_num_experts, new_moe_intermediate_size] the neurons each kept expert keeps
            (its own choice: row j belongs to the j-th kept expert).
        shared_neurons: per layer, [new_shared_expert_intermediate_size] kept shared-expert neurons.
    """

    hidden: Optional[torch.Tensor]
    heads: list[Optional[torch.Tensor]]
    kv: list[Optional[torch.Tensor]]
    neurons: list[Optional[torch.Tensor]]
    sizes: dict[str, int]
    experts: list[Optional[torch.Tensor]] = dataclasses.field(default_factory=list)
    expert_neurons: list[Optional[torch.Tensor]] = dataclasses.field(default_factory=list)
    shared_neurons: list[Optional[torch.Tensor]] = dataclasses.field(default_factory=list)
    #: hybrid Mamba models: the kept Mamba heads / head channels per layer (a
    #: :class:`~minitron.compress.mamba.MambaPlan`), None when no Mamba axis changes
    mamba: Optional[Any] = None

    @property
    def changes(self) -> bool:
        """Whether any tensor is cut."""
        lists = (self.heads, self.neurons, self.experts, self.expert_neurons, self.shared_neurons)
        return (self.hidden is not None or any(x is not None for lst in lists for x in lst)
                or (self.mamba is not None and self.mamba.changes()))

    def moe_at(self, l: int) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
        """``(experts, expert_neurons, shared_neurons)`` of layer ``l`` (Nones for a dense model)."""
        pick = lambda lst: lst[l] if l < len(lst) else None  # noqa: E731
        return pick(self.experts), pick(self.expert_neurons), pick(self.shared_neurons)


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, increasing (ties: lower index first)."""
    order = torch.argsort(scores.float(), descending=True, stable=True)[:k]
    return order.sort().values


def _check_finite(t: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"importance scores '{name}' contain NaN/inf; re-estimate them")


def plan_width(config: Any, scores: Optional[ImportanceScores], **targets: Optional[int]) -> WidthPlan:
    """Choose the units width pruning keeps (no model needed; validates first).

    Args:
        config: the model's config.
        scores: importance of ``config``'s model (required unless nothing changes; for a MoE target it must hold
            the expert scores of :func:`~minitron.compress.importance.estimate_importance`).
        **targets: hidden_size, intermediate_size, num_attention_heads, num_key_value_heads; for
            mixture-of-experts models also num_experts, moe_intermediate_size, shared_expert_intermediate_size.
    """
    known = _WIDTH_FIELDS + MOE_WIDTH_FIELDS + MAMBA_WIDTH_FIELDS
    unknown = set(targets) - set(known)
    if unknown:
        raise TypeError(f"unknown width target(s) {sorted(unknown)}; expected {known}")
    config = getattr(config, "config", config)
    adapter, d, new = _resolve_targets(config, targets)
    L = d.num_hidden_layers
    plan = WidthPlan(hidden=None, heads=[None] * L, kv=[None] * L, neurons=[None] * L, sizes=new)
    moe = adapter.moe_dims(config)
    heads_change = new["num_attention_heads"] != d.num_attention_heads or new["num_key_value_heads"] != d.num_key_value_heads
    neurons_change = new["intermediate_size"] != d.intermediate_size
    hidden_change = new["hidden_size"] != d.hidden_size
    moe_change = moe is not None and any(
        new[k] != v for k, v in (("num_experts", moe.num_experts), ("moe_intermediate_size", moe.moe_intermediate_size),
                                 ("shared_expert_intermediate_size", moe.shared_expert_intermediate_size)) if k in new)
    extra = adapter.extra_width_sizes(config)
    mamba_change = any(new[k] != extra[k] for k in MAMBA_WIDTH_FIELDS if k in extra)
    if not (heads_change or neurons_change or hidden_change or moe_change or mamba_change):
        return plan
    if not isinstance(scores, ImportanceScores):
        raise TypeError(f"scores must be ImportanceScores (from estimate_importance), got {type(scores).__name__}")
    scores.check_compatible(config)
    dense_layers = [l for l in range(L) if moe is None or not moe.moe_layers[l]]
    if hidden_change:
        _check_finite(scores.channels, "channels")
        plan.hidden = _top(scores.channels, new["hidden_size"])
    if neurons_change:
        _check_finite(scores.neurons[dense_layers], "neurons")
        for l in dense_layers:
            plan.neurons[l] = _top(scores.neurons[l], new["intermediate_size"])
    if heads_change:
        _check_finite(scores.heads, "heads")
        nkv, per_group, g = new["num_key_value_heads"], new["num_attention_heads"] // new["num_key_value_heads"], d.heads_per_group
        for l in range(L):
            if nkv != d.num_key_value_heads:
                _check_finite(scores.kv_groups, "kv_groups")
                groups = _top(scores.kv_groups[l], nkv)
            else:
                groups = torch.arange(nkv)
            kept = [g * int(grp) + _top(scores.heads[l, g * int(grp): g * (int(grp) + 1)], per_group) for grp in groups]
            plan.kv[l] = groups
            plan.heads[l] = torch.cat(kept)
    if moe_change:
        _plan_moe(plan, moe, scores, new)
    if mamba_change:
        from minitron.compress.mamba import plan_mamba

        plan.mamba = plan_mamba(config, getattr(scores, "mamba_heads", None), getattr(scores, "mamba_channels", None),
                                **{k: new[k] for k in MAMBA_WIDTH_FIELDS})
    return plan


def _moe_scores(scores: ImportanceScores, field: str, target: str) -> torch.Tensor:
    """``scores.<field>``, or a ValueError naming the target when the scores have no expert scores."""
    t = getattr(scores, field, None)
    if t is None:
        raise ValueError(f"{target}: the importance scores have no '{field}' (expert scores); estimate the importance "
                         "of this mixture-of-experts model with minitron (estimate_importance / `minitron importance`) "
                         "to prune its experts")
    return t


def _plan_moe(plan: WidthPlan, moe: Any, scores: ImportanceScores, new: dict[str, int]) -> None:
    """Per MoE layer: the kept experts (highest ``scores.experts``), each kept expert's own kept neurons (highest
    ``scores.expert_neurons`` of that expert) and the kept shared-expert neurons."""
    L = len(moe.moe_layers)
    plan.experts, plan.expert_neurons, plan.shared_neurons = [None] * L, [None] * L, [None] * L
    layers = [l for l in range(L) if moe.moe_layers[l]]
    ex_change = new["num_experts"] != moe.num_experts
    en_change = new["moe_intermediate_size"] != moe.moe_intermediate_size
    sh_change = new.get("shared_expert_intermediate_size", moe.shared_expert_intermediate_size) != \
        moe.shared_expert_intermediate_size
    ex_s = _moe_scores(scores, "experts", "num_experts") if ex_change else None
    en_s = _moe_scores(scores, "expert_neurons", "moe_intermediate_size") if en_change else None
    sh_s = _moe_scores(scores, "shared_neurons", "shared_expert_intermediate_size") if sh_change else None
    for l in layers:
        kept = None
        if ex_s is not None:
            _check_finite(ex_s[l], "experts")
            kept = _top(ex_s[l], new["num_experts"])
            plan.experts[l] = kept
        if en_s is not None:
            rows = en_s[l] if kept is None else en_s[l][kept]
            _check_finite(rows, "expert_neurons")
            plan.expert_neurons[l] = torch.stack([_top(r, new["moe_intermediate_size"]) for r in rows])
        if sh_s is not None:
            _check_finite(sh_s[l], "shared_neurons")
            plan.shared_neurons[l] = _top(sh_s[l], new["shared_expert_intermediate_size"])


# ---------------------------------------------------------------------------------------------- weight surgery
def _check_slicing_backend(backend: str, device: torch.device, dtype: torch.dtype) -> None:
    """Fail before any weight is cut if ``gather_slices`` cannot run with ``backend`` here."""
    from minitron.ops import gather_slices

    gather_slices([torch.zeros(2, 2, device=device, dtype=dtype)], [torch.zeros(1, dtype=torch.long, device=device)],
                  [0], block=1, backend=backend)


@dataclass(frozen=True)
class Cut:
    """One cut of one parameter: keep units ``index`` (of ``block`` rows/columns each) along ``dim``.

    Applied with :func:`minitron.ops.gather_slices`; a parameter may have several cuts, applied in order
    (e.g. ``q_proj.weight``: kept head rows first, then kept embedding-channel columns).
    """

    index: torch.Tensor
    dim: int
    block: int = 1

    def shape_after(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The shape of a tensor of ``shape`` after this cut."""
        s = list(shape)
        s[self.dim] = int(self.index.numel()) * self.block
        return tuple(s)


@dataclass(frozen=True)
class ExpertCut:
    """One cut of a fused expert tensor ``[E, R, C]`` (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]).

    Keeps experts ``experts`` (dim 0; None = all) and, along ``dim`` (1 or 2), the units ``units`` of ``block``
    rows/columns each: a 1-D index shared by every kept expert (embedding channels), or a 2-D ``[E', k]`` index
    whose row ``j`` lists what the ``j``-th kept expert keeps (each expert's own neurons); None = keep all.
    Each application is one :func:`minitron.ops.gather_slices` call: the expert dim and a shared index cut the 3-D
    tensor at once (its two-dim form, ``indices=(experts, units)``, ``dims=(0, dim)``); per-expert units (a
    cross product cannot express them) go through 2-D views: dim 1 as rows of the ``[E*R, C]`` view (one flat row
    index), dim 2 as columns of each kept expert's ``[R, C]`` matrix (one call over the list, then stacked).
    """

    experts: Optional[torch.Tensor]
    units: Optional[torch.Tensor]
    dim: int
    block: int = 1

    def shape_after(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The shape of a tensor of ``shape`` after this cut."""
        s = list(shape)
        if self.experts is not None:
            s[0] = int(self.experts.numel())
        if self.units is not None:
            s[self.dim] = int(self.units.shape[-1]) * self.block
        return tuple(s)


def _apply_expert_cut(t: torch.Tensor, c: ExpertCut, backend: str) -> torch.Tensor:
    """``t`` [E, R, C] cut by ``c`` (new memory; ``t`` not modified)."""
    from minitron.ops import gather_slices

    if t.dim() != 3 or c.dim not in (1, 2):
        raise RuntimeError(f"an expert cut needs a 3-D tensor and dim 1 or 2, got shape {tuple(t.shape)} dim {c.dim}")
    t = t if t.is_contiguous() else t.contiguous()
    E, R, C = t.shape
    dev, b = t.device, c.block
    ex = None if c.experts is None else c.experts.to(dev)
    n_ex = E if ex is None else int(ex.numel())
    if c.units is None:
        if ex is None:
            return t.clone()
        return gather_slices([t], [ex], [0], backend=backend)[0]
    units = c.units.to(dev)
    if units.dim() == 1:  # the same units in every kept expert: one 3-D gather, both dims at once
        if ex is None:
            return gather_slices([t], [units], [c.dim], block=b, backend=backend)[0]
        return gather_slices([t], [(ex, units)], [(0, c.dim)], block=[(1, b)], backend=backend)[0]
    if units.dim() == 2 and units.shape[0] != n_ex:
        raise RuntimeError(f"an expert cut has {units.shape[0]} rows of units for {n_ex} kept experts")
    if c.dim == 1:
        first = (torch.arange(E, device=dev) if ex is None else ex) * (R // b)
        rows = (first[:, None] + (units if units.dim() == 2 else units[None, :])).reshape(-1)
        return gather_slices([t.view(E * R, C)], [rows], [0], block=b, backend=backend)[0].view(n_ex, -1, C)
    which = range(E) if ex is None else ex.tolist()
    idx = [units[j] for j in range(n_ex)]
    return torch.stack(gather_slices([t[e] for e in which], idx, [1] * n_ex, block=b, backend=backend))


#: Parameter name (state-dict key, e.g. ``model.layers.3.self_attn.q_proj.weight``) -> its cuts in order.
CutPlan = dict[str, list[Any]]


class _CutRecorder:
    """Collects the cuts of one group of parameters (one decoder layer, or the model-level tensors)."""

    def __init__(self, names: dict[int, str]) -> None:
        self.names = names
        self.group: CutPlan = {}

    def add(self, module: nn.Module, name: str, index: torch.Tensor, dim: int, block: int = 1) -> None:
        self.add_cut(module, name, Cut(index, dim, block))

    def add_cut(self, module: nn.Module, name: str, cut: Any) -> None:
        if getattr(module, name, None) is None:
            return
        cuts = self.group.setdefault(f"{self.names[id(module)]}.{name}", [])
        last = cuts[-1] if cuts else None
        if (isinstance(cut, ExpertCut) and isinstance(last, ExpertCut) and last.units is None and cut.experts is None
                and cut.units is not None and cut.units.dim() == 1):
            cuts[-1] = ExpertCut(last.experts, cut.units, cut.dim, cut.block)  # experts + channels: one 3-D gather
            return
        cuts.append(cut)


def _row_blocks(spans: list[RowSpan], kept: list[torch.Tensor], block: int) -> dict[nn.Linear, torch.Tensor]:
    """Per linear, the kept row blocks (units of ``block`` rows), spans concatenated in row order."""
    per: dict[int, list[tuple[int, torch.Tensor]]] = {}
    owners: dict[int, nn.Linear] = {}
    for span, keep in zip(spans, kept):
        if span.start % block or span.unit_size % block:
            raise RuntimeError(f"row span at {span.start} (unit {span.unit_size}) is not aligned to blocks of {block}")
        step = span.unit_size // block
        rows = (span.start // block + keep[:, None] * step + torch.arange(step)[None, :]).reshape(-1)
        per.setdefault(id(span.linear), []).append((span.start, rows))
        owners[id(span.linear)] = span.linear
    out = {}
    for key, parts in per.items():
        parts.sort(key=lambda p: p[0])
        out_features = owners[key].weight.shape[0]
        covered = sum(s.units * s.unit_size for s in spans if s.linear is owners[key])
        if covered != out_features:
            raise RuntimeError(f"adapter spans cover {covered} of {out_features} rows of a linear layer")
        out[owners[key]] = torch.cat([r for _, r in parts])
    return out


def _layer_cuts(adapter: ModelAdapter, layer: nn.Module, d: Dims, plan: WidthPlan, l: int, rec: _CutRecorder) -> None:
    """Record one layer's cuts: heads/KV groups (rows of q/k/v, columns of o), MLP neurons (rows of
    gate/up, columns of down); then the embedding channels (input columns, output rows, norm weights). A Mamba layer
    of a hybrid model is cut by :func:`minitron.compress.mamba.record_mamba_cuts` instead."""
    if adapter.is_mamba_layer(layer):
        from minitron.compress.mamba import record_mamba_cuts

        record_mamba_cuts(adapter, layer, plan, l, rec)
        return
    if plan.heads[l] is not None and adapter.has_attention(layer):
        heads, kv, hd = plan.heads[l], plan.kv[l], d.head_dim
        spans = [adapter.query_rows(layer, d), adapter.key_rows(layer, d), adapter.value_rows(layer, d)]
        for linear, rows in _row_blocks(spans, [heads, kv, kv], hd).items():
            rec.add(linear, "weight", rows, 0, hd)
            rec.add(linear, "bias", rows, 0, hd)
        rec.add(adapter.o_proj(layer), "weight", heads, 1, hd)
    moe_layer = adapter.is_moe_layer(layer)
    if moe_layer:
        _moe_layer_cuts(adapter, layer, plan, l, rec)  # type: ignore[arg-type]
    if plan.neurons[l] is not None and not moe_layer and adapter.has_mlp(layer):
        keep = plan.neurons[l]
        spans = adapter.mlp_row_spans(layer, d)
        for linear, rows in _row_blocks(spans, [keep] * len(spans), 1).items():
            rec.add(linear, "weight", rows, 0)
            rec.add(linear, "bias", rows, 0)
        rec.add(adapter.down_proj(layer), "weight", keep, 1)
    hidden = plan.hidden
    if hidden is None:
        return
    for module, name, dim in adapter.hidden_axes(layer):
        p = getattr(module, name, None)
        if isinstance(p, torch.Tensor) and p.dim() == 3:  # a fused expert tensor of a hybrid family's MoE layer
            rec.add_cut(module, name, ExpertCut(None, hidden, dim))
        else:
            rec.add(module, name, hidden, dim)
    if moe_layer:
        experts = adapter.experts(layer)  # type: ignore[attr-defined]
        rec.add_cut(experts, "gate_up_proj", ExpertCut(None, hidden, 2))
        rec.add_cut(experts, "down_proj", ExpertCut(None, hidden, 1))


def _moe_layer_cuts(adapter: MoeAdapter, layer: nn.Module, plan: WidthPlan, l: int, rec: _CutRecorder) -> None:
    """A MoE layer's expert cuts: kept experts and each one's own kept neurons in the fused ``gate_up_proj`` (rows
    [gate | up]) and ``down_proj`` (columns), the router's rows (and per-expert biases), the shared expert's neurons."""
    ex, en, sn = plan.moe_at(l)
    if ex is not None or en is not None:
        experts = adapter.experts(layer)
        inter = int(experts.down_proj.shape[2])
        gate_up = None if en is None else torch.cat([en, en + inter], dim=1)
        rec.add_cut(experts, "gate_up_proj", ExpertCut(ex, gate_up, 1))
        rec.add_cut(experts, "down_proj", ExpertCut(ex, en, 2))
    if ex is not None:
        router = adapter.router(layer)
        for name in ("weight", "bias", "e_score_correction_bias"):
            rec.add(router, name, ex, 0)
    shared = adapter.shared_expert(layer)
    if sn is not None and shared is not None:
        for linear in (shared.gate_proj, shared.up_proj):
            rec.add(linear, "weight", sn, 0)
            rec.add(linear, "bias", sn, 0)
        rec.add(shared.down_proj, "weight", sn, 1)


def _width_cut_groups(model: nn.Module, adapter: ModelAdapter, plan: WidthPlan) -> list[CutPlan]:
    """The cuts of every parameter, one group per decoder layer then one for the model-level tensors.

    ``model`` may live on the ``meta`` device (only its structure is read). A tied LM head is not
    listed (it is the embedding's tensor).
    """
    d = adapter.dims(model.config)
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    groups = []
    for l, layer in enumerate(list(adapter.layers(model))[: d.num_hidden_layers]):
        rec = _CutRecorder(names)
        _layer_cuts(adapter, layer, d, plan, l, rec)
        groups.append(rec.group)
    rec = _CutRecorder(names)
    if plan.hidden is not None:
        emb, lm_head = adapter.embedding(model), adapter.lm_head(model)
        rec.add(emb, "weight", plan.hidden, 1)
        norm = adapter.final_norm(model)
        rec.add(norm, "weight", plan.hidden, 0)
        rec.add(norm, "bias", plan.hidden, 0)
        if lm_head.weight is not emb.weight:
            rec.add(lm_head, "weight", plan.hidden, 1)
    groups.append(rec.group)
    return groups


def width_cut_plan(model: nn.Module, plan: WidthPlan) -> CutPlan:
    """Every parameter width pruning cuts, by state-dict name, with its cuts in order.

    The single source of the slicing rules: :func:`prune_width` applies it to a model in memory and
    :func:`minitron.compress.stream_prune.prune_checkpoint_streaming` to checkpoint tensors read one at
    a time. ``model`` may be built on the ``meta`` device from the config (no weights needed).
    Parameters not listed are kept unchanged.
    """
    adapter = get_adapter(model)
    out: CutPlan = {}
    for group in _width_cut_groups(model, adapter, plan):
        out.update(group)
    return out


def apply_cuts(tensors: list[torch.Tensor], cuts: list[list[Any]], backend: str) -> list[torch.Tensor]:
    """Cut each tensor by its list of cuts, in order, batching the i-th :class:`Cut` of all tensors in one
    :func:`minitron.ops.gather_slices` call (each :class:`ExpertCut` is one call of its own); returns the cut
    tensors (inputs not modified)."""
    from minitron.ops import gather_slices

    out = list(tensors)
    for k in range(max((len(c) for c in cuts), default=0)):
        for i, c in enumerate(cuts):
            if len(c) > k and isinstance(c[k], ExpertCut):
                out[i] = _apply_expert_cut(out[i], c[k], backend)
        which = [i for i, c in enumerate(cuts) if len(c) > k and isinstance(c[k], Cut)]
        if not which:
            continue
        items = [cuts[i][k] for i in which]
        new = gather_slices([out[i] for i in which], [c.index.to(out[i].device) for c, i in zip(items, which)],
                            [c.dim for c in items], block=[c.block for c in items], backend=backend)
        for i, t in zip(which, new):
            out[i] = t
    return out


def _apply_cut_group(model: nn.Module, group: CutPlan, backend: str) -> None:
    """Replace every parameter of ``group`` by its cut copy."""
    if not group:
        return
    names = list(group)
    params = [model.get_parameter(n) for n in names]
    new = apply_cuts([p.data for p in params], [group[n] for n in names], backend)
    for name, old, tensor in zip(names, params, new):
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, nn.Parameter(tensor, requires_grad=old.requires_grad))


def width_config_update(config: Any, plan: WidthPlan, head_dim: int) -> None:
    """Write the new sizes of ``plan`` (and ``head_dim``, explicitly) into ``config`` in place (MoE sizes into the
    family's own fields, e.g. Mixtral's ``num_local_experts``)."""
    moe = {k: int(v) for k, v in plan.sizes.items() if k in MOE_WIDTH_FIELDS}
    for name, value in plan.sizes.items():
        if name not in moe:
            setattr(config, name, int(value))
    if moe:
        adapter = get_adapter(config)
        if not isinstance(adapter, MoeAdapter):
            raise ValueError(f"{sorted(moe)}: a {adapter.model_type} model has no experts")
        adapter.set_moe_sizes(config, **moe)
    config.head_dim = int(head_dim)


#: Config attribute holding the pruning record (see :func:`pruning_record`); saved in config.json.
PRUNING_RECORD = "minitron_pruning"


def pruning_record(config: Any) -> dict:
    """Where this model's layers and hidden channels came from, as ``config.minitron_pruning`` records it.

    Returns a new dict ``{"source_num_hidden_layers": L0, "kept_layers": [teacher layer of each layer],
    "source_hidden_size": H0, "kept_channels": [teacher channel of each channel] or None (hidden unchanged)}``;
    the identity record of ``config`` when it has none (an unpruned model is its own teacher). A record that does
    not match the config's sizes (edited by hand) is ignored with a warning.
    """
    L, H = int(config.num_hidden_layers), int(config.hidden_size)
    ident = {"source_num_hidden_layers": L, "kept_layers": list(range(L)), "source_hidden_size": H,
             "kept_channels": None}
    rec = getattr(config, PRUNING_RECORD, None)
    if rec is None:
        return ident
    try:
        L0, H0 = int(rec["source_num_hidden_layers"]), int(rec["source_hidden_size"])
        layers = [int(i) for i in rec["kept_layers"]]
        channels = None if rec.get("kept_channels") is None else [int(c) for c in rec["kept_channels"]]
        ok = (len(layers) == L and all(0 <= i < L0 for i in layers)
              and (channels is None and H0 == H or channels is not None and len(channels) == H
                   and all(0 <= c < H0 for c in channels)))
    except (TypeError, KeyError, ValueError):
        ok = False
    if not ok:
        log.warning("config.%s does not match the config's sizes (%d layers, hidden %d); starting a new record",
                    PRUNING_RECORD, L, H)
        return ident
    return {"source_num_hidden_layers": L0, "kept_layers": layers, "source_hidden_size": H0, "kept_channels": channels}


def update_pruning_record(config: Any, *, kept_layers: Optional[Sequence[int]] = None,
                          kept_channels: Optional[Any] = None) -> None:
    """Compose ``config.minitron_pruning`` with one more cut (in place); call it *before* the sizes change.

    Args:
        config: the config being pruned, still holding the sizes before this cut.
        kept_layers: indices (into the current layers, increasing) of the layers depth pruning keeps.
        kept_channels: indices (into the current hidden channels, increasing; a tensor or a list) width pruning
            keeps, or None when the hidden size does not change.
    """
    rec = pruning_record(config)
    if kept_layers is not None:
        rec["kept_layers"] = [rec["kept_layers"][int(i)] for i in kept_layers]
    if kept_channels is not None:
        kc = [int(c) for c in (kept_channels.tolist() if isinstance(kept_channels, torch.Tensor) else kept_channels)]
        prev = rec["kept_channels"]
        rec["kept_channels"] = kc if prev is None else [prev[c] for c in kc]
    setattr(config, PRUNING_RECORD, rec)


def apply_width_transforms(tensors: dict[str, torch.Tensor], transforms: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``{name: transforms[name](t)}`` for the named tensors that have a transform (others unchanged); checks that
    each transform keeps the shape and dtype (:meth:`ModelAdapter.width_transforms`)."""
    out = dict(tensors)
    for name, t in tensors.items():
        fn = transforms.get(name)
        if fn is None:
            continue
        new = fn(t)
        if not isinstance(new, torch.Tensor) or new.shape != t.shape or new.dtype != t.dtype:
            raise RuntimeError(f"the width transform of {name!r} changed its shape/dtype {tuple(t.shape)} {t.dtype} -> "
                               f"{getattr(new, 'shape', None)} {getattr(new, 'dtype', None)}")
        out[name] = new
    return out


def depth_config_update(config: Any, kept: Sequence[int]) -> None:
    """Cut ``config``'s per-layer fields to the kept layers and set ``num_hidden_layers`` (in place)."""
    get_adapter(config).cut_per_layer_config(config, list(kept))
    config.num_hidden_layers = len(kept)


_SIZE_ATTRS = {
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_heads": "num_attention_heads",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_key_value_heads",
}


def _sync_module_attributes(model: nn.Module, adapter: ModelAdapter, sizes: dict[str, int]) -> None:
    """Make module bookkeeping (Linear in/out features, sizes, GQA group counts) match the new weights."""
    base = adapter.base_model(model)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, nn.Embedding):
            module.embedding_dim = module.weight.shape[1]
        if module is model or module is base:
            continue  # their vocab_size etc. are untouched
        for attr, key in _SIZE_ATTRS.items():
            if isinstance(getattr(module, attr, None), int) and not isinstance(getattr(module, attr), bool):
                setattr(module, attr, sizes[key])
        if isinstance(getattr(module, "num_key_value_groups", None), int):
            module.num_key_value_groups = sizes["num_attention_heads"] // sizes["num_key_value_heads"]
    adapter.sync_modules(model)


def _apply_width_plan(model: nn.Module, adapter: ModelAdapter, plan: WidthPlan, backend: str) -> None:
    d = adapter.dims(model.config)
    emb, lm_head = adapter.embedding(model), adapter.lm_head(model)
    tied = lm_head.weight is emb.weight
    before = copy.deepcopy(model.config)
    after = copy.deepcopy(model.config)
    update_pruning_record(after, kept_channels=plan.hidden)
    width_config_update(after, plan, d.head_dim)
    transforms = adapter.width_transforms(before, after)
    unknown = [n for n in transforms if n not in dict(model.named_parameters(remove_duplicate=False))]
    if unknown:
        raise RuntimeError(f"{adapter!r}.width_transforms names no parameter of the model: {unknown}")
    for group in _width_cut_groups(model, adapter, plan):  # one decoder layer at a time, then the rest
        _apply_cut_group(model, group, backend)
    for name in transforms:
        owner, _, attr = name.rpartition(".")
        old = model.get_parameter(name)
        new = apply_width_transforms({name: old.data}, transforms)[name]
        setattr(model.get_submodule(owner), attr, nn.Parameter(new, requires_grad=old.requires_grad))
    if tied:
        lm_head.weight = emb.weight
    update_pruning_record(model.config, kept_channels=plan.hidden)
    width_config_update(model.config, plan, d.head_dim)
    _sync_module_attributes(model, adapter, plan.sizes)


def prune_width(
    model: nn.Module,
    scores: Optional[ImportanceScores],
    *,
    hidden_size: Optional[int] = None,
    intermediate_size: Optional[int] = None,
    num_attention_heads: Optional[int] = None,
    num_key_value_heads: Optional[int] = None,
    num_experts: Optional[int] = None,
    moe_intermediate_size: Optional[int] = None,
    shared_expert_intermediate_size: Optional[int] = None,
    backend: str = "auto",
    **mamba_targets: Optional[int],
) -> nn.Module:
    """Width-prune ``model`` in place to the given sizes (any subset) and return it.

    Keeps, per layer, the MLP neurons with the highest ``scores.neurons``; the KV groups with the highest
    ``scores.kv_groups`` (when num_key_value_heads shrinks) and in each kept group the same number of
    query heads with the highest ``scores.heads``; and globally the embedding channels with the highest
    ``scores.channels``, cut from the embedding, every norm, every projection, the final norm and the LM
    head (tied weights stay tied). ``head_dim`` is kept and written to the config explicitly.

    Args:
        model: a supported ``*ForCausalLM`` model (any dtype/device); modified in place.
        scores: importance of this very model (its config fingerprint must match); may be None when no
            size changes.
        hidden_size, intermediate_size, num_attention_heads, num_key_value_heads: target sizes
            (None = keep). See :func:`validate_width_targets` for the rules.
        num_experts, moe_intermediate_size, shared_expert_intermediate_size: mixture-of-experts targets
            (:class:`~minitron.models.base.MoeAdapter` families): per MoE layer the experts with the highest
            ``scores.experts`` are kept (router rows with them), each kept expert keeps its own
            ``moe_intermediate_size`` neurons with the highest ``scores.expert_neurons`` (the same count for all:
            transformers' fused format has one width), the shared expert its ``shared_neurons``.
        backend: backend of :func:`minitron.ops.gather_slices`.
        **mamba_targets: hybrid Mamba models (Nemotron-H): ``mamba_num_heads`` (group-aware: per SSM group the
            heads with the highest ``scores.mamba_heads`` of that group) and ``mamba_head_dim`` (the channels with
            the highest ``scores.mamba_channels``, aggregated over the kept heads); see
            :mod:`minitron.compress.mamba`.
    Returns:
        ``model`` itself.
    Raises:
        ValueError / TypeError: before any weight is modified.
    """
    adapter = get_adapter(model)
    adapter.check_model(model)
    bad = set(mamba_targets) - set(MAMBA_WIDTH_FIELDS)
    if bad:
        raise TypeError(f"prune_width got unexpected keyword argument(s) {sorted(bad)}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    plan = plan_width(model.config, scores, hidden_size=hidden_size, intermediate_size=intermediate_size,
                      num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
                      **{k: v for k, v in (("num_experts", num_experts), ("moe_intermediate_size", moe_intermediate_size),
                                           ("shared_expert_intermediate_size", shared_expert_intermediate_size))
                         if v is not None},
                      **{k: v for k, v in mamba_targets.items() if v is not None})
    if not plan.changes:
        log.info("prune_width: every target equals the model's size; nothing to do")
        return model
    before = adapter.dims(model.config)
    w = adapter.embedding(model).weight
    _check_slicing_backend(backend, w.device, w.dtype)
    with torch.no_grad():
        _apply_width_plan(model, adapter, plan, backend)
    log.info("prune_width: %s -> %s", {k: getattr(before, k) for k in _WIDTH_FIELDS}, plan.sizes)
    return model


# ---------------------------------------------------------------------------------------------- depth
def plan_depth(
    config: Any,
    *,
    num_hidden_layers: int,
    scores: Optional[ImportanceScores] = None,
    metric: str = "lm_loss",
    contiguous: bool = True,
    layers_to_drop: Optional[Sequence[int]] = None,
) -> list[int]:
    """The (increasing) indices of the layers :func:`prune_depth` drops; validates everything first.

    With ``layers_to_drop`` those layers are dropped (their count must equal the reduction). Otherwise
    ``scores.layer_scores(metric)`` (higher = more important) decide: ``contiguous=True`` drops the
    window of consecutive layers with the least total score, ``contiguous=False`` the individual layers
    with the lowest scores (ties: lower index first).
    """
    config = getattr(config, "config", config)
    adapter = get_adapter(config)
    L = adapter.dims(config).num_hidden_layers
    if isinstance(num_hidden_layers, bool) or not isinstance(num_hidden_layers, int):
        raise TypeError(f"num_hidden_layers must be an int, got {type(num_hidden_layers).__name__}")
    if not 1 <= num_hidden_layers <= L:
        raise ValueError(f"num_hidden_layers must be in [1, {L}] (the model has {L} layers), got {num_hidden_layers}")
    if metric not in DEPTH_METRICS:
        raise ValueError(f"metric must be one of {DEPTH_METRICS}, got {metric!r}")
    if not isinstance(contiguous, bool):
        raise TypeError(f"contiguous must be a bool, got {type(contiguous).__name__}")
    k = L - num_hidden_layers
    if layers_to_drop is not None:
        drop = _check_layer_list(layers_to_drop, L, "layers_to_drop")
        if len(drop) != k:
            raise ValueError(
                f"layers_to_drop has {len(drop)} layers but going from {L} to {num_hidden_layers} layers drops {k}"
            )
        return drop
    if k == 0:
        return []
    if not isinstance(scores, ImportanceScores):
        raise TypeError(
            f"scores must be ImportanceScores (or pass layers_to_drop), got {type(scores).__name__}"
        )
    # depth pruning only needs the layer scores; width pruning may already have changed the other sizes
    scores.check_compatible(config, fields=("model_type", "num_hidden_layers"))
    s = scores.layer_scores(metric).float()
    _check_finite(s, metric)
    if contiguous:
        sums = torch.stack([s[i: i + k].sum() for i in range(L - k + 1)])
        start = int(torch.argmin(sums))
        return list(range(start, start + k))
    return _top(-s, k).tolist()


def layer_rename(layers_prefix: str, num_layers: int, kept: Sequence[int]) -> dict[str, Optional[str]]:
    """Depth pruning as a renaming of state-dict key prefixes: ``"{prefix}.{i}."`` -> ``"{prefix}.{new}."``
    for kept layer ``i`` (its position among ``kept``), ``None`` for dropped layers."""
    pos = {old: new for new, old in enumerate(kept)}
    return {f"{layers_prefix}.{i}.": (f"{layers_prefix}.{pos[i]}." if i in pos else None) for i in range(num_layers)}


def prune_depth(
    model: nn.Module,
    *,
    num_hidden_layers: int,
    scores: Optional[ImportanceScores] = None,
    metric: str = "lm_loss",
    contiguous: bool = True,
    layers_to_drop: Optional[Sequence[int]] = None,
) -> nn.Module:
    """Depth-prune ``model`` in place to ``num_hidden_layers`` layers and return it.

    Which layers go: see :func:`plan_depth`. The kept layers are renumbered (``layer_idx`` of every
    submodule, so the KV cache is indexed correctly), and per-layer config fields (``layer_types``,
    ``max_window_layers``) are cut to the kept layers.

    Args:
        model: a supported ``*ForCausalLM`` model; modified in place.
        num_hidden_layers: layers to keep.
        scores: importance scores of this model (only the layer scores and layer count are used).
        metric: "lm_loss" (LM-loss increase when the layer is skipped) or "block_influence".
        contiguous: drop one contiguous block (the papers' finding) instead of single layers.
        layers_to_drop: explicit layer indices to drop instead of scores.
    Returns:
        ``model`` itself.
    """
    adapter = get_adapter(model)
    adapter.check_model(model)
    config = model.config
    drop = plan_depth(config, num_hidden_layers=num_hidden_layers, scores=scores, metric=metric,
                      contiguous=contiguous, layers_to_drop=layers_to_drop)
    L = adapter.dims(config).num_hidden_layers
    layers = adapter.layers(model)
    if len(layers) < L:
        raise ValueError(f"model has {len(layers)} layer modules but config.num_hidden_layers={L}")
    if not drop:
        log.info("prune_depth: keeping all %d layers; nothing to do", L)
        return model
    kept = [i for i in range(L) if i not in set(drop)]
    # validate the new config on a copy before touching the model
    candidate = copy.deepcopy(config)
    depth_config_update(candidate, kept)
    adapter.check_config(candidate)

    new_layers = nn.ModuleList([layers[i] for i in kept])
    new_layers.train(layers.training)
    for new_idx, layer in enumerate(new_layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_idx
    adapter.set_layers(model, new_layers)
    update_pruning_record(config, kept_layers=kept)
    depth_config_update(config, kept)
    base = adapter.base_model(model)
    if hasattr(base, "has_sliding_layers") and isinstance(getattr(config, "layer_types", None), (list, tuple)):
        base.has_sliding_layers = "sliding_attention" in config.layer_types
    log.info("prune_depth: dropped layers %s (%d -> %d layers)", drop, L, len(kept))
    return model
