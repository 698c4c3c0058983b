"""Hidden-state distillation (layer map, projections, balance) and distillation across padded vocabularies, on tiny
Llamas, against plain-torch references (values and gradients)."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from minitron import _ext
from minitron.io.data import PackedDataset
from minitron.ops.fused_linear_kl import fused_linear_kl_div_reference
from minitron.ops.hidden_loss import hidden_state_loss_reference
from minitron.train.distill import (PROJECTIONS_NAME, DistillConfig, HiddenProjections, capture_layer_outputs,
                                    distill_model, make_distillation_loss, parse_layer_map, plan_hidden_distillation,
                                    pruning_record, resolve_vocab_size)
from minitron.train.loop import TrainConfig, read_log
from tests.driver.conftest import make_model

KL_BACKEND = "auto" if _ext.available() else "reference"
V = 96


def _hidden_backend() -> str:
    from minitron.ops.hidden_loss import hidden_state_loss

    try:
        hidden_state_loss(torch.zeros(1, 2), torch.zeros(1, 2), backend="auto")
        return "auto"
    except Exception:  # the C++ kernel not built yet: the reference, asked for explicitly
        return "reference"


HB = _hidden_backend()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def teacher_model():
    return make_model("llama", seed=1)  # 4 layers, hidden 48


def pruned_student(teacher, kept_layers=(0, 2, 3), kept_channels=None, seed=5):
    """A student shaped as the pruner makes it, with the pruning record, but random weights."""
    kw = {"num_hidden_layers": len(kept_layers)}
    if kept_channels is not None:
        kw.update(hidden_size=len(kept_channels), num_attention_heads=6, num_key_value_heads=2, head_dim=8)
    s = make_model("llama", seed=seed, **kw)
    s.config.minitron_pruning = {"source_num_hidden_layers": teacher.config.num_hidden_layers,
                                 "kept_layers": list(kept_layers), "source_hidden_size": teacher.config.hidden_size,
                                 "kept_channels": None if kept_channels is None else list(kept_channels)}
    return s


def batch(b=2, s=10, seed=0, pad_from=6):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[-1, pad_from:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def make_data(n=12, s=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (n, s), generator=g)
    mask = torch.ones(n, s, dtype=torch.long)
    mask[-1, s // 2:] = 0
    return PackedDataset(ids, mask, "random tokens")


# ---------------------------------------------------------------------------------------------- settings


def test_layer_map_parsing_and_config_errors():
    assert parse_layer_map("auto") is None
    assert parse_layer_map(" 0:0, 1:2,5:9 ") == [(0, 0), (1, 2), (5, 9)]
    assert parse_layer_map([(0, 1), [2, 3]]) == [(0, 1), (2, 3)]
    for bad, what in (("0-1", "not a student:teacher pair"), ("0:0,0:0", "given twice"), ("", "empty"),
                      ("1:x", "not a student:teacher pair"), ("-1:0", ">= 0")):
        with pytest.raises(ValueError, match=what):
            parse_layer_map(bad)
    c = DistillConfig(hidden_loss="mse", layer_map=[(0, 0), (1, 2)])
    assert c.layer_map == "0:0,1:2" and c.to_dict()["layer_map"] == "0:0,1:2"
    assert "hidden_loss" not in DistillConfig().to_dict()  # old runs keep resuming
    with pytest.raises(ValueError, match="--layer-map"):
        DistillConfig(hidden_loss="cosine", layer_map="0:0:1")
    with pytest.raises(ValueError, match="need a hidden-state loss"):
        DistillConfig(layer_map="0:0")
    with pytest.raises(ValueError, match="hidden_weight"):
        DistillConfig(hidden_loss="cosine", hidden_weight=0)
    with pytest.raises(ValueError, match="hidden_loss"):
        DistillConfig(hidden_loss="l1")
    with pytest.raises(ValueError, match="hidden_balance"):
        DistillConfig(hidden_loss="cosine", hidden_balance="loud")
    assert DistillConfig(hidden_loss="cosine", kl_weight=0).kl_weight == 0  # hidden-only distillation is allowed
    with pytest.raises(ValueError, match="vocab_size"):
        DistillConfig(vocab_size=0)


def test_cli_flags_come_from_the_config():
    import argparse

    from minitron.options import add_options, values_from_args

    p = argparse.ArgumentParser()
    add_options(p, DistillConfig)
    a = p.parse_args(["--hidden-loss", "cosine", "--hidden-weight", "0.5", "--layer-map", "0:0,1:2",
                      "--no-hidden-projection", "--hidden-balance", "dynamic", "--vocab-size", "90"])
    c = DistillConfig(**values_from_args(a, DistillConfig))
    assert (c.hidden_loss, c.hidden_weight, c.layer_map, c.hidden_projection, c.hidden_balance, c.vocab_size) == (
        "cosine", 0.5, "0:0,1:2", False, "dynamic", 90)
    with pytest.raises(SystemExit):
        p.parse_args(["--hidden-loss", "l1"])


def test_plan_auto_from_record_and_errors():
    t = teacher_model()
    s = pruned_student(t, kept_layers=(0, 2, 3))
    plan = plan_hidden_distillation(DistillConfig(hidden_loss="cosine"), s.config, t.config)
    assert plan.pairs == [(0, 0), (1, 2), (2, 3)] and not plan.projection and plan.source == "the pruning record"
    assert plan_hidden_distillation(DistillConfig(), s.config, t.config) is None
    # no record: 1:1 for equal layer counts, an error otherwise
    same = make_model("llama", seed=3)
    assert plan_hidden_distillation(DistillConfig(hidden_loss="mse"), same, t).pairs == [(i, i) for i in range(4)]
    bare = make_model("llama", seed=3, num_hidden_layers=2)
    with pytest.raises(ValueError, match="--layer-map auto: the student has 2 decoder layers and the teacher 4"):
        plan_hidden_distillation(DistillConfig(hidden_loss="mse"), bare, t)
    # a record from another teacher
    with pytest.raises(ValueError, match="cut from a 4-layer model, the teacher has 2"):
        plan_hidden_distillation(DistillConfig(hidden_loss="mse"), s, make_model("llama", num_hidden_layers=2))
    # explicit maps naming layers that do not exist
    with pytest.raises(ValueError, match=r"--layer-map: student layer 3 does not exist \(the student has 3"):
        plan_hidden_distillation(DistillConfig(hidden_loss="mse", layer_map="3:3"), s, t)
    with pytest.raises(ValueError, match=r"--layer-map: teacher layer 4 does not exist \(the teacher has 4"):
        plan_hidden_distillation(DistillConfig(hidden_loss="mse", layer_map="0:4"), s, t)
    # projections: refused for equal widths when asked, required for different widths
    with pytest.raises(ValueError, match="--hidden-projection: the student and the teacher have the same hidden size"):
        plan_hidden_distillation(DistillConfig(hidden_loss="mse", hidden_projection=True), s, t)
    narrow = pruned_student(t, kept_layers=(0, 1, 2, 3), kept_channels=range(0, 48, 2))
    with pytest.raises(ValueError, match="--no-hidden-projection: the hidden sizes differ"):
        plan_hidden_distillation(DistillConfig(hidden_loss="mse", hidden_projection=False), narrow, t)
    p = plan_hidden_distillation(DistillConfig(hidden_loss="mse"), narrow, t)
    assert p.projection and p.kept_channels == list(range(0, 48, 2))
    # a malformed record
    narrow.config.minitron_pruning = dict(narrow.config.minitron_pruning, kept_layers=[0, 1])
    with pytest.raises(ValueError, match="kept_layers"):
        pruning_record(narrow.config)


def test_record_written_by_the_pruner_is_read():
    from minitron.compress.prune import prune_depth

    t = teacher_model()
    import copy

    s = prune_depth(copy.deepcopy(t), num_hidden_layers=2, layers_to_drop=[1, 2])
    plan = plan_hidden_distillation(DistillConfig(hidden_loss="cosine"), s.config, t.config)
    assert plan.pairs == [(0, 0), (1, 3)]


def test_projection_init_identity_on_kept_channels():
    t = teacher_model()
    chans = [1, 4, 5, 9, 10, 11, 20, 21, 22, 23, 30, 31, 32, 33, 34, 35, 40, 41, 42, 43, 44, 45, 46, 47]
    s = pruned_student(t, kept_layers=(0, 3), kept_channels=chans)
    plan = plan_hidden_distillation(DistillConfig(hidden_loss="cosine"), s, t)
    proj = HiddenProjections(plan)
    w = proj.proj["s1_t3"].weight
    expect = torch.zeros(48, 24)
    expect[chans, range(24)] = 1
    assert w.shape == (48, 24) and torch.equal(w, expect)
    h = torch.randn(2, 3, 24)
    out = proj(1, 3, h)
    assert torch.equal(out[..., chans], h) and not out[..., [0, 2, 3]].any()


def test_captured_states_are_the_decoder_layer_outputs():
    m = teacher_model()
    b = batch()
    m.model(**b, output_hidden_states=True, use_cache=False)  # transformers installs its own recorder hooks once
    before = [len(layer._forward_hooks) for layer in m.model.layers]
    with capture_layer_outputs(m, [0, 1, 2, 3]) as st:
        out = m.model(**b, output_hidden_states=True, use_cache=False)
    for i in range(3):  # hidden_states[i + 1] is layer i's output (the last one is after the final norm)
        assert torch.equal(st[i], out.hidden_states[i + 1])
    assert torch.allclose(m.model.norm(st[3]), out.last_hidden_state, atol=1e-6)
    # the hooks are gone afterwards
    assert [len(layer._forward_hooks) for layer in m.model.layers] == before


# ---------------------------------------------------------------------------------------------- the loss


def _reference_loss(student, teacher, b, cfg, pairs, proj_weights=None, vocab=None):
    """Plain torch: KL on materialised logits + hidden losses on HF's output_hidden_states (+ explicit projection)."""
    mask = b["attention_mask"] != 0
    so = student.model(**b, output_hidden_states=True, use_cache=False)
    with torch.no_grad():
        to = teacher.model(**b, output_hidden_states=True, use_cache=False)
    sw, tw = student.lm_head.weight, teacher.lm_head.weight
    sh, th = so.last_hidden_state, to.last_hidden_state
    if vocab is not None:
        sw, tw = sw[:vocab], tw[:vocab]
    logit = cfg.kl_weight * fused_linear_kl_div_reference(sh, sw, th, tw, mode=cfg.mode, temperature=cfg.temperature,
                                                          mask=mask)
    hid = 0
    for s, t in pairs:
        hs, ht = so.hidden_states[s + 1], to.hidden_states[t + 1]
        if proj_weights is not None:
            hs = hs @ proj_weights[f"s{s}_t{t}"].t()
        hid = hid + hidden_state_loss_reference(hs, ht, mask, loss=cfg.hidden_loss)
    hid = hid / len(pairs)
    return logit, hid


@pytest.mark.parametrize("loss", ["cosine", "mse"])
def test_loss_and_gradients_match_plain_torch(loss):
    t = teacher_model()
    chans = list(range(0, 48, 2))
    s = pruned_student(t, kept_layers=(0, 1, 2, 3), kept_channels=chans)  # same depth, half the width
    cfg = DistillConfig(hidden_loss=loss, hidden_weight=0.7, layer_map="0:0,2:1,1:2", backend=KL_BACKEND,
                        hidden_backend=HB, temperature=1.5)
    plan = plan_hidden_distillation(cfg, s, t)  # pairs not covering the last layer (HF's is after the norm)
    proj = HiddenProjections(plan)
    with torch.no_grad():
        for lin in proj.proj.values():
            lin.weight.add_(0.1 * torch.randn_like(lin.weight))
    fn = make_distillation_loss(t.eval(), cfg, hidden=plan, projections=proj)
    b = batch()
    got, metrics = fn(s, b)
    got.backward()
    g_got = {n: p.grad.clone() for n, p in list(s.named_parameters()) + list(proj.named_parameters())}
    s.zero_grad(), proj.zero_grad()
    weights = {k: lin.weight for k, lin in proj.proj.items()}
    logit, hid = _reference_loss(s, t, b, cfg, plan.pairs, weights)
    ref = logit + 0.7 * hid
    ref.backward()
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-6), (got, ref)
    assert math.isclose(float(metrics["hidden"]), float(hid.detach()), rel_tol=1e-4, abs_tol=1e-6)
    for n, p in list(s.named_parameters()) + list(proj.named_parameters()):
        assert torch.allclose(g_got[n], p.grad, rtol=1e-3, atol=1e-6), n
    assert proj.proj["s0_t0"].weight.grad.abs().sum() > 0


def test_masked_tokens_do_not_count_and_balance_is_dynamic():
    t = teacher_model()
    s = pruned_student(t, kept_layers=(0, 1, 3))
    cfg = DistillConfig(hidden_loss="cosine", hidden_weight=0.5, hidden_balance="dynamic", backend=KL_BACKEND,
                        hidden_backend=HB, lm_loss_weight=0.2)
    fn = make_distillation_loss(t.eval(), cfg, hidden=plan_hidden_distillation(cfg, s, t))
    b = batch()
    l1, m1 = fn(s, b)
    other = {k: v.clone() for k, v in b.items()}
    other["input_ids"][-1, 6:] = 7  # only padded positions change
    l2, _ = fn(s, other)
    assert torch.allclose(l1, l2, rtol=1e-5, atol=1e-7)
    logit = float(m1["kl"]) * 1.0 + 0.2 * float(m1["lm"])
    assert math.isclose(float(m1["hidden_alpha"]), logit / float(m1["hidden"]), rel_tol=1e-5)
    assert math.isclose(float(l1.detach()), logit * 1.5, rel_tol=1e-5)  # the hidden term weighs 0.5x the logit terms
    # gradient: the hidden term contributes 0.5 * alpha * d hidden (alpha a constant)
    s.zero_grad()
    l1.backward()
    g = s.model.layers[0].mlp.down_proj.weight.grad.clone()
    s.zero_grad()
    cfg0 = DistillConfig(hidden_loss="cosine", hidden_weight=0.5 * float(m1["hidden_alpha"]), backend=KL_BACKEND,
                         hidden_backend=HB, lm_loss_weight=0.2)
    l0, _ = make_distillation_loss(t, cfg0, hidden=plan_hidden_distillation(cfg0, s, t))(s, b)
    l0.backward()
    assert torch.allclose(g, s.model.layers[0].mlp.down_proj.weight.grad, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------- training


def test_training_checkpoints_and_resume_carry_the_projections(tmp_path):
    t = teacher_model()
    data = make_data()
    chans = list(range(24, 48))
    cfg = TrainConfig(steps=6, batch_size=4, lr=5e-3, warmup_steps=1, save_every=2, seed=3)
    dcfg = DistillConfig(hidden_loss="mse", hidden_weight=0.3, backend=KL_BACKEND, hidden_backend=HB)

    a = pruned_student(t, kept_layers=(0, 3), kept_channels=chans)
    res = distill_model(a, t, data, cfg, dcfg, tmp_path / "a")
    path = tmp_path / "a" / PROJECTIONS_NAME
    assert res.extra["hidden_projections"] == str(path) and path.is_file()
    from safetensors.torch import load_file
    from safetensors import safe_open

    saved = load_file(str(path))
    assert sorted(saved) == ["proj.s0_t0.weight", "proj.s1_t3.weight"]
    w0 = torch.zeros(48, 24)
    w0[chans, range(24)] = 1
    assert not torch.equal(saved["proj.s1_t3.weight"], w0)  # trained
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["pairs"]) == [[0, 0], [1, 3]]
    assert (tmp_path / "a" / "checkpoints" / "step-00000006" / "extra.pt").is_file()
    hidden = [r["hidden"] for r in res.history if r["type"] == "train"]
    assert len(hidden) == 6 and all(math.isfinite(h) for h in hidden)

    class Killed(Exception):
        pass

    def kill(step, record):
        if step == 5:
            raise Killed

    b = pruned_student(t, kept_layers=(0, 3), kept_channels=chans)
    with pytest.raises(Killed):
        distill_model(b, t, data, cfg, dcfg, tmp_path / "b", callbacks=[kill])
    b2 = pruned_student(t, kept_layers=(0, 3), kept_channels=chans, seed=77)
    res_b = distill_model(b2, t, data, cfg, dcfg, tmp_path / "b", resume=True)
    assert res_b.resumed_from == 4
    la = [r["loss"] for r in read_log(tmp_path / "a" / "log.jsonl")]
    lb = [r["loss"] for r in read_log(tmp_path / "b" / "log.jsonl")]
    assert la == pytest.approx(lb, rel=1e-5, abs=1e-7)
    saved_b = load_file(str(tmp_path / "b" / PROJECTIONS_NAME))
    for k in saved:
        assert torch.allclose(saved[k], saved_b[k], atol=1e-6), k
    # a changed hidden setting is refused on resume
    with pytest.raises(ValueError, match="run changed"):
        distill_model(pruned_student(t, kept_layers=(0, 3), kept_channels=chans), t, data, cfg,
                      DistillConfig(hidden_loss="cosine", backend=KL_BACKEND, hidden_backend=HB), tmp_path / "b",
                      resume=True)


def test_hidden_distillation_pulls_the_states_together(tmp_path):
    t = teacher_model()
    s = pruned_student(t, kept_layers=(0, 1, 3))
    data = make_data(n=16)
    res = distill_model(s, t, data, TrainConfig(steps=12, batch_size=4, lr=1e-2, warmup_steps=1),
                        DistillConfig(hidden_loss="cosine", kl_weight=0.0, hidden_backend=HB, backend=KL_BACKEND),
                        tmp_path)
    h = [r["hidden"] for r in res.history if r["type"] == "train"]
    assert sum(h[-3:]) / 3 < 0.7 * sum(h[:2]) / 2, h
    assert "kl" not in res.history[0]


# ---------------------------------------------------------------------------------------------- vocabularies


@pytest.fixture(scope="module")
def tok():
    from minitron.io.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(texts=["the quick brown fox jumps over the lazy dog " * 40], vocab_size=300)


def padded(n: int) -> int:
    return (n // 64 + 1) * 64  # a head padded to the next multiple of 64


def test_resolve_vocab_size_from_tokenizers(tok):
    import copy

    n = len(tok)
    s = make_model("llama", vocab_size=n)
    t_pad = make_model("llama", vocab_size=padded(n), seed=1)  # the teacher's head padded to a multiple of 64
    assert resolve_vocab_size(s, make_model("llama", vocab_size=n, seed=1), tokenizers=(tok, tok)) is None
    assert resolve_vocab_size(s, t_pad, tokenizers=(tok, tok)) == n
    assert resolve_vocab_size(s, t_pad, tokenizers=(tok,)) == n
    with pytest.raises(ValueError, match="no tokenizer shows"):
        resolve_vocab_size(s, t_pad)
    assert resolve_vocab_size(s, t_pad, requested=n - 2) == n - 2
    with pytest.raises(ValueError, match="exceeds a head"):
        resolve_vocab_size(s, t_pad, requested=n + 1)
    # appended special tokens on the teacher's side: the shared ids count
    t_tok = copy.deepcopy(tok)
    t_tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    assert resolve_vocab_size(s, t_pad, tokenizers=(tok, t_tok)) == n
    # a tokenizer that differs beyond that: the first differing ids are named
    from minitron.io.tokenizer import train_bpe_tokenizer

    other = train_bpe_tokenizer(texts=["completely different words appear here, zebra " * 40], vocab_size=300)
    with pytest.raises(ValueError, match=r"differ beyond padding or appended special tokens: \d+ of their \d+ shared "
                                         r"ids map to different tokens, first id \d+"):
        resolve_vocab_size(s, t_pad, tokenizers=(tok, other))


def test_padded_teacher_head_kl_equals_the_sliced_kl(tok):
    n = len(tok)
    s = make_model("llama", vocab_size=n, seed=2)
    t = make_model("llama", vocab_size=padded(n), seed=1)
    with torch.no_grad():
        t.lm_head.weight[n:] *= 5  # padded rows that would take probability mass if they counted
    cfg = DistillConfig(backend=KL_BACKEND)
    vocab = resolve_vocab_size(s, t, tokenizers=(tok, tok))
    fn = make_distillation_loss(t.eval(), cfg, vocab_size=vocab)
    b = batch()
    b["input_ids"] = b["input_ids"] % n
    got, _ = fn(s, b)
    ref, _ = _reference_loss(s, t, b, DistillConfig(hidden_loss="cosine"), [(0, 0)], vocab=n)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-6)
    full = make_distillation_loss(t, cfg, vocab_size=None)
    with pytest.raises(ValueError):
        full(s, b)  # heads of different sizes without the real vocabulary: refused by the op


def test_distill_model_with_padded_heads_runs_and_logs(tok, tmp_path, caplog):
    n = len(tok)
    s = make_model("llama", vocab_size=n + 32, seed=2, num_hidden_layers=2)  # the student padded, the teacher not
    t = make_model("llama", vocab_size=n, seed=1)
    data = make_data()
    data = PackedDataset(data.input_ids % n, data.attention_mask, "random tokens")
    with caplog.at_level("INFO", logger="minitron.train.distill"):
        res = distill_model(s, t, data, TrainConfig(steps=2, batch_size=4), DistillConfig(backend=KL_BACKEND),
                            tmp_path, tokenizers=(tok, tok))
    assert f"the KL uses the first {n} ids" in caplog.text
    assert all(math.isfinite(r["loss"]) for r in res.history)
    with pytest.raises(ValueError, match="no tokenizer shows which ids they share"):
        distill_model(s, t, data, TrainConfig(steps=2, batch_size=4), DistillConfig(backend=KL_BACKEND),
                      tmp_path / "x")
