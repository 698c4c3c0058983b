"""GGUF in, plain checkpoints out.

A GGUF file (llama.cpp's single-file format: metadata, tokenizer and tensors, usually quantized) is
validated with :func:`inspect_gguf` *before anything is written*: magic and version, a header that is
complete, every tensor's data lying inside the file, an architecture minitron prunes, and every tensor
stored in a type the installed ``gguf`` package can dequantize. Errors are :class:`GGUFError` (a
``ValueError``) naming the file (and the tensor and its type, for an unreadable type).

:func:`load_gguf` dequantizes the file through ``transformers`` (``from_pretrained(..., gguf_file=)``)
and rebuilds a *plain* model of the same class from the config — no quantizer attached, no
``quantization_config`` — so it can be pruned, trained and saved like any other. :func:`convert_gguf`
writes that model as an ordinary safetensors checkpoint (``config.json``, ``generation_config.json``,
weights, tokenizer files) atomically: into a hidden sibling directory, renamed into place when complete.

Commands that stream a checkpoint tensor by tensor either refuse a GGUF with :func:`require_not_gguf`,
whose error tells the user to run ``minitron convert`` first, or read it with
:class:`GGUFCheckpointReader`: the same ``config`` / ``keys()`` / ``get(name)`` interface as the
safetensors readers, each tensor dequantized from the memory-mapped file when asked for.
"""
from __future__ import annotations

import contextlib
import logging
import mmap
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch

from minitron.io.files import make_temp_dir, normalize_permissions, publish_dir, remove_stale_temporaries
from minitron.io.safety import check_output_dir

log = logging.getLogger(__name__)

__all__ = ["GGUFError", "GGUFInfo", "GGUFTensorInfo", "GGUF_MAGIC", "SUPPORTED_GGUF_ARCHITECTURES", "is_gguf",
           "inspect_gguf", "require_not_gguf", "load_gguf", "convert_gguf", "resolve_dtype", "GGUFCheckpointReader"]

PathLike = Union[str, os.PathLike]

#: The first four bytes of every GGUF file.
GGUF_MAGIC = b"GGUF"
#: GGUF format versions read here (v1 used 32-bit counts and is long gone).
_VERSIONS = (2, 3)
#: ``general.architecture`` values accepted, and the transformers ``model_type`` each becomes. llama.cpp
#: stores Mistral models as ``llama``, and transformers loads them as Llama (the same computation) unless
#: ``general.name`` is exactly ``mistral`` (see :func:`_model_type`).
SUPPORTED_GGUF_ARCHITECTURES: dict[str, str] = {
    "llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
}
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
_MAX_DIMS = 4  # GGML_MAX_DIMS
# metadata value types: fixed-size ones (struct format), 8 = string, 9 = array
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_KEEP_ARRAY = 64  # arrays longer than this (vocabularies, merges) are kept as their length only


class GGUFError(ValueError):
    """A GGUF file that cannot be converted: not GGUF, truncated, unsupported architecture or type."""


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One entry of a GGUF tensor table.

    ``shape`` is in torch order (outermost first; GGUF stores it innermost first); ``offset`` is from the
    start of the data section; ``nbytes`` is what the tensor occupies in the file.
    """

    name: str
    shape: tuple[int, ...]
    type_id: int
    type_name: str
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class GGUFInfo:
    """What :func:`inspect_gguf` learned about a valid GGUF file (no tensor data is read)."""

    path: Path
    version: int
    architecture: str  #: ``general.architecture`` as stored
    model_type: str  #: the transformers ``model_type`` it loads as
    name: Optional[str]  #: ``general.name``, if any
    file_size: int
    data_start: int  #: byte offset of the tensor data section
    tensors: list[GGUFTensorInfo]
    metadata: dict[str, Any] = field(repr=False)  #: scalar values; long arrays as their length

    @property
    def num_parameters(self) -> int:
        """Total elements over all tensors (tied embeddings counted once, as the file stores them)."""
        return sum(t.numel for t in self.tensors)

    @property
    def tensor_types(self) -> dict[str, int]:
        """``{type name: number of tensors}``."""
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.type_name] = out.get(t.type_name, 0) + 1
        return out


def resolve_dtype(dtype: Any) -> torch.dtype:
    """``"fp32"``/``"float32"``/``torch.float32`` -> float32, ``"bf16"``/``"bfloat16"`` -> bfloat16.

    Raises:
        ValueError: any other value (the message lists the accepted ones).
    """
    if isinstance(dtype, torch.dtype) and dtype in (torch.float32, torch.bfloat16):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"dtype must be 'fp32' or 'bf16' (--dtype fp32|bf16), got {dtype!r}")


def is_gguf(path: Any) -> bool:
    """Whether ``path`` names a GGUF file: a path ending in ``.gguf`` (existing or not, so that a missing
    one gets :func:`inspect_gguf`'s clear error), or an existing file starting with the GGUF magic.

    Directories, hub names and non-path objects are not GGUF.
    """
    if not isinstance(path, (str, os.PathLike)) or str(path) == "":
        return False
    p = Path(path).expanduser()
    if p.is_dir():
        return False
    if p.suffix.lower() == ".gguf":
        return True
    if not p.is_file():
        return False
    try:
        with open(p, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def require_not_gguf(path: Any, what: str = "--model", command: str = "this command") -> None:
    """Refuse a GGUF file where only a plain checkpoint can be read (the streamed, tensor-by-tensor paths).

    Args:
        path: the model argument as given.
        what: the argument's name, for the message (``--teacher``, ``student=``, ...).
        command: what refuses it, for the message (``"streamed pruning"``).
    Raises:
        GGUFError: ``path`` is a GGUF file; the message names ``minitron convert``.
    """
    if is_gguf(path):
        raise GGUFError(
            f"{what} {str(path)!r} is a GGUF file, which {command} cannot read tensor by tensor; convert it "
            f"to a plain checkpoint first with `minitron convert {path} --output DIR` and pass DIR instead"
        )


# --------------------------------------------------------------------------------------------- reading

class _Cursor:
    """Bounds-checked little-endian reads from a byte buffer; running off the end is a truncated file."""

    def __init__(self, buf: Any, path: Path, size: int):
        self.buf, self.path, self.size, self.pos = buf, path, size, 0

    def _need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise GGUFError(
                f"GGUF file {str(self.path)!r} is truncated or corrupt: its header ends inside {what} "
                f"(byte {self.pos} of {self.size})"
            )

    def unpack(self, fmt: str, what: str) -> tuple:
        n = struct.calcsize(fmt)
        self._need(n, what)
        out = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return out

    def string(self, what: str) -> str:
        (n,) = self.unpack("<Q", what)
        self._need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"GGUF file {str(self.path)!r} is corrupt: {what} is not valid UTF-8") from None

    def value(self, vtype: int, key: str) -> Any:
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype], f"the value of {key!r}")[0]
        if vtype == _STRING:
            return self.string(f"the value of {key!r}")
        if vtype == _ARRAY:
            etype, count = self.unpack("<IQ", f"the value of {key!r}")
            if etype in _SCALAR:
                width = struct.calcsize(_SCALAR[etype])
                self._need(count * width, f"the value of {key!r}")
                if count > _KEEP_ARRAY:
                    self.pos += count * width
                    return count
                vals = list(struct.unpack_from(f"<{count}{_SCALAR[etype][1:]}", self.buf, self.pos))
                self.pos += count * width
                return vals
            if etype == _STRING:
                if count > _KEEP_ARRAY:
                    for _ in range(count):  # walk it without decoding
                        (n,) = self.unpack("<Q", f"the value of {key!r}")
                        self._need(n, f"the value of {key!r}")
                        self.pos += n
                    return count
                return [self.string(f"the value of {key!r}") for _ in range(count)]
            raise GGUFError(f"GGUF file {str(self.path)!r} is corrupt: metadata {key!r} is an array of "
                            f"unknown value type {etype}")
        raise GGUFError(f"GGUF file {str(self.path)!r} is corrupt: metadata {key!r} has unknown value type {vtype}")


@lru_cache(maxsize=None)
def _dequantizable(type_id: int) -> tuple[str, bool]:
    """``(type name, whether the installed gguf package can dequantize it)``; the name is
    ``unknown type <id>`` for an id the package does not know."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    try:
        qtype = GGMLQuantizationType(type_id)
    except ValueError:
        return f"unknown type {type_id}", False
    if qtype not in GGML_QUANT_SIZES:
        return qtype.name, False
    block, size = GGML_QUANT_SIZES[qtype]
    try:  # probe one zero block: the package raises NotImplementedError for types it cannot read
        out = dequantize(np.zeros(size, dtype=np.uint8), qtype)
        ok = np.issubdtype(np.asarray(out).dtype, np.floating) and np.asarray(out).size == block
    except NotImplementedError:
        ok = False
    except Exception:  # noqa: BLE001 - any failure on a well-formed block means we cannot read it
        ok = False
    return qtype.name, ok


def _model_type(architecture: str, name: Optional[str]) -> Optional[str]:
    model_type = SUPPORTED_GGUF_ARCHITECTURES.get(architecture)
    if model_type == "llama" and name == "mistral":
        # transformers' rule (checked on 5.25): only a general.name of exactly "mistral" makes a llama file
        # a Mistral one -- which then fails in transformers with gguf 0.19 (no "mistral" tensor-name table);
        # any other llama file, real Mistral GGUFs included, loads as Llama, which computes the same thing
        return "mistral"
    return model_type


def inspect_gguf(path: PathLike) -> GGUFInfo:
    """Validate a GGUF file and describe it, reading only its header (memory-mapped; no tensor data).

    Checks, in order: the file exists and is non-empty; magic ``GGUF`` and version 2 or 3; a complete
    header (metadata and tensor table); ``general.architecture`` one of
    :data:`SUPPORTED_GGUF_ARCHITECTURES`; every tensor in a type the installed ``gguf`` package
    dequantizes; every tensor's data inside the file.

    Raises:
        TypeError: ``path`` is not a path.
        GGUFError: anything above fails; the message names the file (and the tensor and its type).
    """
    if not isinstance(path, (str, os.PathLike)) or str(path) == "":
        raise TypeError(f"a GGUF path must be a non-empty path, got {path!r}")
    p = Path(path).expanduser()
    if not p.exists():
        raise GGUFError(f"GGUF file {str(p)!r} does not exist")
    if not p.is_file():
        raise GGUFError(f"GGUF file {str(p)!r} is not a file")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise GGUFError(f"reading GGUF file {str(p)!r} needs the `gguf` package: pip install gguf") from None
    size = p.stat().st_size
    if size < 24:
        raise GGUFError(f"GGUF file {str(p)!r} is truncated or not a GGUF file ({size} bytes)")
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if bytes(buf[:4]) != GGUF_MAGIC:
            raise GGUFError(f"{str(p)!r} is not a GGUF file (it does not start with the bytes 'GGUF')")
        cur = _Cursor(buf, p, size)
        cur.pos = 4
        version, n_tensors, n_kv = cur.unpack("<IQQ", "the file header")
        if version not in _VERSIONS:
            raise GGUFError(f"GGUF file {str(p)!r} has format version {version}; versions "
                            f"{' and '.join(map(str, _VERSIONS))} are supported")
        if n_tensors > size // 24 or n_kv > size // 12:  # each entry needs at least that many bytes
            raise GGUFError(f"GGUF file {str(p)!r} is corrupt: its header claims {n_tensors} tensors and "
                            f"{n_kv} metadata entries, more than {size} bytes can hold")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string("a metadata key")
            (vtype,) = cur.unpack("<I", f"the type of metadata {key!r}")
            meta[key] = cur.value(vtype, key)
        entries = []
        for i in range(n_tensors):
            name = cur.string(f"the name of tensor {i}")
            (n_dims,) = cur.unpack("<I", f"tensor {name!r}")
            if not 1 <= n_dims <= _MAX_DIMS:
                raise GGUFError(f"GGUF file {str(p)!r} is corrupt: tensor {name!r} has {n_dims} dimensions")
            dims = cur.unpack(f"<{n_dims}Q", f"tensor {name!r}")
            type_id, offset = cur.unpack("<IQ", f"tensor {name!r}")
            entries.append((name, tuple(reversed(dims)), type_id, offset))
        header_end = cur.pos

    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise GGUFError(f"GGUF file {str(p)!r} has no general.architecture in its metadata")
    gname = meta.get("general.name") if isinstance(meta.get("general.name"), str) else None
    model_type = _model_type(arch, gname)
    if model_type is None:
        raise GGUFError(
            f"GGUF file {str(p)!r} holds a {arch!r} model, an architecture minitron does not prune; supported "
            f"GGUF architectures: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
        )
    from gguf import GGML_QUANT_SIZES, MODEL_ARCH_NAMES, GGMLQuantizationType

    if model_type not in MODEL_ARCH_NAMES.values():  # transformers maps tensor names through gguf's table
        raise GGUFError(
            f"GGUF file {str(p)!r} (architecture {arch!r}, general.name {gname!r}) would load as a {model_type!r} "
            f"model, whose tensor names the installed gguf package does not know; transformers cannot read it"
        )
    alignment = meta.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment % 8:
        raise GGUFError(f"GGUF file {str(p)!r} is corrupt: general.alignment is {alignment!r}")
    data_start = (header_end + alignment - 1) // alignment * alignment
    tensors = []
    for name, shape, type_id, offset in entries:
        type_name, ok = _dequantizable(type_id)
        if not ok:
            raise GGUFError(
                f"GGUF file {str(p)!r}: tensor {name!r} is stored as {type_name}, which the installed gguf "
                f"package cannot dequantize; use a GGUF quantized in another type (e.g. Q8_0, Q4_K_M or F16) "
                f"or upgrade gguf"
            )
        block, bsize = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
        numel = 1
        for d in shape:
            numel *= d
        if shape[-1] % block:
            raise GGUFError(f"GGUF file {str(p)!r} is corrupt: tensor {name!r} of {type_name} has a row of "
                            f"{shape[-1]} values, not a multiple of its block size {block}")
        nbytes = numel // block * bsize
        end = data_start + offset + nbytes
        if end > size:
            raise GGUFError(
                f"GGUF file {str(p)!r} is truncated: tensor {name!r} needs bytes up to {end}, the file has "
                f"{size} (an interrupted download or copy?)"
            )
        tensors.append(GGUFTensorInfo(name, shape, type_id, type_name, offset, nbytes))
    if not tensors:
        raise GGUFError(f"GGUF file {str(p)!r} holds no tensors")
    return GGUFInfo(path=p, version=version, architecture=arch, model_type=model_type, name=gname,
                    file_size=size, data_start=data_start, tensors=tensors, metadata=meta)


# --------------------------------------------------------------------------------------------- loading

def _plain_copy(loaded: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A model of ``loaded``'s class from its config without ``quantization_config``, holding its tensors.

    Built on the meta device and filled with ``load_state_dict(strict=True, assign=True)``, so the weights
    are not copied; non-persistent buffers (rotary frequencies) are taken over from ``loaded``.
    """
    config = loaded.config.__class__.from_dict(loaded.config.to_dict())
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = dtype
    with torch.device("meta"):
        plain = loaded.__class__(config)
    state = loaded.state_dict()
    plain.load_state_dict(state, strict=True, assign=True)
    persistent = set(state)
    for name, buf in loaded.named_buffers():
        if name not in persistent:
            owner, _, attr = name.rpartition(".")
            plain.get_submodule(owner)._buffers[attr] = buf
    plain.tie_weights()
    leftover = [n for n, t in list(plain.named_parameters()) + list(plain.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"rebuilding the GGUF model left tensors unset: {leftover[:5]}")
    plain.generation_config = loaded.generation_config
    if dtype != torch.float32:
        plain.to(dtype)
    plain.eval()
    return plain


def load_gguf(path: PathLike, dtype: Any = torch.float32, *, tokenizer: bool = True) -> tuple[Any, Any]:
    """Load a GGUF file as a plain ``transformers`` causal LM (dequantized; no quantizer attached).

    Args:
        path: the ``.gguf`` file; validated first with :func:`inspect_gguf`.
        dtype: ``"fp32"``/``torch.float32`` or ``"bf16"``/``torch.bfloat16``; the weights' dtype.
        tokenizer: also build the tokenizer from the file's metadata.
    Returns:
        ``(model, tokenizer)``: a ``*ForCausalLM`` in eval mode whose ``save_pretrained`` writes an
        ordinary checkpoint, and a fast tokenizer (``None`` when ``tokenizer=False``).
    Raises:
        GGUFError: the file fails :func:`inspect_gguf`, or transformers cannot read it.
    """
    torch_dtype = resolve_dtype(dtype)
    info = inspect_gguf(path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing GGUF %s (%s, %d tensors: %s) to %s", info.path, info.model_type, len(info.tensors),
             ", ".join(f"{n} {k}" for k, n in info.tensor_types.items()), torch_dtype)
    with _alone(info.path) as (folder, fname):
        try:  # dequantized in float32 (transformers warns about any other dtype), cast afterwards
            loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
        except (ValueError, KeyError, NotImplementedError, RuntimeError) as e:
            raise GGUFError(f"GGUF file {str(info.path)!r} could not be loaded by transformers: {e}") from e
        model = _plain_copy(loaded, torch_dtype)
        del loaded
        if model.config.model_type not in SUPPORTED_GGUF_ARCHITECTURES.values():
            raise GGUFError(f"GGUF file {str(info.path)!r} loaded as a {model.config.model_type!r} model, which "
                            f"minitron does not prune")
        tok = None
        if tokenizer:
            try:
                tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
            except (ValueError, KeyError, NotImplementedError, RuntimeError) as e:
                raise GGUFError(f"GGUF file {str(info.path)!r}: its tokenizer could not be built: {e}") from e
    return model, tok


@contextlib.contextmanager
def _alone(path: Path) -> Iterator[tuple[str, str]]:
    """``(folder, file name)`` of a private folder holding only a link to ``path``.

    ``from_pretrained(folder, gguf_file=...)`` prefers tokenizer files lying beside the GGUF to the GGUF's
    own tokenizer (checked on transformers 5.25): a GGUF next to another model's ``tokenizer.json`` would
    silently get the wrong tokenizer.
    """
    src = path.resolve()
    with tempfile.TemporaryDirectory(prefix="minitron-gguf-") as tmp:
        link = Path(tmp) / src.name
        try:
            os.symlink(src, link)
        except OSError:  # no symlinks here: a hard link, else the folder as it is
            try:
                os.link(src, link)
            except OSError:
                yield str(src.parent), src.name
                return
        yield tmp, src.name


def convert_gguf(path: PathLike, output_dir: PathLike, dtype: Any = "fp32", overwrite: bool = False) -> Path:
    """Convert a GGUF file into a plain safetensors checkpoint directory that ``transformers`` loads alone.

    Writes ``config.json`` (no ``quantization_config``), ``generation_config.json``, ``model.safetensors``
    and the tokenizer files. Everything is validated before any output exists (the file with
    :func:`inspect_gguf`, the output with :func:`minitron.io.safety.check_output_dir`); the checkpoint is
    written into a hidden sibling of ``output_dir`` and renamed into place once complete, so a failure
    leaves no partial output and, with ``overwrite``, the previous one intact.

    Args:
        path: the ``.gguf`` file.
        output_dir: the checkpoint directory to create.
        dtype: ``"fp32"`` or ``"bf16"``.
        overwrite: replace an existing ``output_dir``.
    Returns:
        ``output_dir`` as a Path.
    Raises:
        GGUFError: bad GGUF file. OutputExistsError: ``output_dir`` exists without ``overwrite``.
        ValueError: bad dtype, or an output inside the input / not writable / short of space.
    """
    torch_dtype = resolve_dtype(dtype)
    info = inspect_gguf(path)
    per = 4 if torch_dtype == torch.float32 else 2
    out = check_output_dir(output_dir, overwrite=overwrite, inputs={"GGUF file": info.path},
                           estimated_bytes=info.num_parameters * per + (64 << 20))
    model, tok = load_gguf(info.path, torch_dtype)
    remove_stale_temporaries(out)
    work = make_temp_dir(out)
    try:
        model.save_pretrained(work)
        if tok is not None:
            tok.save_pretrained(work)
        _check_written(work, info.path)
        normalize_permissions(work)
        publish_dir(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log.info("wrote %s (%s, %.1fM parameters, %s) from %s", out, model.config.model_type,
             sum(p.numel() for p in model.parameters()) / 1e6, str(torch_dtype).replace("torch.", ""), info.path)
    return out


def _check_written(work: Path, source: Path) -> None:
    import json

    cfg = json.loads((work / "config.json").read_text(encoding="utf-8"))
    if "quantization_config" in cfg:
        raise RuntimeError(f"converting {source}: the written config.json still holds a quantization_config")
    missing = [n for n in ("config.json", "generation_config.json", "tokenizer_config.json") if not (work / n).is_file()]
    if not any(work.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise RuntimeError(f"converting {source}: the checkpoint lacks {', '.join(missing)}")


# --------------------------------------------------------------------------------------------- streaming

class GGUFCheckpointReader:
    """Tensor-by-tensor reader of a GGUF file under transformers' parameter names (memory-mapped).

    The interface of :class:`minitron.compress.streaming.CheckpointReader`: ``reader.config`` (the
    transformers config, without ``quantization_config``), ``keys()``, ``get(name)``, ``shape(name)``,
    ``numel()``, ``nbytes_on_disk()``. ``get`` dequantizes one tensor (float32, transformers' layout:
    llama.cpp's q/k row order undone) from the memory-mapped file; nothing else is held. As in a saved
    checkpoint, a tied ``lm_head.weight`` is not a key.

    The GGUF-to-transformers name mapping and the per-architecture tensor fix-ups are transformers' own
    (``transformers.modeling_gguf_pytorch_utils``, the code ``from_pretrained(gguf_file=)`` runs).

    Raises (at construction, before any tensor is read):
        GGUFError: the file fails :func:`inspect_gguf`, or a tensor of the file maps to no parameter.
    """

    def __init__(self, path: PathLike) -> None:
        import numpy as np
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers import modeling_gguf_pytorch_utils as hf_gguf

        self.info = inspect_gguf(path)
        self.path = self.info.path
        with _alone(self.path) as (folder, fname):
            config = AutoConfig.from_pretrained(folder, gguf_file=fname)
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        self.config = config
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        processor_cls = hf_gguf.TENSOR_PROCESSORS.get(self.info.architecture, hf_gguf.TensorProcessor)
        self._processor = processor_cls(config=config.to_dict())
        self._mapping = hf_gguf.get_gguf_hf_weights_map(skeleton, self._processor)
        self._file = np.memmap(self.path, dtype=np.uint8, mode="r")
        self._tensors: dict[str, GGUFTensorInfo] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        expected = dict(skeleton.state_dict())
        unmapped = []
        for t in self.info.tensors:
            hf = self._mapping.get(t.name)
            if hf is None or hf not in expected:
                unmapped.append(t.name)
                continue
            self._tensors[hf] = t
            self._shapes[hf] = tuple(int(d) for d in expected[hf].shape)
        if unmapped:
            raise GGUFError(f"GGUF file {str(self.path)!r}: tensors {unmapped[:5]} map to no parameter of "
                            f"{type(skeleton).__name__}")

    def keys(self) -> list[str]:
        """Every parameter name the file holds (transformers' names)."""
        return list(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def file_of(self, name: str) -> Path:
        """The GGUF file (every tensor lives in it)."""
        if name not in self._tensors:
            raise KeyError(f"tensor {name!r} is not in the GGUF file {str(self.path)!r}")
        return self.path

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name`` dequantized to a float32 CPU tensor in transformers' layout."""
        import numpy as np
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import dequantize

        t = self._tensors.get(name)
        if t is None:
            raise KeyError(f"tensor {name!r} is not in the GGUF file {str(self.path)!r}")
        start = self.info.data_start + t.offset
        raw = self._file[start:start + t.nbytes]
        qtype = GGMLQuantizationType(t.type_id)
        if qtype == GGMLQuantizationType.F32:
            packed = raw.view(np.float32).reshape(t.shape)
        elif qtype == GGMLQuantizationType.F16:
            packed = raw.view(np.float16).reshape(t.shape)
        else:  # blocks: the last axis in bytes
            block, size = GGML_QUANT_SIZES[qtype]
            packed = raw.reshape(*t.shape[:-1], t.shape[-1] // block * size)
        weights = np.asarray(dequantize(packed, qtype), dtype=np.float32).reshape(t.shape)
        out = self._processor.process(weights=weights, name=t.name, tensor_key_mapping=self._mapping,
                                      parsed_parameters={})
        return torch.from_numpy(np.array(out.weights, dtype=np.float32, copy=True)).reshape(self._shapes[name])

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor ``name`` (nothing is read)."""
        self.file_of(name)
        return self._shapes[name]

    def numel(self) -> int:
        """Total elements of every tensor."""
        total = 0
        for shape in self._shapes.values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    def nbytes_on_disk(self) -> int:
        """Size of the GGUF file in bytes."""
        return self.info.file_size
