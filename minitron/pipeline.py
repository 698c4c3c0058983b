"""The whole Minitron recipe from one YAML file (``minitron pipeline --config FILE.yaml``).

Stages: evaluate the teacher -> teacher correction (LM fine-tuning on the distillation data) ->
importance estimation on the corrected teacher -> for each student: prune (width and/or depth) ->
evaluate -> distil from the corrected teacher -> evaluate. Results go to ``results.json`` and
``results.md`` (a perplexity table) in the output directory.

Configuration (relative paths are relative to the current directory; see ``examples/pipeline.yaml``)::

    output_dir: runs/pipeline          # required unless given on the command line
    teacher: path/to/teacher           # checkpoint directory (or training output dir, or hub name)
    tokenizer: null                    # default: the teacher's
    seed: 0
    device: auto                       # auto | cpu | cuda[:N]
    streaming: null                    # importance and pruning read the teacher checkpoint piece by piece:
                                       # true | false | null (when it would not fit comfortably in memory)
    backend: auto                      # kernel backend of every op (auto | cpp | cuda | triton | reference)
    data:
      train: data/wikitext-2/valid.txt # correction, calibration and distillation data
      eval: data/wikitext-2/test.txt   # perplexity evaluation data
      text_column: text
      split: null                      # and eval_split, dataset_config for hub datasets
      seq_len: 128
      max_tokens: null                 # cap on the training tokens
      eval_max_tokens: null            # cap on the evaluation tokens
      eval_name: null                  # label of the evaluation data in the results table
    correct_teacher: {steps: 100, lr: 1.0e-3, ...}     # TrainConfig fields; null or steps: 0 to skip
    importance: {batch_size: 8, max_batches: 16, seq_agg: mean, batch_agg: l2,
                 layer_metrics: [block_influence, lm_loss], spill_dir: null}
    students:                          # name -> targets (width and/or depth)
      width: {hidden_size: 128, intermediate_size: 384, num_attention_heads: 4, num_key_value_heads: 2}
      depth: {num_hidden_layers: 3, depth_metric: lm_loss, contiguous: true}
    distill: {steps: 200, lr: 1.0e-3, temperature: 1.0, mode: forward, lm_loss_weight: 0.0, ...}
    teacher_logits: {top_k: 64, temperature: 1.0, value_encoding: null}   # optional: a top-k store
    evaluate: {batch_size: 8, max_batches: null, bf16: false}

Every section maps onto the specs of :mod:`minitron.specs` (``data`` -> ``DataSpec``, ``importance`` ->
``ImportanceSpec``, a student -> ``PruneSpec``, ``teacher_logits`` -> ``StoreSpec``, ``evaluate`` -> ``EvalSpec``,
``correct_teacher``/``distill`` -> ``TrainConfig`` + ``DistillConfig``), validated when the file is read, before any
model is loaded, and every stage runs through :mod:`minitron.api`.

A student entry may carry ``distill: {...}`` overriding the shared distillation settings. With
``distill: {teacher_logits: true, tail: true}`` a student is distilled from a top-k teacher-logit store
instead of the live teacher: the store is written once, from the (corrected) teacher on ``data.train``, into
``teacher_logits/`` of the output directory (settings from the top-level ``teacher_logits`` section), and
the loss is the fused top-k KL at the store's temperature (``mode``, ``beta`` and ``temperature`` of that
student must stay at their defaults). Training
stages evaluate on ``eval_batches`` batches of the evaluation data every ``eval_every`` steps when
``eval_every > 0`` (monitoring only: nothing is selected on it).
With ``resume`` an interrupted pipeline continues: finished stages are reused, training stages resume
from their last checkpoint.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch

from minitron import api
from minitron.io.files import atomic_write_json, atomic_write_text, read_json
from minitron.options import from_mapping, yaml_key
from minitron.specs import WIDTH_KEYS, DataSpec, EvalSpec, ImportanceSpec, ModelSpec, PruneSpec, StoreSpec
from minitron.train.distill import DistillConfig
from minitron.train.loop import TrainConfig
from minitron.train.stored import StoredDistillConfig

log = logging.getLogger(__name__)

TOP_KEYS = {"output_dir", "teacher", "tokenizer", "seed", "device", "backend", "streaming", "data", "correct_teacher",
            "importance", "students", "distill", "evaluate", "teacher_logits"}
#: distillation keys of a student that uses the store (besides the loss weights and training fields)
STORE_DISTILL_KEYS = {"teacher_logits", "tail"}
DISTILL_LOSS_KEYS = {f.name for f in dataclasses.fields(DistillConfig)} - {"backend"}
TRAIN_KEYS = {f.name for f in dataclasses.fields(TrainConfig)}
WHERE = "pipeline config"


def _check_keys(section: str, d: Any, allowed: set) -> Dict[str, Any]:
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ValueError(f"{WHERE}: {section} must be a mapping, got {type(d).__name__}")
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ValueError(f"{WHERE}: unknown key(s) {unknown} in {section}; valid: {sorted(allowed)}")
    return dict(d)


@dataclasses.dataclass
class StudentSpec:
    name: str
    target: PruneSpec
    train: TrainConfig
    loss: DistillConfig
    stored: Optional[StoredDistillConfig] = None  # when distilled from the teacher-logit store

    @property
    def width(self) -> Dict[str, Optional[int]]:
        return self.target.width


@dataclasses.dataclass
class PipelineSpec:
    """A validated pipeline configuration."""

    output_dir: Path
    teacher: ModelSpec
    seed: int
    backend: str
    data: DataSpec
    correct: Optional[TrainConfig]
    importance: ImportanceSpec
    students: List[StudentSpec]
    evaluate: EvalSpec
    raw: Dict[str, Any]
    teacher_logits: Optional[StoreSpec] = None


def load_pipeline_config(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Read a YAML pipeline configuration (must be a mapping)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"pipeline config {str(p)!r} does not exist")
    try:
        cfg = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"pipeline config {str(p)!r} is not valid YAML: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"pipeline config {str(p)!r} must be a YAML mapping")
    return cfg


def _section(cls: Any, cfg: Dict[str, Any], key: str, defaults: Optional[Dict[str, Any]] = None, **fixed: Any) -> Any:
    d = cfg.get(key)
    if d is not None and not isinstance(d, dict):
        raise ValueError(f"{WHERE}: {key} must be a mapping, got {type(d).__name__}")
    return from_mapping(cls, dict(defaults or {}, **(d or {})), f"{WHERE}: {key}", **fixed)


def _top_level(cfg: Dict[str, Any], output_dir: Any) -> Dict[str, Any]:
    """The scalar top-level settings, checked."""
    from minitron.io.tokenizer import has_tokenizer_files
    from minitron.runtime import resolve_device

    out = output_dir if output_dir is not None else cfg.get("output_dir")
    if out is None:
        raise ValueError(f"{WHERE}: output_dir is required (in the YAML or with --output)")
    teacher = cfg.get("teacher")
    if not isinstance(teacher, str) or not teacher:
        raise ValueError(f"{WHERE}: teacher (a checkpoint path or model name) is required")
    seed = cfg.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"{WHERE}: seed must be a non-negative int, got {seed!r}")
    try:
        m = ModelSpec(model=teacher, device=cfg.get("device", "auto"), streaming=cfg.get("streaming"))
        resolve_device(m.device)
    except (RuntimeError, ValueError, TypeError) as e:
        raise type(e)(f"{WHERE}: {e}") from None
    backend = cfg.get("backend", "auto")
    if not isinstance(backend, str):
        raise TypeError(f"{WHERE}: backend must be a string, got {backend!r}")
    tokenizer = cfg.get("tokenizer")
    if tokenizer is not None and (not isinstance(tokenizer, str) or not Path(tokenizer).is_dir()
                                  or not has_tokenizer_files(tokenizer)):
        raise ValueError(f"{WHERE}: tokenizer must be an existing tokenizer directory, got {tokenizer!r}")
    return {"out": Path(out), "teacher": m, "seed": seed, "backend": backend, "tokenizer": tokenizer}


def _data_section(cfg: Dict[str, Any], tokenizer: Optional[str], teacher_config: Any) -> DataSpec:
    from minitron.io.data import check_seq_len
    from minitron.io.inputs import check_data_arg

    d = _section(DataSpec, cfg, "data", {"seq_len": 256}, tokenizer=tokenizer)
    for key, v in (("train", d.data), ("eval", d.eval_data)):
        if not v:
            raise ValueError(f"{WHERE}: data.{key} (the {'distillation' if key == 'train' else 'evaluation'} data) "
                             "is required")
        if not isinstance(v, str):
            raise TypeError(f"{WHERE}: data.{key} must be a path or dataset name, got {v!r}")
        check_data_arg(f"data.{key}", v)
    try:
        check_seq_len(d.seq_len, teacher_config)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{WHERE}: data.seq_len: {e}") from None
    return d


def _check_depth(where: str, t: PruneSpec, teacher_config: Any, metrics: Any) -> None:
    L = int(teacher_config.num_hidden_layers)
    n = t.num_hidden_layers
    if n is None:
        return
    if not 1 <= n <= L:
        raise ValueError(f"{where}.num_hidden_layers must be an int in [1, {L}], got {n!r}")
    drop = t.layers_to_drop
    if drop is not None:
        if not all(i < L for i in drop):
            raise ValueError(f"{where}.layers_to_drop must be a list of distinct layer indices in [0, {L - 1}], "
                             f"got {drop!r}")
        if len(drop) != L - n:
            raise ValueError(f"{where}.layers_to_drop has {len(drop)} layers but going from {L} to {n} layers "
                             f"drops {L - n}")
    elif t.depth_metric not in metrics:
        raise ValueError(f"{where}.depth_metric is {t.depth_metric!r} but importance.layer_metrics "
                         f"{list(metrics)} does not measure it; add it there")


def _student(name: Any, targets: Any, shared: Dict[str, Any], top: Dict[str, Any], teacher_config: Any,
             imp: ImportanceSpec, store: Optional[StoreSpec]) -> StudentSpec:
    from minitron.compress.prune import validate_width_targets

    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise ValueError(f"{WHERE}: bad student name {name!r}")
    where = f"{WHERE}: students.{name}"
    if not isinstance(targets, dict):
        raise ValueError(f"{where} must be a mapping, got {type(targets).__name__}")
    targets = dict(targets)
    own = targets.pop("distill", None)
    target = from_mapping(PruneSpec, targets, f"students.{name}", backend=top["backend"])
    if not target.wants_width and not target.wants_depth:
        raise ValueError(f"{where} has no width or depth target")
    try:
        validate_width_targets(teacher_config, **target.width)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{where}: {e}") from e
    _check_depth(where, target, teacher_config, imp.layer_metrics)
    merged = dict(shared)
    merged.update(_check_keys(f"students.{name}.distill", own, TRAIN_KEYS | DISTILL_LOSS_KEYS | STORE_DISTILL_KEYS))
    use_store, tail = merged.pop("teacher_logits", False), merged.pop("tail", True)
    if not isinstance(use_store, bool) or not isinstance(tail, bool):
        raise TypeError(f"{where}.distill.teacher_logits and .tail must be true or false")
    loss_kw = {k: merged.pop(k) for k in list(merged) if k in DISTILL_LOSS_KEYS}
    loss = from_mapping(DistillConfig, loss_kw, f"students.{name}.distill", backend=top["backend"])
    stored = None
    if use_store:
        if store is None:
            raise ValueError(f"{where}.distill.teacher_logits is true but the config has no top-level teacher_logits "
                             "section (top_k, temperature) describing the store")
        fixed = [k for k in ("mode", "beta", "temperature") if k in loss_kw]
        if fixed:
            raise ValueError(f"{where}.distill: {', '.join(fixed)} cannot be set for a student distilled from the "
                             "store (forward KL at the store's temperature)")
        stored = StoredDistillConfig(kl_weight=loss.kl_weight, lm_loss_weight=loss.lm_loss_weight, tail=tail,
                                     chunk_size=loss.chunk_size, backend=loss.backend)
    train = from_mapping(TrainConfig, dict({"seed": top["seed"], "device": top["teacher"].device}, **merged),
                         f"students.{name}.distill")
    return StudentSpec(name, target, train, loss, stored)


def parse_pipeline_config(cfg: Dict[str, Any], *, output_dir: Optional[Union[str, os.PathLike]] = None) -> PipelineSpec:
    """Validate a configuration mapping onto the specs (no file is read except the teacher's config).

    Raises:
        ValueError/TypeError: unknown keys, missing required values, invalid training/pruning settings (every
            bound of the specs and the ops, e.g. a temperature above ``MAX_TEMPERATURE``), a sequence length
            longer than the teacher's positions, width/depth targets the teacher cannot reach.
    """
    from minitron.io.inputs import read_config

    cfg = _check_keys("the top level", cfg, TOP_KEYS)
    top = _top_level(cfg, output_dir)
    teacher_config = read_config(top["teacher"].model, f"{WHERE}: teacher")
    data = _data_section(cfg, top["tokenizer"], teacher_config)
    correct = None
    if cfg.get("correct_teacher") is not None:
        c = _check_keys("correct_teacher", cfg["correct_teacher"], TRAIN_KEYS)
        if c.get("steps", 1) != 0:
            correct = from_mapping(TrainConfig, dict({"seed": top["seed"], "device": top["teacher"].device}, **c),
                                   "correct_teacher")
    imp = _section(ImportanceSpec, cfg, "importance", {"max_batches": 16}, backend=top["backend"],
                   shuffle_seed=top["seed"])
    store = None
    if cfg.get("teacher_logits") is not None:
        store = _section(StoreSpec, cfg, "teacher_logits")
        if store.top_k > int(teacher_config.vocab_size):
            raise ValueError(f"{WHERE}: teacher_logits.top_k must be an int in [1, vocab_size], got {store.top_k!r}")
    shared = _check_keys("distill", cfg.get("distill"), TRAIN_KEYS | DISTILL_LOSS_KEYS | STORE_DISTILL_KEYS)
    from_mapping(TrainConfig, {k: v for k, v in shared.items() if k in TRAIN_KEYS}, "distill")
    from_mapping(DistillConfig, {k: v for k, v in shared.items() if k in DISTILL_LOSS_KEYS}, "distill")
    students_raw = cfg.get("students")
    if not isinstance(students_raw, dict) or not students_raw:
        raise ValueError(f"{WHERE}: students must map at least one student name to its pruning targets")
    students = [_student(name, t, shared, top, teacher_config, imp, store) for name, t in students_raw.items()]
    ev = _section(EvalSpec, cfg, "evaluate")
    return PipelineSpec(top["out"], top["teacher"], top["seed"], top["backend"], data, correct, imp, students, ev,
                        cfg, store)


def _markdown_table(rows: List[Dict[str, Any]], eval_name: str) -> str:
    lines = [
        f"| model | parameters | % of teacher | {eval_name} ppl | loss |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['parameters']:,} | {r['param_fraction'] * 100:.1f}% | {r['ppl']:.2f} | {r['loss']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def run_pipeline(
    config: Union[Dict[str, Any], str, os.PathLike],
    *,
    output_dir: Optional[Union[str, os.PathLike]] = None,
    overwrite: bool = False,
    resume: bool = False,
    extra_rows: Optional[List[Dict[str, Any]]] = None,
) -> Dict[str, Any]:
    """Run the recipe; return ``{"rows": [...], "table": markdown, "timings": {...}, ...}``.

    Args:
        config: a mapping or the path of a YAML file (see the module docstring).
        output_dir: overrides ``output_dir`` of the config.
        overwrite: replace an existing output directory.
        resume: continue an interrupted run in the output directory.
        extra_rows: rows prepended to the results table (the demo's random-init baseline).
    """
    from minitron.io.safety import abandon_output, begin_output, check_output_dir, finish_output
    from minitron.runtime import check_backends, resolve_device

    source = None
    if isinstance(config, (str, os.PathLike)):
        source = str(config)
        config = load_pipeline_config(config)
    try:
        spec = parse_pipeline_config(config, output_dir=output_dir)
    except (TypeError, ValueError) as e:
        if source is None:
            raise
        msg = str(e).replace(f"{WHERE}: ", "", 1)
        raise type(e)(f"pipeline config {source}: {msg}") from None
    inputs = {"teacher": spec.teacher.model, "tokenizer": spec.data.tokenizer, "data.train": spec.data.data,
              "data.eval": spec.data.eval_data}
    if source is not None:
        inputs["--config"] = source
    out = check_output_dir(spec.output_dir, overwrite=overwrite, resume=resume, inputs=inputs, resumable=True,
                           what="output_dir" if output_dir is None else "--output")
    check_backends(resolve_device(spec.teacher.device), spec.backend)
    run = _Run(spec, resume=resume, t_start=time.time())
    run.prepare()
    work = begin_output(out, overwrite=overwrite)
    try:
        result = run.stages(work, out, extra_rows)
        finish_output(work, out)
    except BaseException:
        abandon_output(work, out)
        raise
    return result


class _Run:
    """The stages of one pipeline run, each through :mod:`minitron.api`, writing into ``self.out``."""

    def __init__(self, spec: PipelineSpec, *, resume: bool, t_start: float) -> None:
        self.spec, self.resume, self.t_start = spec, resume, t_start
        self.timings: Dict[str, float] = {}
        self.histories: Dict[str, List[Dict[str, Any]]] = {}
        self.rows: List[Dict[str, Any]] = []
        self.eval_cache: Dict[str, Any] = {}

    def prepare(self) -> None:
        """Load the teacher and pack the data once (every stage reuses them); check the batch sizes."""
        from minitron.io.inputs import resolve_model_path
        from minitron.io.tokenizer import has_tokenizer_files

        spec = self.spec
        self.teacher_path = resolve_model_path(spec.teacher.model)
        self.teacher, tok, _ = api.load_model(spec.teacher, spec.data.tokenizer)
        if tok is None:
            raise ValueError(f"the teacher {spec.teacher.model!r} has no tokenizer files; set `tokenizer:` in the config")
        self.tok_dir = spec.data.tokenizer or (self.teacher_path if has_tokenizer_files(self.teacher_path) else None)
        self.train_data, self.eval_data = api.pack_data(spec.data, tok, [self.teacher.config])
        needs = [(f"students.{st.name}.distill", st.train.batch_size) for st in spec.students]
        if spec.correct is not None:
            needs.append(("correct_teacher", spec.correct.batch_size))
        for section, bs in needs:
            if len(self.train_data) < bs:
                raise ValueError(f"{section}: batch_size={bs} exceeds the {len(self.train_data)} training sequences")

    def data(self, *, with_eval: bool = False) -> DataSpec:
        """The packed data as a DataSpec for the api (the evaluation data during training when asked)."""
        return DataSpec(data=self.train_data, seq_len=self.spec.data.seq_len, tokenizer=self.tok_dir,
                        eval_data=self.eval_data if with_eval else None)

    def timed(self, name: str, t0: float) -> None:
        self.timings[name] = round(time.time() - t0, 2)

    def evaluate(self, label: str, model: torch.nn.Module, kind: str) -> Dict[str, Any]:
        from minitron.runtime import count_parameters

        if label not in self.eval_cache:
            t0 = time.time()
            res = api.evaluate_perplexity(
                ModelSpec(model=model, device=self.spec.teacher.device),
                DataSpec(data=self.eval_data, seq_len=self.spec.data.seq_len), options=self.spec.evaluate)
            res = {k: v for k, v in res.items() if k not in ("seq_len", "data", "model")}
            res["elapsed_s"] = round(time.time() - t0, 2)
            n = count_parameters(model)
            res.update(label=label, kind=kind, parameters=n, param_fraction=n / self.teacher_params)
            self.eval_cache[label] = res
            atomic_write_json(self.out / "evaluations.json", self.eval_cache)
        res = self.eval_cache[label]
        log.info("%-24s ppl %9.2f  (%d parameters)", label, res["ppl"], res["parameters"])
        self.rows.append(res)
        return res

    def stages(self, out: Path, final_out: Path, extra_rows: Optional[List[Dict[str, Any]]]) -> Dict[str, Any]:
        import yaml

        from minitron.runtime import count_parameters

        self.out, spec = out, self.spec
        atomic_write_text(out / "pipeline.yaml", yaml.safe_dump(dict(spec.raw, output_dir=str(final_out)),
                                                                sort_keys=False))
        self.teacher_params = count_parameters(self.teacher)
        if self.resume and (out / "evaluations.json").is_file():
            self.eval_cache = read_json(out / "evaluations.json", "evaluation cache")
        for r in extra_rows or []:
            self.rows.append(dict({"param_fraction": r["parameters"] / self.teacher_params}, **r))
        self.evaluate("teacher", self.teacher, "teacher")
        self.correct()
        self.teacher.eval()
        scores = self.importance()
        store = self.store()
        students = {st.name: self.student(st, scores, store) for st in spec.students}
        return self.report(final_out, students)

    def run_dir(self, d: Path) -> bool:
        """Whether the training run in ``d`` finished (then it is reused)."""
        return (d / "model" / "config.json").is_file() and (d / "run.json").is_file()

    def correct(self) -> None:
        cfg = self.spec.correct
        if cfg is None:
            return
        cdir, t0 = self.out / "teacher_corrected", time.time()
        if self.run_dir(cdir):
            self.teacher, _, _ = api.load_model(cdir / "model")
            log.info("teacher correction: reusing %s", cdir / "model")
        else:
            res = api.correct_teacher(self.teacher, self.data(with_eval=bool(cfg.eval_every)), output_dir=cdir,
                                      resume=self.resume and cdir.exists(), train=cfg)
            self.histories["teacher correction"] = res.history
        self.timed("correct_teacher", t0)
        self.evaluate("teacher (corrected)", self.teacher, "teacher")

    def teacher_source(self) -> ModelSpec:
        """The (corrected) teacher: its checkpoint when importance/pruning stream, else the loaded module."""
        m = self.spec.teacher
        cdir = self.out / "teacher_corrected"
        if m.streaming:
            path = cdir if self.spec.correct is not None else self.teacher_path
            return dataclasses.replace(m, model=str(path))
        return dataclasses.replace(m, model=self.teacher, streaming=False)

    def importance(self) -> Any:
        from minitron.compress.importance import ImportanceScores

        idir, t0 = self.out / "importance", time.time()
        if (idir / "importance.json").is_file():
            scores = ImportanceScores.load(idir)
            scores.check_model(self.teacher, source=f"importance scores {str(idir)!r}")
            log.info("importance: reusing %s", idir)
        else:
            scores = api.estimate_importance(self.teacher_source(), self.data(), output_dir=idir,
                                             options=self.spec.importance)
        self.timed("importance", t0)
        return scores

    def store(self) -> Optional[Path]:
        """The teacher-logit store, written once (or continued) when a student distils from it."""
        if not any(st.stored is not None for st in self.spec.students):
            return None
        sdir, t0 = self.out / "teacher_logits", time.time()
        api.write_teacher_logits(dataclasses.replace(self.spec.teacher, model=self.teacher), self.data(),
                                 output_dir=sdir, store=self.spec.teacher_logits, resume=sdir.exists())
        self.timed("teacher_logits", t0)
        return sdir

    def student(self, st: StudentSpec, scores: Any, store: Optional[Path]) -> Dict[str, Any]:
        sdir = self.out / "students" / st.name
        pdir, ddir = sdir / "pruned", sdir / "distill"
        t0 = time.time()
        if (pdir / "config.json").is_file():
            student, _, _ = api.load_model(pdir)
        else:
            src = self.teacher_source()
            student = api.prune(src, importance=scores, output_dir=pdir, target=st.target,
                                tokenizer=None if src.streaming else self.tok_dir)
            if not isinstance(student, torch.nn.Module):  # streamed: the pruned checkpoint
                student, _, _ = api.load_model(pdir)
        self.timed(f"{st.name}/prune", t0)
        pruned_eval = self.evaluate(f"{st.name} pruned", student, "pruned")
        t0 = time.time()
        if self.run_dir(ddir):
            student, _, _ = api.load_model(ddir / "model")
            log.info("%s: reusing distilled student %s", st.name, ddir / "model")
        else:
            res = api.distill(student, None if st.stored is not None else self.teacher,
                              self.data(with_eval=bool(st.train.eval_every)), output_dir=ddir,
                              teacher_logits=store if st.stored is not None else None,
                              resume=self.resume and ddir.exists(), train=st.train, loss=st.stored or st.loss)
            self.histories[f"{st.name} distillation"] = res.history
        self.timed(f"{st.name}/distill", t0)
        distilled_eval = self.evaluate(f"{st.name} distilled", student, "distilled")
        return {"pruned": pruned_eval, "distilled": distilled_eval,
                "config": {k: getattr(student.config, k) for k in WIDTH_KEYS + ("num_hidden_layers",)}}

    def report(self, final_out: Path, students: Dict[str, Any]) -> Dict[str, Any]:
        d, out = self.spec.data, self.out
        self.timings["pipeline_total"] = round(time.time() - self.t_start, 2)
        eval_name = d.eval_name or (Path(str(d.eval_data)).name if isinstance(d.eval_data, (str, os.PathLike))
                                    else "eval")
        table = _markdown_table(self.rows, eval_name)
        result = {"rows": self.rows, "table": table, "timings": self.timings, "students": students,
                  "teacher": str(self.spec.teacher.model), "eval_data": self.eval_data.description,
                  "eval_tokens": self.rows[-1]["tokens"], "output_dir": str(final_out)}
        atomic_write_json(out / "results.json", result)
        atomic_write_text(out / "results.md", f"# Minitron pipeline results\n\nEvaluation data: "
                          f"{self.eval_data.description} ({result['eval_tokens']} predicted tokens)\n\n" + table)
        if self.histories:
            try:
                from minitron.io.plotting import plot_loss_curves

                plot_loss_curves([], out / "losses.png", title="training losses", extra=self.histories)
            except Exception as e:  # a plot never fails the pipeline
                log.warning("could not plot the losses: %s", e)
        return result
