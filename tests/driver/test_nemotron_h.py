"""Nemotron-H (hybrid Mamba-2 / attention / MLP): adapter, group-aware Mamba head pruning, Mamba cuts, importance.

A tiny random model (pattern ``M*M-``: Mamba, attention, Mamba, MLP; 8 Mamba heads of 16 channels in 2 SSM
groups, state 16) is pruned in memory and reloaded with plain transformers. The reference checks use what is
exactly checkable for a Mamba-2 layer: each head's (and each channel's) scan output depends only on its own x
rows, dt, A, D and its group's B/C, so after cutting heads / head channels group-aware the pruned layer's scan
output equals the original's at the kept channels; the gated norm then normalises over each group's *kept*
channels (not over all of them), so the layer output equals ``out_proj_kept(norm_kept(y_kept, z_kept))``, not the
original output with the dropped heads' ``out_proj`` columns zeroed.
"""
from __future__ import annotations

import pytest
import torch

from minitron.compress.mamba import (MambaImportance, apply_cut_plan, mamba_channels, mamba_config_update,
                                     mamba_layer_cuts, plan_mamba, prune_mamba, select_mamba_head_dims,
                                     select_mamba_heads, select_mamba_heads_ignoring_groups, validate_mamba_targets)
from minitron.models import SUPPORTED_MODEL_TYPES, get_adapter
from minitron.models.nemotron_h import NemotronHAdapter
from tests.driver.conftest import BACKEND, make_batches, randomize_

VOCAB = 64


def tiny_config(pattern: str = "M*M-", **overrides):
    from transformers import NemotronHConfig

    kw = dict(vocab_size=VOCAB, hidden_size=32, hybrid_override_pattern=pattern, mamba_num_heads=8, mamba_head_dim=16,
              n_groups=2, ssm_state_size=16, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
              intermediate_size=48, conv_kernel=4, chunk_size=8, max_position_embeddings=64, pad_token_id=0,
              bos_token_id=1, eos_token_id=2, use_conv_bias=True)
    kw.update(overrides)
    return NemotronHConfig(**kw)


def make_model(pattern: str = "M*M-", seed: int = 0, **overrides):
    from transformers import NemotronHForCausalLM

    torch.manual_seed(seed)
    model = NemotronHForCausalLM(tiny_config(pattern, **overrides))
    randomize_(model, seed)
    with torch.no_grad():  # A = -exp(A_log) in a realistic range, dt_bias so that softplus(dt) ~ 0.1 .. 1
        for layer in model.model.layers:
            if layer.block_type == "linear_attention":
                layer.mixer.A_log.uniform_(0.0, 1.5)
                layer.mixer.dt_bias.uniform_(-2.0, 0.5)
    return model.float().eval()


@pytest.fixture(scope="module")
def model():
    return make_model()


def batches(n: int = 1, seq: int = 12):
    return make_batches(VOCAB, n=n, batch=2, seq=seq, seed=1)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _reload(model, tmp_path):
    from transformers import AutoModelForCausalLM

    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return loaded.float().eval()


# ---------------------------------------------------------------------------------------------- adapter
def test_registered_and_kinds(model):
    assert "nemotron_h" in SUPPORTED_MODEL_TYPES
    ad = get_adapter(model)
    assert isinstance(ad, NemotronHAdapter)
    ad.check_model(model)
    assert ad.layer_kinds(model.config) == ["mamba", "attention", "mamba", "mlp"]
    assert ad.pattern(model.config) == "M*M-"
    assert ad.layers_of_kind(model.config, "mamba") == [0, 2]
    assert ad.kinds_from_pattern("M-E*") == ["mamba", "mlp", "moe", "attention"]
    with pytest.raises(ValueError, match="hybrid_override_pattern"):
        ad.kinds_from_pattern("M-X")
    assert ad.embedding(model) is model.model.embeddings and ad.final_norm(model) is model.model.norm_f
    layers = ad.layers(model)
    assert ad.layer_norms(layers[1]) == [layers[1].norm]
    with pytest.raises(TypeError, match="'mamba', not 'attention'"):
        ad.attention(layers[0])
    with pytest.raises(TypeError, match="not 'mlp'"):
        ad.down_proj(layers[1])
    with pytest.raises(TypeError, match="not gated"):
        ad.gate_rows(layers[3], ad.dims(model.config))


def test_mamba_layout_tiles_the_tensors(model):
    """The spans of z, x, B, C, dt tile in_proj's rows, x, B, C tile conv1d's channels, in the modelling code's
    order (checked against the split the mixer itself does)."""
    ad = get_adapter(model)
    ml = ad.mamba_layout(model.config)
    mixer = ad.mamba(ad.layers(model)[0])
    assert (ml.d_inner, ml.heads_per_group, ml.conv_dim) == (128, 4, 128 + 64)
    assert mixer.in_proj.weight.shape == (ml.in_proj_rows, 32)
    assert mixer.conv1d.weight.shape == (ml.conv_dim, 1, 4) and mixer.norm.weight.shape == (ml.d_inner,)
    assert mixer.norm.group_size == ml.norm_group_size() == 64
    spans = ml.in_proj_spans()
    assert [spans[k] for k in ("z", "x", "B", "C", "dt")] == [(0, 128), (128, 256), (256, 288), (288, 320), (320, 328)]
    assert ml.conv_spans() == {"x": (0, 128), "B": (128, 160), "C": (160, 192)}
    # the mixer splits in_proj's output as [gate (D) | xBC (D + 2GN) | dt (H)]
    assert [mixer.intermediate_size, mixer.conv_dim, mixer.num_heads] == [spans["z"][1], spans["C"][1] - spans["x"][0],
                                                                        spans["dt"][1] - spans["dt"][0]]


def test_hidden_axes_per_kind():
    """hidden_axes lists, per layer kind, exactly the (parameter, dim) pairs indexed by the embedding channels."""
    model = make_model("M*-E", n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                       moe_shared_expert_intermediate_size=40, hidden_size=40)
    ad = get_adapter(model)
    names = {id(p): n for n, p in model.named_parameters()}
    want = {
        0: {"mixer.in_proj.weight@1", "mixer.out_proj.weight@0", "norm.weight@0"},
        1: {"mixer.q_proj.weight@1", "mixer.k_proj.weight@1", "mixer.v_proj.weight@1", "mixer.o_proj.weight@0",
            "norm.weight@0"},
        2: {"mixer.up_proj.weight@1", "mixer.down_proj.weight@0", "norm.weight@0"},
        3: {"mixer.gate.weight@1", "mixer.shared_experts.up_proj.weight@1", "mixer.shared_experts.down_proj.weight@0",
            "mixer.experts.up_proj@2", "mixer.experts.down_proj@1", "norm.weight@0"},
    }
    for l, layer in enumerate(ad.layers(model)):
        listed = {names[id(getattr(mod, p))].split(f"layers.{l}.", 1)[1] + f"@{d}" for mod, p, d in ad.hidden_axes(layer)}
        assert listed == want[l], (l, listed ^ want[l])
        for key in listed:  # and each of those axes has the hidden size
            n, d = key.rsplit("@", 1)
            assert model.get_parameter(f"model.layers.{l}.{n}").shape[int(d)] == 40
    assert [type(w).__name__ for w in ad.residual_writers(ad.layers(model)[0])] == ["Linear"]


def test_checkpoint_names_and_pattern_check(model, tmp_path):
    from safetensors import safe_open

    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    ad = get_adapter(model)
    assert ad.checkpoint_prefix(keys) == "backbone"
    assert set(keys) == {ad.checkpoint_name(n) for n in model.state_dict()}
    ad.check_checkpoint_layout(model.config, keys)
    with pytest.raises(ValueError, match="hybrid_override_pattern 'MM\\*-'.*'M\\*M-'"):
        ad.check_checkpoint_layout(tiny_config("MM*-"), keys)
    with pytest.raises(ValueError, match="more layers"):
        ad.check_checkpoint_layout(tiny_config("M*M"), keys)


# ---------------------------------------------------------------------------------------------- selection
def test_group_aware_selection_keeps_the_same_count_per_group():
    scores = torch.tensor([9.0, 8.0, 7.0, 6.0, 1.0, 2.0, 3.0, 0.5])  # group 0 holds every top-4 head
    kept = select_mamba_heads(scores, 2, 4)
    assert kept.tolist() == [0, 1, 5, 6]  # 2 per group, ranked within the group
    assert select_mamba_heads_ignoring_groups(scores, 2, 4).tolist() == [0, 1, 2, 3]
    assert select_mamba_heads(scores, 2, 8).tolist() == list(range(8))
    assert select_mamba_heads(torch.zeros(8), 4, 4).tolist() == [0, 2, 4, 6]  # ties: lower index first
    with pytest.raises(ValueError, match="--mamba-num-heads.*multiple of n_groups=2"):
        select_mamba_heads(scores, 2, 3)
    with pytest.raises(ValueError, match="--mamba-num-heads"):
        select_mamba_heads(scores, 2, 10)
    with pytest.raises(ValueError, match="NaN"):
        select_mamba_heads(torch.tensor([1.0, float("nan"), 0.0, 1.0]), 2, 2)


def test_head_dim_selection_aggregates_over_kept_heads():
    s = torch.zeros(4, 6)
    s[0, 5] = 10.0  # only head 0 likes channel 5
    s[1:, 2] = 1.0
    assert select_mamba_head_dims(s, 1).tolist() == [5]
    assert select_mamba_head_dims(s, 1, heads=torch.tensor([1, 2])).tolist() == [2]
    assert select_mamba_head_dims(s, 2, agg="sum").tolist() == [2, 5]
    with pytest.raises(ValueError, match="--mamba-head-dim"):
        select_mamba_head_dims(s, 7)


def test_targets_are_validated_before_work(model):
    with pytest.raises(ValueError, match="--mamba-num-heads.*n_groups=2"):
        validate_mamba_targets(model.config, mamba_num_heads=5)
    with pytest.raises(ValueError, match="--mamba-head-dim"):
        validate_mamba_targets(model.config, mamba_head_dim=0)
    with pytest.raises(TypeError, match="--ssm-state-size"):
        validate_mamba_targets(model.config, ssm_state_size=8.0)
    with pytest.raises(ValueError, match="no Mamba layers|has none"):
        from transformers import LlamaConfig

        validate_mamba_targets(LlamaConfig(hidden_size=16, num_attention_heads=2, num_hidden_layers=1), mamba_num_heads=2)
    with pytest.raises(TypeError, match="head scores are needed"):
        plan_mamba(model.config, None, mamba_num_heads=4)
    assert validate_mamba_targets(model.config, mamba_num_heads=6) == {"mamba_num_heads": 6, "mamba_head_dim": 16,
                                                                      "ssm_state_size": 16}


# ---------------------------------------------------------------------------------------------- cuts
def test_keep_all_cuts_are_the_identity():
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ar = torch.arange
    plan = mamba_layer_cuts(model.config, "model.layers.0", heads=ar(8), head_dims=ar(16), states=ar(16), hidden=ar(32))
    assert set(plan) == {f"model.layers.0.mixer.{n}" for n in ("in_proj.weight", "conv1d.weight", "conv1d.bias",
                                                              "A_log", "D", "dt_bias", "norm.weight", "out_proj.weight")} | {
        "model.layers.0.norm.weight"}
    assert [c.dim for c in plan["model.layers.0.mixer.in_proj.weight"]] == [0, 1]
    assert [c.dim for c in plan["model.layers.0.mixer.out_proj.weight"]] == [1, 0]
    apply_cut_plan(model, plan, BACKEND)
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def test_cut_rows_follow_the_layout():
    """Head 1 of group 0 and head 6 of group 1 kept, channels {0, 3} inside each head, states {2} of every group:
    the in_proj / conv rows are exactly z, x (those channels), B, C (state 2 of each group), dt (those heads)."""
    cfg = tiny_config()
    plan = mamba_layer_cuts(cfg, "model.layers.2", heads=torch.tensor([1, 6]), head_dims=torch.tensor([0, 3]),
                            states=torch.tensor([2]))
    ch = [16, 19, 96, 99]
    rows = plan["model.layers.2.mixer.in_proj.weight"][0].index.tolist()
    assert rows == ch + [128 + c for c in ch] + [256 + 2, 256 + 16 + 2] + [288 + 2, 288 + 16 + 2] + [321, 326]
    conv = plan["model.layers.2.mixer.conv1d.weight"][0].index.tolist()
    assert conv == ch + [128 + 2, 128 + 18, 160 + 2, 160 + 18]
    assert plan["model.layers.2.mixer.A_log"][0].index.tolist() == [1, 6]
    assert plan["model.layers.2.mixer.norm.weight"][0].index.tolist() == ch
    assert plan["model.layers.2.mixer.out_proj.weight"][0].index.tolist() == ch
    with pytest.raises(ValueError, match="--mamba-num-heads"):
        mamba_layer_cuts(cfg, "model.layers.2", heads=torch.tensor([1, 2, 6]))
    with pytest.raises(ValueError, match="duplicate"):
        mamba_layer_cuts(cfg, "model.layers.2", heads=torch.tensor([1, 1]))


def _capture(model, layer_idx: int, ids):
    """The mixer input (normed hidden) and the gated norm's inputs (scan output y, gate z) of one layer."""
    mixer = model.model.layers[layer_idx].mixer
    got = {}
    h1 = mixer.register_forward_pre_hook(lambda m, a, kw: got.__setitem__("u", (a[0] if a else kw["hidden_states"]).clone()),
                                         with_kwargs=True)
    h2 = mixer.norm.register_forward_pre_hook(lambda m, a: got.update(y=a[0].clone(), z=a[1].clone()))
    h3 = mixer.register_forward_hook(lambda m, a, out: got.__setitem__("out", out.clone()))
    try:
        _logits(model, ids)
    finally:
        for h in (h1, h2, h3):
            h.remove()
    return got


def _gated_norm(y, z, w, group_size, eps):
    g = y.double() * torch.nn.functional.silu(z.double())
    shp = g.shape
    g = g.view(*shp[:-1], shp[-1] // group_size, group_size)
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    return w.double() * g.view(shp)


@pytest.mark.parametrize("keep_heads,keep_dims", [(4, None), (6, 12), (8, 8)])
def test_pruned_mamba_layer_matches_the_reference(tmp_path, keep_heads, keep_dims):
    """Group-aware head (and head-dim) pruning: per Mamba layer, the pruned scan output equals the original's at the
    kept channels, and the layer output equals out_proj[:, kept] @ gated_norm over each group's kept channels.
    The pruned model reloads with plain transformers (no missing/unexpected keys), gives the same logits, and
    generates with a cache."""
    model = make_model()
    ids = batches()[0]["input_ids"]
    before = {l: _capture(model, l, ids) for l in (0, 2)}
    originals = {l: {n: p.detach().clone() for n, p in model.model.layers[l].mixer.named_parameters()} for l in (0, 2)}
    g = torch.Generator().manual_seed(3)
    hs, cs = torch.rand(4, 8, generator=g), torch.rand(4, 8, 16, generator=g)
    plan = plan_mamba(model.config, hs, cs, mamba_num_heads=keep_heads, mamba_head_dim=keep_dims)
    prune_mamba(model, plan, backend=BACKEND)
    P = keep_dims or 16
    assert (model.config.mamba_num_heads, model.config.mamba_head_dim) == (keep_heads, P)
    for l in (0, 2):
        heads = plan.heads[l] if plan.heads[l] is not None else torch.arange(8)
        assert (heads // 4).bincount(minlength=2).tolist() == [keep_heads // 2] * 2  # group-aware
        dims = plan.head_dims[l] if plan.head_dims[l] is not None else torch.arange(16)
        ch = mamba_channels(heads, dims, 16)
        mixer = model.model.layers[l].mixer
        assert mixer.num_heads == keep_heads and mixer.head_dim == P and mixer.norm.group_size == keep_heads * P // 2
        with torch.no_grad():
            got = {}
            h = mixer.norm.register_forward_pre_hook(lambda m, a: got.update(y=a[0].clone()))
            out = mixer(before[l]["u"])
            h.remove()
        ref = before[l]
        torch.testing.assert_close(got["y"], ref["y"][..., ch], rtol=1e-5, atol=1e-5)
        o = originals[l]
        normed = _gated_norm(ref["y"][..., ch], ref["z"][..., ch], o["norm.weight"][ch], keep_heads * P // 2,
                             mixer.norm.variance_epsilon)
        expect = normed @ o["out_proj.weight"][:, ch].double().T
        torch.testing.assert_close(out.double(), expect, rtol=1e-4, atol=1e-5)
        # NOT the original output with the dropped heads' out_proj columns zeroed (the norm's group RMS changed)
        if keep_heads < 8:
            w0 = o["out_proj.weight"].clone()
            w0[:, [c for c in range(128) if c not in set(ch.tolist())]] = 0
            zeroed = _gated_norm(ref["y"], ref["z"], o["norm.weight"], 64, mixer.norm.variance_epsilon) @ w0.double().T
            assert not torch.allclose(out.double(), zeroed, rtol=1e-3, atol=1e-4)
    logits = _logits(model, ids)
    loaded = _reload(model, tmp_path)
    torch.testing.assert_close(_logits(loaded, ids), logits, rtol=0, atol=0)
    out = loaded.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert out.shape == (2, ids.shape[1] + 4)
    # greedy decoding with the recurrent cache gives the same tokens as re-running the full prefix
    full = _logits(loaded, out[:, :-1])[:, ids.shape[1] - 1:].argmax(-1)
    assert torch.equal(full, out[:, ids.shape[1]:])


def test_ignoring_groups_hands_heads_another_groups_b_and_c():
    """Heads kept across group boundaries (ignore-groups selection) are re-grouped by index order: a head that moves
    to another group reads that group's B/C, so its scan output differs from the original's -- the reason for the
    group-aware rule."""
    model = make_model()
    ids = batches()[0]["input_ids"]
    ref = _capture(model, 0, ids)
    scores = torch.tensor([9.0, 8.0, 7.0, 1.0, 0.5, 0.4, 6.0, 0.3])  # top 4: heads 0, 1, 2 (group 0), 6 (group 1)
    kept = select_mamba_heads_ignoring_groups(scores, 2, 4)
    assert kept.tolist() == [0, 1, 2, 6]
    plan = plan_mamba(model.config, torch.stack([scores] * 4), mamba_num_heads=4, group_aware=False)
    prune_mamba(model, plan, backend=BACKEND)
    mixer = model.model.layers[0].mixer
    got = {}
    h = mixer.norm.register_forward_pre_hook(lambda m, a: got.update(y=a[0].clone()))
    with torch.no_grad():
        mixer(ref["u"])
    h.remove()
    y, y0 = got["y"].view(*got["y"].shape[:-1], 4, 16), ref["y"].view(*ref["y"].shape[:-1], 8, 16)
    torch.testing.assert_close(y[..., :2, :], y0[..., :2, :], rtol=1e-5, atol=1e-5)  # heads 0, 1 stay in group 0
    assert not torch.allclose(y[..., 2, :], y0[..., 2, :], rtol=1e-3, atol=1e-4)  # head 2 now reads group 1's B/C
    torch.testing.assert_close(y[..., 3, :], y0[..., 6, :], rtol=1e-5, atol=1e-5)  # head 6 stays in group 1


def test_state_pruning_and_hidden_cuts_reload(tmp_path):
    """Every Mamba axis at once (heads, head dim, state size) on both Mamba layers reloads and generates."""
    model = make_model()
    plan = plan_mamba(model.config, torch.rand(4, 8), torch.rand(4, 8, 16), mamba_num_heads=4, mamba_head_dim=8)
    for l in (0, 2):
        plan.states[l] = torch.tensor([0, 3, 5, 6, 9, 10, 12, 15])
    plan.sizes["ssm_state_size"] = 8
    prune_mamba(model, plan, backend=BACKEND)
    assert model.model.layers[0].mixer.conv1d.weight.shape == (4 * 8 + 2 * 2 * 8, 1, 4)
    ids = batches()[0]["input_ids"]
    logits = _logits(model, ids)
    loaded = _reload(model, tmp_path)
    torch.testing.assert_close(_logits(loaded, ids), logits, rtol=0, atol=0)
    assert loaded.generate(ids, max_new_tokens=3, do_sample=False).shape == (2, ids.shape[1] + 3)


def test_config_update_and_depth(tmp_path):
    """mamba_config_update changes only the Mamba sizes; depth pruning of mixed kinds cuts layers_block_type."""
    from minitron.compress.prune import prune_depth

    cfg = tiny_config()
    before = cfg.to_dict()
    mamba_config_update(cfg, {"mamba_num_heads": 4, "mamba_head_dim": 8})
    after = cfg.to_dict()
    assert {k for k in before if before[k] != after[k]} == {"mamba_num_heads", "mamba_head_dim"}
    assert after["expand"] == before["expand"]
    model = make_model("M*M-M")
    with pytest.raises(ValueError, match="hybrid_override_pattern 'MMM'.*no attention"):
        prune_depth(model, num_hidden_layers=3, layers_to_drop=[1, 3])  # would leave no attention layer
    assert model.config.hybrid_override_pattern == "M*M-M"
    prune_depth(model, num_hidden_layers=3, layers_to_drop=[2, 3])  # a block of mixed kinds: Mamba + MLP
    assert model.config.hybrid_override_pattern == "M*M" and len(model.model.layers) == 3
    assert [layer.layer_idx for layer in model.model.layers] == [0, 1, 2]
    loaded = _reload(model, tmp_path)
    ids = batches()[0]["input_ids"]
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=0)
    assert loaded.generate(ids, max_new_tokens=3, do_sample=False).shape == (2, ids.shape[1] + 3)


# ---------------------------------------------------------------------------------------------- importance
def test_mamba_importance_matches_the_reference(model):
    """Head scores (group_size = head_dim) and channel scores from the out_proj input, masked, equal the fp64
    reference on the captured activations; non-Mamba layers score 0."""
    from minitron.ops import importance_reference

    bs = batches(n=2)
    imp = MambaImportance(model, backend=BACKEND)
    captured = {0: [], 2: []}
    hooks = [model.model.layers[l].mixer.out_proj.register_forward_pre_hook(
        lambda m, a, l=l: captured[l].append(a[0].clone())) for l in (0, 2)]
    imp.attach()
    try:
        for b in bs:
            imp.mask = b["attention_mask"].bool()
            _ = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
    finally:
        imp.detach()
        for h in hooks:
            h.remove()
    heads, chans = imp.head_scores(), imp.channel_scores()
    assert heads.shape == (4, 8) and chans.shape == (4, 8, 16)
    assert not heads[1].any() and not heads[3].any() and not chans[1].any()
    masks = [b["attention_mask"].bool() for b in bs]
    for l in (0, 2):
        torch.testing.assert_close(heads[l], importance_reference(captured[l], masks, group_size=16), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(chans[l].reshape(-1), importance_reference(captured[l], masks), rtol=1e-4, atol=1e-6)
    assert heads[0].min() > 0


# ---------------------------------------------------------------------------------------------- real shapes
def test_published_8b_shape_and_4b_target():
    """nemotron-h-8b builds (meta) with 8,100,852,736 parameters, 24 M / 4 * / 24 - layers; the 4B target's sizes
    are valid Mamba/width targets of it (112 heads = 14 of 16 per group) and build 4,489,223,040 parameters."""
    import json

    from transformers import AutoModelForCausalLM

    from minitron.resources.architectures import architecture_dict, architectures_dir, load_architecture

    cfg = load_architecture("nemotron-h-8b")
    ad = get_adapter(cfg)
    assert ad.pattern(cfg) == "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-"
    assert [ad.layer_kinds(cfg).count(k) for k in ("mamba", "attention", "mlp")] == [24, 4, 24]
    ml = ad.mamba_layout(cfg)
    assert (ml.num_heads, ml.head_dim, ml.n_groups, ml.state_size, ml.d_inner) == (128, 64, 8, 128, 8192)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg)
    assert sum(p.numel() for p in m.parameters()) == 8_100_852_736
    target = json.loads((architectures_dir() / "nemotron-h-4b-target.json").read_text())["target"]
    assert target["base"] == "nemotron-h-8b"
    assert validate_mamba_targets(cfg, **target["mamba"])["mamba_num_heads"] == 112
    small = load_architecture("nemotron-h-4b-target")
    assert {k: getattr(small, k) for k in target["width"]} == target["width"]
    assert ad.pattern(small) == target["hybrid_override_pattern"] == ad.pattern(cfg)
    with torch.device("meta"):
        m4 = AutoModelForCausalLM.from_config(small)
    assert sum(p.numel() for p in m4.parameters()) == 4_489_223_040
    assert architecture_dict("nemotron-h-4b-target")["mamba_num_heads"] == 112


# ---------------------------------------------------------------------------------------------- the driver paths
def _estimate(model, bs, **kw):
    from minitron.compress.importance import estimate_importance

    return estimate_importance(model, bs, progress=False, backend=BACKEND, **kw)


def test_estimate_importance_on_a_hybrid_model():
    """estimate_importance scores Mamba heads/channels (equal to MambaImportance), attention heads only on the
    attention layer, MLP neurons only on the MLP layer, every layer's norm for the channels, and depth on mixed
    kinds (the LM-loss drop swaps each layer for a skip that keeps the layer's block_type)."""
    model = make_model()
    bs = batches(n=2)
    s = _estimate(model, bs)
    assert s.mamba_heads.shape == (4, 8) and s.mamba_channels.shape == (4, 8, 16)
    imp = MambaImportance(model, backend=BACKEND)
    imp.attach()
    with torch.no_grad():
        for b in bs:
            imp.mask = b["attention_mask"].bool()
            model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
    imp.detach()
    torch.testing.assert_close(s.mamba_heads, imp.head_scores())
    torch.testing.assert_close(s.mamba_channels, imp.channel_scores())
    assert s.heads[1].min() > 0 and not s.heads[[0, 2, 3]].any()
    assert s.neurons[3].min() > 0 and not s.neurons[:3].any()
    assert s.channels.min() > 0 and torch.isfinite(s.block_influence).all()
    assert s.lm_loss_drop is not None and torch.isfinite(s.lm_loss_drop).all()
    sel = s.select_layers([0, 1, 3])
    assert sel.mamba_heads.shape == (3, 8) and torch.equal(sel.mamba_channels[2], s.mamba_channels[3])


def test_prune_width_hybrid_every_axis(tmp_path):
    """prune_width on Nemotron-H: Mamba heads (group-aware) and head dim, attention heads, MLP neurons and the hidden
    size in one call; the result reloads with plain transformers (same logits) and generates with a cache."""
    from minitron.compress.prune import prune_width

    model = make_model()
    scores = _estimate(model, batches(), layer_metrics=("block_influence",))
    prune_width(model, scores, hidden_size=24, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
                mamba_num_heads=4, mamba_head_dim=8, backend=BACKEND)
    c = model.config
    assert (c.hidden_size, c.num_attention_heads, c.intermediate_size, c.mamba_num_heads, c.mamba_head_dim) == \
        (24, 2, 32, 4, 8)
    assert model.model.layers[0].mixer.in_proj.weight.shape == (2 * 32 + 2 * 2 * 16 + 4, 24)
    ids = batches()[0]["input_ids"]
    logits = _logits(model, ids)
    assert torch.isfinite(logits).all()
    loaded = _reload(model, tmp_path)
    torch.testing.assert_close(_logits(loaded, ids), logits, rtol=0, atol=0)
    assert loaded.generate(ids, max_new_tokens=3, do_sample=False).shape == (2, ids.shape[1] + 3)


def test_prune_width_mamba_heads_are_group_aware():
    """The heads prune_width keeps in each Mamba layer are, per SSM group, that group's best by scores.mamba_heads."""
    from minitron.compress.prune import plan_width
    from minitron.compress.stream_prune import random_importance

    cfg = tiny_config()
    scores = random_importance(cfg, seed=3)
    scores.mamba_heads[0] = torch.tensor([9.0, 8.0, 7.0, 6.0, 1.0, 2.0, 3.0, 0.5])
    plan = plan_width(cfg, scores, mamba_num_heads=4)
    assert plan.mamba.heads[0].tolist() == [0, 1, 5, 6] and plan.mamba.heads[1] is None
    assert plan.changes and plan.hidden is None and all(h is None for h in plan.heads)


def test_bad_hybrid_targets_refused_before_work(tmp_path):
    from minitron.compress.prune import prune_width, validate_width_targets
    from minitron.compress.stream_prune import random_importance

    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="--mamba-num-heads"):
        prune_width(model, random_importance(model.config), mamba_num_heads=5, backend=BACKEND)
    with pytest.raises(ValueError, match="mamba_head_dim=17 is larger"):
        validate_width_targets(model.config, mamba_head_dim=17)
    with pytest.raises(ValueError, match="no Mamba layers"):
        from transformers import LlamaConfig

        validate_width_targets(LlamaConfig(hidden_size=16, num_attention_heads=2, num_hidden_layers=1), mamba_num_heads=2)
    with pytest.raises(TypeError, match="unexpected keyword"):
        prune_width(model, None, mamba_state=4)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def _safetensors(d):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_streamed_prune_equals_in_memory(tmp_path):
    """prune_checkpoint_streaming on a saved Nemotron-H (backbone.* names on disk) with Mamba + width targets and a
    dropped block of mixed kinds writes tensor-for-tensor what the in-memory path saves, with the same config; the
    output reloads and generates. A config whose pattern does not match the layers on disk is refused."""
    from minitron.compress.prune import prune_depth, prune_width
    from minitron.compress.stream_prune import prune_checkpoint_streaming
    from minitron.io.checkpoint import save_model

    model = make_model("M*M-M")
    src = tmp_path / "src"
    model.save_pretrained(src)
    scores = _estimate(model, batches(), layer_metrics=("block_influence",))
    targets = dict(hidden_size=24, intermediate_size=32, mamba_num_heads=6, mamba_head_dim=12)
    streamed = prune_checkpoint_streaming(src, tmp_path / "streamed", scores=scores, width_targets=targets,
                                          drop_layers=[2, 3], backend=BACKEND, progress=False)
    prune_width(model, scores, backend=BACKEND, **targets)
    prune_depth(model, num_hidden_layers=3, layers_to_drop=[2, 3])
    save_model(model, tmp_path / "mem")
    a, b = _safetensors(streamed), _safetensors(tmp_path / "mem")
    assert set(a) == set(b) and all(k.startswith(("backbone.", "lm_head.")) for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    import json

    ca, cb = (json.loads((d / "config.json").read_text()) for d in (streamed, tmp_path / "mem"))
    assert ca == cb and ca["layers_block_type"] == ["linear_attention", "full_attention", "linear_attention"]
    loaded = _reload_dir(streamed)
    ids = batches()[0]["input_ids"]
    assert loaded.generate(ids, max_new_tokens=3, do_sample=False).shape == (2, ids.shape[1] + 3)
    # a config.json whose pattern does not match the layers on disk: refused before anything is written
    cfg = json.loads((src / "config.json").read_text())
    cfg["layers_block_type"] = ["linear_attention", "linear_attention", "full_attention", "mlp", "linear_attention"]
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="hybrid_override_pattern 'MM\\*-M'"):
        prune_checkpoint_streaming(src, tmp_path / "bad", scores=None, drop_layers=[4], backend=BACKEND, progress=False)
    assert not (tmp_path / "bad").exists()


def _reload_dir(d):
    from transformers import AutoModelForCausalLM

    loaded, info = AutoModelForCausalLM.from_pretrained(d, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return loaded.float().eval()


def test_streamed_importance_equals_in_memory(tmp_path):
    """Layer-streamed importance of a saved Nemotron-H (backbone.* names on disk) equals the in-memory scores,
    Mamba scores, LM-loss drop and block influence included."""
    from minitron.compress.streaming import estimate_importance_streaming

    model = make_model("M*M-M")
    model.save_pretrained(tmp_path)
    bs = batches(n=2)
    a = _estimate(model, bs)
    b = estimate_importance_streaming(tmp_path, bs, progress=False, backend=BACKEND)
    for f in ("heads", "neurons", "channels", "block_influence", "lm_loss_drop", "mamba_heads", "mamba_channels"):
        torch.testing.assert_close(getattr(b, f), getattr(a, f), rtol=1e-5, atol=1e-6, msg=f)


def test_api_prune_takes_the_mamba_targets(tmp_path):
    """minitron.api.prune (the CLI's --mamba-num-heads / --mamba-head-dim) prunes a Nemotron-H in memory and saves
    a checkpoint that reloads; a head count that does not divide over the groups is refused naming the flag."""
    from minitron import api
    from minitron.specs import PruneSpec

    model = make_model()
    scores = _estimate(model, batches(), layer_metrics=("block_influence",))
    assert PruneSpec(mamba_num_heads=4).width["mamba_num_heads"] == 4 and PruneSpec(mamba_num_heads=4).wants_width
    with pytest.raises(ValueError, match="--mamba-num-heads"):
        api.prune(model, importance=scores, mamba_num_heads=3)
    out = api.prune(model, importance=scores, mamba_num_heads=4, mamba_head_dim=8, output_dir=tmp_path / "out")
    assert out.config.mamba_num_heads == 4 and model.config.mamba_num_heads == 8  # a loaded model is copied
    loaded = _reload_dir(tmp_path / "out")
    assert (loaded.config.mamba_num_heads, loaded.config.mamba_head_dim) == (4, 8)


def test_hidden_pruning_with_moe_layers_in_memory(tmp_path):
    """A Nemotron-H with an MoE (E) layer: hidden-size pruning cuts the fused 3-D expert tensors too (in memory) and
    the result reloads with the same logits; expert pruning is refused before any work."""
    from minitron.compress.prune import prune_width
    from minitron.compress.stream_prune import random_importance

    model = make_model("M*-E", n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                       moe_shared_expert_intermediate_size=40, hidden_size=40)
    ids = batches()[0]["input_ids"]
    prune_width(model, random_importance(model.config), hidden_size=32, backend=BACKEND)
    experts = model.model.layers[3].mixer.experts
    assert experts.up_proj.shape == (4, 24, 32) and experts.down_proj.shape == (4, 32, 24)
    logits = _logits(model, ids)
    torch.testing.assert_close(_logits(_reload(model, tmp_path), ids), logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="num_experts=2"):
        prune_width(model, random_importance(model.config), num_experts=2, backend=BACKEND)
