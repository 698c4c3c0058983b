"""Importance under torch.distributed (gloo, 2 and 3 CPU processes): equal to one process, checks, dead ranks.

Each test spawns fresh processes (``spawn`` start method) that rendezvous through a ``file://`` store in the
test's ``tmp_path`` (no TCP port), one thread each, a process-group timeout of 20 s, and always destroy
the process group.
"""
from __future__ import annotations

import os
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from minitron.compress.importance import ImportanceScores, estimate_importance
from minitron.compress.streaming import estimate_importance_streaming
from tests.driver.conftest import BACKEND, make_batches, make_model

FIELDS = ("heads", "kv_groups", "neurons", "channels", "block_influence", "lm_loss_drop")
MOE_FIELDS = ("experts", "expert_frequency", "expert_neurons", "shared_neurons")


def _model(family: str):
    """A tiny model of a dense family (conftest) or of a mixture-of-experts family (test_moe)."""
    if family in ("qwen3_moe", "qwen2_moe", "mixtral"):
        from tests.driver.test_moe import make_moe_model

        return make_moe_model(family)
    return make_model(family)


def _backend(family: str) -> str:
    if family in ("qwen3_moe", "qwen2_moe", "mixtral"):
        from tests.driver.test_moe import IMP_BACKEND

        return IMP_BACKEND
    return BACKEND
PG_TIMEOUT_S = 20
JOIN_TIMEOUT_S = 90


def _run(rank: int, world: int, tmp: str, scenario: str, family: str, n_batches: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    out = Path(tmp)
    code = 0
    try:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world,
                                timeout=timedelta(seconds=PG_TIMEOUT_S))
        try:
            model = _model(family)
            backend = _backend(family)
            batches = make_batches(n=n_batches)
            if scenario.endswith("-cpu-group"):
                # as under NCCL: CPU tensors go through a separate gloo group (created by group_for)
                import minitron.compress.distributed as mdist

                mdist._default_backend = lambda: "nccl"
                scenario = scenario[: -len("-cpu-group")]
            if scenario in ("memory", "streamed"):
                orig = ImportanceScores._save_local

                def spy(self, directory, *, overwrite):
                    (out / f"saved_by_rank{rank}").touch()
                    orig(self, directory, overwrite=overwrite)

                ImportanceScores._save_local = spy
                if scenario == "memory":
                    scores = estimate_importance(model, batches, progress=False, backend=backend)
                else:
                    scores = estimate_importance_streaming(out / "ckpt", batches, progress=False, backend=backend,
                                                           max_hidden_bytes=0 if rank == 1 else None)
                scores.save(out / "scores")
                torch.save({n: getattr(scores, n) for n in FIELDS + MOE_FIELDS} | {"meta": scores.meta},
                           out / f"rank{rank}.pt")
                import minitron.compress.distributed as mdist

                if mdist._CPU_GROUP:
                    (out / f"used_cpu_group_rank{rank}").touch()
            elif scenario == "mismatch":
                msgs = []
                try:  # different arguments
                    estimate_importance(model, batches, progress=False, backend=BACKEND,
                                        seq_agg="max" if rank == 1 else "mean")
                except ValueError as e:
                    msgs.append(str(e))
                try:  # different data (streamed path)
                    estimate_importance_streaming(out / "ckpt", make_batches(n=n_batches, seed=rank), progress=False,
                                                  backend=BACKEND)
                except ValueError as e:
                    msgs.append(str(e))
                (out / f"msgs{rank}.txt").write_text("\n".join(msgs))
            elif scenario == "kill":
                def stream():
                    for i, b in enumerate(batches):
                        if rank == 1 and i == 2:
                            os._exit(3)  # this rank dies mid-run, without any goodbye
                        yield b

                estimate_importance(model, stream(), progress=False, backend=BACKEND)
        finally:
            if rank != 1 or scenario != "kill":
                dist.destroy_process_group()
    except BaseException as e:  # reported to the parent through a file
        (out / f"error{rank}.txt").write_text(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        code = 1
    os._exit(code)


def spawn(world: int, tmp_path: Path, scenario: str, family: str = "llama", n_batches: int = 5) -> list:
    """Start ``world`` processes, wait (bounded) and return their exit codes."""
    ctx = torch.multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_run, args=(r, world, str(tmp_path), scenario, family, n_batches)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
        p.join(5)
    assert not alive, f"{len(alive)} rank(s) still running after {JOIN_TIMEOUT_S} s"
    return [p.exitcode for p in procs]


def errors(tmp_path: Path, world: int) -> str:
    return "\n".join((tmp_path / f"error{r}.txt").read_text() for r in range(world)
                     if (tmp_path / f"error{r}.txt").exists())


@pytest.mark.parametrize("scenario,world,n_batches,family", [
    ("memory", 2, 5, "qwen2"),      # 5 batches over 2 ranks: 3 + 2
    ("memory", 3, 5, "phi3"),       # 2 + 2 + 1
    ("streamed", 2, 5, "llama"),    # rank 1 also spills its hidden states
    ("streamed", 3, 2, "qwen3"),    # rank 2 gets no batch at all
    ("streamed-cpu-group", 2, 3, "mistral"),  # CPU reductions through a gloo subgroup, as under NCCL
    ("memory", 2, 3, "qwen2_moe"),  # expert, expert-neuron and shared-expert accumulators all-reduced
    ("streamed", 2, 3, "mixtral"),
])
def test_equals_single_process(scenario, world, n_batches, family, tmp_path):
    model = _model(family)
    model.save_pretrained(str(tmp_path / "ckpt"), max_shard_size="20KB")
    ref = estimate_importance(model, make_batches(n=n_batches), progress=False, backend=_backend(family))
    codes = spawn(world, tmp_path, scenario, family, n_batches)
    assert codes == [0] * world, errors(tmp_path, world)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for name in FIELDS + MOE_FIELDS:
        if getattr(ref, name) is None:
            assert all(results[r][name] is None for r in range(world)), name
            continue
        for r in range(world):
            got = results[r][name]
            torch.testing.assert_close(got, getattr(ref, name), rtol=1e-5, atol=1e-6, msg=f"{name} rank {r}")
            assert torch.equal(got, results[0][name]), f"ranks 0 and {r} disagree on {name}"
    for key in ("num_samples", "num_tokens", "num_batches"):
        assert results[0]["meta"][key] == ref.meta[key], key
    assert results[0]["meta"]["world_size"] == world
    used = sorted(p.name for p in tmp_path.glob("used_cpu_group_rank*"))
    assert used == ([f"used_cpu_group_rank{r}" for r in range(world)] if "cpu-group" in scenario else [])
    # only rank 0 wrote; every rank returned after the files were in place
    assert sorted(p.name for p in tmp_path.glob("saved_by_rank*")) == ["saved_by_rank0"]
    saved = ImportanceScores.load(tmp_path / "scores")
    assert torch.equal(saved.heads, results[0]["heads"])


def test_mismatched_arguments_and_data_are_named(tmp_path):
    make_model("llama").save_pretrained(str(tmp_path / "ckpt"))
    codes = spawn(2, tmp_path, "mismatch", n_batches=3)
    assert codes == [0, 0], errors(tmp_path, 2)
    for r in range(2):
        msgs = (tmp_path / f"msgs{r}.txt").read_text().splitlines()
        assert len(msgs) == 2, msgs
        assert "seq_agg: rank 0 has 'mean', rank 1 has 'max'" in msgs[0]
        assert "calibration data" in msgs[1]


def test_dead_rank_fails_the_others_within_the_timeout(tmp_path):
    t0 = time.monotonic()
    codes = spawn(2, tmp_path, "kill", n_batches=5)
    elapsed = time.monotonic() - t0
    assert codes[1] == 3
    assert codes[0] == 1
    err = (tmp_path / "error0.txt").read_text()
    assert "DistributedImportanceError" in err and "another rank probably died" in err, err
    assert elapsed < JOIN_TIMEOUT_S


TORCHRUN_SCRIPT = """
import sys
import torch
from minitron.compress.distributed import init_from_env, shutdown, rank_info
from minitron.compress.streaming import estimate_importance_streaming
from tests.driver.conftest import make_batches, BACKEND

info = init_from_env(timeout_s=30, threads_per_rank=1)
assert info.world == 2, info
try:
    scores = estimate_importance_streaming(sys.argv[1], make_batches(n=3), progress=False, backend=BACKEND)
    scores.save(sys.argv[2])
    torch.save(scores.heads, f"{sys.argv[2]}.rank{info.rank}.pt")
finally:
    shutdown()
"""


def test_torchrun_launch(tmp_path):
    """The way the CLI runs under ``torchrun``: init_from_env, estimate, rank-0 save, shutdown."""
    import subprocess
    import sys

    model = make_model("mistral")
    model.save_pretrained(str(tmp_path / "ckpt"))
    ref = estimate_importance(model, make_batches(n=3), progress=False, backend=BACKEND)
    script = tmp_path / "run.py"
    script.write_text(TORCHRUN_SCRIPT)
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), str(tmp_path / "ckpt"), str(tmp_path / "out")],
                          cwd=root, env=env, capture_output=True, text=True, timeout=JOIN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = ImportanceScores.load(tmp_path / "out")
    torch.testing.assert_close(saved.heads, ref.heads, rtol=1e-5, atol=1e-6)
    assert saved.meta["world_size"] == 2
    for r in range(2):
        assert torch.equal(torch.load(tmp_path / f"out.rank{r}.pt"), saved.heads)


def test_init_from_env_without_torchrun(monkeypatch):
    """Not launched by torchrun (WORLD_SIZE unset or 1): nothing is initialised, rank 0 of 1."""
    import torch.distributed as dist

    from minitron.compress.distributed import init_from_env, rank_info, shutdown

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_from_env() == rank_info() and rank_info().world == 1 and not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_from_env().world == 1 and not dist.is_initialized()
    shutdown()  # no-op
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="timeout_s"):
        init_from_env(timeout_s=0)
    with pytest.raises(ValueError, match="backend"):
        init_from_env(backend="mpi")
