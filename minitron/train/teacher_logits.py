"""The teacher pass of a top-k logit store: run the teacher over packed data and write its top-k
log-probabilities per token. :mod:`minitron.io.logit_store` defines the store (format, encodings, manifest,
reader) and only reads and writes its files; running the model lives here, in the training layer."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import torch

from minitron.io.data import PackedDataset
from minitron.io.files import atomic_write_json, read_json
from minitron.io.logit_store import (DEFAULT_VALUE_ENCODING, FORMAT, FORMAT_VERSION, MANIFEST_NAME, VALUE_ENCODINGS,
                                     PathLike, StoreError, _SHARD_BUDGET, _check_int, _encode_shard, _sha256_file,
                                     _shard_name, _write_shard, bytes_per_token, config_hash, data_hashes, index_bits,
                                     tokenizer_hash, topk_logprobs)
from minitron.io.safety import abandon_output, begin_output, check_output_dir, finish_output
from minitron.models import get_adapter
from minitron.options import fold
from minitron.train.distill import final_hidden_and_head, frozen

log = logging.getLogger(__name__)

__all__ = ["write_teacher_logits", "TeacherPass"]


def _resolve_device(device: Union[str, torch.device]) -> torch.device:
    from minitron.runtime import resolve_device

    return resolve_device(device)


@dataclass
class TeacherPass:
    """How the teacher pass runs and what the manifest records about its inputs (the keywords of
    :func:`write_teacher_logits`).

    Attributes:
        top_k: entries kept per token, ``1 <= top_k <= vocab_size``.
        temperature: the teacher's softmax temperature (recorded; distillation uses it for the student).
        value_encoding: ``"u8"`` (default, 1 byte per entry + 8 per token), ``"fp16"``, ``"bf16"`` or ``"fp32"``.
        batch_size: sequences per teacher forward.
        shard_sequences: sequences per shard (default: about 256 MiB of encoded entries per shard).
        device: "auto" (CUDA when available), "cpu", "cuda", ...
        progress: show a tqdm progress bar.
        teacher_path / tokenizer_path: recorded in the manifest; the tokenizer hash is computed from the
            tokenizer files of ``tokenizer_path`` (else of ``teacher_path``) when it has some.
        data_path: the data source, for the output-safety check and the manifest.
        on_shard: called as ``on_shard(shard_number, manifest_entry)`` after each shard is committed.
    """

    top_k: int
    temperature: float = 1.0
    value_encoding: str = DEFAULT_VALUE_ENCODING
    batch_size: int = 8
    shard_sequences: Optional[int] = None
    device: Union[str, torch.device] = "auto"
    progress: bool = True
    teacher_path: Optional[PathLike] = None
    tokenizer_path: Optional[PathLike] = None
    data_path: Optional[PathLike] = None
    on_shard: Optional[Callable[[int, Dict[str, Any]], None]] = None

    def check(self, vocab: int) -> None:
        """Refuse bad settings, naming the argument (``vocab``: the teacher's vocabulary size)."""
        _check_int("top_k", self.top_k, 1)
        if self.top_k > vocab:
            raise ValueError(f"top_k={self.top_k} is larger than the teacher's vocabulary ({vocab})")
        t = self.temperature
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {t!r}")
        if self.value_encoding not in VALUE_ENCODINGS:
            raise ValueError(f"value_encoding must be one of {sorted(VALUE_ENCODINGS)}, got {self.value_encoding!r}")
        _check_int("batch_size", self.batch_size, 1)
        _check_int("shard_sequences", self.shard_sequences, 1, allow_none=True)


def write_teacher_logits(
    teacher: torch.nn.Module,
    data: PackedDataset,
    output_dir: PathLike,
    settings: Optional[TeacherPass] = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    **fields: Any,
) -> Path:
    """Run ``teacher`` over ``data`` and store its top-k next-token log-probabilities in ``output_dir``.

    Args:
        teacher: a supported causal LM (any dtype; put in eval mode, gradients off, moved to ``device``).
        data: the packed sequences, ``input_ids``/``attention_mask`` ``[N, S]``, in the order the store keeps.
        output_dir: the store directory (refused when it exists, unless ``resume`` or ``overwrite``; never
            equal to, inside or containing ``teacher_path``, ``tokenizer_path`` or ``data_path``).
        settings: a :class:`TeacherPass` (top_k, temperature, value_encoding, batch_size, shard_sequences,
            device, progress, the input paths, on_shard).
        resume: continue an interrupted extraction after its last complete shard (settings must match).
        overwrite: replace an existing store (the old one stays intact until the new one is complete).
        **fields: any field of :class:`TeacherPass` by name (``top_k=16, batch_size=4``), over ``settings``.

    Returns:
        The store directory. Memory: one batch of teacher activations, fp32 logits of at most 256 MiB at a
        time, and one shard of encoded entries.

    Raises:
        TypeError/ValueError naming the argument; :class:`~minitron.io.safety.OutputExistsError`;
        :class:`~minitron.io.logit_store.StoreError` when ``resume`` meets a store written with other settings or from other data.
    """
    if settings is None:
        try:
            s = TeacherPass(**fields)
        except TypeError as e:
            raise TypeError(f"write_teacher_logits(): {e}") from None
    else:
        (s,) = fold("write_teacher_logits", fields, settings)
    if not isinstance(teacher, torch.nn.Module):
        raise TypeError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
    adapter = get_adapter(teacher)
    adapter.check_model(teacher)
    if not isinstance(data, PackedDataset):
        raise TypeError(f"data must be a PackedDataset, got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError("data holds no sequences")
    vocab = int(adapter.lm_head(teacher).weight.shape[0])
    s.check(vocab)
    per_seq = bytes_per_token(s.top_k, vocab, s.value_encoding) * data.seq_len
    if s.shard_sequences is None:
        s = dataclasses.replace(s, shard_sequences=max(1, min(len(data), int(_SHARD_BUDGET // per_seq))))
    inputs = {"teacher": s.teacher_path, "tokenizer": s.tokenizer_path, "data": s.data_path}
    out = check_output_dir(output_dir, overwrite=overwrite, resume=resume, inputs=inputs, what="output_dir",
                           estimated_bytes=int(per_seq * len(data) * 1.05) + (1 << 20), resumable=True)
    identity = _identity(teacher, adapter.model_type, data, vocab, s)
    shards = _resumable_shards(out, identity) if resume else []
    if shards is None:
        log.info("store %s is already complete", out)
        return out
    work = begin_output(out, overwrite=overwrite)
    listed = {e["file"] for e in shards}
    for f in work.glob("shard-*.safetensors"):
        if f.name not in listed:
            f.unlink()
            log.info("removed %s (not committed by the interrupted run)", f.name)
    _run_pass(teacher, data, s, identity, shards, work, out)
    finish_output(work, out)
    total = sum(e["bytes"] for e in shards)
    log.info("teacher top-%d store: %s (%d shards, %.1f MiB, %.1f bytes per token)", s.top_k, out, len(shards),
             total / 2**20, total / max(1, len(data) * data.seq_len))
    return out


def _identity(teacher: torch.nn.Module, model_type: str, data: PackedDataset, vocab: int,
              s: TeacherPass) -> Dict[str, Any]:
    """The manifest entries that identify a store: format, teacher, tokenizer, data, encoding settings."""
    tok_hash = tokenizer_hash(s.tokenizer_path) if s.tokenizer_path is not None else tokenizer_hash(s.teacher_path)
    bits = index_bits(vocab)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "teacher": {"path": str(s.teacher_path) if s.teacher_path is not None else None,
                    "model_type": model_type, "config_sha256": config_hash(teacher.config)},
        "tokenizer": {"path": str(s.tokenizer_path) if s.tokenizer_path is not None else
                      (str(s.teacher_path) if tok_hash is not None else None), "sha256": tok_hash},
        "data": {"description": data.description, "path": str(s.data_path) if s.data_path is not None else None,
                 "num_sequences": len(data), "seq_len": data.seq_len, "num_tokens": data.num_tokens,
                 **data_hashes(data)},
        "vocab_size": vocab,
        "k": int(s.top_k),
        "temperature": float(s.temperature),
        "value_encoding": s.value_encoding,
        "index_encoding": f"bitpacked-le-{bits}",
        "index_bits": bits,
        "shard_sequences": int(s.shard_sequences),
    }


def _resumable_shards(out: Path, identity: Dict[str, Any]) -> Optional[List[Dict[str, Any]]]:
    """The intact shards an interrupted extraction into ``out`` left (None: the store is already complete);
    StoreError when ``out`` holds something else or a store of other settings/inputs."""
    manifest_path = out / MANIFEST_NAME
    if out.is_dir() and not manifest_path.is_file() and any(not p.name.startswith(".") for p in out.iterdir()):
        raise StoreError(f"cannot resume {str(out)!r}: it is not a teacher-logit store (no {MANIFEST_NAME}) and is "
                         "not empty; choose another output directory")
    if not manifest_path.is_file():
        return []
    try:
        old = read_json(manifest_path, "store manifest")
    except ValueError as e:
        raise StoreError(f"cannot resume: {e}; use overwrite=True (--overwrite) to start again") from None
    if not isinstance(old, dict) or old.get("format") != FORMAT:
        raise StoreError(f"cannot resume {str(out)!r}: {MANIFEST_NAME} is not a teacher-logit store manifest; "
                         "choose another output directory")
    diffs = [f"{key}: {old.get(key)!r} (stored) vs {identity[key]!r} (now)" for key in identity
             if key not in ("teacher", "tokenizer", "data") and old.get(key) != identity[key]]
    for key, sub in (("teacher", "config_sha256"), ("tokenizer", "sha256"), ("data", "input_ids_sha256"),
                     ("data", "attention_mask_sha256"), ("data", "num_sequences"), ("data", "seq_len")):
        if (old.get(key) or {}).get(sub) != identity[key][sub]:
            diffs.append(f"{key}.{sub}: {(old.get(key) or {}).get(sub)!r} (stored) vs {identity[key][sub]!r} (now)")
    if diffs:
        raise StoreError(f"cannot resume the store {str(out)!r}: it was written with other settings or inputs "
                         f"({'; '.join(diffs)}); use overwrite=True (--overwrite) to start again")
    if old.get("complete"):
        return None
    shards: List[Dict[str, Any]] = []
    for entry in old.get("shards", []):
        f = out / entry["file"]
        if not f.is_file() or f.stat().st_size != entry["bytes"] or _sha256_file(f) != entry["sha256"]:
            log.warning("shard %s is missing or damaged: writing it again", f.name)
            break
        shards.append(entry)
    return shards


def _encoded_shard(teacher: torch.nn.Module, data: PackedDataset, start: int, stop: int, s: TeacherPass,
                   bits: int, dev: torch.device, bar: Any) -> Dict[str, torch.Tensor]:
    """The encoded top-k entries of sequences ``[start, stop)``, encoded batch by batch (rows are independent:
    only the shard's encoded bytes accumulate)."""
    parts: Dict[str, List[torch.Tensor]] = {}
    for b in range(start, stop, s.batch_size):
        sel = torch.arange(b, min(stop, b + s.batch_size))
        batch = {k: v.to(dev) for k, v in data.select(sel).items()}
        with torch.no_grad():
            hidden, weight, bias = final_hidden_and_head(teacher, batch)
            bsz, n = hidden.shape[:2]
            idx, lp = topk_logprobs(hidden.reshape(bsz * n, -1), weight, bias, s.top_k, float(s.temperature))
        enc = _encode_shard(idx.reshape(bsz, n, s.top_k).cpu(), lp.reshape(bsz, n, s.top_k).cpu(), bits,
                            s.value_encoding)
        for key, t in enc.items():
            parts.setdefault(key, []).append(t)
        bar.update(bsz)
    return {key: torch.cat(ts) for key, ts in parts.items()}


def _run_pass(teacher: torch.nn.Module, data: PackedDataset, s: TeacherPass, identity: Dict[str, Any],
              shards: List[Dict[str, Any]], work: Path, out: Path) -> None:
    """Write the shards after ``shards`` into ``work`` (the manifest after each; ``complete`` at the end); the
    teacher's training flag and ``requires_grad`` flags are restored, ``work`` abandoned on any error."""
    from tqdm.auto import tqdm

    dev = _resolve_device(s.device)
    done_seq = shards[-1]["stop"] if shards else 0
    bar = tqdm(total=len(data), initial=done_seq, unit="seq", desc="teacher top-k", disable=not s.progress)
    try:
        with frozen(teacher, dev):
            _write_shards(teacher, data, s, identity, shards, work, dev, bar)
    except BaseException:
        bar.close()
        abandon_output(work, out)
        raise
    bar.close()


def _write_shards(teacher: torch.nn.Module, data: PackedDataset, s: TeacherPass, identity: Dict[str, Any],
                  shards: List[Dict[str, Any]], work: Path, dev: torch.device, bar: Any) -> None:
    """The shards from the end of ``shards`` on, each committed to the manifest as it is written."""

    def manifest(complete: bool) -> Dict[str, Any]:
        return {**identity, "complete": complete, "num_shards": len(shards), "shards": shards}

    done_seq = shards[-1]["stop"] if shards else 0
    atomic_write_json(work / MANIFEST_NAME, manifest(False))
    for start in range(done_seq, len(data), s.shard_sequences):
        stop = min(len(data), start + s.shard_sequences)
        tensors = _encoded_shard(teacher, data, start, stop, s, identity["index_bits"], dev, bar)
        name = _shard_name(len(shards))
        # one metadata key: safetensors orders several keys at random, one keeps the bytes reproducible
        meta = json.dumps({"format": FORMAT, "start": start, "stop": stop, "value_encoding": s.value_encoding},
                          sort_keys=True)
        size, digest = _write_shard(work / name, tensors, {"minitron": meta})
        entry = {"file": name, "start": start, "stop": stop, "bytes": size, "sha256": digest}
        shards.append(entry)
        atomic_write_json(work / MANIFEST_NAME, manifest(False))
        if s.on_shard is not None:
            s.on_shard(len(shards) - 1, entry)
    atomic_write_json(work / MANIFEST_NAME, manifest(True))
