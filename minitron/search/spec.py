"""``SearchSpec``: the settings of ``minitron search`` (declared once: Python keyword, CLI flag, YAML key)."""
from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any, Optional

from minitron.options import option
from minitron.specs import check_positive_int, parse_size

__all__ = ["SearchSpec", "parse_count", "RANK_BY", "DEPTH_METRICS"]

RANK_BY = ("loss", "kl")
DEPTH_METRICS = ("lm_loss", "block_influence")


def parse_count(s: str) -> int:
    """A parameter count: ``4.52e9``, ``4520000000``, ``4.52B``, ``80M``, ``80_000_000``."""
    text = str(s).strip().replace("_", "").replace(",", "")
    units = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
    mult = 1
    if text and text[-1].upper() in units:
        mult, text = units[text[-1].upper()], text[:-1]
    try:
        v = float(text) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a parameter count like 4.52e9, 80M or 80000000, got {s!r}") from None
    if not math.isfinite(v) or v < 1:
        raise argparse.ArgumentTypeError(f"a parameter count must be positive, got {s!r}")
    return int(round(v))


def _fraction(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v < 1:
        raise ValueError(f"SearchSpec.{name} must be a number in [0, 1), got {v!r}")


@dataclasses.dataclass
class SearchSpec:
    """What ``minitron search`` looks for and how hard (:func:`minitron.search.run_search`)."""

    target_params: Optional[int] = option(None, help="parameter budget, e.g. 4.52e9 or 80M (this and/or "
                                          "--target-memory is required)", parse=parse_count, default_text="none")
    params_kind: str = option("total", help="what --target-params counts: total (tied embeddings once) or "
                              "non_embedding (without the embedding and LM head)", choices=("total", "non_embedding"))
    target_memory: Optional[int] = option(None, help="memory budget: weights + KV cache at --memory-seq-len x "
                                          "--memory-batch in the checkpoint dtype, e.g. 10GB", parse=parse_size,
                                          default_text="none")
    memory_seq_len: int = option(4096, help="sequence length of the KV cache counted in --target-memory")
    memory_batch: int = option(1, help="batch size of the KV cache counted in --target-memory")
    max_width_prune: float = option(0.4, help="largest fraction of each width axis (hidden, MLP, heads, KV heads) "
                                    "pruned away, in [0, 1)")
    max_depth_prune: float = option(0.2, help="largest fraction of the layers dropped, in [0, 1)")
    hidden_multiple: int = option(64, help="grid step of candidate hidden sizes")
    mlp_multiple: int = option(64, help="grid step of candidate MLP sizes")
    tolerance: float = option(0.05, help="keep candidates whose budgeted size is within this fraction below the "
                              "budget, in [0, 1)")
    max_candidates: int = option(48, help="refuse to score more candidates than this (tighten --tolerance or "
                                 "coarsen the grid)")
    top_k: int = option(3, help="candidates distilled after scoring (the best K by --rank-by)")
    distill_tokens: int = option(16384, help="distillation tokens per finalist (sets the steps: tokens / "
                                 "(batch_size x grad_accum x seq_len), at least 1)")
    score_tokens: int = option(4096, help="held-out scoring tokens: the tail of --data, kept out of distillation "
                               "(or the head of --eval-data when given)")
    score_batch_size: int = option(4, help="sequences per forward when scoring")
    rank_by: str = option("loss", help="what ranks candidates: loss (held-out LM loss) or kl (KL to the teacher)",
                          choices=RANK_BY)
    depth_metric: str = option("lm_loss", help="layer importance choosing the dropped contiguous block",
                               choices=DEPTH_METRICS, flag=("--search-depth-metric",))
    prune_backend: str = option("auto", help="slicing kernel backend of the in-memory pruning")

    def __post_init__(self) -> None:
        if self.target_params is None and self.target_memory is None:
            raise ValueError("SearchSpec: give a budget: target_params (--target-params) and/or target_memory "
                             "(--target-memory)")
        check_positive_int("SearchSpec.target_params", self.target_params, optional=True)
        check_positive_int("SearchSpec.target_memory", self.target_memory, optional=True)
        if self.params_kind not in ("total", "non_embedding"):
            raise ValueError(f"SearchSpec.params_kind must be total or non_embedding, got {self.params_kind!r}")
        for k in ("max_width_prune", "max_depth_prune", "tolerance"):
            _fraction(k, getattr(self, k))
        for k in ("memory_seq_len", "memory_batch", "hidden_multiple", "mlp_multiple", "max_candidates",
                  "distill_tokens", "score_tokens", "score_batch_size"):
            check_positive_int(f"SearchSpec.{k}", getattr(self, k))
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"SearchSpec.top_k must be an int >= 1 (candidates to distil), got {self.top_k!r}")
        if self.rank_by not in RANK_BY:
            raise ValueError(f"SearchSpec.rank_by must be one of {RANK_BY}, got {self.rank_by!r}")
        if self.depth_metric not in DEPTH_METRICS:
            raise ValueError(f"SearchSpec.depth_metric must be one of {DEPTH_METRICS}, got {self.depth_metric!r}")
        if not isinstance(self.prune_backend, str):
            raise TypeError(f"SearchSpec.prune_backend must be a string, got {self.prune_backend!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
