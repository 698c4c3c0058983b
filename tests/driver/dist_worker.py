"""One rank of a multi-process training test (launched by tests/driver/test_distributed_train.py).

Usage: ``python dist_worker.py SPEC.json RANK`` (or ``torchrun ... dist_worker.py SPEC.json env``). The spec (JSON) says what to run; the process group is
initialised through a ``file://`` store in the test's tmp_path (no TCP port). Rank 0 writes ``result.json``
(and ``final.pt``: the student's state dict after training) into ``spec["out"]``.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)


def tiny_llama(vocab: int, hidden: int, layers: int, seed: int, tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).float()


def make_data(n: int, seq: int, vocab: int, seed: int):
    from minitron.io.data import PackedDataset

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, seq), generator=g)
    return PackedDataset(ids, torch.ones_like(ids), f"random seed {seed}")


def build(spec: dict):
    vocab = spec.get("vocab", 64)
    teacher = tiny_llama(vocab, 32, spec.get("teacher_layers", 3), seed=1, tie=False).eval()
    student = tiny_llama(vocab, 32, spec.get("student_layers", 2), seed=2, tie=spec.get("tie", True))
    data = make_data(spec.get("n", 48), spec.get("seq", 16), vocab, spec.get("data_seed", 0))
    return teacher, student, data


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    from_env = sys.argv[2] == "env"  # launched by torchrun: distributed_session() creates the group
    rank = int(os.environ["RANK"]) if from_env else int(sys.argv[2])
    world = int(os.environ["WORLD_SIZE"]) if from_env else int(spec["world"])
    logging.basicConfig(level=logging.WARNING, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    import torch.distributed as dist

    from minitron.train import DistillConfig, TrainConfig, distill_model
    from minitron.train.distributed import distributed_session

    if not from_env and (spec.get("strategy") is not None or world > 1):
        dist.init_process_group("gloo", init_method=f"file://{spec['init_file']}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=spec.get("timeout", 30)))
    out = Path(spec["out"])
    rank_spec = dict(spec, **spec.get("per_rank", {}).get(str(rank), {}))
    try:
        with distributed_session(timeout=spec.get("timeout", 30)):
            teacher, student, data = build(rank_spec)
            if spec.get("task") == "grads":
                return grads(spec, rank, world, teacher, student, data)
            cfg = TrainConfig(steps=spec.get("steps", 6), batch_size=spec["batch_size"],
                              grad_accum=spec.get("grad_accum", 1), lr=5e-3, warmup_steps=2,
                              save_every=spec.get("save_every", 0), seed=0, strategy=spec.get("strategy"),
                              compile=spec.get("compile", False), max_grad_norm=1.0)
            sleep = float(spec.get("step_sleep", 0))
            callbacks = [lambda step, rec: time.sleep(sleep)] if sleep else []
            if spec.get("compile"):
                import torch._dynamo as _dynamo

                _dynamo.utils.counters.clear()
            eval_data = make_data(8, spec.get("seq", 16), spec.get("vocab", 64), 99) if spec.get("eval") else None
            if spec.get("task") == "correct":
                from minitron.train import correct_model

                res = correct_model(student, data, cfg, out, eval_data=eval_data, resume=spec.get("resume", False),
                                    callbacks=callbacks)
            else:
                res = distill_model(student, teacher, data, cfg,
                                    DistillConfig(mode="forward", temperature=1.5, backend=spec.get("backend", "auto")),
                                    out, eval_data=eval_data, resume=spec.get("resume", False), callbacks=callbacks)
            if rank == 0:
                result = {"losses": [[s, l] for s, l in res.train_losses], "resumed_from": res.resumed_from,
                          "extra": res.extra, "kl": [r.get("kl") for r in res.history if r.get("type") == "train"],
                          "tokens": [r.get("tokens") for r in res.history if r.get("type") == "train"],
                          "evals": [[r["step"], r["eval_loss"]] for r in res.history if r.get("type") == "eval"]}
                if spec.get("compile"):
                    import torch._dynamo as _dynamo

                    c = _dynamo.utils.counters
                    result["graph_breaks"] = sum(c["graph_break"].values())
                    result["graph_break_reasons"] = [str(k)[:300] for k in c["graph_break"]]
                    result["frames"] = dict(c["stats"])
                torch.save(student.state_dict(), out / "final.pt")
                (out / "result.json").write_text(json.dumps(result))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def grads(spec: dict, rank: int, world: int, teacher, student, data) -> int:
    """Loss and full gradients of one FSDP2 forward/backward of the distillation loss on this rank's slice."""
    from minitron.train import DistillConfig, make_distillation_loss
    from minitron.train.distributed import LossModule, frozen_copy_sharded, shard_fsdp2

    b = spec["batch_size"]
    loss_fn = make_distillation_loss(teacher, DistillConfig(mode=spec.get("mode", "forward"), temperature=1.5,
                                                            backend=spec.get("backend", "auto")))
    batch = data.select(range(rank * b, (rank + 1) * b))
    loss_fn = loss_fn.with_frozen_models({"teacher": frozen_copy_sharded(teacher)})
    root = LossModule(student, loss_fn)
    shard_fsdp2(student, root=root)
    loss, _ = root(batch)
    loss.backward()
    import torch.distributed as dist

    lt = loss.detach().clone()
    dist.all_reduce(lt)
    full = {n: p.grad.full_tensor() for n, p in student.named_parameters() if p.grad is not None}
    head_type = type(student.lm_head.weight).__name__
    if rank == 0:
        torch.save({"loss": float(lt) / world, "grads": full, "head_param_type": head_type},
                   Path(spec["out"]) / "grads.pt")
    return 0


if __name__ == "__main__":
    try:
        code = main()
    except Exception as e:  # one clear line for the test to read
        print(f"WORKER-ERROR {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise
    # The results are written and the process group destroyed. Skip the interpreter's teardown: on a loaded
    # machine a C++ static destructor (a still-joinable gloo/autograd thread) occasionally aborted the exit
    # ("terminate called without an active exception", 1 run in ~20), failing a run whose work was done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code or 0))
