"""The output-safety rule, in one place: nothing the user owns is ever lost.

Every command, the Python API and the pipeline validate their outputs with :func:`check_output`
before any work:

* an output may not be, contain, or lie inside any input the command reads (model, teacher, student,
  data files and directories, importance, tokenizer, ...), with symlinks resolved;
* an existing output is refused unless ``overwrite`` (or ``resume`` for training runs);
* its location must be writable (the nearest existing ancestor is a writable directory) and, when the
  size of the output can be estimated, hold enough free space.

Replacing is done last: with ``overwrite`` the new output is written into a hidden sibling
(:func:`begin_output`) and swapped in only once complete (:func:`finish_output`), so a failure or
interruption at any point leaves the previous output intact. Leftover temporaries of killed runs are
cleaned by the next run of the same output (:func:`minitron.io.files.remove_stale_temporaries`).
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from minitron.io.files import TMP_MARK, make_temp_dir, publish_dir, remove_stale_temporaries

log = logging.getLogger(__name__)

__all__ = ["same_or_inside", "check_output", "check_output_dir", "begin_output", "finish_output",
           "abandon_output", "OutputExistsError"]

PathLike = Union[str, os.PathLike]


class OutputExistsError(FileExistsError, ValueError):
    """The output exists and ``overwrite`` was not given (also a ``ValueError``)."""


def same_or_inside(a: PathLike, b: PathLike) -> bool:
    """Whether path ``a`` is ``b`` or lies inside ``b`` (resolved, symlinks followed)."""
    try:
        Path(a).resolve().relative_to(Path(b).resolve())
        return True
    except ValueError:
        return False


def _nearest_existing(p: Path) -> Path:
    p = Path(os.path.abspath(p))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _named_inputs(inputs: Union[Mapping[str, Any], Sequence[Any]]) -> list[tuple[str, Path]]:
    items = inputs.items() if isinstance(inputs, Mapping) else (("input", x) for x in inputs)
    out = []
    for name, value in items:
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, (str, os.PathLike)) and str(v) and (Path(v).exists() or Path(v).is_symlink()):
                out.append((name, Path(v)))
    return out


def check_output(
    output: Any,
    *,
    inputs: Union[Mapping[str, Any], Sequence[Any]] = (),
    overwrite: bool = False,
    resume: bool = False,
    kind: str = "dir",
    what: str = "--output",
    estimated_bytes: Optional[int] = None,
    resumable: bool = False,
) -> Path:
    """Validate an output path before any work; nothing is created or deleted.

    Args:
        output: the output directory (``kind="dir"``) or file (``kind="file"``).
        inputs: ``{argument name: path or list of paths}`` (or a plain list) of everything the command
            reads; paths that do not exist (hub names, objects) are skipped.
        overwrite / resume: what may happen to an existing output (mutually exclusive).
        what: how the output is named in messages (the CLI flag / API argument / YAML key).
        estimated_bytes: refuse when the output's file system has less free space than this.
        resumable: the command has ``--resume`` (only then does the message suggest it).
    Returns:
        The output as a Path.
    Raises:
        TypeError: not a path. ValueError: output is/contains/lies inside an input, is of the wrong
        kind, is not writable or lacks space. OutputExistsError: exists without overwrite/resume.
    """
    if not isinstance(output, (str, os.PathLike)) or str(output) == "":
        raise TypeError(f"{what} must be a non-empty path, got {output!r}")
    if overwrite and resume:
        raise ValueError("--overwrite and --resume (overwrite=True, resume=True) are mutually exclusive")
    out = Path(output).expanduser()
    for name, inp in _named_inputs(inputs):
        if same_or_inside(out, inp):
            rel = "is" if out.resolve() == inp.resolve() else "lies inside"
            raise ValueError(f"{what} {str(out)!r} {rel} the input {name} {str(inp)!r}; choose another output")
        if same_or_inside(inp, out):
            raise ValueError(f"{what} {str(out)!r} contains the input {name} {str(inp)!r}; choose another output")
    exists = out.exists() or out.is_symlink()
    if exists:
        if kind == "dir" and not out.is_dir():
            raise ValueError(f"{what} {str(out)!r} exists and is not a directory")
        if kind == "file" and out.is_dir():
            raise ValueError(f"{what} {str(out)!r} is a directory; give a file path")
        nonempty = kind == "file" or any(out.iterdir())
        if nonempty and not (overwrite or resume):
            hint = "pass --overwrite (overwrite=True) to replace it"
            if resumable:
                hint += ", or --resume (resume=True) to continue it"
            raise OutputExistsError(f"{what} {str(out)!r} already exists; {hint}")
    anchor = _nearest_existing(out.parent if kind == "file" or not exists else out)
    if not anchor.is_dir():
        raise ValueError(f"{what} {str(out)!r} cannot be created: {str(anchor)!r} is not a directory")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {str(out)!r} is not writable (no write permission on {str(anchor)!r})")
    if estimated_bytes:
        free = shutil.disk_usage(anchor).free
        if free < estimated_bytes:
            raise ValueError(
                f"{what} {str(out)!r}: not enough disk space ({free / 2**20:.0f} MiB free, about "
                f"{estimated_bytes / 2**20:.0f} MiB needed); free some space or choose another location"
            )
    return out


def check_output_dir(output_dir: Any, *, overwrite: bool = False, resume: bool = False,
                     inputs: Union[Mapping[str, Any], Sequence[Any]] = (), what: str = "--output",
                     estimated_bytes: Optional[int] = None, resumable: bool = False) -> Path:
    """:func:`check_output` for an output directory."""
    return check_output(output_dir, inputs=inputs, overwrite=overwrite, resume=resume, kind="dir", what=what,
                        estimated_bytes=estimated_bytes, resumable=resumable)


def begin_output(out: Path, *, overwrite: bool) -> Path:
    """Start writing output directory ``out`` (call after all validation); returns where to write.

    Leftover temporaries of killed runs of ``out`` are removed first. Without ``overwrite`` (or when
    ``out`` does not exist yet) that is ``out`` itself, created; with ``overwrite`` of an existing ``out``
    it is a fresh hidden sibling that :func:`finish_output` swaps in, so the previous output stays
    intact until the new one is complete.
    """
    out = Path(out)
    remove_stale_temporaries(out)
    if overwrite and (out.exists() or out.is_symlink()):
        return make_temp_dir(out)
    if out.is_dir():  # resuming: temporaries of atomic writes killed inside the run directory
        for p in sorted(out.rglob(f".*{TMP_MARK}*"), reverse=True):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists() or p.is_symlink():
                p.unlink()
            log.info("removed %s left by an interrupted run", p)
    out.mkdir(parents=True, exist_ok=True)
    return out


def finish_output(work: Path, out: Path) -> None:
    """Publish a complete output written into ``work`` (from :func:`begin_output`) as ``out``."""
    work, out = Path(work), Path(out)
    if work != out:
        publish_dir(work, out)
        log.info("replaced %s (--overwrite)", out)


def abandon_output(work: Path, out: Path) -> None:
    """Delete the temporary ``work`` of a failed run (the previous ``out`` is untouched)."""
    if Path(work) != Path(out):
        shutil.rmtree(work, ignore_errors=True)
