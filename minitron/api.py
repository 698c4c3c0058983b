"""Python API of the Minitron driver (mirrors the ``minitron`` CLI).

Every function accepts models as checkpoint paths (a transformers checkpoint directory, or the output
directory of a training command, whose final model lives in ``<dir>/model``) or as loaded
``*ForCausalLM`` modules, and data as a path / hub dataset name / ``datasets.Dataset`` / list of
strings / :class:`~minitron.data.PackedDataset`. All arguments are validated, and output directories
checked, before any model or data is loaded; nothing that exists is overwritten unless
``overwrite=True`` (and an output may never be, contain, or lie inside an input checkpoint).

Functions:
    estimate_importance(model, data, ...) -> ImportanceScores
    prune(model, *, importance, hidden_size=..., num_hidden_layers=..., output_dir=...) -> model
    correct_teacher(model, data, *, output_dir, ...) -> TrainResult   (LM fine-tuning)
    distill(student, teacher, data, *, output_dir, ...) -> TrainResult
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

from minitron.checkpoint import same_or_inside
from minitron.data import PackedDataset, check_seq_len, load_packed, max_positions
from minitron.train import TrainConfig, TrainResult, atomic_write_json, resolve_device

log = logging.getLogger(__name__)

__all__ = [
    "estimate_importance",
    "prune",
    "correct_teacher",
    "distill",
    "evaluate_perplexity",
    "train_lm",
    "resolve_model_path",
    "check_output_dir",
    "check_backends",
    "count_parameters",
]

ModelLike = Union[str, os.PathLike, torch.nn.Module]
# names of the ops' backend tables in minitron.ops._dispatch.REGISTRY, per command
IMPORTANCE_OPS = ("importance_update", "block_influence_update")
SLICING_OPS = ("gather_slices", "compact_")
KL_OPS = ("kl_div", "fused_linear_kl_div")
MODEL_SUBDIR = "model"
DEFAULT_SEQ_LEN = 512


# --------------------------------------------------------------------------------------------------
# shared helpers


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def resolve_model_path(path: Union[str, os.PathLike]) -> str:
    """A checkpoint directory, the ``model/`` inside a training output directory, or a hub name."""
    p = Path(path)
    if (p / "config.json").is_file():
        return str(p)
    if (p / MODEL_SUBDIR / "config.json").is_file():
        return str(p / MODEL_SUBDIR)
    if p.exists():
        raise ValueError(
            f"{str(p)!r} is not a transformers checkpoint (no config.json in it or in {MODEL_SUBDIR}/); "
            "if it is a training output, the run has not finished"
        )
    return str(path)


def _is_path(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike))


def check_output_dir(
    output_dir: Any,
    *,
    overwrite: bool = False,
    resume: bool = False,
    inputs: Sequence[Any] = (),
    what: str = "output directory",
) -> Path:
    """Validate an output directory before any work.

    Refuses (ValueError): a non-path, an existing file, a directory that is (or lies inside) an input
    checkpoint, or (with ``overwrite``) one that contains an input. Refuses an existing non-empty
    directory unless ``overwrite`` or ``resume`` (:class:`minitron.checkpoint.OutputExistsError`, a
    ValueError and FileExistsError). Nothing is created or deleted here.
    """
    from minitron.checkpoint import OutputExistsError

    if not _is_path(output_dir) or str(output_dir) == "":
        raise TypeError(f"{what} must be a non-empty path, got {output_dir!r}")
    if overwrite and resume:
        raise ValueError("overwrite and resume are mutually exclusive")
    out = Path(output_dir)
    for inp in inputs:
        if not _is_path(inp):
            continue
        ip = Path(inp)
        if not ip.exists():
            continue
        if same_or_inside(out, ip):
            raise ValueError(
                f"{what} {str(out)!r} is the input {str(ip)!r} or lies inside it; choose another output directory"
            )
        if same_or_inside(ip, out) and (overwrite or out.exists()):
            raise ValueError(f"{what} {str(out)!r} contains the input {str(ip)!r}; choose another output directory")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise ValueError(f"{what} {str(out)!r} exists and is not a directory")
        if any(out.iterdir()) and not (overwrite or resume):
            raise OutputExistsError(
                f"{what} {str(out)!r} already exists; pass --overwrite (overwrite=True) to replace it"
                + (" or --resume to continue it" if what == "output directory" else "")
            )
    return out


def _prepare_output(out: Path, *, overwrite: bool) -> None:
    """Create ``out`` (after deleting it when ``overwrite``). Call only after all validation."""
    if overwrite and out.exists():
        log.info("removing existing output directory %s (--overwrite)", out)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def check_backends(device: Union[str, torch.device], backend: str = "auto", ops: Optional[Sequence[str]] = None) -> None:
    """Raise a clear error now (before any work) if some minitron op has no backend on ``device``.

    Args:
        ops: op names in the dispatch registry (default: every registered op).
    """
    from minitron.ops import _dispatch, load_all

    try:
        load_all()
    except ImportError as e:  # an op family not present in this build
        log.debug("load_all: %s", e)
    dev = resolve_device(device)
    problems = []
    for name, table in sorted(_dispatch.REGISTRY.items()):
        if ops is not None and name not in ops:
            continue
        try:
            table.select(backend, dev)
        except _dispatch.BackendUnavailableError as e:
            problems.append(str(e))
    if problems:
        raise ValueError(
            "no kernel backend can run here:\n" + "\n".join(problems)
            + "\nBuild the extension (`make build`), or pass backend='reference' (--backend reference) for the "
            "slow torch reference."
        )


def _read_config(model: ModelLike) -> Any:
    """The model's config without loading weights."""
    if isinstance(model, torch.nn.Module):
        if not hasattr(model, "config"):
            raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
        return model.config
    if not _is_path(model):
        raise TypeError(f"model must be a path, a hub name or a transformers model, got {type(model).__name__}")
    from transformers import AutoConfig

    from minitron.models import get_adapter

    path = resolve_model_path(model)
    if not Path(path).exists() and _looks_local(str(model)):
        raise FileNotFoundError(f"model checkpoint {str(model)!r} does not exist")
    config = AutoConfig.from_pretrained(path)
    get_adapter(config)
    return config


def _looks_local(s: str) -> bool:
    return s.startswith((".", "/", "~")) or s.count("/") > 1


def _load(model: ModelLike, tokenizer: Any = None) -> Tuple[torch.nn.Module, Any, Optional[str]]:
    """(module, tokenizer, source path or None)."""
    from minitron.checkpoint import load_model

    if isinstance(model, torch.nn.Module):
        return model, _load_tokenizer(tokenizer), None
    path = resolve_model_path(model)
    module, tok = load_model(path)
    if tokenizer is not None:
        tok = _load_tokenizer(tokenizer)
    return module, tok, path


def _load_tokenizer(tokenizer: Any) -> Any:
    if tokenizer is None or not _is_path(tokenizer):
        return tokenizer
    from minitron.tokenizer import load_tokenizer

    p = Path(tokenizer)
    if not p.is_dir():
        raise FileNotFoundError(f"tokenizer directory {str(p)!r} does not exist")
    return load_tokenizer(p)


def _default_seq_len(seq_len: Optional[int], *configs: Any) -> int:
    if seq_len is not None:
        return check_seq_len(seq_len, *configs)
    limits = [m for m in (max_positions(c) for c in configs) if m is not None]
    return min([DEFAULT_SEQ_LEN] + limits)


def _check_data_arg(name: str, data: Any, *, required: bool = True) -> None:
    from minitron.data import FORMAT_BY_EXTENSION

    if data is None:
        if required:
            raise ValueError(f"{name} is required")
        return
    if _is_path(data):
        s = os.fspath(data)
        p = Path(s).expanduser()
        if not p.exists() and (os.path.splitext(s)[1].lower() in FORMAT_BY_EXTENSION or _looks_local(s)):
            raise FileNotFoundError(f"{name}: data path {s!r} does not exist")


def _train_config(train: Union[None, TrainConfig, Dict[str, Any]], overrides: Dict[str, Any]) -> TrainConfig:
    if isinstance(train, TrainConfig):
        base = train.to_dict()
    elif train is None or isinstance(train, dict):
        base = dict(train or {})
    else:
        raise TypeError(f"train must be a TrainConfig, a dict or None, got {type(train).__name__}")
    base.update({k: v for k, v in overrides.items()})
    return TrainConfig.from_dict(base)


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
):
    """Activation-based importance of heads, neurons, channels and layers on calibration data.

    Args:
        model: checkpoint path / hub name / loaded model (not modified).
        data: calibration text (see :func:`minitron.data.load_texts`) or a PackedDataset.
        output_dir: when given, scores are saved there (``importance.safetensors``/``.json``, plus
            ``importance.png`` with ``plot``).
        seq_len: packing length (default: min(512, the model's max_position_embeddings)).
        batch_size, max_batches: calibration batches of ``batch_size`` sequences, at most ``max_batches``.
        seq_agg, batch_agg, layer_metrics, backend: see :func:`minitron.importance.estimate_importance`.

    Returns:
        :class:`minitron.importance.ImportanceScores`.
    """
    from minitron.importance import estimate_importance as _estimate

    config = _read_config(model)
    seq_len = _default_seq_len(seq_len, config)
    _check_data_arg("data", data)
    for name, v in (("batch_size", batch_size),):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}")
    out = None
    if output_dir is not None:
        out = check_output_dir(output_dir, overwrite=overwrite, inputs=[model] if _is_path(model) else [])
    dev = resolve_device(device)
    check_backends(dev, backend, ops=IMPORTANCE_OPS)
    module, tok, _ = _load(model, tokenizer)
    packed = load_packed(
        data, tok, seq_len=seq_len, text_column=text_column, split=split, dataset_config=dataset_config,
        max_tokens=max_tokens, drop_remainder=False, model_configs=[module.config],
    )
    batches = packed.batches(batch_size, max_batches=max_batches)
    orig_device = next(module.parameters()).device
    module.to(dev)
    t0 = time.time()
    try:
        scores = _estimate(module, batches, seq_agg=seq_agg, batch_agg=batch_agg, layer_metrics=tuple(layer_metrics),
                           progress=progress, backend=backend)
    finally:
        module.to(orig_device)
    log.info("importance: %d batches in %.1fs", len(batches), time.time() - t0)
    if out is not None:
        _prepare_output(out, overwrite=overwrite)
        scores.save(out, overwrite=True)
        if plot:
            try:
                scores.plot(out / "importance.png")
            except Exception as e:  # a plot never fails the command
                log.warning("could not plot importance: %s", e)
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
) -> torch.nn.Module:
    """Width- and/or depth-prune a model (width first, then depth) and optionally save it.

    Args:
        model: checkpoint path / hub name / loaded model. A loaded model is copied first unless
            ``inplace=True``.
        importance: ImportanceScores or the directory they were saved to (needed for width pruning and
            for depth pruning without ``layers_to_drop``); must come from this model.
        output_dir: save the pruned model (and tokenizer) there.
        hidden_size, intermediate_size, num_attention_heads, num_key_value_heads: width targets.
        num_hidden_layers, depth_metric, contiguous, layers_to_drop: depth target (see
            :func:`minitron.prune.prune_depth`).

    Returns:
        The pruned model.
    """
    from minitron.importance import ImportanceScores
    from minitron.prune import plan_depth, prune_depth, prune_width, validate_width_targets

    width = dict(hidden_size=hidden_size, intermediate_size=intermediate_size,
                 num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads)
    want_width = any(v is not None for v in width.values())
    want_depth = num_hidden_layers is not None
    if not want_width and not want_depth:
        raise ValueError(
            "no pruning target: give hidden_size / intermediate_size / num_attention_heads / "
            "num_key_value_heads and/or num_hidden_layers"
        )
    config = _read_config(model)
    validate_width_targets(config, **width)
    scores = importance
    if _is_path(importance):
        scores = ImportanceScores.load(importance)
    elif importance is not None and not isinstance(importance, ImportanceScores):
        raise TypeError(f"importance must be ImportanceScores or a directory, got {type(importance).__name__}")
    if want_width:
        if scores is None:
            raise ValueError("width pruning needs importance scores (importance=...)")
        scores.check_compatible(config)
    if want_depth:
        if layers_to_drop is None and scores is None:
            raise ValueError("depth pruning needs importance scores or layers_to_drop")
        plan_depth(config, num_hidden_layers=num_hidden_layers, scores=scores, metric=depth_metric,
                   contiguous=contiguous, layers_to_drop=layers_to_drop)
    out = None
    if output_dir is not None:
        out = check_output_dir(output_dir, overwrite=overwrite, inputs=[model] if _is_path(model) else [])
    if want_width:
        dev = next(model.parameters()).device if isinstance(model, torch.nn.Module) else torch.device("cpu")
        check_backends(dev, backend, ops=SLICING_OPS)
    module, tok, src = _load(model, tokenizer)
    if isinstance(model, torch.nn.Module) and not inplace:
        module = copy.deepcopy(module)
    before = count_parameters(module)
    if want_width:
        prune_width(module, scores, backend=backend, **width)
    if want_depth:
        prune_depth(module, num_hidden_layers=num_hidden_layers, scores=scores, metric=depth_metric,
                    contiguous=contiguous, layers_to_drop=layers_to_drop)
    after = count_parameters(module)
    log.info("pruned: %d -> %d parameters (%.1f%%)", before, after, 100.0 * after / before)
    if out is not None:
        from minitron.checkpoint import save_model

        save_model(module, out, tokenizer=tok, overwrite=overwrite, input_path=src)
    return module


# --------------------------------------------------------------------------------------------------
# training commands


def _finish_run(
    result: TrainResult, module: torch.nn.Module, tok: Any, out: Path, args: Dict[str, Any], src: Optional[str]
) -> TrainResult:
    from minitron.checkpoint import save_model

    model_dir = out / MODEL_SUBDIR
    save_model(module, model_dir, tokenizer=tok, overwrite=model_dir.exists(), input_path=src)
    result.extra["model_dir"] = str(model_dir)
    result.extra["model"] = module
    atomic_write_json(out / "run.json", {
        "args": args,
        "steps": result.steps,
        "final_train_loss": result.final_loss,
        "final_eval": result.final_eval,
        "elapsed_s": result.elapsed_s,
        "model": _model_info(module),
        "model_dir": str(model_dir),
    })
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
    from minitron.distill import correct_model

    cfg = _train_config(train, train_kwargs)
    config = _read_config(model)
    seq_len = _default_seq_len(seq_len, config)
    _check_data_arg("data", data)
    _check_data_arg("eval_data", eval_data, required=False)
    out = check_output_dir(output_dir, overwrite=overwrite, resume=resume, inputs=[model] if _is_path(model) else [])
    resolve_device(cfg.device)
    module, tok, src = _load(model, tokenizer)
    train_data, ev = _training_data(data, eval_data, tok, seq_len, [module.config], text_column=text_column,
                                    split=split, dataset_config=dataset_config, max_tokens=max_tokens,
                                    eval_split=eval_split, eval_max_tokens=eval_max_tokens)
    _prepare_output(out, overwrite=overwrite)
    info = {"model": _model_info(module), "data": train_data.description}
    result = correct_model(module, train_data, cfg, out, eval_data=ev, resume=resume, callbacks=callbacks,
                           run_info=info)
    args = {"command": "train_lm", "model": str(model) if _is_path(model) else "<module>", "seq_len": seq_len,
            "data": str(data) if _is_path(data) else "<object>", "train": cfg.to_dict()}
    return _finish_run(result, module, tok, out, args, src)


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
    teacher: ModelLike,
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
        teacher: the (corrected) teacher, frozen (path or module; not modified).
        data: distillation data (text source or PackedDataset).
        output_dir: run directory (final student in ``<output_dir>/model``).
        mode, temperature, beta, kl_weight, lm_loss_weight, chunk_size, kl_backend: see
            :class:`minitron.distill.DistillConfig`.
        train / **train_kwargs: a TrainConfig / dict and TrainConfig fields (steps, lr, batch_size,
            grad_accum, warmup_steps, eval_every, save_every, seed, bf16, device, ...).
        resume: continue an interrupted run in ``output_dir`` exactly.

    Returns:
        TrainResult (``result.extra["model"]`` is the student, ``["model_dir"]`` where it was saved).
    """
    from minitron.distill import DistillConfig, check_distillable, distill_model

    cfg = _train_config(train, train_kwargs)
    dcfg = DistillConfig(mode=mode, temperature=temperature, beta=beta, kl_weight=kl_weight,
                         lm_loss_weight=lm_loss_weight, chunk_size=chunk_size, backend=kl_backend)
    s_cfg, t_cfg = _read_config(student), _read_config(teacher)
    if int(s_cfg.vocab_size) != int(t_cfg.vocab_size):
        raise ValueError(
            f"student vocab_size ({s_cfg.vocab_size}) differs from the teacher's ({t_cfg.vocab_size}); "
            "they must share a tokenizer"
        )
    seq_len = _default_seq_len(seq_len, s_cfg, t_cfg)
    _check_data_arg("data", data)
    _check_data_arg("eval_data", eval_data, required=False)
    inputs = [x for x in (student, teacher) if _is_path(x)]
    out = check_output_dir(output_dir, overwrite=overwrite, resume=resume, inputs=inputs)
    dev = resolve_device(cfg.device)
    if dcfg.kl_weight > 0:
        check_backends(dev, kl_backend, ops=KL_OPS)
    s_mod, s_tok, s_src = _load(student, tokenizer)
    t_mod, t_tok, _ = _load(teacher, None)
    check_distillable(s_mod, t_mod)
    tok = s_tok if s_tok is not None else (t_tok if tokenizer is None else _load_tokenizer(tokenizer))
    train_data, ev = _training_data(data, eval_data, tok, seq_len, [s_mod.config, t_mod.config],
                                    text_column=text_column, split=split, dataset_config=dataset_config,
                                    max_tokens=max_tokens, eval_split=eval_split, eval_max_tokens=eval_max_tokens)
    _prepare_output(out, overwrite=overwrite)
    info = {"student": _model_info(s_mod), "teacher": _model_info(t_mod), "data": train_data.description}
    result = distill_model(s_mod, t_mod, train_data, cfg, dcfg, out, eval_data=ev, resume=resume,
                           callbacks=callbacks, run_info=info)
    args = {"command": "distill", "student": str(student) if _is_path(student) else "<module>",
            "teacher": str(teacher) if _is_path(teacher) else "<module>", "seq_len": seq_len,
            "data": str(data) if _is_path(data) else "<object>", "train": cfg.to_dict(), "distill": dcfg.to_dict()}
    return _finish_run(result, s_mod, tok, out, args, s_src)


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
) -> Dict[str, Any]:
    """Token-weighted perplexity (padding excluded) of a model on a dataset split.

    Args:
        model: checkpoint path / training output dir / hub name / loaded model.
        data: text source (see :func:`minitron.data.load_texts`) or PackedDataset; packed into
            ``seq_len`` sequences, the last one padded (its padding excluded), at most ``max_tokens``.
        output: also write the result as JSON there (refused if it exists, unless ``overwrite``).

    Returns:
        ``{"loss", "ppl", "tokens", "sequences", "seq_len", "model", "data"}``.
    """
    from minitron.evaluate import perplexity

    config = _read_config(model)
    seq_len = _default_seq_len(seq_len, config)
    _check_data_arg("data", data)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if output is not None:
        op = Path(output)
        if op.is_dir():
            raise ValueError(f"output {str(op)!r} is a directory; give a JSON file path")
        if op.exists() and not overwrite:
            from minitron.checkpoint import OutputExistsError

            raise OutputExistsError(f"output file {str(op)!r} already exists; pass --overwrite to replace it")
    dev = resolve_device(device)
    module, tok, _ = _load(model, tokenizer)
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
                "model": str(model) if _is_path(model) else type(module).__name__})
    log.info("perplexity %.3f (loss %.4f) over %d tokens", res["ppl"], res["loss"], res["tokens"])
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(output, res)
    return res
