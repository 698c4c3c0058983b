"""Compression: importance estimation (:mod:`.importance`) and width/depth pruning (:mod:`.prune`)."""
from __future__ import annotations

from minitron.compress.importance import LAYER_METRICS, ImportanceScores, estimate_importance
from minitron.compress.prune import (DEPTH_METRICS, WidthPlan, plan_depth, plan_width, prune_depth, prune_width,
                                     validate_width_targets)

__all__ = ["ImportanceScores", "estimate_importance", "LAYER_METRICS", "WidthPlan", "plan_width", "plan_depth",
           "prune_width", "prune_depth", "validate_width_targets", "DEPTH_METRICS"]
