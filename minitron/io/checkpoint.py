"""Saving and loading plain Hugging Face checkpoints.

:func:`save_model` writes ``save_pretrained`` output (safetensors weights, config.json, generation
config) plus the tokenizer into a temporary sibling directory and renames it into place, so an
interrupted save never leaves a half-written checkpoint under the requested name and never clobbers
the input. The tokenizer files of the source checkpoint are copied byte for byte (re-saving through
``AutoTokenizer`` can rewrite ``tokenizer.json``, e.g. a Qwen2 normaliser and split pattern, so the
output would tokenize differently). The result loads with ``AutoModelForCausalLM.from_pretrained``
in a process that never imports minitron.

:func:`load_model` is strict: corrupt or truncated ``config.json`` / safetensors files, missing,
unexpected or mis-shaped tensors and non-finite weights are refused with an error naming the file
and the tensor.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from minitron.io.files import make_temp_dir, read_json, normalize_permissions, publish_dir, remove_stale_temporaries
from minitron.io.safety import OutputExistsError, same_or_inside
from minitron.io.tokenizer import TOKENIZER_FILES, has_tokenizer_files
from minitron.models import get_adapter

log = logging.getLogger(__name__)

__all__ = ["save_model", "load_model", "OutputExistsError", "TOKENIZER_FILES", "has_tokenizer_files",
           "copy_tokenizer_files", "check_checkpoint_files", "CorruptFileError", "CheckpointError"]

#: Files written by a tokenizer's ``save_pretrained`` (copied verbatim from a source checkpoint).
TOKENIZER_AUX_FILES = TOKENIZER_FILES + ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                                         "merges.txt", "chat_template.jinja", "chat_template.json",
                                         "preprocessor_config.json")


class CorruptFileError(ValueError):
    """A checkpoint / importance / JSON file cannot be parsed (corrupt or truncated)."""


class CheckpointError(ValueError):
    """A checkpoint whose tensors do not match its config, or hold non-finite values."""


class MissingCheckpointFileError(CorruptFileError, CheckpointError, FileNotFoundError):
    """A checkpoint folder that is not there, or lacks its config, its weights or a shard its index names.

    Both a ValueError (an unusable checkpoint, as :class:`CorruptFileError` / :class:`CheckpointError`) and a
    FileNotFoundError (what is missing is a file), so callers may catch either."""


def copy_tokenizer_files(src: Union[str, os.PathLike], dst: Union[str, os.PathLike]) -> list[str]:
    """Copy the tokenizer files of directory ``src`` into ``dst`` byte for byte; returns their names."""
    src, dst = Path(src), Path(dst)
    names = []
    for name in TOKENIZER_AUX_FILES:
        f = src / name
        if f.is_file():
            shutil.copyfile(f, dst / name)
            names.append(name)
    return names


def save_model(
    model: nn.Module,
    out_dir: Union[str, os.PathLike],
    *,
    tokenizer: Any = None,
    tokenizer_dir: Optional[Union[str, os.PathLike]] = None,
    overwrite: bool = False,
    input_path: Optional[Union[str, os.PathLike]] = None,
) -> None:
    """Save ``model`` (and its tokenizer) as a plain transformers checkpoint in ``out_dir``, atomically.

    Args:
        model: a transformers ``PreTrainedModel`` (weights saved as safetensors in their dtype).
        out_dir: target directory; must not exist unless ``overwrite``.
        tokenizer: optional tokenizer saved alongside (``save_pretrained``) when ``tokenizer_dir`` is None.
        tokenizer_dir: a directory whose tokenizer files are copied verbatim (preferred: byte-identical).
        overwrite: replace an existing ``out_dir`` (only after the new checkpoint is fully written).
        input_path: where the model was loaded from; ``out_dir`` may not be it, lie inside it, or
            contain it.
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
    for name, inp in (("input checkpoint", input_path), ("tokenizer directory", tokenizer_dir)):
        if inp is None or not Path(inp).exists():
            continue
        if same_or_inside(out, inp):
            raise ValueError(f"out_dir {str(out)!r} is the {name} {str(inp)!r} or lies inside it; choose another output directory")
        if same_or_inside(inp, out):
            raise ValueError(f"out_dir {str(out)!r} contains the {name} {str(inp)!r}; choose another output directory")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise ValueError(f"out_dir {str(out)!r} exists and is not a directory")
        if not overwrite:
            raise OutputExistsError(f"out_dir {str(out)!r} already exists; pass overwrite=True to replace it")
    remove_stale_temporaries(out)
    tmp = make_temp_dir(out)
    try:
        model.save_pretrained(str(tmp))
        copied = copy_tokenizer_files(tokenizer_dir, tmp) if tokenizer_dir is not None else []
        if not copied and tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        normalize_permissions(tmp)
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved model%s to %s", " and tokenizer" if tokenizer is not None or tokenizer_dir else "", out)


def _read_json(path: Path, what: str) -> Any:
    try:
        return read_json(path, what)
    except ValueError as e:
        raise CorruptFileError(str(e)) from None


def check_checkpoint_files(directory: Union[str, os.PathLike]) -> list[Path]:
    """Parse ``config.json`` and every safetensors header of a checkpoint directory (no tensor data read).

    Returns:
        The safetensors files.
    Raises:
        CorruptFileError: a file that is corrupt or truncated (named).
        ValueError: no weights at all, or only pickle (``.bin``) weights.
    """
    from safetensors import safe_open

    d = Path(directory)
    _read_json(d / "config.json", "config file")
    index = d / "model.safetensors.index.json"
    if index.is_file():
        idx = _read_json(index, "weight index")
        names = sorted(set((idx.get("weight_map") or {}).values()))
        files = [d / n for n in names]
    else:
        files = sorted(d.glob("*.safetensors"))
    if not files:
        if any(d.glob("*.bin")):
            return []  # pickle weights: transformers checks them itself
        raise ValueError(f"checkpoint {str(d)!r} holds no weights (no *.safetensors file)")
    for f in files:
        if not f.is_file():
            raise CorruptFileError(f"checkpoint {str(d)!r} is incomplete: weight file {str(f)!r} is missing")
        size = f.stat().st_size
        try:
            with safe_open(str(f), framework="pt") as h:
                list(h.keys())
        except Exception as e:  # safetensors raises SafetensorError / OSError for bad headers
            raise CorruptFileError(
                f"weight file {str(f)!r} is corrupt or truncated ({size} bytes; {type(e).__name__}: {e})"
            ) from None
    return files


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


def _file_holding(d: Path, key: str) -> Optional[str]:
    """The name of the safetensors file of checkpoint ``d`` holding tensor ``key`` (None if not found)."""
    from safetensors import safe_open

    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            if key in h.keys():
                return f.name
    return None


def _check_shapes(d: Path, config: Any) -> None:
    """Compare the tensor shapes in the safetensors headers with the model the config describes."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    files = check_checkpoint_files(d)
    if not files:
        return
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                shape = tuple(h.get_slice(k).get_shape())
                if k in expected and expected[k] != shape:
                    raise CheckpointError(
                        f"checkpoint {str(d)!r}: tensor {k} in {f.name} has shape {shape}, but config.json "
                        f"describes {expected[k]}"
                    )


def load_model(
    path_or_name: Union[str, os.PathLike], *, dtype: Any = None, allow_nonfinite: bool = False
) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer (``None`` when the checkpoint has none), strictly.

    Args:
        path_or_name: a local checkpoint directory, or a hub model name (for users with hub access).
        dtype: torch dtype (or its name, or "auto") to load the weights in; None = transformers' default.
        allow_nonfinite: accept NaN/inf weights (for inspecting a broken checkpoint); refused otherwise.
    Returns:
        ``(model, tokenizer_or_None)``; the model is in eval mode.
    Raises:
        ValueError: a local directory without config.json, or an unsupported model type (checked from
            the config, before any weights are read).
        CorruptFileError: corrupt or truncated config / weight files (named).
        CheckpointError: missing, unexpected or mis-shaped tensors, or non-finite values (tensor and
            file named).
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
        check_checkpoint_files(p)
    name = str(path_or_name)
    config = AutoConfig.from_pretrained(name)
    get_adapter(config)  # refuse unsupported families before reading weights
    if local:
        _check_shapes(p, config)
    kwargs: dict[str, Any] = {"output_loading_info": True}
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    try:
        model, info = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"cannot load the weights of {name!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    where = f"{name}" if not local else str(p)
    problems = []
    for key, label in (("missing_keys", "missing tensor"), ("unexpected_keys", "unexpected tensor"),
                       ("mismatched_keys", "tensor with the wrong shape")):
        items = sorted(str(x if not isinstance(x, tuple) else f"{x[0]} (file {tuple(x[1])}, model {tuple(x[2])})")
                       for x in (info.get(key) or []))
        if items:
            more = f" and {len(items) - 3} more" if len(items) > 3 else ""
            problems.append(f"{label}{'s' if len(items) > 1 else ''} {', '.join(items[:3])}{more}")
    if problems:
        raise CheckpointError(f"checkpoint {where!r} does not match its config.json: " + "; ".join(problems))
    if not allow_nonfinite:
        for pname, t in model.state_dict().items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                holder = _file_holding(p, pname) if local else None
                where_t = f"{where!r}" + (f" ({holder})" if holder else "")
                raise CheckpointError(
                    f"checkpoint {where_t}: tensor {pname} holds {bad} non-finite value(s) (NaN/inf); the model is "
                    "broken (`minitron evaluate --allow-nonfinite` / allow_nonfinite=True loads it for inspection)"
                )
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
