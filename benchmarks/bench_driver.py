"""End-to-end driver timings on a small Llama built from a config (random weights, random token batches):

* ``importance``: ``minitron.compress.estimate_importance`` (activation importance, block-influence layer
  metric) over the calibration batches;
* ``prune_width``: ``minitron.compress.prune_width`` of a fresh copy of the model (the copy is made untimed) to
  3/4 hidden, 1/2 MLP, 3/4 heads, 3/4 KV groups;
* ``distill_step``: one distillation step of the pruned student against the teacher: the
  ``minitron.train.make_distillation_loss`` loss (fused linear KL), backward, AdamW step.

Providers: ``minitron-<backend>`` (the kernels' backend for the device) against ``minitron-reference`` (the
same driver code on the plain-torch reference ops). Each case reports "unavailable" cleanly when the driver
modules, transformers, or the backend are missing.

Model: hidden 512, MLP 1536, 4 layers, 8 heads / 4 KV heads, vocab 32000, 4 batches of 4 x 256 tokens
(``--quick``: hidden 128, MLP 384, 2 layers, vocab 8000, 2 batches of 2 x 64 tokens). ``--full`` (GPUs):
hidden 2048, MLP 5632, 8 layers, 16/8 heads, vocab 128256, 8 batches of 8 x 1024 tokens.
"""
from __future__ import annotations

import copy
import functools

from benchmarks._harness import BenchConfig, Bench, Case, Unavailable, our_backends

BENCH_PREFIX = "driver"
STAGES = ("importance", "prune_width", "distill_step")


def model_config(cfg: BenchConfig) -> dict:
    if cfg.full and cfg.device.startswith("cuda"):
        return dict(hidden=2048, inter=5632, layers=8, heads=16, kv=8, vocab=128256, batches=8, batch=8, seq=1024)
    if cfg.quick:
        return dict(hidden=128, inter=384, layers=2, heads=8, kv=4, vocab=8000, batches=2, batch=2, seq=64)
    return dict(hidden=512, inter=1536, layers=4, heads=8, kv=4, vocab=32000, batches=4, batch=4, seq=256)


def _imports():
    try:
        import torch  # noqa: F401
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as exc:
        raise Unavailable(f"transformers is not available ({exc})") from exc
    try:
        from minitron.train.distill import DistillConfig, make_distillation_loss
        from minitron.compress import estimate_importance
        from minitron.compress import prune_width
    except ImportError as exc:
        raise Unavailable(f"minitron driver not available ({exc})") from exc
    return LlamaConfig, LlamaForCausalLM, estimate_importance, prune_width, DistillConfig, make_distillation_loss


def _build(shape: dict, device: str):
    import torch

    LlamaConfig, LlamaForCausalLM, *_ = _imports()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["inter"],
                         num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                         num_key_value_heads=shape["kv"], max_position_embeddings=max(2048, shape["seq"]),
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(device).eval()
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(shape["batches"]):
        ids = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), generator=g)
        mask = torch.ones_like(ids)
        mask[0, -shape["seq"] // 8:] = 0  # some padding
        batches.append({"input_ids": ids.to(device), "attention_mask": mask.to(device)})
    return model, batches


def _targets(shape: dict) -> dict:
    return dict(hidden_size=shape["hidden"] * 3 // 4, intermediate_size=shape["inter"] // 2,
                num_attention_heads=shape["heads"] * 3 // 4, num_key_value_heads=shape["kv"] * 3 // 4)


def _setup(case: Case, device: str) -> Bench:
    import torch

    _, _, estimate_importance, prune_width, DistillConfig, make_distillation_loss = _imports()
    backend = case.provider[len("minitron-"):]
    shape = case.shape
    model, batches = _build(shape, device)
    importance = functools.partial(estimate_importance, model, batches, layer_metrics=("block_influence",),
                                   progress=False, backend=backend)
    stage = case.params["stage"]
    if stage == "importance":
        return Bench(fn=importance, keep=[model, batches])
    scores = estimate_importance(model, batches, layer_metrics=("block_influence",), progress=False, backend=backend)
    if stage == "prune_width":
        state: dict = {}

        def prepare() -> None:
            state["m"] = copy.deepcopy(model)

        def fn() -> None:
            prune_width(state.pop("m"), scores, backend=backend, **_targets(shape))

        return Bench(fn=fn, prepare=prepare, keep=[model, batches, scores])
    if stage == "distill_step":
        student = prune_width(copy.deepcopy(model), scores, backend=backend, **_targets(shape)).train()
        teacher = model
        for p in teacher.parameters():
            p.requires_grad_(False)
        loss_fn = make_distillation_loss(teacher, DistillConfig(backend=backend))
        opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
        it = {"i": 0}

        def step() -> None:
            batch = batches[it["i"] % len(batches)]
            it["i"] += 1
            opt.zero_grad(set_to_none=True)
            loss, _ = loss_fn(student, batch)
            loss.backward()
            opt.step()

        return Bench(fn=step, reset=lambda: opt.zero_grad(set_to_none=True), keep=[student, teacher, opt, batches])
    raise Unavailable(f"unknown stage {stage!r}")


def cases(cfg: BenchConfig) -> list[Case]:
    shape = model_config(cfg)
    provs = [f"minitron-{b}" for b in our_backends(cfg.device)] + ["minitron-reference"]
    out = []
    for stage in STAGES:
        for p in provs:
            out.append(Case(bench=f"{BENCH_PREFIX}_{stage}", provider=p, mode="full", shape=dict(shape),
                            dtype="float32", setup=_setup, params={"stage": stage}, reference="minitron-reference",
                            ours=p != "minitron-reference", size=shape["batches"] * shape["batch"] * shape["seq"],
                            size_label="calibration tokens", repeats=3 if cfg.quick else 5,
                            warmup=1, tolerance=1.0))
    return out
