"""The LM-loss-drop depth metric's token budget (``depth_max_tokens`` / ``--depth-max-tokens``)."""
from __future__ import annotations

import logging

import pytest
import torch

from minitron.cli import main
from minitron.compress.importance import (DEPTH_MIN_TOKENS, depth_batch_count, depth_token_budget,
                                          estimate_importance)
from minitron.compress.streaming import estimate_importance_streaming
from minitron.specs import ImportanceSpec
from tests.driver.conftest import BACKEND, make_batches, make_model
from tests.driver.test_streamed_importance import assert_same_scores, save

TOKENS_PER_BATCH = 40  # make_batches(): 3 rows of 16, the last right-padded to 8 real tokens


def test_default_budget_rule():
    assert DEPTH_MIN_TOKENS == 4096
    assert depth_token_budget(None, 32768, 30) == 4096  # the floor
    assert depth_token_budget(None, 300_000, 30) == 10_000  # tokens / layers
    assert depth_token_budget(None, 300_001, 30) == 10_001  # rounded up
    assert depth_token_budget(None, 100, 4) == 4096
    assert depth_token_budget(123, 10 ** 9, 30) == 123  # an explicit budget wins
    assert depth_batch_count([40, 40, 40], 85) == 2
    assert depth_batch_count([40, 40, 40], 80) == 2
    assert depth_batch_count([40, 40, 40], 10 ** 6) == 3
    assert depth_batch_count([100, 40], 50) == 1  # always at least one batch
    assert depth_batch_count([40, 100, 10], 60) == 1  # a prefix, not a selection


def test_flag_in_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["importance", "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--depth-max-tokens" in out
    assert "calibration tokens / num_layers, at least 4096" in out


@pytest.mark.parametrize("bad", [0, -5, 1.5, True])
def test_bad_budget_refused(bad, capsys):
    with pytest.raises(ValueError, match="--depth-max-tokens"):
        ImportanceSpec(depth_max_tokens=bad)
    with pytest.raises(ValueError, match="--depth-max-tokens"):
        estimate_importance(make_model("llama"), make_batches(n=1), progress=False, backend=BACKEND,
                            depth_max_tokens=bad)
    if isinstance(bad, int) and not isinstance(bad, bool):
        rc = main(["importance", "--model", "m", "--data", "d", "--output", "o", "--depth-max-tokens", str(bad)])
        assert rc != 0
        assert "--depth-max-tokens" in capsys.readouterr().err


def test_budget_equals_run_on_cut_data(caplog):
    """Depth scores under a budget equal those of a run whose calibration data is cut to the budgeted batches;
    the width scores still use every batch."""
    model = make_model("llama")
    batches = make_batches(n=4)
    with caplog.at_level(logging.INFO, logger="minitron"):
        got = estimate_importance(model, batches, progress=False, backend=BACKEND,
                                  depth_max_tokens=2 * TOKENS_PER_BATCH + 5)
    cut = estimate_importance(model, batches[:2], progress=False, backend=BACKEND)
    full = estimate_importance(model, batches, progress=False, backend=BACKEND)
    assert torch.equal(got.lm_loss_drop, cut.lm_loss_drop)
    assert got.meta["base_lm_loss"] == cut.meta["base_lm_loss"]
    assert not torch.equal(got.lm_loss_drop, full.lm_loss_drop)
    for name in ("heads", "neurons", "channels", "block_influence"):
        assert torch.equal(getattr(got, name), getattr(full, name)), name
    assert got.meta["num_batches"] == 4 and got.meta["num_tokens"] == 4 * TOKENS_PER_BATCH
    assert (got.meta["depth_num_batches"], got.meta["depth_num_tokens"]) == (2, 2 * TOKENS_PER_BATCH)
    assert got.meta["depth_max_tokens"] == 2 * TOKENS_PER_BATCH + 5
    # the default budget (the floor here) covers all of these small batches
    assert (full.meta["depth_num_batches"], full.meta["depth_num_tokens"]) == (4, 4 * TOKENS_PER_BATCH)
    assert full.meta["depth_max_tokens"] == DEPTH_MIN_TOKENS
    text = caplog.text
    assert "depth (LM-loss drop) scores, in-memory: 4 layers on the first 2 of 4 calibration batches" in text
    assert "4 full forward passes" in text


def test_budget_smaller_than_one_batch_uses_one():
    model = make_model("qwen3")
    batches = make_batches(n=2)
    got = estimate_importance(model, batches, progress=False, backend=BACKEND, depth_max_tokens=1)
    cut = estimate_importance(model, batches[:1], progress=False, backend=BACKEND)
    assert torch.equal(got.lm_loss_drop, cut.lm_loss_drop)
    assert (got.meta["depth_num_batches"], got.meta["depth_num_tokens"]) == (1, TOKENS_PER_BATCH)


def test_no_depth_meta_without_lm_loss():
    got = estimate_importance(make_model("llama"), make_batches(n=2), progress=False, backend=BACKEND,
                              layer_metrics=("block_influence",), depth_max_tokens=10)
    assert got.lm_loss_drop is None and "depth_num_batches" not in got.meta


def test_streamed_equals_in_memory_with_budget(tmp_path, caplog):
    model = make_model("llama")
    ckpt = save(model, tmp_path / "ckpt", False)
    batches = make_batches(n=3)
    budget = 2 * TOKENS_PER_BATCH
    ref = estimate_importance(model, batches, progress=False, backend=BACKEND, depth_max_tokens=budget)
    with caplog.at_level(logging.INFO, logger="minitron"):
        got = estimate_importance_streaming(ckpt, batches, progress=False, backend=BACKEND, depth_max_tokens=budget)
    assert_same_scores(ref, got)
    for key in ("depth_num_batches", "depth_num_tokens", "depth_max_tokens"):
        assert got.meta[key] == ref.meta[key], key
    assert got.meta["depth_num_batches"] == 2
    assert "streamed: 4 layers on the first 2 of 3 calibration batches" in caplog.text
    assert "10 layer passes per batch, 20 in all" in caplog.text


def test_meta_saved(tmp_path):
    from minitron.compress.importance import ImportanceScores

    got = estimate_importance(make_model("llama"), make_batches(n=3), progress=False, backend=BACKEND,
                              depth_max_tokens=TOKENS_PER_BATCH)
    got.save(tmp_path / "imp")
    back = ImportanceScores.load(tmp_path / "imp")
    assert (back.meta["depth_num_batches"], back.meta["depth_num_tokens"]) == (1, TOKENS_PER_BATCH)


def _dist_rank(rank: int, world: int, tmp: str, streamed: bool, budget: int) -> None:
    import os
    import traceback
    from datetime import timedelta
    from pathlib import Path

    import torch.distributed as dist

    torch.set_num_threads(1)
    out, code = Path(tmp), 0
    try:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        try:
            kw = dict(progress=False, backend=BACKEND, depth_max_tokens=budget)
            if streamed:
                s = estimate_importance_streaming(out / "ckpt", make_batches(n=5), **kw)
            else:
                s = estimate_importance(make_model("llama"), make_batches(n=5), **kw)
            torch.save({"lm_loss_drop": s.lm_loss_drop, "meta": s.meta}, out / f"rank{rank}.pt")
        finally:
            dist.destroy_process_group()
    except BaseException as e:
        (out / f"error{rank}.txt").write_text(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        code = 1
    os._exit(code)


@pytest.mark.parametrize("streamed", [False, True], ids=["memory", "streamed"])
def test_distributed_budget_is_global(streamed, tmp_path):
    """Under torch.distributed the depth batches are the first K global batches (spread over the ranks)."""
    model = make_model("llama")
    model.save_pretrained(str(tmp_path / "ckpt"))
    budget = 3 * TOKENS_PER_BATCH  # global batches 0, 1, 2: rank 0 runs 0 and 2, rank 1 runs 1
    ref = estimate_importance(model, make_batches(n=5), progress=False, backend=BACKEND, depth_max_tokens=budget)
    ctx = torch.multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_dist_rank, args=(r, 2, str(tmp_path), streamed, budget)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    errs = "\n".join(f.read_text() for f in tmp_path.glob("error*.txt"))
    assert not alive and [p.exitcode for p in procs] == [0, 0], errs
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        torch.testing.assert_close(got["lm_loss_drop"], ref.lm_loss_drop, rtol=1e-5, atol=1e-6)
        assert got["meta"]["base_lm_loss"] == pytest.approx(ref.meta["base_lm_loss"], rel=1e-6)
        assert (got["meta"]["depth_num_batches"], got["meta"]["depth_num_tokens"]) == (3, 3 * TOKENS_PER_BATCH)
