"""Public op API of minitron.

KL divergence family:
    ``minitron.ops.kl`` (the plain op): kl_div, KLDivLoss, kl_div_reference
    ``minitron.ops.kl_vocab_parallel`` (kl_div(..., process_group=g): vocab-parallel logits): vp_bytes_per_row
    ``minitron.ops.fused_linear_kl`` (logits never materialised): fused_linear_kl_div, FusedLinearKLDivLoss,
    fused_linear_kl_div_reference
    (every name above is also importable from ``minitron.ops.kl``, where it lived before the split)
KL options' declared bounds (``minitron.ops.kl``), for a driver that validates where the user typed them:
    KL_MODES          the accepted ``mode`` values ("forward", "reverse", "jsd")
    KL_REDUCTIONS     the accepted ``reduction`` values ("mean", "sum", "none"; also those of the top-k ops)
    BETA_RANGE        the closed interval of the JSD ``beta`` ((0.0, 1.0))
    MAX_TEMPERATURE   the largest accepted ``temperature`` (100.0; fp32 cannot resolve the divergence of the
                      nearly uniform softmaxes beyond it; docs/kl.md). Temperatures must also be finite and > 0.
    check_kl_options(mode, temperature, beta, reduction)  raises the TypeError/ValueError the KL ops would raise
Importance reduction (``minitron.ops.importance``):
    ImportanceAccumulator, BlockInfluence, importance_reference, block_influence_reference
Grouped (per-expert) importance reduction (``minitron.ops.grouped_importance``):
    GroupedImportanceAccumulator, grouped_importance_reference, grouped_segments
Sparse top-k KL (``minitron.ops.topk_kl``):
    topk_kl_div, fused_linear_topk_kl_div, TopKKLDivLoss, FusedLinearTopKKLDivLoss, topk_kl_div_reference,
    fused_linear_topk_kl_div_reference
Hidden-state distillation losses (``minitron.ops.hidden_loss``; docs/hidden_loss.md):
    hidden_state_loss, HiddenStateLoss, hidden_state_loss_reference, HIDDEN_LOSSES, HIDDEN_REDUCTIONS,
    check_hidden_loss_options
Structured slicing (``minitron.ops.slicing``):
    gather_slices, compact_, gather_slices_reference

Names resolve lazily so importing this package stays cheap and one op family's import problem never
hides the others.
"""
from __future__ import annotations

import importlib
from typing import Any

from minitron.ops._dispatch import BackendUnavailableError

_EXPORTS = {
    "kl_div": "kl",
    "fused_linear_kl_div": "fused_linear_kl",
    "KLDivLoss": "kl",
    "FusedLinearKLDivLoss": "fused_linear_kl",
    "kl_div_reference": "kl",
    "MAX_TEMPERATURE": "kl",
    "KL_MODES": "kl",
    "KL_REDUCTIONS": "kl",
    "BETA_RANGE": "kl",
    "check_kl_options": "kl",
    "fused_linear_kl_div_reference": "fused_linear_kl",
    "vp_bytes_per_row": "kl_vocab_parallel",
    "ImportanceAccumulator": "importance",
    "NonFiniteActivationError": "importance",
    "BlockInfluence": "importance",
    "importance_reference": "importance",
    "block_influence_reference": "importance",
    "GroupedImportanceAccumulator": "grouped_importance",
    "grouped_importance_reference": "grouped_importance",
    "grouped_segments": "grouped_importance",
    "gather_slices": "slicing",
    "compact_": "slicing",
    "gather_slices_reference": "slicing",
    **{name: "hidden_loss" for name in ("hidden_state_loss", "HiddenStateLoss", "hidden_state_loss_reference",
                                        "HIDDEN_LOSSES", "HIDDEN_REDUCTIONS", "check_hidden_loss_options")},
    **{name: "topk_kl" for name in ("topk_kl_div", "fused_linear_topk_kl_div", "TopKKLDivLoss",
                                    "FusedLinearTopKKLDivLoss", "topk_kl_div_reference",
                                    "fused_linear_topk_kl_div_reference")},
}

__all__ = sorted(_EXPORTS) + ["BackendUnavailableError", "load_all"]

# Every op module, imported by load_all() so all torch.ops.minitron.* schemas are registered.
OP_MODULES = ("kl", "kl_vocab_parallel", "fused_linear_kl", "importance", "grouped_importance", "slicing", "topk_kl",
              "hidden_loss")


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'minitron.ops' has no attribute {name!r}")
    return getattr(importlib.import_module(f"minitron.ops.{module}"), name)


def load_all() -> None:
    """Import every op module (registers all ``torch.ops.minitron`` schemas)."""
    for module in OP_MODULES:
        importlib.import_module(f"minitron.ops.{module}")
