"""Training loop, teacher correction and distillation on the shipped data (tiny models, few steps)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from minitron import _ext
from minitron.io.data import PackedDataset, load_packed
from minitron.train import DistillConfig, check_distillable, correct_model, distill_model, make_distillation_loss
from minitron.eval.perplexity import perplexity
from minitron.train.loop import TrainConfig, lm_loss, read_log, train
from minitron.runtime import resolve_bf16

ROOT = Path(__file__).resolve().parents[2]
VALID = ROOT / "data" / "wikitext-2" / "valid.txt"
TEST = ROOT / "data" / "wikitext-2" / "test.txt"
SHAKESPEARE = ROOT / "data" / "tinyshakespeare" / "input.txt"

# the compiled kernels when built, else the torch reference (the loop is what is tested here)
KL_BACKEND = "auto" if _ext.available() else "reference"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; tiny models run fastest single-threaded
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    from minitron.io.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(texts=[SHAKESPEARE.read_text(encoding="utf-8")[:200_000]], vocab_size=320)


@pytest.fixture(scope="module")
def train_data(tok):
    return load_packed(VALID, tok, seq_len=32, max_tokens=8192)


@pytest.fixture(scope="module")
def eval_data(tok):
    return load_packed(TEST, tok, seq_len=32, max_tokens=2048, drop_remainder=False)


def tiny_llama(vocab: int, *, hidden: int = 32, layers: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def teacher(tok, train_data, tmp_path_factory):
    model = tiny_llama(len(tok), hidden=48)
    train(model, lm_loss, train_data, TrainConfig(steps=40, batch_size=8, lr=1e-2, warmup_steps=4),
          tmp_path_factory.mktemp("teacher"))
    return model.eval()


def test_teacher_correction_lowers_lm_loss(tok, train_data, eval_data, tmp_path):
    model = tiny_llama(len(tok))
    before = perplexity(model, eval_data)["loss"]
    res = correct_model(model, train_data, TrainConfig(steps=25, batch_size=8, lr=1e-2, warmup_steps=3, eval_every=10),
                        tmp_path, eval_data=eval_data)
    after = perplexity(model, eval_data)["loss"]
    assert after < before - 0.5, (before, after)
    assert math.isclose(res.final_eval["eval_loss"], after, rel_tol=1e-6)
    evals = [r for r in read_log(tmp_path / "log.jsonl") if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [10, 20, 25]
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert (tmp_path / "checkpoints" / "step-00000025" / "state.json").is_file()


def test_distillation_loss_goes_down(tok, teacher, train_data, eval_data, tmp_path):
    student = tiny_llama(len(tok), hidden=32, seed=1)  # narrower than the teacher: Hs != Ht
    start = perplexity(student, eval_data)["loss"]
    res = distill_model(student, teacher, train_data, TrainConfig(steps=30, batch_size=8, lr=1e-2, warmup_steps=3),
                        DistillConfig(backend=KL_BACKEND), tmp_path, eval_data=eval_data)
    kl = [r["kl"] for r in res.history if r["type"] == "train"]
    assert len(kl) == 30 and all(math.isfinite(x) for x in kl)
    assert sum(kl[-5:]) / 5 < 0.5 * sum(kl[:3]) / 3, kl
    assert res.final_eval["eval_loss"] < start - 0.5
    # the teacher is frozen and left as it was
    assert all(p.requires_grad for p in teacher.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_distillation_loss_ignores_padding(tok, teacher):
    student = tiny_llama(len(tok), seed=2)
    loss_fn = make_distillation_loss(teacher, DistillConfig(backend=KL_BACKEND, lm_loss_weight=0.5))
    ids = torch.randint(2, len(tok), (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    other = ids.clone()
    other[1, 10:] = 5
    l1, m1 = loss_fn(student, {"input_ids": ids, "attention_mask": mask})
    l2, m2 = loss_fn(student, {"input_ids": other, "attention_mask": mask})
    l3, _ = loss_fn(student, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert set(m1) == {"kl", "lm"}
    assert torch.allclose(l1, l2, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(l1, l3, rtol=1e-4)


def _history(res_or_path):
    recs = read_log(res_or_path)
    return [(r["type"], r["step"], r.get("loss", r.get("eval_loss"))) for r in recs]


def test_resume_after_interruption_matches_uninterrupted_run(tok, teacher, train_data, eval_data, tmp_path):
    cfg = TrainConfig(steps=10, batch_size=4, grad_accum=2, lr=5e-3, warmup_steps=2, save_every=3, eval_every=5,
                      eval_batches=2, seed=7)
    dcfg = DistillConfig(backend=KL_BACKEND, temperature=2.0, lm_loss_weight=0.3)

    a = tiny_llama(len(tok), seed=3)
    distill_model(a, teacher, train_data, cfg, dcfg, tmp_path / "a", eval_data=eval_data)

    class Killed(Exception):
        pass

    def kill_at_8(step, record):
        if step == 8:
            raise Killed

    b = tiny_llama(len(tok), seed=3)
    with pytest.raises(Killed):
        distill_model(b, teacher, train_data, cfg, dcfg, tmp_path / "b", eval_data=eval_data, callbacks=[kill_at_8])
    assert [r["step"] for r in read_log(tmp_path / "b" / "log.jsonl") if r["type"] == "train"][-1] == 8
    # a fresh process would start from a new model object with other weights and RNG state
    torch.manual_seed(12345)
    b2 = tiny_llama(len(tok), seed=99)
    res = distill_model(b2, teacher, train_data, cfg, dcfg, tmp_path / "b", eval_data=eval_data, resume=True)
    assert res.resumed_from == 6

    ha, hb = _history(tmp_path / "a" / "log.jsonl"), _history(tmp_path / "b" / "log.jsonl")
    assert [h[:2] for h in ha] == [h[:2] for h in hb]  # no duplicated or missing steps
    for (_, _, la), (_, _, lb) in zip(ha, hb):
        assert math.isclose(la, lb, rel_tol=1e-5, abs_tol=1e-6), (ha, hb)
    for (k, pa), pb in zip(a.state_dict().items(), b2.state_dict().values()):
        assert torch.allclose(pa, pb, atol=1e-5), k
    # only the newest checkpoints are kept
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").glob("step-*")) == ["step-00000009", "step-00000010"]


def test_resume_refuses_changed_config_and_fresh_run_refuses_old_dir(tok, train_data, tmp_path):
    cfg = TrainConfig(steps=3, batch_size=4, save_every=1)
    model = tiny_llama(len(tok))
    train(model, lm_loss, train_data, cfg, tmp_path)
    with pytest.raises(ValueError, match="already holds a training run"):
        train(model, lm_loss, train_data, cfg, tmp_path)
    with pytest.raises(ValueError, match=r"configuration changed \(lr"):
        train(model, lm_loss, train_data, TrainConfig(steps=3, batch_size=4, save_every=1, lr=0.5), tmp_path, resume=True)
    other = PackedDataset(train_data.input_ids[:40], train_data.attention_mask[:40])
    with pytest.raises(ValueError, match="run changed"):
        train(model, lm_loss, other, cfg, tmp_path, resume=True)


def test_lr_schedule_warmup_then_cosine(tok, train_data, tmp_path):
    cfg = TrainConfig(steps=20, batch_size=4, lr=1e-3, warmup_steps=5, min_lr_ratio=0.1)
    res = train(tiny_llama(len(tok)), lm_loss, train_data, cfg, tmp_path)
    lrs = [r["lr"] for r in res.history if r["type"] == "train"]
    assert lrs[:5] == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4, 1e-3])
    assert all(x >= y for x, y in zip(lrs[4:], lrs[5:]))
    assert lrs[-1] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 14 / 15)))


def test_config_and_input_errors(tok, teacher):
    with pytest.raises(ValueError, match="mode"):
        DistillConfig(mode="sideways")
    with pytest.raises(ValueError, match="temperature"):
        DistillConfig(temperature=0)
    with pytest.raises(ValueError, match="not both 0"):
        DistillConfig(kl_weight=0, lm_loss_weight=0)
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(TypeError, match="batch_size"):
        TrainConfig(batch_size=2.5)
    with pytest.raises(ValueError, match=r"unknown training option\(s\) \['lr_max'\]"):
        TrainConfig.from_dict({"lr_max": 1})
    with pytest.raises(ValueError, match="bf16"):
        TrainConfig(bf16="maybe")
    assert resolve_bf16("auto", torch.device("cpu")) is False
    with pytest.raises(ValueError, match="vocabulary"):
        check_distillable(tiny_llama(len(tok) + 1), teacher)
    with pytest.raises(ValueError, match="same model object"):
        check_distillable(teacher, teacher)
    with pytest.raises(TypeError):
        check_distillable(torch.nn.Linear(2, 2), teacher)


def test_api_distill_and_correct_write_loadable_models(tok, teacher, tmp_path):
    from minitron import api
    from minitron.io.checkpoint import OutputExistsError, save_model

    save_model(teacher, tmp_path / "teacher", tokenizer=tok)
    res = api.correct_teacher(tmp_path / "teacher", VALID, output_dir=tmp_path / "corr", seq_len=32, max_tokens=4096,
                              steps=3, batch_size=4, eval_data=TEST, eval_max_tokens=512)
    assert (tmp_path / "corr" / "model" / "config.json").is_file()
    assert json.loads((tmp_path / "corr" / "run.json").read_text())["steps"] == 3
    student = api.prune(tmp_path / "corr", num_hidden_layers=1, layers_to_drop=[0])
    assert student.config.num_hidden_layers == 1
    with pytest.raises(OutputExistsError):
        api.distill(student, tmp_path / "corr", VALID, output_dir=tmp_path / "teacher", seq_len=32, steps=2)
    for out in (tmp_path / "corr", tmp_path / "corr" / "model" / "x"):
        with pytest.raises(ValueError, match="(is|lies inside) the input --teacher"):
            api.distill(student, tmp_path / "corr", VALID, output_dir=out, seq_len=32)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        api.distill(student, tmp_path / "corr", VALID, output_dir=tmp_path / "d", seq_len=128)
    assert not (tmp_path / "d").exists()
    res = api.distill(student, tmp_path / "corr", VALID, output_dir=tmp_path / "d", seq_len=32, max_tokens=4096,
                      steps=3, batch_size=4, kl_backend=KL_BACKEND)
    ev = api.evaluate_perplexity(tmp_path / "d", TEST, seq_len=32, max_tokens=512)
    direct = perplexity(res.extra["model"], load_packed(TEST, tok, seq_len=32, max_tokens=512, drop_remainder=False))
    assert math.isclose(ev["ppl"], direct["ppl"], rel_tol=1e-5)
