"""Mistral adapter: the Llama layout (its config has ``head_dim`` and no divisibility rule)."""
from __future__ import annotations

from minitron.models.base import ModelAdapter


class MistralAdapter(ModelAdapter):
    """Mistral (``MistralForCausalLM``); sliding-window attention is a config scalar, nothing per layer."""

    model_type = "mistral"
