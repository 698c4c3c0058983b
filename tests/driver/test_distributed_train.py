"""Distillation under torch.distributed (gloo, CPU, 2 processes): DDP and FSDP2 against one process,
sharded checkpoints and resume after a SIGKILL, failure behaviour, torch.compile under DDP.

Every multi-process run is a set of ``tests/driver/dist_worker.py`` processes rendezvousing through a
``file://`` store in tmp_path (no TCP port), with a process-group timeout of at most 20 s.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import torch

from tests.driver.conftest import BACKEND

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("dist_worker.py")
TIMEOUT_S = 20  # process-group timeout in the workers

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")


def _worker_module():
    spec = importlib.util.spec_from_file_location("_dist_worker", WORKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def launch(tmp_path: Path, name: str, spec: Dict[str, Any], world: int) -> List[subprocess.Popen]:
    out = Path(spec.get("out") or tmp_path / name)
    out.mkdir(parents=True, exist_ok=True)
    full = {"backend": BACKEND, "timeout": TIMEOUT_S, **spec, "world": world, "out": str(out),
            "init_file": str(tmp_path / f"{name}.init")}
    spec_path = tmp_path / f"{name}.json"
    spec_path.write_text(json.dumps(full))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return [subprocess.Popen([sys.executable, str(WORKER), str(spec_path), str(r)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]


def finish(procs: List[subprocess.Popen], timeout: float = 120) -> List[Tuple[int, str]]:
    deadline = time.time() + timeout
    res = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError("a worker did not finish in time")
        res.append((p.returncode, err))
    return res


def run(tmp_path: Path, name: str, spec: Dict[str, Any], world: int) -> Dict[str, Any]:
    res = finish(launch(tmp_path, name, spec, world))
    for r, (rc, err) in enumerate(res):
        assert rc == 0, f"rank {r} failed:\n{err[-3000:]}"
    return json.loads((Path(spec.get("out") or tmp_path / name) / "result.json").read_text())


def single_process(tmp_path: Path, spec: Dict[str, Any], evals: list | None = None
                   ) -> Tuple[List[List[float]], Dict[str, torch.Tensor]]:
    """The same distillation (or correction) in this process (no process group), global batch in one piece."""
    from minitron.train import DistillConfig, TrainConfig, correct_model, distill_model

    w = _worker_module()
    teacher, student, data = w.build(spec)
    eval_data = w.make_data(8, spec.get("seq", 16), spec.get("vocab", 64), 99) if spec.get("eval") else None
    cfg = TrainConfig(steps=spec.get("steps", 6), batch_size=spec["batch_size"], grad_accum=spec.get("grad_accum", 1),
                      lr=5e-3, warmup_steps=2, seed=0, max_grad_norm=1.0)
    if spec.get("task") == "correct":
        res = correct_model(student, data, cfg, tmp_path / "single", eval_data=eval_data)
    else:
        res = distill_model(student, teacher, data, cfg,
                            DistillConfig(mode="forward", temperature=1.5, backend=BACKEND), tmp_path / "single",
                            eval_data=eval_data)
    if evals is not None:
        evals.extend([r["step"], r["eval_loss"]] for r in res.history if r.get("type") == "eval")
    return [[s, l] for s, l in res.train_losses], student.state_dict()


def assert_curves_equal(got: List[List[float]], want: List[List[float]], rtol: float = 2e-4) -> None:
    assert [s for s, _ in got] == [s for s, _ in want]
    for (s, a), (_, b) in zip(got, want):
        assert abs(a - b) <= rtol * abs(b) + 1e-6, (s, a, b)


def test_sharded_batch_stream_takes_contiguous_slices():
    from minitron.io.data import PackedDataset
    from minitron.train.distributed import ShardedBatchStream

    ids = torch.arange(40).view(10, 4)
    data = PackedDataset(ids, torch.ones_like(ids))
    ref = data.stream(4, seed=3)
    shards = [ShardedBatchStream(data.stream(4, seed=3), r, 2) for r in range(2)]
    for _ in range(5):  # crosses an epoch boundary (2 batches of 4 per epoch)
        g = next(ref)
        parts = [next(s) for s in shards]
        for k in g:
            assert torch.equal(torch.cat([p[k] for p in parts]), g[k])
    assert shards[1].state_dict() == ref.state_dict()
    with pytest.raises(ValueError, match="world_size=3"):
        ShardedBatchStream(data.stream(4), 0, 3)


def test_helpers_without_a_process_group():
    from minitron.train.distributed import all_reduce_mean, broadcast_from_main, is_main_process, rank_and_world

    assert rank_and_world() == (0, 1) and is_main_process()
    assert broadcast_from_main({"a": 1}) == {"a": 1}
    assert all_reduce_mean([1.5, 2.0], torch.device("cpu")) == [1.5, 2.0]


def test_strategy_needs_a_process_group():
    from minitron.train import TrainConfig
    from minitron.train.distributed import resolve_strategy

    assert resolve_strategy(None) is None
    with pytest.raises(ValueError, match="torchrun"):
        resolve_strategy("fsdp2")
    with pytest.raises(ValueError, match="strategy"):
        TrainConfig(strategy="zero3")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_ranks_follow_the_single_process_loss_curve(strategy, tmp_path):
    spec = {"steps": 5, "batch_size": 4, "grad_accum": 2, "strategy": strategy, "save_every": 2, "eval": True}
    want_evals: list = []
    want, want_state = single_process(tmp_path, dict(spec, batch_size=8), want_evals)
    got = run(tmp_path, "run", spec, world=2)
    assert_curves_equal(got["losses"], want)
    assert len(want_evals) == 1
    assert_curves_equal(got["evals"], want_evals)  # evaluation (FSDP2: the root group gathered) too
    assert got["extra"] == {"strategy": strategy, "world_size": 2}
    # the final student (gathered to rank 0 under FSDP2) equals the single-process one
    state = torch.load(tmp_path / "run" / "final.pt", weights_only=True)
    assert set(state) == set(want_state)
    for k, v in want_state.items():
        assert type(state[k]) is torch.Tensor and torch.allclose(state[k], v, rtol=1e-3, atol=1e-5), k
    # only rank 0 wrote the shared files; each rank its own RNG file; the checkpoint layout per strategy
    out = tmp_path / "run"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "final.pt", "log.jsonl", "loss.png", "result.json"]
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["latest", "step-00000004", "step-00000005"]
    files = sorted(p.name for p in (out / "checkpoints" / "step-00000005").iterdir())
    if strategy == "ddp":
        assert files == ["model.pt", "optimizer.pt", "rng-rank1.pt", "rng.pt", "scheduler.pt", "state.json"]
    else:
        assert files == ["dcp", "rng-rank1.pt", "rng.pt", "scheduler.pt", "state.json"]
        assert len(list((out / "checkpoints" / "step-00000005" / "dcp").glob("*.distcp"))) == 2


def test_fsdp2_fused_kl_loss_and_gradients_equal_single_process(tmp_path):
    from minitron.train import DistillConfig, make_distillation_loss

    spec = {"task": "grads", "batch_size": 3, "tie": False}
    run_res = finish(launch(tmp_path, "grads", spec, world=2))
    for r, (rc, err) in enumerate(run_res):
        assert rc == 0, f"rank {r} failed:\n{err[-3000:]}"
    got = torch.load(tmp_path / "grads" / "grads.pt", weights_only=True)
    assert got["head_param_type"] == "DTensor"  # the head weight really was sharded outside the forward
    teacher, student, data = _worker_module().build(spec)
    loss_fn = make_distillation_loss(teacher, DistillConfig(mode="forward", temperature=1.5, backend=BACKEND))
    loss, _ = loss_fn(student, data.select(range(6)))
    loss.backward()
    loss = loss.detach()
    assert abs(got["loss"] - loss.item()) <= 1e-5 * abs(loss.item())
    want = {n: p.grad for n, p in student.named_parameters()}
    assert set(got["grads"]) == set(want)
    for n, g in want.items():
        assert torch.allclose(got["grads"][n], g, rtol=1e-4, atol=1e-6), n


def _wait_for_step(log_path: Path, step: int, procs: List[subprocess.Popen], timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log_path.is_file():
            steps = [json.loads(line)["step"] for line in log_path.read_text().splitlines() if line.strip().endswith("}")]
            if steps and max(steps) >= step:
                return
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a worker exited early: {[p.poll() for p in procs]}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_sigkill_of_a_rank_fails_the_other_then_resume_continues_the_curve(strategy, tmp_path):
    spec = {"steps": 8, "batch_size": 4, "strategy": strategy, "save_every": 2, "step_sleep": 0.3}
    want, _ = single_process(tmp_path, dict(spec, batch_size=8))
    procs = launch(tmp_path, "run", spec, world=2)
    _wait_for_step(tmp_path / "run" / "log.jsonl", 5, procs)
    t_kill = time.time()
    os.kill(procs[1].pid, signal.SIGKILL)
    (rc0, err0), (rc1, _) = finish(procs, timeout=TIMEOUT_S + 40)
    assert rc1 == -signal.SIGKILL
    assert rc0 != 0 and time.time() - t_kill < TIMEOUT_S + 40
    assert "DistributedError" in err0 and "another rank died" in err0, err0[-2000:]
    # resume: the same loss curve as the uninterrupted (single-process) run
    got = run(tmp_path, "resume", dict(spec, resume=True, out=str(tmp_path / "run"), step_sleep=0), world=2)
    assert got["resumed_from"] in (4, 6)
    assert_curves_equal(got["losses"], want)
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))


def test_ddp_resumes_in_one_process_with_the_same_global_batch(tmp_path):
    spec = {"steps": 6, "batch_size": 4, "strategy": "ddp", "save_every": 3}
    want, _ = single_process(tmp_path, dict(spec, batch_size=8))
    run(tmp_path, "run", spec, world=2)
    import shutil

    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-00000006")  # as if killed after step 3's checkpoint
    # resume the 2-rank DDP run in one process with the same global batch (8)
    from minitron.train import DistillConfig, TrainConfig, distill_model

    w = _worker_module()
    teacher, student, data = w.build(spec)
    cfg = TrainConfig(steps=6, batch_size=8, lr=5e-3, warmup_steps=2, seed=0, max_grad_norm=1.0, save_every=3)
    res = distill_model(student, teacher, data, cfg, DistillConfig(mode="forward", temperature=1.5, backend=BACKEND),
                        tmp_path / "run", resume=True)
    assert res.resumed_from == 3
    assert_curves_equal([[s, l] for s, l in res.train_losses], want)


def test_resume_checks_world_size_and_global_batch(tmp_path):
    from minitron.train import TrainConfig
    from minitron.train.loop import _check_resumable

    old = {"config": TrainConfig(batch_size=4, strategy="fsdp2").to_dict(), "world_size": 2, "strategy": "fsdp2"}
    with pytest.raises(ValueError, match="world size 2, this run has world size 1"):
        _check_resumable(old, TrainConfig(batch_size=8, strategy="fsdp2"), {}, tmp_path, world_size=1, strategy="fsdp2")
    with pytest.raises(ValueError, match="strategy 'fsdp2'"):
        _check_resumable(old, TrainConfig(batch_size=4), {}, tmp_path, world_size=2, strategy="ddp")
    old = {"config": TrainConfig(batch_size=4).to_dict(), "world_size": 2, "strategy": "ddp"}
    _check_resumable(old, TrainConfig(batch_size=8), {}, tmp_path, world_size=1, strategy=None)
    _check_resumable(old, TrainConfig(batch_size=2), {}, tmp_path, world_size=4, strategy="ddp")
    with pytest.raises(ValueError, match="use batch_size 8"):
        _check_resumable(old, TrainConfig(batch_size=4), {}, tmp_path, world_size=1, strategy=None)
    # a checkpoint written before the strategy/compile fields existed still resumes
    legacy = {"config": {k: v for k, v in TrainConfig().to_dict().items() if k not in ("strategy", "compile")}}
    _check_resumable(legacy, TrainConfig(), {}, tmp_path)


def test_mismatched_data_across_ranks_is_an_error_naming_it(tmp_path):
    spec = {"steps": 2, "batch_size": 4, "strategy": "ddp", "per_rank": {"1": {"data_seed": 7}}}
    res = finish(launch(tmp_path, "run", spec, world=2))
    for rc, err in res:
        assert rc != 0
        assert "argument 'data' differs across ranks" in err, err[-2000:]
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_compiled_student_under_ddp_has_no_graph_breaks(tmp_path):
    # aot_eager: dynamo + AOT autograd (what graph breaks depend on) without inductor's slow C++ codegen
    spec = {"steps": 2, "batch_size": 4, "strategy": "ddp", "compile": "aot_eager", "teacher_layers": 1,
            "student_layers": 1}
    want, _ = single_process(tmp_path, dict(spec, batch_size=8))
    got = run(tmp_path, "run", spec, world=2)
    assert got["graph_breaks"] == 0, got["graph_break_reasons"]
    assert got["frames"].get("unique_graphs", 0) >= 1
    assert_curves_equal(got["losses"], want, rtol=1e-3)


def test_torchrun_with_distributed_session_picks_ddp(tmp_path):
    """A real torchrun launch (standalone rendezvous on a free port): distributed_session() creates the group
    from the environment and train() without a strategy uses DDP."""
    spec = {"steps": 3, "batch_size": 4, "backend": BACKEND, "timeout": TIMEOUT_S, "out": str(tmp_path / "run")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(WORKER), str(tmp_path / "spec.json"), "env"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((tmp_path / "run" / "result.json").read_text())
    assert got["extra"] == {"strategy": "ddp", "world_size": 2}
    want, _ = single_process(tmp_path, dict(spec, batch_size=8))
    assert_curves_equal(got["losses"], want)


def test_a_hung_rank_makes_the_other_fail_at_the_process_group_timeout(tmp_path):
    """SIGSTOP (the peer's sockets stay open): only the process-group timeout can end the wait."""
    timeout = 8
    procs = launch(tmp_path, "run", {"steps": 40, "batch_size": 4, "strategy": "ddp", "step_sleep": 0.2,
                                     "timeout": timeout}, world=2)
    try:
        _wait_for_step(tmp_path / "run" / "log.jsonl", 2, procs)
        t_stop = time.time()
        os.kill(procs[1].pid, signal.SIGSTOP)
        _, err0 = procs[0].communicate(timeout=timeout + 30)
        waited = time.time() - t_stop
    finally:
        procs[1].kill()
        procs[1].communicate()
    assert procs[0].returncode != 0
    assert timeout - 1 <= waited <= timeout + 30, waited
    assert "DistributedError" in err0 and "process-group timeout" in err0, err0[-2000:]


def test_teacher_correction_under_fsdp2_follows_the_single_process_curve(tmp_path):
    spec = {"task": "correct", "steps": 3, "batch_size": 4, "strategy": "fsdp2"}
    want, _ = single_process(tmp_path, dict(spec, batch_size=8))
    got = run(tmp_path, "run", spec, world=2)
    assert_curves_equal(got["losses"], want)
