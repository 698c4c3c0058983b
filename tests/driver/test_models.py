"""Model adapters: lookup, where the prunable axes live, per-layer config cuts."""
from __future__ import annotations

import pytest
import torch

from minitron.models import SUPPORTED_MODEL_TYPES, get_adapter
from tests.driver.conftest import FAMILIES, make_model, tiny_config


def test_supported_types():
    """The first five families first, then the others in alphabetical order of their module names."""
    from pathlib import Path

    import minitron.models

    later = ("mixtral", "nemotron_h", "qwen2_moe", "qwen3_moe")
    if (Path(minitron.models.__file__).parent / "gemma3.py").is_file():  # gemma3.py sorts before mixtral.py
        later = ("gemma3_text",) + later
    assert SUPPORTED_MODEL_TYPES == ("llama", "mistral", "qwen2", "qwen3", "phi3") + later


def test_get_adapter_accepts_model_config_and_string(family):
    model = make_model(family)
    for arg in (model, model.config, family):
        assert get_adapter(arg).model_type == family


def test_unknown_model_type_lists_supported():
    from transformers import GPT2Config

    with pytest.raises(ValueError) as exc:
        get_adapter(GPT2Config(n_layer=1, n_embd=16, n_head=2))
    for t in SUPPORTED_MODEL_TYPES:
        assert t in str(exc.value)
    assert "gpt2" in str(exc.value)
    with pytest.raises(TypeError):
        get_adapter(42)


def test_check_model_refuses_base_model():
    from transformers import AutoModel

    base = AutoModel.from_config(tiny_config("llama"))
    with pytest.raises(TypeError, match="ForCausalLM"):
        get_adapter(base).check_model(base)


def test_dims_and_head_dim(family):
    model = make_model(family)
    d = get_adapter(model).dims(model.config)
    assert (d.hidden_size, d.intermediate_size, d.num_attention_heads, d.num_key_value_heads) == (48, 64, 6, 2)
    assert d.head_dim == (12 if family in ("qwen3", "gemma3_text") else 8)
    assert d.heads_per_group == 3


def test_row_spans_tile_the_projections(family):
    """q/k/v spans and gate/up spans cover each projection's rows exactly, in forward order."""
    model = make_model(family)
    ad = get_adapter(model)
    d = ad.dims(model.config)
    layer = ad.layers(model)[0]
    spans = [ad.query_rows(layer, d), ad.key_rows(layer, d), ad.value_rows(layer, d)]
    rows = {}
    for s in spans:
        rows.setdefault(id(s.linear), []).append((s.start, s.units * s.unit_size))
    for lin in ad.attention_inputs(layer):
        parts = sorted(rows[id(lin)])
        pos = 0
        for start, n in parts:
            assert start == pos
            pos += n
        assert pos == lin.weight.shape[0]
    assert spans[0].units == 6 and spans[1].units == 2 and spans[0].unit_size == d.head_dim
    assert ad.o_proj(layer).weight.shape[1] == 6 * d.head_dim
    g, u = ad.gate_rows(layer, d), ad.up_rows(layer, d)
    assert g.units == u.units == 64
    assert ad.down_proj(layer).weight.shape[1] == 64
    if family == "phi3":
        assert g.linear is u.linear and u.start == 64  # gate_up_proj: chunk(2), gate first
        assert spans[1].start == 6 * 8 and spans[2].start == 8 * 8  # qkv_proj rows [q | k | v]


def test_phi3_spans_match_modeling_split():
    """Zeroing the adapter's 'value' rows of Phi-3's fused qkv_proj zeroes the attention output."""
    model = make_model("phi3")
    ad = get_adapter(model)
    d = ad.dims(model.config)
    layer = ad.layers(model)[0]
    v = ad.value_rows(layer, d)
    captured = {}
    h = ad.o_proj(layer).register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0].clone()))
    with torch.no_grad():
        v.linear.weight[v.start: v.start + v.units * v.unit_size] = 0
        model(input_ids=torch.randint(3, 96, (1, 8)))
    h.remove()
    assert captured["x"].abs().max() == 0
    # and the gate half of gate_up_proj: zeroing it zeroes down_proj's input (silu(0) = 0)
    g = ad.gate_rows(layer, d)
    h = ad.down_proj(layer).register_forward_pre_hook(lambda m, a: captured.__setitem__("y", a[0].clone()))
    with torch.no_grad():
        g.linear.weight[g.start: g.start + g.units] = 0
        model(input_ids=torch.randint(3, 96, (1, 8)))
    h.remove()
    assert captured["y"].abs().max() == 0


def test_cut_per_layer_config_qwen2():
    cfg = tiny_config("qwen2")
    assert cfg.layer_types == ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
    ad = get_adapter(cfg)
    ad.cut_per_layer_config(cfg, [0, 2, 3])
    cfg.num_hidden_layers = 3
    assert cfg.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert cfg.max_window_layers == 1
    cfg.validate()


def test_fingerprint_differs_between_models():
    a, b = tiny_config("llama"), tiny_config("llama", intermediate_size=32)
    ad = get_adapter(a)
    assert ad.fingerprint(a) != ad.fingerprint(b)
    assert ad.fingerprint(a)["model_type"] == "llama"


@pytest.mark.parametrize("fam", FAMILIES)
def test_pruned_config_is_a_copy(fam):
    cfg = tiny_config(fam)
    ad = get_adapter(cfg)
    new = ad.pruned_config(cfg, hidden_size=24)
    assert new.hidden_size == 24 and cfg.hidden_size == 48
    assert new.head_dim == ad.head_dim(cfg)


# ---------------------------------------------------------------------------------------------- mixture of experts
@pytest.mark.parametrize("fam", ("qwen3_moe", "qwen2_moe", "mixtral"))
def test_moe_adapters(fam):
    """MoE families: lookup, attention spans as the dense families, MLP inputs / residual writers of MoE and dense
    layers, expert checkpoint names, the MoE sizes written into the family's own config fields."""
    from minitron.models.base import MoeAdapter
    from tests.driver.test_moe import make_moe_model

    model = make_moe_model(fam)
    ad = get_adapter(model)
    assert isinstance(ad, MoeAdapter) and get_adapter(fam).model_type == fam
    ad.check_model(model)
    d = ad.dims(model.config)
    names = {id(m): n for n, m in model.named_modules()}
    for l, layer in enumerate(ad.layers(model)):
        spans = [ad.query_rows(layer, d), ad.key_rows(layer, d), ad.value_rows(layer, d)]
        assert [s.units for s in spans] == [6, 2, 2]
        ins, outs = ad.mlp_inputs(layer), ad.residual_writers(layer)
        assert all(m.weight.shape[-1] == 48 for m in ins) and all(m.weight.shape[0] == 48 for m in outs)
        if ad.is_moe_layer(layer):
            assert ins[0] is ad.router(layer)
            shared = ad.shared_expert(layer)
            assert (shared is not None) == (fam == "qwen2_moe")
            assert len(outs) == (2 if shared is not None else 1)
            p = names[id(ad.experts(layer))]
            g, u, dn = ad.expert_checkpoint_names(p, 3)
            if fam == "mixtral":
                assert (g, u, dn) == tuple(f"model.layers.{l}.block_sparse_moe.experts.3.{w}.weight"
                                           for w in ("w1", "w3", "w2"))
            else:
                assert g == f"model.layers.{l}.mlp.experts.3.gate_proj.weight" and dn.endswith("3.down_proj.weight")
        else:
            assert [m is x for m, x in zip(ins, (layer.mlp.gate_proj, layer.mlp.up_proj))] == [True, True]
    new = ad.pruned_config(model.config, num_experts=4, moe_intermediate_size=8)
    m = ad.moe_dims(new)
    assert (m.num_experts, m.moe_intermediate_size) == (4, 8) and ad.moe_dims(model.config).num_experts == 6
    if fam == "mixtral":
        assert (new.num_local_experts, new.intermediate_size) == (4, 8)
    assert get_adapter("llama").moe_dims(tiny_config("llama")) is None


def test_moe_cut_per_layer_config_keeps_layer_kinds():
    from tests.driver.test_moe import moe_config

    cfg = moe_config("qwen2_moe", decoder_sparse_step=2, mlp_only_layers=[3])
    ad = get_adapter(cfg)
    assert ad.moe_layer_flags(cfg) == (False, True, False, False)
    ad.cut_per_layer_config(cfg, [1, 2])
    cfg.num_hidden_layers = 2
    assert (cfg.decoder_sparse_step, cfg.mlp_only_layers) == (1, [1])
    assert ad.moe_layer_flags(cfg) == (True, False)
    cfg.validate()
