"""The output-safety rule: an output may never be, contain, or lie inside an input of the command.

:func:`check_output_dir` validates an output directory before any work; :func:`prepare_output`
creates it once all validation has passed.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Sequence

from minitron.io.inputs import is_path

log = logging.getLogger(__name__)

__all__ = ["same_or_inside", "check_output_dir", "prepare_output"]


def same_or_inside(a: Path, b: Path) -> bool:
    """Whether path ``a`` is ``b`` or lies inside ``b`` (resolved, symlinks followed)."""
    try:
        Path(a).resolve().relative_to(Path(b).resolve())
        return True
    except ValueError:
        return False


def check_output_dir(
    output_dir: Any,
    *,
    overwrite: bool = False,
    resume: bool = False,
    inputs: Sequence[Any] = (),
    what: str = "output directory",
) -> Path:
    """Validate an output directory before any work.

    Refuses (ValueError): a non-path, an existing file, a directory that is (or lies inside) an input
    checkpoint, or (with ``overwrite``) one that contains an input. Refuses an existing non-empty
    directory unless ``overwrite`` or ``resume`` (:class:`minitron.io.checkpoint.OutputExistsError`, a
    ValueError and FileExistsError). Nothing is created or deleted here.
    """
    from minitron.io.checkpoint import OutputExistsError

    if not is_path(output_dir) or str(output_dir) == "":
        raise TypeError(f"{what} must be a non-empty path, got {output_dir!r}")
    if overwrite and resume:
        raise ValueError("overwrite and resume are mutually exclusive")
    out = Path(output_dir)
    for inp in inputs:
        if not is_path(inp):
            continue
        ip = Path(inp)
        if not ip.exists():
            continue
        if same_or_inside(out, ip):
            raise ValueError(
                f"{what} {str(out)!r} is the input {str(ip)!r} or lies inside it; choose another output directory"
            )
        if same_or_inside(ip, out) and (overwrite or out.exists()):
            raise ValueError(f"{what} {str(out)!r} contains the input {str(ip)!r}; choose another output directory")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise ValueError(f"{what} {str(out)!r} exists and is not a directory")
        if any(out.iterdir()) and not (overwrite or resume):
            raise OutputExistsError(
                f"{what} {str(out)!r} already exists; pass --overwrite (overwrite=True) to replace it"
                + (" or --resume to continue it" if what == "output directory" else "")
            )
    return out


def _prepare_output(out: Path, *, overwrite: bool) -> None:
    """Create ``out`` (after deleting it when ``overwrite``). Call only after all validation."""
    if overwrite and out.exists():
        log.info("removing existing output directory %s (--overwrite)", out)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def prepare_output(out: Path, *, overwrite: bool) -> None:
    """Create ``out`` (after deleting it when ``overwrite``). Call only after all validation."""
    if overwrite and out.exists():
        log.info("removing existing output directory %s (--overwrite)", out)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
