"""Shard-streamed pruning equals the in-memory path tensor for tensor, loads with plain transformers, and is safe."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minitron.compress.prune import prune_depth, prune_width
from minitron.compress.stream_prune import prune_checkpoint_streaming, random_importance, should_stream_prune
from minitron.io.checkpoint import CheckpointError, CorruptFileError, save_model
from minitron.io.safety import OutputExistsError
from minitron.io.shards import SAFE_WEIGHTS_INDEX_NAME, ShardedWriter

from .conftest import FAMILIES, make_model

BACKEND = "auto"
# 6 heads in 2 groups of 3 -> 2 heads in 1 group; phi3 keeps hidden/heads (longrope rule not involved here)
WIDTH = dict(hidden_size=32, intermediate_size=40, num_attention_heads=2, num_key_value_heads=1)
DROP = [1, 2]
CASES = ("width", "depth", "both")
TOKENIZER_BYTES = b'{"version": "1.0", "fake": "tokenizer bytes kept verbatim \xc3\xa9"}\n'


def _state(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Per family: a tiny checkpoint saved in many shards (untied; qwen3 tied), with a tokenizer file."""
    root = tmp_path_factory.mktemp("stream_src")
    out = {}
    for fam in FAMILIES:
        d = root / fam
        model = make_model(fam, tie=(fam == "qwen3"))
        model.save_pretrained(str(d), max_shard_size="20KB")
        (d / "tokenizer.json").write_bytes(TOKENIZER_BYTES)
        assert len(list(d.glob("*.safetensors"))) >= 3
        out[fam] = d
    return out


def _targets(case):
    width = dict(WIDTH) if case in ("width", "both") else None
    drop = DROP if case in ("depth", "both") else None
    return width, drop


def _in_memory(src: Path, dst: Path, scores, width, drop) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src))
    if width:
        prune_width(model, scores, backend=BACKEND, **width)
    if drop:
        prune_depth(model, num_hidden_layers=4 - len(drop), layers_to_drop=drop)
    save_model(model, dst, tokenizer_dir=src)


@pytest.fixture(scope="module")
def streamed(sources, tmp_path_factory):
    """Streamed outputs (forced to several shards) for every family and case, and the in-memory references."""
    root = tmp_path_factory.mktemp("stream_out")
    out = {}
    for fam, src in sources.items():
        scores = random_importance(__import__("transformers").AutoConfig.from_pretrained(str(src)), seed=3)
        for case in CASES:
            width, drop = _targets(case)
            s = prune_checkpoint_streaming(src, root / f"{fam}-{case}-s", scores=scores, width_targets=width,
                                           drop_layers=drop, shard_bytes=12_000, backend=BACKEND, progress=False)
            m = root / f"{fam}-{case}-m"
            _in_memory(src, m, scores, width, drop)
            out[fam, case] = (s, m)
    return out


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_equals_in_memory(streamed, sources, family, case):
    s, m = streamed[family, case]
    assert len(list(s.glob("*.safetensors"))) >= 2 and (s / SAFE_WEIGHTS_INDEX_NAME).is_file()
    a, b = _state(s), _state(m)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert json.loads((s / "config.json").read_text()) == json.loads((m / "config.json").read_text())
    assert json.loads((s / "generation_config.json").read_text()) == json.loads((m / "generation_config.json").read_text())
    assert (s / "tokenizer.json").read_bytes() == TOKENIZER_BYTES
    cfg = json.loads((s / "config.json").read_text())
    width, drop = _targets(case)
    assert cfg["num_hidden_layers"] == (4 - len(drop) if drop else 4)
    if width:
        assert cfg["hidden_size"] == WIDTH["hidden_size"] and cfg["intermediate_size"] == WIDTH["intermediate_size"]
    # index consistent with the files
    idx = json.loads((s / SAFE_WEIGHTS_INDEX_NAME).read_text())
    assert set(idx["weight_map"]) == set(a)
    assert idx["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in a.values())
    assert not [p for p in s.parent.iterdir() if p.name.startswith(f".{s.name}.")]  # no temporaries left


def test_outputs_load_with_plain_transformers(streamed, tmp_path):
    """Every streamed output loads with AutoModelForCausalLM in a process without minitron and generates."""
    dirs = [str(s) for (fam, case), (s, _) in sorted(streamed.items()) if case in ("both", "width")]
    script = textwrap.dedent(
        """
        import json, sys, torch
        from transformers import AutoModelForCausalLM
        for d in json.loads(sys.argv[1]):
            m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
            ids = torch.tensor([[3, 5, 7, 11]])
            out = m.generate(ids, max_new_tokens=3, do_sample=False, use_cache=True, pad_token_id=0)
            assert out.shape == (1, 7), (d, out.shape)
        assert "minitron" not in sys.modules
        print("OK", len(json.loads(sys.argv[1])))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-c", script, json.dumps(dirs)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"OK {len(dirs)}" in r.stdout


def test_keep_layers_equals_drop_layers(sources, tmp_path):
    src = sources["mistral"]
    a = prune_checkpoint_streaming(src, tmp_path / "a", drop_layers=[0, 3], progress=False)
    b = prune_checkpoint_streaming(src, tmp_path / "b", keep_layers=[1, 2], progress=False)
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert (a / "model.safetensors").is_file()  # default 5 GB shards: one file, no index
    with pytest.raises(ValueError, match="not both"):
        prune_checkpoint_streaming(src, tmp_path / "c", keep_layers=[1], drop_layers=[0])


# ---------------------------------------------------------------------------------------------- safety
def _no_output(dst: Path) -> None:
    assert not dst.exists()
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]


def _break(src: Path, tmp_path: Path, how: str) -> Path:
    import shutil

    d = tmp_path / f"bad-{how}"
    shutil.copytree(src, d)
    idx = json.loads((d / SAFE_WEIGHTS_INDEX_NAME).read_text())
    first = d / sorted(set(idx["weight_map"].values()))[0]
    if how == "missing":
        first.unlink()
    elif how == "index":
        idx["weight_map"]["model.layers.9.mlp.up_proj.weight"] = first.name
        (d / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(idx))
    elif how == "truncated":
        first.write_bytes(first.read_bytes()[:-7])
    elif how == "shape":
        cfg = json.loads((d / "config.json").read_text())
        cfg["hidden_size"] = 60
        (d / "config.json").write_text(json.dumps(cfg))
    elif how == "invalid":
        cfg = json.loads((d / "config.json").read_text())
        cfg["hidden_size"] = 64  # not a multiple of the 6 heads: transformers refuses the config
        (d / "config.json").write_text(json.dumps(cfg))
    elif how == "family":
        cfg = json.loads((d / "config.json").read_text())
        cfg["model_type"] = "gpt_neox"
        (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("how,err,name", [
    ("missing", CorruptFileError, "model-00001-of-"),
    ("index", CheckpointError, "model-00001-of-"),
    ("truncated", CorruptFileError, "model-00001-of-"),
    ("shape", CheckpointError, "config.json"),
    ("invalid", CheckpointError, "config.json"),
    ("family", (CheckpointError, ValueError), "config.json"),
])
def test_bad_input_refused_before_output(sources, tmp_path, how, err, name):
    src = _break(sources["llama"], tmp_path, how)
    before = _digest(src)
    dst = tmp_path / "out"
    with pytest.raises(err, match=name.replace(".", r"\.")):
        prune_checkpoint_streaming(src, dst, drop_layers=[1], progress=False)
    _no_output(dst)
    assert _digest(src) == before


def test_existing_output_refused_and_overwrite(sources, tmp_path):
    src = sources["qwen2"]
    before = _digest(src)
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="overwrite"):
        prune_checkpoint_streaming(src, dst, drop_layers=[1], progress=False)
    assert (dst / "keep.txt").read_text() == "mine"
    prune_checkpoint_streaming(src, dst, drop_layers=[1], overwrite=True, progress=False)
    assert not (dst / "keep.txt").exists() and (dst / "config.json").is_file()
    assert _digest(src) == before
    with pytest.raises(ValueError, match="lies inside the input"):
        prune_checkpoint_streaming(src, src / "sub", drop_layers=[1], progress=False)
    with pytest.raises(ValueError, match="is the input|lies inside"):
        prune_checkpoint_streaming(src, src, drop_layers=[1], overwrite=True, progress=False)
    assert _digest(src) == before


def test_too_little_disk_space(sources, tmp_path, monkeypatch):
    import shutil

    import minitron.io.safety as safety

    real = shutil.disk_usage
    monkeypatch.setattr(safety.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    dst = tmp_path / "out"
    with pytest.raises(ValueError, match="not enough disk space"):
        prune_checkpoint_streaming(sources["phi3"], dst, drop_layers=[1], progress=False)
    _no_output(dst)


@pytest.mark.parametrize("existing", [False, True])
def test_failure_midway_leaves_no_half_checkpoint(sources, tmp_path, monkeypatch, existing):
    src = sources["llama"]
    dst = tmp_path / "out"
    if existing:
        prune_checkpoint_streaming(src, dst, drop_layers=[3], progress=False)
        old = _digest(dst)
    calls = {"n": 0}
    real_add = ShardedWriter.add

    def failing_add(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 9:
            raise OSError("disk full (simulated)")
        return real_add(self, name, tensor)

    monkeypatch.setattr(ShardedWriter, "add", failing_add)
    with pytest.raises(OSError, match="simulated"):
        prune_checkpoint_streaming(src, dst, scores=random_importance(make_model("llama").config),
                                   width_targets=dict(WIDTH), overwrite=existing, shard_bytes=12_000, progress=False)
    if existing:
        assert _digest(dst) == old
        assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]
    else:
        _no_output(dst)


def test_bad_targets_refused_before_output(sources, tmp_path):
    src = sources["llama"]
    dst = tmp_path / "out"
    scores = random_importance(make_model("llama").config)
    with pytest.raises(ValueError, match="larger than the model"):
        prune_checkpoint_streaming(src, dst, scores=scores, width_targets=dict(hidden_size=64), progress=False)
    with pytest.raises(TypeError, match="unknown width target"):
        prune_checkpoint_streaming(src, dst, scores=scores, width_targets=dict(hidden=8), progress=False)
    with pytest.raises(TypeError, match="ImportanceScores"):
        prune_checkpoint_streaming(src, dst, width_targets=dict(hidden_size=36), progress=False)
    with pytest.raises(ValueError, match="layers_to_drop"):
        prune_checkpoint_streaming(src, dst, drop_layers=[7], progress=False)
    wrong = random_importance(make_model("mistral").config)
    with pytest.raises(ValueError, match="different model"):
        prune_checkpoint_streaming(src, dst, scores=wrong, width_targets=dict(hidden_size=36), progress=False)
    _no_output(dst)


def test_should_stream_prune(sources, monkeypatch):
    import minitron.compress.stream_prune as sp

    monkeypatch.setattr(sp, "_meminfo_available", lambda: 10**12)
    stream, why = should_stream_prune(sources["llama"])
    assert stream is False and "in memory" in why
    monkeypatch.setattr(sp, "_meminfo_available", lambda: 1000)
    stream, why = should_stream_prune(sources["llama"])
    assert stream is True and "streaming" in why


def test_width_transforms_and_record_streamed_equal_in_memory(sources, tmp_path, monkeypatch):
    """The adapter's width_transforms hook and the pruning record apply alike in memory and streamed."""
    from transformers import AutoConfig

    from minitron.compress.prune import PRUNING_RECORD
    from minitron.models.base import ModelAdapter

    def transforms(self, before, after):
        scale = (before.hidden_size / after.hidden_size) ** 0.5
        return {"model.embed_tokens.weight": lambda t: t * scale, "model.norm.weight": lambda t: t / scale}

    monkeypatch.setattr(ModelAdapter, "width_transforms", transforms)
    src = sources["qwen2"]
    scores = random_importance(AutoConfig.from_pretrained(str(src)), seed=4)
    width = dict(hidden_size=32)
    s = prune_checkpoint_streaming(src, tmp_path / "s", scores=scores, width_targets=width, drop_layers=[0],
                                   backend=BACKEND, progress=False)
    m = tmp_path / "m"
    _in_memory(src, m, scores, width, [0])
    a, b = _state(s), _state(m)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    plain = _state(src)
    keep = torch.topk(scores.channels, 32).indices.sort().values
    torch.testing.assert_close(a["model.embed_tokens.weight"], plain["model.embed_tokens.weight"][:, keep] * 1.5 ** 0.5)
    cfg = json.loads((s / "config.json").read_text())
    assert cfg == json.loads((m / "config.json").read_text())
    assert cfg[PRUNING_RECORD] == {"source_num_hidden_layers": 4, "kept_layers": [1, 2, 3], "source_hidden_size": 48,
                                   "kept_channels": keep.tolist()}


@pytest.mark.parametrize("fam", ("qwen3_moe", "qwen2_moe", "mixtral"))
def test_moe_families_streamed_depth_equals_in_memory(fam, tmp_path):
    """Mixture-of-experts families (width cases in tests/driver/test_moe.py): depth pruning streamed equals in memory
    (per-expert checkpoint tensors renamed with their layers; the kept layers keep their MoE/dense kind)."""
    from tests.driver.test_moe import make_moe_model

    src = tmp_path / "src"
    make_moe_model(fam).save_pretrained(str(src), max_shard_size="40KB")
    (src / "tokenizer.json").write_bytes(TOKENIZER_BYTES)
    s = prune_checkpoint_streaming(src, tmp_path / "s", drop_layers=DROP, shard_bytes=30_000, progress=False)
    _in_memory(src, tmp_path / "m", None, None, DROP)
    a, b = _state(s), _state(tmp_path / "m")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((s / "config.json").read_text()) == json.loads((tmp_path / "m" / "config.json").read_text())
    assert (s / "tokenizer.json").read_bytes() == TOKENIZER_BYTES
