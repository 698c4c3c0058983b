"""Importance of mixture-of-experts layers: per routed expert and per neuron of each expert, on the fly.

Tokens reach experts raggedly (top-k routing), so the expert scores are *grouped* (segment) reductions, computed
by :class:`minitron.ops.grouped_importance.GroupedImportanceAccumulator` (one group per expert). During the
calibration pass the forward of every fused ``experts`` module (``gate_up_proj`` [E, 2I, H], ``down_proj``
[E, H, I]) is replaced by :func:`_experts_forward`, which computes the layer's output with the very operations of
transformers' default ``grouped_mm`` experts implementation (rows sorted by expert, one grouped matmul for
gate/up and one for down; the model's outputs are bitwise those of the unhooked model) and, on the way, feeds:

* **expert_neurons** ``[E, I]``: ``act(gate) * up`` of every routed row, one segment per (expert, sample) in the
  order of :func:`~minitron.ops.grouped_importance.grouped_segments` (padding excluded), aggregated over the tokens
  routed to that expert with the run's ``seq_agg`` and over samples with its ``batch_agg`` (as dense neurons);
* **experts** ``[E]``: the L2 norm of the router-weighted expert output ``w * down(act(gate) * up)`` per routed row,
  aggregated with ``seq_agg="l2"`` and ``batch_agg="l2"``, i.e. the L2 norm over every routed calibration token:
  how much the expert writes into the residual stream (Model-Optimizer's criterion);
* **expert_frequency** ``[E]``: routed rows per expert / counted calibration tokens.

A shared expert (Qwen2-MoE) is a dense MLP: its neurons are scored from the input of its ``down_proj`` like the
dense MLP neurons. The streamed and distributed paths use the same capture and all-reduce the accumulators.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch import nn

from minitron.models.base import MoeAdapter

log = logging.getLogger(__name__)

__all__ = ["MoeCapture", "EXPERT_SEQ_AGG", "EXPERT_BATCH_AGG"]

#: Aggregations of the per-expert output norms: the L2 norm over all routed tokens.
EXPERT_SEQ_AGG = "l2"
EXPERT_BATCH_AGG = "l2"


def _check_experts_module(experts: nn.Module, where: str) -> None:
    """The capture handles transformers' fused gated experts without biases (Qwen2/3-MoE, Mixtral)."""
    problems = []
    if getattr(experts, "has_gate", True) is not True:
        problems.append("no gate")
    if getattr(experts, "has_bias", False):
        problems.append("biases")
    if getattr(experts, "is_transposed", False):
        problems.append("transposed weights")
    if getattr(experts, "has_post_expert_norm", False):
        problems.append("a post-expert norm")
    if problems:
        raise NotImplementedError(f"{where}: experts with {', '.join(problems)} are not supported by the MoE capture")


def _grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``x`` rows (sorted by expert; ``offsets`` cumulative row counts, int32 [E]) times each expert's
    ``weight[e]`` [out, in] transposed: transformers' grouped linear (its ``grouped_mm`` experts path)."""
    from transformers.integrations.moe import _grouped_linear as hf_grouped_linear

    return hf_grouped_linear(x, weight, offsets)


def _experts_forward(experts: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                     top_k_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The experts' output [T, H] as transformers' ``grouped_mm`` experts forward computes it, plus, per routed row
    in that forward's (expert-sorted) order: ``act(gate) * up`` [T*k, I], the router-weighted output [T*k, H], and
    the position of flat (token * k + slot) entry in that order (``inv_perm`` [T*k])."""
    num_experts = int(experts.num_experts)
    k, T, H = top_k_index.size(-1), hidden.size(0), hidden.size(-1)
    sample_weights = top_k_weights.reshape(-1)
    expert_ids = top_k_index.reshape(-1)
    expert_ids_g, perm = torch.sort(expert_ids)
    x = hidden[perm // k]
    w = sample_weights[perm]
    histc_input = expert_ids_g.float() if hidden.device.type in ("cpu", "mps") else expert_ids_g.int()
    per_expert = torch.histc(histc_input, bins=num_experts, min=0, max=num_experts - 1)
    offsets = torch.cumsum(per_expert, dim=0, dtype=torch.int32)
    act = experts._apply_gate(_grouped_linear(x, experts.gate_up_proj, offsets))
    weighted = _grouped_linear(act, experts.down_proj, offsets) * w.unsqueeze(-1)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.size(0), device=perm.device)
    out = weighted[inv_perm].view(T, k, H).sum(dim=1).to(hidden.dtype)
    return out, act, weighted, inv_perm


class _LayerCapture:
    """The accumulators and hooks of one MoE layer."""

    def __init__(self, owner: "MoeCapture", index: int, layer: nn.Module, num_experts: int, width: int,
                 hidden: int, shared: Optional[int], kw: dict) -> None:
        from minitron.ops import ImportanceAccumulator
        from minitron.ops.grouped_importance import GroupedImportanceAccumulator

        self.owner, self.index, self.layer, self.num_experts = owner, index, layer, num_experts
        self.neurons = GroupedImportanceAccumulator(num_experts, width, **kw)
        # one unit of `hidden` channels: its magnitude is the L2 norm of the router-weighted output row
        self.experts = GroupedImportanceAccumulator(num_experts, 1, group_size=hidden,
                                                    **{**kw, "seq_agg": EXPERT_SEQ_AGG, "batch_agg": EXPERT_BATCH_AGG})
        self.shared = None if shared is None else ImportanceAccumulator(shared, **kw)
        self.shape: Optional[tuple[int, int]] = None

    def block_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        h = args[0] if args else kwargs.get("hidden_states")
        self.shape = (int(h.shape[0]), int(h.shape[1]))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        experts = self.owner.adapter.experts(self.layer)
        out, act, weighted, inv_perm = _experts_forward(experts, hidden_states, top_k_index, top_k_weights)
        if self.owner.collector.active:
            self._record(act, weighted, inv_perm, top_k_index)
        return out

    def _record(self, act: torch.Tensor, weighted: torch.Tensor, inv_perm: torch.Tensor,
                top_k_index: torch.Tensor) -> None:
        from minitron.ops.grouped_importance import grouped_segments

        if self.shape is None:
            raise RuntimeError(f"MoE capture of layer {self.index}: the experts ran outside their MoE block")
        B, S = self.shape
        k = top_k_index.size(-1)
        mask = self.owner.collector.mask
        _, slot, offsets = grouped_segments(top_k_index.view(B, S, k), self.num_experts, mask=mask)
        rows = inv_perm[slot]  # slot = token * k + j: the flat routing entry; inv_perm: its row in act/weighted
        self.neurons.update(act[rows], offsets)
        self.experts.update(weighted[rows], offsets)

    def shared_pre_hook(self, module: nn.Module, args: tuple) -> None:
        if self.owner.collector.active and self.shared is not None:
            x = args[0]
            if x.dim() == 2:  # the MoE block runs its shared expert on the flattened [B*S, H] tokens
                if self.shape is None:
                    raise RuntimeError(f"MoE capture of layer {self.index}: the shared expert ran outside its block")
                x = x.view(*self.shape, x.shape[-1])
            self.shared.update(x, self.owner.collector.mask)


class MoeCapture:
    """Owns the per-MoE-layer expert accumulators of one importance run and the hooks that feed them.

    Args:
        collector: the run's ``_Collector`` (its ``mask`` and ``active`` flag are read at every forward).
        adapter: the model's :class:`~minitron.models.base.MoeAdapter`.
        layers: the decoder layers (modules; may be on the ``meta`` device until loaded).
        config: the model's config.
        kw: ``seq_agg``, ``batch_agg``, ``device``, ``backend`` of the run's accumulators.
        dtype: the activations' dtype (one tiny update proves the grouped backend runs on it, before any forward).
    """

    def __init__(self, collector: Any, adapter: MoeAdapter, layers: list[nn.Module], config: Any, kw: dict,
                 dtype: torch.dtype = torch.float32) -> None:
        from minitron.ops.grouped_importance import GroupedImportanceAccumulator

        probe = GroupedImportanceAccumulator(1, 1, **kw)
        probe.update(torch.zeros(1, 1, device=probe.device, dtype=dtype),
                     torch.tensor([0, 1], dtype=torch.int64, device=probe.device))
        self.collector, self.adapter = collector, adapter
        self.dims = adapter.moe_dims(config)
        m = self.dims
        self.captures: dict[int, _LayerCapture] = {}
        for i, layer in enumerate(layers):
            if not adapter.is_moe_layer(layer):
                continue
            _check_experts_module(adapter.experts(layer), f"layer {i}")
            self.captures[i] = _LayerCapture(self, i, layer, m.num_experts, m.moe_intermediate_size,
                                             int(config.hidden_size), m.shared_expert_intermediate_size
                                             if adapter.shared_expert(layer) is not None else None, kw)
        self.handles: list[Any] = []
        self.patched: list[nn.Module] = []

    def attach(self) -> None:
        impl = getattr(getattr(self.collector.model, "config", None), "_experts_implementation", "grouped_mm")
        if self.captures and impl not in (None, "grouped_mm"):
            log.info("MoE capture computes the experts as transformers' grouped_mm path; this model uses %r, so its "
                     "outputs during calibration may differ from the unhooked model's in the last bits", impl)
        for cap in self.captures.values():
            layer = cap.layer
            experts = self.adapter.experts(layer)
            experts.forward = cap.forward  # instance attribute: nn.Module.__call__ uses it
            self.patched.append(experts)
            self.handles.append(self.adapter.mlp(layer).register_forward_pre_hook(cap.block_pre_hook, with_kwargs=True))
            shared = self.adapter.shared_expert(layer)
            if shared is not None:
                self.handles.append(shared.down_proj.register_forward_pre_hook(cap.shared_pre_hook))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for experts in self.patched:
            experts.__dict__.pop("forward", None)
        self.patched.clear()

    def all_reduce(self, group: Any) -> None:
        """Combine every accumulator across the ranks (collective)."""
        from minitron.compress.distributed import collective

        for i, cap in self.captures.items():
            collective(f"all_reduce of the expert-neuron accumulator of layer {i}", lambda: cap.neurons.all_reduce(group))
            collective(f"all_reduce of the expert accumulator of layer {i}", lambda: cap.experts.all_reduce(group))
            if cap.shared is not None:
                collective(f"all_reduce of the shared-expert accumulator of layer {i}",
                           lambda: cap.shared.all_reduce(group))

    def scores(self, num_layers: int, num_tokens: int, value: Any) -> dict[str, Optional[torch.Tensor]]:
        """The expert fields of :class:`~minitron.compress.importance.ImportanceScores` (fp32 CPU); ``value(acc,
        where)`` reads one accumulator; dense layers' rows are 0."""
        m = self.dims
        experts = torch.zeros(num_layers, m.num_experts)
        freq = torch.zeros(num_layers, m.num_experts)
        neurons = torch.zeros(num_layers, m.num_experts, m.moe_intermediate_size)
        shared = None
        if m.shared_expert_intermediate_size is not None and any(c.shared is not None for c in self.captures.values()):
            shared = torch.zeros(num_layers, m.shared_expert_intermediate_size)
        for i, cap in self.captures.items():
            neurons[i] = value(cap.neurons, f"expert neurons of layer {i}")
            experts[i] = value(cap.experts, f"expert outputs of layer {i}").reshape(m.num_experts)
            freq[i] = cap.experts.num_rows.double().cpu().float() / max(int(num_tokens), 1)
            if cap.shared is not None and shared is not None:
                shared[i] = value(cap.shared, f"shared-expert neurons of layer {i}")
        return {"experts": experts, "expert_frequency": freq, "expert_neurons": neurons, "shared_neurons": shared}
