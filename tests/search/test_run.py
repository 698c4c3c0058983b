"""Scoring on tiny random models (against a plain fp64 reference), the whole search through ``minitron.api.search``,
its report, resume after a simulated kill, and bad input refused before any work."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from minitron import api
from minitron.search import SearchSpec, Shape, enumerate_candidates
from minitron.search.score import TeacherReference, build_candidate, score_model
from minitron.search.space import Candidate, count_parameters
from tests.search.conftest import make_model, packed, random_scores


def _reference(model, teacher, batches):
    """Mean next-token CE of ``model`` and mean KL(teacher || model) over real tokens, from full fp64 logits."""
    nll, kl, n_ce, n_kl = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for b in batches:
            s = model(**b, use_cache=False).logits.double()
            t = teacher(**b, use_cache=False).logits.double()
            m = b["attention_mask"].bool()
            ok = m[:, :-1] & m[:, 1:]
            ce = F.cross_entropy(s[:, :-1].reshape(-1, s.shape[-1]), b["input_ids"][:, 1:].reshape(-1),
                                 reduction="none")
            nll += float((ce * ok.reshape(-1)).sum())
            n_ce += int(ok.sum())
            lt, ls = t.log_softmax(-1), s.log_softmax(-1)
            kl += float(((lt.exp() * (lt - ls)).sum(-1) * m).sum())
            n_kl += int(m.sum())
    return nll / n_ce, kl / n_kl


def _candidate(teacher, shape):
    n = count_parameters(teacher.config, shape)
    return Candidate(shape, n, 0, 4 * n, 0, "width", 1.0)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_scores_match_a_plain_reference_and_the_teacher_pass_is_shared(family):
    from tests.driver.conftest import make_batches

    teacher = make_model(family, tie=family == "qwen2")
    scores = random_scores(teacher)
    batches = make_batches(n=2, batch=3, seq=12)  # the last row of each batch is padded
    calls = []
    base = teacher.model
    hook = base.register_forward_hook(lambda mod, *a: calls.append(1) if mod is base else None)
    ref = TeacherReference.compute(teacher, batches)
    assert len(calls) == 2  # one teacher forward per batch
    snap = {k: v.clone() for k, v in teacher.state_dict().items()}
    for shape in (Shape(48, 32, 4, 2, 4), Shape(48, 64, 6, 2, 3), Shape(40, 48, 2, 1, 3)):
        if family == "llama" and shape.hidden_size % shape.num_attention_heads:
            continue
        student, dropped = build_candidate(teacher, scores, _candidate(teacher, shape))
        got = score_model(student, ref)
        assert len(calls) == 2  # scoring a candidate never runs the teacher again
        want_loss, want_kl = _reference(student, teacher, batches)
        assert got["loss"] == pytest.approx(want_loss, rel=1e-5, abs=1e-6)
        assert got["kl"] == pytest.approx(want_kl, rel=1e-4, abs=1e-6)
        assert got["kl"] > 0
        if shape.num_hidden_layers < 4:  # one contiguous block, chosen by the LM-loss drop as prune_depth does
            from minitron.compress.prune import plan_depth

            assert dropped == plan_depth(teacher.config, num_hidden_layers=shape.num_hidden_layers, scores=scores)
        calls.clear()
        calls.extend([1, 1])
    hook.remove()
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in snap.items())  # the teacher is not modified
    same = score_model(teacher, ref)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["loss"] == pytest.approx(ref.loss, rel=1e-6)


def _setup(tmp_path, **kw):
    teacher = make_model("llama", num_hidden_layers=5)
    scores = random_scores(teacher)
    total = sum(p.numel() for p in teacher.parameters())
    opts = dict(target_params=int(total * 0.8), hidden_multiple=6, mlp_multiple=8, tolerance=0.06, top_k=2,
                distill_tokens=32, score_tokens=32, score_batch_size=2)
    opts.update(kw)
    return teacher, scores, SearchSpec(**opts)


def _run(teacher, scores, spec, out, **kw):
    return api.search(teacher, packed(n=10, seq=16), importance=scores, output_dir=out, options=spec, device="cpu",
                      train=dict(batch_size=2, lr=1e-3, warmup_steps=0, device="cpu"), **kw)


def test_search_writes_the_winner_and_the_report(tmp_path):
    from transformers import AutoModelForCausalLM

    teacher, scores, spec = _setup(tmp_path)
    res = _run(teacher, scores, spec, tmp_path / "out")
    out = tmp_path / "out"
    for f in ("search.json", "search.md", "search.png", "search_state.json", "model/config.json",
              "distilled/config.json"):
        assert (out / f).is_file(), f
    s = json.loads((out / "search.json").read_text())
    assert s["winner"] == res.winner and len(s["candidates"]) == len(res.candidates) >= 3
    assert [r["rank"] for r in s["candidates"]] == list(range(1, len(s["candidates"]) + 1))
    losses = [r["score"]["loss"] for r in s["candidates"]]
    assert losses == sorted(losses)
    assert len(s["finalists"]) == 2 and s["finalists"] == [r["id"] for r in s["candidates"][:2]]
    rc = s["ranking_change"]
    assert set(rc["after"]) == set(rc["before"]) and rc["pairs"] == 1
    for cid in s["finalists"]:
        d = next(r for r in s["candidates"] if r["id"] == cid)["distilled"]
        assert d["steps"] == 1 and d["tokens"] == 32 and math.isfinite(d["loss"])
        assert (out / "finalists" / cid / "log.jsonl").is_file()
        assert not (out / "finalists" / cid / "checkpoints").exists()
    assert s["scoring_cost"]["mean"] > 0 and "teacher_pass" in s["timings"] and "score" in s["timings"]
    win = next(c for c in res.candidates if c.id == res.winner)
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.hidden_size == win.shape.hidden_size
    assert model.config.num_hidden_layers == win.shape.num_hidden_layers
    assert sum(p.numel() for p in model.parameters()) == win.parameters
    md = (out / "search.md").read_text()
    assert res.winner in md and "Ranking change" in md and "Scoring cost" in md


def test_resume_after_a_kill_recomputes_nothing(tmp_path, monkeypatch):
    import minitron.search.run as run

    teacher, scores, spec = _setup(tmp_path)
    full = _run(teacher, scores, spec, tmp_path / "full").summary

    real_score, real_distill = run.score_model, run._distill_one
    scored, distilled = [], []

    def dying_score(model, ref):
        if len(scored) == 2:
            raise KeyboardInterrupt("killed")  # as Ctrl-C after two candidates
        scored.append(1)
        return real_score(model, ref)

    monkeypatch.setattr(run, "score_model", dying_score)
    with pytest.raises(KeyboardInterrupt):
        _run(teacher, scores, spec, tmp_path / "out")
    state = json.loads((tmp_path / "out" / "search_state.json").read_text())
    assert len(state["scores"]) == 2 and not state["distilled"]
    with pytest.raises(ValueError, match="already exists.*--resume"):
        _run(teacher, scores, spec, tmp_path / "out")

    def dying_distill(inp, c, work, ref_fn):
        if distilled:
            raise RuntimeError("killed during the second finalist")
        distilled.append(c.id)
        return real_distill(inp, c, work, ref_fn)

    scored.clear()
    monkeypatch.setattr(run, "score_model", lambda m, r: (scored.append(1), real_score(m, r))[1])
    monkeypatch.setattr(run, "_distill_one", dying_distill)
    with pytest.raises(RuntimeError, match="second finalist"):
        _run(teacher, scores, spec, tmp_path / "out", resume=True)
    n = len(full["candidates"])
    assert len(scored) == (n - 2) + 1  # the remaining candidates, then the first finalist's rescoring
    monkeypatch.setattr(run, "_distill_one", lambda inp, c, work, ref_fn: (distilled.append(c.id),
                                                                           real_distill(inp, c, work, ref_fn))[1])
    res = _run(teacher, scores, spec, tmp_path / "out", resume=True)
    assert distilled == [full["finalists"][0], full["finalists"][1]]  # the first one was not distilled again
    got = {r["id"]: r for r in res.summary["candidates"]}
    for r in full["candidates"]:  # identical to the uninterrupted search
        assert got[r["id"]]["score"]["loss"] == pytest.approx(r["score"]["loss"], rel=1e-6)
    assert res.winner == full["winner"]
    with pytest.raises(ValueError, match="cannot resume.*spec"):
        _run(teacher, scores, SearchSpec(**dict(spec.to_dict(), top_k=1)), tmp_path / "out", resume=True)


def test_bad_input_is_refused_before_loading(tmp_path, monkeypatch):
    from minitron.specs import ModelSpec

    teacher, scores, spec = _setup(tmp_path)
    monkeypatch.setattr(ModelSpec, "load", lambda *a, **k: pytest.fail("loaded a model"))
    other = random_scores(make_model("llama", num_hidden_layers=3))
    with pytest.raises(ValueError, match="importance scores were computed on a different model"):
        _run(teacher, other, spec, tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("x")
    with pytest.raises(ValueError, match="already exists.*--overwrite"):
        _run(teacher, scores, spec, tmp_path / "b")
    with pytest.raises(ValueError, match="below the smallest"):
        _run(teacher, scores, SearchSpec(**dict(spec.to_dict(), target_params=1000)), tmp_path / "c")
    with pytest.raises(ValueError, match="at or above the model's own size"):
        _run(teacher, scores, SearchSpec(**dict(spec.to_dict(), target_params=10**9)), tmp_path / "c")
    with pytest.raises(ValueError, match="top_k must be an int >= 1"):
        api.search(teacher, packed(), importance=scores, output_dir=tmp_path / "c", target_params=1000, top_k=0)
    with pytest.raises(ValueError, match="more than --max-candidates 1"):
        _run(teacher, scores, SearchSpec(**dict(spec.to_dict(), max_candidates=1)), tmp_path / "c")
    with pytest.raises(ValueError, match="needs --importance"):
        _run(teacher, None, spec, tmp_path / "c")
    no_depth = random_scores(teacher, lm_loss=False)
    with pytest.raises(ValueError, match="no lm_loss_drop"):
        _run(teacher, no_depth, spec, tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_dry_run_needs_no_model_data_or_importance(monkeypatch):
    from minitron.specs import ModelSpec

    monkeypatch.setattr(ModelSpec, "load", lambda *a, **k: pytest.fail("loaded a model"))
    res = api.search("llama-3.1-8b", dry_run=True, target_params=int(4.52e9))
    assert "h3072-i9216-a32-kv8-l32" in {c.id for c in res.candidates}
    assert res.output_dir is None and "h3072-i9216-a32-kv8-l32" in res.table
    from minitron.resources.architectures import load_architecture

    assert res.candidates == enumerate_candidates(load_architecture("llama-3.1-8b"),
                                                  SearchSpec(target_params=int(4.52e9)))
