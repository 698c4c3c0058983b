"""Calibration / training / evaluation data: load text through ``datasets``, tokenise, pack.

Text comes from local files (``.txt``/``.text``/``.md`` read line by line with line breaks kept,
``.json``/``.jsonl``, ``.parquet``, ``.csv``), a directory of such files or one written by
``Dataset.save_to_disk``, an in-memory ``datasets.Dataset`` or list of strings, or a hub dataset name
(``load_dataset(name, config, split=...)``). It is tokenised with the model's tokenizer (no special
tokens; an EOS token is appended after each *record* of a structured source, not after each line
of a plain-text file, so plain text is reproduced as one stream), concatenated and cut into
fixed-length sequences.

Batches are dicts ``{"input_ids": LongTensor [B, S], "attention_mask": LongTensor [B, S]}`` with
1 for real tokens and 0 for padding. Only the last sequence of an evaluation set can carry padding
(right-padded; training sets drop the remainder). Shuffling is a pure function of (seed, epoch),
so a :class:`BatchStream` can be resumed exactly from its position.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

log = logging.getLogger(__name__)

__all__ = ["TextCorpus", "load_texts", "tokenize_corpus", "PackedDataset", "BatchStream", "pack_tokens", "load_packed",
           "max_positions", "check_seq_len", "Batch", "TEXT_EXTENSIONS", "FORMAT_BY_EXTENSION"]

TEXT_EXTENSIONS = (".txt", ".text", ".md")
FORMAT_BY_EXTENSION = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}

Batch = Dict[str, torch.Tensor]
PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------------------------------
# validation helpers


def _check_int(name: str, value: Any, minimum: int, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def max_positions(config: Any) -> Optional[int]:
    """The model's ``max_position_embeddings`` (None when the config has none)."""
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def check_seq_len(seq_len: Any, *configs: Any) -> int:
    """Validate a packing length against every given model config (or model).

    Raises:
        TypeError/ValueError: ``seq_len`` is not an int >= 2, or is larger than some model's
            ``max_position_embeddings``.
    """
    _check_int("seq_len", seq_len, 2)
    for cfg in configs:
        cfg = getattr(cfg, "config", cfg)
        mp = max_positions(cfg)
        if mp is not None and seq_len > mp:
            name = getattr(cfg, "model_type", "model")
            raise ValueError(
                f"seq_len={seq_len} is larger than the {name} model's max_position_embeddings={mp}; "
                f"use --seq-len {mp} or less"
            )
    return seq_len


# --------------------------------------------------------------------------------------------------
# loading text


@dataclass
class TextCorpus:
    """Raw text records plus how to join them.

    Attributes:
        texts: the records (lines of a plain-text file, or documents).
        is_lines: True for lines of plain-text files (joined as-is, line breaks kept); False for
            documents (an EOS token is appended after each).
        description: where the text came from (for logs and checkpoints).
    """

    texts: List[str]
    is_lines: bool
    description: str


def _looks_like_local_path(source: str) -> bool:
    ext = os.path.splitext(source)[1].lower()
    return (
        ext in FORMAT_BY_EXTENSION
        or source.startswith((".", "/", "~"))
        or source.count("/") > 1
    )


def _local_files(path: Path) -> tuple[str, List[str]]:
    """Return (builder, files) for a local file or a directory of files of one format."""
    if path.is_file():
        ext = path.suffix.lower()
        if ext not in FORMAT_BY_EXTENSION:
            raise ValueError(
                f"unsupported data file type {ext!r} for {str(path)!r}; supported: "
                f"{', '.join(sorted(FORMAT_BY_EXTENSION))}"
            )
        return FORMAT_BY_EXTENSION[ext], [str(path)]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FORMAT_BY_EXTENSION)
    if not files:
        raise ValueError(
            f"data directory {str(path)!r} holds no data files ({', '.join(sorted(FORMAT_BY_EXTENSION))}) "
            "and is not a saved datasets.Dataset"
        )
    builders = {FORMAT_BY_EXTENSION[p.suffix.lower()] for p in files}
    if len(builders) > 1:
        raise ValueError(f"data directory {str(path)!r} mixes file formats {sorted(builders)}; keep one format")
    return builders.pop(), [str(p) for p in files]


def _column_texts(ds: Any, text_column: str, description: str) -> List[str]:
    columns = list(getattr(ds, "column_names", None) or [])
    if text_column not in columns:
        raise ValueError(
            f"text column {text_column!r} not found in {description}; available columns: "
            f"{', '.join(repr(c) for c in columns) or '(none)'} (choose one with --text-column)"
        )
    values = ds[text_column]
    texts: List[str] = []
    for i, v in enumerate(values):
        if v is None:
            continue
        if not isinstance(v, str):
            raise TypeError(
                f"column {text_column!r} of {description} must hold strings; row {i} is {type(v).__name__}"
            )
        texts.append(v)
    return texts


def load_texts(
    source: Any,
    *,
    text_column: str = "text",
    split: Optional[str] = None,
    dataset_config: Optional[str] = None,
) -> TextCorpus:
    """Load text records from a file, directory, ``datasets.Dataset``, list of strings or hub name.

    Args:
        source: a path (file or directory), a ``datasets.Dataset``, a list of strings, or a hub
            dataset name.
        text_column: the column holding the text (plain-text files have exactly ``"text"``).
        split: dataset split (``"train"`` for local files unless given; slicing syntax such as
            ``"train[:10%]"`` is accepted).
        dataset_config: hub dataset configuration name (e.g. ``"wikitext-2-raw-v1"``).

    Raises:
        FileNotFoundError: a local-looking path does not exist.
        ValueError: the text column is missing (the message lists the available columns), the file
            type is unsupported, or the hub dataset cannot be loaded.
        TypeError: the text column holds non-strings, or ``source`` has an unsupported type.
    """
    if not isinstance(text_column, str) or not text_column:
        raise TypeError(f"text_column must be a non-empty string, got {text_column!r}")
    if isinstance(source, (list, tuple)):
        if not all(isinstance(t, str) for t in source):
            raise TypeError("a list data source must hold only strings")
        return TextCorpus(list(source), False, f"{len(source)} in-memory texts")
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - hard dependency
        raise ImportError("minitron.io.data needs the `datasets` package") from e

    if isinstance(source, datasets.Dataset):
        return TextCorpus(_column_texts(source, text_column, "the given dataset"), False, "in-memory dataset")
    if isinstance(source, datasets.DatasetDict):
        raise TypeError(f"got a DatasetDict with splits {list(source)}; pass one split")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"unsupported data source type {type(source).__name__}")

    src = os.fspath(source)
    path = Path(src).expanduser()
    if path.exists():
        if path.is_dir() and any((path / f).is_file() for f in ("dataset_info.json", "state.json")):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                key = split or "train"
                if key not in ds:
                    raise ValueError(f"split {key!r} not in saved dataset {src!r}; available: {list(ds)}")
                ds = ds[key]
            return TextCorpus(_column_texts(ds, text_column, f"dataset {src!r}"), False, f"saved dataset {src}")
        builder, files = _local_files(path)
        kwargs: Dict[str, Any] = {}
        if builder == "text":
            if text_column != "text":
                raise ValueError(
                    f"text column {text_column!r} not found in plain-text file(s) {src!r}; "
                    "available columns: 'text'"
                )
            kwargs = {"keep_linebreaks": True, "sample_by": "line"}
        ds = datasets.load_dataset(builder, data_files=files, split=split or "train", **kwargs)
        texts = _column_texts(ds, text_column, f"data file(s) {src!r}")
        return TextCorpus(texts, builder == "text", f"{builder} file(s) {src}")
    if _looks_like_local_path(src):
        raise FileNotFoundError(f"data path {src!r} does not exist")
    try:
        ds = datasets.load_dataset(src, dataset_config, split=split or "train")
    except Exception as e:  # offline, unknown name, bad config...
        raise ValueError(
            f"{src!r} is not a local file/directory and could not be loaded as a hub dataset "
            f"(config={dataset_config!r}, split={split or 'train'!r}): {type(e).__name__}: {e}"
        ) from e
    return TextCorpus(_column_texts(ds, text_column, f"hub dataset {src!r}"), False, f"hub dataset {src}")


# --------------------------------------------------------------------------------------------------
# tokenising and packing


def tokenize_corpus(
    corpus: TextCorpus, tokenizer: Any, *, max_tokens: Optional[int] = None, chunk: int = 4096
) -> torch.Tensor:
    """Tokenise a corpus into one stream of token ids.

    Returns:
        LongTensor ``[T]`` (T <= ``max_tokens`` when given). Lines of plain-text files are
        concatenated as-is; documents get the tokenizer's EOS id appended (when it has one).
    """
    _check_int("max_tokens", max_tokens, 2, allow_none=True)
    if not callable(tokenizer):
        raise TypeError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
    eos = getattr(tokenizer, "eos_token_id", None)
    add_eos = (not corpus.is_lines) and eos is not None
    pieces: List[torch.Tensor] = []
    total = 0
    start = 0
    # small first chunks so that a small max_tokens stops early; then up to `chunk` records at a time
    step = min(chunk, 256) if max_tokens is not None else chunk
    while start < len(corpus.texts):
        batch = [t for t in corpus.texts[start : start + step] if t]
        start += step
        step = min(chunk, step * 2)
        if not batch:
            continue
        ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
        flat: List[int] = []
        for seq in ids:
            flat.extend(seq)
            if add_eos:
                flat.append(eos)
        pieces.append(torch.tensor(flat, dtype=torch.long))
        total += len(flat)
        if max_tokens is not None and total >= max_tokens:
            break
    tokens = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    return tokens


class PackedDataset:
    """Fixed-length token sequences with their attention masks.

    Attributes:
        input_ids: LongTensor ``[N, S]``.
        attention_mask: LongTensor ``[N, S]``, 1 for real tokens, 0 for (right) padding.
        description: where the text came from.
    """

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, description: str = "") -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError("input_ids must be a 2-D tensor [N, S]")
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            raise ValueError("attention_mask must be a tensor with the shape of input_ids")
        self.input_ids = input_ids.long()
        self.attention_mask = attention_mask.long()
        self.description = description

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def num_tokens(self) -> int:
        """Number of real (unpadded) tokens."""
        return int(self.attention_mask.sum())

    def __repr__(self) -> str:
        return f"PackedDataset({len(self)} x {self.seq_len}, {self.num_tokens} tokens, {self.description})"

    def select(self, indices: Union[torch.Tensor, Sequence[int]]) -> Batch:
        """The batch made of the given sequence indices."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {"input_ids": self.input_ids[idx], "attention_mask": self.attention_mask[idx]}

    def subset(self, n: int) -> "PackedDataset":
        """The first ``n`` sequences."""
        _check_int("n", n, 1)
        return PackedDataset(self.input_ids[:n], self.attention_mask[:n], self.description)

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        max_batches: Optional[int] = None,
        drop_last: bool = False,
    ) -> List[Batch]:
        """One pass over the data as a list of batches (the last may be smaller unless ``drop_last``)."""
        _check_int("batch_size", batch_size, 1)
        _check_int("max_batches", max_batches, 1, allow_none=True)
        order = _permutation(len(self), seed, 0) if shuffle else torch.arange(len(self))
        out: List[Batch] = []
        for start in range(0, len(self), batch_size):
            idx = order[start : start + batch_size]
            if drop_last and idx.numel() < batch_size:
                break
            out.append(self.select(idx))
            if max_batches is not None and len(out) >= max_batches:
                break
        return out

    def stream(self, batch_size: int, *, seed: int = 0, position: int = 0) -> "BatchStream":
        """An endless, resumable stream of shuffled training batches."""
        return BatchStream(self, batch_size, seed=seed, position=position)


def _permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch)) % (2**63 - 1))
    return torch.randperm(n, generator=g)


class BatchStream:
    """Endless training batches: epoch ``e`` visits the sequences in ``randperm`` order seeded by
    (seed, e) and drops the incomplete last batch. ``position`` (batches consumed) is all the state
    needed to resume exactly.
    """

    def __init__(self, data: PackedDataset, batch_size: int, *, seed: int = 0, position: int = 0) -> None:
        _check_int("batch_size", batch_size, 1)
        _check_int("position", position, 0)
        if len(data) < batch_size:
            raise ValueError(
                f"the training data has only {len(data)} sequences of {data.seq_len} tokens, fewer than "
                f"batch_size={batch_size}; use more data, a smaller --batch-size or a shorter --seq-len"
            )
        self.data = data
        self.batch_size = batch_size
        self.seed = int(seed)
        self.position = position
        self.batches_per_epoch = len(data) // batch_size
        self._epoch = -1
        self._perm: Optional[torch.Tensor] = None

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> Batch:
        epoch, k = divmod(self.position, self.batches_per_epoch)
        if epoch != self._epoch:
            self._perm = _permutation(len(self.data), self.seed, epoch)
            self._epoch = epoch
        assert self._perm is not None
        idx = self._perm[k * self.batch_size : (k + 1) * self.batch_size]
        self.position += 1
        return self.data.select(idx)

    @property
    def epoch(self) -> float:
        return self.position / self.batches_per_epoch

    def state_dict(self) -> Dict[str, int]:
        return {"position": self.position, "seed": self.seed, "batch_size": self.batch_size}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        if state.get("seed") != self.seed or state.get("batch_size") != self.batch_size:
            raise ValueError(
                f"data stream state {state} does not match seed={self.seed}, batch_size={self.batch_size}"
            )
        self.position = int(state["position"])


def pack_tokens(
    tokens: torch.Tensor,
    seq_len: int,
    *,
    pad_id: int = 0,
    drop_remainder: bool = True,
    description: str = "",
) -> PackedDataset:
    """Cut a token stream ``[T]`` into sequences ``[N, seq_len]``.

    With ``drop_remainder=False`` the leftover tokens (at least 2) form a last, right-padded
    sequence whose padding is masked out; otherwise they are dropped.

    Raises:
        ValueError: fewer tokens than one sequence needs (``drop_remainder``) or fewer than 2 tokens.
    """
    _check_int("seq_len", seq_len, 2)
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1:
        raise ValueError("tokens must be a 1-D tensor")
    n = int(tokens.numel())
    full, rem = divmod(n, seq_len)
    if drop_remainder and full == 0:
        raise ValueError(f"the data has only {n} tokens, fewer than one sequence of seq_len={seq_len}")
    if n < 2:
        raise ValueError(f"the data has only {n} tokens; need at least 2")
    ids = tokens[: full * seq_len].reshape(full, seq_len)
    mask = torch.ones_like(ids)
    if not drop_remainder and rem >= 2:
        last = torch.full((1, seq_len), int(pad_id), dtype=torch.long)
        last[0, :rem] = tokens[full * seq_len :]
        last_mask = torch.zeros(1, seq_len, dtype=torch.long)
        last_mask[0, :rem] = 1
        ids = torch.cat([ids, last])
        mask = torch.cat([mask, last_mask])
    return PackedDataset(ids.contiguous(), mask.contiguous(), description)


def load_packed(
    source: Any,
    tokenizer: Any,
    *,
    seq_len: int,
    text_column: str = "text",
    split: Optional[str] = None,
    dataset_config: Optional[str] = None,
    max_tokens: Optional[int] = None,
    drop_remainder: bool = True,
    model_configs: Sequence[Any] = (),
) -> PackedDataset:
    """Load, tokenise and pack a data source (see :func:`load_texts` for ``source``).

    A :class:`PackedDataset` is returned unchanged (after checking its sequence length). All
    arguments are validated (``seq_len`` against each of ``model_configs``) before any data is read.

    Returns:
        PackedDataset with ``input_ids``/``attention_mask`` LongTensors ``[N, seq_len]``.
    """
    check_seq_len(seq_len, *model_configs)
    _check_int("max_tokens", max_tokens, 2, allow_none=True)
    if isinstance(source, PackedDataset):
        check_seq_len(source.seq_len, *model_configs)
        return source
    if tokenizer is None:
        raise ValueError("a tokenizer is needed to tokenise text data (the model has none saved; pass one)")
    corpus = load_texts(source, text_column=text_column, split=split, dataset_config=dataset_config)
    tokens = tokenize_corpus(corpus, tokenizer, max_tokens=max_tokens)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None) or 0
    packed = pack_tokens(tokens, seq_len, pad_id=int(pad), drop_remainder=drop_remainder, description=corpus.description)
    log.info("data: %s", packed)
    return packed
