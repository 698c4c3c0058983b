"""A store of a teacher's top-k log-probabilities: run the teacher once, distil from the store later.

:func:`minitron.train.teacher_logits.write_teacher_logits` runs a teacher over a :class:`~minitron.io.data.PackedDataset` and keeps, for every
token position, the ``k`` most likely next tokens and their log-probabilities under ``softmax(logits / T)``
(fp32 log-softmax, computed over chunks of tokens so that no ``[all tokens x V]`` tensor is ever held).
:class:`TeacherLogitStore` reads the store memory-mapped and feeds a ``DataLoader`` or the training loop.

Layout of a store directory::

    manifest.json                 format version, teacher/tokenizer/data identity, encodings, shard list
    shard-00000.safetensors       sequences [start, stop) of the data, one tensor row per sequence
    shard-00001.safetensors       ...

Each shard holds, for its ``n`` sequences of ``S`` tokens:

* ``indices``: uint8 ``[n, ceil(S * k * bits / 8)]``, the top-k token ids of every position (sorted by
  decreasing probability) bit-packed little-endian with ``bits = ceil(log2(vocab_size))`` bits each; every
  sequence starts on a byte boundary so any sequence can be read alone.
* the values, by ``value_encoding``:

  - ``"fp32"`` / ``"fp16"`` / ``"bf16"``: ``values`` ``[n, S, k]`` log-probabilities in that dtype;
  - ``"u8"``: ``values`` uint8 ``[n, S, k]`` with ``row_max`` fp32 ``[n, S]`` (the top log-probability, exact)
    and ``row_step`` fp32 ``[n, S]``: ``logprob_j = row_max - row_step * values_j``, where
    ``row_step = (row_max - logprob_k) / 254`` (uniform quantisation of the log-probabilities between the top
    and the k-th finite entry of each token, rounded to nearest); code 255 marks a zero probability (``-inf``).

Decoding renormalises a token whose decoded mass exceeds 1 (possible after rounding) so that its mass is
exactly 1: ``logprob -= max(0, logsumexp(logprob))``. The sparse KL ops accept decoded values as they are.

Every shard and the manifest are written atomically (temporary sibling + fsync + rename). The manifest is
rewritten after each shard with the shard's byte size and sha256, and ``complete: true`` after the last one,
so a killed extraction resumes (``resume=True``) after its last complete shard; a half-written shard (a
temporary file, or a shard file that the manifest does not list) is removed and written again.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from minitron.io.data import PackedDataset
from minitron.io.files import atomic_write_bytes, atomic_write_json, read_json
from minitron.io.safety import abandon_output, begin_output, check_output_dir, finish_output

log = logging.getLogger(__name__)

__all__ = ["TeacherLogitStore", "TeacherLogitDataset", "StoreError", "VALUE_ENCODINGS",
           "DEFAULT_VALUE_ENCODING", "FORMAT", "FORMAT_VERSION", "MANIFEST_NAME", "index_bits", "pack_bits",
           "unpack_bits", "encode_values", "decode_values", "topk_logprobs", "tokenizer_hash", "config_hash",
           "data_hashes", "bytes_per_token"]

PathLike = Union[str, os.PathLike]

FORMAT = "minitron-teacher-logits"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
#: value encodings -> bytes per entry (``u8`` adds 8 bytes per token for row_max and row_step)
VALUE_ENCODINGS: Dict[str, int] = {"fp32": 4, "fp16": 2, "bf16": 2, "u8": 1}
DEFAULT_VALUE_ENCODING = "u8"
_FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_U8_LEVELS = 254  # codes 0..254; 255 marks a zero probability (-inf)
_U8_NEG_INF = 255
#: logits held at once while extracting (fp32 elements: 64 Mi = 256 MiB)
_LOGIT_BUDGET = 64 * 2**20
_SHARD_BUDGET = 256 * 2**20


class StoreError(ValueError):
    """A store that cannot be used: missing, truncated, half-written, incomplete, corrupt or incompatible."""


# --------------------------------------------------------------------------------------------------
# encodings


def index_bits(vocab_size: int) -> int:
    """Bits per stored token id: ``ceil(log2(vocab_size))`` (at least 1)."""
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    return max(1, (vocab_size - 1).bit_length())


def bytes_per_token(k: int, vocab_size: int, value_encoding: str) -> float:
    """Stored bytes per token position (indices + values + per-token scalars), excluding container headers."""
    if value_encoding not in VALUE_ENCODINGS:
        raise ValueError(f"value_encoding must be one of {sorted(VALUE_ENCODINGS)}, got {value_encoding!r}")
    extra = 8 if value_encoding == "u8" else 0
    return k * index_bits(vocab_size) / 8 + k * VALUE_ENCODINGS[value_encoding] + extra


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Bit-pack non-negative ints ``[n, m]`` (each < 2**bits) into uint8 rows ``[n, ceil(m * bits / 8)]``.

    Little-endian bit order: value ``j`` of a row occupies bits ``j*bits .. (j+1)*bits - 1`` of the row.
    """
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be in [1, 32], got {bits}")
    n, m = values.shape
    arr = np.ascontiguousarray(values.to(torch.int64).numpy().astype("<u4"))
    allbits = np.unpackbits(arr.view(np.uint8).reshape(n, m, 4), axis=-1, bitorder="little")[..., :bits]
    return torch.from_numpy(np.packbits(allbits.reshape(n, m * bits), axis=-1, bitorder="little"))


def unpack_bits(packed: torch.Tensor, bits: int, m: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 ``[n, nbytes]`` -> int64 ``[n, m]``."""
    n = packed.shape[0]
    arr = np.ascontiguousarray(packed.numpy())
    allbits = np.unpackbits(arr, axis=-1, count=m * bits, bitorder="little").reshape(n, m, bits)
    if bits < 32:
        allbits = np.concatenate([allbits, np.zeros((n, m, 32 - bits), dtype=np.uint8)], axis=-1)
    words = np.packbits(allbits, axis=-1, bitorder="little").reshape(n, m, 4)
    return torch.from_numpy(np.ascontiguousarray(words).view("<u4").reshape(n, m).astype(np.int64))


def encode_values(logprobs: torch.Tensor, encoding: str) -> Dict[str, torch.Tensor]:
    """Encode fp32 log-probabilities ``[..., k]`` sorted in decreasing order along the last dim.

    Returns:
        ``{"values": ...}`` (and ``row_max``/``row_step`` fp32 ``[...]`` for ``"u8"``); see the module docstring.
    """
    if encoding in _FLOAT_DTYPES:
        return {"values": logprobs.to(_FLOAT_DTYPES[encoding]).contiguous()}
    if encoding != "u8":
        raise ValueError(f"value_encoding must be one of {sorted(VALUE_ENCODINGS)}, got {encoding!r}")
    lp = logprobs.float()
    finite = torch.isfinite(lp)
    top = lp[..., 0]
    low = torch.where(finite, lp, torch.full_like(lp, float("inf"))).amin(-1)
    step = ((top - low) / _U8_LEVELS).clamp_min(0)
    safe = torch.where(step > 0, step, torch.ones_like(step))
    q = ((top.unsqueeze(-1) - lp) / safe.unsqueeze(-1)).round()
    q = torch.where(finite, q.clamp(0, _U8_LEVELS), torch.full_like(q, _U8_NEG_INF))
    return {"values": q.to(torch.uint8).contiguous(), "row_max": top.contiguous(), "row_step": step.contiguous()}


def decode_values(encoded: Mapping[str, torch.Tensor], encoding: str) -> torch.Tensor:
    """Decode :func:`encode_values` output to fp32 log-probabilities ``[..., k]`` with total mass <= 1."""
    if encoding in _FLOAT_DTYPES:
        lp = encoded["values"].float()
    elif encoding == "u8":
        q = encoded["values"]
        lp = encoded["row_max"].float().unsqueeze(-1) - encoded["row_step"].float().unsqueeze(-1) * q.float()
        lp = lp.masked_fill(q == _U8_NEG_INF, float("-inf"))
    else:
        raise ValueError(f"value_encoding must be one of {sorted(VALUE_ENCODINGS)}, got {encoding!r}")
    lp = lp.clamp_max(0.0)
    excess = torch.logsumexp(lp, dim=-1, keepdim=True).clamp_min(0.0)
    return lp - excess


def topk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], k: int,
                  temperature: float = 1.0, *, chunk_tokens: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k of ``log_softmax((hidden @ weight.T + bias) / temperature)``, chunked over tokens.

    Args:
        hidden: ``[N, H]`` (any float dtype; the GEMM runs in the weight's dtype); weight ``[V, H]``; bias ``[V]``.
    Returns:
        ``(indices int64 [N, k], logprobs fp32 [N, k])`` sorted by decreasing probability. At most
        ``chunk_tokens`` rows of fp32 logits exist at once (default: 256 MiB of them).
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    if chunk_tokens is None:
        chunk_tokens = max(1, _LOGIT_BUDGET // vocab)
    idx_out = torch.empty(n, k, dtype=torch.int64, device=hidden.device)
    lp_out = torch.empty(n, k, dtype=torch.float32, device=hidden.device)
    for s in range(0, n, chunk_tokens):
        h = hidden[s:s + chunk_tokens].to(weight.dtype)
        logits = torch.nn.functional.linear(h, weight, bias).float()
        if temperature != 1.0:
            logits = logits / temperature
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        top, idx = torch.topk(logits, k, dim=-1, largest=True, sorted=True)
        idx_out[s:s + chunk_tokens] = idx
        lp_out[s:s + chunk_tokens] = (top - lse).clamp_max(0.0)
        del logits
    return idx_out, lp_out


# --------------------------------------------------------------------------------------------------
# identity hashes


def _sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def tokenizer_hash(path: Optional[PathLike]) -> Optional[str]:
    """sha256 over the tokenizer files of directory ``path`` (names and bytes, in name order); None if it has none."""
    if path is None:
        return None
    from minitron.io.checkpoint import TOKENIZER_AUX_FILES

    p = Path(path)
    if not p.is_dir():
        return None
    h = hashlib.sha256()
    found = False
    for name in sorted(TOKENIZER_AUX_FILES):
        f = p / name
        if f.is_file():
            found = True
            h.update(name.encode() + b"\0")
            h.update(_sha256_file(f).encode())
    return h.hexdigest() if found else None


def config_hash(config: Any) -> str:
    """sha256 of a model config's ``to_dict()`` as sorted JSON (transformers version and name fields excluded)."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    d = {k: v for k, v in d.items() if k not in ("transformers_version", "_name_or_path", "torch_dtype", "dtype")}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def _tensor_sha256(t: torch.Tensor, rows: int = 4096) -> str:
    h = hashlib.sha256()
    t = t.to(torch.int64).contiguous()
    for s in range(0, t.shape[0], rows):
        h.update(memoryview(np.ascontiguousarray(t[s:s + rows].numpy().astype("<i8"))))
    return h.hexdigest()


def data_hashes(data: PackedDataset) -> Dict[str, str]:
    """sha256 of the token ids and of the attention mask (int64 little-endian, row-major)."""
    return {"input_ids_sha256": _tensor_sha256(data.input_ids),
            "attention_mask_sha256": _tensor_sha256(data.attention_mask)}


# --------------------------------------------------------------------------------------------------
# writer


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def _check_int(name: str, v: Any, lo: int, allow_none: bool = False) -> None:
    if v is None and allow_none:
        return
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"{name} must be an int, got {v!r}")
    if v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")


def _encode_shard(indices: torch.Tensor, logprobs: torch.Tensor, bits: int, encoding: str) -> Dict[str, torch.Tensor]:
    """indices int64 / logprobs fp32 ``[n, S, k]`` -> the shard's tensors."""
    n = indices.shape[0]
    out = {"indices": pack_bits(indices.reshape(n, -1), bits)}
    out.update(encode_values(logprobs, encoding))
    return out


def _write_shard(path: Path, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> Tuple[int, str]:
    from safetensors.torch import save

    blob = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, blob)
    return len(blob), hashlib.sha256(blob).hexdigest()


# --------------------------------------------------------------------------------------------------
# reader


@dataclass
class _Shard:
    path: Path
    start: int
    stop: int


class TeacherLogitStore:
    """Read-only, memory-mapped access to a store written by :func:`minitron.train.teacher_logits.write_teacher_logits`.

    Opening validates the manifest (format, version, ``complete``), that every shard exists with its recorded
    byte size and that its safetensors header holds the expected tensors and sequence range; with
    ``verify_hashes=True`` also every shard's sha256. Any problem raises :class:`StoreError` naming the file.

    Attributes:
        path: the store directory; manifest: the parsed manifest; k, vocab_size, seq_len, temperature,
        value_encoding, index_bits.
    """

    def __init__(self, path: PathLike, *, verify_hashes: bool = False) -> None:
        self.path = Path(path)
        mpath = self.path / MANIFEST_NAME
        if not self.path.is_dir():
            raise StoreError(f"teacher-logit store {str(self.path)!r} does not exist or is not a directory")
        if not mpath.is_file():
            raise StoreError(f"{str(self.path)!r} is not a teacher-logit store: {str(mpath)!r} is missing")
        try:
            m = read_json(mpath, "store manifest")
        except ValueError as e:
            raise StoreError(str(e)) from None
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise StoreError(f"{str(mpath)!r} is not a teacher-logit store manifest (format {m.get('format')!r})"
                             if isinstance(m, dict) else f"{str(mpath)!r} is not a teacher-logit store manifest")
        if m.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{str(mpath)!r} has format version {m.get('format_version')!r}; this minitron reads "
                             f"version {FORMAT_VERSION}")
        required = ("k", "vocab_size", "temperature", "value_encoding", "index_bits", "data", "shards", "complete")
        missing = [k for k in required if k not in m]
        if missing:
            raise StoreError(f"store manifest {str(mpath)!r} lacks {missing}")
        if not m["complete"]:
            raise StoreError(f"store {str(self.path)!r} is incomplete ({len(m['shards'])} shard(s) written, extraction "
                             "interrupted); continue it with resume=True (--resume)")
        if m["value_encoding"] not in VALUE_ENCODINGS:
            raise StoreError(f"store manifest {str(mpath)!r}: unknown value_encoding {m['value_encoding']!r}")
        self.manifest: Dict[str, Any] = m
        self.k = int(m["k"])
        self.vocab_size = int(m["vocab_size"])
        self.index_bits = int(m["index_bits"])
        self.seq_len = int(m["data"]["seq_len"])
        self.temperature = float(m["temperature"])
        self.value_encoding = str(m["value_encoding"])
        n = int(m["data"]["num_sequences"])
        self._shards: List[_Shard] = []
        expect = 0
        for e in m["shards"]:
            f = self.path / e["file"]
            if e["start"] != expect:
                raise StoreError(f"store manifest {str(mpath)!r}: shard {e['file']} starts at sequence {e['start']}, "
                                 f"expected {expect}")
            expect = e["stop"]
            if not f.is_file():
                raise StoreError(f"store shard {str(f)!r} is missing")
            size = f.stat().st_size
            if size != e["bytes"]:
                raise StoreError(f"store shard {str(f)!r} is truncated or damaged: {size} bytes, the manifest "
                                 f"records {e['bytes']}")
            if verify_hashes and _sha256_file(f) != e["sha256"]:
                raise StoreError(f"store shard {str(f)!r} does not match its sha256 in the manifest (corrupt)")
            self._check_header(f, e["stop"] - e["start"])
            self._shards.append(_Shard(f, int(e["start"]), int(e["stop"])))
        if expect != n:
            raise StoreError(f"store manifest {str(mpath)!r}: shards cover {expect} sequences, the data has {n}")
        self._starts = [s.start for s in self._shards]
        self._handles: Dict[int, Any] = {}
        self._pid = os.getpid()

    def _check_header(self, f: Path, n: int) -> None:
        from safetensors import safe_open

        try:
            with safe_open(str(f), framework="pt") as h:
                keys = set(h.keys())
                need = {"indices", "values"} | ({"row_max", "row_step"} if self.value_encoding == "u8" else set())
                if not need <= keys:
                    raise StoreError(f"store shard {str(f)!r} lacks tensors {sorted(need - keys)}")
                nbytes = math.ceil(self.seq_len * self.k * self.index_bits / 8)
                shapes = {"indices": [n, nbytes], "values": [n, self.seq_len, self.k]}
                for key, shape in shapes.items():
                    got = list(h.get_slice(key).get_shape())
                    if got != shape:
                        raise StoreError(f"store shard {str(f)!r}: tensor {key!r} has shape {got}, expected {shape}")
        except StoreError:
            raise
        except Exception as e:  # header parse errors
            raise StoreError(f"store shard {str(f)!r} is corrupt ({type(e).__name__}: {e})") from None

    def __len__(self) -> int:
        return int(self.manifest["data"]["num_sequences"])

    def __repr__(self) -> str:
        return (f"TeacherLogitStore({str(self.path)!r}: {len(self)} x {self.seq_len} tokens, k={self.k}, "
                f"V={self.vocab_size}, T={self.temperature}, {self.value_encoding})")

    @property
    def tokenizer_hash(self) -> Optional[str]:
        return (self.manifest.get("tokenizer") or {}).get("sha256")

    def nbytes(self) -> int:
        """Total bytes of the shards."""
        return sum(int(e["bytes"]) for e in self.manifest["shards"])

    def _handle(self, i: int) -> Any:
        from safetensors import safe_open

        if self._pid != os.getpid():  # forked DataLoader worker: reopen
            self._handles, self._pid = {}, os.getpid()
        h = self._handles.get(i)
        if h is None:
            h = safe_open(str(self._shards[i].path), framework="pt")
            self._handles[i] = h
        return h

    def __getstate__(self) -> Dict[str, Any]:
        d = dict(self.__dict__)
        d["_handles"] = {}
        return d

    def _read_runs(self, seqs: List[int]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Read sequences (sorted, distinct) as packed indices + encoded values."""
        idx_parts: List[torch.Tensor] = []
        enc_parts: Dict[str, List[torch.Tensor]] = {}
        j = 0
        while j < len(seqs):
            si = bisect.bisect_right(self._starts, seqs[j]) - 1
            sh = self._shards[si]
            # a run of consecutive sequences inside one shard is one slice
            r = j
            while r + 1 < len(seqs) and seqs[r + 1] == seqs[r] + 1 and seqs[r + 1] < sh.stop:
                r += 1
            a, b = seqs[j] - sh.start, seqs[r] - sh.start + 1
            h = self._handle(si)
            try:
                idx_parts.append(h.get_slice("indices")[a:b])
                for key in ("values", "row_max", "row_step") if self.value_encoding == "u8" else ("values",):
                    enc_parts.setdefault(key, []).append(h.get_slice(key)[a:b])
            except Exception as e:
                raise StoreError(f"cannot read store shard {str(sh.path)!r} ({type(e).__name__}: {e})") from None
            j = r + 1
        return torch.cat(idx_parts), {k: torch.cat(v) for k, v in enc_parts.items()}

    def get(self, sequence_indices: Union[torch.Tensor, Sequence[int], int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """The stored entries of the given sequences (in the given order; repeats allowed).

        Returns:
            ``(indices int64 [B, S, k], logprobs fp32 [B, S, k])``, sorted by decreasing probability per token.
        Raises:
            IndexError: a sequence index outside ``[0, len(store))``.
        """
        single = isinstance(sequence_indices, int)
        idx = torch.as_tensor([sequence_indices] if single else sequence_indices, dtype=torch.long).reshape(-1).cpu()
        n = len(self)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise IndexError(f"sequence_indices out of range [0, {n}): {idx.tolist()[:8]}")
        uniq, inverse = torch.unique(idx, sorted=True, return_inverse=True)
        b, s, k = idx.numel(), self.seq_len, self.k
        if b == 0:
            return torch.empty(0, s, k, dtype=torch.long), torch.empty(0, s, k)
        packed, enc = self._read_runs(uniq.tolist())
        indices = unpack_bits(packed, self.index_bits, s * k).reshape(-1, s, k)
        logprobs = decode_values(enc, self.value_encoding)
        if uniq.numel() != b or not torch.equal(uniq, idx):
            indices, logprobs = indices[inverse], logprobs[inverse]
        return indices, logprobs

    def check_compatible(self, data: PackedDataset, *, vocab_size: Optional[int] = None,
                         tokenizer_hash: Optional[str] = None, real_vocab_size: Optional[int] = None) -> None:
        """Refuse data / a student this store does not describe.

        Args:
            data: the student's packed data (must be the very sequences the store was made from).
            vocab_size: the student's vocabulary size (its LM-head rows).
            tokenizer_hash: the student's tokenizer hash (:func:`tokenizer_hash`), checked when both it and the
                store's are known and ``real_vocab_size`` is not given.
            real_vocab_size: the real vocabulary (padded heads, appended special tokens: see
                :func:`minitron.train.distill.resolve_vocab_size`); lets ``vocab_size`` differ from the store's
                when both hold it.
        Raises:
            StoreError naming the mismatch (tokenizer, vocabulary, seq_len, number of sequences, token-id hash).
        """
        m, d = self.manifest, self.manifest["data"]
        where = f"teacher-logit store {str(self.path)!r}"
        if (tokenizer_hash is not None and self.tokenizer_hash is not None and tokenizer_hash != self.tokenizer_hash
                and real_vocab_size is None):
            raise StoreError(f"{where} was made with another tokenizer (tokenizer hash {self.tokenizer_hash[:12]}... "
                             f"vs the student's {tokenizer_hash[:12]}...)")
        if real_vocab_size is not None:
            top = min(self.vocab_size, int(vocab_size) if vocab_size is not None else self.vocab_size)
            if int(real_vocab_size) > top:
                raise StoreError(f"{where}: the real vocabulary size {real_vocab_size} exceeds the store's vocabulary "
                                 f"({self.vocab_size}) or the student's head ({vocab_size})")
        elif vocab_size is not None and int(vocab_size) != self.vocab_size:
            raise StoreError(f"{where} has vocabulary size {self.vocab_size}, the student has {vocab_size}: they must "
                             "share the teacher's vocabulary (a padded head: give the tokenizer or --vocab-size)")
        if not isinstance(data, PackedDataset):
            raise TypeError(f"data must be a PackedDataset, got {type(data).__name__}")
        if data.seq_len != self.seq_len:
            raise StoreError(f"{where} has seq_len {self.seq_len}, the data has seq_len {data.seq_len}; use "
                             f"--seq-len {self.seq_len} and the same data")
        if len(data) != len(self):
            raise StoreError(f"{where} holds {len(self)} sequences, the data has {len(data)}: not the same data "
                             "(same source, max tokens and seq_len are needed)")
        got = data_hashes(data)
        for key, what in (("input_ids_sha256", "token ids"), ("attention_mask_sha256", "attention mask")):
            if got[key] != d.get(key):
                raise StoreError(f"{where} was made from other data: the {what} hash differs "
                                 f"({str(d.get(key))[:12]}... stored vs {got[key][:12]}...)")

    def token_ids(self, sequence_indices: Sequence[int]) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """``(input_ids, attention_mask)`` int64 ``[B, S]`` of the given sequences when the store keeps its token ids
        (an imported store: :func:`minitron.io.served.import_teacher_logits`), else ``(None, None)``."""
        if not (self.manifest.get("data") or {}).get("stored_token_ids"):
            return None, None
        ids, mask = [], []
        for i in sequence_indices:
            si = bisect.bisect_right(self._starts, int(i)) - 1
            sh = self._shards[si]
            h = self._handle(si)
            try:
                ids.append(h.get_slice("input_ids")[int(i) - sh.start: int(i) - sh.start + 1])
                mask.append(h.get_slice("attention_mask")[int(i) - sh.start: int(i) - sh.start + 1])
            except Exception as e:
                raise StoreError(f"cannot read the token ids of store shard {str(sh.path)!r} ({type(e).__name__}: "
                                 f"{e})") from None
        return torch.cat(ids).long(), torch.cat(mask).long()

    def stored_data(self) -> Optional[PackedDataset]:
        """The packed sequences the store describes, when it keeps its token ids (else None): distil with them."""
        ids, mask = self.token_ids(range(len(self)))
        if ids is None or mask is None:
            return None
        return PackedDataset(ids, mask, str(self.manifest["data"].get("description") or "stored token ids"))

    def dataset(self, data: PackedDataset) -> "TeacherLogitDataset":
        """A torch ``Dataset`` over ``data`` with this store's entries (checks compatibility first)."""
        return TeacherLogitDataset(self, data)

    def verify(self) -> None:
        """Check every shard's sha256 against the manifest (StoreError naming the first bad file)."""
        for e in self.manifest["shards"]:
            f = self.path / e["file"]
            if _sha256_file(f) != e["sha256"]:
                raise StoreError(f"store shard {str(f)!r} does not match its sha256 in the manifest (corrupt)")


class TeacherLogitDataset(torch.utils.data.Dataset):
    """Items ``{"input_ids" [S], "attention_mask" [S], "teacher_indices" int64 [S, k], "teacher_logprobs" fp32
    [S, k], "sequence_index" int64 []}``; batches of a ``DataLoader`` (default collate) add a leading ``B``."""

    def __init__(self, store: TeacherLogitStore, data: PackedDataset, *, check: bool = True) -> None:
        if check:
            store.check_compatible(data)
        self.store, self.data = store, data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        idx, lp = self.store.get([int(i)])
        return {"input_ids": self.data.input_ids[i], "attention_mask": self.data.attention_mask[i],
                "teacher_indices": idx[0], "teacher_logprobs": lp[0], "sequence_index": torch.tensor(int(i))}
