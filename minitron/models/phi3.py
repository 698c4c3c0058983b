"""Phi-3 adapter: fused ``qkv_proj`` (rows [q | k | v]) and ``gate_up_proj`` (``chunk(2)``, gate first)."""
from __future__ import annotations

from typing import Any

from torch import nn

from minitron.models.base import Dims, ModelAdapter, RowSpan


class Phi3Adapter(ModelAdapter):
    """Phi-3 (``Phi3ForCausalLM``).

    ``Phi3Config`` has no ``head_dim`` field (an explicit one is kept as an extra attribute and used by
    the modeling code). With longrope (the 128k variants) the config validator derives the rotary size
    from hidden_size // num_attention_heads and ignores ``head_dim``, so a pruned shape that changes that
    ratio's rotary size is refused up front.
    """

    model_type = "phi3"

    def query_rows(self, layer: nn.Module, dims: Dims) -> RowSpan:
        return RowSpan(self.attention(layer).qkv_proj, 0, dims.num_attention_heads, dims.head_dim)

    def key_rows(self, layer: nn.Module, dims: Dims) -> RowSpan:
        start = dims.num_attention_heads * dims.head_dim
        return RowSpan(self.attention(layer).qkv_proj, start, dims.num_key_value_heads, dims.head_dim)

    def value_rows(self, layer: nn.Module, dims: Dims) -> RowSpan:
        start = (dims.num_attention_heads + dims.num_key_value_heads) * dims.head_dim
        return RowSpan(self.attention(layer).qkv_proj, start, dims.num_key_value_heads, dims.head_dim)

    def gate_rows(self, layer: nn.Module, dims: Dims) -> RowSpan:
        return RowSpan(self.mlp(layer).gate_up_proj, 0, dims.intermediate_size, 1)

    def up_rows(self, layer: nn.Module, dims: Dims) -> RowSpan:
        return RowSpan(self.mlp(layer).gate_up_proj, dims.intermediate_size, dims.intermediate_size, 1)

    def attention_inputs(self, layer: nn.Module) -> list[nn.Linear]:
        return [self.attention(layer).qkv_proj]

    def mlp_inputs(self, layer: nn.Module) -> list[nn.Linear]:
        return [self.mlp(layer).gate_up_proj]

    def check_config(self, config: Any) -> None:
        rope = getattr(config, "rope_parameters", None) or {}
        factors = [rope.get(k) for k in ("short_factor", "long_factor") if isinstance(rope, dict)]
        lengths = {len(f) for f in factors if isinstance(f, (list, tuple))}
        if lengths:
            prf = float(rope.get("partial_rotary_factor", 1.0) or 1.0)
            rotary = int(int(config.hidden_size) // int(config.num_attention_heads) * prf)
            if any(rotary // 2 != n for n in lengths):
                raise ValueError(
                    "phi3 with longrope: transformers validates the rope factors against "
                    "hidden_size // num_attention_heads (ignoring head_dim), so this pruned shape "
                    f"(hidden_size={config.hidden_size}, num_attention_heads="
                    f"{config.num_attention_heads} -> rotary size {rotary}) does not match the "
                    f"{sorted(lengths)} factors per rotary pair of the checkpoint; keep "
                    "hidden_size / num_attention_heads equal to the original ratio"
                )
        super().check_config(config)
