"""Gemma-3 text (``gemma3_text``): importance, width/depth pruning in memory and streamed, the embedding-scale
compensation, the layer-type rule, reload with plain transformers, generation with a KV cache, bad targets."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minitron.compress.importance import estimate_importance
from minitron.compress.prune import WidthPlan, _apply_width_plan, prune_depth, prune_width, validate_width_targets
from minitron.compress.stream_prune import prune_checkpoint_streaming, random_importance
from minitron.compress.streaming import estimate_importance_streaming
from minitron.io.checkpoint import save_model
from minitron.models import get_adapter
from minitron.models.gemma3 import (MULTIMODAL_MESSAGE, Gemma3Adapter, embed_scale_factor, rescale_embedding,
                                    rescale_norm_weight)
from tests.driver.conftest import (BACKEND, assert_unchanged, logits_of, make_batches, random_scores, randomize_,
                                   snapshot)

TOL = dict(rtol=1e-4, atol=1e-4)
S, F = "sliding_attention", "full_attention"
# hidden 48 (6 heads in 2 KV groups), head_dim 12 (not 48 / 6), sliding window 6 < the test sequences,
# sliding_window_pattern 2 -> layer types [S, F, S, F]; query_pre_attn_scalar 16 (neither head_dim nor
# hidden / heads); tied embeddings and no final-logit softcapping (as the released Gemma-3 checkpoints; a
# width test also runs with softcapping)
GEMMA = dict(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=4, num_attention_heads=6,
             num_key_value_heads=2, head_dim=12, sliding_window=6, sliding_window_pattern=2,
             max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-6,
             query_pre_attn_scalar=16, final_logit_softcapping=None)
WIDTH = dict(hidden_size=32, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2)
DROP = [1, 2]
CASES = ("width", "depth", "both")
TOKENIZER_BYTES = b'{"fake": "tokenizer bytes kept verbatim"}\n'


def gemma_config(**overrides):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(**{**GEMMA, **overrides})


def gemma_model(seed: int = 0, **overrides):
    """A tiny random fp32 Gemma3ForCausalLM (tied embeddings) in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(gemma_config(**overrides))
    randomize_(model, seed)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model.float().eval()


def _state(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _reload(d: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


# ---------------------------------------------------------------------------------------------- the adapter
def test_adapter_found_and_layout():
    model = gemma_model()
    ad = get_adapter(model)
    assert isinstance(ad, Gemma3Adapter) and get_adapter("gemma3_text") is not None
    d = ad.dims(model.config)
    assert (d.hidden_size, d.num_attention_heads, d.num_key_value_heads, d.head_dim) == (48, 6, 2, 12)
    layer = ad.layers(model)[0]
    norms = ad.layer_norms(layer)
    assert len(norms) == 4
    # every hidden-width norm of a layer is listed (nothing left uncut); q_norm / k_norm are head_dim wide
    hidden_norms = [m for n, m in layer.named_modules() if "Norm" in type(m).__name__ and m.weight.shape == (48,)]
    assert {id(m) for m in hidden_norms} == {id(m) for m in norms}
    assert layer.self_attn.q_norm.weight.shape == (12,)


def test_multimodal_gemma3_refused_with_pointer_to_text_model():
    from transformers import AutoModelForCausalLM, Gemma3Config

    with pytest.raises(ValueError, match="gemma3"):
        get_adapter("gemma3")
    cfg = Gemma3Config(
        text_config=dict(vocab_size=300, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8),
        vision_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4, image_token_index=299, boi_token_index=297, eoi_token_index=298)
    mm = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(TypeError, match="gemma3_text") as exc:
        Gemma3Adapter().check_model(mm)
    assert str(exc.value) == MULTIMODAL_MESSAGE and Gemma3Adapter.refused_model_types["gemma3"] == MULTIMODAL_MESSAGE
    # the recipe the message gives works: the extracted text model computes the multimodal model's text logits
    from transformers import Gemma3ForCausalLM

    text = Gemma3ForCausalLM(mm.config.text_config).eval()
    text.model.load_state_dict(mm.model.language_model.state_dict())
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        torch.testing.assert_close(text(ids).logits, mm.eval()(input_ids=ids).logits, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- importance
def test_importance_finite_and_streamed_equal(tmp_path):
    model = gemma_model()
    batches = make_batches(seq=16)
    s = estimate_importance(model, batches, progress=False, backend=BACKEND)
    assert s.heads.shape == (4, 6) and s.kv_groups.shape == (4, 2) and s.neurons.shape == (4, 64)
    assert s.channels.shape == (48,) and s.block_influence.shape == (4,) and s.lm_loss_drop.shape == (4,)
    for name in ("heads", "kv_groups", "neurons", "channels", "block_influence", "lm_loss_drop"):
        t = getattr(s, name)
        assert bool(torch.isfinite(t).all()), name
    assert bool((s.heads > 0).all()) and bool((s.channels > 0).all())
    model.save_pretrained(str(tmp_path / "ckpt"), max_shard_size="20KB")
    s2 = estimate_importance_streaming(tmp_path / "ckpt", batches, progress=False, backend=BACKEND)
    for name in ("heads", "kv_groups", "neurons", "channels", "block_influence", "lm_loss_drop"):
        torch.testing.assert_close(getattr(s2, name), getattr(s, name), rtol=1e-5, atol=1e-6)


def test_channel_importance_reads_all_four_norms():
    """Scaling a post-feedforward norm's kept output changes the channel scores (it is a channel source)."""
    model = gemma_model()
    batches = make_batches(seq=8, n=1)
    base = estimate_importance(model, batches, progress=False, layer_metrics=(), backend=BACKEND).channels
    with torch.no_grad():
        model.model.layers[3].post_feedforward_layernorm.weight[5] += 10.0
    after = estimate_importance(model, batches, progress=False, layer_metrics=(), backend=BACKEND).channels
    assert float(after[5] - base[5]) > 1.0


# ---------------------------------------------------------------------------------------------- width
def _zero_hooks(model, scores, targets):
    """Hooks on the unpruned model giving the cut teacher: dropped heads / neurons zeroed, every Gemma norm
    (four per layer, the final one) normalising over the kept channels only, the embedding still scaled by
    sqrt(original hidden size). Independent of minitron's cutting code."""
    ad = get_adapter(model)
    d = ad.dims(model.config)
    handles = []
    H, KV = targets["num_attention_heads"], targets["num_key_value_heads"]
    per = d.num_attention_heads // d.num_key_value_heads
    for l, layer in enumerate(ad.layers(model)):
        groups = torch.topk(scores.kv_groups[l], KV).indices.sort().values if KV < d.num_key_value_heads else range(KV)
        keep = [g * per + i for g in (int(g) for g in groups)
                for i in torch.topk(scores.heads[l, g * per:(g + 1) * per], H // KV).indices.tolist()]
        drop_h = torch.ones(d.num_attention_heads, dtype=torch.bool)
        drop_h[keep] = False
        drop_n = torch.ones(d.intermediate_size, dtype=torch.bool)
        drop_n[torch.topk(scores.neurons[l], targets["intermediate_size"]).indices] = False

        def pre_o(m, args, drop=drop_h):
            x = args[0].view(*args[0].shape[:-1], d.num_attention_heads, d.head_dim).clone()
            x[..., drop, :] = 0
            return (x.view(args[0].shape),)

        def pre_down(m, args, drop=drop_n):
            x = args[0].clone()
            x[..., drop] = 0
            return (x,)

        handles += [layer.self_attn.o_proj.register_forward_pre_hook(pre_o),
                    layer.mlp.down_proj.register_forward_pre_hook(pre_down)]
    channels = torch.topk(scores.channels, targets["hidden_size"]).indices.sort().values

    def norm_hook(m, args, out):
        x = args[0].float()[..., channels]
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.eps) * (1.0 + m.weight[channels].float())
        full = torch.zeros_like(out)
        full[..., channels] = y.to(out.dtype)
        return full

    norms = [n for layer in ad.layers(model) for n in ad.layer_norms(layer)] + [ad.final_norm(model)]
    return handles + [n.register_forward_hook(norm_hook) for n in norms]


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_width_pruning_equals_cut_teacher_and_survives_reload(tmp_path, softcap):
    """Heads, neurons and hidden channels pruned at once: the pruned model computes the cut teacher (the
    compensation of the embedding scale is exact up to fp32 rounding), and save + plain reload changes nothing."""
    model = gemma_model(final_logit_softcapping=softcap)
    scores = random_scores(model)
    batches = make_batches(seq=16)
    base = logits_of(model, batches)
    ref = copy.deepcopy(model)
    handles = _zero_hooks(ref, scores, WIDTH)
    expect = logits_of(ref, batches)
    for h in handles:
        h.remove()
    assert (expect - base).abs().max() > 1e-2
    prune_width(model, scores, backend=BACKEND, **WIDTH)
    got = logits_of(model, batches)
    torch.testing.assert_close(got, expect, **TOL)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    emb = model.model.embed_tokens
    assert float(emb.embed_scale) == pytest.approx(math.sqrt(32)) and emb.scalar_embed_scale == math.sqrt(32)
    assert model.config.query_pre_attn_scalar == 16 and model.config.head_dim == 12
    assert model.config.rope_parameters == gemma_config().rope_parameters
    assert model.model.layers[0].self_attn.q_norm.weight.shape == (12,)
    save_model(model, tmp_path / "out")
    again = _reload(tmp_path / "out")
    assert torch.equal(logits_of(again, batches), got)
    # without the compensation a reload would scale the embedding by sqrt(32) instead of sqrt(48): far off
    plain = copy.deepcopy(again)
    with torch.no_grad():
        plain.model.embed_tokens.weight.div_(embed_scale_factor(48, 32))
        plain.model.norm.weight.copy_(model.model.norm.weight.add(1).mul(embed_scale_factor(48, 32)).sub(1))
    assert (logits_of(plain, batches) - expect).abs().max() > 1e-2


def test_module_state_matches_fresh_model():
    """After width + depth pruning, every module attribute (sizes, embed_scale, layer types) equals a model
    built from the pruned config, as a reload would build it."""
    from transformers import AutoModelForCausalLM

    model = gemma_model()
    prune_width(model, random_scores(model), backend=BACKEND, **WIDTH)
    prune_depth(model, num_hidden_layers=3, layers_to_drop=[1])
    fresh = AutoModelForCausalLM.from_config(copy.deepcopy(model.config)).eval()

    def attrs(m):
        return {name: {k: v for k, v in vars(mod).items() if isinstance(v, (int, str, float)) and not k.startswith("_")}
                for name, mod in m.named_modules()}

    assert attrs(model) == attrs(fresh)
    assert torch.equal(model.model.embed_tokens.embed_scale, fresh.model.embed_tokens.embed_scale)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in fresh.state_dict().items()}


def test_same_size_identity_cut_is_bit_identical():
    """The cutting machinery with every unit kept (hidden included, same size) changes no bit of the logits."""
    model = gemma_model()
    batches = make_batches()
    base = logits_of(model, batches)
    snap = snapshot(model)
    L = 4
    plan = WidthPlan(hidden=torch.arange(48), heads=[torch.arange(6)] * L, kv=[torch.arange(2)] * L,
                     neurons=[torch.arange(64)] * L,
                     sizes=dict(hidden_size=48, intermediate_size=64, num_attention_heads=6, num_key_value_heads=2))
    with torch.no_grad():
        _apply_width_plan(model, get_adapter(model), plan, BACKEND)
    state, _ = snap
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert torch.equal(logits_of(model, batches), base)
    assert get_adapter(model).width_transforms(model.config, copy.deepcopy(model.config)) == {}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compensation_formulas(dtype):
    """Embedding rows x c with the new scale give the old product; the final norm's output is divided by c."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm, Gemma3TextScaledWordEmbedding

    h0, h1 = 48, 32
    c = embed_scale_factor(h0, h1, dtype)
    assert c == pytest.approx(math.sqrt(1.5), rel=1e-6 if dtype == torch.float32 else 1e-2)
    g = torch.Generator().manual_seed(0)
    old = Gemma3TextScaledWordEmbedding(10, h1, 0, embed_scale=h0 ** 0.5).to(dtype)
    new = Gemma3TextScaledWordEmbedding(10, h1, 0, embed_scale=h1 ** 0.5).to(dtype)
    with torch.no_grad():
        old.weight.copy_(torch.randn(10, h1, generator=g))
        new.weight.copy_(rescale_embedding(old.weight, c))
    ids = torch.arange(10)[None]
    tol = dict(rtol=2e-6, atol=2e-6) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-3)
    torch.testing.assert_close(new(ids).double(), old(ids).double(), **tol)
    n_old, n_new = Gemma3RMSNorm(h1).to(dtype), Gemma3RMSNorm(h1).to(dtype)
    with torch.no_grad():
        n_old.weight.copy_(0.3 * torch.randn(h1, generator=g))
        n_new.weight.copy_(rescale_norm_weight(n_old.weight, c))
    x = torch.randn(3, h1, generator=g).to(dtype)
    torch.testing.assert_close(n_new(x).double(), n_old(x).double() / c, **tol)
    assert rescale_norm_weight(n_old.weight, 1.0).dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rescale_embedding_chunks_equal_one_pass(dtype, monkeypatch):
    """Row chunks (the memory bound for 262k-row embeddings) give bit for bit the one-pass product."""
    import minitron.models.gemma3 as g3

    w = torch.randn(1000, 37, generator=torch.Generator().manual_seed(0)).to(dtype)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    expect = (w.to(wide) * 1.2247).to(dtype)
    before = w.clone()
    monkeypatch.setattr(g3, "_CHUNK_ELEMENTS", 100)  # 2 rows per chunk
    assert torch.equal(rescale_embedding(w, 1.2247), expect) and torch.equal(w, before)  # input not modified
    assert rescale_embedding(w[:0], 2.0).shape == (0, 37)


def test_scale_factor_follows_the_models_rounding():
    """In bf16 the model multiplies by bf16(sqrt(hidden)) (sqrt(1152) = 33.94 -> 34.0): c is the ratio of those."""
    assert embed_scale_factor(1152, 768, torch.bfloat16) == 34.0 / 27.75
    assert embed_scale_factor(1152, 768, torch.float64) == pytest.approx(math.sqrt(1.5), rel=1e-15)
    assert embed_scale_factor(48, 48, torch.bfloat16) == 1.0
    with pytest.raises(ValueError, match="hidden sizes"):
        embed_scale_factor(0, 4)


def test_width_transforms_names_and_untied_head():
    ad = Gemma3Adapter()
    before, after = gemma_config(), gemma_config(hidden_size=32, num_attention_heads=4)
    tr = ad.width_transforms(before, after)
    assert set(tr) == {"model.embed_tokens.weight", "model.norm.weight"}
    w = torch.zeros(32)
    torch.testing.assert_close(tr["model.norm.weight"](w), torch.full((32,), 1 / math.sqrt(1.5) - 1))
    untied = gemma_config(hidden_size=32, num_attention_heads=4, tie_word_embeddings=False)
    assert set(ad.width_transforms(gemma_config(tie_word_embeddings=False), untied)) == {"model.embed_tokens.weight"}


def test_untied_head_width_pruning_equals_cut_teacher():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(gemma_config(tie_word_embeddings=False))
    randomize_(model)
    model = model.float().eval()
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    scores = random_scores(model)
    batches = make_batches()
    ref = copy.deepcopy(model)
    handles = _zero_hooks(ref, scores, WIDTH)
    expect = logits_of(ref, batches)
    for h in handles:
        h.remove()
    prune_width(model, scores, backend=BACKEND, **WIDTH)
    torch.testing.assert_close(logits_of(model, batches), expect, **TOL)


# ---------------------------------------------------------------------------------------------- depth
def test_depth_keeps_each_layers_type_and_reloads(tmp_path):
    """Dropping layer 1 of [S, F, S, F] leaves [S, S, F]: each kept layer keeps its own type (module and config
    agree), the legacy sliding_window_pattern (which would derive [S, F, S]) is removed, and a reload builds
    the same types."""
    model = gemma_model()
    assert model.config.layer_types == [S, F, S, F]
    prune_depth(model, num_hidden_layers=3, layers_to_drop=[1])
    assert model.config.layer_types == [S, S, F]
    assert [l.self_attn.layer_type for l in model.model.layers] == [S, S, F]
    assert [l.self_attn.sliding_window for l in model.model.layers] == [6, 6, None]
    assert "sliding_window_pattern" not in model.config.to_dict()
    save_model(model, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["layer_types"] == [S, S, F] and "sliding_window_pattern" not in cfg
    again = _reload(tmp_path / "out")
    assert again.config.layer_types == [S, S, F]
    assert [l.self_attn.is_sliding for l in again.model.layers] == [True, True, False]
    batches = make_batches(seq=16)
    assert torch.equal(logits_of(again, batches), logits_of(model, batches))


def test_depth_keeps_pattern_when_it_still_holds():
    model = gemma_model()
    prune_depth(model, num_hidden_layers=2, layers_to_drop=DROP)
    assert model.config.layer_types == [S, F]
    assert model.config.to_dict().get("sliding_window_pattern") == 2  # still derives [S, F]


def test_removing_layers_equals_bypassing():
    model = gemma_model()
    ref = copy.deepcopy(model)

    def hook(m, args, kwargs, out):
        return args[0] if args else kwargs["hidden_states"]

    hs = [ref.model.layers[i].register_forward_hook(hook, with_kwargs=True) for i in (0, 3)]
    batches = make_batches(seq=16)
    expect = logits_of(ref, batches)
    for h in hs:
        h.remove()
    prune_depth(model, num_hidden_layers=2, layers_to_drop=[0, 3])
    assert model.config.layer_types == [F, S]
    torch.testing.assert_close(logits_of(model, batches), expect, **TOL)


@pytest.mark.parametrize("drop", [[1, 2], [1], [1, 3], [0, 2]])
def test_generate_with_cache_after_depth_pruning(drop, tmp_path):
    """Greedy generation past the sliding window: the KV cache (sliding + full layers, only sliding, only full)
    gives the no-cache tokens, in memory and after a plain reload."""
    model = gemma_model()
    prune_depth(model, num_hidden_layers=4 - len(drop), layers_to_drop=drop)
    prompt = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        a = model.generate(prompt, use_cache=True, **kw)
        b = model.generate(prompt, use_cache=False, **kw)
    assert a.shape == (2, 17) and torch.equal(a, b)
    save_model(model, tmp_path / "out")
    again = _reload(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(again.generate(prompt, use_cache=True, **kw), a)


# ---------------------------------------------------------------------------------------------- streamed
@pytest.fixture(scope="module")
def streamed(tmp_path_factory):
    """A sharded tiny Gemma-3 checkpoint, pruned streamed and in memory for every case."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("gemma3_stream")
    src = root / "src"
    gemma_model().save_pretrained(str(src), max_shard_size="20KB")
    (src / "tokenizer.json").write_bytes(TOKENIZER_BYTES)
    assert len(list(src.glob("*.safetensors"))) >= 3
    scores = random_importance(gemma_config(), seed=3)
    out = {}
    for case in CASES:
        width = dict(WIDTH) if case != "depth" else None
        drop = DROP if case != "width" else None
        s = prune_checkpoint_streaming(src, root / f"{case}-s", scores=scores, width_targets=width, drop_layers=drop,
                                       shard_bytes=12_000, backend=BACKEND, progress=False)
        model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
        if width:
            prune_width(model, scores, backend=BACKEND, **width)
        if drop:
            prune_depth(model, num_hidden_layers=4 - len(drop), layers_to_drop=drop)
        m = root / f"{case}-m"
        save_model(model, m, tokenizer_dir=src)
        out[case] = (s, m, model)
    return out


@pytest.mark.parametrize("case", CASES)
def test_streamed_equals_in_memory_and_reloads(streamed, case):
    s, m, model = streamed[case]
    a, b = _state(s), _state(m)
    assert a.keys() == b.keys() and "lm_head.weight" not in a
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    cs, cm = (json.loads((d / "config.json").read_text()) for d in (s, m))
    assert cs == cm
    assert (s / "tokenizer.json").read_bytes() == TOKENIZER_BYTES
    assert cs["query_pre_attn_scalar"] == 16 and cs["head_dim"] == 12
    assert cs["layer_types"] == ([S, F] if case != "width" else [S, F, S, F])
    if case != "depth":
        assert cs["hidden_size"] == 32 and a["model.embed_tokens.weight"].shape == (96, 32)
    batches = make_batches(seq=16)
    expect = logits_of(model, batches)
    for d in (s, m):
        assert torch.equal(logits_of(_reload(d), batches), expect), d


def test_streamed_width_equals_cut_teacher(streamed, tmp_path):
    """The streamed output (compensated embedding and final norm) computes the cut teacher of the source."""
    from transformers import AutoModelForCausalLM

    s, _, _ = streamed["width"]
    src = s.parent / "src"
    teacher = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    handles = _zero_hooks(teacher, random_importance(gemma_config(), seed=3), WIDTH)
    batches = make_batches(seq=16)
    torch.testing.assert_close(logits_of(_reload(s), batches), logits_of(teacher, batches), **TOL)
    for h in handles:
        h.remove()


# ---------------------------------------------------------------------------------------------- bad targets
@pytest.mark.parametrize("targets,match", [
    (dict(hidden_size=40), "hidden_size=40 is not a multiple of num_attention_heads=6"),
    (dict(num_attention_heads=4, hidden_size=30), "multiple of num_attention_heads=4"),
    (dict(num_attention_heads=5), "multiple of num_key_value_heads"),
    (dict(hidden_size=64), "larger than"),
])
def test_bad_targets_raise_before_work(targets, match, tmp_path):
    model = gemma_model()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        validate_width_targets(model.config, **targets)
    with pytest.raises(ValueError, match=match):
        prune_width(model, random_scores(model), backend=BACKEND, **targets)
    assert_unchanged(model, snap)
    src = tmp_path / "src"
    model.save_pretrained(str(src))
    with pytest.raises(ValueError, match=match):
        prune_checkpoint_streaming(src, tmp_path / "out", scores=random_importance(model.config), width_targets=targets,
                                   progress=False)
    assert not (tmp_path / "out").exists()


def test_bad_depth_target_raises_before_work():
    model = gemma_model()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        prune_depth(model, num_hidden_layers=0, layers_to_drop=[])
    with pytest.raises(ValueError, match="layers_to_drop"):
        prune_depth(model, num_hidden_layers=3, layers_to_drop=[4])
    assert_unchanged(model, snap)


def test_hub_style_legacy_config(tmp_path):
    """A config.json as on the Hub (transformers 4.5x: no layer_types, sliding_window_pattern 3, rope_theta and
    rope_local_base_freq, cache_implementation "hybrid"): width + depth pruning, streamed and in memory, agree,
    and the output keeps each kept layer's type and the per-type rope bases, reloads and generates with a cache."""
    from transformers import AutoConfig, AutoModelForCausalLM

    legacy = {"architectures": ["Gemma3ForCausalLM"], "attn_logit_softcapping": None, "bos_token_id": 2,
              "cache_implementation": "hybrid", "eos_token_id": [1, 106], "final_logit_softcapping": None,
              "head_dim": 16, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 32, "intermediate_size": 48,
              "max_position_embeddings": 128, "model_type": "gemma3_text", "num_attention_heads": 4,
              "num_hidden_layers": 7, "num_key_value_heads": 1, "pad_token_id": 0, "query_pre_attn_scalar": 16,
              "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000, "rope_scaling": None, "rope_theta": 1000000,
              "sliding_window": 4, "sliding_window_pattern": 3, "torch_dtype": "float32",
              "transformers_version": "4.52.4", "use_cache": True, "vocab_size": 110}
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(legacy))
    cfg = AutoConfig.from_pretrained(str(src))
    assert cfg.layer_types == [S, S, F, S, S, F, S]
    torch.manual_seed(0)
    model = randomize_(AutoModelForCausalLM.from_config(cfg)).float().eval()
    model.save_pretrained(str(src))
    (src / "config.json").write_text(json.dumps(legacy))  # the Hub's form on disk
    scores = random_importance(cfg, seed=1)
    width = dict(hidden_size=24, intermediate_size=40, num_attention_heads=2, num_key_value_heads=1)
    s = prune_checkpoint_streaming(src, tmp_path / "s", scores=scores, width_targets=width, drop_layers=[1, 4],
                                   backend=BACKEND, progress=False)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    prune_width(model, scores, backend=BACKEND, **width)
    prune_depth(model, num_hidden_layers=5, layers_to_drop=[1, 4])
    save_model(model, tmp_path / "m")
    a, b = _state(s), _state(tmp_path / "m")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = json.loads((s / "config.json").read_text())
    assert c == json.loads((tmp_path / "m" / "config.json").read_text())
    assert c["layer_types"] == [S, F, S, F, S] and "sliding_window_pattern" not in c
    assert c["rope_parameters"]["sliding_attention"]["rope_theta"] == 10000
    assert c["rope_parameters"]["full_attention"]["rope_theta"] == 1000000
    again = _reload(s)
    assert [l.self_attn.is_sliding for l in again.model.layers] == [True, False, True, False, True]
    batches = make_batches(vocab=110, seq=12)
    assert torch.equal(logits_of(again, batches), logits_of(model, batches))
    prompt = torch.randint(3, 110, (1, 4), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        assert torch.equal(again.generate(prompt, use_cache=True, **kw), again.generate(prompt, use_cache=False, **kw))


def test_bf16_checkpoint_streamed_equals_in_memory_and_reload(tmp_path):
    """bf16 weights: the compensation is applied in bf16 alike in memory and streamed, the reloaded bf16 model
    computes the in-memory pruned model's logits bit for bit, and stays close to the bf16 cut teacher."""
    from transformers import AutoModelForCausalLM

    src = tmp_path / "src"
    gemma_model().to(torch.bfloat16).save_pretrained(str(src), max_shard_size="20KB")
    scores = random_importance(gemma_config(), seed=5)
    s = prune_checkpoint_streaming(src, tmp_path / "s", scores=scores, width_targets=WIDTH, backend=BACKEND,
                                   progress=False)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.bfloat16).eval()
    teacher = copy.deepcopy(model)
    prune_width(model, scores, backend=BACKEND, **WIDTH)
    save_model(model, tmp_path / "m")
    a, b = _state(s), _state(tmp_path / "m")
    assert a["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = AutoModelForCausalLM.from_pretrained(str(s), dtype=torch.bfloat16).eval()
    batches = make_batches(seq=16)
    got = logits_of(model, batches)
    assert torch.equal(logits_of(again, batches), got)
    handles = _zero_hooks(teacher, scores, WIDTH)
    expect = logits_of(teacher, batches)
    for h in handles:
        h.remove()
    # bf16 rounding alone moves these logits by ~0.8 (bf16 vs fp32, unpruned); the compensated model is within
    # 0.55 of the bf16 cut teacher, an uncompensated one 3.5 off (max |logit| ~6.5)
    err = (got.float() - expect.float()).abs().max()
    assert err < 0.1 * expect.float().abs().max(), err
