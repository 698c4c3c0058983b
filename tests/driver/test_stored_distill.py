"""Distillation from a stored top-k teacher, end to end on tiny Llamas (no teacher loaded while training)."""
from __future__ import annotations

import math

import pytest
import torch

from minitron import _ext
from minitron.io.data import PackedDataset
from minitron.io.logit_store import StoreError, TeacherLogitStore, topk_logprobs
from minitron.train.teacher_logits import write_teacher_logits
from minitron.train.distill import final_hidden_and_head
from minitron.train.loop import TrainConfig, read_log
from minitron.train.stored import (StoreBackedData, StoredDistillConfig, distill_from_store,
                                   make_stored_distillation_loss)
from tests.driver.conftest import make_model

BACKEND = "auto" if _ext.available() else "reference"
V = 96


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_data(n: int = 12, s: int = 16, seed: int = 0) -> PackedDataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (n, s), generator=g)
    mask = torch.ones(n, s, dtype=torch.long)
    mask[-1, s // 2:] = 0
    ids[-1, s // 2:] = 0
    return PackedDataset(ids, mask, "random tokens")


@pytest.fixture(scope="module")
def teacher():
    return make_model("llama", seed=1)


@pytest.fixture(scope="module")
def data():
    return make_data()


@pytest.fixture(scope="module")
def store_fp32(tmp_path_factory, teacher, data):
    out = tmp_path_factory.mktemp("stores") / "fp32-k16-t2"
    return TeacherLogitStore(write_teacher_logits(teacher, data, out, top_k=16, temperature=2.0,
                                                  value_encoding="fp32", batch_size=4, shard_sequences=5,
                                                  progress=False))


@pytest.fixture(scope="module")
def store_u8(tmp_path_factory, teacher, data):
    out = tmp_path_factory.mktemp("stores") / "u8-k32"
    return TeacherLogitStore(write_teacher_logits(teacher, data, out, top_k=32, value_encoding="u8", batch_size=4,
                                                  progress=False))


def student_model(seed: int = 2):
    # a narrower Llama with the teacher's vocabulary (what width pruning yields)
    return make_model("llama", seed=seed, intermediate_size=32, num_hidden_layers=2)


def live_topk_loss(student, teacher, batch, k, temperature, *, tail=True, lm_loss_weight=0.0):
    """The same loss with the teacher run live (its exact fp32 top-k)."""
    from minitron.ops import fused_linear_topk_kl_div

    with torch.no_grad():
        th, tw, tb = final_hidden_and_head(teacher, batch)
        b, s = th.shape[:2]
        idx, lp = topk_logprobs(th.reshape(b * s, -1), tw, tb, k, temperature)
    sh, sw, sb = final_hidden_and_head(student, batch)
    mask = batch["attention_mask"] != 0
    labels = None
    if lm_loss_weight:
        ids = batch["input_ids"]
        labels = torch.full_like(ids, -100)
        labels[:, :-1] = ids[:, 1:].masked_fill(~(mask[:, 1:] & mask[:, :-1]), -100)
    return fused_linear_topk_kl_div(sh, sw, idx.reshape(b, s, k), lp.reshape(b, s, k), student_bias=sb,
                                    labels=labels, ce_weight=lm_loss_weight, temperature=temperature, mask=mask,
                                    tail=tail, backend=BACKEND)


@pytest.mark.parametrize("tail,lm", [(True, 0.0), (False, 0.0), (True, 0.5)])
def test_stored_loss_equals_live_topk_loss(store_fp32, teacher, data, tail, lm):
    student = student_model()
    cfg = StoredDistillConfig(tail=tail, lm_loss_weight=lm, backend=BACKEND)
    loss_fn = make_stored_distillation_loss(store_fp32, cfg)
    sel = torch.tensor([11, 3, 7, 0])  # includes the padded sequence
    batch = StoreBackedData(data, store_fp32).select(sel)
    assert set(batch) == {"input_ids", "attention_mask", "sequence_index", "teacher_indices", "teacher_logprobs"}
    loss, metrics = loss_fn(student, batch)
    ref = live_topk_loss(student, teacher, data.select(sel), 16, 2.0, tail=tail, lm_loss_weight=lm)
    assert torch.isfinite(loss) and loss.item() > 0
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    # by sequence index only: looked up in the store
    loss2, _ = loss_fn(student, {k: batch[k] for k in ("input_ids", "attention_mask", "sequence_index")})
    torch.testing.assert_close(loss2, loss, rtol=0, atol=0)
    # gradients flow to the student
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_distill_from_store_end_to_end(tmp_path, store_u8, teacher, data):
    student = student_model()
    first = make_stored_distillation_loss(store_u8, StoredDistillConfig(backend=BACKEND))
    cfg = TrainConfig(steps=12, batch_size=4, lr=1e-2, warmup_steps=0, seed=0, device="cpu", bf16=False)
    res = distill_from_store(student, store_u8.path, data, cfg, StoredDistillConfig(backend=BACKEND),
                             tmp_path / "run", eval_data=data)
    losses = [l for _, l in res.train_losses]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses  # it learns the teacher
    assert res.final_eval is not None and math.isfinite(res.final_eval["eval_ppl"])
    # the trained student is closer to the teacher on the whole data than an untrained one
    batch = StoreBackedData(data, store_u8).select(torch.arange(len(data)))
    with torch.no_grad():
        after = first(student, batch)[0].item()
        before = first(student_model(), batch)[0].item()
    assert after < 0.7 * before


def test_resume_is_exact(tmp_path, store_fp32, data):
    cfg = TrainConfig(steps=6, batch_size=4, lr=5e-3, warmup_steps=1, save_every=2, seed=3, device="cpu", bf16=False)
    scfg = StoredDistillConfig(backend=BACKEND)
    full = distill_from_store(student_model(), store_fp32, data, cfg, scfg, tmp_path / "full")

    def stop(step, record):
        if step == 3:
            raise KeyboardInterrupt

    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        distill_from_store(student_model(), store_fp32, data, cfg, scfg, run, callbacks=[stop])
    resumed = distill_from_store(student_model(), store_fp32, data, cfg, scfg, run, resume=True)
    assert resumed.resumed_from == 2
    a = [(r["step"], r["loss"]) for r in read_log(full.log_path) if r["type"] == "train"]
    b = [(r["step"], r["loss"]) for r in read_log(resumed.log_path) if r["type"] == "train"]
    assert a == b


def test_refusals(tmp_path, store_fp32, data, teacher):
    student = student_model()
    cfg = TrainConfig(steps=1, batch_size=4, device="cpu", bf16=False)
    with pytest.raises(StoreError, match="vocabulary size 96, the student has 128"):
        distill_from_store(make_model("llama", vocab_size=128, num_hidden_layers=1), store_fp32, data, cfg, None,
                           tmp_path / "a")
    with pytest.raises(StoreError, match="token ids hash differs"):
        distill_from_store(student, store_fp32, make_data(seed=9), cfg, None, tmp_path / "b")
    with pytest.raises(StoreError, match="seq_len 16, the data has seq_len 8"):
        distill_from_store(student, store_fp32, make_data(s=8), cfg, None, tmp_path / "c")
    with pytest.raises(StoreError, match="another tokenizer"):
        store_fp32.manifest["tokenizer"]["sha256"] = "a" * 64
        try:
            distill_from_store(student, store_fp32, data, cfg, None, tmp_path / "d", tokenizer_hash="b" * 64)
        finally:
            store_fp32.manifest["tokenizer"]["sha256"] = None
    with pytest.raises(ValueError, match="temperature=1.0 differs from the store's temperature 2.0"):
        distill_from_store(student, store_fp32, data, cfg, StoredDistillConfig(temperature=1.0), tmp_path / "e")
    with pytest.raises(ValueError, match="overlaps the teacher-logit store"):
        distill_from_store(student, store_fp32, data, cfg, None, store_fp32.path / "run")
    with pytest.raises(StoreError, match="is not a teacher-logit store"):
        distill_from_store(student, tmp_path, data, cfg, None, tmp_path / "f")
    with pytest.raises(ValueError, match="kl_weight and lm_loss_weight"):
        StoredDistillConfig(kl_weight=0.0)
    with pytest.raises(ValueError, match="unknown stored-distillation option"):
        StoredDistillConfig.from_dict({"mode": "forward"})
    assert not any((tmp_path / x).exists() for x in "abcdef")


def test_padded_student_head_with_the_real_vocabulary(tmp_path, store_fp32, data):
    """A student whose head is padded beyond the store's vocabulary (96 -> 128 rows): with the real vocabulary
    (--vocab-size, or the tokenizer) the padded rows count as -inf, i.e. the loss of the head cut to 96 rows."""
    import copy

    padded = make_model("llama", vocab_size=128, num_hidden_layers=1, seed=4)
    with torch.no_grad():
        padded.lm_head.weight[V:] *= 4  # padded rows that would take mass if they counted
    cut = copy.deepcopy(padded)
    cut.lm_head.weight = torch.nn.Parameter(padded.lm_head.weight[:V].detach().clone())
    batch = StoreBackedData(data, store_fp32).select(torch.arange(4))
    for lm in (0.0, 0.5):
        cfg = StoredDistillConfig(vocab_size=V, lm_loss_weight=lm, backend="reference")
        got, _ = make_stored_distillation_loss(store_fp32, cfg)(padded, batch)
        ref, _ = make_stored_distillation_loss(store_fp32, StoredDistillConfig(lm_loss_weight=lm,
                                                                                 backend="reference"))(cut, batch)
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6), (lm, got, ref)
    res = distill_from_store(padded, store_fp32, data, TrainConfig(steps=2, batch_size=4, device="cpu", bf16=False),
                             StoredDistillConfig(vocab_size=V, backend=BACKEND), tmp_path / "run")
    assert all(math.isfinite(r["loss"]) for r in res.history)
    assert res.history[0]["type"] == "train"
    with pytest.raises(StoreError, match="exceeds the store's vocabulary"):
        store_fp32.check_compatible(data, vocab_size=128, real_vocab_size=V + 1)
