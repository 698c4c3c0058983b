"""estimate_importance against a plain-torch reference; ImportanceScores persistence; bad inputs."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from minitron.compress.importance import ImportanceScores, estimate_importance
from minitron.models import get_adapter
from tests.driver.conftest import (BACKEND, assert_unchanged, make_batches, make_model, random_scores,
                                   snapshot)


# ----------------------------------------------------------------------------- plain torch reference
def capture(model, batches):
    """Run the model with simple hooks storing every activation the scores are made from."""
    ad = get_adapter(model)
    layers = list(ad.layers(model))
    store = {"o": [[] for _ in layers], "down": [[] for _ in layers], "io": [[] for _ in layers], "norms": []}
    norms = [n for layer in layers for n in ad.layer_norms(layer)] + [ad.final_norm(model)]
    store["norms"] = [[] for _ in norms]
    hs = []
    for i, layer in enumerate(layers):
        hs.append(ad.o_proj(layer).register_forward_pre_hook(lambda m, a, i=i: store["o"][i].append(a[0].clone())))
        hs.append(ad.down_proj(layer).register_forward_pre_hook(lambda m, a, i=i: store["down"][i].append(a[0].clone())))
        hs.append(layer.register_forward_hook(
            lambda m, a, kw, out, i=i: store["io"][i].append(((a[0] if a else kw["hidden_states"]).clone(),
                                                              (out[0] if isinstance(out, tuple) else out).clone())),
            with_kwargs=True))
    for j, n in enumerate(norms):
        hs.append(n.register_forward_hook(lambda m, a, out, j=j: store["norms"][j].append(out.clone())))
    with torch.no_grad():
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    for h in hs:
        h.remove()
    return store


def agg(v, how, dim):
    if how == "mean":
        return v.mean(dim)
    if how == "l2":
        return v.pow(2).sum(dim).sqrt()
    if how == "sum":
        return v.sum(dim)
    if how == "max":
        return v.amax(dim)
    raise KeyError(how)


def ref_importance(acts, masks, group, seq_agg, batch_agg):
    """Per sample: token magnitudes (|x| or per-group L2) -> seq_agg over real tokens; then batch_agg."""
    per_sample = []
    for x, mask in zip(acts, masks):
        B, S, C = x.shape
        for b in range(B):
            keep = mask[b].bool()
            if not keep.any():
                continue
            m = x[b, keep].double().view(int(keep.sum()), C // group, group).norm(dim=-1)
            per_sample.append(agg(m, seq_agg, 0))
    return agg(torch.stack(per_sample), batch_agg, 0).float()


def ref_block_influence(ios, masks):
    tot, cnt = 0.0, 0
    for (hi, ho), mask in zip(ios, masks):
        cos = F.cosine_similarity(hi.double(), ho.double(), dim=-1)
        tot += float((1 - cos)[mask.bool()].sum())
        cnt += int(mask.sum())
    return tot / cnt


def ref_loss(model, batches, skip=None):
    """Token-mean next-token NLL via transformers' own loss (labels, -100 on padding targets)."""
    hs = []
    if skip is not None:
        layer = get_adapter(model).layers(model)[skip]
        hs.append(layer.register_forward_hook(lambda m, a, kw, out: a[0] if a else kw["hidden_states"],
                                              with_kwargs=True))
    tot = n = 0.0
    with torch.no_grad():
        for b in batches:
            ids, mask = b["input_ids"], b["attention_mask"]
            labels = ids.masked_fill(mask == 0, -100)
            # a target also needs a real context token (right padding: identical to labels alone)
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
            k = int((labels[:, 1:] != -100).sum())
            tot += float(out.loss) * k
            n += k
    for h in hs:
        h.remove()
    return tot / n


def check_against_reference(model, batches, seq_agg="mean", batch_agg="l2"):
    d = get_adapter(model).dims(model.config)
    got = estimate_importance(model, batches, seq_agg=seq_agg, batch_agg=batch_agg, progress=False, backend=BACKEND)
    st = capture(model, batches)
    masks = [b["attention_mask"] for b in batches]
    tol = dict(rtol=2e-5, atol=1e-6)
    for l in range(d.num_hidden_layers):
        torch.testing.assert_close(got.heads[l], ref_importance(st["o"][l], masks, d.head_dim, seq_agg, batch_agg), **tol)
        torch.testing.assert_close(got.neurons[l], ref_importance(st["down"][l], masks, 1, seq_agg, batch_agg), **tol)
        assert got.block_influence[l].item() == pytest.approx(ref_block_influence(st["io"][l], masks), rel=1e-5)
    channels = sum(ref_importance(acts, masks, 1, seq_agg, batch_agg) for acts in st["norms"])
    torch.testing.assert_close(got.channels, channels, **tol)
    per_layer = 4 if model.config.model_type == "gemma3_text" else 2  # Gemma-3: input, post-attention, pre/post-ffw
    assert len(st["norms"]) == per_layer * d.num_hidden_layers + 1
    torch.testing.assert_close(got.kv_groups, got.heads.view(d.num_hidden_layers, d.num_key_value_heads, -1).sum(-1))
    return got


# ----------------------------------------------------------------------------- tests
def test_importance_matches_reference(family):
    model = make_model(family)
    batches = make_batches()
    snap = snapshot(model)
    got = check_against_reference(model, batches)
    base = ref_loss(model, batches)
    assert got.meta["base_lm_loss"] == pytest.approx(base, rel=1e-5)
    want = torch.tensor([ref_loss(model, batches, skip=l) - base for l in range(4)])
    torch.testing.assert_close(got.lm_loss_drop, want, rtol=1e-4, atol=1e-5)
    assert got.lm_loss_drop.abs().min() > 1e-4  # not vacuous
    assert got.heads.dtype == got.neurons.dtype == got.channels.dtype == torch.float32
    assert got.meta["model_type"] == family and got.meta["num_samples"] == 6
    assert got.meta["num_tokens"] == int(sum(b["attention_mask"].sum() for b in batches))
    assert_unchanged(model, snap)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("seq_agg,batch_agg", [("l2", "mean"), ("max", "sum")])
def test_importance_other_aggregations(seq_agg, batch_agg):
    model = make_model("qwen3")
    got = check_against_reference(model, make_batches(seed=3), seq_agg=seq_agg, batch_agg=batch_agg)
    assert (got.meta["seq_agg"], got.meta["batch_agg"]) == (seq_agg, batch_agg)


def test_padding_is_masked_out():
    """Changing what sits in padded positions (right padding, causal model) changes no score."""
    model = make_model("llama")
    a = make_batches()
    b = copy.deepcopy(a)
    for x in b:
        x["input_ids"][-1, 8:] = torch.randint(3, 96, (8,))
    sa = estimate_importance(model, a, progress=False, backend=BACKEND)
    sb = estimate_importance(model, b, progress=False, backend=BACKEND)
    for name in ("heads", "neurons", "channels", "block_influence", "lm_loss_drop"):
        torch.testing.assert_close(getattr(sa, name), getattr(sb, name), rtol=1e-5, atol=1e-6)
    # ...whereas without the mask they would differ
    nb = [{"input_ids": x["input_ids"]} for x in b]
    sn = estimate_importance(model, nb, progress=False, backend=BACKEND, layer_metrics=())
    assert (sn.neurons - sa.neurons).abs().max() > 1e-3
    assert torch.isnan(sn.block_influence).all() and sn.lm_loss_drop is None


def test_training_mode_restored_and_max_batches():
    model = make_model("phi3").train()
    batches = make_batches(n=3)
    s = estimate_importance(model, iter(batches), max_batches=2, progress=False, layer_metrics=("block_influence",),
                            backend=BACKEND)
    assert model.training
    assert s.meta["num_samples"] == 6 and s.lm_loss_drop is None
    s2 = estimate_importance(model.eval(), batches[:2], progress=False, layer_metrics=("block_influence",),
                             backend=BACKEND)
    torch.testing.assert_close(s.neurons, s2.neurons)


def count_forwards(model):
    calls = []
    h = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    h2 = get_adapter(model).base_model(model).register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls, (h, h2)


BAD = [
    (dict(seq_agg="median"), ValueError),
    (dict(batch_agg=3), TypeError),
    (dict(layer_metrics=("bi",)), ValueError),
    (dict(layer_metrics="lm_loss"), TypeError),
    (dict(max_batches=0), ValueError),
    (dict(backend="gpu"), ValueError),
]


@pytest.mark.parametrize("kwargs,exc", BAD)
def test_bad_arguments_raise_before_any_forward(kwargs, exc):
    model = make_model("mistral")
    calls, hs = count_forwards(model)
    with pytest.raises(exc):
        estimate_importance(model, make_batches(), progress=False, **{"backend": BACKEND, **kwargs})
    assert calls == []
    for h in hs:
        h.remove()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("batches,exc,match", [
    ([], ValueError, "empty"),
    ([{"ids": torch.zeros(1, 4, dtype=torch.long)}], TypeError, "input_ids"),
    ([torch.zeros(1, 4, dtype=torch.long)], TypeError, "dict"),
    ([{"input_ids": torch.zeros(4, dtype=torch.long)}], ValueError, r"\[batch, seq\]"),
    ([{"input_ids": torch.zeros(1, 4)}], ValueError, "int64"),
    ([{"input_ids": torch.full((1, 4), 96)}], ValueError, "token ids"),
    ([{"input_ids": torch.zeros(1, 4, dtype=torch.long), "attention_mask": torch.ones(1, 3)}], ValueError, "shape"),
    ([{"input_ids": torch.zeros(1, 4, dtype=torch.long), "attention_mask": torch.full((1, 4), 2)}], ValueError, "0 and 1"),
    ({"input_ids": torch.zeros(1, 4, dtype=torch.long)}, TypeError, "iterable"),
])
def test_bad_batches(batches, exc, match):
    model = make_model("qwen2")
    snap = snapshot(model)
    calls, hs = count_forwards(model)
    with pytest.raises(exc, match=match):
        estimate_importance(model, batches, progress=False, backend=BACKEND)
    assert calls == []
    assert_unchanged(model, snap)
    for h in hs:
        h.remove()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_unknown_model_type():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(ValueError, match="llama, mistral, qwen2, qwen3, phi3"):
        estimate_importance(model, make_batches(32), progress=False, backend=BACKEND)


# ----------------------------------------------------------------------------- ImportanceScores
def test_save_load_roundtrip_and_compat(tmp_path):
    model = make_model("qwen2")
    s = estimate_importance(model, make_batches(), progress=False, backend=BACKEND)
    s.save(tmp_path / "imp")
    t = ImportanceScores.load(tmp_path / "imp")
    for name in ("heads", "kv_groups", "neurons", "channels", "block_influence", "lm_loss_drop"):
        assert torch.equal(getattr(s, name), getattr(t, name)), name
    assert t.meta == json.loads(json.dumps(s.meta))
    t.check_compatible(model.config)
    t.check_compatible(model)
    with pytest.raises(ValueError, match="different model.*intermediate_size"):
        t.check_compatible(make_model("qwen2", intermediate_size=80).config)
    with pytest.raises(ValueError, match="different model.*model_type"):
        t.check_compatible(make_model("qwen3").config)
    with pytest.raises(FileExistsError):
        s.save(tmp_path / "imp")
    s.save(tmp_path / "imp", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "imp").iterdir()) == ["importance.json", "importance.safetensors"]
    with pytest.raises(FileNotFoundError):
        ImportanceScores.load(tmp_path / "nothing")


def test_save_load_without_lm_loss(tmp_path):
    s = random_scores(make_model("phi3"), lm_loss=False)
    s.save(tmp_path)
    t = ImportanceScores.load(tmp_path)
    assert t.lm_loss_drop is None
    with pytest.raises(ValueError, match="lm_loss_drop"):
        t.layer_scores("lm_loss")


def test_mismatched_files_detected(tmp_path):
    m = make_model("llama")
    random_scores(m).save(tmp_path / "a")
    s2 = random_scores(m)
    s2.meta["seq_agg"] = "l2"
    s2.save(tmp_path / "b")
    (tmp_path / "a" / "importance.json").write_text((tmp_path / "b" / "importance.json").read_text())
    with pytest.raises(ValueError, match="different runs"):
        ImportanceScores.load(tmp_path / "a")


def test_select_layers():
    m = make_model("llama")
    s = random_scores(m)
    t = s.select_layers([0, 2, 3])
    assert t.heads.shape == (3, 6) and torch.equal(t.neurons[1], s.neurons[2])
    assert t.fingerprint["num_hidden_layers"] == 3
    with pytest.raises(ValueError):
        s.select_layers([0, 4])


def test_plot(tmp_path):
    s = random_scores(make_model("qwen3"))
    s.plot(tmp_path / "plots" / "imp.png")
    data = (tmp_path / "plots" / "imp.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_scores_validation():
    with pytest.raises(TypeError):
        ImportanceScores(heads=[1], kv_groups=torch.zeros(1, 1), neurons=torch.zeros(1, 1), channels=torch.zeros(1),
                         block_influence=torch.zeros(1))
    with pytest.raises(ValueError, match="layers"):
        ImportanceScores(heads=torch.zeros(2, 4), kv_groups=torch.zeros(2, 2), neurons=torch.zeros(3, 8),
                         channels=torch.zeros(8), block_influence=torch.zeros(2))
