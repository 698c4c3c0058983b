"""Atomic file and directory writes with ordinary permissions.

Every output of minitron is written beside its final name (a hidden temporary sibling ``.NAME.tmp-*``)
and renamed into place only once complete, so an interruption at any point leaves either the previous
output or the new one, never a half-written file. ``tempfile`` creates private files (mode 0600) and
directories (0700); the helpers here give them the modes an ordinary ``open``/``mkdir`` would (0666 /
0777 minus the umask). Leftover temporaries of killed runs are removed by :func:`remove_stale_temporaries`.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Union

import torch

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

__all__ = ["read_json", "atomic_write_text", "atomic_write_json", "atomic_write_bytes", "json_default", "current_umask",
           "make_temp_dir", "normalize_permissions", "publish_dir", "remove_stale_temporaries", "TMP_MARK", "OLD_MARK"]

#: Infixes of the hidden siblings used while writing (``.NAME.tmp-XXXX``) and swapping (``.NAME.old-XXXX``).
TMP_MARK = ".tmp-"
OLD_MARK = ".old-"


def current_umask() -> int:
    """The process umask (read without changing it for longer than one call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _chmod_ordinary(path: PathLike, *, directory: bool) -> None:
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary sibling, fsync, rename); mode 0666 minus umask."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TMP_MARK}", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _chmod_ordinary(tmp, directory=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def json_default(o: Any) -> Any:
    """``json.dumps`` fallback: paths as strings, tensors and tuples as lists, anything else as repr."""
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    return repr(o)


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=json_default) + "\n")


def normalize_permissions(directory: PathLike) -> None:
    """Give every file under ``directory`` mode 0666 and every directory 0777, minus the umask.

    Some writers (``safetensors`` via transformers' ``save_pretrained``) create private 0600 files.
    """
    mask = current_umask()
    root = Path(directory)
    os.chmod(root, 0o777 & ~mask)
    for p in root.rglob("*"):
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def read_json(path: PathLike, what: str = "JSON file") -> Any:
    """Parse a JSON file; a corrupt or truncated one raises ``ValueError`` naming it (and saying so)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{what} {str(path)!r} is corrupt or truncated (not valid JSON: {e})") from None


def make_temp_dir(final: PathLike) -> Path:
    """A fresh hidden sibling directory of ``final`` (``.NAME.tmp-XXXX``, ordinary mode) to write into.

    The parent of ``final`` is created when missing.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{TMP_MARK}", dir=str(final.parent)))
    _chmod_ordinary(tmp, directory=True)
    return tmp


def publish_dir(tmp: PathLike, final: PathLike) -> None:
    """Move the complete directory ``tmp`` to ``final``, replacing an existing ``final`` only now.

    The old ``final`` is first renamed aside (``.NAME.old-XXXX``), the new one renamed in, then the old
    one deleted; if the second rename fails the old one is put back. A kill between the two renames
    leaves the old output under its ``.old-`` name, which :func:`remove_stale_temporaries` restores.
    """
    tmp, final = Path(tmp), Path(final)
    backup = None
    if final.exists() or final.is_symlink():
        backup = Path(tempfile.mkdtemp(prefix=f".{final.name}{OLD_MARK}", dir=str(final.parent)))
        backup.rmdir()
        os.replace(final, backup)
    try:
        os.replace(tmp, final)
    except BaseException:
        if backup is not None and not final.exists():
            os.replace(backup, final)
        raise
    if backup is not None:
        if backup.is_dir() and not backup.is_symlink():
            shutil.rmtree(backup, ignore_errors=True)
        else:
            backup.unlink()


def remove_stale_temporaries(final: PathLike) -> list[Path]:
    """Clean up after killed writes of ``final``: delete its ``.tmp-`` siblings; restore or delete ``.old-`` ones.

    An ``.old-`` sibling is the previous output moved aside during a swap: it is renamed back when
    ``final`` is missing (the kill came between the two renames), deleted otherwise.

    Returns:
        The paths removed or restored.
    """
    final = Path(final)
    parent = final.parent
    if not parent.is_dir():
        return []
    done = []
    for p in sorted(parent.glob(f".{final.name}{OLD_MARK}*")):
        if not (final.exists() or final.is_symlink()):
            os.replace(p, final)
            log.warning("restored %s from an interrupted replacement (%s)", final, p.name)
        elif p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink()
        done.append(p)
    for p in sorted(parent.glob(f".{final.name}{TMP_MARK}*")):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink()
        log.info("removed %s left by an interrupted run", p)
        done.append(p)
    return done
