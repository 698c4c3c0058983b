"""Mixtral adapter: Mistral attention with fused routed experts in every layer."""
from __future__ import annotations

import re

from minitron.models.base import MoeAdapter

_MLP = re.compile(r"(\.layers\.\d+)\.mlp\.")


class MixtralAdapter(MoeAdapter):
    """Mixtral (``MixtralForCausalLM``, e.g. Mixtral-8x7B).

    Every layer is a MoE layer (no dense MLP): ``mlp.experts.gate_up_proj`` [num_local_experts,
    2 * intermediate_size, hidden], ``mlp.experts.down_proj`` [num_local_experts, hidden, intermediate_size],
    router ``mlp.gate.weight`` [num_local_experts, hidden] (softmax, top-``num_experts_per_tok``, always
    renormalised). Saved checkpoints name the block ``block_sparse_moe`` and the experts' weights ``w1``/``w3``/``w2``
    (gate/up/down), one tensor per expert. So the expert width is the config's ``intermediate_size`` and the expert count its
    ``num_local_experts``; pruning takes them as ``moe_intermediate_size`` and ``num_experts``.
    """

    model_type = "mixtral"
    config_fields = {
        "num_experts": "num_local_experts",
        "moe_intermediate_size": "intermediate_size",
        "shared_expert_intermediate_size": None,
    }
    dense_layers_possible = False

    def checkpoint_name(self, name: str) -> str:
        """Saved Mixtral checkpoints call each layer's MoE block ``block_sparse_moe`` (the model: ``mlp``)."""
        return _MLP.sub(r"\1.block_sparse_moe.", name)

    def expert_checkpoint_names(self, experts_name: str, e: int) -> tuple[str, str, str]:
        """Mixtral's saved experts: ``w1`` (gate), ``w3`` (up), ``w2`` (down)."""
        p = self.checkpoint_name(experts_name)
        return f"{p}.{e}.w1.weight", f"{p}.{e}.w3.weight", f"{p}.{e}.w2.weight"
