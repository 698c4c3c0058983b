"""Width and depth pruning: equivalence with zeroing/bypassing, identity, generation, bad inputs."""
from __future__ import annotations

import copy

import pytest
import torch

from minitron.models import get_adapter
from minitron.compress.prune import (WidthPlan, _apply_width_plan, plan_depth, prune_depth, prune_width,
                            validate_width_targets)
from tests.driver.conftest import (BACKEND, assert_unchanged, logits_of, make_batches, make_model,
                                   random_scores, snapshot, tiny_config)

TOL = dict(rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- independent keep sets
def kept_neurons(scores, k):
    return [torch.topk(s, k).indices.sort().values for s in scores.neurons]


def kept_heads(scores, n_heads, n_kv):
    """Per layer: kept query heads (original indices), chosen independently of minitron.prune."""
    L, H = scores.heads.shape
    G = scores.kv_groups.shape[1]
    per = H // G
    out = []
    for l in range(L):
        groups = torch.topk(scores.kv_groups[l], n_kv).indices.sort().values if n_kv < G else torch.arange(G)
        keep = []
        for g in groups.tolist():
            block = scores.heads[l, g * per:(g + 1) * per]
            keep += (g * per + torch.topk(block, n_heads // n_kv).indices.sort().values).tolist()
        out.append(torch.tensor(keep))
    return out


def kept_channels(scores, k):
    return torch.topk(scores.channels, k).indices.sort().values


# ----------------------------------------------------------------------------- reference hooks
def zero_hooks(model, *, heads=None, neurons=None, channels=None):
    """Hooks on the unpruned model: zero dropped heads (o_proj input) / neurons (down_proj input); make
    every residual norm see only the kept channels (RMS over kept channels, zeros elsewhere)."""
    ad = get_adapter(model)
    d = ad.dims(model.config)
    handles = []
    for l, layer in enumerate(ad.layers(model)):
        if heads is not None:
            drop = torch.ones(d.num_attention_heads, dtype=torch.bool)
            drop[heads[l]] = False

            def pre_o(m, args, drop=drop):
                x = args[0].view(*args[0].shape[:-1], d.num_attention_heads, d.head_dim).clone()
                x[..., drop, :] = 0
                return (x.view(args[0].shape),)

            handles.append(ad.o_proj(layer).register_forward_pre_hook(pre_o))
        if neurons is not None:
            dropn = torch.ones(d.intermediate_size, dtype=torch.bool)
            dropn[neurons[l]] = False

            def pre_down(m, args, drop=dropn):
                x = args[0].clone()
                x[..., drop] = 0
                return (x,)

            handles.append(ad.down_proj(layer).register_forward_pre_hook(pre_down))
    if channels is not None:
        norms = [n for layer in ad.layers(model) for n in ad.layer_norms(layer)] + [ad.final_norm(model)]

        def norm_hook(m, args, out):
            x = args[0].float()[..., channels]
            if hasattr(m, "variance_epsilon"):  # Llama-style RMSNorm: normed * w
                y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.variance_epsilon) * m.weight[channels]
            else:  # Gemma RMSNorm: normed * (1 + w), in fp32
                y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.eps) * (1.0 + m.weight[channels].float())
            full = torch.zeros_like(out)
            full[..., channels] = y.to(out.dtype)
            return full

        handles += [n.register_forward_hook(norm_hook) for n in norms]
    return handles


def check_width(family, tie=False, **targets):
    model = make_model(family, tie=tie)
    ref = copy.deepcopy(model)
    scores = random_scores(model)
    batches = make_batches()
    base = logits_of(model, batches)
    H = targets.get("num_attention_heads")
    KV = targets.get("num_key_value_heads", 2)
    handles = zero_hooks(
        ref,
        heads=kept_heads(scores, H, KV) if H is not None else None,
        neurons=kept_neurons(scores, targets["intermediate_size"]) if "intermediate_size" in targets else None,
        channels=kept_channels(scores, targets["hidden_size"]) if "hidden_size" in targets else None,
    )
    expect = logits_of(ref, batches)
    for h in handles:
        h.remove()
    assert (expect - base).abs().max() > 1e-2, "reference must differ from the unpruned model"
    out = prune_width(model, scores, **targets, backend=BACKEND)
    assert out is model
    got = logits_of(model, batches)
    torch.testing.assert_close(got, expect, **TOL)
    return model


# ----------------------------------------------------------------------------- width equivalences
def test_prune_neurons_equals_zeroing(family):
    m = check_width(family, intermediate_size=40)
    assert m.config.intermediate_size == 40
    assert get_adapter(m).down_proj(get_adapter(m).layers(m)[0]).weight.shape[1] == 40


def test_prune_heads_within_groups_equals_zeroing(family):
    m = check_width(family, num_attention_heads=4)
    assert m.config.num_attention_heads == 4 and m.config.num_key_value_heads == 2
    assert m.config.head_dim == (12 if family in ("qwen3", "gemma3_text") else 8)


def test_prune_kv_groups_equals_zeroing(family):
    m = check_width(family, num_attention_heads=2, num_key_value_heads=1)
    assert (m.config.num_attention_heads, m.config.num_key_value_heads) == (2, 1)


def test_prune_channels_equals_kept_channel_norms(family):
    """Embedding-channel pruning equals the unpruned model whose norms see only the kept channels.

    (Zeroing channels alone is not exact: RMSNorm divides by the channel count, which pruning changes.)
    """
    m = check_width(family, hidden_size=24)
    assert m.config.hidden_size == 24
    assert m.model.embed_tokens.weight.shape == (96, 24) and m.lm_head.weight.shape == (96, 24)


@pytest.mark.parametrize("fam", ["llama", "phi3", "qwen3"])
def test_prune_everything_at_once(fam):
    check_width(fam, hidden_size=24, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1)


def test_tied_embeddings_stay_tied():
    m = check_width("qwen2", tie=True, hidden_size=24)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert m.config.tie_word_embeddings


def test_mha_model_prunes_kv_heads_with_heads():
    model = make_model("llama", num_key_value_heads=6)
    prune_width(model, random_scores(model), num_attention_heads=3, backend=BACKEND)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (3, 3)
    model(input_ids=torch.randint(3, 96, (1, 5)))


def module_ints(model):
    return {name: {k: v for k, v in vars(mod).items() if isinstance(v, (int, str, float)) and not k.startswith("_")}
            for name, mod in model.named_modules()}


def test_module_attributes_match_fresh_model(family):
    """Every size attribute of the pruned modules equals a model freshly built from the pruned config."""
    from transformers import AutoModelForCausalLM

    model = make_model(family)
    prune_width(model, random_scores(model), hidden_size=24, intermediate_size=32, num_attention_heads=2,
                num_key_value_heads=1, backend=BACKEND)
    prune_depth(model, num_hidden_layers=3, layers_to_drop=[1])
    fresh = AutoModelForCausalLM.from_config(copy.deepcopy(model.config)).eval()
    assert module_ints(model) == module_ints(fresh)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in fresh.state_dict().items()}


def test_keep_everything_is_identity(family):
    model = make_model(family)
    snap = snapshot(model)
    out = prune_width(model, random_scores(model), hidden_size=48, intermediate_size=64, num_attention_heads=6,
                      num_key_value_heads=2, backend=BACKEND)
    assert out is model
    assert_unchanged(model, snap)
    assert prune_depth(model, num_hidden_layers=4) is model
    assert_unchanged(model, snap)


def test_full_index_gather_is_identity(family):
    """The weight-cutting machinery with every unit kept reproduces the model exactly."""
    model = make_model(family)
    batches = make_batches()
    base = logits_of(model, batches)
    snap = snapshot(model)
    ad = get_adapter(model)
    L = 4
    plan = WidthPlan(hidden=torch.arange(48), heads=[torch.arange(6)] * L, kv=[torch.arange(2)] * L,
                     neurons=[torch.arange(64)] * L,
                     sizes=dict(hidden_size=48, intermediate_size=64, num_attention_heads=6, num_key_value_heads=2))
    with torch.no_grad():
        _apply_width_plan(model, ad, plan, BACKEND)
    state, _ = snap
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    torch.testing.assert_close(logits_of(model, batches), base, rtol=0, atol=0)


# ----------------------------------------------------------------------------- depth
def bypass(model, layers):
    def hook(m, args, kwargs, out):
        h = args[0] if args else kwargs["hidden_states"]
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

    ad = get_adapter(model)
    return [ad.layers(model)[i].register_forward_hook(hook, with_kwargs=True) for i in layers]


@pytest.mark.parametrize("drop", [[1, 2], [0, 3]])
def test_removing_layers_equals_bypassing(family, drop):
    model = make_model(family)
    ref = copy.deepcopy(model)
    batches = make_batches(seq=16)
    hs = bypass(ref, drop)
    expect = logits_of(ref, batches)
    for h in hs:
        h.remove()
    assert (expect - logits_of(model, batches)).abs().max() > 1e-2
    prune_depth(model, num_hidden_layers=2, layers_to_drop=drop)
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    assert [l.self_attn.layer_idx for l in model.model.layers] == [0, 1]
    torch.testing.assert_close(logits_of(model, batches), expect, **TOL)
    if family == "qwen2":
        full = ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
        assert model.config.layer_types == [full[i] for i in range(4) if i not in drop]


def test_generation_with_cache_after_depth_pruning(family):
    model = make_model(family)
    prune_depth(model, num_hidden_layers=2, layers_to_drop=[0, 2])
    prompt = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        a = model.generate(prompt, use_cache=True, **kw)
        b = model.generate(prompt, use_cache=False, **kw)
    assert a.shape == (2, 17)
    assert torch.equal(a, b)


def test_generation_with_cache_after_width_pruning(family):
    model = make_model(family)
    prune_width(model, random_scores(model), hidden_size=24, num_attention_heads=2, num_key_value_heads=1, backend=BACKEND)
    prompt = torch.randint(3, 96, (1, 5), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        assert torch.equal(model.generate(prompt, use_cache=True, **kw), model.generate(prompt, use_cache=False, **kw))


def test_depth_plan_by_scores():
    cfg = tiny_config("llama", num_hidden_layers=6)
    model = make_model("llama", num_hidden_layers=6)
    s = random_scores(model)
    s.lm_loss_drop = torch.tensor([5.0, 0.1, 3.0, 0.2, 0.3, 4.0])
    s.block_influence = torch.tensor([0.9, 0.8, 0.1, 0.7, 0.2, 0.6])
    assert plan_depth(cfg, num_hidden_layers=4, scores=s, contiguous=False) == [1, 3]
    assert plan_depth(cfg, num_hidden_layers=4, scores=s, contiguous=True) == [3, 4]
    assert plan_depth(cfg, num_hidden_layers=3, scores=s, contiguous=True) == [1, 2, 3] or \
        plan_depth(cfg, num_hidden_layers=3, scores=s, contiguous=True) == [2, 3, 4]
    assert plan_depth(cfg, num_hidden_layers=4, scores=s, metric="block_influence", contiguous=False) == [2, 4]
    assert plan_depth(cfg, num_hidden_layers=5, scores=s, metric="block_influence") == [2]
    prune_depth(model, num_hidden_layers=4, scores=s, contiguous=False)
    assert model.config.num_hidden_layers == 4


def test_depth_after_width_uses_layer_scores_only():
    model = make_model("qwen3")
    s = random_scores(model)
    prune_width(model, s, intermediate_size=32, backend=BACKEND)
    prune_depth(model, num_hidden_layers=3, scores=s, metric="block_influence")
    assert model.config.num_hidden_layers == 3


# ----------------------------------------------------------------------------- bad inputs
WIDTH_BAD = [
    (dict(hidden_size=64), ValueError, "larger"),
    (dict(intermediate_size=0), ValueError, ">= 1"),
    (dict(num_attention_heads=5), ValueError, "multiple"),
    (dict(num_attention_heads=4, num_key_value_heads=3), ValueError, "larger"),
    (dict(num_attention_heads=6, num_key_value_heads=1), ValueError, "per KV group"),
    (dict(num_attention_heads=3, num_key_value_heads=2), ValueError, "multiple"),
    (dict(hidden_size=24.0), TypeError, "int"),
    (dict(num_attention_heads=True), TypeError, "int"),
]


@pytest.mark.parametrize("targets,exc,match", WIDTH_BAD)
def test_bad_width_targets_raise_before_work(family, targets, exc, match):
    model = make_model(family)
    snap = snapshot(model)
    with pytest.raises(exc, match=match):
        validate_width_targets(model.config, **targets)
    with pytest.raises(exc, match=match):
        prune_width(model, random_scores(model), **targets, backend=BACKEND)
    assert_unchanged(model, snap)


def test_llama_hidden_heads_divisibility():
    model = make_model("llama")
    snap = snapshot(model)
    with pytest.raises(ValueError, match="hidden_size % num_attention_heads"):
        prune_width(model, random_scores(model), hidden_size=40, backend=BACKEND)
    with pytest.raises(ValueError, match="hidden_size % num_attention_heads"):
        prune_width(model, random_scores(model), num_attention_heads=4, hidden_size=42, backend=BACKEND)
    assert_unchanged(model, snap)
    # Mistral/Qwen/Phi-3 (without longrope) accept it: head_dim is explicit
    for fam in ("mistral", "qwen2", "qwen3", "phi3"):
        validate_width_targets(tiny_config(fam), hidden_size=40)


def phi3_longrope(**kw):
    head = 8
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * (head // 2),
            "long_factor": [2.0] * (head // 2), "original_max_position_embeddings": 64}
    return make_model("phi3", rope_parameters=rope, max_position_embeddings=128,
                      original_max_position_embeddings=64, **kw)


def test_phi3_longrope_limitation():
    model = phi3_longrope()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="longrope"):
        prune_width(model, random_scores(model), num_attention_heads=4, backend=BACKEND)
    with pytest.raises(ValueError, match="longrope"):
        prune_width(model, random_scores(model), hidden_size=24, backend=BACKEND)
    assert_unchanged(model, snap)
    # keeping hidden/heads == head_dim is fine
    prune_width(model, random_scores(model), hidden_size=24, num_attention_heads=3, num_key_value_heads=1,
                intermediate_size=32, backend=BACKEND)
    model(input_ids=torch.randint(3, 96, (1, 6)))


def test_scores_from_other_model_refused():
    model = make_model("mistral")
    other = make_model("mistral", intermediate_size=80)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="different model"):
        prune_width(model, random_scores(other), intermediate_size=32, backend=BACKEND)
    with pytest.raises(ValueError, match="different model"):
        prune_width(model, random_scores(make_model("llama")), intermediate_size=32, backend=BACKEND)
    with pytest.raises(TypeError, match="ImportanceScores"):
        prune_width(model, None, intermediate_size=32, backend=BACKEND)
    s = random_scores(model)
    s.neurons[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        prune_width(model, s, intermediate_size=32, backend=BACKEND)
    assert_unchanged(model, snap)


def test_unknown_model_type_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(ValueError, match="supported model types"):
        prune_width(model, None, hidden_size=8, backend=BACKEND)
    with pytest.raises(ValueError, match="supported model types"):
        prune_depth(model, num_hidden_layers=1, layers_to_drop=[])


DEPTH_BAD = [
    (dict(num_hidden_layers=5), ValueError, r"\[1, 4\]"),
    (dict(num_hidden_layers=0), ValueError, r"\[1, 4\]"),
    (dict(num_hidden_layers="2"), TypeError, "int"),
    (dict(num_hidden_layers=2, layers_to_drop=[1]), ValueError, "drops 2"),
    (dict(num_hidden_layers=2, layers_to_drop=[1, 1]), ValueError, "duplicate"),
    (dict(num_hidden_layers=2, layers_to_drop=[1, 4]), ValueError, "out of range"),
    (dict(num_hidden_layers=2), TypeError, "ImportanceScores"),
    (dict(num_hidden_layers=2, metric="ppl", layers_to_drop=[0, 1]), ValueError, "metric"),
    (dict(num_hidden_layers=2, scores="no-lm"), ValueError, "lm_loss_drop"),
    (dict(num_hidden_layers=2, scores="other"), ValueError, "different model"),
]


@pytest.mark.parametrize("kwargs,exc,match", DEPTH_BAD)
def test_bad_depth_inputs_raise_before_work(kwargs, exc, match):
    model = make_model("qwen2")
    kwargs = dict(kwargs)
    if kwargs.get("scores") == "no-lm":
        kwargs["scores"] = random_scores(model, lm_loss=False)
    elif kwargs.get("scores") == "other":
        kwargs["scores"] = random_scores(make_model("qwen2", num_hidden_layers=3))
    snap = snapshot(model)
    with pytest.raises(exc, match=match):
        prune_depth(model, **kwargs)
    assert_unchanged(model, snap)
    assert len(model.model.layers) == 4


@pytest.mark.parametrize("bad,exc", [("bogus", ValueError), ("cuda", RuntimeError), (3, TypeError)])
def test_unusable_slicing_backend_refused_before_work(bad, exc):
    model = make_model("phi3")
    snap = snapshot(model)
    with pytest.raises(exc):
        prune_width(model, random_scores(model), intermediate_size=32, backend=bad)
    assert_unchanged(model, snap)


# ----------------------------------------------------------------------------- pruning record and width transforms
def test_pruning_record_composes_width_then_depth_and_twice(tmp_path):
    """config.minitron_pruning maps student layers/channels to the teacher's, composed over successive prunes and
    kept through save_pretrained / from_pretrained (transformers keeps unknown config attributes)."""
    from transformers import AutoModelForCausalLM

    from minitron.compress.prune import PRUNING_RECORD

    model = make_model("qwen3")
    scores = random_scores(model, seed=5)
    ch1 = kept_channels(scores, 32).tolist()
    prune_width(model, scores, hidden_size=32, backend=BACKEND)
    rec = getattr(model.config, PRUNING_RECORD)
    assert rec == {"source_num_hidden_layers": 4, "kept_layers": [0, 1, 2, 3], "source_hidden_size": 48,
                   "kept_channels": ch1}
    prune_depth(model, num_hidden_layers=3, layers_to_drop=[1])
    assert getattr(model.config, PRUNING_RECORD)["kept_layers"] == [0, 2, 3]
    # a second round on the pruned model composes with the first
    scores2 = random_scores(model, seed=6)
    ch2 = kept_channels(scores2, 24).tolist()
    prune_width(model, scores2, hidden_size=24, num_attention_heads=4, num_key_value_heads=2, backend=BACKEND)
    prune_depth(model, num_hidden_layers=2, layers_to_drop=[0])
    rec = getattr(model.config, PRUNING_RECORD)
    assert rec["kept_layers"] == [2, 3] and rec["source_num_hidden_layers"] == 4
    assert rec["kept_channels"] == [ch1[c] for c in ch2] and rec["source_hidden_size"] == 48
    model.save_pretrained(str(tmp_path))
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert getattr(again.config, PRUNING_RECORD) == rec


def test_pruning_record_without_hidden_cut():
    from minitron.compress.prune import PRUNING_RECORD

    model = make_model("llama")
    prune_width(model, random_scores(model), intermediate_size=32, backend=BACKEND)
    rec = getattr(model.config, PRUNING_RECORD)
    assert rec["kept_channels"] is None and rec["source_hidden_size"] == 48 and rec["kept_layers"] == [0, 1, 2, 3]


def test_width_transforms_hook_applied_after_cuts(monkeypatch):
    """ModelAdapter.width_transforms: each named tensor goes through its function after its cuts, once."""
    from minitron.models.base import ModelAdapter

    calls = []

    def transforms(self, before, after):
        calls.append((before.hidden_size, after.hidden_size))
        return {"model.embed_tokens.weight": lambda t: t * 2.0, "model.norm.weight": lambda t: t + 1.0}

    model = make_model("mistral")
    ref = copy.deepcopy(model)
    scores = random_scores(model)
    monkeypatch.setattr(ModelAdapter, "width_transforms", transforms)
    prune_width(model, scores, hidden_size=32, backend=BACKEND)
    keep = kept_channels(scores, 32)
    assert calls == [(48, 32)]
    torch.testing.assert_close(model.model.embed_tokens.weight, ref.model.embed_tokens.weight[:, keep] * 2.0,
                               rtol=0, atol=0)
    torch.testing.assert_close(model.model.norm.weight, ref.model.norm.weight[keep] + 1.0, rtol=0, atol=0)
    torch.testing.assert_close(model.lm_head.weight, ref.lm_head.weight[:, keep], rtol=0, atol=0)
