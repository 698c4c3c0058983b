"""Tokenizer helpers: train a small byte-level BPE tokenizer offline and load saved tokenizers.

The demo trains its own tokenizer with Hugging Face ``tokenizers`` and wraps it as a
``transformers`` fast tokenizer (``PreTrainedTokenizerFast``), so ``save_pretrained`` /
``AutoTokenizer.from_pretrained`` work like for any hub model.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence, Union

log = logging.getLogger(__name__)

__all__ = ["train_bpe_tokenizer", "load_tokenizer", "has_tokenizer_files", "ensure_pad_token", "shared_vocab_size",
           "id_to_token", "EOS_TOKEN", "PAD_TOKEN", "TOKENIZER_FILES"]

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"

# Files whose presence shows a directory really holds a tokenizer (AutoTokenizer.from_pretrained on a
# directory without them silently returns an empty tokenizer in transformers 5).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model")

PathLike = Union[str, os.PathLike]


def train_bpe_tokenizer(
    files: Optional[Sequence[PathLike]] = None,
    *,
    texts: Optional[Iterable[str]] = None,
    vocab_size: int = 2048,
    min_frequency: int = 2,
):
    """Train a byte-level BPE tokenizer and wrap it as a ``transformers`` fast tokenizer.

    Args:
        files: plain-text files to train on (read as UTF-8).
        texts: alternatively, an iterable of strings.
        vocab_size: size of the vocabulary including the special tokens (>= 258: the 256 byte symbols
            plus ``<|endoftext|>`` and ``<|pad|>``).
        min_frequency: minimum pair frequency for a merge.

    Returns:
        A ``PreTrainedTokenizerFast`` with ``eos_token = bos_token = "<|endoftext|>"`` (id 0) and
        ``pad_token = "<|pad|>"`` (id 1). Byte-level, so every string is encodable and decoding
        round-trips.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if (files is None) == (texts is None):
        raise ValueError("train_bpe_tokenizer: give exactly one of `files` or `texts` to train on")
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 258:
        raise ValueError(f"train_bpe_tokenizer: vocab_size must be an int >= 258, got {vocab_size!r}")
    if not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValueError(f"train_bpe_tokenizer: min_frequency must be a positive int, got {min_frequency!r}")
    paths = [str(Path(f)) for f in (files or [])]
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"train_bpe_tokenizer: training file {p!r} does not exist")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    if files is not None:
        if not paths:
            raise ValueError("train_bpe_tokenizer: `files` is empty")
        tok.train(paths, trainer)
    else:
        tok.train_from_iterator(texts, trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=PAD_TOKEN
    )
    log.info("trained byte-level BPE tokenizer: %d tokens", len(wrapped))
    return wrapped


def has_tokenizer_files(path: PathLike) -> bool:
    """Whether directory ``path`` contains tokenizer files."""
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES)


def load_tokenizer(path: PathLike):
    """Load a tokenizer saved with ``save_pretrained`` from directory ``path``.

    Raises:
        FileNotFoundError: ``path`` is not a directory holding tokenizer files (instead of returning
            an empty tokenizer, as ``AutoTokenizer`` does).
    """
    from transformers import AutoTokenizer

    if not has_tokenizer_files(path):
        raise FileNotFoundError(
            f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {str(path)!r}; "
            "save the tokenizer next to the model or pass --tokenizer"
        )
    return AutoTokenizer.from_pretrained(str(path))


def ensure_pad_token(tokenizer) -> int:
    """Return the id used for padding: the pad token, else EOS, else 0 (the tokenizer is not modified)."""
    for tid in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if tid is not None:
            return int(tid)
    return 0


def id_to_token(tokenizer) -> Dict[int, str]:
    """``{id: token string}`` of every token of ``tokenizer`` (its base vocabulary and its added tokens)."""
    table = {int(i): str(t) for t, i in tokenizer.get_vocab().items()}
    for i, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        table[int(i)] = str(getattr(tok, "content", tok))
    return table


def _added_ids(tokenizer) -> set:
    return {int(i) for i in (getattr(tokenizer, "added_tokens_decoder", None) or {})}


def shared_vocab_size(a, b, *, names: Sequence[str] = ("student", "teacher")) -> int:
    """The number of leading token ids two tokenizers share: ``min(len(a), len(b))`` when every id below it
    is the same token in both and the longer one's extra ids are appended *added* (special) tokens.

    A tokenizer padded for its model (the model's head larger than the tokenizer) is not a difference here: pass the
    tokenizers, not the heads. Args ``names`` label the two sides in the error.

    Raises:
        ValueError naming the first differing token ids (and how many of the shared ids differ), or the first extra
        id of the longer tokenizer that is an ordinary (not added) token.
    """
    ta, tb = id_to_token(a), id_to_token(b)
    na, nb = len(a), len(b)
    n = min(na, nb)
    diff = [i for i in range(n) if ta.get(i) != tb.get(i)]
    if diff:
        first = diff[:3]
        shown = ", ".join(f"id {i}: {ta.get(i)!r} ({names[0]}) vs {tb.get(i)!r} ({names[1]})" for i in first)
        raise ValueError(f"the {names[0]} and {names[1]} tokenizers differ beyond padding or appended special tokens: "
                         f"{len(diff)} of their {n} shared ids map to different tokens, first {shown}")
    longer, table, name = (a, ta, names[0]) if na > nb else (b, tb, names[1])
    added = _added_ids(longer)
    extra = [i for i in range(n, max(na, nb)) if i not in added]
    if extra:
        i = extra[0]
        raise ValueError(f"the {name} tokenizer has {max(na, nb) - n} tokens beyond the other's {n}, and id {i} "
                         f"({table.get(i)!r}) is an ordinary token, not an appended special token: the tokenizers "
                         "differ beyond padding or appended special tokens")
    return n
