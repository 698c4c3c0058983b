"""Layer-streamed importance (minitron.compress.streaming) equals the in-memory path, on every family."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from minitron.compress.importance import estimate_importance
from minitron.compress.streaming import (CheckpointReader, choose_compute_dtype, estimate_importance_streaming,
                                         should_stream)
from tests.driver.conftest import BACKEND, make_batches, make_model

FIELDS = ("heads", "kv_groups", "neurons", "channels", "block_influence", "lm_loss_drop")


def assert_same_scores(ref, got, *, exact: bool = True) -> None:
    for name in FIELDS:
        a, b = getattr(ref, name), getattr(got, name)
        assert (a is None) == (b is None), name
        if a is None:
            continue
        if exact:
            assert torch.equal(a, b), f"{name}: max |diff| {(a - b).abs().max().item()}"
        else:
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)
    for key in ("num_samples", "num_tokens", "num_batches", "base_lm_loss", "shape_signature", "config_fingerprint"):
        assert ref.meta[key] == got.meta[key], key


def save(model, path: Path, shards: bool) -> Path:
    model.save_pretrained(str(path), max_shard_size="20KB" if shards else "5GB")
    has_index = (path / "model.safetensors.index.json").is_file()
    assert has_index == shards
    if shards:
        files = set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values())
        assert len(files) > 4
    return path


@pytest.mark.parametrize("shards", [False, True], ids=["one-file", "sharded"])
def test_streamed_equals_in_memory(family, shards, tmp_path):
    """Bitwise equality (same kernels, same per-accumulator order), with the exact LM-loss-drop scores."""
    model = make_model(family)
    ckpt = save(model, tmp_path / "ckpt", shards)
    batches = make_batches(n=3)
    ref = estimate_importance(model, batches, progress=False, backend=BACKEND)
    got = estimate_importance_streaming(ckpt, batches, progress=False, backend=BACKEND)
    assert got.meta["streamed"] is True and got.meta["hidden_states_spilled"] is False
    assert_same_scores(ref, got)
    assert got.lm_loss_drop is not None and bool(torch.isfinite(got.lm_loss_drop).all())


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
def test_spilled_hidden_states_tied_embeddings(family, tmp_path):
    """max_hidden_bytes=0 forces the memory-mapped spill files; they are removed afterwards."""
    model = make_model(family, tie=True)
    ckpt = save(model, tmp_path / "ckpt", True)
    spill = tmp_path / "spill"
    spill.mkdir()
    batches = make_batches(n=2) + make_batches(n=1, seq=11, batch=2, seed=3)  # batches of different shapes
    ref = estimate_importance(model, batches, progress=False, backend=BACKEND)
    seen = []
    orig = torch.from_file

    def spy(path, *a, **k):
        seen.append(path)
        return orig(path, *a, **k)

    torch.from_file = spy
    try:
        got = estimate_importance_streaming(ckpt, batches, progress=False, backend=BACKEND, spill_dir=spill,
                                            max_hidden_bytes=0)
    finally:
        torch.from_file = orig
    assert got.meta["hidden_states_spilled"] is True
    assert seen and all(str(p).startswith(str(spill)) for p in seen)
    assert list(spill.iterdir()) == []  # cleaned up
    assert_same_scores(ref, got)


def test_block_influence_only_and_aggregations(tmp_path):
    model = make_model("qwen3")
    ckpt = save(model, tmp_path / "ckpt", False)
    batches = [{"input_ids": b["input_ids"]} for b in make_batches(n=2, pad=False)]  # no attention mask
    for seq_agg, batch_agg in (("max", "var"), ("l2", "mean")):
        kw = dict(seq_agg=seq_agg, batch_agg=batch_agg, layer_metrics=("block_influence",), progress=False,
                  backend=BACKEND, max_batches=1)
        ref = estimate_importance(model, batches, **kw)
        got = estimate_importance_streaming(ckpt, batches, **kw)
        assert got.lm_loss_drop is None and got.meta["num_batches"] == 1
        assert_same_scores(ref, got)


def test_bf16_checkpoint_computed_in_fp32(tmp_path):
    """A bf16 checkpoint streamed in fp32 equals the in-memory model loaded from it in fp32."""
    from transformers import AutoModelForCausalLM

    model = make_model("mistral").to(torch.bfloat16)
    ckpt = save(model, tmp_path / "ckpt", True)
    loaded = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    batches = make_batches(n=2)
    ref = estimate_importance(loaded, batches, progress=False, backend=BACKEND)
    got = estimate_importance_streaming(ckpt, batches, progress=False, backend=BACKEND)
    assert got.meta["compute_dtype"] == "float32"
    assert_same_scores(ref, got)


@pytest.mark.parametrize("prefetch,most", [(False, 1), (True, 2)])
def test_layers_in_memory_at_a_time(prefetch, most, tmp_path, monkeypatch):
    """One decoder layer materialised at a time (two with the prefetch thread reading the next one)."""
    from minitron.compress import streaming

    model = make_model("llama")
    ckpt = save(model, tmp_path / "ckpt", True)
    counts = []
    skel = {}
    orig_build, orig_read, orig_assign = streaming._build_skeleton, streaming._read_state, streaming._assign_state

    def build(config, dtype):
        m = orig_build(config, dtype)
        skel["layers"] = list(m.model.layers)
        skel["reading"] = 0
        return m

    def read(module, *a, **k):
        is_layer = any(module is l for l in skel["layers"])
        state = orig_read(module, *a, **k)
        if is_layer:
            skel["reading"] += 1  # a layer's tensors exist from here until it is freed
            counts.append(skel["reading"])
        return state

    def assign(module, prefix, state):
        orig_assign(module, prefix, state)

    orig_free = streaming._free_module

    def free(module):
        orig_free(module)
        if any(module is l for l in skel["layers"]):
            skel["reading"] -= 1

    monkeypatch.setattr(streaming, "_build_skeleton", build)
    monkeypatch.setattr(streaming, "_read_state", read)
    monkeypatch.setattr(streaming, "_assign_state", assign)
    monkeypatch.setattr(streaming, "_free_module", free)
    ref = estimate_importance(model, make_batches(), progress=False, backend=BACKEND)
    got = estimate_importance_streaming(ckpt, make_batches(), progress=False, backend=BACKEND, prefetch=prefetch)
    assert_same_scores(ref, got)
    assert len(counts) == 4 and max(counts) <= most and (prefetch or max(counts) == 1), counts
    assert all(next(l.parameters()).is_meta for l in skel["layers"])


def test_any_reader_with_the_shared_interface(tmp_path):
    """Only ``reader.config``, ``reader.keys()`` and ``reader.get(name)`` are used (the sharded reader's interface)."""

    class Minimal:
        def __init__(self, inner):
            self.config, self._inner, self.gets = inner.config, inner, 0

        def keys(self):
            return list(self._inner.keys())

        def get(self, name):
            self.gets += 1
            return self._inner.get(name)

    model = make_model("phi3")
    ckpt = save(model, tmp_path / "ckpt", True)
    reader = Minimal(CheckpointReader(ckpt))
    ref = estimate_importance(model, make_batches(), progress=False, backend=BACKEND)
    got = estimate_importance_streaming(tmp_path / "unused", make_batches(), progress=False, backend=BACKEND,
                                        reader=reader)
    assert reader.gets == len(model.state_dict())
    assert_same_scores(ref, got)


# ----------------------------------------------------------------------------------------- should_stream
def test_should_stream(tmp_path):
    ckpt = save(make_model("llama"), tmp_path / "ckpt", False)
    yes, why = should_stream(ckpt, fraction=1e-9)
    assert yes and "layer-streamed" in why and "GiB" in why
    no, why = should_stream(ckpt)
    assert not no and "in-memory" in why


def test_choose_compute_dtype(tmp_path, monkeypatch):
    from minitron.compress import streaming

    fp32 = save(make_model("llama"), tmp_path / "fp32", False)
    assert choose_compute_dtype(fp32)[0] == torch.float32
    bf16 = save(make_model("llama").to(torch.bfloat16), tmp_path / "bf16", False)
    rates = {torch.float32: 100.0, torch.bfloat16: 400.0}
    monkeypatch.setattr(streaming, "_mm_rate", lambda dtype, *a, **k: rates[dtype])
    dtype, why = choose_compute_dtype(bf16)
    assert dtype == torch.bfloat16 and "400 GFLOP/s vs 100" in why
    rates[torch.bfloat16] = 20.0  # a CPU without bf16 units
    dtype, why = choose_compute_dtype(bf16)
    assert dtype == torch.float32 and "computing in float32" in why
    # the chosen dtype streams and equals the in-memory model loaded in that dtype
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(bf16), dtype=torch.bfloat16).eval()
    ref = estimate_importance(loaded, make_batches(), progress=False, backend=BACKEND)
    got = estimate_importance_streaming(bf16, make_batches(), progress=False, backend=BACKEND,
                                        compute_dtype=torch.bfloat16)
    assert_same_scores(ref, got)


# ----------------------------------------------------------------------------------------- bad input
def test_bad_checkpoints(tmp_path):
    model = make_model("llama")
    ckpt = save(model, tmp_path / "ckpt", True)
    batches = make_batches(n=1)
    index = ckpt / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    shard = sorted(set(data["weight_map"].values()))[1]

    # a missing shard is named
    moved = tmp_path / "moved"
    os.replace(ckpt / shard, moved)
    with pytest.raises(FileNotFoundError, match=shard):
        estimate_importance_streaming(ckpt, batches, progress=False)
    os.replace(moved, ckpt / shard)

    # a truncated shard is named
    raw = (ckpt / shard).read_bytes()
    (ckpt / shard).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="truncated"):
        CheckpointReader(ckpt).get(next(k for k, v in data["weight_map"].items() if v == shard))
    (ckpt / shard).write_bytes(raw)

    # the index names a tensor no shard holds
    bad = dict(data, weight_map=dict(data["weight_map"], **{"model.layers.0.extra.weight": shard}))
    index.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="model.layers.0.extra.weight"):
        estimate_importance_streaming(ckpt, batches, progress=False)
    index.write_text(json.dumps(data))

    # shapes that do not match the config name the tensor and the file
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=cfg["intermediate_size"] + 8)))
    with pytest.raises(ValueError, match=r"model.layers.0.mlp\.(gate|up|down)_proj.weight.*model-.*safetensors.*has shape"):
        estimate_importance_streaming(ckpt, batches, progress=False)
    # a tensor the config needs is absent (found before any layer runs)
    cfg_extra = dict(cfg, num_hidden_layers=cfg["num_hidden_layers"] + 1)
    (ckpt / "config.json").write_text(json.dumps(cfg_extra))
    with pytest.raises(ValueError, match="lacks tensors.*model.layers.4"):
        estimate_importance_streaming(ckpt, batches, progress=False)
    # an unsupported family
    (ckpt / "config.json").write_text(json.dumps(dict(cfg, model_type="gpt2")))
    with pytest.raises(ValueError, match="unsupported model type"):
        estimate_importance_streaming(ckpt, batches, progress=False)
    (ckpt / "config.json").write_text(json.dumps(cfg))

    with pytest.raises(FileNotFoundError, match="config.json"):
        estimate_importance_streaming(tmp_path, batches, progress=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match="neither"):
        estimate_importance_streaming(tmp_path / "empty", batches, progress=False)


def test_bad_arguments(tmp_path):
    ckpt = save(make_model("llama"), tmp_path / "ckpt", False)
    batches = make_batches(n=1)
    with pytest.raises(TypeError, match="compute_dtype"):
        estimate_importance_streaming(ckpt, batches, compute_dtype=torch.int32, progress=False)
    with pytest.raises(ValueError, match="spill_dir"):
        estimate_importance_streaming(ckpt, batches, spill_dir=tmp_path / "nope", progress=False)
    with pytest.raises(ValueError, match="max_hidden_bytes"):
        estimate_importance_streaming(ckpt, batches, max_hidden_bytes=-1, progress=False)
    with pytest.raises(ValueError, match="layer_metrics"):
        estimate_importance_streaming(ckpt, batches, layer_metrics=("nope",), progress=False)
    with pytest.raises(ValueError, match="empty"):
        estimate_importance_streaming(ckpt, [], progress=False)
    with pytest.raises(ValueError, match="batch 0: token ids"):
        estimate_importance_streaming(ckpt, [{"input_ids": torch.full((1, 4), 10_000)}], progress=False)
