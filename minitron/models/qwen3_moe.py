"""Qwen3-MoE adapter: the Qwen3 attention (per-head ``q_norm``/``k_norm``) with fused routed experts."""
from __future__ import annotations

from minitron.models.base import MoeAdapter


class Qwen3MoeAdapter(MoeAdapter):
    """Qwen3-MoE (``Qwen3MoeForCausalLM``, e.g. Qwen3-30B-A3B).

    MoE layers: ``mlp.experts.gate_up_proj`` [num_experts, 2 * moe_intermediate_size, hidden] (gate rows first),
    ``mlp.experts.down_proj`` [num_experts, hidden, moe_intermediate_size], router ``mlp.gate.weight``
    [num_experts, hidden] (softmax, top-``num_experts_per_tok``, renormalised when ``norm_topk_prob``; no bias).
    Layers listed in ``mlp_only_layers`` or off the ``decoder_sparse_step`` grid hold a dense MLP of
    ``intermediate_size``. ``Qwen3MoeConfig`` has no ``head_dim`` field: pruning writes it as an extra attribute,
    which the attention reads.
    """

    model_type = "qwen3_moe"
