"""examples/plain_loop.py: a plain torch loop with minitron.ops.kl_div / KLDivLoss / the torch-style drop-in."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "plain_loop.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("examples_plain_loop", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_training_lowers_the_loss(example) -> None:
    losses = example.main(["--steps", "12"])["losses"]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses


def test_three_loss_calls_train_identically(example) -> None:
    # Same seed, same batches: kl_div, the KLDivLoss module and the torch.nn.KLDivLoss-style drop-in on the
    # unpadded tokens are the same loss, so the whole trajectory matches.
    runs = {name: example.main(["--steps", "3", "--loss", name])["losses"] for name in ("kl_div", "module", "torch")}
    ref = torch.tensor(runs["kl_div"])
    for name in ("module", "torch"):
        torch.testing.assert_close(torch.tensor(runs[name]), ref, rtol=1e-4, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_trl_loss_cost_script_runs_and_agrees() -> None:
    pytest.importorskip("trl")
    path = Path(__file__).resolve().parents[2] / "examples" / "trl_loss_cost.py"
    spec = importlib.util.spec_from_file_location("examples_trl_loss_cost", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--batch", "2", "--seq", "8", "--vocab", "300", "--repeats", "1", "--beta", "0.3"]
    ours = module.main(["--provider", "minitron", *argv])
    ref = module.main(["--provider", "trl", *argv])
    assert ref["loss"] > 0 and abs(ours["loss"] - ref["loss"]) <= 1e-5 * ref["loss"]
