"""Loading of the compiled extension ``minitron._C``.

The extension registers native CPU (and, when built with CUDA, CUDA) kernels with the PyTorch
dispatcher under ``torch.ops.minitron._*``. It is loaded lazily: importing minitron never fails
because it is missing. Set ``MINITRON_EXT=/path/to/lib.so`` to load a specific build instead (used
when developing one kernel at a time, see ``tools/build_dev.py``).
"""
from __future__ import annotations

import importlib
import logging
import os
import threading

import torch

log = logging.getLogger(__name__)

_lock = threading.Lock()
_state: dict[str, object] = {"tried": False, "ok": False, "error": None, "path": None}

BUILD_HINT = (
    "The minitron C++ extension (minitron._C) is not built. Build it with `make build` "
    "(or `pip install --no-build-isolation -e .`, or `python setup.py build_ext --inplace`) "
    "in the minitron checkout; set FORCE_CUDA=1 to also build the CUDA kernels."
)


class ExtensionNotBuiltError(RuntimeError):
    """Raised when an op needs the compiled extension and it is not available."""


def load() -> bool:
    """Try to load the extension once; return whether it is available."""
    if _state["tried"]:
        return bool(_state["ok"])
    with _lock:
        if _state["tried"]:
            return bool(_state["ok"])
        path = os.environ.get("MINITRON_EXT")
        try:
            if path:
                torch.ops.load_library(path)
                _state["path"] = path
            else:
                mod = importlib.import_module("minitron._C")
                _state["path"] = getattr(mod, "__file__", None)
            _state["ok"] = True
        except (ImportError, OSError) as exc:  # missing or broken build
            _state["error"] = exc
            log.debug("minitron._C not loaded: %s", exc)
        _state["tried"] = True
    return bool(_state["ok"])


def available() -> bool:
    return load()


def require(what: str) -> None:
    """Raise :class:`ExtensionNotBuiltError` naming ``what`` if the extension is missing."""
    if not load():
        detail = f" (load error: {_state['error']})" if _state["error"] else ""
        raise ExtensionNotBuiltError(f"{what} needs the compiled extension. {BUILD_HINT}{detail}")


def has_native_op(name: str) -> bool:
    """Whether the extension registered ``torch.ops.minitron.<name>``."""
    if not load():
        return False
    try:
        getattr(torch.ops.minitron, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def build_info() -> dict[str, str]:
    """Key/value facts the extension reports about itself (empty when it is not built)."""
    if not has_native_op("_build_info"):
        return {}
    raw = torch.ops.minitron._build_info()
    return dict(item.split("=", 1) for item in raw.split(";") if "=" in item)


def cuda_built() -> bool:
    return build_info().get("cuda") == "1"


def extension_path() -> str | None:
    load()
    return _state["path"]  # type: ignore[return-value]
