"""Mamba-2 pruning axes of hybrid models (Nemotron-H): heads (group-aware), head dimension, state size.

The Minitron-SSM recipe (Taghibakhshi et al., 2025, "Minitron-SSM: Efficient Hybrid Language Model Compression
through Group-Aware SSM Pruning", arXiv:2504.11409) prunes Mamba heads *within* their SSM groups: the ``H``
heads of a Mamba-2 layer are split into ``G`` groups of ``H / G`` consecutive heads, each group sharing one
slice of ``B`` and ``C``; a pruned layer keeps the same number of heads in every group, chosen by importance
ranked *within* the group, so every kept head still reads its own group's ``B``/``C`` and the gated norm still
normalises one group's heads together. Ignoring the groups (ranking all heads together, then re-packing the
kept heads ``H'/G`` per group in index order) silently hands some heads another group's ``B``/``C`` and norm
statistics: :func:`select_mamba_heads_ignoring_groups` exists to measure that.

Geometry (:class:`minitron.models.nemotron_h.MambaLayout`): ``in_proj`` rows ``[z | x | B | C | dt]``,
``conv1d`` channels ``[x | B | C]``, per-head ``A_log``/``D``/``dt_bias``, the grouped gated norm over the
``d_inner`` channels, ``out_proj`` columns. :func:`mamba_layer_cuts` gives every cut of one Mamba layer as
:class:`~minitron.compress.prune.Cut` lists keyed by state-dict name; :func:`~minitron.compress.prune.apply_cuts`
applies the first cut of every tensor of the layer in ONE :func:`minitron.ops.gather_slices` call (and, when the
hidden size shrinks too, the second cuts -- ``in_proj`` columns, ``out_proj`` rows -- in a second one).

Importance (:class:`MambaImportance`): forward pre-hooks on every Mamba layer's ``out_proj`` feed the mixer's
output before ``out_proj`` (the gated norm's output, ``[batch, seq, d_inner]``, head-major) into two
:class:`~minitron.ops.ImportanceAccumulator` s: per head (``group_size = mamba_head_dim``) and per channel
(``group_size = 1``; for head-dim pruning the channel scores ``[H, P]`` are aggregated over the (kept) heads).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from minitron.compress.prune import Cut, CutPlan, apply_cuts
from minitron.models import get_adapter
from minitron.models.nemotron_h import MambaLayout, NemotronHAdapter

log = logging.getLogger(__name__)

__all__ = ["select_mamba_heads", "select_mamba_heads_ignoring_groups", "select_mamba_head_dims", "mamba_channels",
           "mamba_layer_cuts", "MambaPlan", "plan_mamba", "mamba_cut_plan", "apply_cuts_nd", "apply_cut_plan", "prune_mamba",
           "mamba_config_update", "validate_mamba_targets", "MambaImportance", "HEAD_DIM_AGGREGATIONS"]

HEAD_DIM_AGGREGATIONS = ("l2", "sum", "mean")


# ---------------------------------------------------------------------------------------------- checks
def _check_count(name: str, value: Any, current: int, flag: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} ({flag}) must be an int, got {type(value).__name__} {value!r}")
    if not 1 <= value <= current:
        raise ValueError(f"{name} ({flag}) must be in [1, {current}] (the model has {current}), got {value}")
    return value


def _check_scores(scores: Any, shape: tuple[int, ...], name: str) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(scores).__name__}")
    if tuple(scores.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(scores.shape)}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"{name} contain NaN/inf; re-estimate the importance")
    return scores.detach().float().cpu()


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, increasing (ties: lower index first)."""
    return torch.argsort(scores, descending=True, stable=True)[:k].sort().values


def _check_index(index: Any, size: int, name: str) -> torch.Tensor:
    if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be a 1-D int64 tensor of kept indices")
    if index.numel() == 0:
        raise ValueError(f"{name} must keep at least one unit")
    index = index.long().cpu()
    if int(index.min()) < 0 or int(index.max()) >= size:
        raise ValueError(f"{name}: indices must lie in [0, {size}), got range [{int(index.min())}, {int(index.max())}]")
    if index.unique().numel() != index.numel():
        raise ValueError(f"{name} holds duplicate indices")
    return index


# ---------------------------------------------------------------------------------------------- selection
def select_mamba_heads(scores: torch.Tensor, n_groups: int, keep: int) -> torch.Tensor:
    """Group-aware Mamba head selection (Minitron-SSM): the same number of heads kept in every SSM group.

    Args:
        scores: [num_heads] importance of the heads of one Mamba layer (any float dtype; finite).
        n_groups: SSM groups (``config.n_groups``); heads ``g*H/G .. (g+1)*H/G - 1`` form group ``g``.
        keep: heads to keep (``--mamba-num-heads``), a multiple of ``n_groups``.
    Returns:
        int64 [keep] kept head indices, increasing: ``keep / n_groups`` per group, the highest-scoring heads
        of that group (ties: lower index first).
    Raises:
        ValueError: ``keep`` not a multiple of ``n_groups`` or out of range (naming ``--mamba-num-heads``).
    """
    if isinstance(n_groups, bool) or not isinstance(n_groups, int) or n_groups < 1:
        raise ValueError(f"n_groups must be a positive int, got {n_groups!r}")
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1:
        raise TypeError("scores must be a 1-D tensor [num_heads]")
    h = scores.shape[0]
    if h % n_groups:
        raise ValueError(f"the layer's {h} Mamba heads do not split into n_groups={n_groups} groups")
    keep = _check_count("mamba_num_heads", keep, h, "--mamba-num-heads")
    if keep % n_groups:
        raise ValueError(f"mamba_num_heads={keep} (--mamba-num-heads) is not a multiple of n_groups={n_groups}: "
                         f"every SSM group must keep the same number of heads (e.g. {max(n_groups, keep - keep % n_groups)})")
    s = _check_scores(scores, (h,), "Mamba head scores")
    per, size = keep // n_groups, h // n_groups
    return torch.cat([g * size + _top(s[g * size:(g + 1) * size], per) for g in range(n_groups)])


def select_mamba_heads_ignoring_groups(scores: torch.Tensor, n_groups: int, keep: int) -> torch.Tensor:
    """The comparison baseline: the ``keep`` best heads over the whole layer, ignoring the SSM groups.

    The kept heads are laid out in index order and the pruned layer re-groups them ``keep / n_groups`` per
    group, so a head that moves to another group reads that group's B/C and shares its norm statistics.
    ``keep`` must still be a multiple of ``n_groups`` (the pruned config needs it). Returns int64 [keep], increasing.
    """
    if isinstance(n_groups, bool) or not isinstance(n_groups, int) or n_groups < 1:
        raise ValueError(f"n_groups must be a positive int, got {n_groups!r}")
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1:
        raise TypeError("scores must be a 1-D tensor [num_heads]")
    h = scores.shape[0]
    keep = _check_count("mamba_num_heads", keep, h, "--mamba-num-heads")
    if keep % n_groups:
        raise ValueError(f"mamba_num_heads={keep} (--mamba-num-heads) is not a multiple of n_groups={n_groups}")
    return _top(_check_scores(scores, (h,), "Mamba head scores"), keep)


def select_mamba_head_dims(channel_scores: torch.Tensor, keep: int, *, heads: Optional[torch.Tensor] = None,
                           agg: str = "l2") -> torch.Tensor:
    """Head-dimension selection: the same ``keep`` channels kept inside every head of one Mamba layer.

    Args:
        channel_scores: [num_heads, head_dim] per-channel importance (head-major d_inner channels).
        keep: channels per head to keep (``--mamba-head-dim``).
        heads: kept heads (int64 [H']); only they vote (None: all heads).
        agg: how a channel's scores over the heads are combined: ``"l2"`` (default), ``"sum"`` or ``"mean"``.
    Returns:
        int64 [keep] kept channel positions within a head, increasing.
    """
    if not isinstance(channel_scores, torch.Tensor) or channel_scores.dim() != 2:
        raise TypeError("channel_scores must be a 2-D tensor [num_heads, head_dim]")
    h, p = channel_scores.shape
    keep = _check_count("mamba_head_dim", keep, p, "--mamba-head-dim")
    if agg not in HEAD_DIM_AGGREGATIONS:
        raise ValueError(f"agg must be one of {HEAD_DIM_AGGREGATIONS}, got {agg!r}")
    s = _check_scores(channel_scores, (h, p), "Mamba channel scores")
    if heads is not None:
        s = s[_check_index(heads, h, "heads")]
    per = s.square().sum(0).sqrt() if agg == "l2" else (s.sum(0) if agg == "sum" else s.mean(0))
    return _top(per, keep)


def mamba_channels(heads: torch.Tensor, head_dims: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The kept d_inner channels (head-major): ``heads[i] * head_dim + head_dims[j]``, int64 [H' * P']."""
    return (heads[:, None] * head_dim + head_dims[None, :]).reshape(-1)


# ---------------------------------------------------------------------------------------------- cuts
def mamba_layer_cuts(config: Any, prefix: str, *, heads: Optional[torch.Tensor] = None,
                     head_dims: Optional[torch.Tensor] = None, states: Optional[torch.Tensor] = None,
                     hidden: Optional[torch.Tensor] = None) -> CutPlan:
    """Every cut of one Mamba layer, keyed by in-memory state-dict name (``{prefix}.mixer.in_proj.weight`` ...).

    Args:
        config: the (unpruned) Nemotron-H config (geometry, ``use_bias``, ``use_conv_bias``).
        prefix: the layer's state-dict prefix, e.g. ``"model.layers.3"``.
        heads: int64 kept Mamba heads (a multiple of n_groups of them; see :func:`select_mamba_heads`), or None.
        head_dims: int64 kept channels within every head, or None.
        states: int64 kept SSM state channels (the same in every group, for B and C), or None.
        hidden: int64 kept embedding channels, or None.
    Returns:
        ``name -> [Cut, ...]``: ``in_proj`` rows (z, x kept channels; B, C kept states per group; dt kept heads)
        then columns (hidden); ``conv1d.weight``/``bias`` rows (x, B, C); ``A_log``, ``D``, ``dt_bias`` (heads);
        ``norm.weight`` (channels); ``out_proj`` columns (channels) then rows (hidden) and bias; the layer
        norm (hidden). Tensors that keep everything are left out. ``apply_cuts`` on these runs one
        ``gather_slices`` call for the first cuts (all Mamba axes and, alone, the hidden ones) and a second one
        for the second cuts when both change.
    """
    ml = get_adapter(config).mamba_layout(config)
    mamba_change = heads is not None or head_dims is not None or states is not None
    heads = torch.arange(ml.num_heads) if heads is None else _check_index(heads, ml.num_heads, "heads")
    if heads.numel() % ml.n_groups:
        raise ValueError(f"{heads.numel()} kept Mamba heads (--mamba-num-heads) is not a multiple of "
                         f"n_groups={ml.n_groups}")
    dims = torch.arange(ml.head_dim) if head_dims is None else _check_index(head_dims, ml.head_dim, "head_dims")
    st = torch.arange(ml.state_size) if states is None else _check_index(states, ml.state_size, "states")
    if hidden is not None:
        hidden = _check_index(hidden, int(config.hidden_size), "hidden")
    m = f"{prefix}.mixer"
    plan: CutPlan = {}

    def add(name: str, index: torch.Tensor, dim: int) -> None:
        plan.setdefault(name, []).append(Cut(index, dim, 1))

    if mamba_change:
        ch = mamba_channels(heads, dims, ml.head_dim)
        n = ml.state_size
        bc = (torch.arange(ml.n_groups)[:, None] * n + st[None, :]).reshape(-1)  # kept rows of B (or C)
        sp = ml.in_proj_spans()
        rows = torch.cat([sp["z"][0] + ch, sp["x"][0] + ch, sp["B"][0] + bc, sp["C"][0] + bc, sp["dt"][0] + heads])
        add(f"{m}.in_proj.weight", rows, 0)
        if getattr(config, "use_bias", False):
            add(f"{m}.in_proj.bias", rows, 0)
        cs = ml.conv_spans()
        conv = torch.cat([cs["x"][0] + ch, cs["B"][0] + bc, cs["C"][0] + bc])
        add(f"{m}.conv1d.weight", conv, 0)
        if getattr(config, "use_conv_bias", True):
            add(f"{m}.conv1d.bias", conv, 0)
        for name in ("A_log", "D", "dt_bias"):
            add(f"{m}.{name}", heads, 0)
        add(f"{m}.norm.weight", ch, 0)
        add(f"{m}.out_proj.weight", ch, 1)
    if hidden is not None:
        add(f"{m}.in_proj.weight", hidden, 1)
        add(f"{m}.out_proj.weight", hidden, 0)
        if getattr(config, "use_bias", False):
            add(f"{m}.out_proj.bias", hidden, 0)
        add(f"{prefix}.norm.weight", hidden, 0)
    return plan


# ---------------------------------------------------------------------------------------------- plans
@dataclass
class MambaPlan:
    """What Mamba pruning keeps, per layer (``None`` = keep all / not a Mamba layer).

    Attributes:
        heads: per layer, int64 [new mamba_num_heads] kept heads.
        head_dims: per layer, int64 [new mamba_head_dim] kept channels within every head.
        states: per layer, int64 [new ssm_state_size] kept state channels (every group).
        sizes: the new ``mamba_num_heads``, ``mamba_head_dim``, ``ssm_state_size``.
        group_aware: whether heads were chosen within their groups.
    """

    heads: list[Optional[torch.Tensor]]
    head_dims: list[Optional[torch.Tensor]]
    states: list[Optional[torch.Tensor]]
    sizes: dict[str, int]
    group_aware: bool = True
    meta: dict = field(default_factory=dict)

    def changes(self) -> bool:
        """Whether any Mamba layer is cut."""
        return any(x is not None for x in self.heads + self.head_dims + self.states)


def validate_mamba_targets(config: Any, *, mamba_num_heads: Optional[int] = None,
                           mamba_head_dim: Optional[int] = None, ssm_state_size: Optional[int] = None) -> dict[str, int]:
    """Check Mamba targets against ``config`` before any work; returns the new sizes.

    Raises ``TypeError``/``ValueError`` naming the flag (``--mamba-num-heads``, ``--mamba-head-dim``,
    ``--ssm-state-size``): not an int in [1, current]; heads not a multiple of ``n_groups``; a model without
    Mamba layers; the pruned config refused by transformers.
    """
    config = getattr(config, "config", config)
    adapter = get_adapter(config)
    if not isinstance(adapter, NemotronHAdapter):
        raise ValueError(f"Mamba pruning targets need a hybrid model with Mamba layers; {adapter.model_type} has none")
    ml = adapter.mamba_layout(config)
    current = {"mamba_num_heads": ml.num_heads, "mamba_head_dim": ml.head_dim, "ssm_state_size": ml.state_size}
    flags = {"mamba_num_heads": "--mamba-num-heads", "mamba_head_dim": "--mamba-head-dim",
             "ssm_state_size": "--ssm-state-size"}
    given = {"mamba_num_heads": mamba_num_heads, "mamba_head_dim": mamba_head_dim, "ssm_state_size": ssm_state_size}
    new = {}
    for name, value in given.items():
        new[name] = current[name] if value is None else _check_count(name, value, current[name], flags[name])
    if new != current and not adapter.layers_of_kind(config, "mamba"):
        raise ValueError("Mamba pruning targets were given but the model has no Mamba (M) layers")
    if new["mamba_num_heads"] % ml.n_groups:
        raise ValueError(f"mamba_num_heads={new['mamba_num_heads']} (--mamba-num-heads) is not a multiple of "
                         f"n_groups={ml.n_groups}: every SSM group must keep the same number of heads")
    if new != current:
        adapter.check_config(adapter.pruned_config(config, **new))
    return new


def _layer_scores(scores: Any, l: int, shape: tuple[int, ...], name: str) -> torch.Tensor:
    if scores is None:
        raise TypeError(f"{name} are needed to choose what to keep (estimate them with MambaImportance)")
    if not isinstance(scores, (Mapping, Sequence, torch.Tensor)):
        raise TypeError(f"{name} must be a tensor [num_layers, ...] or a mapping layer -> tensor")
    s = scores[l]
    if not isinstance(s, torch.Tensor) or tuple(s.shape) != shape:
        raise ValueError(f"{name} of layer {l} must be a tensor of shape {list(shape)}")
    return s


def plan_mamba(config: Any, head_scores: Any = None, channel_scores: Any = None, *,
               mamba_num_heads: Optional[int] = None, mamba_head_dim: Optional[int] = None,
               group_aware: bool = True, head_dim_agg: str = "l2") -> MambaPlan:
    """Choose the kept heads / head channels of every Mamba layer (validates first; no model needed).

    Args:
        config: the Nemotron-H config.
        head_scores: per layer [mamba_num_heads] head importance: a [num_layers, H] tensor or ``{layer: tensor}``
            (only Mamba layers are read), e.g. :meth:`MambaImportance.head_scores`.
        channel_scores: per layer [H, P] channel importance (:meth:`MambaImportance.channel_scores`); needed for
            ``mamba_head_dim``.
        mamba_num_heads, mamba_head_dim: targets (None = keep).
        group_aware: rank heads within their SSM group (True, the Minitron-SSM rule) or over the whole layer.
        head_dim_agg: aggregation of channel scores over the kept heads (:func:`select_mamba_head_dims`).
    """
    if not isinstance(group_aware, bool):
        raise TypeError(f"group_aware must be a bool, got {type(group_aware).__name__}")
    config = getattr(config, "config", config)
    new = validate_mamba_targets(config, mamba_num_heads=mamba_num_heads, mamba_head_dim=mamba_head_dim)
    adapter = get_adapter(config)
    ml = adapter.mamba_layout(config)
    L = len(adapter.layer_kinds(config))
    plan = MambaPlan(heads=[None] * L, head_dims=[None] * L, states=[None] * L, sizes=new, group_aware=group_aware)
    select = select_mamba_heads if group_aware else select_mamba_heads_ignoring_groups
    for l in adapter.layers_of_kind(config, "mamba"):
        heads = None
        if new["mamba_num_heads"] != ml.num_heads:
            heads = select(_layer_scores(head_scores, l, (ml.num_heads,), "Mamba head scores"), ml.n_groups,
                           new["mamba_num_heads"])
            plan.heads[l] = heads
        if new["mamba_head_dim"] != ml.head_dim:
            cs = _layer_scores(channel_scores, l, (ml.num_heads, ml.head_dim), "Mamba channel scores")
            plan.head_dims[l] = select_mamba_head_dims(cs, new["mamba_head_dim"], heads=heads, agg=head_dim_agg)
    return plan


def record_mamba_cuts(adapter: Any, layer: nn.Module, plan: Any, l: int, rec: Any) -> None:
    """Width pruning's hook for a Mamba layer (:func:`minitron.compress.prune._layer_cuts`): record the cuts of
    :func:`mamba_layer_cuts` for ``plan.mamba`` (a :class:`MambaPlan`, or None) and ``plan.hidden``."""
    mp = plan.mamba
    mixer = adapter.mamba(layer)
    cuts = mamba_layer_cuts(mixer.config, rec.names[id(layer)],
                            heads=None if mp is None else mp.heads[l], head_dims=None if mp is None else mp.head_dims[l],
                            states=None if mp is None else mp.states[l], hidden=plan.hidden)
    for name, cs in cuts.items():
        rec.group.setdefault(name, []).extend(cs)


def _layer_prefixes(model: nn.Module) -> list[str]:
    adapter = get_adapter(model)
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(layer)] for layer in adapter.layers(model)]


def mamba_cut_plan(model: nn.Module, plan: MambaPlan, hidden: Optional[torch.Tensor] = None) -> list[CutPlan]:
    """The cuts of every Mamba layer of ``model`` (may live on the ``meta`` device), one ``CutPlan`` per layer
    (empty for the other kinds, and for Mamba layers left whole when ``hidden`` is None)."""
    adapter = get_adapter(model)
    kinds = adapter.layer_kinds(model.config)
    out = []
    for l, prefix in enumerate(_layer_prefixes(model)):
        if kinds[l] != "mamba":
            out.append({})
            continue
        out.append(mamba_layer_cuts(model.config, prefix, heads=plan.heads[l], head_dims=plan.head_dims[l],
                                    states=plan.states[l], hidden=hidden))
    return out


def apply_cuts_nd(tensors: list[torch.Tensor], cuts: list[list[Cut]], backend: str) -> list[torch.Tensor]:
    """:func:`~minitron.compress.prune.apply_cuts` for tensors of any rank (``gather_slices`` takes 1-D/2-D only):
    a tensor of rank > 2 (``conv1d.weight`` [C, 1, k]) is cut as its 2-D view ``[shape[0], -1]`` (dim-0 cuts
    only) and given its trailing shape back."""
    flat = []
    for i, (t, cs) in enumerate(zip(tensors, cuts)):
        if t.dim() > 2:
            if any(c.dim != 0 for c in cs):
                raise ValueError(f"tensor {i} of shape {list(t.shape)}: only dim-0 cuts of tensors of rank > 2 are supported")
            t = t.reshape(t.shape[0], -1)
        flat.append(t)
    out = apply_cuts(flat, cuts, backend)
    return [o.reshape(o.shape[0], *t.shape[1:]) if t.dim() > 2 else o for o, t in zip(out, tensors)]


def apply_cut_plan(model: nn.Module, group: CutPlan, backend: str = "auto") -> None:
    """Replace every parameter named in ``group`` by its cut copy (:func:`apply_cuts_nd`: one ``gather_slices``
    call per round of cuts over the whole group)."""
    if not group:
        return
    names = list(group)
    params = [model.get_parameter(n) for n in names]
    with torch.no_grad():
        new = apply_cuts_nd([p.data for p in params], [group[n] for n in names], backend)
    for name, old, tensor in zip(names, params, new):
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, nn.Parameter(tensor, requires_grad=old.requires_grad))


def mamba_config_update(config: Any, sizes: Mapping[str, int]) -> None:
    """Write the new Mamba sizes (``mamba_num_heads``, ``mamba_head_dim``, ``ssm_state_size``) into ``config``.

    Nothing else changes: transformers 5.25 derives ``d_inner = mamba_num_heads * mamba_head_dim`` (the conv
    width, the norm size and its group size ``d_inner / n_groups`` follow) and never reads ``expand``, which is
    left as it was (a Nemotron-H-4B-shaped config keeps ``expand`` although 112 * 64 != 2 * 3072).
    ``n_groups``, ``conv_kernel``, ``chunk_size`` and the time-step settings are unchanged.
    """
    for name in ("mamba_num_heads", "mamba_head_dim", "ssm_state_size"):
        if name in sizes:
            setattr(config, name, int(sizes[name]))


def prune_mamba(model: nn.Module, plan: MambaPlan, *, backend: str = "auto") -> nn.Module:
    """Cut the Mamba layers of ``model`` in place by ``plan`` (one layer at a time), update the config and the
    modules' bookkeeping; returns ``model``. Attention/MLP/embedding axes are untouched."""
    adapter = get_adapter(model)
    if not isinstance(adapter, NemotronHAdapter):
        raise TypeError(f"prune_mamba needs a Nemotron-H model, got {adapter.model_type}")
    adapter.check_model(model)
    if not isinstance(plan, MambaPlan):
        raise TypeError(f"plan must be a MambaPlan (plan_mamba), got {type(plan).__name__}")
    if len(plan.heads) != len(adapter.layers(model)):
        raise ValueError(f"plan has {len(plan.heads)} layers, the model {len(adapter.layers(model))}")
    candidate = copy.deepcopy(model.config)
    mamba_config_update(candidate, plan.sizes)
    adapter.check_config(candidate)
    if not plan.changes():
        return model
    for group in mamba_cut_plan(model, plan):
        apply_cut_plan(model, group, backend)
    mamba_config_update(model.config, plan.sizes)
    adapter.sync_module_attributes(model)
    log.info("prune_mamba: %s (group_aware=%s)", plan.sizes, plan.group_aware)
    return model


# ---------------------------------------------------------------------------------------------- importance
class MambaImportance:
    """Mamba head / channel importance of every Mamba layer, from the mixer's output before ``out_proj``.

    Per Mamba layer ``l``: ``heads[l]`` = ``ImportanceAccumulator(H, group_size=P)`` and ``channels[l]`` =
    ``ImportanceAccumulator(H * P)``, both fed the input of ``mixer.out_proj`` ``[batch, seq, H * P]``
    (head-major) by a forward pre-hook, masked by :attr:`mask` (set it to the batch's ``[batch, seq]``
    attention mask before each forward; None = every token counts). Hooks record only while :attr:`active`.

    Usage::

        imp = MambaImportance(model, seq_agg="mean", batch_agg="l2")
        imp.attach()
        for b in batches:
            imp.mask = b["attention_mask"].bool(); model(**b)
        imp.detach()
        plan = plan_mamba(model.config, imp.head_scores(), imp.channel_scores(), mamba_num_heads=...)
    """

    def __init__(self, model: nn.Module, *, seq_agg: str = "mean", batch_agg: str = "l2", backend: str = "auto",
                 device: Optional[torch.device] = None, owner: Any = None) -> None:
        from minitron.ops import ImportanceAccumulator

        adapter = get_adapter(model)
        if not isinstance(adapter, NemotronHAdapter):
            raise TypeError(f"MambaImportance needs a Nemotron-H model, got {adapter.model_type}")
        self.model, self.adapter = model, adapter
        self.layout: MambaLayout = adapter.mamba_layout(model.config)
        self.num_layers = len(adapter.layer_kinds(model.config))
        self.layer_ids = adapter.layers_of_kind(model.config, "mamba")
        if device is None:
            device = next(model.parameters()).device
        kw: dict[str, Any] = {"seq_agg": seq_agg, "batch_agg": batch_agg, "device": device, "backend": backend}
        ml = self.layout
        self.heads = {l: ImportanceAccumulator(ml.num_heads, group_size=ml.head_dim, **kw) for l in self.layer_ids}
        self.channels = {l: ImportanceAccumulator(ml.d_inner, **kw) for l in self.layer_ids}
        self.mask: Optional[torch.Tensor] = None
        self.active = True
        #: where the hooks read ``mask`` and ``active`` (the importance collector, or this object)
        self.owner = self if owner is None else owner
        self.handles: list[Any] = []

    def attach(self) -> None:
        """Register the forward pre-hooks on every Mamba layer's ``out_proj``."""
        layers = self.adapter.layers(self.model)
        for l in self.layer_ids:
            self.handles.append(self.adapter.mamba_out_proj(layers[l]).register_forward_pre_hook(self._hook(l)))

    def detach(self) -> None:
        """Remove the hooks."""
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _hook(self, l: int) -> Any:
        def hook(module: nn.Module, args: tuple) -> None:
            if self.owner.active:
                x, mask = args[0], self.owner.mask
                self.heads[l].update(x, mask)
                self.channels[l].update(x, mask)

        return hook

    def all_reduce(self, group: Any = None) -> None:
        """Combine the accumulators across the ranks of ``group`` (collective)."""
        for l in self.layer_ids:
            self.heads[l].all_reduce(group)
            self.channels[l].all_reduce(group)

    def head_scores(self, value: Any = None) -> torch.Tensor:
        """fp32 CPU [num_layers, H]: per-head scores of the Mamba layers, 0 on the other layers (``value(acc,
        where)`` reads an accumulator; default ``acc.value()``)."""
        out = torch.zeros(self.num_layers, self.layout.num_heads)
        for l in self.layer_ids:
            out[l] = self._value(value, self.heads[l], f"Mamba heads of layer {l}")
        return out

    def channel_scores(self, value: Any = None) -> torch.Tensor:
        """fp32 CPU [num_layers, H, P]: per-channel scores of the Mamba layers, 0 on the other layers."""
        ml = self.layout
        out = torch.zeros(self.num_layers, ml.num_heads, ml.head_dim)
        for l in self.layer_ids:
            out[l] = self._value(value, self.channels[l], f"Mamba channels of layer {l}").view(ml.num_heads, ml.head_dim)
        return out

    @staticmethod
    def _value(value: Any, acc: Any, where: str) -> torch.Tensor:
        return (acc.value() if value is None else value(acc, where)).float().cpu()

    def scores(self, value: Any = None) -> dict[str, torch.Tensor]:
        """``{"mamba_heads": [L, H], "mamba_channels": [L, H, P]}`` (the :class:`ImportanceScores` fields)."""
        return {"mamba_heads": self.head_scores(value), "mamba_channels": self.channel_scores(value)}
