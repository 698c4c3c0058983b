"""Mixture-of-experts families (Qwen3-MoE, Qwen2-MoE with a shared expert, Mixtral): expert importance, expert
and expert-width pruning in memory and shard-streamed, reload, generation, bad inputs."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minitron.compress.importance import ImportanceScores, estimate_importance
from minitron.compress.prune import PRUNING_RECORD, prune_depth, prune_width, validate_width_targets
from minitron.compress.stream_prune import prune_checkpoint_streaming, random_importance
from minitron.models import get_adapter
from tests.driver.conftest import BACKEND, logits_of, make_batches

MOE_FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral")

_COMMON = dict(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=4, num_attention_heads=6,
               num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
               rms_norm_eps=1e-6)


def _grouped_backend() -> str:
    """The grouped accumulator's compiled backend when built, else its torch reference (chosen explicitly)."""
    from minitron.ops.grouped_importance import GroupedImportanceAccumulator

    try:
        GroupedImportanceAccumulator(1, 1).update(torch.zeros(1, 1), torch.tensor([0, 1]))
        return "auto"
    except Exception:  # no native grouped kernel in this build
        return "reference"


IMP_BACKEND = _grouped_backend()


def moe_config(family: str, **overrides):
    """A tiny config: 6 experts of width 20, top-2; Qwen3-MoE with a dense layer (mlp_only_layers=[1]) and
    renormalised top-k, Qwen2-MoE with a shared expert of width 24 and a dense layer 2, Mixtral all-MoE."""
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    kw = dict(_COMMON)
    if family == "qwen3_moe":
        cls = Qwen3MoeConfig
        kw.update(head_dim=12, moe_intermediate_size=20, num_experts=6, num_experts_per_tok=2, norm_topk_prob=True,
                  mlp_only_layers=[1])
    elif family == "qwen2_moe":
        cls = Qwen2MoeConfig
        kw.update(moe_intermediate_size=20, shared_expert_intermediate_size=24, num_experts=6, num_experts_per_tok=2,
                  mlp_only_layers=[2])
    elif family == "mixtral":
        cls = MixtralConfig
        kw.update(intermediate_size=20, num_local_experts=6, num_experts_per_tok=2)
    else:
        raise KeyError(family)
    kw.update(overrides)
    return cls(**kw)


def make_moe_model(family: str, seed: int = 0, **overrides):
    """A tiny fp32 MoE model with O(1) activations (routers scaled up so routing is decisive), in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(moe_config(family, **overrides))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.float().eval()


def moe_width(family: str) -> dict:
    w = dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, num_experts=3, moe_intermediate_size=12)
    if family != "mixtral":
        w["intermediate_size"] = 40
    if family == "qwen2_moe":
        w["shared_expert_intermediate_size"] = 10
    return w


@pytest.fixture(params=MOE_FAMILIES)
def moe_family(request) -> str:
    return request.param


# ---------------------------------------------------------------------------------------------- adapters
def test_adapter_moe_dims(moe_family):
    model = make_moe_model(moe_family)
    ad = get_adapter(model)
    m = ad.moe_dims(model.config)
    assert (m.num_experts, m.num_experts_per_tok, m.moe_intermediate_size) == (6, 2, 20)
    assert m.shared_expert_intermediate_size == (24 if moe_family == "qwen2_moe" else None)
    dense = {"qwen3_moe": [1], "qwen2_moe": [2], "mixtral": []}[moe_family]
    assert [i for i, f in enumerate(m.moe_layers) if not f] == dense
    assert [not ad.is_moe_layer(l) for l in ad.layers(model)] == [not f for f in m.moe_layers]
    ex = ad.experts(ad.layers(model)[0])
    assert tuple(ex.gate_up_proj.shape) == (6, 40, 48) and tuple(ex.down_proj.shape) == (6, 48, 20)
    assert tuple(ad.router(ad.layers(model)[0]).weight.shape) == (6, 48)
    fp = ad.fingerprint(model.config)
    assert fp["num_experts"] == 6 and fp["moe_intermediate_size"] == 20


# ---------------------------------------------------------------------------------------------- importance
def test_capture_leaves_logits_unchanged(moe_family):
    """The experts' forward replaced during calibration returns bitwise the output of transformers' own."""
    from minitron.compress.importance import _Collector

    model = make_moe_model(moe_family)
    batches = make_batches(seq=12)
    ref = logits_of(model, batches)
    ad = get_adapter(model)
    col = _Collector(model, ad, seq_agg="mean", batch_agg="l2", block_influence=False, backend=IMP_BACKEND,
                     device=torch.device("cpu"), dtype=torch.float32)
    col.attach()
    try:
        outs = []
        with torch.no_grad():
            for b in batches:
                col.mask = b["attention_mask"].bool()
                outs.append(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                            * b["attention_mask"][..., None])
    finally:
        col.detach()
    assert torch.equal(torch.cat(outs), ref)
    assert all("forward" not in ad.experts(l).__dict__ for l in ad.layers(model) if ad.is_moe_layer(l))
    assert torch.equal(logits_of(model, batches), ref)


def _expert_reference(model, batches):
    """Plain-torch per-expert loop: expert-neuron scores (mean over routed tokens per sample, L2 over samples), the
    L2 norm of router-weighted outputs over all routed tokens, routing counts; per MoE layer."""
    ad = get_adapter(model)
    m = ad.moe_dims(model.config)
    inputs: dict[int, list] = {}
    hooks = [ad.mlp(l).register_forward_pre_hook(lambda mod, a, i=i: inputs.setdefault(i, []).append(a[0]))
             for i, l in enumerate(ad.layers(model)) if ad.is_moe_layer(l)]
    with torch.no_grad():
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    for h in hooks:
        h.remove()
    out = {}
    for i, xs in inputs.items():
        layer = ad.layers(model)[i]
        ex, router = ad.experts(layer), ad.router(layer)
        neur_sq = torch.zeros(m.num_experts, m.moe_intermediate_size, dtype=torch.float64)
        out_sq = torch.zeros(m.num_experts, dtype=torch.float64)
        rows = torch.zeros(m.num_experts, dtype=torch.long)
        for x, b in zip(xs, batches):
            mask = b["attention_mask"].bool()
            _, w, idx = router(x.reshape(-1, x.shape[-1]))
            B, S, _ = x.shape
            w, idx = w.view(B, S, -1).double(), idx.view(B, S, -1)
            for e in range(m.num_experts):
                for s in range(B):
                    sel = ((idx[s] == e) & mask[s, :, None]).nonzero()
                    if not len(sel):
                        continue
                    h = x[s, sel[:, 0]].double()
                    gate, up = (h @ ex.gate_up_proj[e].double().T).chunk(2, dim=-1)
                    act = torch.nn.functional.silu(gate) * up
                    neur_sq[e] += act.abs().mean(0) ** 2
                    y = (act @ ex.down_proj[e].double().T) * w[s, sel[:, 0], sel[:, 1]][:, None]
                    out_sq[e] += (y ** 2).sum()
                    rows[e] += len(sel)
        out[i] = (neur_sq.sqrt(), out_sq.sqrt(), rows)
    return out


def test_expert_importance_matches_per_expert_loop(moe_family):
    model = make_moe_model(moe_family)
    batches = make_batches(seq=12)
    s = estimate_importance(model, batches, layer_metrics=("block_influence",), progress=False, backend=IMP_BACKEND)
    m = get_adapter(model).moe_dims(model.config)
    assert s.experts.shape == (4, 6) and s.expert_frequency.shape == (4, 6)
    assert s.expert_neurons.shape == (4, 6, 20)
    assert (s.shared_neurons is None) == (moe_family != "qwen2_moe")
    if s.shared_neurons is not None:
        assert s.shared_neurons.shape == (4, 24) and bool((s.shared_neurons[0] > 0).all())
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    ref = _expert_reference(model, batches)
    for l, moe in enumerate(m.moe_layers):
        if not moe:
            assert not s.experts[l].any() and not s.expert_neurons[l].any()
            assert s.neurons[l].any()  # the dense layer's MLP neurons are scored as usual
            continue
        neur, outn, rows = ref[l]
        torch.testing.assert_close(s.expert_neurons[l].double(), neur, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(s.experts[l].double(), outn, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(s.expert_frequency[l].double(), rows.double() / tokens)
        assert abs(float(s.expert_frequency[l].sum()) - 2.0) < 1e-5
        assert not s.neurons[l].any()


def test_scores_save_load_and_select_layers(tmp_path):
    model = make_moe_model("qwen2_moe")
    s = estimate_importance(model, make_batches(n=1), layer_metrics=("block_influence",), progress=False,
                            backend=IMP_BACKEND)
    s.save(tmp_path)
    t = ImportanceScores.load(tmp_path)
    for name in ("experts", "expert_frequency", "expert_neurons", "shared_neurons"):
        assert torch.equal(getattr(s, name), getattr(t, name)), name
    t.check_compatible(model.config)
    sub = t.select_layers([0, 2, 3])
    assert sub.expert_neurons.shape == (3, 6, 20) and torch.equal(sub.experts[1], t.experts[2])
    other = make_moe_model("qwen2_moe", num_experts=4)
    with pytest.raises(ValueError, match="num_experts"):
        t.check_compatible(other.config)


def test_streamed_importance_equals_in_memory(moe_family, tmp_path):
    from minitron.compress.streaming import estimate_importance_streaming

    model = make_moe_model(moe_family)
    model.save_pretrained(str(tmp_path / "ck"), max_shard_size="40KB")
    batches = make_batches(seq=12)
    kw = dict(layer_metrics=("block_influence", "lm_loss"), progress=False, backend=IMP_BACKEND)
    a = estimate_importance(model, batches, **kw)
    b = estimate_importance_streaming(tmp_path / "ck", batches, compute_dtype=torch.float32, prefetch=False, **kw)
    for name in ("heads", "neurons", "channels", "block_influence", "lm_loss_drop", "experts", "expert_frequency",
                 "expert_neurons", "shared_neurons"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert torch.equal(x, y), name


# ---------------------------------------------------------------------------------------------- pruning
def _scores(model, seed=0):
    return random_importance(model.config, seed=seed)


def test_expert_selection_matches_scores(moe_family):
    model = make_moe_model(moe_family)
    ref = copy.deepcopy(model)
    s = _scores(model, seed=2)
    prune_width(model, s, num_experts=3, moe_intermediate_size=12, backend=BACKEND)
    ad = get_adapter(model)
    for l, (new, old) in enumerate(zip(ad.layers(model), ad.layers(ref))):
        if not ad.is_moe_layer(old):
            continue
        kept = torch.topk(s.experts[l], 3).indices.sort().values
        torch.testing.assert_close(ad.router(new).weight, ad.router(old).weight[kept], rtol=0, atol=0)
        for j, e in enumerate(kept.tolist()):
            n = torch.topk(s.expert_neurons[l, e], 12).indices.sort().values  # this expert's own neurons
            gu = ad.experts(old).gate_up_proj[e]
            torch.testing.assert_close(ad.experts(new).gate_up_proj[j], torch.cat([gu[n], gu[20 + n]]), rtol=0, atol=0)
            torch.testing.assert_close(ad.experts(new).down_proj[j], ad.experts(old).down_proj[e][:, n], rtol=0, atol=0)
    m = ad.moe_dims(model.config)
    assert (m.num_experts, m.moe_intermediate_size) == (3, 12)
    ex = ad.experts(ad.layers(model)[0])
    assert (ex.num_experts, ex.intermediate_dim) == (3, 12) and ad.router(ad.layers(model)[0]).num_experts == 3


def test_pruning_expert_neurons_equals_zeroing(moe_family):
    """Cutting each expert's unkept neurons gives the logits of the model with those neurons zeroed."""
    model = make_moe_model(moe_family)
    zeroed = copy.deepcopy(model)
    s = _scores(model, seed=3)
    batches = make_batches(n=1)
    ad = get_adapter(model)
    with torch.no_grad():
        for l, layer in enumerate(ad.layers(zeroed)):
            if not ad.is_moe_layer(layer):
                continue
            ex = ad.experts(layer)
            for e in range(6):
                drop = torch.topk(s.expert_neurons[l, e], 20 - 12, largest=False).indices
                ex.gate_up_proj[e, 20 + drop] = 0
                ex.down_proj[e][:, drop] = 0
    prune_width(model, s, moe_intermediate_size=12, backend=BACKEND)
    torch.testing.assert_close(logits_of(model, batches), logits_of(zeroed, batches), rtol=1e-4, atol=1e-4)


def test_shared_expert_neurons_pruned():
    model = make_moe_model("qwen2_moe")
    ref = copy.deepcopy(model)
    s = _scores(model, seed=4)
    prune_width(model, s, shared_expert_intermediate_size=10, backend=BACKEND)
    ad = get_adapter(model)
    keep = torch.topk(s.shared_neurons[0], 10).indices.sort().values
    new, old = ad.shared_expert(ad.layers(model)[0]), ad.shared_expert(ad.layers(ref)[0])
    torch.testing.assert_close(new.gate_proj.weight, old.gate_proj.weight[keep], rtol=0, atol=0)
    torch.testing.assert_close(new.down_proj.weight, old.down_proj.weight[:, keep], rtol=0, atol=0)
    assert model.config.shared_expert_intermediate_size == 10 and new.intermediate_size == 10
    assert ad.layers(model)[2].mlp.down_proj.weight.shape == (48, 64)  # the dense layer is untouched


@pytest.fixture(scope="module")
def moe_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_src")
    out = {}
    for fam in MOE_FAMILIES:
        d = root / fam
        make_moe_model(fam).save_pretrained(str(d), max_shard_size="40KB")
        assert len(list(d.glob("*.safetensors"))) >= 3
        out[fam] = d
    return out


def _state(d: Path) -> dict:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("case", ("width", "both"))
def test_streamed_prune_equals_in_memory_and_reloads(moe_sources, moe_family, case, tmp_path):
    """Tensor-for-tensor equal outputs; both load in plain transformers with no missing/unexpected keys; generate
    with a KV cache after depth pruning (the dense layer keeps its kind)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from minitron.io.checkpoint import save_model

    src = moe_sources[moe_family]
    scores = random_importance(AutoConfig.from_pretrained(str(src)), seed=7)
    width = moe_width(moe_family)
    drop = [0] if case == "both" else None
    s = prune_checkpoint_streaming(src, tmp_path / "s", scores=scores, width_targets=width, drop_layers=drop,
                                   shard_bytes=30_000, backend=BACKEND, progress=False)
    model = AutoModelForCausalLM.from_pretrained(str(src))
    prune_width(model, scores, backend=BACKEND, **width)
    if drop:
        prune_depth(model, num_hidden_layers=3, layers_to_drop=drop)
    save_model(model, tmp_path / "m", tokenizer_dir=src)
    a, b = _state(s), _state(tmp_path / "m")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    cs, cm = json.loads((s / "config.json").read_text()), json.loads((tmp_path / "m" / "config.json").read_text())
    assert cs == cm
    assert cs[PRUNING_RECORD]["kept_layers"] == ([1, 2, 3] if drop else [0, 1, 2, 3])
    loaded, info = AutoModelForCausalLM.from_pretrained(str(s), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ad = get_adapter(loaded)
    m = ad.moe_dims(loaded.config)
    assert (m.num_experts, m.moe_intermediate_size) == (3, 12)
    src_dense = {"qwen3_moe": 1, "qwen2_moe": 2, "mixtral": None}[moe_family]
    kinds = [ad.is_moe_layer(l) for l in ad.layers(loaded)]
    kept = [1, 2, 3] if drop else [0, 1, 2, 3]
    assert kinds == [i != src_dense for i in kept]
    batches = make_batches(n=1)
    torch.testing.assert_close(logits_of(loaded.eval(), batches), logits_of(model, batches), rtol=1e-5, atol=1e-5)
    ids = torch.tensor([[3, 5, 7, 11]])
    out = loaded.generate(ids, max_new_tokens=3, do_sample=False, use_cache=True, pad_token_id=0)
    assert out.shape == (1, 7)
    nocache = loaded.generate(ids, max_new_tokens=3, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(out, nocache)


def test_depth_pruning_keeps_layer_kinds_and_generates(moe_family):
    model = make_moe_model(moe_family)
    ad = get_adapter(model)
    before = [ad.is_moe_layer(l) for l in ad.layers(model)]
    prune_depth(model, num_hidden_layers=2, layers_to_drop=[0, 3])
    assert [ad.is_moe_layer(l) for l in ad.layers(model)] == before[1:3]
    assert list(ad.moe_dims(model.config).moe_layers) == before[1:3]
    ids = torch.tensor([[3, 5, 7, 11]])
    a = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
    b = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- bad inputs
def test_too_few_experts_refused_before_work(moe_family, tmp_path):
    model = make_moe_model(moe_family)
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="num_experts=1 is below num_experts_per_tok=2"):
        validate_width_targets(model.config, num_experts=1)
    with pytest.raises(ValueError, match="num_experts"):
        prune_width(model, _scores(model), num_experts=1, backend=BACKEND)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snap.items())
    src = tmp_path / "ck"
    model.save_pretrained(str(src))
    with pytest.raises(ValueError, match="num_experts"):
        prune_checkpoint_streaming(src, tmp_path / "out", scores=_scores(model), width_targets={"num_experts": 1},
                                   progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("targets,exc,match", [
    ({"moe_intermediate_size": [10, 12, 12, 12, 12, 12]}, TypeError, "moe_intermediate_size must be one int"),
    ({"moe_intermediate_size": 0}, ValueError, "moe_intermediate_size must be >= 1"),
    ({"moe_intermediate_size": 21}, ValueError, "moe_intermediate_size=21 is larger"),
    ({"num_experts": 7}, ValueError, "num_experts=7 is larger"),
    ({"shared_expert_intermediate_size": 8}, ValueError, "shared_expert_intermediate_size=8: a qwen3_moe model has no "
                                                         "shared expert"),
])
def test_bad_moe_widths_refused(targets, exc, match):
    model = make_moe_model("qwen3_moe")
    with pytest.raises(exc, match=match):
        validate_width_targets(model.config, **targets)
    with pytest.raises(exc, match=match):
        prune_width(model, _scores(model), backend=BACKEND, **targets)


def test_dense_width_on_all_moe_model_refused():
    model = make_moe_model("mixtral")
    with pytest.raises(ValueError, match="intermediate_size=16: this mixtral model has no dense MLP"):
        validate_width_targets(model.config, intermediate_size=16)


def test_moe_target_on_dense_model_refused():
    from tests.driver.conftest import make_model

    with pytest.raises(ValueError, match="num_experts=2: a llama model has no experts"):
        validate_width_targets(make_model("llama").config, num_experts=2)


def test_scores_without_expert_scores_refused(moe_family):
    model = make_moe_model(moe_family)
    s = _scores(model)
    plain = ImportanceScores(heads=s.heads, kv_groups=s.kv_groups, neurons=s.neurons, channels=s.channels,
                             block_influence=s.block_influence, meta=s.meta)
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    for target, field in (("num_experts", "experts"), ("moe_intermediate_size", "expert_neurons")):
        with pytest.raises(ValueError, match=f"{target}: the importance scores have no '{field}'"):
            prune_width(model, plain, backend=BACKEND, **{target: 3 if target == "num_experts" else 10})
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snap.items())
    # dense axes still prune with scores lacking expert scores
    prune_width(model, plain, num_attention_heads=3, num_key_value_heads=1, backend=BACKEND)


def test_api_prune_passes_moe_targets(moe_sources, tmp_path):
    """PruneSpec's MoE fields flow through minitron.api.prune (in memory and streamed) unchanged."""
    from transformers import AutoConfig

    from minitron import api

    src = moe_sources["qwen2_moe"]
    scores = random_importance(AutoConfig.from_pretrained(str(src)), seed=9)
    kw = dict(num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=12, backend=BACKEND)
    s = api.prune(str(src), importance=scores, output_dir=tmp_path / "s", streaming=True, **kw)
    m = api.prune(str(src), importance=scores, output_dir=tmp_path / "m", streaming=False, **kw)
    a, b = _state(Path(s)), _state(tmp_path / "m")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (m.config.num_experts, m.config.moe_intermediate_size, m.config.shared_expert_intermediate_size) == (4, 16, 12)
    with pytest.raises(ValueError, match="num_experts=1 is below num_experts_per_tok"):
        api.prune(str(src), importance=scores, output_dir=tmp_path / "x", num_experts=1)
    assert not (tmp_path / "x").exists()


def test_streamed_bad_moe_inputs_refused_before_output(moe_sources, tmp_path):
    """Streamed: scores without expert scores, a per-expert width list, a shared-expert target without shared
    expert -- each refused, naming the argument, before anything is written."""
    from transformers import AutoConfig

    src = moe_sources["qwen3_moe"]
    s = random_importance(AutoConfig.from_pretrained(str(src)))
    plain = ImportanceScores(heads=s.heads, kv_groups=s.kv_groups, neurons=s.neurons, channels=s.channels,
                             block_influence=s.block_influence, meta=s.meta)
    for scores, targets, exc, match in (
            (plain, {"num_experts": 3}, ValueError, "num_experts: the importance scores have no 'experts'"),
            (plain, {"moe_intermediate_size": 10}, ValueError, "moe_intermediate_size: the importance scores"),
            (s, {"moe_intermediate_size": [10] * 6}, TypeError, "moe_intermediate_size must be one int"),
            (s, {"shared_expert_intermediate_size": 4}, ValueError, "shared_expert_intermediate_size=4"),
    ):
        with pytest.raises(exc, match=match):
            prune_checkpoint_streaming(src, tmp_path / "out", scores=scores, width_targets=targets, progress=False)
        assert not (tmp_path / "out").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


@pytest.mark.parametrize("targets", [dict(num_experts=3, hidden_size=32), dict(hidden_size=32),
                                     dict(num_experts=4, moe_intermediate_size=12, hidden_size=40)])
def test_fused_expert_cuts_equal_index_select(targets, tmp_path):
    """In memory (fused 3-D tensors: experts + channels in one 3-D gather, per-expert neurons through 2-D views)
    and streamed from a checkpoint that holds the fused tensors: both equal plain index_select."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = make_moe_model("mixtral")
    ref = copy.deepcopy(model)
    s = _scores(model, seed=11)
    ex = torch.topk(s.experts[0], targets.get("num_experts", 6)).indices.sort().values
    hid = torch.topk(s.channels, targets["hidden_size"]).indices.sort().values
    src = tmp_path / "fused"
    src.mkdir()
    model.config.save_pretrained(str(src))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(src / "model.safetensors"))
    out = prune_checkpoint_streaming(src, tmp_path / "out", scores=s, width_targets=targets, progress=False)
    prune_width(model, s, backend=BACKEND, **targets)
    streamed = _state(out)
    for l in range(4):
        old = ref.model.layers[l].mlp.experts
        gu, dn = old.gate_up_proj[ex], old.down_proj[ex]
        if "moe_intermediate_size" in targets:
            ex_l = torch.topk(s.experts[l], targets["num_experts"]).indices.sort().values
            gu, dn = old.gate_up_proj[ex_l], old.down_proj[ex_l]
            n = torch.stack([torch.topk(s.expert_neurons[l, e], 12).indices.sort().values for e in ex_l.tolist()])
            gu = torch.stack([torch.cat([g[r], g[20 + r]]) for g, r in zip(gu, n)])
            dn = torch.stack([d[:, r] for d, r in zip(dn, n)])
        elif "num_experts" in targets:
            ex_l = torch.topk(s.experts[l], targets["num_experts"]).indices.sort().values
            gu, dn = old.gate_up_proj[ex_l], old.down_proj[ex_l]
        else:
            gu, dn = old.gate_up_proj, old.down_proj
        gu, dn = gu[:, :, hid], dn[:, hid, :]
        new = model.model.layers[l].mlp.experts
        assert torch.equal(new.gate_up_proj, gu) and torch.equal(new.down_proj, dn), l
        assert torch.equal(streamed[f"model.layers.{l}.mlp.experts.gate_up_proj"], gu)
        assert torch.equal(streamed[f"model.layers.{l}.mlp.experts.down_proj"], dn)
    loaded = AutoModelForCausalLM.from_pretrained(str(out))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_streamed_importance_names_a_missing_or_misshaped_expert_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    from minitron.compress.streaming import estimate_importance_streaming

    make_moe_model("qwen3_moe").save_pretrained(str(tmp_path / "ck"))
    f = tmp_path / "ck" / "model.safetensors"
    state = load_file(str(f))
    name = "model.layers.2.mlp.experts.4.up_proj.weight"
    state[name] = state[name][:-1].clone()
    save_file(state, str(f), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"checkpoint tensor '{name}' .* has shape \\(19, 48\\)"):
        estimate_importance_streaming(tmp_path / "ck", make_batches(n=1), progress=False, backend=IMP_BACKEND)
    del state[name]
    save_file(state, str(f), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"lacks tensors this config needs: {name}"):
        estimate_importance_streaming(tmp_path / "ck", make_batches(n=1), progress=False, backend=IMP_BACKEND)
