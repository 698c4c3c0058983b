"""The search loop: score every candidate, distil the best K, rescore, keep the winner; resumable.

Everything already computed lives in ``<output>/search_state.json`` (replaced atomically after every candidate
scored and every finalist distilled), so an interrupted search continued with ``resume=True`` recomputes nothing
it has (a finalist whose distillation was cut restarts it, or continues from its last training checkpoint when
``save_every`` wrote one). Outputs::

    <output>/model/        the winner, pruned from the teacher (a plain transformers checkpoint, not distilled)
    <output>/distilled/    the winner after its short distillation (the model the final ranking measured)
    <output>/search.json   settings, every candidate with its scores, the finalists before/after, timings
    <output>/search.md     the same as tables;  search.png  loss right after pruning vs after distillation
    <output>/finalists/ID/ each finalist's distillation log (log.jsonl, loss.png)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from minitron.io.files import atomic_write_json, read_json
from minitron.search.report import ranking_change, write_report
from minitron.search.score import TeacherReference, build_candidate, score_model
from minitron.search.space import Candidate
from minitron.search.spec import SearchSpec

log = logging.getLogger(__name__)

__all__ = ["SearchInputs", "SearchResult", "run_search", "search_config", "STATE_FILE", "ranking_change"]

STATE_FILE = "search_state.json"
_STATE_VERSION = 1


def search_config(model: Any) -> Any:
    """The config a search enumerates from: a loaded model's, a checkpoint's (``config.json``), a ``.json`` file
    (a ``config.json`` or a shipped architecture file ``{"config": {...}}``) or the name of a shipped architecture
    (``llama-3.1-8b``, see :mod:`minitron.resources.architectures`). Nothing is loaded but the config."""
    from minitron.io.inputs import read_config
    from minitron.resources.architectures import architecture_names, load_architecture

    if isinstance(model, (str, Path)) and str(model).endswith(".json") and Path(model).is_file():
        from transformers import AutoConfig

        d = read_json(model, "config file")
        d = d.get("config", d) if isinstance(d, dict) else d
        if not isinstance(d, dict) or "model_type" not in d:
            raise ValueError(f"--model {str(model)!r}: not a config.json (no model_type)")
        d = dict(d)
        cfg = AutoConfig.for_model(d.pop("model_type"), **d)
        from minitron.models import get_adapter

        get_adapter(cfg)
        return cfg
    if isinstance(model, str) and not Path(model).exists() and model in architecture_names():
        return load_architecture(model)
    return read_config(model, "--model")


@dataclasses.dataclass
class SearchInputs:
    """What a search runs on (everything loaded and checked by :func:`minitron.api.search`).

    Attributes:
        teacher: the loaded teacher (not modified), on the device the search runs on.
        scores: its importance (:class:`minitron.compress.importance.ImportanceScores`).
        score_data / distill_data: packed held-out scoring data and distillation data (disjoint).
        spec: the search settings; train / loss: the distillation's ``TrainConfig`` (steps already set from
            ``spec.distill_tokens``) and ``DistillConfig``.
        tokenizer, source: saved with the output checkpoints (the teacher's tokenizer, its checkpoint directory).
        label: how the teacher is named in the report.
    """

    teacher: torch.nn.Module
    scores: Any
    score_data: Any
    distill_data: Any
    spec: SearchSpec
    train: Any
    loss: Any
    tokenizer: Any = None
    source: Optional[str] = None
    label: str = "<module>"


@dataclasses.dataclass
class SearchResult:
    """What :func:`minitron.api.search` found.

    Attributes:
        candidates: the enumerated candidates (closest to the budget first).
        rows: per candidate, its sizes and counts, and (unless a dry run) ``score``/``distilled`` results.
        winner: id of the winner (None for a dry run).
        summary: the content of ``search.json`` (the candidate table only for a dry run).
        output_dir: where the outputs were published (None for a dry run).
    """

    candidates: List[Candidate]
    rows: List[Dict[str, Any]]
    winner: Optional[str] = None
    summary: Dict[str, Any] = dataclasses.field(default_factory=dict)
    output_dir: Optional[Path] = None
    table: str = ""


# ---------------------------------------------------------------------------------------------- state
def _tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


def _fingerprint(inp: SearchInputs, candidates: List[Candidate]) -> Dict[str, Any]:
    """What must not change between a search and its resumption."""
    meta = inp.scores.meta
    return {
        "teacher": inp.label,
        "importance": {k: meta.get(k) for k in ("config_fingerprint", "shape_signature", "num_tokens", "num_batches",
                                                 "seq_agg", "batch_agg")},
        "score_data": _tensor_digest(inp.score_data.input_ids),
        "distill_data": _tensor_digest(inp.distill_data.input_ids),
        "spec": inp.spec.to_dict(), "train": inp.train.to_dict(), "loss": inp.loss.to_dict(),
        "candidates": [c.id for c in candidates],
    }


class _State:
    """``search_state.json``: scores and distillation results computed so far (atomically replaced)."""

    def __init__(self, path: Path, fingerprint: Dict[str, Any], *, resume: bool) -> None:
        self.path = path
        self.data: Dict[str, Any] = {"version": _STATE_VERSION, "fingerprint": fingerprint, "scores": {},
                                     "distilled": {}, "teacher": None, "timings": {}}
        if resume and path.is_file():
            old = read_json(path, "search state")
            fp = json.loads(json.dumps(fingerprint))
            if old.get("version") != _STATE_VERSION or old.get("fingerprint") != fp:
                diffs = sorted(k for k in set(fp) | set(old.get("fingerprint") or {})
                               if (old.get("fingerprint") or {}).get(k) != fp.get(k))
                raise ValueError(f"cannot resume the search in {str(path.parent)!r}: its inputs or settings changed "
                                 f"({', '.join(diffs) or 'state format'}); use --overwrite to start again")
            self.data = old
            log.info("resuming: %d candidates scored, %d finalists distilled", len(old["scores"]),
                     len(old["distilled"]))

    def save(self) -> None:
        atomic_write_json(self.path, self.data)

    def add_time(self, phase: str, seconds: float) -> None:
        t = self.data["timings"]
        t[phase] = round(t.get(phase, 0.0) + seconds, 3)


# ---------------------------------------------------------------------------------------------- phases
def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _score_batches(inp: SearchInputs) -> List[Dict[str, torch.Tensor]]:
    dev = _device(inp.teacher)
    return [{k: v.to(dev) for k, v in b.items()} for b in inp.score_data.batches(inp.spec.score_batch_size)]


def _score_all(inp: SearchInputs, candidates: List[Candidate], state: _State, ref_fn: Any) -> None:
    """Score every candidate not in the state yet (one state write per candidate)."""
    todo = [c for c in candidates if c.id not in state.data["scores"]]
    for i, c in enumerate(todo):
        ref = ref_fn()
        t0 = time.perf_counter()
        model, dropped = build_candidate(inp.teacher, inp.scores, c, depth_metric=inp.spec.depth_metric,
                                         backend=inp.spec.prune_backend)
        prune_s = time.perf_counter() - t0
        s = score_model(model, ref)
        del model
        total = time.perf_counter() - t0
        s.update(prune_s=round(prune_s, 3), score_s=round(s["score_s"], 3), total_s=round(total, 3),
                 cost_vs_teacher_forward=round(total / ref.forward_s, 3),
                 eval_cost_vs_teacher_forward=round(s["score_s"] / ref.forward_s, 3), dropped_layers=dropped)
        state.data["scores"][c.id] = s
        state.add_time("score", total)
        state.save()
        log.info("scored %d/%d %s: loss %.4f, KL %.4f (%.1fs, %.2fx a teacher pass)", len(state.data["scores"]),
                 len(candidates), c.id, s["loss"], s["kl"], total, s["cost_vs_teacher_forward"])


def _finalists(candidates: List[Candidate], state: _State, spec: SearchSpec) -> List[str]:
    scored = state.data["scores"]
    order = sorted((c.id for c in candidates), key=lambda i: (scored[i][spec.rank_by], i))
    return order[:min(spec.top_k, len(order))]


def _distill_one(inp: SearchInputs, c: Candidate, work: Path, ref_fn: Any) -> Dict[str, Any]:
    """Prune ``c`` again, distil it (resuming its own training run when one was cut), rescore it, save it."""
    from minitron.io.checkpoint import save_model
    from minitron.train import distill_model

    run_dir = work / "finalists" / c.id
    model, _ = build_candidate(inp.teacher, inp.scores, c, depth_metric=inp.spec.depth_metric,
                               backend=inp.spec.prune_backend)
    t0 = time.perf_counter()
    res = distill_model(model, inp.teacher, inp.distill_data, inp.train, inp.loss, run_dir, resume=True,
                        run_info={"search_candidate": c.id})
    distill_s = time.perf_counter() - t0
    model.to(_device(inp.teacher))
    after = score_model(model, ref_fn())
    save_model(model, run_dir / "model", tokenizer=inp.tokenizer, overwrite=True, input_path=inp.source)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the model is saved; its optimizer state goes
    tokens = res.steps * inp.train.batch_size * inp.train.grad_accum * inp.distill_data.seq_len
    return dict(after, steps=res.steps, tokens=tokens, distill_s=round(distill_s, 3),
                final_train_loss=res.final_loss)


def _publish_winner(inp: SearchInputs, cands: Dict[str, Candidate], winner: str, finalists: List[str],
                    work: Path) -> None:
    from minitron.io.checkpoint import save_model

    model, _ = build_candidate(inp.teacher, inp.scores, cands[winner], depth_metric=inp.spec.depth_metric,
                               backend=inp.spec.prune_backend)
    save_model(model, work / "model", tokenizer=inp.tokenizer, overwrite=True, input_path=inp.source)
    del model
    src = work / "finalists" / winner / "model"
    if src.is_dir():
        if (work / "distilled").exists():
            shutil.rmtree(work / "distilled")
        src.rename(work / "distilled")
    for f in finalists:
        if f != winner:
            shutil.rmtree(work / "finalists" / f / "model", ignore_errors=True)


def run_search(inp: SearchInputs, candidates: List[Candidate], work: Path, *, resume: bool = False) -> SearchResult:
    """Score, distil the finalists, rescore and publish the winner in ``work`` (see the module docstring).

    Args:
        inp: the loaded inputs. candidates: from :func:`minitron.search.space.enumerate_candidates`.
        work: the output directory being written. resume: continue from ``work/search_state.json``.
    """

    state = _State(work / STATE_FILE, _fingerprint(inp, candidates), resume=resume)
    cache: Dict[str, TeacherReference] = {}

    def ref_fn() -> TeacherReference:
        if "ref" not in cache:
            cache["ref"] = TeacherReference.compute(inp.teacher, _score_batches(inp))
            state.data["teacher"] = {"loss": cache["ref"].loss, "ppl": math.exp(cache["ref"].loss),
                                     "tokens": cache["ref"].tokens, "forward_s": round(cache["ref"].forward_s, 3)}
            state.add_time("teacher_pass", cache["ref"].forward_s)
            state.save()
        return cache["ref"]

    _score_all(inp, candidates, state, ref_fn)
    finalists = _finalists(candidates, state, inp.spec)
    by_id = {c.id: c for c in candidates}
    for cid in finalists:
        if cid in state.data["distilled"]:
            continue
        t0 = time.perf_counter()
        state.data["distilled"][cid] = _distill_one(inp, by_id[cid], work, ref_fn)
        state.add_time("distill_and_rescore", time.perf_counter() - t0)
        state.save()
        log.info("finalist %s: loss %.4f -> %.4f after %d tokens", cid, state.data["scores"][cid]["loss"],
                 state.data["distilled"][cid]["loss"], state.data["distilled"][cid]["tokens"])
    key = inp.spec.rank_by
    after = sorted(finalists, key=lambda i: (state.data["distilled"][i][key], i))
    winner = after[0]
    t0 = time.perf_counter()
    if not (work / "model").is_dir() or state.data.get("winner") != winner:
        _publish_winner(inp, by_id, winner, finalists, work)
    state.data["winner"] = winner
    state.add_time("write_outputs", time.perf_counter() - t0)
    state.save()
    summary = write_report(work, inp, candidates, state.data, finalists, after)
    rows = summary["candidates"]
    return SearchResult(candidates=candidates, rows=rows, winner=winner, summary=summary, table=summary["table"])
