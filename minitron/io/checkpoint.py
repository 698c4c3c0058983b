"""Saving and loading plain Hugging Face checkpoints.

:func:`save_model` writes ``save_pretrained`` output (safetensors weights, config.json, generation
config and, when given, the tokenizer) into a temporary sibling directory and renames it into place, so
an interrupted save never leaves a half-written checkpoint under the requested name and never clobbers
the input. The result loads with ``AutoModelForCausalLM.from_pretrained`` in a process that never
imports minitron. :func:`load_model` is the matching loader.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from minitron.io.safety import same_or_inside
from minitron.io.tokenizer import TOKENIZER_FILES, has_tokenizer_files
from minitron.models import get_adapter

log = logging.getLogger(__name__)

__all__ = ["save_model", "load_model", "OutputExistsError", "TOKENIZER_FILES", "has_tokenizer_files"]

class OutputExistsError(FileExistsError, ValueError):
    """The output directory exists and ``overwrite`` was not given (also a ``ValueError``)."""


def save_model(
    model: nn.Module,
    out_dir: Union[str, os.PathLike],
    *,
    tokenizer: Any = None,
    overwrite: bool = False,
    input_path: Optional[Union[str, os.PathLike]] = None,
) -> None:
    """Save ``model`` (and ``tokenizer``) as a plain transformers checkpoint in ``out_dir``, atomically.

    Args:
        model: a transformers ``PreTrainedModel`` (weights saved as safetensors in their dtype).
        out_dir: target directory; must not exist unless ``overwrite``.
        tokenizer: optional tokenizer saved alongside (``save_pretrained``).
        overwrite: replace an existing ``out_dir`` (only after the new checkpoint is fully written).
        input_path: where the model was loaded from; ``out_dir`` may not be it, lie inside it, or
            (with ``overwrite``) contain it.
    Raises:
        TypeError: model or tokenizer without ``save_pretrained``, paths of the wrong type.
        ValueError: out_dir is (or would clobber) input_path, or is an existing file.
        OutputExistsError: out_dir exists and ``overwrite`` is false (a FileExistsError and ValueError).
    """
    if not hasattr(model, "save_pretrained") or not isinstance(model, nn.Module):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if tokenizer is not None and not hasattr(tokenizer, "save_pretrained"):
        raise TypeError(f"tokenizer must have save_pretrained, got {type(tokenizer).__name__}")
    if not isinstance(out_dir, (str, os.PathLike)) or str(out_dir) == "":
        raise TypeError(f"out_dir must be a non-empty path, got {out_dir!r}")
    if input_path is not None and not isinstance(input_path, (str, os.PathLike)):
        raise TypeError(f"input_path must be a path or None, got {type(input_path).__name__}")
    out = Path(out_dir)
    if input_path is not None:
        inp = Path(input_path)
        if same_or_inside(out, inp):
            raise ValueError(
                f"out_dir {str(out)!r} is the input checkpoint {str(inp)!r} or lies inside it; choose another output directory"
            )
        if overwrite and inp.exists() and same_or_inside(inp, out):
            raise ValueError(
                f"overwriting out_dir {str(out)!r} would delete the input checkpoint {str(inp)!r} inside it"
            )
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise ValueError(f"out_dir {str(out)!r} exists and is not a directory")
        if not overwrite:
            raise OutputExistsError(f"out_dir {str(out)!r} already exists; pass overwrite=True to replace it")
    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=str(parent)))
    backup: Optional[Path] = None
    try:
        model.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if out.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=str(parent)))
            backup.rmdir()
            os.replace(out, backup)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if backup is not None and backup.exists() and not out.exists():
            os.replace(backup, out)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
    log.info("saved model%s to %s", " and tokenizer" if tokenizer is not None else "", out)


def _parse_dtype(dtype: Any) -> Any:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        if dtype == "auto":
            return "auto"
        value = getattr(torch, dtype.replace("torch.", ""), None)
        if isinstance(value, torch.dtype) and value.is_floating_point:
            return value
        raise ValueError(f"dtype {dtype!r} is not a torch floating-point dtype name (e.g. 'bfloat16') or 'auto'")
    raise TypeError(f"dtype must be a torch.dtype, a dtype name or None, got {type(dtype).__name__}")


def load_model(path_or_name: Union[str, os.PathLike], *, dtype: Any = None) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer (``None`` when the checkpoint has none).

    Args:
        path_or_name: a local checkpoint directory, or a hub model name (for users with hub access).
        dtype: torch dtype (or its name, or "auto") to load the weights in; None = transformers' default.
    Returns:
        ``(model, tokenizer_or_None)``; the model is in eval mode.
    Raises:
        ValueError: a local directory without config.json, or an unsupported model type (checked from
            the config, before any weights are read).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not isinstance(path_or_name, (str, os.PathLike)) or str(path_or_name) == "":
        raise TypeError(f"path_or_name must be a non-empty path or model name, got {path_or_name!r}")
    torch_dtype = _parse_dtype(dtype)
    p = Path(path_or_name)
    local = p.exists()
    if local:
        if not p.is_dir():
            raise ValueError(f"{str(p)!r} is not a directory")
        if not (p / "config.json").is_file():
            raise ValueError(f"{str(p)!r} is not a transformers checkpoint (no config.json)")
    name = str(path_or_name)
    config = AutoConfig.from_pretrained(name)
    get_adapter(config)  # refuse unsupported families before reading weights
    kwargs: dict[str, Any] = {}
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    model.eval()
    tokenizer = None
    if local:
        if has_tokenizer_files(p):
            tokenizer = AutoTokenizer.from_pretrained(name)
        else:
            log.info("%s holds no tokenizer files; returning no tokenizer", p)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as exc:
            log.warning("no tokenizer for %s: %s", name, exc)
        if tokenizer is not None and len(tokenizer) == 0:
            tokenizer = None
    return model, tokenizer
