"""Served-teacher records (vLLM, SGLang, our JSONL) into the top-k logit store and back, on records generated here
in the documented shapes (no server)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from minitron.io.data import PackedDataset
from minitron.io.logit_store import TeacherLogitStore
from minitron.io.served import JSONL_FORMAT, export_teacher_logits, import_teacher_logits

K = 4
S = 9


@pytest.fixture(scope="module")
def tok():
    from minitron.io.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(texts=["the quick brown fox jumps over the lazy dog " * 40], vocab_size=300)


@pytest.fixture(scope="module")
def tok_dir(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(str(d))
    return d


def teacher_logprobs(n: int, vocab: int, seed: int = 0, temperature: float = 1.0):
    """Token ids [n, S] and the teacher's next-token log-probs [n, S, V] at ``temperature`` (the reference)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, S), generator=g)
    logits = 3 * torch.randn(n, S, vocab, generator=g, dtype=torch.float64)
    return ids, torch.log_softmax(logits / temperature, -1)


def vllm_records(ids, lp, *, with_ranks=True, last=False, bare=False, extra=None):
    """RequestOutput-like dicts: prompt_logprobs[t] = top-k of the distribution of token t (+ token t itself)."""
    recs = []
    S = ids.shape[1]
    for r in range(ids.shape[0]):
        plp = [None]
        for t in range(1, S):
            dist = lp[r, t - 1]
            top = torch.topk(dist, K)
            d = {}
            for rank, (v, i) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1):
                d[str(i)] = v if bare else {"logprob": v, "rank": rank if with_ranks else None, "decoded_token": "x"}
            a = int(ids[r, t])
            if str(a) not in d:
                rank = int((dist > dist[a]).sum()) + 1
                d[str(a)] = float(dist[a]) if bare else {"logprob": float(dist[a]),
                                                         "rank": rank if with_ranks else None, "decoded_token": "y"}
            plp.append(d)
        rec = {"prompt_token_ids": ids[r].tolist(), "prompt_logprobs": plp}
        if last:
            top = torch.topk(lp[r, S - 1], K)
            rec["outputs"] = [{"token_ids": [int(top.indices[0])], "logprobs": [
                {str(i): {"logprob": v, "rank": k + 1} for k, (v, i) in
                 enumerate(zip(top.values.tolist(), top.indices.tolist()))}]}]
        if extra:
            rec.update(extra)
        recs.append(rec)
    return recs


def sglang_records(ids, lp, *, last=True):
    recs = []
    S = ids.shape[1]
    for r in range(ids.shape[0]):
        itl = [[None, int(ids[r, 0]), None]] + [[float(lp[r, t - 1, ids[r, t]]), int(ids[r, t]), None]
                                                 for t in range(1, S)]
        itop = [None]
        for t in range(1, S):
            top = torch.topk(lp[r, t - 1], K)
            itop.append([[v, i, None] for v, i in zip(top.values.tolist(), top.indices.tolist())])
        meta = {"input_token_logprobs": itl, "input_top_logprobs": itop, "prompt_tokens": S}
        if last:
            top = torch.topk(lp[r, S - 1], K)
            meta["output_top_logprobs"] = [[[v, i, "t"] for v, i in zip(top.values.tolist(), top.indices.tolist())]]
        recs.append({"text": "...", "meta_info": meta})
    return recs


def write_lines(path: Path, objs) -> Path:
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return path


def expected(lp, last: bool):
    """Reference store entries: position t = top-k of lp[:, t]; the last position -inf unless given."""
    top = torch.topk(lp, K, dim=-1)
    idx, val = top.indices.clone(), top.values.float().clone()
    if not last:
        val[:, -1] = float("-inf")
    return idx, val


def check_store(store, ids, lp, last):
    idx, val = expected(lp, last)
    got_i, got_v = store.get(list(range(ids.shape[0])))
    fin = torch.isfinite(val[..., 0])
    assert torch.equal(got_i[fin], idx[fin])
    assert torch.allclose(got_v[fin], val[fin], atol=1e-6)
    assert torch.isinf(got_v[~fin]).all()
    data = store.stored_data()
    assert torch.equal(data.input_ids, ids) and bool(data.attention_mask.all())


@pytest.mark.parametrize("with_ranks,bare,last", [(True, False, False), (False, False, True), (False, True, False)])
def test_import_vllm_offline_shape(tok, tok_dir, tmp_path, with_ranks, bare, last):
    ids, lp = teacher_logprobs(3, len(tok))
    f = write_lines(tmp_path / "vllm.jsonl", vllm_records(ids, lp, with_ranks=with_ranks, bare=bare, last=last))
    out = import_teacher_logits(f, "vllm", tok_dir, tmp_path / "store", value_encoding="fp32",
                                top_k=None if with_ranks else K)
    store = TeacherLogitStore(out, verify_hashes=True)
    assert (store.k, store.vocab_size, store.seq_len, len(store), store.temperature) == (K, len(tok), S, 3, 1.0)
    assert store.manifest["served"]["convention"].startswith("assumed")
    assert store.tokenizer_hash is not None
    check_store(store, ids, lp, last)


def test_import_vllm_server_choices_and_sglang(tok, tmp_path):
    ids, lp = teacher_logprobs(4, len(tok), seed=1)
    recs = vllm_records(ids, lp)
    server = [{"id": "cmpl-1", "object": "text_completion",
               "choices": [{"index": i, "text": "", "prompt_token_ids": r["prompt_token_ids"],
                            "prompt_logprobs": r["prompt_logprobs"]} for i, r in enumerate(recs[:2])]},
              {"id": "cmpl-2", "choices": [{"index": 0, "prompt_token_ids": r["prompt_token_ids"],
                                            "prompt_logprobs": r["prompt_logprobs"]} for r in recs[2:]]}]
    store = TeacherLogitStore(import_teacher_logits(write_lines(tmp_path / "srv.jsonl", server), "vllm", tok,
                                                    tmp_path / "a", value_encoding="fp32"))
    check_store(store, ids, lp, last=False)
    sg = sglang_records(ids, lp)
    lines = [sg[0], sg[1:3], sg[3]]  # one response, a batch (JSON list), one response
    store = TeacherLogitStore(import_teacher_logits(write_lines(tmp_path / "sg.jsonl", lines), "sglang", tok,
                                                    tmp_path / "b", value_encoding="fp32"))
    assert store.manifest["served"]["format"] == "sglang"
    check_store(store, ids, lp, last=True)


def test_u8_encoding_and_shorter_prompts_are_padded(tok, tmp_path):
    ids, lp = teacher_logprobs(2, len(tok), seed=2)
    recs = sglang_records(ids, lp)
    short = sglang_records(ids[:, :5], lp[:, :5], last=False)[0]
    f = write_lines(tmp_path / "sg.jsonl", [recs[0], short, recs[1]])
    store = TeacherLogitStore(import_teacher_logits(f, "sglang", tok, tmp_path / "s"))  # u8 default
    assert store.value_encoding == "u8" and len(store) == 3
    data = store.stored_data()
    assert data.attention_mask[1].tolist() == [1] * 5 + [0] * 4
    i, v = store.get([1])
    assert torch.isinf(v[0, 4:]).all() and torch.isfinite(v[0, :4]).all()
    assert torch.allclose(v[0, :4], torch.topk(lp[0, :4], K, -1).values.float(), atol=0.05)


def test_temperature_convention_recorded_and_never_mixed(tok, tmp_path):
    ids, lp = teacher_logprobs(2, len(tok), seed=3, temperature=2.0)
    proc = vllm_records(ids, lp, extra={"logprobs_mode": "processed_logprobs", "sampling_params": {"temperature": 2.0}})
    store = TeacherLogitStore(import_teacher_logits(write_lines(tmp_path / "p.jsonl", proc), "vllm", tok,
                                                    tmp_path / "p", value_encoding="fp32"))
    assert store.temperature == 2.0 and store.manifest["served"]["logprobs_mode"] == "processed_logprobs"
    assert store.manifest["served"]["convention"] == "declared by the records"
    # the convention given as arguments for records that do not declare one
    plain = vllm_records(ids, lp)
    store = TeacherLogitStore(import_teacher_logits(write_lines(tmp_path / "q.jsonl", plain), "vllm", tok,
                                                    tmp_path / "q", logprobs_mode="processed_logprobs",
                                                    temperature=2.0))
    assert store.temperature == 2.0 and store.manifest["served"]["convention"] == "given"
    # mixing raw and processed records is refused, naming the line
    raw = vllm_records(ids[:1], lp[:1], extra={"logprobs_mode": "raw_logprobs"})
    f = write_lines(tmp_path / "mix.jsonl", [proc[0], raw[0]])
    with pytest.raises(ValueError, match=r"mix.jsonl:2: logprobs at temperature 1.0, but line 1 has them at 2.0"):
        import_teacher_logits(f, "vllm", tok, tmp_path / "mix")
    assert not (tmp_path / "mix").exists()
    with pytest.raises(ValueError, match="the arguments"):
        import_teacher_logits(write_lines(tmp_path / "r.jsonl", raw), "vllm", tok, tmp_path / "r",
                              logprobs_mode="processed_logprobs", temperature=2.0)
    with pytest.raises(ValueError, match="needs the sampling temperature"):
        import_teacher_logits(write_lines(tmp_path / "t.jsonl", vllm_records(
            ids, lp, extra={"logprobs_mode": "processed_logprobs"})), "vllm", tok, tmp_path / "t")


def _bad(tmp_path, tok, name, objs, fmt, match, **kw):
    f = tmp_path / f"{name}.jsonl"
    if isinstance(objs, str):
        f.write_text(objs)
    else:
        write_lines(f, objs)
    with pytest.raises(ValueError, match=match):
        import_teacher_logits(f, fmt, tok, tmp_path / f"out-{name}", **kw)
    assert not (tmp_path / f"out-{name}").exists()  # nothing written


def test_bad_records_are_named_by_line_before_any_output(tok, tmp_path):
    V = len(tok)
    ids, lp = teacher_logprobs(3, V, seed=4)
    good = vllm_records(ids, lp)
    # a token id of the prompt outside the tokenizer (line 2)
    bad = json.loads(json.dumps(good))
    bad[1]["prompt_token_ids"][3] = V + 5
    _bad(tmp_path, tok, "prompt-id", bad, "vllm", rf"prompt-id.jsonl:2: token id {V + 5} exceeds the tokenizer")
    # an entry id outside the tokenizer (line 3)
    bad = json.loads(json.dumps(good))
    bad[2]["prompt_logprobs"][4][str(V)] = {"logprob": -20.0, "rank": 999}
    _bad(tmp_path, tok, "entry-id", bad, "vllm", rf"entry-id.jsonl:3 position 3: token id {V} exceeds")
    # a positive logprob, a NaN logprob
    sg = sglang_records(ids, lp)
    bad = json.loads(json.dumps(sg))
    bad[1]["meta_info"]["input_top_logprobs"][2][0][0] = 0.5
    _bad(tmp_path, tok, "pos", bad, "sglang", r"pos.jsonl:2 position 2: logprob 0.5 is positive")
    text = "".join(json.dumps(o) + "\n" for o in sg).replace(f"[{sg[2]['meta_info']['input_top_logprobs'][5][1][0]!r}",
                                                              "[NaN", 1)
    _bad(tmp_path, tok, "nan", text, "sglang", r"nan.jsonl:3 position 5: logprob is NaN")
    # a k that varies (an SGLang position with k - 1 entries; a vLLM position with k + 2)
    bad = json.loads(json.dumps(sg))
    bad[2]["meta_info"]["input_top_logprobs"][3].pop()
    _bad(tmp_path, tok, "k-sg", bad, "sglang", r"k-sg.jsonl:1: a position holds 4 top-k entries, others 3")
    bad = json.loads(json.dumps(good))
    pos = bad[1]["prompt_logprobs"][2]
    for extra in (V - 1, V - 2, V - 3):
        pos.setdefault(str(extra), {"logprob": -30.0, "rank": 5000 + extra})
    _bad(tmp_path, tok, "k-vllm", bad, "vllm", r"k-vllm.jsonl:2: a position holds \d top-k entries, others 4: k must "
                                                 r"not vary")
    # malformed JSON, a duplicated id, a wrong shape
    _bad(tmp_path, tok, "json", json.dumps(good[0]) + "\n{oops\n", "vllm", r"json.jsonl:2: not valid JSON")
    bad = json.loads(json.dumps(sg))
    bad[0]["meta_info"]["input_top_logprobs"][1][1][1] = bad[0]["meta_info"]["input_top_logprobs"][1][0][1]
    _bad(tmp_path, tok, "dup", bad, "sglang", r"dup.jsonl:1 position 0: a token id appears twice")
    _bad(tmp_path, tok, "shape", [{"prompt_token_ids": [1, 2]}], "vllm", r"shape.jsonl:1: a vLLM record needs")
    _bad(tmp_path, tok, "hdr", [{"token_ids": [1]}], "jsonl", r"hdr.jsonl:1: the first line of a jsonl file must be")


def test_argument_errors(tok, tmp_path):
    ids, lp = teacher_logprobs(1, len(tok))
    f = write_lines(tmp_path / "v.jsonl", vllm_records(ids, lp))
    with pytest.raises(ValueError, match="format must be one of"):
        import_teacher_logits(f, "tgi", tok, tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="records file"):
        import_teacher_logits(tmp_path / "missing.jsonl", "vllm", tok, tmp_path / "o")
    with pytest.raises(ValueError, match="value_encoding"):
        import_teacher_logits(f, "vllm", tok, tmp_path / "o", value_encoding="int4")
    with pytest.raises(ValueError, match="temperature without logprobs_mode"):
        import_teacher_logits(f, "vllm", tok, tmp_path / "o", temperature=0.7)
    with pytest.raises(TypeError, match="tokenizer"):
        import_teacher_logits(f, "vllm", 5, tmp_path / "o")
    with pytest.raises(ValueError, match="top_k"):
        import_teacher_logits(f, "vllm", tok, tmp_path / "o", top_k=0)
    out = import_teacher_logits(f, "vllm", tok, tmp_path / "o")
    with pytest.raises(Exception, match="exists"):
        import_teacher_logits(f, "vllm", tok, out)
    import_teacher_logits(f, "vllm", tok, out, overwrite=True)


def test_export_import_round_trip(tok, tmp_path):
    ids, lp = teacher_logprobs(5, len(tok), seed=5)
    a = TeacherLogitStore(import_teacher_logits(write_lines(tmp_path / "v.jsonl", vllm_records(ids, lp, last=True)),
                                                "vllm", tok, tmp_path / "a", value_encoding="fp32"))
    f = export_teacher_logits(a, tmp_path / "a.jsonl")
    lines = f.read_text().splitlines()
    header = json.loads(lines[0])
    assert header == {"format": JSONL_FORMAT, "version": 1, "k": K, "temperature": 1.0,
                      "logprobs_mode": "raw_logprobs", "seq_len": S, "vocab_size": len(tok)}
    first = json.loads(lines[1])
    assert first["token_ids"] == ids[0].tolist() and len(first["top_ids"][0]) == K
    b = TeacherLogitStore(import_teacher_logits(f, "jsonl", tok, tmp_path / "b", value_encoding="fp32"))
    ia, va = a.get(list(range(5)))
    ib, vb = b.get(list(range(5)))
    assert torch.equal(ia, ib) and torch.allclose(va, vb, atol=1e-6)
    assert b.manifest["data"]["input_ids_sha256"] == a.manifest["data"]["input_ids_sha256"]
    with pytest.raises(Exception, match="exists"):
        export_teacher_logits(a, f)


def test_export_of_a_teacher_pass_store(tmp_path, caplog):
    from minitron.train.teacher_logits import write_teacher_logits
    from tests.driver.conftest import make_model

    teacher = make_model("llama", seed=1)
    g = torch.Generator().manual_seed(0)
    data = PackedDataset(torch.randint(3, 96, (3, 8), generator=g), torch.ones(3, 8, dtype=torch.long), "rand")
    store = TeacherLogitStore(write_teacher_logits(teacher, data, tmp_path / "s", top_k=5, value_encoding="fp32",
                                                   progress=False))
    assert store.stored_data() is None and store.token_ids([0]) == (None, None)
    with caplog.at_level("WARNING", logger="minitron.io.served"):
        f = export_teacher_logits(store, tmp_path / "no-ids.jsonl")
    assert "cannot be imported back" in caplog.text
    assert "token_ids" not in json.loads(f.read_text().splitlines()[1])
    f = export_teacher_logits(store.path, tmp_path / "ids.jsonl", data=data)
    rec = json.loads(f.read_text().splitlines()[2])
    assert rec["token_ids"] == data.input_ids[1].tolist()
    idx, lp = store.get([1])
    assert rec["top_ids"][3] == idx[0, 3].tolist()
    assert rec["top_logprobs"][3] == pytest.approx(lp[0, 3].tolist(), abs=1e-6)
    with pytest.raises(Exception, match="other data"):
        export_teacher_logits(store, tmp_path / "x.jsonl",
                              data=PackedDataset(data.input_ids.flip(0), data.attention_mask, "other"))


def test_distill_from_an_imported_store_skips_positions_without_teacher(tok, tmp_path):
    from minitron.ops.topk_kl import fused_linear_topk_kl_div
    from minitron.train.distill import final_hidden_and_head
    from minitron.train.loop import TrainConfig
    from minitron.train.stored import StoredDistillConfig, distill_from_store, make_stored_distillation_loss
    from tests.driver.conftest import make_model

    ids, lp = teacher_logprobs(4, len(tok), seed=6)
    store = TeacherLogitStore(import_teacher_logits(write_lines(tmp_path / "v.jsonl", vllm_records(ids, lp)), "vllm",
                                                    tok, tmp_path / "s", value_encoding="fp32"))
    data = store.stored_data()
    student = make_model("llama", vocab_size=len(tok), num_hidden_layers=1)
    cfg = StoredDistillConfig(backend="reference")
    fn = make_stored_distillation_loss(store, cfg)
    batch = data.select(torch.arange(2))
    t_idx, t_lp = store.get([0, 1])
    got, _ = fn(student, dict(batch, teacher_indices=t_idx, teacher_logprobs=t_lp))
    h, w, b = final_hidden_and_head(student, batch)
    mask = torch.ones(2, S, dtype=torch.bool)
    mask[:, -1] = False  # the last position has no teacher distribution
    ref = fused_linear_topk_kl_div(h, w, t_idx, t_lp, student_bias=b, mask=mask, backend="reference")
    assert torch.allclose(got, ref, rtol=1e-5) and math.isfinite(float(got.detach()))
    res = distill_from_store(student, store, data, TrainConfig(steps=2, batch_size=2), cfg, tmp_path / "run")
    assert all(math.isfinite(r["loss"]) for r in res.history)
