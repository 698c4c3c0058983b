"""Public op API of minitron.

KL divergence family (``minitron.ops.kl``):
    kl_div, fused_linear_kl_div, KLDivLoss, FusedLinearKLDivLoss, kl_div_reference,
    fused_linear_kl_div_reference, vp_bytes_per_row (kl_div(..., process_group=g): vocab-parallel logits)
Importance reduction (``minitron.ops.importance``):
    ImportanceAccumulator, BlockInfluence, importance_reference, block_influence_reference
Sparse top-k KL (``minitron.ops.topk_kl``):
    topk_kl_div, fused_linear_topk_kl_div, TopKKLDivLoss, FusedLinearTopKKLDivLoss, topk_kl_div_reference,
    fused_linear_topk_kl_div_reference
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
    "fused_linear_kl_div": "kl",
    "KLDivLoss": "kl",
    "FusedLinearKLDivLoss": "kl",
    "kl_div_reference": "kl",
    "MAX_TEMPERATURE": "kl",
    "fused_linear_kl_div_reference": "kl",
    "vp_bytes_per_row": "kl",
    "ImportanceAccumulator": "importance",
    "NonFiniteActivationError": "importance",
    "BlockInfluence": "importance",
    "importance_reference": "importance",
    "block_influence_reference": "importance",
    "gather_slices": "slicing",
    "compact_": "slicing",
    "gather_slices_reference": "slicing",
    **{name: "topk_kl" for name in ("topk_kl_div", "fused_linear_topk_kl_div", "TopKKLDivLoss",
                                    "FusedLinearTopKKLDivLoss", "topk_kl_div_reference",
                                    "fused_linear_topk_kl_div_reference")},
}

__all__ = sorted(_EXPORTS) + ["BackendUnavailableError", "load_all"]

# Every op module, imported by load_all() so all torch.ops.minitron.* schemas are registered.
OP_MODULES = ("kl", "importance", "slicing", "topk_kl")


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'minitron.ops' has no attribute {name!r}")
    return getattr(importlib.import_module(f"minitron.ops.{module}"), name)


def load_all() -> None:
    """Import every op module (registers all ``torch.ops.minitron`` schemas)."""
    for module in OP_MODULES:
        importlib.import_module(f"minitron.ops.{module}")
