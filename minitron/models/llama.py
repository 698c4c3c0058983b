"""Llama adapter: the reference layout (separate q/k/v/o and gate/up/down projections)."""
from __future__ import annotations

from typing import Any

from minitron.models.base import ModelAdapter


class LlamaAdapter(ModelAdapter):
    """Llama (``LlamaForCausalLM``).

    transformers' ``LlamaConfig`` refuses ``hidden_size % num_attention_heads != 0`` even with an
    explicit ``head_dim`` (at construction and at ``from_pretrained``), so such a pruned shape cannot be
    saved as a Llama checkpoint and is refused up front.
    """

    model_type = "llama"

    def check_config(self, config: Any) -> None:
        if int(config.hidden_size) % int(config.num_attention_heads) != 0:
            raise ValueError(
                f"llama checkpoints require hidden_size % num_attention_heads == 0 (transformers' "
                f"LlamaConfig refuses it even with an explicit head_dim); got hidden_size="
                f"{config.hidden_size}, num_attention_heads={config.num_attention_heads}"
            )
        super().check_config(config)
