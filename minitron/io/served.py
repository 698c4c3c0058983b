"""Teacher outputs from a server (vLLM, SGLang) or our own JSONL, to and from the top-k logit store.

:func:`import_teacher_logits` turns per-token top-k log-probability records, as the servers return them (with token
ids), into a store of :mod:`minitron.io.logit_store` (the format :func:`minitron.train.stored.distill_from_store`
reads); :func:`export_teacher_logits` writes a store back out as our JSONL. Position ``t`` of a stored sequence
holds the teacher's distribution of the *next* token (after token ``t``), as the teacher pass writes it.

Input record shapes (one JSON value per line; blank lines are skipped):

``vllm``
    A ``RequestOutput`` dumped as JSON, ``{"prompt_token_ids": [...], "prompt_logprobs": [null, {TOKEN_ID:
    {"logprob": x, "rank": r, "decoded_token": s}, ...}, ...], "outputs": [{"logprobs": [{...}, ...]}]}``
    (``SamplingParams(prompt_logprobs=k)``; ``logprobs=k`` with one generated token fills the last position), or
    a response of the OpenAI-compatible server, ``{"choices": [{"prompt_token_ids": [...], "prompt_logprobs":
    [...]}, ...]}`` (one sequence per choice). ``prompt_logprobs[t]`` is the distribution of prompt token ``t``
    given the tokens before it, so it becomes stored position ``t - 1``; its dict holds the top-k entries plus the
    prompt token itself when that is not among them (vLLM returns up to k + 1 entries): the k most likely are
    kept. A value may also be a bare number (the logprob).
``sglang``
    A ``/generate`` response with ``return_logprob=True``, ``top_logprobs_num=k``, ``logprob_start_len=0``:
    ``{"meta_info": {"input_token_logprobs": [[logprob|null, token_id, text|null], ...], "input_top_logprobs":
    [null, [[logprob, token_id, text|null], ...], ...], "output_top_logprobs": [[...]]}}`` (or a JSON list of
    them: a batch). The token ids of the prompt are the second fields of ``input_token_logprobs``;
    ``input_top_logprobs[t]`` becomes stored position ``t - 1``, ``output_top_logprobs[0]`` the last position.
``jsonl``
    Our schema (what :func:`export_teacher_logits` writes), see :data:`JSONL_FORMAT`: a header line
    ``{"format": "minitron-teacher-logits-jsonl", "version": 1, "k": K, "temperature": T, "logprobs_mode":
    "raw_logprobs"|"processed_logprobs", "seq_len": S, "vocab_size": V}``, then one line per sequence
    ``{"token_ids": [S ints], "attention_mask": [S 0/1] (optional), "top_ids": [S lists of K ints],
    "top_logprobs": [S lists of K numbers, null for -inf]}``; an empty list at a position means "no
    distribution there".

Temperature convention: a store's ``temperature`` is the temperature the stored log-probabilities are a softmax
at. Servers return either the model's raw distribution (vLLM's default ``logprobs_mode="raw_logprobs"``: T = 1)
or the processed one at the sampling temperature (``"processed_logprobs"``: T = the request's temperature). A
vLLM/SGLang record may declare it with ``"logprobs_mode"`` and ``"temperature"`` (or ``"sampling_params":
{"temperature": T}``); the ``logprobs_mode``/``temperature`` arguments declare it for records that do not; with
neither, raw (T = 1) is assumed and logged. Records that disagree are refused (naming the line): one store holds
one convention. The manifest records it under ``"served"``.

Positions without a teacher distribution (the last prompt position when no generated-token logprobs were returned;
the padding of a shorter prompt) are stored as all ``-inf``; the stored-teacher distillation skips them.

Bad input (a token id outside the tokenizer, a k that varies, a positive or NaN logprob, a duplicated id, records
of different conventions, malformed JSON) raises ``ValueError`` naming the file and line, before any output is
written.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from minitron.io.data import PackedDataset
from minitron.io.files import atomic_write_json
from minitron.io.logit_store import (DEFAULT_VALUE_ENCODING, FORMAT, FORMAT_VERSION, MANIFEST_NAME, VALUE_ENCODINGS,
                                     TeacherLogitStore, _SHARD_BUDGET, _encode_shard, _shard_name, _write_shard,
                                     bytes_per_token, data_hashes, index_bits, tokenizer_hash)
from minitron.io.safety import abandon_output, begin_output, check_output, finish_output

log = logging.getLogger(__name__)

__all__ = ["import_teacher_logits", "export_teacher_logits", "SERVED_FORMATS", "LOGPROBS_MODES", "JSONL_FORMAT",
           "JSONL_VERSION"]

PathLike = Union[str, os.PathLike]

SERVED_FORMATS = ("vllm", "sglang", "jsonl")
#: vLLM's names: the model's distribution (T = 1) or the one after the sampling processors (T = the temperature)
LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs")
JSONL_FORMAT = "minitron-teacher-logits-jsonl"
JSONL_VERSION = 1
_POSITIVE_TOLERANCE = 1e-6  # a logprob this far above 0 is fp rounding of log(1); further is an error


@dataclasses.dataclass
class _Seq:
    """One parsed sequence: its token ids and, per position, the next-token entries (empty: none)."""

    token_ids: List[int]
    entries: List[List[Tuple[int, float, Optional[int]]]]  # (token id, logprob, rank or None)
    mask: Optional[List[int]]
    temperature: Optional[float]  # the record's effective logprob temperature, None when not declared
    line: int


# -------------------------------------------------------------------------------------------------- parsing


def _records(path: Path) -> Iterator[Tuple[int, Any]]:
    with open(path, "r", encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield no, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{no}: not valid JSON ({e.msg} at column {e.colno})") from None


def _number(v: Any, where: str) -> float:
    if v is None:
        return float("-inf")
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{where}: a logprob must be a number, got {v!r}")
    x = float(v)
    if math.isnan(x):
        raise ValueError(f"{where}: logprob is NaN")
    if x > _POSITIVE_TOLERANCE:
        raise ValueError(f"{where}: logprob {x} is positive (log-probabilities are <= 0)")
    return min(x, 0.0)


def _token(v: Any, where: str) -> int:
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{where}: a token id must be an int, got {v!r}")
    return int(v)


def _declared_temperature(obj: Dict[str, Any], where: str) -> Optional[float]:
    """The effective logprob temperature a vLLM/SGLang record declares (``logprobs_mode`` + temperature)."""
    mode = obj.get("logprobs_mode")
    temp = obj.get("temperature", (obj.get("sampling_params") or {}).get("temperature")
                   if isinstance(obj.get("sampling_params"), dict) else None)
    if mode is None:
        return None
    if mode not in LOGPROBS_MODES:
        raise ValueError(f"{where}: logprobs_mode must be one of {LOGPROBS_MODES}, got {mode!r}")
    if mode == "raw_logprobs":
        return 1.0
    if isinstance(temp, bool) or not isinstance(temp, (int, float)) or not temp > 0:
        raise ValueError(f"{where}: logprobs_mode 'processed_logprobs' needs the sampling temperature (> 0), got "
                         f"{temp!r}")
    return float(temp)


def _vllm_position(d: Any, where: str) -> List[Tuple[int, float, Optional[int]]]:
    if d is None:
        return []
    if not isinstance(d, dict):
        raise ValueError(f"{where}: a prompt_logprobs entry must be a dict token_id -> Logprob, got "
                         f"{type(d).__name__}")
    out = []
    for key, val in d.items():
        tid = _token(key, where)
        if isinstance(val, dict):
            lp, rank = _number(val.get("logprob"), where), val.get("rank")
            rank = _token(rank, where) if rank is not None else None
        else:
            lp, rank = _number(val, where), None
        out.append((tid, lp, rank))
    return out


def _parse_vllm(obj: Any, line: int, where: str) -> List[_Seq]:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: a vLLM record must be a JSON object, got {type(obj).__name__}")
    temp = _declared_temperature(obj, where)
    parts = obj["choices"] if isinstance(obj.get("choices"), list) else [obj]
    seqs = []
    for c in parts:
        ids = c.get("prompt_token_ids", obj.get("prompt_token_ids"))
        plp = c.get("prompt_logprobs")
        if not isinstance(ids, list) or not isinstance(plp, list):
            raise ValueError(f"{where}: a vLLM record needs prompt_token_ids and prompt_logprobs lists "
                             "(SamplingParams(prompt_logprobs=k); the server's return_token_ids)")
        if len(plp) != len(ids):
            raise ValueError(f"{where}: prompt_logprobs has {len(plp)} positions, prompt_token_ids {len(ids)}")
        ids = [_token(t, where) for t in ids]
        entries = [_vllm_position(plp[t], f"{where} position {t}") for t in range(1, len(ids))]
        last: List[Tuple[int, float, Optional[int]]] = []
        outs = c.get("outputs")
        if isinstance(outs, list) and outs and isinstance(outs[0], dict) and outs[0].get("logprobs"):
            last = _vllm_position(outs[0]["logprobs"][0], f"{where} generated position 0")
        seqs.append(_Seq(ids, entries + [last], None, temp, line))
    return seqs


def _sglang_position(entries: Any, where: str) -> List[Tuple[int, float, Optional[int]]]:
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise ValueError(f"{where}: input_top_logprobs entries must be lists of [logprob, token_id, text]")
    out = []
    for e in entries:
        if not isinstance(e, (list, tuple)) or len(e) < 2:
            raise ValueError(f"{where}: {e!r} is not a [logprob, token_id, text] entry")
        out.append((_token(e[1], where), _number(e[0], where), None))
    return out


def _parse_sglang(obj: Any, line: int, where: str) -> List[_Seq]:
    objs = obj if isinstance(obj, list) else [obj]
    seqs = []
    for o in objs:
        meta = o.get("meta_info") if isinstance(o, dict) else None
        if not isinstance(meta, dict) or not isinstance(meta.get("input_token_logprobs"), list) \
                or not isinstance(meta.get("input_top_logprobs"), list):
            raise ValueError(f"{where}: an SGLang record needs meta_info.input_token_logprobs and "
                             "meta_info.input_top_logprobs (return_logprob, top_logprobs_num, logprob_start_len=0)")
        itl, itop = meta["input_token_logprobs"], meta["input_top_logprobs"]
        if len(itl) != len(itop):
            raise ValueError(f"{where}: input_top_logprobs has {len(itop)} positions, input_token_logprobs {len(itl)} "
                             "(logprob_start_len must be 0)")
        ids = []
        for e in itl:
            if not isinstance(e, (list, tuple)) or len(e) < 2:
                raise ValueError(f"{where}: {e!r} is not a [logprob, token_id, text] entry of input_token_logprobs")
            ids.append(_token(e[1], where))
        entries = [_sglang_position(itop[t], f"{where} position {t}") for t in range(1, len(ids))]
        otop = meta.get("output_top_logprobs")
        last = _sglang_position(otop[0], f"{where} generated position 0") if isinstance(otop, list) and otop else []
        seqs.append(_Seq(ids, entries + [last], None, _declared_temperature(o, where), line))
    return seqs


def _parse_ours(obj: Any, line: int, where: str, header: Dict[str, Any]) -> List[_Seq]:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: a sequence line must be a JSON object")
    ids, tids, tlps = obj.get("token_ids"), obj.get("top_ids"), obj.get("top_logprobs")
    if not isinstance(ids, list) or not isinstance(tids, list) or not isinstance(tlps, list):
        raise ValueError(f"{where}: a sequence line needs token_ids, top_ids and top_logprobs lists")
    if not len(ids) == len(tids) == len(tlps):
        raise ValueError(f"{where}: token_ids ({len(ids)}), top_ids ({len(tids)}) and top_logprobs ({len(tlps)}) "
                         "must have one entry per position")
    entries = []
    for t, (a, b) in enumerate(zip(tids, tlps)):
        if not isinstance(a, list) or not isinstance(b, list) or len(a) != len(b):
            raise ValueError(f"{where} position {t}: top_ids and top_logprobs must be lists of the same length")
        entries.append([(_token(i, where), _number(v, f"{where} position {t}"), None) for i, v in zip(a, b)])
    mask = obj.get("attention_mask")
    if mask is not None and (not isinstance(mask, list) or len(mask) != len(ids) or any(m not in (0, 1) for m in mask)):
        raise ValueError(f"{where}: attention_mask must list 0/1 per position")
    return [_Seq([_token(i, where) for i in ids], entries, mask, None, line)]


def _jsonl_header(obj: Any, where: str) -> Tuple[Dict[str, Any], float]:
    if not isinstance(obj, dict) or obj.get("format") != JSONL_FORMAT:
        raise ValueError(f"{where}: the first line of a jsonl file must be the header {{\"format\": "
                         f"\"{JSONL_FORMAT}\", ...}}")
    if obj.get("version") != JSONL_VERSION:
        raise ValueError(f"{where}: header version {obj.get('version')!r}; this minitron reads {JSONL_VERSION}")
    mode = obj.get("logprobs_mode", "raw_logprobs")
    temp = _declared_temperature({"logprobs_mode": mode, "temperature": obj.get("temperature")}, where)
    if mode == "raw_logprobs" and obj.get("temperature") not in (None, 1, 1.0):
        raise ValueError(f"{where}: logprobs_mode raw_logprobs means temperature 1, the header says "
                         f"{obj.get('temperature')!r}")
    return obj, float(temp if temp is not None else 1.0)


def _sequences(path: Path, fmt: str, sc: Optional["_Scan"] = None) -> Iterator[Tuple[_Seq, Optional[float]]]:
    """Every sequence of the file with the header's temperature (jsonl) or None (``sc``: gets the header's k)."""
    header: Optional[Dict[str, Any]] = None
    header_t: Optional[float] = None
    for no, obj in _records(path):
        where = f"{path}:{no}"
        if fmt == "jsonl" and header is None:
            header, header_t = _jsonl_header(obj, where)
            if sc is not None and header.get("k") is not None:
                sc.header_k = _token(header["k"], where)
            continue
        if fmt == "vllm":
            seqs = _parse_vllm(obj, no, where)
        elif fmt == "sglang":
            seqs = _parse_sglang(obj, no, where)
        else:
            assert header is not None
            seqs = _parse_ours(obj, no, where, header)
        for s in seqs:
            yield s, header_t
    if fmt == "jsonl" and header is None:
        raise ValueError(f"{path}: empty file (no header line)")


# -------------------------------------------------------------------------------------------------- import


@dataclasses.dataclass
class _Scan:
    """What the validation pass learned: sizes, k, the convention."""

    n: int = 0
    seq_len: int = 0
    counts: Dict[int, int] = dataclasses.field(default_factory=dict)  # entries per position -> first line
    ranked: Dict[int, int] = dataclasses.field(default_factory=dict)  # ranks 1..m all present (vLLM) -> first line
    temperature: Optional[float] = None
    temperature_line: int = 0
    header_k: Optional[int] = None


def _scan(path: Path, fmt: str, vocab: int, declared: Optional[float]) -> _Scan:
    """Validate every record (ids inside the tokenizer, logprobs, duplicates, one convention); nothing is written."""
    sc = _Scan()
    for s, header_t in _sequences(path, fmt, sc):
        where = f"{path}:{s.line}"
        if not s.token_ids:
            raise ValueError(f"{where}: an empty sequence")
        for t in s.token_ids:
            if not 0 <= t < vocab:
                raise ValueError(f"{where}: token id {t} exceeds the tokenizer (ids 0..{vocab - 1})")
        for pos, ent in enumerate(s.entries):
            ids = [e[0] for e in ent]
            bad = next((i for i in ids if not 0 <= i < vocab), None)
            if bad is not None:
                raise ValueError(f"{where} position {pos}: token id {bad} exceeds the tokenizer (ids 0..{vocab - 1})")
            if len(set(ids)) != len(ids):
                raise ValueError(f"{where} position {pos}: a token id appears twice")
            if ent:
                sc.counts.setdefault(len(ent), s.line)
                ranks = {e[2] for e in ent}
                if None not in ranks:
                    m = 0
                    while m + 1 in ranks:
                        m += 1
                    sc.ranked.setdefault(m, s.line)
        t_rec = header_t if header_t is not None else s.temperature
        if t_rec is None:
            t_rec = declared
        if t_rec is not None:
            if sc.temperature is None:
                sc.temperature, sc.temperature_line = t_rec, s.line
            elif not math.isclose(t_rec, sc.temperature, rel_tol=1e-9):
                raise ValueError(f"{where}: logprobs at temperature {t_rec}, but line {sc.temperature_line} has them "
                                 f"at {sc.temperature}: one store holds one convention (raw T=1 or the sampling "
                                 "temperature); import them separately")
        if declared is not None and t_rec is not None and not math.isclose(t_rec, declared, rel_tol=1e-9):
            raise ValueError(f"{where}: the record declares logprobs at temperature {t_rec}, the arguments "
                             f"(--logprobs-mode/--temperature) say {declared}")
        sc.n += 1
        sc.seq_len = max(sc.seq_len, len(s.token_ids))
    if sc.n == 0:
        raise ValueError(f"{path}: no sequences")
    return sc


def _resolve_k(sc: _Scan, top_k: Optional[int], fmt: str, path: Path) -> int:
    """k: ``top_k``, the jsonl header's, or inferred (the smallest number of entries of a position; with vLLM's
    ranks, the smallest run of ranks 1..m); every position must hold k entries (vLLM: or k + 1, the prompt token
    added)."""
    if not sc.counts:
        raise ValueError(f"{path}: no position holds any top-k entry")
    if top_k is not None:
        k = int(top_k)
    elif sc.header_k is not None:
        k = sc.header_k
    else:  # vLLM with ranks: the top-k are ranks 1..k (the added prompt token's rank is higher)
        k = min(sc.ranked) if sc.ranked else min(sc.counts)
    allowed = {k, k + 1} if fmt == "vllm" else {k}
    for count, line in sorted(sc.counts.items(), key=lambda kv: kv[1]):
        if count not in allowed:
            raise ValueError(f"{path}:{line}: a position holds {count} top-k entries, others {k}: k must not vary "
                             f"(vLLM may add the prompt token as entry k + 1)" + (
                                 "" if top_k is None else f"; top_k={top_k} was given"))
    return k


def _top(ent: List[Tuple[int, float, Optional[int]]], k: int) -> List[Tuple[int, float]]:
    """The k most likely entries, sorted by decreasing logprob (vLLM's extra prompt-token entry dropped)."""
    if not ent:
        return []
    if len(ent) > k and all(e[2] is not None for e in ent):
        keep = sorted(ent, key=lambda e: (e[2], -e[1]))[:k]  # by the server's rank: the added prompt token's is > k
    else:
        keep = sorted(ent, key=lambda e: -e[1])[:k]  # without ranks the added entry is the least likely
    return sorted(((e[0], e[1]) for e in keep), key=lambda e: -e[1])


def _tensors(seqs: List[_Seq], k: int, seq_len: int, pad_id: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                          torch.Tensor]:
    """``(input_ids, attention_mask [n, S], indices int64 [n, S, k], logprobs fp32 [n, S, k])`` of parsed sequences;
    positions without entries hold -inf (ids 0..k-1, distinct as the ops require)."""
    n = len(seqs)
    ids = torch.full((n, seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros(n, seq_len, dtype=torch.long)
    idx = torch.arange(k, dtype=torch.long).expand(n, seq_len, k).clone()  # distinct ids where there are none
    lp = torch.full((n, seq_len, k), float("-inf"), dtype=torch.float32)
    for r, s in enumerate(seqs):
        ln = len(s.token_ids)
        ids[r, :ln] = torch.tensor(s.token_ids)
        mask[r, :ln] = torch.tensor(s.mask) if s.mask is not None else 1
        for t, ent in enumerate(s.entries[:ln]):
            top = _top(ent, k)
            if top:
                idx[r, t] = torch.tensor([e[0] for e in top])
                lp[r, t] = torch.tensor([e[1] for e in top])
    return ids, mask, idx, lp


def _tokenizer_arg(tokenizer: Any) -> Tuple[Any, Optional[str], Optional[Path]]:
    """``(tokenizer object, its hash or None, its directory or None)``."""
    if isinstance(tokenizer, (str, os.PathLike)):
        from minitron.io.tokenizer import load_tokenizer

        return load_tokenizer(tokenizer), tokenizer_hash(tokenizer), Path(tokenizer)
    if tokenizer is None or not hasattr(tokenizer, "__len__"):
        raise TypeError(f"tokenizer must be a tokenizer directory or a loaded tokenizer, got "
                        f"{type(tokenizer).__name__}")
    return tokenizer, None, None


def _check_import_args(path: Any, fmt: Any, logprobs_mode: Optional[str], temperature: Optional[float],
                       top_k: Optional[int], value_encoding: str) -> Optional[float]:
    """Refuse bad arguments (naming them); returns the declared logprob temperature or None."""
    if fmt not in SERVED_FORMATS:
        raise ValueError(f"format must be one of {SERVED_FORMATS}, got {fmt!r}")
    if not isinstance(path, (str, os.PathLike)) or not Path(path).is_file():
        raise FileNotFoundError(f"records file {str(path)!r} does not exist")
    if value_encoding not in VALUE_ENCODINGS:
        raise ValueError(f"value_encoding must be one of {sorted(VALUE_ENCODINGS)}, got {value_encoding!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                    or not math.isfinite(temperature) or temperature <= 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if logprobs_mode is None:
        if temperature is not None and temperature != 1:
            raise ValueError("temperature without logprobs_mode: say whether the logprobs are raw (T=1) or processed "
                             "at that temperature (logprobs_mode='processed_logprobs')")
        return None
    return _declared_temperature({"logprobs_mode": logprobs_mode, "temperature": temperature}, "logprobs_mode")


def import_teacher_logits(path: PathLike, format: str, tokenizer: Any, output: PathLike, *,
                          logprobs_mode: Optional[str] = None, temperature: Optional[float] = None,
                          top_k: Optional[int] = None, value_encoding: str = DEFAULT_VALUE_ENCODING,
                          overwrite: bool = False) -> Path:
    """Turn served top-k logprob records into a teacher-logit store (see the module docstring for the shapes).

    Args:
        path: the records, JSON lines. format: ``"vllm"``, ``"sglang"`` or ``"jsonl"`` (ours).
        tokenizer: the teacher's tokenizer (directory, whose files are hashed into the manifest, or a loaded
            one): token ids must be below ``len(tokenizer)``, the store's vocabulary size.
        output: the store directory (refused when it exists, unless ``overwrite``; never the records file).
        logprobs_mode / temperature: the convention of records that do not declare theirs: ``"raw_logprobs"``
            (T = 1) or ``"processed_logprobs"`` at ``temperature``.
        top_k: k (default: the smallest number of entries of a position); positions must hold k entries (vLLM:
            k or k + 1).
        value_encoding: of the stored values (``"u8"`` default, ``"fp16"``, ``"bf16"``, ``"fp32"``).

    Returns:
        The store directory; every sequence of the records is a row (shorter ones padded with the tokenizer's pad
        id, attention mask 0), the token ids and mask stored beside the entries (``input_ids``/``attention_mask``
        tensors of each shard), so the store knows its data.

    Raises:
        ValueError naming the file and line (see the module docstring), before anything is written;
        TypeError/ValueError/FileNotFoundError naming a bad argument; OutputExistsError.
    """
    declared = _check_import_args(path, format, logprobs_mode, temperature, top_k, value_encoding)
    path = Path(path)
    tok, tok_hash, tok_dir = _tokenizer_arg(tokenizer)
    vocab = len(tok)
    out = check_output(output, kind="dir", overwrite=overwrite, what="--output",
                       inputs={"FILE": path, "--tokenizer": tok_dir})
    sc = _scan(path, format, vocab, declared)
    k = _resolve_k(sc, top_k, format, path)
    if k > vocab:
        raise ValueError(f"top_k {k} exceeds the tokenizer's {vocab} tokens")
    t_store = sc.temperature if sc.temperature is not None else 1.0
    how = "declared by the records" if sc.temperature is not None and declared is None else (
        "given" if declared is not None else "assumed (nothing declared): raw logprobs, T=1")
    log.info("importing %d %s sequences (seq_len %d, k %d), logprobs at T=%g (%s)", sc.n, format, sc.seq_len, k,
             t_store, how)
    from minitron.io.tokenizer import ensure_pad_token

    served = {"format": format, "source": str(path.resolve()), "temperature": t_store,
              "logprobs_mode": "raw_logprobs" if t_store == 1.0 else "processed_logprobs", "convention": how}
    return _write_store(path, format, out, overwrite, sc, k, vocab, value_encoding, ensure_pad_token(tok),
                        {"path": str(tok_dir) if tok_dir else None, "sha256": tok_hash}, served)


def _write_store(path: Path, fmt: str, out: Path, overwrite: bool, sc: _Scan, k: int, vocab: int, encoding: str,
                 pad_id: int, tok_entry: Dict[str, Any], served: Dict[str, Any]) -> Path:
    """Second pass: parse again, encode shard by shard into ``out`` (atomically published)."""
    bits = index_bits(vocab)
    per_seq = bytes_per_token(k, vocab, encoding) * sc.seq_len + 16 * sc.seq_len
    shard_n = max(1, min(sc.n, int(_SHARD_BUDGET // per_seq)))
    shards: List[Dict[str, Any]] = []
    ids_parts: List[torch.Tensor] = []
    mask_parts: List[torch.Tensor] = []
    work = begin_output(out, overwrite=overwrite)
    try:
        batch: List[_Seq] = []
        start = 0

        def flush() -> None:
            nonlocal start, batch
            ids, mask, idx, lp = _tensors(batch, k, sc.seq_len, pad_id)
            tensors = _encode_shard(idx, lp, bits, encoding)
            tensors.update(input_ids=ids, attention_mask=mask)
            name = _shard_name(len(shards))
            meta = json.dumps({"format": FORMAT, "start": start, "stop": start + len(batch),
                               "value_encoding": encoding}, sort_keys=True)
            size, digest = _write_shard(work / name, tensors, {"minitron": meta})
            shards.append({"file": name, "start": start, "stop": start + len(batch), "bytes": size, "sha256": digest})
            ids_parts.append(ids)
            mask_parts.append(mask)
            start += len(batch)
            batch = []

        for s, _ in _sequences(path, fmt):
            batch.append(s)
            if len(batch) == shard_n:
                flush()
        if batch:
            flush()
        h_ids, h_mask = torch.cat(ids_parts), torch.cat(mask_parts)
        data = PackedDataset(h_ids, h_mask, f"served {fmt} records {path.name}")
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "teacher": {"path": None, "model_type": None, "config_sha256": None, "served": served},
            "tokenizer": tok_entry,
            "data": {"description": data.description, "path": str(path), "num_sequences": sc.n,
                     "seq_len": sc.seq_len, "num_tokens": int(h_mask.sum()), **data_hashes(data),
                     "stored_token_ids": True},
            "vocab_size": vocab, "k": k, "temperature": float(served["temperature"]), "value_encoding": encoding,
            "index_encoding": f"bitpacked-le-{bits}", "index_bits": bits, "shard_sequences": shard_n,
            "served": served, "complete": True, "num_shards": len(shards), "shards": shards,
        }
        atomic_write_json(work / MANIFEST_NAME, manifest)
    except BaseException:
        abandon_output(work, out)
        raise
    finish_output(work, out)
    log.info("teacher top-%d store from %s records: %s (%d sequences, %d shards)", k, fmt, out, sc.n, len(shards))
    return out


# -------------------------------------------------------------------------------------------------- export


def _json_lp(x: float) -> Optional[float]:
    return None if x == float("-inf") else round(float(x), 7)


def export_teacher_logits(store: Union[TeacherLogitStore, PathLike], output_jsonl: PathLike, *,
                          data: Optional[PackedDataset] = None, overwrite: bool = False) -> Path:
    """Write a teacher-logit store as our JSONL (:data:`JSONL_FORMAT`: a header line, then one line per sequence).

    Args:
        store: a :class:`TeacherLogitStore` or its directory.
        output_jsonl: the file (refused when it exists unless ``overwrite``; written atomically).
        data: the packed sequences the store was written from (checked by hash), for the ``token_ids``; not needed
            when the store keeps its token ids (an imported store).
    Returns:
        ``output_jsonl`` as a Path. Without token ids (a teacher-pass store and no ``data``) the lines have none
        and a warning says that the file cannot be imported back.
    """
    if not isinstance(store, TeacherLogitStore):
        if not isinstance(store, (str, os.PathLike)):
            raise TypeError(f"store must be a TeacherLogitStore or a path, got {type(store).__name__}")
        store = TeacherLogitStore(store)
    out = check_output(output_jsonl, kind="file", overwrite=overwrite, what="--output", inputs={"STORE": store.path})
    if data is not None:
        store.check_compatible(data)
    if data is None and store.stored_data() is None:
        log.warning("the store keeps no token ids and no data was given: the JSONL has no token_ids and cannot be "
                    "imported back")
    served = store.manifest.get("served") or {}
    t = store.temperature
    header = {"format": JSONL_FORMAT, "version": JSONL_VERSION, "k": store.k, "temperature": t,
              "logprobs_mode": served.get("logprobs_mode", "raw_logprobs" if t == 1.0 else "processed_logprobs"),
              "seq_len": store.seq_len, "vocab_size": store.vocab_size}
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(header) + "\n")
            for s in range(0, len(store), 64):
                sel = list(range(s, min(len(store), s + 64)))
                idx, lp = store.get(sel)
                ids, mask = _token_ids(store, data, sel)
                for r in range(len(sel)):
                    rec: Dict[str, Any] = {}
                    if ids is not None:
                        rec["token_ids"] = ids[r].tolist()
                        rec["attention_mask"] = mask[r].tolist()
                    finite = torch.isfinite(lp[r, :, 0]).tolist()
                    rec["top_ids"] = [idx[r, p].tolist() if finite[p] else [] for p in range(store.seq_len)]
                    rec["top_logprobs"] = [[_json_lp(x) for x in lp[r, p].tolist()] if finite[p] else []
                                           for p in range(store.seq_len)]
                    f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("exported %d sequences of %s to %s", len(store), store.path, out)
    return out


def _token_ids(store: TeacherLogitStore, data: Optional[PackedDataset],
               sel: Sequence[int]) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    if data is not None:
        b = data.select(torch.tensor(sel))
        return b["input_ids"], b["attention_mask"]
    return store.token_ids(sel)
