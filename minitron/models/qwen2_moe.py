"""Qwen2-MoE adapter: routed fused experts plus a shared expert behind a sigmoid gate."""
from __future__ import annotations

from minitron.models.base import MoeAdapter


class Qwen2MoeAdapter(MoeAdapter):
    """Qwen2-MoE (``Qwen2MoeForCausalLM``, e.g. Qwen1.5-MoE-A2.7B).

    MoE layers as Qwen3-MoE, plus ``mlp.shared_expert`` (a dense gated MLP of ``shared_expert_intermediate_size``
    with ``gate_proj``/``up_proj``/``down_proj``) whose output is scaled by ``sigmoid(mlp.shared_expert_gate(x))``
    (``shared_expert_gate.weight`` [1, hidden]). q/k/v carry biases (``qkv_bias``); ``layer_types`` and
    ``max_window_layers`` are cut with the layers on depth pruning.
    """

    model_type = "qwen2_moe"
    config_fields = {
        "num_experts": "num_experts",
        "moe_intermediate_size": "moe_intermediate_size",
        "shared_expert_intermediate_size": "shared_expert_intermediate_size",
    }
