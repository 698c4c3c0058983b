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
           "read_config", "weight_bytes", "load_model_like", "load_tokenizer_arg", "default_seq_len", "check_data_arg"]

ModelLike = Union[str, os.PathLike, torch.nn.Module]
MODEL_SUBDIR = "model"
DEFAULT_SEQ_LEN = 512


def is_path(x: Any) -> bool:
    """Whether ``x`` is a str or os.PathLike."""
    return isinstance(x, (str, os.PathLike))


def resolve_model_path(path: Union[str, os.PathLike]) -> str:
    """A checkpoint directory, the ``model/`` inside a training output directory, or a hub name.

    A ``.gguf`` file is checked (:func:`minitron.io.gguf.inspect_gguf`: truncation, architecture, quantization
    types; errors name the file) and converted once into the cache (:func:`minitron.io.fetch.converted_checkpoint`,
    fp32): the plain checkpoint directory there is returned, so every command and path (in memory or streamed)
    reads a ``.gguf`` like any checkpoint."""
    from minitron.io.gguf import is_gguf

    if is_gguf(path):
        from minitron.io.fetch import converted_checkpoint

        return str(converted_checkpoint(path))
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


def read_config(model: ModelLike, what: str = "model") -> Any:
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
    if not Path(path).exists():
        check_hub_name(str(model), what)
    else:
        from minitron.io.checkpoint import _read_json

        _read_json(Path(path) / "config.json", "config file")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{what} {str(model)!r}: cannot read its config ({str(e).splitlines()[0]})") from None
    get_adapter(config)
    return config


def hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def looks_local(s: str) -> bool:
    """Whether a missing path is surely meant as a local path, not a hub name.

    True for absolute / ``.`` / ``~`` paths, more than one ``/``, a data-file extension, Windows
    separators, or a first component that exists here (``runs/techer`` when ``runs/`` exists).
    """
    from minitron.io.data import FORMAT_BY_EXTENSION

    if s.startswith((".", "/", "~")) or s.count("/") > 1 or "\\" in s:
        return True
    if os.path.splitext(s)[1].lower() in FORMAT_BY_EXTENSION:
        return True
    first = s.split("/", 1)[0]
    return "/" in s and Path(first).is_dir()


def _near_miss(name: str) -> Optional[str]:
    """A local entry whose name is one typo away from ``name`` (``teachr`` -> ``teacher``), if any."""
    import difflib

    p = Path(name)
    parent = p.parent if str(p.parent) not in ("", ".") else Path(".")
    try:
        entries = [e.name for e in parent.iterdir()] if parent.is_dir() else []
    except OSError:
        return None
    close = difflib.get_close_matches(p.name, entries, n=1, cutoff=0.8)
    return str(parent / close[0]) if close and parent != Path(".") else (close[0] if close else None)


def check_hub_name(name: str, what: str) -> None:
    """Refuse, without touching the network, a missing local path, a near miss of a local name, or a hub
    name while offline."""
    if looks_local(name):
        near = _near_miss(name)
        hint = f"; did you mean {near!r}?" if near else ""
        raise FileNotFoundError(f"{what} {name!r} does not exist (no such file or directory){hint}")
    near = _near_miss(name)
    if near is not None and (Path(near) / "config.json").is_file() or near is not None and (
            Path(near) / MODEL_SUBDIR / "config.json").is_file():
        # one typo away from a local checkpoint: surely meant that, not a hub model
        raise FileNotFoundError(
            f"{what} {name!r} does not exist here (did you mean {near!r}?); it was not looked up on the hub"
        )
    if hub_offline():
        raise FileNotFoundError(
            f"{what} {name!r} is not a local path and the hub is offline (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE set); "
            "give a local checkpoint directory"
        )


def load_model_like(model: ModelLike, tokenizer: Any = None, *,
                    allow_nonfinite: bool = False) -> Tuple[torch.nn.Module, Any, Optional[str]]:
    """(module, tokenizer, source path or None); checkpoints load strictly (see :func:`load_model`)."""
    from minitron.io.checkpoint import load_model

    if isinstance(model, torch.nn.Module):
        return model, load_tokenizer_arg(tokenizer), None
    path = resolve_model_path(model)
    module, tok = load_model(path, allow_nonfinite=allow_nonfinite)
    if tokenizer is not None:
        tok = load_tokenizer_arg(tokenizer)
    return module, tok, path


def weight_bytes(model: Any) -> Optional[int]:
    """Bytes of the weight files of a local checkpoint (or of a loaded module's parameters); None if unknown."""
    if isinstance(model, torch.nn.Module):
        return sum(p.numel() * p.element_size() for p in model.parameters())
    if not is_path(model):
        return None
    try:
        d = Path(resolve_model_path(model))
    except ValueError:
        return None
    if not d.is_dir():
        return None
    return sum(f.stat().st_size for f in d.glob("*.safetensors")) or sum(f.stat().st_size for f in d.glob("*.bin")) or None


def tokenizer_source(model_src: Optional[str], tokenizer: Any) -> Optional[str]:
    """The directory whose tokenizer files an output should carry: ``tokenizer`` when it is a path, else
    the model's checkpoint directory when it holds tokenizer files (None otherwise)."""
    from minitron.io.tokenizer import has_tokenizer_files

    if is_path(tokenizer):
        return str(tokenizer)
    if tokenizer is None and model_src is not None and has_tokenizer_files(model_src):
        return str(model_src)
    return None


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
        if not p.exists():
            if os.path.splitext(s)[1].lower() in FORMAT_BY_EXTENSION or looks_local(s):
                raise FileNotFoundError(f"{name}: data path {s!r} does not exist")
            if hub_offline():
                raise FileNotFoundError(
                    f"{name}: {s!r} is not a local path and the hub is offline (HF_HUB_OFFLINE set); give a local file"
                )
            return
        files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.is_file() and
                                               f.suffix.lower() in FORMAT_BY_EXTENSION) if p.is_dir() else []
        for f in files:
            check_text_file(f, name)


def check_text_file(f: Path, name: str) -> None:
    """Refuse an unreadable, empty or binary data file (text formats: valid UTF-8 without NUL bytes)."""
    if not os.access(f, os.R_OK):
        raise ValueError(f"{name}: data file {str(f)!r} is not readable (permission denied)")
    size = f.stat().st_size
    if size == 0:
        raise ValueError(f"{name}: data file {str(f)!r} is empty")
    if f.suffix.lower() in (".parquet",):
        with open(f, "rb") as fh:
            if fh.read(4) != b"PAR1":
                raise ValueError(f"{name}: {str(f)!r} is not a parquet file (corrupt or mislabelled)")
        return
    with open(f, "rb") as fh:
        head = fh.read(65536)
    if b"\x00" in head:
        raise ValueError(f"{name}: data file {str(f)!r} is binary, not text (NUL bytes); give a UTF-8 text file")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # a multi-byte character cut at the read boundary is fine
            raise ValueError(
                f"{name}: data file {str(f)!r} is not UTF-8 text (invalid byte at offset {e.start}); convert it to UTF-8"
            ) from None
    if not head.strip():
        raise ValueError(f"{name}: data file {str(f)!r} holds only whitespace")


