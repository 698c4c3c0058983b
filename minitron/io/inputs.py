"""Resolving the inputs of a command before any work: checkpoint paths, configs, tokenizers, data arguments.

Models are given as checkpoint paths (a transformers checkpoint directory, the output directory of a
training command whose final model lives in ``<dir>/model``, or a hub name) or as loaded modules.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional, Tuple, Union

import torch

from minitron.io.data import check_seq_len, max_positions

log = logging.getLogger(__name__)

__all__ = ["ModelLike", "MODEL_SUBDIR", "DEFAULT_SEQ_LEN", "is_path", "looks_local", "resolve_model_path",
           "read_config", "load_model_like", "load_tokenizer_arg", "default_seq_len", "check_data_arg"]

ModelLike = Union[str, os.PathLike, torch.nn.Module]
MODEL_SUBDIR = "model"
DEFAULT_SEQ_LEN = 512


def is_path(x: Any) -> bool:
    """Whether ``x`` is a str or os.PathLike."""
    return isinstance(x, (str, os.PathLike))


def resolve_model_path(path: Union[str, os.PathLike]) -> str:
    """A checkpoint directory, the ``model/`` inside a training output directory, or a hub name."""
    p = Path(path)
    if (p / "config.json").is_file():
        return str(p)
    if (p / MODEL_SUBDIR / "config.json").is_file():
        return str(p / MODEL_SUBDIR)
    if p.exists():
        raise ValueError(
            f"{str(p)!r} is not a transformers checkpoint (no config.json in it or in {MODEL_SUBDIR}/); "
            "if it is a training output, the run has not finished"
        )
    return str(path)


def read_config(model: ModelLike) -> Any:
    """The model's config without loading weights."""
    if isinstance(model, torch.nn.Module):
        if not hasattr(model, "config"):
            raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
        return model.config
    if not is_path(model):
        raise TypeError(f"model must be a path, a hub name or a transformers model, got {type(model).__name__}")
    from transformers import AutoConfig

    from minitron.models import get_adapter

    path = resolve_model_path(model)
    if not Path(path).exists() and looks_local(str(model)):
        raise FileNotFoundError(f"model checkpoint {str(model)!r} does not exist")
    config = AutoConfig.from_pretrained(path)
    get_adapter(config)
    return config


def looks_local(s: str) -> bool:
    return s.startswith((".", "/", "~")) or s.count("/") > 1


def load_model_like(model: ModelLike, tokenizer: Any = None) -> Tuple[torch.nn.Module, Any, Optional[str]]:
    """(module, tokenizer, source path or None)."""
    from minitron.io.checkpoint import load_model

    if isinstance(model, torch.nn.Module):
        return model, load_tokenizer_arg(tokenizer), None
    path = resolve_model_path(model)
    module, tok = load_model(path)
    if tokenizer is not None:
        tok = load_tokenizer_arg(tokenizer)
    return module, tok, path


def load_tokenizer_arg(tokenizer: Any) -> Any:
    if tokenizer is None or not is_path(tokenizer):
        return tokenizer
    from minitron.io.tokenizer import load_tokenizer

    p = Path(tokenizer)
    if not p.is_dir():
        raise FileNotFoundError(f"tokenizer directory {str(p)!r} does not exist")
    return load_tokenizer(p)


def default_seq_len(seq_len: Optional[int], *configs: Any) -> int:
    if seq_len is not None:
        return check_seq_len(seq_len, *configs)
    limits = [m for m in (max_positions(c) for c in configs) if m is not None]
    return min([DEFAULT_SEQ_LEN] + limits)


def check_data_arg(name: str, data: Any, *, required: bool = True) -> None:
    from minitron.io.data import FORMAT_BY_EXTENSION

    if data is None:
        if required:
            raise ValueError(f"{name} is required")
        return
    if is_path(data):
        s = os.fspath(data)
        p = Path(s).expanduser()
        if not p.exists() and (os.path.splitext(s)[1].lower() in FORMAT_BY_EXTENSION or looks_local(s)):
            raise FileNotFoundError(f"{name}: data path {s!r} does not exist")


