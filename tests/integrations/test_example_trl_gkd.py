"""examples/trl_gkd.py: TRL's GKDTrainer with minitron's loss, offline on CPU.

On one batch the loss and every student gradient equal those of TRL's own ``generalized_jsd_loss``; a few
training steps lower the loss.
"""
from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path
from unittest import mock

import pytest
import torch

from tests.integrations.conftest import require_new_jsd

pytest.importorskip("trl")
pytest.importorskip("datasets")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "trl_gkd.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("examples_trl_gkd", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example():
    return _load_example()


@pytest.mark.parametrize("beta", [0.5, 0.9])
def test_same_batch_same_loss_and_gradient_as_trl(example, beta: float) -> None:
    from trl.experimental.gkd import GKDTrainer

    from minitron.integrations.trl import MinitronGKDTrainer

    require_new_jsd(beta)
    args = example.parse_args(["--steps", "1", "--beta", str(beta), "--examples", "16"])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = example.build_trainer(args, tmp)
    assert isinstance(trainer, MinitronGKDTrainer)
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()  # prompts are masked
    model = trainer.model
    model.train()

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=None)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    torch.manual_seed(0)
    ours, our_grads = loss_and_grads()
    # The same trainer with TRL's own loss function in place of ours.
    with mock.patch.object(trainer, "generalized_jsd_loss", GKDTrainer.generalized_jsd_loss):
        torch.manual_seed(0)
        ref, ref_grads = loss_and_grads()
    assert ref.item() > 1e-3
    torch.testing.assert_close(ours.float(), ref.float(), rtol=1e-5, atol=1e-7)
    assert our_grads.keys() == ref_grads.keys() and len(our_grads) > 10
    for name, g in ref_grads.items():
        scale = g.abs().max().item()
        torch.testing.assert_close(our_grads[name], g, rtol=1e-4, atol=1e-4 * scale + 1e-10,
                                   msg=lambda m, n=name: f"gradient of {n}: {m}")


def test_training_lowers_the_loss(example) -> None:
    result = example.main(["--steps", "8", "--examples", "40"])
    losses = result["losses"]
    assert len(losses) == 8 and all(x > 0 for x in losses)
    assert sum(losses[-3:]) / 3 < 0.95 * sum(losses[:3]) / 3, losses


def test_distillation_trainer_patched_loss_equals_trls(example, monkeypatch) -> None:
    """A real DistillationTrainer run (on-policy generation) through patch_distillation_trainer(): on every call
    the trainer makes, our loss, entropy, count and hidden-state gradient equal TRL's on the same inputs."""
    from trl.trainer import distillation_trainer as dt

    from minitron.integrations import trl as mtrl

    original, real = dt._chunked_divergence_loss, mtrl.chunked_divergence_loss
    records = []

    def detached(x):
        return x.detach() if isinstance(x, torch.Tensor) else x

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        kwargs.pop("compute_entropy", None)
        rest = [detached(a) for a in args[1:]]
        kw = {k: detached(v) for k, v in kwargs.items()}
        with torch.enable_grad():
            h_ours = args[0].detach().clone().requires_grad_(True)
            ours = real(h_ours, *rest, **kw)
            ours[0].backward()
            h_ref = args[0].detach().clone().requires_grad_(True)
            ref = original(h_ref, *rest, **kw)
            ref[0].backward()
        records.append((ours, ref, h_ours.grad, h_ref.grad))
        return out

    monkeypatch.setattr(mtrl, "chunked_divergence_loss", spy)
    result = example.main(["--trainer", "distillation", "--steps", "2", "--batch-size", "2",
                           "--max-completion-length", "6", "--examples", "8", "--beta", "0.5"])
    assert dt._chunked_divergence_loss is original  # restored after training
    assert len(records) >= 2 and len(result["losses"]) == 2
    for ours, ref, g_ours, g_ref in records:
        assert int(ours[2]) == int(ref[2]) > 0
        assert ref[0].item() > 1e-3 and ref[1].item() > 1.0
        torch.testing.assert_close(ours[0], ref[0], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(ours[1], ref[1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g_ours, g_ref, rtol=2e-3, atol=2e-3 * g_ref.abs().max().item())
