"""Mixtral adapter: Mistral attention with fused routed experts in every layer."""
from __future__ import annotations

from minitron.models.base import MoeAdapter


class MixtralAdapter(MoeAdapter):
    """Mixtral (``MixtralForCausalLM``, e.g. Mixtral-8x7B).

    Every layer is a MoE layer (no dense MLP): ``mlp.experts.gate_up_proj`` [num_local_experts,
    2 * intermediate_size, hidden], ``mlp.experts.down_proj`` [num_local_experts, hidden, intermediate_size],
    router ``mlp.gate.weight`` [num_local_experts, hidden] (softmax, top-``num_experts_per_tok``, always
    renormalised). So the expert width is the config's ``intermediate_size`` and the expert count its
    ``num_local_experts``; pruning takes them as ``moe_intermediate_size`` and ``num_experts``.
    """

    model_type = "mixtral"
    config_fields = {
        "num_experts": "num_local_experts",
        "moe_intermediate_size": "intermediate_size",
        "shared_expert_intermediate_size": None,
    }
    dense_layers_possible = False
