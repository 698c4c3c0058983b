"""Qwen3 adapter: the Llama layout with per-head ``q_norm``/``k_norm``."""
from __future__ import annotations

from minitron.models.base import ModelAdapter


class Qwen3Adapter(ModelAdapter):
    """Qwen3 (``Qwen3ForCausalLM``).

    ``q_norm``/``k_norm`` act on head_dim, shared by every head, so head pruning leaves them unchanged.
    ``head_dim`` is usually not hidden_size // num_attention_heads. ``layer_types`` and
    ``max_window_layers`` are cut with the layers on depth pruning.
    """

    model_type = "qwen3"
