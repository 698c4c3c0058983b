"""Shard-streamed pruning: prune a checkpoint on disk one tensor at a time (models larger than memory).

:func:`prune_checkpoint_streaming` reads every input tensor (memory-mapped, one at a time), cuts it with
:func:`minitron.ops.gather_slices` using the same per-parameter cut plan as the in-memory
:func:`~minitron.compress.prune.prune_width` (:func:`~minitron.compress.prune.width_cut_plan`, derived
from the config's model built on the ``meta`` device), renames the layers kept by depth pruning, and
writes it at once into sharded safetensors (:class:`~minitron.io.shards.ShardedWriter`). Peak memory is
about the largest input tensor plus its cut copy (the embedding), whatever the model size. The output is
tensor-for-tensor identical to the in-memory path's (``prune_width`` / ``prune_depth`` then
``save_model``), with the same config.json and generation_config.json and the tokenizer files copied byte
for byte; it loads with plain transformers.

Safety: the input is validated completely (:meth:`~minitron.io.shards.ShardedCheckpoint.validate`) and the
targets, the output path and the free disk space are checked before anything is written; the output is
written into a hidden temporary sibling and renamed into place only when complete, so a failure leaves
no half-written checkpoint (and, with ``overwrite``, the previous output intact).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from minitron.compress.importance import ImportanceScores
from minitron.compress.prune import (Cut, _check_slicing_backend, apply_cuts, apply_width_transforms,
                                     depth_config_update, layer_rename, plan_depth, plan_width,
                                     update_pruning_record, width_config_update, width_cut_plan)
from minitron.compress.moe_layout import CheckpointView, expert_disk_cuts, validate_checkpoint
from minitron.io.checkpoint import copy_tokenizer_files
from minitron.io.files import make_temp_dir, normalize_permissions, publish_dir, remove_stale_temporaries
from minitron.io.safety import check_output_dir
from minitron.io.shards import DEFAULT_SHARD_BYTES, ShardedCheckpoint, ShardedWriter
from minitron.models import get_adapter

log = logging.getLogger(__name__)

__all__ = ["prune_checkpoint_streaming", "should_stream_prune", "random_importance", "streamed_output_layout"]

PathLike = Union[str, os.PathLike]
_WIDTH_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
_MOE_KEYS = ("num_experts", "moe_intermediate_size", "shared_expert_intermediate_size")
_MAMBA_KEYS = ("mamba_num_heads", "mamba_head_dim")


def random_importance(config: Any, seed: int = 0) -> ImportanceScores:
    """Random importance scores of the right shapes for ``config`` (benchmarks and tests only)."""
    adapter = get_adapter(config)
    d = adapter.dims(config)
    g = torch.Generator().manual_seed(seed)
    L = d.num_hidden_layers
    heads = torch.rand(L, d.num_attention_heads, generator=g)
    kv = heads.view(L, d.num_key_value_heads, d.heads_per_group).sum(-1)
    moe: dict = {}
    m = adapter.moe_dims(config)
    if m is not None:
        moe = {"experts": torch.rand(L, m.num_experts, generator=g),
               "expert_frequency": torch.rand(L, m.num_experts, generator=g),
               "expert_neurons": torch.rand(L, m.num_experts, m.moe_intermediate_size, generator=g),
               "shared_neurons": None if m.shared_expert_intermediate_size is None else
               torch.rand(L, m.shared_expert_intermediate_size, generator=g)}
    extra = adapter.extra_width_sizes(config)
    if "mamba_num_heads" in extra:  # hybrid Mamba models (Nemotron-H)
        moe["mamba_heads"] = torch.rand(L, extra["mamba_num_heads"], generator=g)
        moe["mamba_channels"] = torch.rand(L, extra["mamba_num_heads"], extra["mamba_head_dim"], generator=g)
    return ImportanceScores(
        heads=heads, kv_groups=kv, neurons=torch.rand(L, d.intermediate_size, generator=g),
        channels=torch.rand(d.hidden_size, generator=g), block_influence=torch.rand(L, generator=g),
        lm_loss_drop=None,
        meta={"model_type": adapter.model_type, "config_fingerprint": adapter.fingerprint(config), "random": True},
        **moe,
    )


def _meminfo_available() -> Optional[int]:
    from minitron.runtime import available_memory_bytes

    return available_memory_bytes()


def should_stream_prune(src_dir: PathLike, *, fraction: float = 0.5) -> tuple[bool, str]:
    """Whether pruning ``src_dir`` should stream, and why: :func:`minitron.compress.streaming.should_stream` on
    the weights in their stored dtype (the in-memory path holds the whole model plus one layer's cut copies)."""
    from minitron.compress.streaming import should_stream

    return should_stream(src_dir, compute_dtype=None, fraction=fraction, available=_meminfo_available(),
                         task="pruning")


def _cut_shape(shape: tuple[int, ...], cuts: Sequence[Cut]) -> tuple[int, ...]:
    s = tuple(shape)
    for c in cuts:
        s = c.shape_after(s)
    return s


def _rename(name: str, renames: dict[str, Optional[str]]) -> Optional[str]:
    for old, new in renames.items():
        if name.startswith(old):
            return None if new is None else new + name[len(old):]
    return name


def streamed_output_layout(
    ckpt: ShardedCheckpoint, cut_plan: dict[str, list[Cut]], renames: dict[str, Optional[str]],
    exact: Optional[dict[str, Optional[str]]] = None,
) -> list[tuple[str, str, tuple[int, ...], torch.dtype]]:
    """``[(input name, output name, output shape, dtype)]`` in input file order (dropped layers left out).

    ``exact`` renames single tensors first (None: dropped; MoE experts renumbered after expert pruning), then
    ``renames`` renames name prefixes (the layers kept by depth pruning)."""
    out = []
    exact = exact or {}
    for name in ckpt.keys():
        new = exact.get(name, name)
        if new is None:
            continue
        new = _rename(new, renames)
        if new is None:
            continue
        out.append((name, new, _cut_shape(ckpt.shape(name), cut_plan.get(name, [])), ckpt.dtype(name)))
    return out


def _resolve_depth(config: Any, keep_layers: Optional[Sequence[int]], drop_layers: Optional[Sequence[int]]) -> list[int]:
    """The kept layer indices (validated by :func:`plan_depth`)."""
    L = get_adapter(config).dims(config).num_hidden_layers
    if keep_layers is not None and drop_layers is not None:
        raise ValueError("give keep_layers or drop_layers, not both")
    if keep_layers is None and drop_layers is None:
        return list(range(L))
    if keep_layers is not None:
        if isinstance(keep_layers, (str, bytes)) or not hasattr(keep_layers, "__iter__"):
            raise TypeError(f"keep_layers must be a sequence of layer indices, got {type(keep_layers).__name__}")
        keep = list(keep_layers)
        for i in keep:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < L:
                raise ValueError(f"keep_layers: {i!r} is not a layer index in [0, {L})")
        if len(set(keep)) != len(keep) or not keep:
            raise ValueError(f"keep_layers must be non-empty without duplicates, got {keep}")
        drop = [i for i in range(L) if i not in set(keep)]
    else:
        drop = list(drop_layers)  # type: ignore[arg-type]
    dropped = plan_depth(config, num_hidden_layers=L - len(drop), layers_to_drop=drop) if drop else []
    return [i for i in range(L) if i not in set(dropped)]


def prune_checkpoint_streaming(
    src_dir: PathLike,
    dst_dir: PathLike,
    *,
    scores: Optional[ImportanceScores] = None,
    width_targets: Optional[dict[str, Optional[int]]] = None,
    keep_layers: Optional[Sequence[int]] = None,
    drop_layers: Optional[Sequence[int]] = None,
    shard_bytes: Union[int, float] = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    backend: str = "auto",
    progress: bool = True,
) -> Path:
    """Width- and/or depth-prune the checkpoint ``src_dir`` into ``dst_dir``, one tensor at a time.

    Equivalent to loading the model, ``prune_width(model, scores, **width_targets)``, then
    ``prune_depth(model, layers_to_drop=...)`` and ``save_model(model, dst_dir)`` (tensor-for-tensor
    identical output, same config), with memory for one tensor (and its cut copy) instead of the model.

    Args:
        src_dir: input checkpoint folder (single ``model.safetensors`` or index + shards; never modified).
        dst_dir: output folder; refused if it exists unless ``overwrite``; may not be/contain/lie in src_dir.
        scores: importance of the input model (required when a width target changes a size).
        width_targets: any of hidden_size, intermediate_size, num_attention_heads, num_key_value_heads
            (the keywords of :func:`~minitron.compress.prune.plan_width`); None = no width pruning.
        keep_layers / drop_layers: input layer indices to keep / drop (depth pruning); at most one.
        shard_bytes: output shard size limit in bytes (transformers' 5 GB by default).
        overwrite: replace an existing ``dst_dir`` (only once the new one is complete).
        backend: backend of :func:`minitron.ops.gather_slices`.
        progress: log progress (every decoder layer) at INFO level.
    Returns:
        ``dst_dir`` as a Path.
    Raises:
        CorruptFileError / CheckpointError: a bad input (file named), before anything is written.
        ValueError / TypeError: bad targets, output path or too little disk space, before anything is written.
        OutputExistsError: ``dst_dir`` exists and not ``overwrite``.
    """
    t0 = time.perf_counter()
    if width_targets is not None:
        if not isinstance(width_targets, dict):
            raise TypeError(f"width_targets must be a dict or None, got {type(width_targets).__name__}")
        unknown = set(width_targets) - set(_WIDTH_KEYS) - set(_MOE_KEYS) - set(_MAMBA_KEYS)
        if unknown:
            raise TypeError(f"unknown width target(s) {sorted(unknown)}; expected {_WIDTH_KEYS + _MOE_KEYS + _MAMBA_KEYS}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    src = Path(src_dir)
    ckpt = validate_checkpoint(ShardedCheckpoint(src))
    out = check_output_dir(dst_dir, overwrite=overwrite, inputs={"src_dir": src}, what="dst_dir")
    p = _plan_streamed_prune(ckpt, scores, width_targets, keep_layers, drop_layers)
    for dt in {dt for _, _, _, dt in p.layout}:
        _check_slicing_backend(backend, torch.device("cpu"), dt)
    out_bytes = sum(dt.itemsize * int(torch.Size(s).numel()) for _, _, s, dt in p.layout)
    estimate = out_bytes + (1 << 20) * (1 + out_bytes // int(shard_bytes)) + sum(
        f.stat().st_size for f in src.iterdir() if f.is_file() and not f.name.endswith(".safetensors"))
    check_output_dir(out, overwrite=overwrite, inputs={"src_dir": src}, what="dst_dir", estimated_bytes=estimate)
    log.info("streamed pruning %s -> %s: %d -> %d tensors, %.2f -> %.2f GiB (%s)", src, out, len(ckpt.keys()),
             len(p.layout), ckpt.nbytes / 2**30, out_bytes / 2**30,
             {k: getattr(p.new_config, k) for k in _WIDTH_KEYS + ("num_hidden_layers",)})

    # ---- write into a hidden sibling, publish when complete
    remove_stale_temporaries(out)
    tmp = make_temp_dir(out)
    try:
        _write_tensors(ckpt, p, tmp, int(shard_bytes), backend, t0 if progress else None)
        p.new_config.save_pretrained(str(tmp))
        _save_generation_config(src, p.config, tmp)
        copy_tokenizer_files(src, tmp)
        normalize_permissions(tmp)
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("streamed pruning wrote %s (%.2f GiB) in %.1f s", out, out_bytes / 2**30, time.perf_counter() - t0)
    return out


@dataclasses.dataclass
class _StreamedPrunePlan:
    """What a streamed prune writes: the input config, the output config, ``(name, new name, shape, dtype)`` per
    output tensor, the cuts per input tensor, and the name prefix of the decoder layers (for progress)."""

    config: Any
    new_config: Any
    layout: list
    cut_plan: dict
    layer_prefix: str
    transforms: dict = dataclasses.field(default_factory=dict)


def _plan_streamed_prune(ckpt: ShardedCheckpoint, scores: Optional[ImportanceScores],
                         width_targets: Optional[dict[str, Optional[int]]], keep_layers: Optional[Sequence[int]],
                         drop_layers: Optional[Sequence[int]]) -> _StreamedPrunePlan:
    """Plan the width and depth cuts on a meta-device skeleton (all validation, nothing written)."""
    config = copy.deepcopy(ckpt.config)
    adapter = get_adapter(config)
    d = adapter.dims(config)
    plan = plan_width(config, scores, **{k: v for k, v in (width_targets or {}).items() if v is not None})
    width_changes = plan.changes
    kept = _resolve_depth(config, keep_layers, drop_layers)
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    model_cuts = width_cut_plan(skeleton, plan) if width_changes else {}
    # model names -> the checkpoint's names (MoE: per-expert 2-D tensors on disk, fused 3-D in memory)
    view = CheckpointView(skeleton, ckpt.keys())
    cut_plan = {view.alias.get(n, n): c for n, c in model_cuts.items() if n not in view.stacked}
    exact: dict[str, Optional[str]] = {}
    if view.experts and width_changes:
        expert_cuts, exact = expert_disk_cuts(view, plan, plan.hidden)
        cut_plan.update(expert_cuts)
    missing = sorted(n for n in cut_plan if n not in set(ckpt.keys()))
    if missing:
        raise ValueError(f"checkpoint {str(ckpt.path)!r}: width pruning would cut tensors it does not hold "
                         f"({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}); streamed pruning does not "
                         f"support this {adapter.model_type} checkpoint layout (prune it in memory)")
    names = {id(m): n for n, m in skeleton.named_modules()}
    prefix = names[id(adapter.layers(skeleton))]
    disk_prefix = adapter.checkpoint_name(prefix)  # Nemotron-H saves the decoder as backbone.*
    if disk_prefix != prefix and any(k.startswith(disk_prefix + ".") for k in ckpt.keys()):
        prefix = disk_prefix
    renames = layer_rename(prefix, d.num_hidden_layers, kept) if len(kept) != d.num_hidden_layers else {}
    del skeleton
    new_config = copy.deepcopy(config)
    transforms: dict = {}
    if width_changes:
        update_pruning_record(new_config, kept_channels=plan.hidden)
        width_config_update(new_config, plan, d.head_dim)
        transforms = {view.alias.get(n, n): fn for n, fn in adapter.width_transforms(config, new_config).items()}
        unknown = [n for n in transforms if n not in ckpt.keys()]
        if unknown:
            raise RuntimeError(f"{adapter!r}.width_transforms names no tensor of the checkpoint: {unknown}")
    if renames:
        update_pruning_record(new_config, kept_layers=kept)
        depth_config_update(new_config, kept)
    adapter.check_config(new_config)
    layout = streamed_output_layout(ckpt, cut_plan, renames, exact)
    if not layout:
        raise ValueError(f"checkpoint {str(ckpt.path)!r}: nothing to write")
    return _StreamedPrunePlan(config, new_config, layout, cut_plan, prefix, transforms)


def _write_tensors(ckpt: ShardedCheckpoint, p: _StreamedPrunePlan, tmp: Path, shard_bytes: int, backend: str,
                   t0: Optional[float]) -> None:
    """Read, cut and write every output tensor into shards under ``tmp``; progress is logged per decoder layer
    when ``t0`` (the start time) is given."""
    layout, prefix = p.layout, p.layer_prefix
    writer = ShardedWriter(tmp, max_shard_bytes=shard_bytes, layout=[(n, s, dt) for _, n, s, dt in layout])
    last_layer = None
    # one writer thread overlaps writing (and fsync) tensor i with reading and cutting tensor i + 1
    # (file writes and the cut release the GIL); at most one tensor waits, so memory stays ~2 tensors
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="minitron-shard-writer") as pool:
        pending: Optional[Future] = None
        for i, (name, new_name, _, _) in enumerate(layout):
            t = ckpt.get(name)
            cuts = p.cut_plan.get(name)
            if cuts:
                with torch.no_grad():
                    t = apply_cuts([t], [cuts], backend)[0]
            if name in p.transforms:
                with torch.no_grad():
                    t = apply_width_transforms({name: t}, p.transforms)[name]
            if pending is not None:
                pending.result()
            pending = pool.submit(writer.add, new_name, t)
            del t
            if t0 is not None and name.startswith(prefix + "."):
                layer = name[len(prefix) + 1:].split(".", 1)[0]
                if layer != last_layer:
                    last_layer = layer
                    log.info("streamed pruning: layer %s (%d/%d tensors, %.0f s)", layer, i + 1, len(layout),
                             time.perf_counter() - t0)
        if pending is not None:
            pending.result()
    writer.close()


def _save_generation_config(src: Path, config: Any, dst: Path) -> None:
    """Write the generation config the in-memory path's ``save_pretrained`` would write."""
    from transformers import GenerationConfig

    if (src / "generation_config.json").is_file():
        gen = GenerationConfig.from_pretrained(str(src))
    else:
        gen = GenerationConfig.from_model_config(config)
    gen.save_pretrained(str(dst))
