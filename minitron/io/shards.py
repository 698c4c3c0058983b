"""Sharded safetensors checkpoints, one tensor at a time: :class:`ShardedCheckpoint` and :class:`ShardedWriter`.

A Hugging Face checkpoint folder holds ``config.json`` and either one ``model.safetensors`` or a
``model.safetensors.index.json`` naming the shard (``model-0000i-of-0000n.safetensors``) of every tensor.
:class:`ShardedCheckpoint` reads such a folder tensor by tensor (``safetensors.safe_open``, memory-mapped,
one file mapped only while a tensor is read), so a model larger than memory can be processed with one
tensor resident at a time. :meth:`ShardedCheckpoint.validate` checks everything before any work: a
missing shard, an index naming a tensor no shard holds, a truncated or corrupt shard, tensor names and
shapes that do not match the model ``config.json`` describes (built on the ``meta`` device), and an
unsupported family, each an error naming the file.

:class:`ShardedWriter` writes tensors one by one into shards of at most ``max_shard_bytes`` (5 GB by
default, as transformers' ``save_pretrained``), named exactly as transformers names them, plus the index
(with ``metadata.total_size`` and ``total_parameters``). With the full ``layout`` (names, shapes, dtypes)
given up front every shard's header is known before its data, so each tensor goes straight to disk and
is freed; without a layout the tensors of the current shard are held until it is full.

The safetensors format: 8-byte little-endian header length N, N bytes of JSON (``{name: {"dtype",
"shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, padded with spaces), then the data;
offsets are relative to the end of the header and cover the data exactly.
"""
from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch

from minitron.io.checkpoint import CheckpointError, CorruptFileError, MissingCheckpointFileError

log = logging.getLogger(__name__)

__all__ = ["ShardedCheckpoint", "ShardedWriter", "TensorInfo", "SAFE_WEIGHTS_NAME", "SAFE_WEIGHTS_INDEX_NAME",
           "DEFAULT_SHARD_BYTES", "shard_names", "plan_shards"]

PathLike = Union[str, os.PathLike]

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
#: transformers' default ``max_shard_size`` ("5GB", decimal).
DEFAULT_SHARD_BYTES = 5 * 10**9
#: A header larger than this is refused as corrupt (safetensors' own limit is 100 MB).
_MAX_HEADER = 100 * 10**6

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its shard file, dtype, shape and byte range in the file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse the header of safetensors file ``path``; returns (header dict, absolute data start).

    Raises CorruptFileError (naming the file) for a bad length, bad JSON, bad entries or a data section
    whose size does not match the offsets (truncated or padded file).
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptFileError(f"weight file {str(path)!r} is truncated ({size} bytes, no safetensors header)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise CorruptFileError(
                f"weight file {str(path)!r} is corrupt or truncated (header of {n} bytes in a {size}-byte file)"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptFileError(f"weight file {str(path)!r} has a corrupt safetensors header ({e})") from None
    data_start = 8 + n
    end_max = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[entry["dtype"]]
            shape = [int(x) for x in entry["shape"]]
            b, e = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CorruptFileError(f"weight file {str(path)!r}: corrupt header entry for tensor {name!r}: {entry!r}") from None
        numel = 1
        for x in shape:
            numel *= x
        if e - b != numel * dtype.itemsize or b < 0:
            raise CorruptFileError(
                f"weight file {str(path)!r}: tensor {name} has offsets [{b}, {e}] that do not fit its shape {shape} "
                f"and dtype {entry['dtype']}"
            )
        end_max = max(end_max, e)
    if data_start + end_max != size:
        what = "truncated" if data_start + end_max > size else "corrupt (trailing bytes)"
        raise CorruptFileError(
            f"weight file {str(path)!r} is {what}: its header describes {data_start + end_max} bytes, the file "
            f"has {size}"
        )
    return header, data_start


class ShardedCheckpoint:
    """Read-only view of a Hugging Face safetensors checkpoint folder, tensor by tensor.

    Args:
        path: the checkpoint directory (``config.json`` + ``model.safetensors`` or index + shards).

    Attributes are computed lazily; call :meth:`validate` before any work to get every problem as an
    error naming the file. ``get`` returns a fresh CPU tensor in the stored dtype.
    """

    def __init__(self, path: PathLike) -> None:
        if not isinstance(path, (str, os.PathLike)) or str(path) == "":
            raise TypeError(f"path must be a non-empty path, got {path!r}")
        self.path = Path(path)
        if not self.path.is_dir():
            raise MissingCheckpointFileError(f"checkpoint {str(self.path)!r} is not a directory")
        if not (self.path / "config.json").is_file():
            raise MissingCheckpointFileError(f"{str(self.path)!r} is not a transformers checkpoint (no config.json)")
        self._tensors: Optional[dict[str, TensorInfo]] = None
        self._config: Any = None
        self.index_file: Optional[Path] = None

    # ------------------------------------------------------------------ structure
    def files(self) -> list[Path]:
        """The safetensors files of the checkpoint (from the index when there is one)."""
        index = self.path / SAFE_WEIGHTS_INDEX_NAME
        if index.is_file():
            self.index_file = index
            names = sorted(set(self._index_map().values()))
            return [self.path / n for n in names]
        single = self.path / SAFE_WEIGHTS_NAME
        if single.is_file():
            return [single]
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise MissingCheckpointFileError(f"checkpoint {str(self.path)!r} holds no safetensors weights (neither "
                                             f"{SAFE_WEIGHTS_NAME} nor {SAFE_WEIGHTS_INDEX_NAME})")
        return files

    def _index_map(self) -> dict[str, str]:
        index = self.path / SAFE_WEIGHTS_INDEX_NAME
        try:
            idx = json.loads(index.read_text(encoding="utf-8"))
            wm = idx["weight_map"]
            if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
                raise ValueError("weight_map is not a {tensor: file} object")
        except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            raise CorruptFileError(f"weight index {str(index)!r} is corrupt or truncated ({type(e).__name__}: {e})") from None
        return wm

    def _load(self) -> dict[str, TensorInfo]:
        if self._tensors is not None:
            return self._tensors
        files = self.files()
        for f in files:
            if not f.is_file():
                where = f" (named by {str(self.index_file)!r})" if self.index_file else ""
                raise MissingCheckpointFileError(f"checkpoint {str(self.path)!r} is incomplete: weight file {str(f)!r} "
                                                 f"is missing{where}")
        tensors: dict[str, TensorInfo] = {}
        for f in files:
            header, start = _read_header(f)
            for name, e in header.items():
                if name == "__metadata__":
                    continue
                b, end = e["data_offsets"]
                tensors[name] = TensorInfo(f, _DTYPES[e["dtype"]], tuple(int(x) for x in e["shape"]), start + int(b),
                                           start + int(end))
        if self.index_file is not None:
            wm = self._index_map()
            for name, fname in wm.items():
                info = tensors.get(name)
                if info is None or info.file.name != fname:
                    raise CheckpointError(
                        f"weight index {str(self.index_file)!r} names tensor {name} in {fname}, but "
                        f"{str(self.path / fname)!r} does not hold it"
                    )
            tensors = {k: v for k, v in tensors.items() if k in wm}
        self._tensors = tensors
        return tensors

    # ------------------------------------------------------------------ accessors
    @property
    def config(self) -> Any:
        """The transformers config of the checkpoint (``AutoConfig``)."""
        if self._config is None:
            from transformers import AutoConfig

            cfg = self.path / "config.json"
            try:
                json.loads(cfg.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                raise CorruptFileError(f"config file {str(cfg)!r} is corrupt or truncated (not valid JSON: {e})") from None
            try:
                self._config = AutoConfig.from_pretrained(str(self.path))
            except Exception as e:  # transformers raises its own validation error types
                raise CheckpointError(f"config file {str(cfg)!r} cannot be read by transformers: {e}") from None
        return self._config

    def keys(self) -> list[str]:
        """Tensor names, in file order (shard by shard, by offset)."""
        t = self._load()
        return sorted(t, key=lambda k: (t[k].file.name, t[k].begin))

    def __contains__(self, name: str) -> bool:
        return name in self._load()

    def info(self, name: str) -> TensorInfo:
        """Where tensor ``name`` lives (KeyError naming the checkpoint if absent)."""
        t = self._load()
        if name not in t:
            raise KeyError(f"checkpoint {str(self.path)!r} has no tensor {name!r}")
        return t[name]

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor ``name`` (from its file's header; nothing is read)."""
        return self.info(name).shape

    def file_of(self, name: str) -> Path:
        """The weight file holding tensor ``name``."""
        return self.info(name).file

    def nbytes_on_disk(self) -> int:
        """Size of the weight files in bytes."""
        return sum(f.stat().st_size for f in {i.file for i in self._load().values()})

    def dtype(self, name: str) -> torch.dtype:
        return self.info(name).dtype

    @property
    def nbytes(self) -> int:
        """Total bytes of tensor data."""
        return sum(i.nbytes for i in self._load().values())

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as a CPU tensor (read through a memory map that is closed again at once)."""
        from safetensors import safe_open

        info = self.info(name)
        with safe_open(str(info.file), framework="pt") as h:
            return h.get_tensor(name)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) in file order, one tensor read at a time."""
        for k in self.keys():
            yield k, self.get(k)

    # ------------------------------------------------------------------ validation
    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the tensors the config's model has (built on the ``meta`` device).

        A tied LM head (``tie_word_embeddings``) is not expected (transformers does not save it).
        """
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(self.config)
        out = {}
        seen: dict[int, str] = {}
        for k, v in skeleton.state_dict(keep_vars=True).items():
            if id(v) in seen:  # tied parameter: saved once, under its first name
                continue
            seen[id(v)] = k
            out[k] = tuple(v.shape)
        return out

    def validate(self) -> "ShardedCheckpoint":
        """Check the whole checkpoint (no tensor data read); returns ``self``.

        Raises:
            CorruptFileError: unreadable config, corrupt index, missing / truncated / corrupt shard (named).
            CheckpointError: unsupported family (config named), an index naming a tensor its shard lacks,
                missing / unexpected / mis-shaped tensors (file and tensor named).
        """
        from minitron.models import get_adapter

        config = self.config
        try:
            get_adapter(config)
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"config file {str(self.path / 'config.json')!r}: {e}") from None
        tensors = self._load()
        expected = self.expected_shapes()
        for name, info in tensors.items():
            if name not in expected:
                raise CheckpointError(
                    f"weight file {str(info.file)!r} holds tensor {name}, which the model described by "
                    f"{str(self.path / 'config.json')!r} does not have"
                )
            if info.shape != expected[name]:
                raise CheckpointError(
                    f"weight file {str(info.file)!r}: tensor {name} has shape {info.shape}, but "
                    f"{str(self.path / 'config.json')!r} describes {expected[name]}"
                )
        missing = [k for k in expected if k not in tensors]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise CheckpointError(
                f"checkpoint {str(self.path)!r} lacks tensor(s) {', '.join(missing[:3])}{more} that "
                f"{str(self.path / 'config.json')!r} describes"
            )
        return self

    def __repr__(self) -> str:
        return f"ShardedCheckpoint({str(self.path)!r})"


# ---------------------------------------------------------------------------------------------- writing
def plan_shards(sizes: Sequence[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Group tensors (name, nbytes), in order, into shards as transformers does: a tensor larger than the
    limit gets a shard of its own; otherwise a new shard starts when the next tensor would overflow."""
    shards: list[list[str]] = []
    cur: list[str] = []
    cur_size = 0
    for name, n in sizes:
        if n > max_shard_bytes:
            shards.append([name])
            continue
        if cur and cur_size + n > max_shard_bytes:
            shards.append(cur)
            cur, cur_size = [], 0
        cur.append(name)
        cur_size += n
    if cur:
        shards.append(cur)
    return shards


def shard_names(n: int) -> list[str]:
    """File names of ``n`` shards as transformers writes them (``model.safetensors`` when n == 1)."""
    if n == 1:
        return [SAFE_WEIGHTS_NAME]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _header_bytes(entries: Sequence[tuple[str, torch.dtype, tuple[int, ...]]]) -> bytes:
    """The safetensors header (length prefix + space-padded JSON) for tensors stored in this order."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, dtype, shape in entries:
        if dtype not in _DTYPE_NAMES:
            raise TypeError(f"tensor {name}: dtype {dtype} cannot be stored in safetensors here")
        n = dtype.itemsize
        for x in shape:
            n *= int(x)
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": [int(x) for x in shape], "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _write_tensor(f: Any, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    if t.numel():
        f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


class ShardedWriter:
    """Write a checkpoint's tensors one by one as transformers-style safetensors shards + index.

    Args:
        directory: existing directory to write into (e.g. a temporary sibling of the final output).
        max_shard_bytes: shard size limit (bytes of tensor data), 5 GB by default.
        layout: optional ``[(name, shape, dtype), ...]`` of every tensor in the order they will be added;
            with it each tensor is written to disk at once (memory: one tensor), without it a shard's
            tensors are held in memory until the shard is full.

    ``close()`` finishes the last shard, names the shards ``model-0000i-of-0000n.safetensors`` (one shard:
    ``model.safetensors``, no index) and writes ``model.safetensors.index.json``. Every shard is fsynced.
    Use as a context manager; on an exception the files written so far are left for the caller's
    temporary-directory cleanup.
    """

    def __init__(self, directory: PathLike, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 layout: Optional[Sequence[tuple[str, Sequence[int], torch.dtype]]] = None) -> None:
        if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, (int, float)) or max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes must be a positive number, got {max_shard_bytes!r}")
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise ValueError(f"directory {str(self.dir)!r} does not exist")
        self.max_shard_bytes = int(max_shard_bytes)
        self._weight_map: dict[str, int] = {}  # tensor -> shard number
        self._total_size = 0
        self._total_params = 0
        self._closed = False
        self._files: list[Path] = []  # provisional shard file names, in order
        self.layout: Optional[list[tuple[str, tuple[int, ...], torch.dtype]]] = None
        if layout is not None:
            self.layout = [(n, tuple(int(x) for x in s), d) for n, s, d in layout]
            sizes = []
            for n, s, d in self.layout:
                k = d.itemsize
                for x in s:
                    k *= x
                sizes.append((n, k))
            self._plan = plan_shards(sizes, self.max_shard_bytes)
            self._pos = 0  # next layout entry
            self._shard_of = {n: i for i, names in enumerate(self._plan) for n in names}
            self._final_names = shard_names(len(self._plan))
            self._open: dict[int, Any] = {}
            self._meta = {n: (s, d) for n, s, d in self.layout}
        else:
            self._pending: list[tuple[str, torch.Tensor]] = []
            self._pending_bytes = 0

    # ------------------------------------------------------------------ adding
    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Add one tensor (written now with a layout, else buffered for the current shard)."""
        if self._closed:
            raise RuntimeError("ShardedWriter is closed")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensor {name}: expected a torch.Tensor, got {type(tensor).__name__}")
        if name in self._weight_map:
            raise ValueError(f"tensor {name} added twice")
        self._total_params += tensor.numel()
        if self.layout is not None:
            self._add_planned(name, tensor)
        else:
            n = tensor.numel() * tensor.element_size()
            if n > self.max_shard_bytes:  # a shard of its own, now (as transformers does)
                held, held_bytes = self._pending, self._pending_bytes
                self._pending, self._pending_bytes = [(name, tensor)], n
                self._flush()
                self._pending, self._pending_bytes = held, held_bytes
                return
            if self._pending and self._pending_bytes + n > self.max_shard_bytes:
                self._flush()
            self._pending.append((name, tensor))
            self._pending_bytes += n

    def _add_planned(self, name: str, tensor: torch.Tensor) -> None:
        assert self.layout is not None
        if self._pos >= len(self.layout):
            raise ValueError(f"tensor {name} is not in the writer's layout (all {len(self.layout)} tensors written)")
        lname, lshape, ldtype = self.layout[self._pos]
        if name != lname or tuple(tensor.shape) != lshape or tensor.dtype != ldtype:
            raise ValueError(
                f"tensor {name} {tuple(tensor.shape)} {tensor.dtype} added where the layout expects {lname} "
                f"{lshape} {ldtype}"
            )
        shard = self._shard_of[name]
        names = self._plan[shard]
        if name == names[0]:
            # shards are contiguous runs of the layout, except that a tensor over the limit gets its own
            # shard at once (as transformers does), so at most two files are open at a time
            path = self.dir / self._final_names[shard]
            self._files.append(path)
            f = open(path, "wb")
            self._open[shard] = f
            f.write(_header_bytes([(n, self._meta[n][1], self._meta[n][0]) for n in names]))
        _write_tensor(self._open[shard], tensor)
        self._weight_map[name] = shard
        self._total_size += tensor.numel() * tensor.element_size()
        self._pos += 1
        if name == names[-1]:
            self._close_file(shard)

    def _close_file(self, shard: Optional[int] = None) -> None:
        """Fsync and close shard ``shard`` (None: every open shard)."""
        for k in ([shard] if shard is not None else list(getattr(self, "_open", {}))):
            f = self._open.pop(k, None)
            if f is not None:
                f.flush()
                os.fsync(f.fileno())
                f.close()

    def _flush(self) -> None:
        """Write the buffered tensors as the next shard (provisional name, renamed at close)."""
        if not self._pending:
            return
        shard = len(self._files)
        path = self.dir / f".shard-{shard:05d}.safetensors.part"
        with open(path, "wb") as f:
            f.write(_header_bytes([(n, t.dtype, tuple(t.shape)) for n, t in self._pending]))
            for n, t in self._pending:
                _write_tensor(f, t)
                self._weight_map[n] = shard
                self._total_size += t.numel() * t.element_size()
            f.flush()
            os.fsync(f.fileno())
        self._files.append(path)
        self._pending, self._pending_bytes = [], 0

    # ------------------------------------------------------------------ closing
    def close(self) -> list[Path]:
        """Finish: last shard, final shard names, index. Returns the shard files."""
        if self._closed:
            return self._files
        if self.layout is not None:
            if self._pos != len(self.layout):
                missing = [n for n, _, _ in self.layout[self._pos: self._pos + 3]]
                raise ValueError(f"ShardedWriter closed after {self._pos} of {len(self.layout)} tensors "
                                 f"(next: {', '.join(missing)})")
            self._close_file()
            names = self._final_names
            self._files = [self.dir / n for n in names]
        else:
            self._flush()
            if not self._files:
                raise ValueError("ShardedWriter closed without any tensor")
            names = shard_names(len(self._files))
            final = []
            for p, n in zip(self._files, names):
                os.replace(p, self.dir / n)
                final.append(self.dir / n)
            self._files = final
        if len(names) > 1:
            index = {
                "metadata": {"total_parameters": self._total_params, "total_size": self._total_size},
                "weight_map": {k: names[v] for k, v in sorted(self._weight_map.items())},
            }
            with open(self.dir / SAFE_WEIGHTS_INDEX_NAME, "w", encoding="utf-8") as f:
                f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
        self._closed = True
        return self._files

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            if self.layout is not None:
                self._close_file()
            self._closed = True
