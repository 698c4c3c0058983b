"""Python API of the Minitron driver (mirrors the ``minitron`` CLI).

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
    evaluate_perplexity(model, data, ...) -> {"loss", "ppl", "tokens", "sequences"}

Training outputs (``correct_teacher`` / ``distill`` / ``train_lm``)::

    <output_dir>/model/        the final model + tokenizer (plain transformers checkpoint)
    <output_dir>/log.jsonl     loss log;  loss.png  plot;  checkpoints/  resumable state
    <output_dir>/run.json      arguments and results
"""
from __future__ import annotations

import copy
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from minitron.train.loop import TrainConfig, TrainResult
from minitron.io.data import PackedDataset, load_packed
from minitron.io.files import atomic_write_json
from minitron.io.inputs import (DEFAULT_SEQ_LEN, MODEL_SUBDIR, ModelLike, check_data_arg, default_seq_len, is_path,
                                load_model_like, load_tokenizer_arg, read_config, resolve_model_path,
                                tokenizer_source, weight_bytes)
from minitron.io.safety import abandon_output, begin_output, check_output, check_output_dir, finish_output
from minitron.runtime import check_backends, count_parameters, resolve_device
from minitron.train.distributed import barrier, broadcast_from_main, is_main_process

log = logging.getLogger(__name__)

__all__ = [
    "estimate_importance",
    "prune",
    "correct_teacher",
    "distill",
    "evaluate_perplexity",
    "train_lm",
    "write_teacher_logits",
]

# names of the ops' backend tables in minitron.ops._dispatch.REGISTRY, per command
IMPORTANCE_OPS = ("importance_update", "block_influence_update")
SLICING_OPS = ("gather_slices", "compact_")
KL_OPS = ("kl_div", "fused_linear_kl_div")


# --------------------------------------------------------------------------------------------------
# shared helpers


def _train_config(train: Union[None, TrainConfig, Dict[str, Any]], overrides: Dict[str, Any]) -> TrainConfig:
    if isinstance(train, TrainConfig):
        base = train.to_dict()
    elif train is None or isinstance(train, dict):
        base = dict(train or {})
    else:
        raise TypeError(f"train must be a TrainConfig, a dict or None, got {type(train).__name__}")
    base.update({k: v for k, v in overrides.items()})
    return TrainConfig.from_dict(base)


def _begin_run(out: Path, *, overwrite: bool) -> Path:
    """:func:`begin_output` for a training run, on every rank: rank 0 creates the run directory (after every
    rank has checked its inputs and output) and tells the others where it is."""
    barrier()  # every rank has validated the output before rank 0 creates it
    return broadcast_from_main(begin_output(out, overwrite=overwrite) if is_main_process() else None)


def _abandon_run(work: Path, out: Path) -> None:
    if is_main_process():
        abandon_output(work, out)


def _choose_streaming(command: str, model: ModelLike, streaming: Optional[bool]) -> bool:
    """Whether ``command`` streams ``model`` from its files: as asked, or (``None``) by the memory it needs."""
    if streaming is not None and not isinstance(streaming, bool):
        raise TypeError(f"streaming must be True, False or None, got {streaming!r}")
    local = is_path(model) and Path(resolve_model_path(model)).is_dir()
    if streaming is False:
        return False
    if not local:
        if streaming:
            raise ValueError(
                f"--streaming needs a local checkpoint directory as --model, got "
                f"{'a loaded model' if isinstance(model, torch.nn.Module) else repr(str(model))}"
            )
        return False
    path = resolve_model_path(model)
    if streaming:
        return True
    if command == "importance":
        from minitron.compress.streaming import should_stream
    else:
        from minitron.compress.stream_prune import should_stream_prune as should_stream
    decision, reason = should_stream(path)
    log.info("%s: %s", command, reason)
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


# --------------------------------------------------------------------------------------------------
# importance


def estimate_importance(
    model: ModelLike,
    data: Any,
    *,
    output_dir: Optional[Union[str, os.PathLike]] = None,
    overwrite: bool = False,
    tokenizer: Any = None,
    seq_len: Optional[int] = None,
    batch_size: int = 8,
    max_batches: Optional[int] = 32,
    text_column: str = "text",
    split: Optional[str] = None,
    dataset_config: Optional[str] = None,
    max_tokens: Optional[int] = None,
    seq_agg: str = "mean",
    batch_agg: str = "l2",
    layer_metrics: Sequence[str] = ("block_influence", "lm_loss"),
    device: str = "auto",
    backend: str = "auto",
    progress: bool = False,
    plot: bool = True,
    streaming: Optional[bool] = None,
    spill_dir: Optional[Union[str, os.PathLike]] = None,
):
    """Activation-based importance of heads, neurons, channels and layers on calibration data.

    Args:
        model: checkpoint path / hub name / loaded model (not modified).
        data: calibration text (see :func:`minitron.io.data.load_texts`) or a PackedDataset.
        output_dir: when given, scores are saved there (``importance.safetensors``/``.json``, plus
            ``importance.png`` with ``plot``).
        seq_len: packing length (default: min(512, the model's max_position_embeddings)).
        batch_size, max_batches: calibration batches of ``batch_size`` sequences, at most ``max_batches``.
        seq_agg, batch_agg, layer_metrics, backend: see :func:`minitron.compress.importance.estimate_importance`.
        streaming: ``True`` runs one decoder layer at a time from the memory-mapped safetensors of a local
            checkpoint (:func:`minitron.compress.streaming.estimate_importance_streaming`; fp32 compute per
            layer, hidden states spilled to ``spill_dir`` when they do not fit); ``False`` loads the whole
            model; ``None`` (default) streams a local checkpoint whose fp32 copy would not fit comfortably in
            the available memory (the reason is logged).
        spill_dir: where streamed hidden states may spill (default: the system temporary directory).

    Under ``torchrun`` (an initialised process group, see
    :func:`minitron.train.distributed.distributed_session`) the batches are sharded over the ranks, the sums
    all-reduced, and only rank 0 writes ``output_dir``; every rank returns the same scores.

    Returns:
        :class:`minitron.compress.importance.ImportanceScores`.
    """
    from minitron.compress.importance import estimate_importance as _estimate

    config = read_config(model, "--model")
    seq_len = default_seq_len(seq_len, config)
    check_data_arg("--data", data)
    from minitron.compress.importance import validate_options

    layer_metrics = validate_options(seq_agg, batch_agg, layer_metrics)
    for name, v in (("batch_size", batch_size),):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}")
    out = None
    if output_dir is not None:
        out = check_output_dir(output_dir, overwrite=overwrite,
                               inputs={"--model": model, "--data": data, "--tokenizer": tokenizer})
    dev = resolve_device(device)
    check_backends(dev, backend, ops=IMPORTANCE_OPS)
    stream = _choose_streaming("importance", model, streaming)
    if stream:
        if dev.type != "cpu":
            raise ValueError(f"streamed importance runs on the CPU; got --device {device!r} (use --no-streaming)")
        path = resolve_model_path(model)
        tok = load_tokenizer_arg(tokenizer) if tokenizer is not None else _checkpoint_tokenizer(path)
    else:
        module, tok, _ = load_model_like(model, tokenizer)
        check_finite_weights(module, str(model) if is_path(model) else "model")
    packed = load_packed(
        data, tok, seq_len=seq_len, text_column=text_column, split=split, dataset_config=dataset_config,
        max_tokens=max_tokens, drop_remainder=False, model_configs=[config],
    )
    batches = packed.batches(batch_size, max_batches=max_batches)
    t0 = time.time()
    if stream:
        from minitron.compress.streaming import estimate_importance_streaming

        scores = estimate_importance_streaming(path, batches, seq_agg=seq_agg, batch_agg=batch_agg,
                                               layer_metrics=tuple(layer_metrics), progress=progress,
                                               backend=backend, spill_dir=spill_dir)
    else:
        orig_device = next(module.parameters()).device
        module.to(dev)
        try:
            scores = _estimate(module, batches, seq_agg=seq_agg, batch_agg=batch_agg,
                               layer_metrics=tuple(layer_metrics), progress=progress, backend=backend)
        finally:
            module.to(orig_device)
    log.info("importance%s: %d batches in %.1fs", " (layer-streamed)" if stream else "", len(batches),
             time.time() - t0)
    for name in ("heads", "neurons", "channels"):
        if not bool(torch.isfinite(getattr(scores, name)).all()):
            raise RuntimeError(f"importance: the {name} scores are not finite (NaN/inf activations); nothing was saved")
    if out is None:
        return scores
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
    return scores


# --------------------------------------------------------------------------------------------------
# pruning


def prune(
    model: ModelLike,
    *,
    importance: Any = None,
    output_dir: Optional[Union[str, os.PathLike]] = None,
    overwrite: bool = False,
    tokenizer: Any = None,
    hidden_size: Optional[int] = None,
    intermediate_size: Optional[int] = None,
    num_attention_heads: Optional[int] = None,
    num_key_value_heads: Optional[int] = None,
    num_hidden_layers: Optional[int] = None,
    depth_metric: str = "lm_loss",
    contiguous: bool = True,
    layers_to_drop: Optional[Sequence[int]] = None,
    backend: str = "auto",
    inplace: bool = False,
    streaming: Optional[bool] = False,
    shard_bytes: Optional[int] = None,
) -> Union[torch.nn.Module, Path]:
    """Width- and/or depth-prune a model (width first, then depth) and optionally save it.

    Args:
        model: checkpoint path / hub name / loaded model. A loaded model is copied first unless
            ``inplace=True``.
        importance: ImportanceScores or the directory they were saved to (needed for width pruning and
            for depth pruning without ``layers_to_drop``); must come from this model.
        output_dir: save the pruned model (and tokenizer) there.
        hidden_size, intermediate_size, num_attention_heads, num_key_value_heads: width targets.
        num_hidden_layers, depth_metric, contiguous, layers_to_drop: depth target (see
            :func:`minitron.compress.prune.prune_depth`).
        streaming: ``True`` prunes a local checkpoint tensor by tensor into ``output_dir`` without loading
            the model (:func:`minitron.compress.stream_prune.prune_checkpoint_streaming`: memory for one
            tensor; sharded safetensors output, tensor-for-tensor equal to the in-memory path's); ``None``
            streams when the weights would not fit comfortably in the available memory (logged); ``False``
            (the default of this function; the CLI defaults to ``None``) loads the model.
        shard_bytes: output shard size limit when streaming (default 5 GB, as transformers).

    Returns:
        The pruned model; when streaming, the output directory (a Path) instead.
    """
    from minitron.compress.importance import ImportanceScores
    from minitron.compress.prune import plan_depth, prune_depth, prune_width, validate_width_targets

    width = dict(hidden_size=hidden_size, intermediate_size=intermediate_size,
                 num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads)
    want_width = any(v is not None for v in width.values())
    want_depth = num_hidden_layers is not None
    if not want_width and not want_depth:
        raise ValueError(
            "no pruning target: give hidden_size / intermediate_size / num_attention_heads / "
            "num_key_value_heads and/or num_hidden_layers"
        )
    config = read_config(model, "--model")
    validate_width_targets(config, **width)
    scores = importance
    if is_path(importance):
        scores = ImportanceScores.load(importance)
    elif importance is not None and not isinstance(importance, ImportanceScores):
        raise TypeError(f"importance must be ImportanceScores or a directory, got {type(importance).__name__}")
    if want_width and scores is None:
        raise ValueError("width pruning needs importance scores (--importance / importance=...)")
    if scores is not None and (want_width or layers_to_drop is None):
        try:
            scores.check_compatible(config)
        except ValueError as e:
            raise ValueError(f"--importance {str(importance)!r}: {e}" if is_path(importance) else str(e)) from None
    if want_depth:
        if layers_to_drop is None and scores is None:
            raise ValueError("depth pruning needs importance scores or layers_to_drop")
        plan_depth(config, num_hidden_layers=num_hidden_layers, scores=scores, metric=depth_metric,
                   contiguous=contiguous, layers_to_drop=layers_to_drop)
    if _choose_streaming("prune", model, streaming):
        return _prune_streaming(model, scores, width if want_width else None, config, output_dir,
                                overwrite=overwrite, tokenizer=tokenizer, importance=importance,
                                num_hidden_layers=num_hidden_layers if want_depth else None,
                                depth_metric=depth_metric, contiguous=contiguous, layers_to_drop=layers_to_drop,
                                backend=backend, shard_bytes=shard_bytes)
    if shard_bytes is not None:
        raise ValueError("shard_bytes (--shard-size) applies to streamed pruning only (--streaming)")
    out = None
    if output_dir is not None:
        out = check_output_dir(output_dir, overwrite=overwrite, estimated_bytes=weight_bytes(model),
                               inputs={"--model": model, "--importance": importance, "--tokenizer": tokenizer})
    if want_width:
        dev = next(model.parameters()).device if isinstance(model, torch.nn.Module) else torch.device("cpu")
        check_backends(dev, backend, ops=SLICING_OPS)
    module, tok, src = load_model_like(model, tokenizer)
    if isinstance(model, torch.nn.Module) and not inplace:
        module = copy.deepcopy(module)
    if scores is not None and (want_width or layers_to_drop is None):
        scores.check_model(module, source=f"importance scores {str(importance)!r}" if is_path(importance)
                           else "importance scores")
    check_finite_weights(module, str(model) if is_path(model) else "model")
    before = count_parameters(module)
    if want_width:
        prune_width(module, scores, backend=backend, **width)
    if want_depth:
        prune_depth(module, num_hidden_layers=num_hidden_layers, scores=scores, metric=depth_metric,
                    contiguous=contiguous, layers_to_drop=layers_to_drop)
    after = count_parameters(module)
    log.info("pruned: %d -> %d parameters (%.1f%%)", before, after, 100.0 * after / before)
    if out is not None:
        from minitron.io.checkpoint import save_model

        save_model(module, out, tokenizer=tok, tokenizer_dir=tokenizer_source(src, tokenizer), overwrite=overwrite,
                   input_path=src)
    return module


def _prune_streaming(
    model: ModelLike, scores: Any, width: Optional[Dict[str, Optional[int]]], config: Any, output_dir: Any, *,
    overwrite: bool, tokenizer: Any, importance: Any, num_hidden_layers: Optional[int], depth_metric: str,
    contiguous: bool, layers_to_drop: Optional[Sequence[int]], backend: str, shard_bytes: Optional[int],
) -> Path:
    """Shard-streamed pruning (see :func:`prune`); the depth plan is taken on the width-pruned config."""
    from minitron.compress.prune import plan_depth
    from minitron.compress.stream_prune import DEFAULT_SHARD_BYTES, prune_checkpoint_streaming

    if output_dir is None:
        raise ValueError("streamed pruning writes its result to disk: give output_dir (--output)")
    src = resolve_model_path(model)
    if tokenizer is not None:
        raise ValueError("--tokenizer is not supported with --streaming: the output carries the tokenizer files "
                         f"of {src!r}")
    check_output_dir(output_dir, overwrite=overwrite, estimated_bytes=weight_bytes(model),
                     inputs={"--model": model, "--importance": importance})
    drop = None
    if num_hidden_layers is not None:
        drop = plan_depth(config, num_hidden_layers=num_hidden_layers, scores=scores, metric=depth_metric,
                          contiguous=contiguous, layers_to_drop=layers_to_drop)
    if scores is not None and width is not None:
        scores.check_compatible(config)
    t0 = time.time()
    out = prune_checkpoint_streaming(src, output_dir, scores=scores, width_targets=width, drop_layers=drop,
                                     shard_bytes=DEFAULT_SHARD_BYTES if shard_bytes is None else shard_bytes,
                                     overwrite=overwrite, backend=backend, progress=True)
    log.info("pruned (streamed) %s -> %s in %.1fs", src, out, time.time() - t0)
    return out


# --------------------------------------------------------------------------------------------------
# training commands


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
    if result.plot_path is not None:
        result.plot_path = out / result.plot_path.name
    return result


def _training_data(
    data: Any, eval_data: Any, tok: Any, seq_len: int, configs: List[Any], *, text_column: str,
    split: Optional[str], dataset_config: Optional[str], max_tokens: Optional[int],
    eval_split: Optional[str], eval_max_tokens: Optional[int],
) -> Tuple[PackedDataset, Optional[PackedDataset]]:
    train_data = load_packed(data, tok, seq_len=seq_len, text_column=text_column, split=split,
                             dataset_config=dataset_config, max_tokens=max_tokens, model_configs=configs)
    ev = None
    if eval_data is not None:
        ev = load_packed(eval_data, tok, seq_len=seq_len, text_column=text_column, split=eval_split,
                         dataset_config=dataset_config, max_tokens=eval_max_tokens, drop_remainder=False,
                         model_configs=configs)
    return train_data, ev


def train_lm(
    model: ModelLike,
    data: Any,
    *,
    output_dir: Union[str, os.PathLike],
    tokenizer: Any = None,
    eval_data: Any = None,
    seq_len: Optional[int] = None,
    text_column: str = "text",
    split: Optional[str] = None,
    dataset_config: Optional[str] = None,
    max_tokens: Optional[int] = None,
    eval_split: Optional[str] = None,
    eval_max_tokens: Optional[int] = None,
    overwrite: bool = False,
    resume: bool = False,
    train: Union[None, TrainConfig, Dict[str, Any]] = None,
    callbacks: Sequence[Any] = (),
    **train_kwargs: Any,
) -> TrainResult:
    """LM fine-tuning (next-token cross-entropy) of ``model``; see :func:`correct_teacher`."""
    from minitron.train import correct_model

    cfg = _train_config(train, train_kwargs)
    config = read_config(model, "--model")
    seq_len = default_seq_len(seq_len, config)
    check_data_arg("--data", data)
    check_data_arg("--eval-data", eval_data, required=False)
    out = check_output_dir(output_dir, overwrite=overwrite, resume=resume, resumable=True,
                           estimated_bytes=_training_bytes(weight_bytes(model), cfg),
                           inputs={"--model": model, "--data": data, "--eval-data": eval_data, "--tokenizer": tokenizer})
    resolve_device(cfg.device)
    module, tok, src = load_model_like(model, tokenizer)
    train_data, ev = _training_data(data, eval_data, tok, seq_len, [module.config], text_column=text_column,
                                    split=split, dataset_config=dataset_config, max_tokens=max_tokens,
                                    eval_split=eval_split, eval_max_tokens=eval_max_tokens)
    work = _begin_run(out, overwrite=overwrite)
    info = {"model": _model_info(module), "data": train_data.description}
    try:
        result = correct_model(module, train_data, cfg, work, eval_data=ev, resume=resume, callbacks=callbacks,
                               run_info=info)
        args = {"command": "train_lm", "model": str(model) if is_path(model) else "<module>", "seq_len": seq_len,
                "data": str(data) if is_path(data) else "<object>", "train": cfg.to_dict()}
        return _finish_run(result, module, tok, work, out, args, src, tokenizer_source(src, tokenizer))
    except BaseException:
        _abandon_run(work, out)
        raise


def correct_teacher(model: ModelLike, data: Any, *, output_dir: Union[str, os.PathLike], **kwargs: Any) -> TrainResult:
    """Teacher correction: fine-tune the teacher with the LM loss on the distillation data.

    Args:
        model: teacher checkpoint path / hub name / loaded model (a loaded model is trained in place).
        data: the distillation data (text source or PackedDataset).
        output_dir: run directory (final model in ``<output_dir>/model``).
        **kwargs: ``tokenizer``, ``eval_data``, ``seq_len``, ``text_column``, ``split``,
            ``dataset_config``, ``max_tokens``, ``eval_split``, ``eval_max_tokens``, ``overwrite``,
            ``resume``, ``train`` (TrainConfig or dict), ``callbacks``, and any TrainConfig field
            (``steps=``, ``lr=``, ...).

    Returns:
        TrainResult (``result.extra["model"]`` is the corrected model, ``["model_dir"]`` where it was saved).
    """
    return train_lm(model, data, output_dir=output_dir, **kwargs)


def distill(
    student: ModelLike,
    teacher: Optional[ModelLike],
    data: Any,
    *,
    output_dir: Union[str, os.PathLike],
    teacher_logits: Optional[Union[str, os.PathLike]] = None,
    tail: bool = True,
    tokenizer: Any = None,
    eval_data: Any = None,
    seq_len: Optional[int] = None,
    text_column: str = "text",
    split: Optional[str] = None,
    dataset_config: Optional[str] = None,
    max_tokens: Optional[int] = None,
    eval_split: Optional[str] = None,
    eval_max_tokens: Optional[int] = None,
    mode: str = "forward",
    temperature: float = 1.0,
    beta: float = 0.5,
    kl_weight: float = 1.0,
    lm_loss_weight: float = 0.0,
    chunk_size: Optional[int] = None,
    kl_backend: str = "auto",
    overwrite: bool = False,
    resume: bool = False,
    train: Union[None, TrainConfig, Dict[str, Any]] = None,
    callbacks: Sequence[Any] = (),
    **train_kwargs: Any,
) -> TrainResult:
    """Logit distillation of ``teacher`` into ``student`` with the fused linear KL loss.

    Args:
        student: pruned model (path or module; a module is trained in place).
        teacher: the (corrected) teacher, frozen (path or module; not modified); ``None`` with
            ``teacher_logits``.
        teacher_logits: a teacher top-k logit store (written by :func:`write_teacher_logits`) to distil
            from instead of a live teacher (no teacher is loaded): the fused top-k KL
            (:func:`minitron.ops.fused_linear_topk_kl_div`) at the store's temperature. The store must come from
            this very data (same tokenizer, vocabulary, seq_len and token ids; the mismatch is named).
            ``mode``/``beta``/``temperature`` other than their defaults are refused (the store fixes them).
        tail: with a store: match the teacher's unstored mass as one bucket (True) or renormalise the teacher
            over its k entries (False); see ``docs/topk_kl.md``.
        data: distillation data (text source or PackedDataset).
        output_dir: run directory (final student in ``<output_dir>/model``).
        mode, temperature, beta, kl_weight, lm_loss_weight, chunk_size, kl_backend: see
            :class:`minitron.train.DistillConfig`.
        train / **train_kwargs: a TrainConfig / dict and TrainConfig fields (steps, lr, batch_size,
            grad_accum, warmup_steps, eval_every, save_every, seed, bf16, device, ...).
        resume: continue an interrupted run in ``output_dir`` exactly.

    Returns:
        TrainResult (``result.extra["model"]`` is the student, ``["model_dir"]`` where it was saved).
    """
    from minitron.train import DistillConfig, check_distillable, distill_model

    cfg = _train_config(train, train_kwargs)
    if (teacher is None) == (teacher_logits is None):
        raise ValueError("give exactly one of teacher (--teacher) and teacher_logits (--teacher-logits)")
    if teacher_logits is not None:
        if mode != "forward" or beta != 0.5 or temperature != 1.0:
            raise ValueError("a teacher-logit store fixes the loss (forward KL at the store's temperature): "
                             "leave mode/--kl-mode, beta and temperature at their defaults")
        return _distill_from_store(
            student, teacher_logits, data, cfg, output_dir=output_dir, tokenizer=tokenizer, eval_data=eval_data,
            seq_len=seq_len, text_column=text_column, split=split, dataset_config=dataset_config,
            max_tokens=max_tokens, eval_split=eval_split, eval_max_tokens=eval_max_tokens, tail=tail,
            kl_weight=kl_weight, lm_loss_weight=lm_loss_weight, chunk_size=chunk_size, kl_backend=kl_backend,
            overwrite=overwrite, resume=resume, callbacks=callbacks)
    dcfg = DistillConfig(mode=mode, temperature=temperature, beta=beta, kl_weight=kl_weight,
                         lm_loss_weight=lm_loss_weight, chunk_size=chunk_size, backend=kl_backend)
    s_cfg, t_cfg = read_config(student, "--student"), read_config(teacher, "--teacher")
    if int(s_cfg.vocab_size) != int(t_cfg.vocab_size):
        raise ValueError(
            f"student vocab_size ({s_cfg.vocab_size}) differs from the teacher's ({t_cfg.vocab_size}); "
            "they must share a tokenizer"
        )
    seq_len = default_seq_len(seq_len, s_cfg, t_cfg)
    check_data_arg("--data", data)
    check_data_arg("--eval-data", eval_data, required=False)
    inputs = {"--student": student, "--teacher": teacher, "--data": data, "--eval-data": eval_data,
              "--tokenizer": tokenizer}
    out = check_output_dir(output_dir, overwrite=overwrite, resume=resume, resumable=True, inputs=inputs,
                           estimated_bytes=_training_bytes(weight_bytes(student), cfg))
    dev = resolve_device(cfg.device)
    if dcfg.kl_weight > 0:
        check_backends(dev, kl_backend, ops=KL_OPS)
    s_mod, s_tok, s_src = load_model_like(student, tokenizer)
    t_mod, t_tok, t_src = load_model_like(teacher, None)
    check_distillable(s_mod, t_mod)
    tok = s_tok if s_tok is not None else (t_tok if tokenizer is None else load_tokenizer_arg(tokenizer))
    train_data, ev = _training_data(data, eval_data, tok, seq_len, [s_mod.config, t_mod.config],
                                    text_column=text_column, split=split, dataset_config=dataset_config,
                                    max_tokens=max_tokens, eval_split=eval_split, eval_max_tokens=eval_max_tokens)
    work = _begin_run(out, overwrite=overwrite)
    info = {"student": _model_info(s_mod), "teacher": _model_info(t_mod), "data": train_data.description}
    try:
        result = distill_model(s_mod, t_mod, train_data, cfg, dcfg, work, eval_data=ev, resume=resume,
                               callbacks=callbacks, run_info=info)
        args = {"command": "distill", "student": str(student) if is_path(student) else "<module>",
                "teacher": str(teacher) if is_path(teacher) else "<module>", "seq_len": seq_len,
                "data": str(data) if is_path(data) else "<object>", "train": cfg.to_dict(),
                "distill": dcfg.to_dict()}
        tok_dir = tokenizer_source(s_src, tokenizer) or tokenizer_source(t_src, None)
        return _finish_run(result, s_mod, tok, work, out, args, s_src, tok_dir)
    except BaseException:
        _abandon_run(work, out)
        raise


def _distill_from_store(
    student: ModelLike, store_dir: Union[str, os.PathLike], data: Any, cfg: TrainConfig, *,
    output_dir: Union[str, os.PathLike], tokenizer: Any, eval_data: Any, seq_len: Optional[int], text_column: str,
    split: Optional[str], dataset_config: Optional[str], max_tokens: Optional[int], eval_split: Optional[str],
    eval_max_tokens: Optional[int], tail: bool, kl_weight: float, lm_loss_weight: float,
    chunk_size: Optional[int], kl_backend: str, overwrite: bool, resume: bool, callbacks: Sequence[Any],
) -> TrainResult:
    """:func:`distill` from a teacher-logit store (see there)."""
    from minitron.io.logit_store import TeacherLogitStore, tokenizer_hash
    from minitron.train.stored import StoredDistillConfig, distill_from_store

    if not is_path(store_dir):
        raise TypeError(f"teacher_logits must be a store directory, got {type(store_dir).__name__}")
    scfg = StoredDistillConfig(kl_weight=kl_weight, lm_loss_weight=lm_loss_weight, tail=tail, chunk_size=chunk_size,
                               backend=kl_backend)
    scfg.validate()
    store = TeacherLogitStore(store_dir)
    s_cfg = read_config(student, "--student")
    if seq_len is None:
        seq_len = store.seq_len
    seq_len = default_seq_len(seq_len, s_cfg)
    check_data_arg("--data", data)
    check_data_arg("--eval-data", eval_data, required=False)
    inputs = {"--student": student, "--teacher-logits": store_dir, "--data": data, "--eval-data": eval_data,
              "--tokenizer": tokenizer}
    out = check_output_dir(output_dir, overwrite=overwrite, resume=resume, resumable=True, inputs=inputs,
                           estimated_bytes=_training_bytes(weight_bytes(student), cfg))
    dev = resolve_device(cfg.device)
    if scfg.kl_weight > 0:
        check_backends(dev, kl_backend, ops=("fused_linear_topk_kl_div",))
    s_mod, tok, s_src = load_model_like(student, tokenizer)
    if tok is None:
        raise ValueError(f"--student {str(student)!r} has no tokenizer files; give --tokenizer (the teacher's)")
    tok_dir = tokenizer_source(s_src, tokenizer)
    train_data, ev = _training_data(data, eval_data, tok, seq_len, [s_mod.config], text_column=text_column,
                                    split=split, dataset_config=dataset_config, max_tokens=max_tokens,
                                    eval_split=eval_split, eval_max_tokens=eval_max_tokens)
    t_hash = tokenizer_hash(tok_dir) if tok_dir is not None else None
    from minitron.models import get_adapter

    # before anything is written: the store must describe this very data, tokenizer and vocabulary
    store.check_compatible(train_data, vocab_size=int(get_adapter(s_mod).lm_head(s_mod).weight.shape[0]),
                           tokenizer_hash=t_hash)
    work = _begin_run(out, overwrite=overwrite)
    info = {"student": _model_info(s_mod), "data": train_data.description}
    try:
        result = distill_from_store(s_mod, store, train_data, cfg, scfg, work, eval_data=ev, resume=resume,
                                    callbacks=callbacks, run_info=info, tokenizer_hash=t_hash)
        args = {"command": "distill", "student": str(student) if is_path(student) else "<module>",
                "teacher_logits": str(store_dir), "seq_len": seq_len,
                "data": str(data) if is_path(data) else "<object>", "train": cfg.to_dict(),
                "distill_from_store": scfg.to_dict()}
        return _finish_run(result, s_mod, tok, work, out, args, s_src, tok_dir)
    except BaseException:
        _abandon_run(work, out)
        raise


def write_teacher_logits(
    teacher: ModelLike,
    data: Any,
    *,
    output_dir: Union[str, os.PathLike],
    top_k: int = 64,
    temperature: float = 1.0,
    value_encoding: Optional[str] = None,
    tokenizer: Any = None,
    seq_len: Optional[int] = None,
    text_column: str = "text",
    split: Optional[str] = None,
    dataset_config: Optional[str] = None,
    max_tokens: Optional[int] = None,
    batch_size: int = 8,
    device: str = "auto",
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = False,
) -> Path:
    """Run the teacher once over the distillation data and store its top-k log-probabilities per token.

    The data is packed exactly as :func:`distill` packs it (same tokenizer, ``seq_len``, ``max_tokens``), so
    ``distill(student, None, data, teacher_logits=output_dir, ...)`` can later distil without the teacher.
    See :func:`minitron.io.logit_store.write_teacher_logits` for the format (bit-packed indices, the value
    encodings, the manifest), resume and atomicity.

    Args:
        teacher: teacher checkpoint path / hub name / loaded model (not modified).
        data: the distillation data (text source or PackedDataset).
        output_dir: the store directory.
        top_k: entries kept per token (``1 <= top_k <= vocab_size``).
        temperature: softmax temperature of the stored log-probabilities.
        value_encoding: how log-probabilities are stored (default: the store's default).
        seq_len: packing length (default: min(512, the teacher's max_position_embeddings)).
        resume: continue an interrupted extraction after its last complete shard.

    Returns:
        ``output_dir`` as a Path.
    """
    from minitron.io.logit_store import DEFAULT_VALUE_ENCODING
    from minitron.io.logit_store import write_teacher_logits as _write

    config = read_config(teacher, "--model")
    seq_len = default_seq_len(seq_len, config)
    check_data_arg("--data", data)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    check_output_dir(output_dir, overwrite=overwrite, resume=resume, resumable=True,
                     inputs={"--model": teacher, "--data": data, "--tokenizer": tokenizer})
    resolve_device(device)
    module, tok, src = load_model_like(teacher, tokenizer)
    check_finite_weights(module, str(teacher) if is_path(teacher) else "model")
    packed = load_packed(data, tok, seq_len=seq_len, text_column=text_column, split=split,
                         dataset_config=dataset_config, max_tokens=max_tokens, model_configs=[module.config])
    tok_dir = tokenizer_source(src, tokenizer)
    return _write(module, packed, output_dir, top_k=top_k, temperature=temperature,
                  value_encoding=DEFAULT_VALUE_ENCODING if value_encoding is None else value_encoding,
                  batch_size=batch_size, resume=resume, overwrite=overwrite, progress=progress, teacher_path=src,
                  tokenizer_path=tok_dir, data_path=data if is_path(data) else None, device=device)


# --------------------------------------------------------------------------------------------------
# evaluation


def evaluate_perplexity(
    model: ModelLike,
    data: Any,
    *,
    tokenizer: Any = None,
    seq_len: Optional[int] = None,
    batch_size: int = 8,
    max_tokens: Optional[int] = None,
    max_batches: Optional[int] = None,
    text_column: str = "text",
    split: Optional[str] = None,
    dataset_config: Optional[str] = None,
    device: str = "auto",
    bf16: Union[str, bool] = False,
    output: Optional[Union[str, os.PathLike]] = None,
    overwrite: bool = False,
    allow_nonfinite: bool = False,
) -> Dict[str, Any]:
    """Token-weighted perplexity (padding excluded) of a model on a dataset split.

    Args:
        model: checkpoint path / training output dir / hub name / loaded model.
        data: text source (see :func:`minitron.io.data.load_texts`) or PackedDataset; packed into
            ``seq_len`` sequences, the last one padded (its padding excluded), at most ``max_tokens``.
        output: also write the result as JSON there (refused if it exists, unless ``overwrite``; never an
            input).
        allow_nonfinite: load a checkpoint holding NaN/inf weights (for inspecting a broken model).

    Returns:
        ``{"loss", "ppl", "tokens", "sequences", "seq_len", "model", "data"}``.
    """
    from minitron.eval.perplexity import perplexity

    config = read_config(model, "--model")
    seq_len = default_seq_len(seq_len, config)
    check_data_arg("--data", data)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if output is not None:
        check_output(output, kind="file", overwrite=overwrite,
                     inputs={"--model": model, "--data": data, "--tokenizer": tokenizer})
    dev = resolve_device(device)
    module, tok, _ = load_model_like(model, tokenizer, allow_nonfinite=allow_nonfinite)
    packed = load_packed(data, tok, seq_len=seq_len, text_column=text_column, split=split,
                         dataset_config=dataset_config, max_tokens=max_tokens, drop_remainder=False,
                         model_configs=[module.config])
    orig = next(module.parameters()).device
    module.to(dev)
    t0 = time.time()
    try:
        res = perplexity(module, packed, batch_size=batch_size, max_batches=max_batches, bf16=bf16)
    finally:
        module.to(orig)
    res.update({"seq_len": seq_len, "data": packed.description, "elapsed_s": round(time.time() - t0, 3),
                "model": str(model) if is_path(model) else type(module).__name__})
    log.info("perplexity %.3f (loss %.4f) over %d tokens", res["ppl"], res["loss"], res["tokens"])
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(output, res)
    return res
