"""The teacher pass of a top-k logit store: run the teacher over packed data and write its top-k
log-probabilities per token. :mod:`minitron.io.logit_store` defines the store (format, encodings, manifest,
reader) and only reads and writes its files; running the model lives here, in the training layer."""
from __future__ import annotations

import json
import logging
import math
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
from minitron.train.distill import final_hidden_and_head

log = logging.getLogger(__name__)

__all__ = ["write_teacher_logits"]


def _resolve_device(device: Union[str, torch.device]) -> torch.device:
    from minitron.runtime import resolve_device

    return resolve_device(device)


def write_teacher_logits(
    teacher: torch.nn.Module,
    data: PackedDataset,
    output_dir: PathLike,
    *,
    top_k: int,
    temperature: float = 1.0,
    value_encoding: str = DEFAULT_VALUE_ENCODING,
    batch_size: int = 8,
    shard_sequences: Optional[int] = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    teacher_path: Optional[PathLike] = None,
    tokenizer_path: Optional[PathLike] = None,
    data_path: Optional[PathLike] = None,
    device: Union[str, torch.device] = "auto",
    on_shard: Optional[Callable[[int, Dict[str, Any]], None]] = None,
) -> Path:
    """Run ``teacher`` over ``data`` and store its top-k next-token log-probabilities in ``output_dir``.

    Args:
        teacher: a supported causal LM (any dtype; put in eval mode, gradients off, moved to ``device``).
        data: the packed sequences, ``input_ids``/``attention_mask`` ``[N, S]``, in the order the store keeps.
        output_dir: the store directory (refused when it exists, unless ``resume`` or ``overwrite``; never
            equal to, inside or containing ``teacher_path``, ``tokenizer_path`` or ``data_path``).
        top_k: entries kept per token, ``1 <= top_k <= vocab_size``.
        temperature: the teacher's softmax temperature (recorded; distillation uses it for the student).
        value_encoding: ``"u8"`` (default, 1 byte per entry + 8 per token), ``"fp16"``, ``"bf16"`` or ``"fp32"``.
        batch_size: sequences per teacher forward.
        shard_sequences: sequences per shard (default: about 256 MiB of encoded entries per shard).
        resume: continue an interrupted extraction after its last complete shard (settings must match).
        overwrite: replace an existing store (the old one stays intact until the new one is complete).
        progress: show a tqdm progress bar.
        teacher_path / tokenizer_path: recorded in the manifest; the tokenizer hash is computed from the
            tokenizer files of ``tokenizer_path`` (else of ``teacher_path``) when it has some.
        data_path: the data source, for the output-safety check and the manifest.
        device: "auto" (CUDA when available), "cpu", "cuda", ...
        on_shard: called as ``on_shard(shard_number, manifest_entry)`` after each shard is committed.

    Returns:
        The store directory. Memory: one batch of teacher activations, fp32 logits of at most 256 MiB at a
        time, and one shard of encoded entries.

    Raises:
        TypeError/ValueError naming the argument; :class:`~minitron.io.safety.OutputExistsError`;
        :class:`~minitron.io.logit_store.StoreError` when ``resume`` meets a store written with other settings or from other data.
    """

    if not isinstance(teacher, torch.nn.Module):
        raise TypeError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
    adapter = get_adapter(teacher)
    adapter.check_model(teacher)
    if not isinstance(data, PackedDataset):
        raise TypeError(f"data must be a PackedDataset, got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError("data holds no sequences")
    vocab = int(adapter.lm_head(teacher).weight.shape[0])
    _check_int("top_k", top_k, 1)
    if top_k > vocab:
        raise ValueError(f"top_k={top_k} is larger than the teacher's vocabulary ({vocab})")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not math.isfinite(temperature) \
            or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if value_encoding not in VALUE_ENCODINGS:
        raise ValueError(f"value_encoding must be one of {sorted(VALUE_ENCODINGS)}, got {value_encoding!r}")
    _check_int("batch_size", batch_size, 1)
    _check_int("shard_sequences", shard_sequences, 1, allow_none=True)
    seq_len = data.seq_len
    bits = index_bits(vocab)
    per_seq = bytes_per_token(top_k, vocab, value_encoding) * seq_len
    if shard_sequences is None:
        shard_sequences = max(1, min(len(data), int(_SHARD_BUDGET // per_seq)))
    inputs = {"teacher": teacher_path, "tokenizer": tokenizer_path, "data": data_path}
    out = check_output_dir(output_dir, overwrite=overwrite, resume=resume, inputs=inputs, what="output_dir",
                           estimated_bytes=int(per_seq * len(data) * 1.05) + (1 << 20), resumable=True)

    tok_hash = tokenizer_hash(tokenizer_path) if tokenizer_path is not None else tokenizer_hash(teacher_path)
    identity: Dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "teacher": {"path": str(teacher_path) if teacher_path is not None else None,
                    "model_type": adapter.model_type, "config_sha256": config_hash(teacher.config)},
        "tokenizer": {"path": str(tokenizer_path) if tokenizer_path is not None else
                      (str(teacher_path) if tok_hash is not None else None), "sha256": tok_hash},
        "data": {"description": data.description, "path": str(data_path) if data_path is not None else None,
                 "num_sequences": len(data), "seq_len": seq_len, "num_tokens": data.num_tokens, **data_hashes(data)},
        "vocab_size": vocab,
        "k": int(top_k),
        "temperature": float(temperature),
        "value_encoding": value_encoding,
        "index_encoding": f"bitpacked-le-{bits}",
        "index_bits": bits,
        "shard_sequences": int(shard_sequences),
    }
    shards: List[Dict[str, Any]] = []
    manifest_path = out / MANIFEST_NAME
    if resume and out.is_dir() and not manifest_path.is_file() and \
            any(not p.name.startswith(".") for p in out.iterdir()):
        raise StoreError(f"cannot resume {str(out)!r}: it is not a teacher-logit store (no {MANIFEST_NAME}) and is "
                         "not empty; choose another output directory")
    if resume and manifest_path.is_file():
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
            log.info("store %s is already complete", out)
            return out
        for entry in old.get("shards", []):
            f = out / entry["file"]
            if not f.is_file() or f.stat().st_size != entry["bytes"] or _sha256_file(f) != entry["sha256"]:
                log.warning("shard %s is missing or damaged: writing it again", f.name)
                break
            shards.append(entry)
    work = begin_output(out, overwrite=overwrite)
    done_seq = shards[-1]["stop"] if shards else 0
    listed = {e["file"] for e in shards}
    for f in work.glob("shard-*.safetensors"):
        if f.name not in listed:
            f.unlink()
            log.info("removed %s (not committed by the interrupted run)", f.name)

    def manifest(complete: bool) -> Dict[str, Any]:
        return {**identity, "complete": complete, "num_shards": len(shards), "shards": shards}

    dev = _resolve_device(device)
    flags = [p.requires_grad for p in teacher.parameters()]
    was_training = teacher.training
    teacher.to(dev)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(data), initial=done_seq, unit="seq", desc="teacher top-k", disable=not progress)
    try:
        atomic_write_json(work / MANIFEST_NAME, manifest(False))
        n = len(data)
        for start in range(done_seq, n, shard_sequences):
            stop = min(n, start + shard_sequences)
            parts: Dict[str, List[torch.Tensor]] = {}
            for b in range(start, stop, batch_size):
                sel = torch.arange(b, min(stop, b + batch_size))
                batch = {k: v.to(dev) for k, v in data.select(sel).items()}
                with torch.no_grad():
                    hidden, weight, bias = final_hidden_and_head(teacher, batch)
                    bsz, s = hidden.shape[:2]
                    idx, lp = topk_logprobs(hidden.reshape(bsz * s, -1), weight, bias, top_k, float(temperature))
                # encoded batch by batch (rows are independent): only the shard's encoded bytes accumulate
                enc = _encode_shard(idx.reshape(bsz, s, top_k).cpu(), lp.reshape(bsz, s, top_k).cpu(), bits,
                                    value_encoding)
                for key, t in enc.items():
                    parts.setdefault(key, []).append(t)
                bar.update(bsz)
            tensors = {key: torch.cat(ts) for key, ts in parts.items()}
            del parts
            name = _shard_name(len(shards))
            # one metadata key: safetensors orders several keys at random, one keeps the bytes reproducible
            meta = json.dumps({"format": FORMAT, "start": start, "stop": stop, "value_encoding": value_encoding},
                              sort_keys=True)
            size, digest = _write_shard(work / name, tensors, {"minitron": meta})
            entry = {"file": name, "start": start, "stop": stop, "bytes": size, "sha256": digest}
            shards.append(entry)
            atomic_write_json(work / MANIFEST_NAME, manifest(False))
            if on_shard is not None:
                on_shard(len(shards) - 1, entry)
        atomic_write_json(work / MANIFEST_NAME, manifest(True))
    except BaseException:
        bar.close()
        abandon_output(work, out)
        raise
    finally:
        for p, f in zip(teacher.parameters(), flags):
            p.requires_grad_(f)
        teacher.train(was_training)
    bar.close()
    finish_output(work, out)
    total = sum(e["bytes"] for e in shards)
    log.info("teacher top-%d store: %s (%d shards, %.1f MiB, %.1f bytes per token)", top_k, out, len(shards),
             total / 2**20, total / max(1, len(data) * seq_len))
    return out
