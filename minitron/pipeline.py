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
                 layer_metrics: [block_influence, lm_loss]}
    students:                          # name -> targets (width and/or depth)
      width: {hidden_size: 128, intermediate_size: 384, num_attention_heads: 4, num_key_value_heads: 2}
      depth: {num_hidden_layers: 3, depth_metric: lm_loss, contiguous: true}
    distill: {steps: 200, lr: 1.0e-3, temperature: 1.0, mode: forward, lm_loss_weight: 0.0, ...}
    teacher_logits: {top_k: 64, temperature: 1.0, value_encoding: null}   # optional: a top-k store
    evaluate: {batch_size: 8, max_batches: null}

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

import copy
import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch

from minitron.io.data import check_seq_len, load_packed
from minitron.train import DistillConfig
from minitron.train.loop import TrainConfig
from minitron.io.files import atomic_write_json, atomic_write_text, read_json

log = logging.getLogger(__name__)

TOP_KEYS = {"output_dir", "teacher", "tokenizer", "seed", "device", "backend", "data", "correct_teacher",
            "importance", "students", "distill", "evaluate", "teacher_logits"}
STORE_KEYS = {"top_k", "temperature", "value_encoding", "batch_size"}
#: distillation keys of a student that uses the store (besides the loss weights and training fields)
STORE_DISTILL_KEYS = {"teacher_logits", "tail"}
DATA_KEYS = {"train", "eval", "eval_name", "text_column", "split", "eval_split", "dataset_config", "seq_len",
             "max_tokens", "eval_max_tokens"}
IMPORTANCE_KEYS = {"batch_size", "max_batches", "seq_agg", "batch_agg", "layer_metrics"}
WIDTH_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
DEPTH_KEYS = ("num_hidden_layers", "depth_metric", "contiguous", "layers_to_drop")
STUDENT_KEYS = set(WIDTH_KEYS) | set(DEPTH_KEYS) | {"distill"}
EVAL_KEYS = {"batch_size", "max_batches"}
DISTILL_LOSS_KEYS = {f.name for f in dataclasses.fields(DistillConfig)} - {"backend"}
TRAIN_KEYS = {f.name for f in dataclasses.fields(TrainConfig)}


def _check_keys(section: str, d: Any, allowed: set) -> Dict[str, Any]:
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ValueError(f"pipeline config: {section} must be a mapping, got {type(d).__name__}")
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ValueError(f"pipeline config: unknown key(s) {unknown} in {section}; valid: {sorted(allowed)}")
    return dict(d)


@dataclasses.dataclass
class StudentSpec:
    name: str
    width: Dict[str, Optional[int]]
    depth: Dict[str, Any]
    train: TrainConfig
    loss: DistillConfig
    stored: Optional[Dict[str, Any]] = None  # {"tail": bool} when distilled from the teacher-logit store


@dataclasses.dataclass
class PipelineSpec:
    """A validated pipeline configuration."""

    output_dir: Path
    teacher: str
    tokenizer: Optional[str]
    seed: int
    device: str
    backend: str
    data: Dict[str, Any]
    correct: Optional[TrainConfig]
    importance: Dict[str, Any]
    students: List[StudentSpec]
    evaluate: Dict[str, Any]
    raw: Dict[str, Any]
    teacher_logits: Optional[Dict[str, Any]] = None


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


def parse_pipeline_config(cfg: Dict[str, Any], *, output_dir: Optional[Union[str, os.PathLike]] = None) -> PipelineSpec:
    """Validate a configuration mapping (no file is read except the teacher's config).

    Raises:
        ValueError/TypeError: unknown keys, missing required values, invalid training/pruning settings,
            a sequence length longer than the teacher's positions, width/depth targets the teacher
            cannot reach.
    """
    from minitron.compress.importance import validate_options as validate_importance_options
    from minitron.compress.prune import DEPTH_METRICS, validate_width_targets
    from minitron.io.inputs import check_data_arg, read_config
    from minitron.runtime import resolve_device

    cfg = _check_keys("the top level", cfg, TOP_KEYS)
    out = output_dir if output_dir is not None else cfg.get("output_dir")
    if out is None:
        raise ValueError("pipeline config: output_dir is required (in the YAML or with --output)")
    teacher = cfg.get("teacher")
    if not isinstance(teacher, str) or not teacher:
        raise ValueError("pipeline config: teacher (a checkpoint path or model name) is required")
    seed = cfg.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"pipeline config: seed must be a non-negative int, got {seed!r}")
    device = cfg.get("device", "auto")
    if not isinstance(device, str):
        raise TypeError(f"pipeline config: device must be a string (auto, cpu, cuda, cuda:N), got {device!r}")
    try:
        resolve_device(device)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"pipeline config: device: {e}") from None
    backend = cfg.get("backend", "auto")
    if not isinstance(backend, str):
        raise TypeError(f"pipeline config: backend must be a string, got {backend!r}")
    tokenizer = cfg.get("tokenizer")
    if tokenizer is not None:
        if not isinstance(tokenizer, str) or not Path(tokenizer).is_dir():
            raise ValueError(f"pipeline config: tokenizer must be an existing tokenizer directory, got {tokenizer!r}")
        from minitron.io.tokenizer import has_tokenizer_files

        if not has_tokenizer_files(tokenizer):
            raise ValueError(f"pipeline config: tokenizer {tokenizer!r} holds no tokenizer files")

    data = _check_keys("data", cfg.get("data"), DATA_KEYS)
    if not data.get("train"):
        raise ValueError("pipeline config: data.train (the distillation data) is required")
    if not data.get("eval"):
        raise ValueError("pipeline config: data.eval (the evaluation data) is required")
    data.setdefault("text_column", "text")
    data.setdefault("seq_len", 256)
    if not isinstance(data["text_column"], str) or not data["text_column"]:
        raise TypeError(f"pipeline config: data.text_column must be a column name, got {data['text_column']!r}")
    for k in ("max_tokens", "eval_max_tokens"):
        v = data.get(k)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"pipeline config: data.{k} must be a positive int or null, got {v!r}")
    for k in ("train", "eval"):
        if not isinstance(data[k], str):
            raise TypeError(f"pipeline config: data.{k} must be a path or dataset name, got {data[k]!r}")
    check_data_arg("data.train", data["train"])
    check_data_arg("data.eval", data["eval"])

    def train_cfg(section: str, d: Dict[str, Any]) -> TrainConfig:
        d = dict(d)
        d.setdefault("seed", seed)
        d.setdefault("device", device)
        try:
            return TrainConfig.from_dict(d)
        except (TypeError, ValueError) as e:
            msg = str(e)
            if "TrainConfig." in msg:
                raise type(e)(f"pipeline config: {msg.replace('TrainConfig.', section + '.')}") from None
            raise type(e)(f"pipeline config: {section}: {msg}") from None

    def loss_cfg(section: str, d: Dict[str, Any]) -> DistillConfig:
        try:
            return DistillConfig(backend=backend, **d)
        except (TypeError, ValueError) as e:
            msg = str(e)
            if "DistillConfig." in msg:
                raise type(e)(f"pipeline config: {msg.replace('DistillConfig.', section + '.')}") from None
            raise type(e)(f"pipeline config: {section}: {msg}") from None

    correct_raw = cfg.get("correct_teacher")
    correct = None
    if correct_raw is not None:
        c = _check_keys("correct_teacher", correct_raw, TRAIN_KEYS)
        if c.get("steps", 1) != 0:
            correct = train_cfg("correct_teacher", c)

    imp = _check_keys("importance", cfg.get("importance"), IMPORTANCE_KEYS)
    imp.setdefault("batch_size", 8)
    imp.setdefault("max_batches", 16)
    for k in ("batch_size", "max_batches"):
        if not isinstance(imp[k], int) or isinstance(imp[k], bool) or imp[k] < 1:
            raise ValueError(f"pipeline config: importance.{k} must be a positive int, got {imp[k]!r}")
    imp.setdefault("seq_agg", "mean")
    imp.setdefault("batch_agg", "l2")
    imp.setdefault("layer_metrics", ["block_influence", "lm_loss"])
    imp["layer_metrics"] = list(validate_importance_options(imp["seq_agg"], imp["batch_agg"], imp["layer_metrics"],
                                                            prefix="pipeline config: importance."))

    teacher_config = read_config(teacher, "pipeline config: teacher")
    try:
        check_seq_len(data["seq_len"], teacher_config)
    except (TypeError, ValueError) as e:
        raise type(e)(f"pipeline config: data.seq_len: {e}") from None

    store_cfg = None
    if cfg.get("teacher_logits") is not None:
        store_cfg = _check_keys("teacher_logits", cfg.get("teacher_logits"), STORE_KEYS)
        store_cfg.setdefault("top_k", 64)
        store_cfg.setdefault("temperature", 1.0)
        store_cfg.setdefault("value_encoding", None)
        store_cfg.setdefault("batch_size", 8)
        k = store_cfg["top_k"]
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= int(teacher_config.vocab_size):
            raise ValueError(f"pipeline config: teacher_logits.top_k must be an int in [1, vocab_size], got {k!r}")
        t = store_cfg["temperature"]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise ValueError(f"pipeline config: teacher_logits.temperature must be a positive number, got {t!r}")
        b = store_cfg["batch_size"]
        if not isinstance(b, int) or isinstance(b, bool) or b < 1:
            raise ValueError(f"pipeline config: teacher_logits.batch_size must be a positive int, got {b!r}")
        enc = store_cfg["value_encoding"]
        if enc is not None:
            from minitron.io.logit_store import VALUE_ENCODINGS

            if enc not in VALUE_ENCODINGS:
                raise ValueError(f"pipeline config: teacher_logits.value_encoding must be one of "
                                 f"{sorted(VALUE_ENCODINGS)}, got {enc!r}")
    distill_keys = TRAIN_KEYS | DISTILL_LOSS_KEYS | STORE_DISTILL_KEYS
    distill_shared = _check_keys("distill", cfg.get("distill"), distill_keys)
    train_cfg("distill", {k: v for k, v in distill_shared.items() if k in TRAIN_KEYS})
    loss_cfg("distill", {k: v for k, v in distill_shared.items() if k in DISTILL_LOSS_KEYS})
    students_raw = cfg.get("students")
    if not isinstance(students_raw, dict) or not students_raw:
        raise ValueError("pipeline config: students must map at least one student name to its pruning targets")
    students: List[StudentSpec] = []
    for name, targets in students_raw.items():
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise ValueError(f"pipeline config: bad student name {name!r}")
        t = _check_keys(f"students.{name}", targets, STUDENT_KEYS)
        width = {k: t.get(k) for k in WIDTH_KEYS}
        depth = {k: t[k] for k in DEPTH_KEYS if k in t}
        if all(v is None for v in width.values()) and depth.get("num_hidden_layers") is None:
            raise ValueError(f"pipeline config: students.{name} has no width or depth target")
        try:
            validate_width_targets(teacher_config, **width)
        except (TypeError, ValueError) as e:
            raise type(e)(f"pipeline config: students.{name}: {e}") from e
        if depth:
            where = f"pipeline config: students.{name}"
            n = depth.get("num_hidden_layers")
            L = int(teacher_config.num_hidden_layers)
            if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= L:
                raise ValueError(f"{where}.num_hidden_layers must be an int in [1, {L}], got {n!r}")
            metric = depth.get("depth_metric", "lm_loss")
            if metric not in DEPTH_METRICS:
                raise ValueError(f"{where}.depth_metric must be one of {', '.join(DEPTH_METRICS)}, got {metric!r}")
            if "contiguous" in depth and not isinstance(depth["contiguous"], bool):
                raise TypeError(f"{where}.contiguous must be true or false, got {depth['contiguous']!r}")
            drop = depth.get("layers_to_drop")
            if drop is not None:
                if (not isinstance(drop, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in drop)
                        or len(set(drop)) != len(drop) or not all(0 <= i < L for i in drop)):
                    raise ValueError(f"{where}.layers_to_drop must be a list of distinct layer indices in [0, {L - 1}], "
                                     f"got {drop!r}")
                if len(drop) != L - n:
                    raise ValueError(f"{where}.layers_to_drop has {len(drop)} layers but going from {L} to {n} layers "
                                     f"drops {L - n}")
            elif metric not in imp["layer_metrics"]:
                raise ValueError(f"{where}.depth_metric is {metric!r} but importance.layer_metrics "
                                 f"{imp['layer_metrics']} does not measure it; add it there")
        merged = dict(distill_shared)
        merged.update(_check_keys(f"students.{name}.distill", t.get("distill"), distill_keys))
        stored = None
        use_store = merged.pop("teacher_logits", False)
        tail = merged.pop("tail", True)
        where = f"pipeline config: students.{name}.distill"
        if not isinstance(use_store, bool):
            raise TypeError(f"{where}.teacher_logits must be true or false, got {use_store!r}")
        if not isinstance(tail, bool):
            raise TypeError(f"{where}.tail must be true or false, got {tail!r}")
        loss_kw = {k: merged.pop(k) for k in list(merged) if k in DISTILL_LOSS_KEYS}
        loss = loss_cfg(f"students.{name}.distill", loss_kw)
        if use_store:
            if store_cfg is None:
                raise ValueError(f"{where}.teacher_logits is true but the config has no top-level teacher_logits "
                                 "section (top_k, temperature) describing the store")
            fixed = [k for k in ("mode", "beta", "temperature") if k in loss_kw]
            if fixed:
                raise ValueError(f"{where}: {', '.join(fixed)} cannot be set for a student distilled from the store "
                                 "(forward KL at the store's temperature)")
            stored = {"tail": tail}
        students.append(StudentSpec(name, width, depth, train_cfg(f"students.{name}.distill", merged), loss, stored))

    ev = _check_keys("evaluate", cfg.get("evaluate"), EVAL_KEYS)
    ev.setdefault("batch_size", 8)
    ev.setdefault("max_batches", None)
    if not isinstance(ev["batch_size"], int) or isinstance(ev["batch_size"], bool) or ev["batch_size"] < 1:
        raise ValueError(f"pipeline config: evaluate.batch_size must be a positive int, got {ev['batch_size']!r}")
    mb = ev["max_batches"]
    if mb is not None and (not isinstance(mb, int) or isinstance(mb, bool) or mb < 1):
        raise ValueError(f"pipeline config: evaluate.max_batches must be a positive int or null, got {mb!r}")
    return PipelineSpec(Path(out), teacher, tokenizer, seed, device, backend, data, correct, imp,
                        students, ev, cfg, store_cfg)


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
    from minitron.io.checkpoint import load_model
    from minitron.io.inputs import load_tokenizer_arg, resolve_model_path
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
        msg = str(e).replace("pipeline config: ", "", 1)
        raise type(e)(f"pipeline config {source}: {msg}") from None
    inputs = {"teacher": spec.teacher, "tokenizer": spec.tokenizer, "data.train": spec.data["train"],
              "data.eval": spec.data["eval"]}
    if source is not None:
        inputs["--config"] = source
    out = check_output_dir(spec.output_dir, overwrite=overwrite, resume=resume, inputs=inputs, resumable=True,
                           what="output_dir" if output_dir is None else "--output")
    device = resolve_device(spec.device)
    check_backends(device, spec.backend)

    t_start = time.time()
    teacher_path = resolve_model_path(spec.teacher)
    teacher, tok = load_model(teacher_path)
    if spec.tokenizer is not None:
        tok = load_tokenizer_arg(spec.tokenizer)
    if tok is None:
        raise ValueError(f"the teacher {spec.teacher!r} has no tokenizer files; set `tokenizer:` in the config")
    d = spec.data
    train_data = load_packed(d["train"], tok, seq_len=d["seq_len"], text_column=d["text_column"], split=d.get("split"),
                             dataset_config=d.get("dataset_config"), max_tokens=d.get("max_tokens"),
                             model_configs=[teacher.config])
    eval_data = load_packed(d["eval"], tok, seq_len=d["seq_len"], text_column=d["text_column"],
                            split=d.get("eval_split"), dataset_config=d.get("dataset_config"),
                            max_tokens=d.get("eval_max_tokens"), drop_remainder=False, model_configs=[teacher.config])
    needs = [(f"students.{st.name}.distill", st.train.batch_size) for st in spec.students]
    if spec.correct is not None:
        needs.append(("correct_teacher", spec.correct.batch_size))
    for section, bs in needs:
        if len(train_data) < bs:
            raise ValueError(f"{section}: batch_size={bs} exceeds the {len(train_data)} training sequences")
    work = begin_output(out, overwrite=overwrite)
    try:
        result = _run_stages(spec, work, out, teacher, tok, teacher_path, train_data, eval_data, device,
                             resume=resume, extra_rows=extra_rows, t_start=t_start)
        finish_output(work, out)
    except BaseException:
        abandon_output(work, out)
        raise
    return result


def _run_stages(spec: PipelineSpec, out: Path, final_out: Path, teacher: torch.nn.Module, tok: Any,
                teacher_path: str, train_data: Any, eval_data: Any, device: torch.device, *, resume: bool,
                extra_rows: Optional[List[Dict[str, Any]]], t_start: float) -> Dict[str, Any]:
    """Every stage of the recipe, writing into ``out`` (the final ``final_out`` or its temporary sibling)."""
    from minitron.compress.importance import ImportanceScores, estimate_importance
    from minitron.compress.prune import prune_depth, prune_width
    from minitron.eval.perplexity import perplexity
    from minitron.io.checkpoint import load_model, save_model
    from minitron.runtime import count_parameters
    from minitron.io.tokenizer import has_tokenizer_files
    from minitron.train import correct_model, distill_model

    timings: Dict[str, float] = {}
    tok_dir = spec.tokenizer if spec.tokenizer is not None else (teacher_path if has_tokenizer_files(teacher_path) else None)
    d = spec.data
    import yaml

    atomic_write_text(out / "pipeline.yaml", yaml.safe_dump(
        dict(spec.raw, output_dir=str(final_out)), sort_keys=False))
    teacher.to(device)
    teacher_params = count_parameters(teacher)
    eval_cache_path = out / "evaluations.json"
    eval_cache: Dict[str, Any] = {}
    if resume and eval_cache_path.is_file():
        eval_cache = read_json(eval_cache_path, "evaluation cache")
    rows: List[Dict[str, Any]] = []
    for r in extra_rows or []:
        r = dict(r)
        r.setdefault("param_fraction", r["parameters"] / teacher_params)
        rows.append(r)

    def evaluate(label: str, model: torch.nn.Module, kind: str) -> Dict[str, Any]:
        if label in eval_cache:
            res = eval_cache[label]
        else:
            t0 = time.time()
            model.to(device)
            res = perplexity(model, eval_data, batch_size=spec.evaluate["batch_size"],
                             max_batches=spec.evaluate["max_batches"])
            res["elapsed_s"] = round(time.time() - t0, 2)
            n = count_parameters(model)
            res.update(label=label, kind=kind, parameters=n, param_fraction=n / teacher_params)
            eval_cache[label] = res
            atomic_write_json(eval_cache_path, eval_cache)
        log.info("%-24s ppl %9.2f  (%d parameters)", label, res["ppl"], res["parameters"])
        rows.append(res)
        return res

    # 1. the teacher as given
    evaluate("teacher", teacher, "teacher")

    # 2. teacher correction
    histories: Dict[str, List[Dict[str, Any]]] = {}
    if spec.correct is not None:
        cdir = out / "teacher_corrected"
        t0 = time.time()
        if (cdir / "model" / "config.json").is_file() and (cdir / "run.json").is_file():
            teacher, _ = load_model(cdir / "model")
            teacher.to(device)
            log.info("teacher correction: reusing %s", cdir / "model")
        else:
            res = correct_model(teacher, train_data, spec.correct, cdir, resume=resume,
                                eval_data=eval_data if spec.correct.eval_every else None,
                                run_info={"model": teacher_path, "data": train_data.description})
            save_model(teacher, cdir / "model", tokenizer=tok, tokenizer_dir=tok_dir, overwrite=(cdir / "model").exists())
            atomic_write_json(cdir / "run.json", {"final_train_loss": res.final_loss, "final_eval": res.final_eval,
                                                  "elapsed_s": res.elapsed_s, "train": spec.correct.to_dict()})
            histories["teacher correction"] = res.history
        timings["correct_teacher"] = round(time.time() - t0, 2)
        evaluate("teacher (corrected)", teacher, "teacher")
    teacher.eval()

    # 3. importance on the (corrected) teacher
    idir = out / "importance"
    t0 = time.time()
    if (idir / "importance.json").is_file():
        scores = ImportanceScores.load(idir)
        scores.check_model(teacher, source=f"importance scores {str(idir)!r}")
        log.info("importance: reusing %s", idir)
    else:
        imp = spec.importance
        batches = train_data.batches(imp["batch_size"], shuffle=True, seed=spec.seed, max_batches=imp["max_batches"])
        scores = estimate_importance(teacher, batches, seq_agg=imp["seq_agg"], batch_agg=imp["batch_agg"],
                                     layer_metrics=tuple(imp["layer_metrics"]), progress=False, backend=spec.backend)
        scores.save(idir, overwrite=True)
        try:
            scores.plot(idir / "importance.png")
        except Exception as e:
            log.warning("could not plot importance: %s", e)
    timings["importance"] = round(time.time() - t0, 2)

    # 3b. the teacher-logit store, when a student distils from it
    store = None
    if any(st.stored is not None for st in spec.students):
        from minitron.io.logit_store import DEFAULT_VALUE_ENCODING, StoreError, TeacherLogitStore, write_teacher_logits

        sc = spec.teacher_logits
        sdir = out / "teacher_logits"
        t0 = time.time()
        try:
            store = TeacherLogitStore(sdir)
            log.info("teacher-logit store: reusing %s", sdir)
        except StoreError:  # absent or incomplete: write it (continuing an interrupted extraction)
            write_teacher_logits(
                teacher, train_data, sdir, top_k=sc["top_k"], temperature=float(sc["temperature"]),
                value_encoding=sc["value_encoding"] or DEFAULT_VALUE_ENCODING, batch_size=sc["batch_size"],
                resume=sdir.exists(), progress=False, tokenizer_path=tok_dir, device=device)
            store = TeacherLogitStore(sdir)
        timings["teacher_logits"] = round(time.time() - t0, 2)

    # 4. students
    student_results: Dict[str, Any] = {}
    for st in spec.students:
        sdir = out / "students" / st.name
        pdir, ddir = sdir / "pruned", sdir / "distill"
        t0 = time.time()
        if (pdir / "config.json").is_file():
            student, _ = load_model(pdir)
        else:
            student = copy.deepcopy(teacher)
            if any(v is not None for v in st.width.values()):
                prune_width(student, scores, backend=spec.backend, **st.width)
            if st.depth.get("num_hidden_layers") is not None:
                prune_depth(student, num_hidden_layers=st.depth["num_hidden_layers"], scores=scores,
                            metric=st.depth.get("depth_metric", "lm_loss"),
                            contiguous=st.depth.get("contiguous", True),
                            layers_to_drop=st.depth.get("layers_to_drop"))
            save_model(student, pdir, tokenizer=tok, tokenizer_dir=tok_dir)
        timings[f"{st.name}/prune"] = round(time.time() - t0, 2)
        pruned_eval = evaluate(f"{st.name} pruned", student, "pruned")
        t0 = time.time()
        if (ddir / "model" / "config.json").is_file() and (ddir / "run.json").is_file():
            student, _ = load_model(ddir / "model")
            log.info("%s: reusing distilled student %s", st.name, ddir / "model")
        else:
            student.to(device)
            if st.stored is not None:
                from minitron.train.stored import StoredDistillConfig, distill_from_store

                scfg = StoredDistillConfig(kl_weight=st.loss.kl_weight, lm_loss_weight=st.loss.lm_loss_weight,
                                           tail=st.stored["tail"], chunk_size=st.loss.chunk_size,
                                           backend=st.loss.backend)
                res = distill_from_store(student, store, train_data, st.train, scfg, ddir, resume=resume,
                                         eval_data=eval_data if st.train.eval_every else None,
                                         run_info={"student": st.name, "data": train_data.description})
                loss_settings = {"teacher_logits": scfg.to_dict()}
            else:
                res = distill_model(student, teacher, train_data, st.train, st.loss, ddir, resume=resume,
                                    eval_data=eval_data if st.train.eval_every else None,
                                    run_info={"student": st.name, "data": train_data.description})
                loss_settings = {"distill": st.loss.to_dict()}
            save_model(student, ddir / "model", tokenizer=tok, tokenizer_dir=tok_dir, overwrite=(ddir / "model").exists())
            atomic_write_json(ddir / "run.json", {"final_train_loss": res.final_loss, "final_eval": res.final_eval,
                                                  "elapsed_s": res.elapsed_s, "train": st.train.to_dict(),
                                                  **loss_settings})
            histories[f"{st.name} distillation"] = res.history
        timings[f"{st.name}/distill"] = round(time.time() - t0, 2)
        distilled_eval = evaluate(f"{st.name} distilled", student, "distilled")
        student_results[st.name] = {"pruned": pruned_eval, "distilled": distilled_eval,
                                    "config": {k: getattr(student.config, k) for k in WIDTH_KEYS + ("num_hidden_layers",)}}
        del student

    timings["pipeline_total"] = round(time.time() - t_start, 2)
    eval_name = d.get("eval_name") or (Path(str(d["eval"])).name if isinstance(d["eval"], (str, os.PathLike)) else "eval")
    table = _markdown_table(rows, eval_name)
    result = {"rows": rows, "table": table, "timings": timings, "students": student_results,
              "teacher": spec.teacher, "eval_data": eval_data.description, "eval_tokens": rows[-1]["tokens"],
              "output_dir": str(final_out)}
    atomic_write_json(out / "results.json", result)
    atomic_write_text(out / "results.md", f"# Minitron pipeline results\n\nEvaluation data: {eval_data.description} "
                      f"({result['eval_tokens']} predicted tokens)\n\n" + table)
    if histories:
        try:
            from minitron.io.plotting import plot_loss_curves

            plot_loss_curves([], out / "losses.png", title="training losses", extra=histories)
        except Exception as e:  # a plot never fails the pipeline
            log.warning("could not plot the losses: %s", e)
    return result
