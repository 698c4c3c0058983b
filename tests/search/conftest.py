"""Shared helpers of the search tests: tiny random models (tests.driver.conftest) and packed random data."""
from __future__ import annotations

import pytest
import torch

from tests.driver.conftest import make_model, random_scores, tiny_config  # noqa: F401  (re-exported)


def packed(vocab: int = 96, *, n: int = 10, seq: int = 16, seed: int = 0):
    """A PackedDataset of ``n`` random sequences of ``seq`` token ids (no padding)."""
    from minitron.io.data import PackedDataset

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, seq), generator=g)
    return PackedDataset(ids, torch.ones_like(ids), f"random {n}x{seq}")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
