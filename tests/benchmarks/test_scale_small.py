"""The scale benchmark's parts on tiny shapes: architectures, the random checkpoint writer, the stages, the sampler."""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks import bench_scale as bs
from benchmarks.write_checkpoint import byte_level_tokenizer, write_random_checkpoint
from minitron.io.shards import SAFE_WEIGHTS_INDEX_NAME, ShardedCheckpoint
from minitron.resources.architectures import (architecture_dict, architecture_names, load_architecture,
                                              preset_names, pruning_preset)

TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
            head_dim=16, vocab_size=300, bos_token_id=1, eos_token_id=2)
TINY_MOE = dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=2, head_dim=16, vocab_size=300, num_experts=4,
                num_experts_per_tok=2, bos_token_id=1, eos_token_id=2)
TINY_PRESETS = {
    "llama-3.1-minitron-4b-width": {"width": {"hidden_size": 96, "intermediate_size": 192, "num_attention_heads": 8,
                                              "num_key_value_heads": 2}},
    "llama-3.1-minitron-4b-depth": {"num_hidden_layers": 2},
}


# ---------------------------------------------------------------------------------------------- architectures
@pytest.mark.parametrize("name,params", [("llama-3.1-8b", 8_030_261_248), ("mistral-nemo-12b", 12_247_782_400),
                                         ("qwen3-8b", 8_190_735_360)])
def test_published_architectures(name, params):
    from transformers import AutoModelForCausalLM

    assert name in architecture_names()
    cfg = load_architecture(name)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg)
    assert sum(p.numel() for p in m.parameters()) == params  # the published parameter counts
    assert cfg.head_dim == 128 and cfg.num_key_value_heads == 8 and not cfg.tie_word_embeddings


@pytest.mark.parametrize("name,params,experts,top_k,width,kv", [
    ("qwen3-30b-a3b", 30_532_122_624, 128, 8, 768, 4),   # 30.5B total, published
    ("mixtral-8x7b", 46_702_792_704, 8, 2, 14336, 8),    # 46.7B total, published
])
def test_published_moe_architectures(name, params, experts, top_k, width, kv):
    from transformers import AutoModelForCausalLM

    from minitron.models import get_adapter

    cfg = load_architecture(name)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg)
    assert sum(p.numel() for p in m.parameters()) == params
    md = get_adapter(cfg).moe_dims(cfg)
    assert (md.num_experts, md.num_experts_per_tok, md.moe_intermediate_size) == (experts, top_k, width)
    assert all(md.moe_layers) and cfg.num_key_value_heads == kv and get_adapter(cfg).head_dim(cfg) == 128


def test_llama31_rope_and_presets():
    from minitron.compress.prune import validate_width_targets

    d = architecture_dict("llama-3.1-8b")
    assert d["rope_scaling"] == {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192, "rope_type": "llama3"}
    assert set(preset_names()) == {"llama-3.1-minitron-4b-width", "llama-3.1-minitron-4b-depth", "mistral-nemo-minitron-8b",
                                   "qwen3-30b-a3b-half-experts", "mixtral-8x7b-6-experts"}
    for name in preset_names():
        p = pruning_preset(name)
        if p["width"]:
            validate_width_targets(load_architecture(p["base"]), **p["width"])
    assert pruning_preset("llama-3.1-minitron-4b-depth")["num_hidden_layers"] == 16
    with pytest.raises(KeyError, match="available"):
        load_architecture("gpt-5")


# ---------------------------------------------------------------------------------------------- checkpoint writer
def _tiny_config():
    from transformers import AutoConfig

    d = architecture_dict("llama-3.1-8b")
    d.update(TINY)
    return AutoConfig.for_model(d.pop("model_type"), **d)


@pytest.mark.parametrize("init", ["normal", "pool"])
def test_write_random_checkpoint(tmp_path, init):
    out = write_random_checkpoint(_tiny_config(), tmp_path / "ck", init=init, shard_bytes=200_000, progress=False)
    ck = ShardedCheckpoint(out).validate()
    assert (out / SAFE_WEIGHTS_INDEX_NAME).is_file() and len(list(out.glob("*.safetensors"))) > 2
    w = ck.get("model.layers.0.mlp.up_proj.weight").float()
    assert w.dtype == torch.float32 and ck.dtype("model.layers.0.mlp.up_proj.weight") == torch.bfloat16
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    assert torch.equal(ck.get("model.norm.weight"), torch.ones(128, dtype=torch.bfloat16))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    tok = byte_level_tokenizer()
    ids = tok("héllo").input_ids
    assert ids == list("héllo".encode()) and tok.decode(ids) == "héllo"
    assert (out / "tokenizer.json").is_file()


def test_write_random_moe_checkpoint_in_transformers_layout(tmp_path):
    """MoE experts are written one 2-D tensor per expert, as transformers saves them; the checkpoint loads."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from minitron.compress.moe_layout import validate_checkpoint

    d = architecture_dict("mixtral-8x7b")
    d.update(hidden_size=128, intermediate_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
             vocab_size=300, num_local_experts=4)
    cfg = AutoConfig.for_model(d.pop("model_type"), **d)
    out = write_random_checkpoint(cfg, tmp_path / "ck", init="pool", shard_bytes=200_000, progress=False)
    ck = validate_checkpoint(ShardedCheckpoint(out))
    assert ck.shape("model.layers.0.block_sparse_moe.experts.3.w2.weight") == (128, 64)
    m, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert tuple(m.model.layers[0].mlp.experts.gate_up_proj.shape) == (4, 128, 128)


# ---------------------------------------------------------------------------------------------- stages
def test_stages_end_to_end(tmp_path):
    """write -> random importance -> streamed prune (width, depth) -> plain-transformers generate, in process."""
    ck = tmp_path / "ck"
    bs.stage_write({"arch": "llama-3.1-8b", "out": str(ck), "shard_bytes": 300_000, "overrides": TINY})
    bs.stage_importance({"ckpt": str(ck), "out": str(tmp_path / "imp"), "method": "random"})
    for preset, po in TINY_PRESETS.items():
        out = tmp_path / preset
        r = bs.stage_prune({"ckpt": str(ck), "scores": str(tmp_path / "imp"), "out": str(out), "width": po.get("width"),
                            "num_hidden_layers": po.get("num_hidden_layers"), "shard_bytes": 300_000})
        assert r["output_bytes"] > 0 and r["output_bytes_per_s"] > 0
        cfg = json.loads((out / "config.json").read_text())
        if "width" in po:
            assert cfg["hidden_size"] == 96 and cfg["num_hidden_layers"] == 4 and r["dropped_layers"] is None
        else:
            assert cfg["num_hidden_layers"] == 2 and len(r["dropped_layers"]) == 2
            assert r["dropped_layers"][1] == r["dropped_layers"][0] + 1  # one contiguous block
        g = bs.stage_generate({"ckpt": str(out), "threads": 1})
        assert g["new_tokens"] == 8 and g["minitron_imported"] is False


def test_moe_stages_end_to_end(tmp_path):
    """Qwen3-MoE shapes, scaled down: write -> streamed importance (expert scores) -> streamed prune of experts and
    expert width -> plain-transformers generate."""
    ck = tmp_path / "ck"
    bs.stage_write({"arch": "qwen3-30b-a3b", "out": str(ck), "shard_bytes": 300_000, "overrides": TINY_MOE})
    imp = bs.stage_importance({"ckpt": str(ck), "out": str(tmp_path / "imp"), "method": "streaming", "tokens": 64,
                               "seq": 16, "backend": "reference"})
    assert imp["has_expert_scores"] and imp["tokens"] == 64
    r = bs.stage_prune({"ckpt": str(ck), "scores": str(tmp_path / "imp"), "out": str(tmp_path / "p"),
                        "width": {"num_experts": 2, "moe_intermediate_size": 48}, "num_hidden_layers": None,
                        "shard_bytes": 300_000})
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(tmp_path / "p"))  # config.json spells num_experts "num_local_experts"
    assert (cfg.num_experts, cfg.moe_intermediate_size, cfg.num_hidden_layers) == (2, 48, 4)
    assert r["output_bytes"] > 0
    g = bs.stage_generate({"ckpt": str(tmp_path / "p"), "threads": 1})
    assert g["new_tokens"] == 8 and g["minitron_imported"] is False


def test_run_stage_measures_a_subprocess(tmp_path):
    rec = bs.run_stage("bandwidth", {"dir": str(tmp_path), "bytes": 64 << 20})
    assert rec["returncode"] == 0, rec.get("error")
    assert rec["write_bytes_per_s"] > 0 and rec["bytes"] == 64 << 20
    assert rec["peak_anon_bytes"] > 64 << 20  # the 64 MiB block is anonymous memory of the child
    assert rec["io"]["wchar"] >= 64 << 20
    assert not list(tmp_path.iterdir())
    lines = bs.summarize({"bandwidth": rec, "models": []})
    assert lines[0].startswith("write bandwidth:")
