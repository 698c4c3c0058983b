"""Distillation from a stored top-k teacher (:mod:`minitron.io.logit_store`): no teacher in memory.

The loss is :func:`minitron.ops.fused_linear_topk_kl_div` on the student's final hidden states and LM head
(the ``[tokens x vocab]`` logits are never materialised) against the stored top-k log-probabilities, at the
store's temperature, optionally mixed with the student's next-token cross-entropy::

    loss = kl_weight * T^2 * KL_topk(stored teacher || student; T) + lm_loss_weight * CE(student, next token)

``tail=True`` (default) matches the teacher's unstored mass against the student's mass outside the k entries;
``tail=False`` renormalises the teacher over its k entries (DistillKit's sparse KL); see ``docs/topk_kl.md``.
Counted tokens: the real (unpadded) positions that hold a teacher distribution (a position whose stored entries
are all ``-inf`` has none: imported served records end so); with an LM term, the last position of each sequence (whose next
token is unknown) counts for neither term, since both come from one fused kernel call.

The training batches carry the stored entries: :func:`distill_from_store` wraps the data so that every batch the
shared loop draws (by sequence index, so resume stays exact) also holds ``sequence_index`` ``[B]``,
``teacher_indices`` int64 ``[B, S, k]`` and ``teacher_logprobs`` fp32 ``[B, S, k]``.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch

from minitron.io.data import Batch, PackedDataset
from minitron.io.logit_store import StoreError, TeacherLogitStore
from minitron.train.loop import Callback, TrainConfig, TrainResult, train
from minitron.options import option
from minitron.train.distill import check_temperature

log = logging.getLogger(__name__)

__all__ = ["StoredDistillConfig", "StoreBackedData", "make_stored_distillation_loss", "distill_from_store"]

PathLike = Union[str, os.PathLike]


@dataclass
class StoredDistillConfig:
    """Loss settings for distillation from a store.

    Attributes:
        kl_weight: weight of the top-k KL term.
        lm_loss_weight: weight of the student's next-token cross-entropy (0: pure distillation).
        tail: match the teacher's unstored mass as one bucket (True) or renormalise over the k entries (False).
        temperature: None (default) uses the store's temperature; a number must equal it (the stored
            log-probabilities were computed at the store's temperature).
        chunk_size: tokens per chunk in the fused op (None: the op's default).
        backend: op backend ("auto", "cpp", "cuda", "triton", "reference").
        vocab_size: the real vocabulary for the KL (stored or student columns at or above it count as -inf);
            None: detected (:func:`minitron.train.distill.resolve_vocab_size`: the tokenizer, the store's and the
            student's head sizes).
    """

    kl_weight: float = option(1.0, help="weight of the top-k KL term")
    lm_loss_weight: float = option(0.0, help="weight of the student's LM loss mixed in")
    tail: bool = option(True, help="with --teacher-logits: renormalise the teacher over its k entries instead of "
                        "matching its remaining mass as one bucket", flag=("--no-tail",), default_text="tail on")
    temperature: Optional[float] = option(None, help="must equal the store's", default_text="the store's")
    chunk_size: Optional[int] = option(None, help="tokens per chunk in the fused op", default_text="the op's")
    backend: str = option("auto", help="op backend", aliases=("kl_backend",))
    vocab_size: Optional[int] = option(None, help="real vocabulary size for the KL", cli=False,
                                       default_text="detected from the tokenizer and heads")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError/TypeError naming the first bad field."""
        for name in ("kl_weight", "lm_loss_weight"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ValueError(f"StoredDistillConfig.{name} must be a finite number >= 0, got {v!r}")
        if self.kl_weight + self.lm_loss_weight == 0:
            raise ValueError("StoredDistillConfig: kl_weight and lm_loss_weight must not both be 0")
        if not isinstance(self.tail, bool):
            raise TypeError(f"StoredDistillConfig.tail must be a bool, got {self.tail!r}")
        if self.temperature is not None:
            check_temperature(self.temperature, "StoredDistillConfig.temperature")
        if self.chunk_size is not None and (not isinstance(self.chunk_size, int) or self.chunk_size < 1):
            raise ValueError(f"StoredDistillConfig.chunk_size must be a positive int or None, got {self.chunk_size!r}")
        if not isinstance(self.backend, str):
            raise TypeError(f"StoredDistillConfig.backend must be a string, got {self.backend!r}")
        if self.vocab_size is not None and (not isinstance(self.vocab_size, int) or isinstance(self.vocab_size, bool)
                                            or self.vocab_size < 1):
            raise ValueError(f"StoredDistillConfig.vocab_size must be a positive int or None, got {self.vocab_size!r}")

    @classmethod
    def from_dict(cls, d: Optional[Dict[str, Any]]) -> "StoredDistillConfig":
        """Build from a mapping; unknown keys raise a ValueError naming the valid ones."""
        d = dict(d or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown stored-distillation option(s) {unknown}; valid: {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> Dict[str, Any]:
        """The settings as a dict (``vocab_size`` only when set, so that older runs resume unchanged)."""
        d = asdict(self)
        if d["vocab_size"] is None:
            del d["vocab_size"]
        return d


class StoreBackedData(PackedDataset):
    """A :class:`PackedDataset` whose batches also carry the store's entries of their sequences.

    ``select(indices)`` returns ``input_ids``/``attention_mask`` ``[B, S]`` plus ``sequence_index`` int64 ``[B]``,
    ``teacher_indices`` int64 ``[B, S, k]`` and ``teacher_logprobs`` fp32 ``[B, S, k]``. Everything else
    (``stream``, ``batches``, resume by position) is :class:`PackedDataset`'s.
    """

    def __init__(self, data: PackedDataset, store: TeacherLogitStore) -> None:
        super().__init__(data.input_ids, data.attention_mask, data.description)
        self.store = store

    def select(self, indices: Any) -> Batch:
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        batch = super().select(idx)
        t_idx, t_lp = self.store.get(idx)
        batch.update(sequence_index=idx.clone(), teacher_indices=t_idx, teacher_logprobs=t_lp)
        return batch


def _store_temperature(store: TeacherLogitStore, config: StoredDistillConfig) -> float:
    t = store.temperature
    if config.temperature is not None and not math.isclose(float(config.temperature), t, rel_tol=1e-6):
        raise ValueError(f"StoredDistillConfig.temperature={config.temperature} differs from the store's temperature "
                         f"{t} (the stored log-probabilities are at T={t}); leave it None or write a new store")
    return t


def make_stored_distillation_loss(store: TeacherLogitStore, config: StoredDistillConfig,
                                  vocab_size: Optional[int] = None):
    """The loss function ``loss_fn(student, batch) -> (loss, metrics)`` for :func:`minitron.train.loop.train`.

    ``vocab_size``: the real vocabulary passed to the op (None: ``config.vocab_size``; both None: the heads are it).

    ``batch`` holds ``input_ids``/``attention_mask`` ``[B, S]`` and either ``teacher_indices``/``teacher_logprobs``
    ``[B, S, k]`` (as :class:`StoreBackedData` batches do) or ``sequence_index`` ``[B]`` (looked up in ``store``).
    Metrics: ``kl`` (the weighted KL term, pure distillation only) or ``kl_lm`` (the mixed loss).
    """
    from minitron.ops import fused_linear_topk_kl_div
    from minitron.train.distill import final_hidden_and_head

    if not isinstance(store, TeacherLogitStore):
        raise TypeError(f"store must be a TeacherLogitStore, got {type(store).__name__}")
    if not isinstance(config, StoredDistillConfig):
        raise TypeError(f"config must be a StoredDistillConfig, got {type(config).__name__}")
    config.validate()
    temperature = _store_temperature(store, config)
    real_vocab = vocab_size if vocab_size is not None else config.vocab_size
    vocab_kw = {"vocab_size": int(real_vocab)} if real_vocab is not None else {}

    def loss_fn(student: torch.nn.Module, batch: Batch) -> Tuple[torch.Tensor, Dict[str, float]]:
        mask = batch["attention_mask"] != 0
        if "teacher_indices" in batch and "teacher_logprobs" in batch:
            t_idx, t_lp = batch["teacher_indices"], batch["teacher_logprobs"]
        elif "sequence_index" in batch:
            t_idx, t_lp = store.get(batch["sequence_index"].cpu())
        else:
            raise KeyError("the batch holds neither teacher_indices/teacher_logprobs nor sequence_index; "
                           "train on StoreBackedData(data, store)")
        s_hidden, s_weight, s_bias = final_hidden_and_head(student, batch)
        if s_hidden.dtype != s_weight.dtype:  # autocast: bf16 activations, fp32 master weights
            s_hidden = s_hidden.to(s_weight.dtype)
        t_idx = t_idx.to(s_hidden.device, non_blocking=True)
        t_lp = t_lp.to(s_hidden.device, non_blocking=True)
        # a position without a teacher distribution (all entries -inf: e.g. the last prompt position of imported
        # served records) counts for nothing
        mask = mask & torch.isfinite(t_lp[..., 0])
        labels = None
        if config.lm_loss_weight > 0:
            ids = batch["input_ids"]
            valid = mask[:, 1:] & mask[:, :-1]
            labels = torch.full_like(ids, -100)
            labels[:, :-1] = ids[:, 1:].masked_fill(~valid, -100)
        loss = fused_linear_topk_kl_div(
            s_hidden, s_weight, t_idx, t_lp, student_bias=s_bias, labels=labels, ce_weight=config.lm_loss_weight,
            kl_weight=config.kl_weight, temperature=temperature, mask=mask, reduction="mean", tail=config.tail,
            chunk_size=config.chunk_size, backend=config.backend, **vocab_kw,
        )
        value = float(loss.detach())
        return loss, ({"kl": value} if config.lm_loss_weight == 0 else {"kl_lm": value})

    return loss_fn


def distill_from_store(
    student: torch.nn.Module,
    store: Union[TeacherLogitStore, PathLike],
    data: PackedDataset,
    train_config: TrainConfig,
    config: Optional[StoredDistillConfig],
    output_dir: PathLike,
    *,
    run_info: Optional[Dict[str, Any]] = None,
    tokenizer_hash: Optional[str] = None,
    tokenizer: Any = None,
    **run: Any,
) -> TrainResult:
    """Distil ``student`` (trained in place) from a teacher-logit store; no teacher is loaded.

    Args:
        student: a supported causal LM sharing the teacher's vocabulary.
        store: a :class:`TeacherLogitStore` or its directory.
        data: the very packed sequences the store was written from (checked by token-id hash).
        train_config: optimisation settings (see :func:`minitron.train.loop.train`).
        config: loss settings (None: the defaults).
        output_dir: the run directory (log, plot, checkpoints); not inside the store.
        run_info: extra JSON-able run description (the store's identity is added and checked on resume).
        tokenizer_hash: the student's tokenizer hash (:func:`minitron.io.logit_store.tokenizer_hash`), compared
            with the store's when both are known (and the heads are the same size).
        tokenizer: the student's tokenizer, to detect a padded head on either side (the store's vocabulary is
            the teacher's head): the real vocabulary is then ``len(tokenizer)``, logged.
        **run: the run's other keywords, as :func:`minitron.train.loop.train` takes them: ``eval_data``
            (the student's LM loss / perplexity), ``resume``, ``callbacks``.

    Raises:
        StoreError: the store is incomplete/damaged, or does not match the data (tokenizer, vocabulary, seq_len,
            token ids), naming the mismatch. TypeError/ValueError for bad arguments.
    """
    from minitron.io.safety import same_or_inside
    from minitron.models import get_adapter

    if not isinstance(student, torch.nn.Module):
        raise TypeError(f"student must be a torch.nn.Module, got {type(student).__name__}")
    adapter = get_adapter(student)
    adapter.check_model(student)
    if config is None:
        config = StoredDistillConfig()
    if not isinstance(config, StoredDistillConfig):
        raise TypeError(f"config must be a StoredDistillConfig, got {type(config).__name__}")
    config.validate()
    if not isinstance(store, TeacherLogitStore):
        if not isinstance(store, (str, os.PathLike)):
            raise TypeError(f"store must be a TeacherLogitStore or a path, got {type(store).__name__}")
        store = TeacherLogitStore(store)
    if same_or_inside(output_dir, store.path) or same_or_inside(store.path, output_dir):
        raise ValueError(f"output_dir {str(output_dir)!r} overlaps the teacher-logit store {str(store.path)!r}; "
                         "choose another output directory")
    from minitron.train.distill import resolve_vocab_size

    vocab = int(adapter.lm_head(student).weight.shape[0])
    real = None  # without a tokenizer or --vocab-size, check_compatible refuses heads of another size
    if tokenizer is not None or config.vocab_size is not None:
        real = resolve_vocab_size(student, None, tokenizers=(tokenizer,), requested=config.vocab_size,
                                  teacher_vocab=store.vocab_size)
    store.check_compatible(data, vocab_size=vocab, tokenizer_hash=tokenizer_hash, real_vocab_size=real)
    loss_fn = make_stored_distillation_loss(store, config, vocab_size=real)
    m = store.manifest
    info = dict(run_info or {})
    info.setdefault("distill_from_store", {
        **config.to_dict(),
        "store": str(Path(store.path).resolve()),
        "k": store.k, "temperature": store.temperature, "value_encoding": store.value_encoding,
        "teacher_config_sha256": (m.get("teacher") or {}).get("config_sha256"),
        "data_sha256": m["data"].get("input_ids_sha256"),
        **({"real_vocab_size": real} if real is not None else {}),
    })
    tail = "tail" if config.tail else "renormalised"
    return train(
        student, loss_fn, StoreBackedData(data, store), train_config, output_dir,
        run_info=info, **run,
        plot_title=f"distillation from a stored top-{store.k} teacher ({tail}, T={store.temperature})",
    )


__all__ += ["StoreError"]
