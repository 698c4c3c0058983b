"""Importance scores for many (seq, batch) aggregation pairs from one calibration forward pass.

Arm ``f`` of the study scores every one of the 25 aggregation pairs. On the toy teacher one estimation per pair
is cheap; on a real checkpoint (SmolLM2-135M: 30 layers) the forward pass is the whole cost, and it is the same
pass for every pair: only the reductions of the recorded activations differ. :func:`scores_for_pairs` attaches
one collector per pair to the same model and runs the calibration batches once, then assembles one
:class:`minitron.compress.importance.ImportanceScores` per pair, equal to what
:func:`minitron.compress.importance.estimate_importance` returns for that pair without layer metrics
(``tests/benchmarks/test_study_real.py`` checks this).

It uses the importance module's internal collector and pass helpers (no public API offers several
aggregations at once); when they are missing or their signatures changed, it falls back to one
:func:`estimate_importance` call per pair (logged), so the study still runs, only slower.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

log = logging.getLogger(__name__)

Pair = Tuple[str, str]


class _Many:
    """Looks like one collector to the calibration pass; forwards attach/detach/mask to each of several."""

    def __init__(self, collectors: Sequence[Any]) -> None:
        self.collectors = list(collectors)
        self._mask: Optional[torch.Tensor] = None

    def attach(self) -> None:
        for c in self.collectors:
            c.attach()

    def detach(self) -> None:
        for c in self.collectors:
            c.detach()

    @property
    def mask(self) -> Optional[torch.Tensor]:
        return self._mask

    @mask.setter
    def mask(self, value: Optional[torch.Tensor]) -> None:
        self._mask = value
        for c in self.collectors:
            c.mask = value


def _one_pass(model: torch.nn.Module, batches: Sequence[Any], pairs: Sequence[Pair], backend: str) -> Dict[Pair, Any]:
    from minitron.compress import importance as imp
    from minitron.models import get_adapter

    adapter = get_adapter(model)
    adapter.check_model(model)
    device = imp._model_device(model)
    dtype = imp._activation_dtype(model)
    collectors = [imp._Collector(model, adapter, seq_agg=s, batch_agg=b, block_influence=False, backend=backend,
                                 device=device, dtype=dtype) for s, b in pairs]
    signature = imp.shape_signature(model)
    was_training = model.training
    model.eval()
    try:
        run = imp._calibration_pass(model, adapter, _Many(collectors), batches, None, False, False)
    finally:
        model.train(was_training)
    out: Dict[Pair, Any] = {}
    for (s, b), c in zip(pairs, collectors):
        out[(s, b)] = imp._assemble_scores(
            c, adapter, model.config, signature, seq_agg=s, batch_agg=b, layer_metrics=(),
            num_samples=run.num_samples, num_tokens=run.num_tokens, num_batches=run.num_batches, base_loss=None,
            lm_loss_drop=None, extra_meta={"estimated_with": "benchmarks.study.sweep (one pass, all pairs)"})
    return out


def scores_for_pairs(model: torch.nn.Module, batches: Sequence[Any], pairs: Sequence[Pair], *,
                     backend: str = "auto") -> Dict[Pair, Any]:
    """``{(seq_agg, batch_agg): ImportanceScores}`` for every pair, from one forward pass over ``batches``
    (without layer metrics; falls back to one estimation per pair if the internals are unavailable)."""
    pairs = [(str(s), str(b)) for s, b in pairs]
    if not pairs:
        return {}
    batches = list(batches)
    try:
        return _one_pass(model, batches, pairs, backend)
    except (AttributeError, TypeError, ImportError) as e:  # internals changed: the slow but public path
        log.warning("one-pass aggregation sweep unavailable (%s); estimating each of %d pairs separately", e,
                    len(pairs))
    from minitron.compress.importance import estimate_importance

    return {(s, b): estimate_importance(model, batches, seq_agg=s, batch_agg=b, layer_metrics=(), progress=False,
                                        backend=backend) for s, b in pairs}


__all__: List[str] = ["scores_for_pairs"]
