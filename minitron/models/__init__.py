"""Model adapters: where the prunable axes of each supported Hugging Face family live.

``get_adapter(model_or_config)`` returns the adapter for a model, a config or a ``model_type`` string;
any other family raises ``ValueError`` listing :data:`SUPPORTED_MODEL_TYPES`. Adding a family is one
small module with a :class:`~minitron.models.base.ModelAdapter` subclass, registered in ``_ADAPTERS``.
"""
from __future__ import annotations

from typing import Any

from minitron.models.base import Dims, ModelAdapter, RowSpan
from minitron.models.llama import LlamaAdapter
from minitron.models.mistral import MistralAdapter
from minitron.models.phi3 import Phi3Adapter
from minitron.models.qwen2 import Qwen2Adapter
from minitron.models.qwen3 import Qwen3Adapter

_ADAPTERS: dict[str, type[ModelAdapter]] = {
    cls.model_type: cls for cls in (LlamaAdapter, MistralAdapter, Qwen2Adapter, Qwen3Adapter, Phi3Adapter)
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_ADAPTERS)

__all__ = ["SUPPORTED_MODEL_TYPES", "get_adapter", "ModelAdapter", "Dims", "RowSpan"]


def get_adapter(model_or_config: Any) -> ModelAdapter:
    """The adapter for a model (anything with ``.config``), a config, or a ``model_type`` string.

    Raises:
        TypeError: the argument is none of those.
        ValueError: the model type is not supported (the message lists the supported ones).
    """
    if isinstance(model_or_config, str):
        model_type = model_or_config
    else:
        config = getattr(model_or_config, "config", model_or_config)
        model_type = getattr(config, "model_type", None)
        if not isinstance(model_type, str):
            raise TypeError(
                "get_adapter expects a transformers model, a config or a model_type string, got "
                f"{type(model_or_config).__name__}"
            )
    cls = _ADAPTERS.get(model_type)
    if cls is None:
        raise ValueError(
            f"unsupported model type {model_type!r}; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return cls()
