"""Helpers shared by the trainer-integration tests."""
from __future__ import annotations

import functools
import inspect
import os

import pytest
import torch

# TRL's experimental trainers warn on import unless this is set.
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


@functools.lru_cache(maxsize=None)
def new_jsd_convention() -> bool:
    """Whether minitron.ops.kl_div's ``mode="jsd"`` uses TRL's convention (beta=1 is the reverse KL).

    The ``kl`` branch changes the convention (``M = beta P + (1 - beta) Q``); before it lands, only beta in
    {0, 0.5, 1} map exactly (0 and 1 go to mode forward/reverse, 0.5 is symmetric).
    """
    from minitron.ops import kl_div

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 7, generator=g), torch.randn(2, 7, generator=g)
    jsd1 = kl_div(s, t, mode="jsd", beta=1.0, scale_by_t2=False)
    rev = kl_div(s, t, mode="reverse", scale_by_t2=False)
    return bool(torch.allclose(jsd1, rev, rtol=1e-5, atol=1e-7))


@functools.lru_cache(maxsize=None)
def has_logit_transforms() -> bool:
    """Whether fused_linear_kl_div takes the per-model logit scale / softcap keywords (``kl`` branch)."""
    from minitron.ops import fused_linear_kl_div

    params = inspect.signature(fused_linear_kl_div).parameters
    return all(k in params for k in ("student_logit_scale", "teacher_logit_scale", "student_softcap",
                                     "teacher_softcap"))


def require_new_jsd(beta: float) -> None:
    if beta not in (0.0, 0.5, 1.0) and not new_jsd_convention():
        pytest.skip("needs the kl branch's JSD convention (M = beta P + (1 - beta) Q) for beta not in {0, 0.5, 1}")


def require_transforms() -> None:
    if not has_logit_transforms():
        pytest.skip("needs the kl branch's logit scale / softcap keywords of fused_linear_kl_div")
