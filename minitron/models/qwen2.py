"""Qwen2 adapter: the Llama layout with q/k/v biases and per-layer ``layer_types``."""
from __future__ import annotations

from minitron.models.base import ModelAdapter


class Qwen2Adapter(ModelAdapter):
    """Qwen2 (``Qwen2ForCausalLM``).

    ``Qwen2Config`` has no ``head_dim`` field: pruning writes it as an extra config attribute, which the
    modeling code reads. ``layer_types`` (sliding vs full attention per layer) and
    ``max_window_layers`` are cut with the layers on depth pruning. The q/k/v biases are cut with their
    heads (the base class cuts any bias with its rows).
    """

    model_type = "qwen2"
