"""Model adapters: where the prunable axes of each supported Hugging Face family live.

``get_adapter(model_or_config)`` returns the adapter for a model, a config or a ``model_type`` string;
any other family raises ``ValueError`` listing :data:`SUPPORTED_MODEL_TYPES`. Adding a family is one
small module in this package with a :class:`~minitron.models.base.ModelAdapter` subclass that sets
``model_type``: every module of the package is scanned once at import (:func:`_discover`), so no list
needs editing.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Any

from minitron.models.base import Dims, ModelAdapter, RowSpan

__all__ = ["SUPPORTED_MODEL_TYPES", "get_adapter", "ModelAdapter", "Dims", "RowSpan"]

# the families of the first waves first (their order is the order of SUPPORTED_MODEL_TYPES), then the rest
_FIRST = ("llama", "mistral", "qwen2", "qwen3", "phi3")


def _discover() -> dict[str, type[ModelAdapter]]:
    """``model_type -> adapter class`` for every ModelAdapter subclass defined in a module of this package."""
    names = sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "base" and not m.name.startswith("_"))
    names.sort(key=lambda n: (_FIRST.index(n) if n in _FIRST else len(_FIRST), n))
    found: dict[str, type[ModelAdapter]] = {}
    for name in names:
        module = importlib.import_module(f"{__name__}.{name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, ModelAdapter) and cls.__module__ == module.__name__ and cls.model_type:
                if cls.model_type in found and found[cls.model_type] is not cls:
                    raise RuntimeError(f"two adapters claim model_type {cls.model_type!r}: "
                                       f"{found[cls.model_type].__name__} and {cls.__name__}")
                found[cls.model_type] = cls
    return found


_ADAPTERS: dict[str, type[ModelAdapter]] = _discover()

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_ADAPTERS)

#: model types an adapter refuses with an explanation (``refused_model_types`` of its class), e.g. the image+text
#: ``gemma3`` pointing to the text model ``gemma3_text``
_REFUSED: dict[str, str] = {t: why for cls in _ADAPTERS.values()
                            for t, why in (getattr(cls, "refused_model_types", None) or {}).items()}


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
    if cls is None and model_type in _REFUSED:
        raise ValueError(f"unsupported model type {model_type!r}: {_REFUSED[model_type]}")
    if cls is None:
        raise ValueError(
            f"unsupported model type {model_type!r}; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return cls()
