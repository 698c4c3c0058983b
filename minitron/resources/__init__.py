"""Files shipped inside the package: the demo/study text data (``data/``, see its README for licences).

:func:`data_dir` gives a real directory path (the wheel installs unzipped, ``zip_safe=False``).
"""
from __future__ import annotations

import importlib.resources
from pathlib import Path

__all__ = ["data_dir", "data_file"]


def data_dir() -> Path:
    """The shipped ``data/`` directory (``tinyshakespeare/input.txt``, ``wikitext-2/{valid,test}.txt``)."""
    return Path(str(importlib.resources.files(__name__).joinpath("data")))


def data_file(*parts: str) -> Path:
    """A shipped data file, e.g. ``data_file("wikitext-2", "valid.txt")``; FileNotFoundError if absent."""
    p = data_dir().joinpath(*parts)
    if not p.is_file():
        raise FileNotFoundError(f"shipped data file {str(p)!r} is missing (a broken installation?)")
    return p
