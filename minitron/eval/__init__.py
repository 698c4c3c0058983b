"""Evaluation: token-weighted perplexity (:mod:`.perplexity`)."""
from __future__ import annotations

from minitron.eval.perplexity import perplexity

__all__ = ["perplexity"]
