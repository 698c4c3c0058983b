"""Published architectures (shapes only, no weights) and the papers' pruning targets as named presets.

``architectures/<name>.json`` holds ``{"name", "description", "source", "config": <config.json dict>}``;
``architectures/presets.json`` holds the Minitron targets ``{preset: {"base", "source", "width": {sizes} or
null, "num_hidden_layers"}}``. Shapes are facts of the published checkpoints (each file's ``source`` names the
published config.json it reproduces: Llama-3.1-8B, Mistral-NeMo-12B, Qwen3-8B, and the mixtures of experts
Qwen3-30B-A3B and Mixtral-8x7B-v0.1); use them to write
random-weight checkpoints of the real sizes (``benchmarks/write_checkpoint.py``) or to check a plan.

Example::

    from minitron.resources.architectures import load_architecture, pruning_preset
    config = load_architecture("llama-3.1-8b")           # a transformers LlamaConfig
    preset = pruning_preset("llama-3.1-minitron-4b-width")  # {"base": ..., "width": {...}, ...}
"""
from __future__ import annotations

import copy
import importlib.resources
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = ["architecture_names", "architecture_dict", "load_architecture", "preset_names", "pruning_preset",
           "architectures_dir"]


def architectures_dir() -> Path:
    """The shipped ``architectures/`` directory."""
    return Path(str(importlib.resources.files("minitron.resources").joinpath("architectures")))


def architecture_names() -> list[str]:
    """Names of the shipped architectures (e.g. ``llama-3.1-8b``)."""
    return sorted(p.stem for p in architectures_dir().glob("*.json") if p.stem != "presets")


@lru_cache(maxsize=None)
def _read(name: str) -> dict[str, Any]:
    p = architectures_dir() / f"{name}.json"
    if not p.is_file():
        raise KeyError(f"unknown architecture {name!r}; available: {', '.join(architecture_names())}")
    return json.loads(p.read_text(encoding="utf-8"))


def architecture_dict(name: str) -> dict[str, Any]:
    """The ``config.json`` dict of architecture ``name`` (a copy)."""
    return copy.deepcopy(_read(name)["config"])


def load_architecture(name: str) -> Any:
    """Architecture ``name`` as a transformers config (``AutoConfig.for_model``)."""
    from transformers import AutoConfig

    cfg = architecture_dict(name)
    model_type = cfg.pop("model_type")
    return AutoConfig.for_model(model_type, **cfg)


@lru_cache(maxsize=None)
def _presets() -> dict[str, Any]:
    return json.loads((architectures_dir() / "presets.json").read_text(encoding="utf-8"))


def preset_names() -> list[str]:
    """Names of the pruning presets (the papers' targets)."""
    return sorted(_presets())


def pruning_preset(name: str) -> dict[str, Any]:
    """Preset ``name``: ``{"base": architecture, "width": {hidden_size, intermediate_size,
    num_attention_heads, num_key_value_heads, or for mixtures of experts num_experts, moe_intermediate_size,
    shared_expert_intermediate_size; any subset} or None, "num_hidden_layers": int, "source": str}`` (a copy)."""
    presets = _presets()
    if name not in presets:
        raise KeyError(f"unknown pruning preset {name!r}; available: {', '.join(sorted(presets))}")
    return copy.deepcopy(presets[name])
