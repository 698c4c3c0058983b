"""ShardedCheckpoint (reader + validation) and ShardedWriter (transformers-compatible shards)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from minitron.io.checkpoint import CheckpointError, CorruptFileError
from minitron.io.shards import (SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, ShardedCheckpoint, ShardedWriter,
                                plan_shards, shard_names)
from tests.driver.conftest import make_model


def _state(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A tiny llama saved by transformers in several shards (and its state dict)."""
    d = tmp_path_factory.mktemp("src") / "llama"
    model = make_model("llama")
    model.save_pretrained(str(d), max_shard_size="20KB")
    assert (d / SAFE_WEIGHTS_INDEX_NAME).is_file()
    return d, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _copy(src, tmp_path, name="ck"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------- reading
def test_reader_reads_every_tensor(sharded):
    d, state = sharded
    ck = ShardedCheckpoint(d).validate()
    assert set(ck.keys()) == set(state)
    assert len({ck.info(k).file for k in ck.keys()}) > 2
    for k in ck.keys():
        t = ck.get(k)
        assert ck.shape(k) == tuple(state[k].shape) and ck.dtype(k) == state[k].dtype
        assert torch.equal(t, state[k]), k
    assert ck.nbytes == sum(v.numel() * v.element_size() for v in state.values())
    assert ck.config.model_type == "llama"


def test_reader_single_file(tmp_path):
    model = make_model("qwen3", tie=True)
    model.save_pretrained(str(tmp_path / "m"))
    ck = ShardedCheckpoint(tmp_path / "m").validate()
    assert (tmp_path / "m" / SAFE_WEIGHTS_NAME).is_file()
    assert "lm_head.weight" not in ck.keys()  # tied: saved once
    assert torch.equal(ck.get("model.embed_tokens.weight"), model.model.embed_tokens.weight)


# ---------------------------------------------------------------------------------------------- bad input
def _first_shard(d):
    return d / sorted(set(json.loads((d / SAFE_WEIGHTS_INDEX_NAME).read_text())["weight_map"].values()))[0]


def test_missing_shard(sharded, tmp_path):
    d = _copy(sharded[0], tmp_path)
    f = _first_shard(d)
    f.unlink()
    with pytest.raises(CorruptFileError, match=f.name):
        ShardedCheckpoint(d).validate()


def test_index_names_tensor_no_shard_holds(sharded, tmp_path):
    d = _copy(sharded[0], tmp_path)
    idx = json.loads((d / SAFE_WEIGHTS_INDEX_NAME).read_text())
    idx["weight_map"]["model.layers.0.mlp.extra.weight"] = _first_shard(d).name
    (d / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.extra\.weight.*" + _first_shard(d).name.replace(".", r"\.")):
        ShardedCheckpoint(d).validate()


def test_index_moves_tensor_to_wrong_shard(sharded, tmp_path):
    d = _copy(sharded[0], tmp_path)
    idx = json.loads((d / SAFE_WEIGHTS_INDEX_NAME).read_text())
    files = sorted(set(idx["weight_map"].values()))
    k = next(k for k, v in idx["weight_map"].items() if v == files[0])
    idx["weight_map"][k] = files[1]
    (d / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match=files[1]):
        ShardedCheckpoint(d).validate()


@pytest.mark.parametrize("cut", [1, 100, "header"])
def test_truncated_shard(sharded, tmp_path, cut):
    d = _copy(sharded[0], tmp_path)
    f = _first_shard(d)
    data = f.read_bytes()
    f.write_bytes(data[:20] if cut == "header" else data[:-cut])
    with pytest.raises(CorruptFileError, match=f.name):
        ShardedCheckpoint(d).validate()


def test_corrupt_header(sharded, tmp_path):
    d = _copy(sharded[0], tmp_path)
    f = _first_shard(d)
    data = bytearray(f.read_bytes())
    data[8] = ord("!")
    f.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=f.name):
        ShardedCheckpoint(d).validate()


def test_corrupt_index(sharded, tmp_path):
    d = _copy(sharded[0], tmp_path)
    (d / SAFE_WEIGHTS_INDEX_NAME).write_text('{"weight_map": {"a": ')
    with pytest.raises(CorruptFileError, match=SAFE_WEIGHTS_INDEX_NAME):
        ShardedCheckpoint(d).validate()


def test_shapes_not_matching_config(sharded, tmp_path):
    d = _copy(sharded[0], tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"weight file .*model-\d+-of-\d+\.safetensors.*mlp\.(gate|up|down)_proj\.(weight|bias) has shape .*config\.json"):
        ShardedCheckpoint(d).validate()


def test_missing_tensor(sharded, tmp_path):
    d = _copy(sharded[0], tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 5
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"lacks tensor.*model\.layers\.4\."):
        ShardedCheckpoint(d).validate()


def test_unsupported_family(sharded, tmp_path):
    from transformers import GPT2Config

    d = _copy(sharded[0], tmp_path)
    GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50).save_pretrained(str(d))
    with pytest.raises(CheckpointError, match=r"config\.json.*unsupported model type 'gpt2'"):
        ShardedCheckpoint(d).validate()


def test_corrupt_config(sharded, tmp_path):
    d = _copy(sharded[0], tmp_path)
    (d / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(CorruptFileError, match="config.json"):
        ShardedCheckpoint(d).validate()


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        ShardedCheckpoint(tmp_path)


# ---------------------------------------------------------------------------------------------- writing
@pytest.mark.parametrize("planned", [True, False])
def test_writer_matches_transformers_sharding(tmp_path, planned):
    """Same shard names, weight map and total_size as save_pretrained for the same limit; loads back."""
    model = make_model("mistral")
    ref = tmp_path / "ref"
    model.save_pretrained(str(ref), max_shard_size="20KB")
    state = model.state_dict()
    out = tmp_path / "out"
    out.mkdir()
    layout = [(k, v.shape, v.dtype) for k, v in state.items()] if planned else None
    with ShardedWriter(out, max_shard_bytes=20_000, layout=layout) as w:
        for k, v in state.items():
            w.add(k, v)
    a = json.loads((ref / SAFE_WEIGHTS_INDEX_NAME).read_text())
    b = json.loads((out / SAFE_WEIGHTS_INDEX_NAME).read_text())
    assert a["weight_map"] == b["weight_map"]
    assert a["metadata"] == b["metadata"]
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in ref.glob("*.safetensors"))
    got = _state(out)
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)
    from safetensors import safe_open

    with safe_open(str(next(out.glob("*.safetensors"))), framework="pt") as h:
        assert h.metadata() == {"format": "pt"}


def test_writer_single_shard_and_big_tensor(tmp_path):
    out = tmp_path / "one"
    out.mkdir()
    with ShardedWriter(out) as w:
        w.add("a", torch.arange(6, dtype=torch.bfloat16).reshape(2, 3))
        w.add("b", torch.ones(3, dtype=torch.bool))
    assert [p.name for p in out.iterdir()] == [SAFE_WEIGHTS_NAME]
    got = load_file(str(out / SAFE_WEIGHTS_NAME))
    assert torch.equal(got["a"], torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)) and got["b"].all()
    assert plan_shards([("a", 5), ("b", 20), ("c", 5), ("d", 6)], 10) == [["b"], ["a", "c"], ["d"]]
    assert plan_shards([("a", 5), ("b", 5), ("c", 1)], 10) == [["a", "b"], ["c"]]
    assert shard_names(2) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


def test_writer_layout_mismatch(tmp_path):
    w = ShardedWriter(tmp_path, layout=[("a", (2,), torch.float32)])
    with pytest.raises(ValueError, match="layout expects a"):
        w.add("a", torch.zeros(3))
    with pytest.raises(ValueError, match="after 0 of 1"):
        w.close()


@pytest.mark.parametrize("planned", [True, False])
def test_writer_tensor_over_limit_gets_own_shard(tmp_path, planned):
    """Like transformers: a tensor over the limit is a shard of its own, numbered where it comes."""
    tensors = {"a": torch.zeros(5, dtype=torch.uint8), "b": torch.ones(20, dtype=torch.uint8),
               "c": torch.full((5,), 2, dtype=torch.uint8), "d": torch.full((6,), 3, dtype=torch.uint8)}
    layout = [(k, v.shape, v.dtype) for k, v in tensors.items()] if planned else None
    with ShardedWriter(tmp_path, max_shard_bytes=10, layout=layout) as w:
        for k, v in tensors.items():
            w.add(k, v)
    wm = json.loads((tmp_path / SAFE_WEIGHTS_INDEX_NAME).read_text())["weight_map"]
    names = shard_names(3)
    assert wm == {"a": names[1], "b": names[0], "c": names[1], "d": names[2]}
    got = _state(tmp_path)
    assert all(torch.equal(got[k], v) for k, v in tensors.items())
