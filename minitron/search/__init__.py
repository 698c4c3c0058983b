"""``minitron search``: choose the pruned architecture for a parameter / memory budget.

Enumerate the candidate shapes meeting the budget on the papers' grid (:mod:`minitron.search.space`, config
only), score each right after pruning in memory against the teacher's shared activations
(:mod:`minitron.search.score`), distil the best K briefly with the existing distillation, rescore, and keep the
winner (:mod:`minitron.search.run`, resumable; report in :mod:`minitron.search.report`).

Floor: above ``compress``, ``train`` and ``eval`` (it uses them), below ``api`` (the front door calls it).
"""
from __future__ import annotations

from minitron.search.space import (BUDGET_KINDS, Candidate, SearchSpaceError, Shape, count_parameters,
                                   enumerate_candidates, kv_cache_bytes, reachable_range)
from minitron.search.spec import SearchSpec, parse_count

__all__ = ["SearchSpec", "Shape", "Candidate", "SearchSpaceError", "enumerate_candidates", "reachable_range",
           "count_parameters", "kv_cache_bytes", "parse_count", "BUDGET_KINDS", "search_config", "run_search",
           "SearchResult"]


def __getattr__(name: str):
    if name in ("run_search", "SearchResult", "search_config"):
        from minitron.search import run

        return getattr(run, name)
    raise AttributeError(f"module 'minitron.search' has no attribute {name!r}")
