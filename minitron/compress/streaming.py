"""Layer-streamed importance: estimate importance of a checkpoint larger than memory, one decoder layer at a time.

:func:`estimate_importance_streaming` holds one decoder layer's weights at a time (two while a helper
thread reads and casts the next layer, ``prefetch=True``):

1. the model skeleton is built on the ``meta`` device from the checkpoint's config (no memory); the
   embedding and the final norm are loaded from the memory-mapped safetensors shards, the rotary
   embedding is rebuilt on the CPU (its buffers are not in the checkpoint);
2. every calibration batch is run once through the *base model's own forward* with recorders in place of
   the decoder layers: each recorder keeps the arguments that layer gets (rotary ``position_embeddings``,
   the causal / sliding-window mask of that layer's type, ``position_ids``, ...), and layer 0's recorder
   keeps the embedding output. This is family-independent: whatever the family's forward passes its layers
   is what the streamed layers get;
3. each decoder layer in turn is loaded (tensors cast to ``compute_dtype``), run on every batch with the
   same hooks and fused accumulators as :func:`~minitron.compress.importance.estimate_importance`
   (heads, neurons, embedding channels, block influence), its outputs replace its inputs, and it is freed;
4. the final norm (and, for the ``lm_loss`` metric, the LM head) runs on the last hidden states.

LM-loss-drop depth scores stay exact: besides the main stream, the streamed path keeps one *skip stream*
per layer ``d`` (the hidden states of the model with layer ``d`` replaced by the identity), started at
layer ``d`` from the main stream's input and run through every later layer while that layer is loaded
(hooks off). At the end each stream goes through the final norm and the LM head. That is one load per
layer and ``L (L + 1) / 2`` layer passes per batch (the in-memory path does ``L**2``), at the cost of up
to ``L + 1`` sets of hidden states (spilled to disk when they do not fit).

Hidden states stay in memory while they fit in ``max_hidden_bytes``; otherwise they live in memory-mapped
files in ``spill_dir`` (removed at the end).

With the same data and ``compute_dtype`` equal to the in-memory model's dtype the scores are bitwise those
of the in-memory path (same kernels, same order of accumulation per accumulator).
"""
from __future__ import annotations

import math
import logging
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

from minitron.compress.importance import (ImportanceScores, _args_fingerprint, _assemble_scores, _batch_tokens,
                                          _check_estimation_args, _Collector, _data_fingerprint, _drops_from_sums,
                                          _first_tensor, _lm_loss_sums, _log_depth_cost, _output_tensor,
                                          _reduce_counts, _reduce_loss_sums, _validate_batch, check_depth_max_tokens,
                                          depth_batch_count, depth_token_budget, shape_signature)
from minitron.io.shards import ShardedCheckpoint
from minitron.models import get_adapter

log = logging.getLogger(__name__)

__all__ = ["estimate_importance_streaming", "StreamOptions", "should_stream", "choose_compute_dtype", "CheckpointReader",
           "STREAM_MEMORY_FRACTION"]

#: :func:`should_stream` streams when the compute copy of the weights exceeds this fraction of MemAvailable.
STREAM_MEMORY_FRACTION = 0.5
#: Default ``max_hidden_bytes``: this fraction of MemAvailable at the start of the run.
HIDDEN_MEMORY_FRACTION = 0.25


# ---------------------------------------------------------------------------------------------- reader
#: The checkpoint reader of the streamed path: the one safetensors reader of the package,
#: :class:`minitron.io.shards.ShardedCheckpoint` (``config``, ``keys()``, ``get(name)``, ``shape(name)``,
#: ``file_of(name)``; a missing folder, config, weight file or shard raises an error that is both a ValueError
#: and a FileNotFoundError). Kept under this name for existing callers.
CheckpointReader = ShardedCheckpoint


def _final_logits(config: Any, logits: torch.Tensor) -> torch.Tensor:
    """The LM head's output as the model's forward returns it: ``final_logit_softcapping`` (Gemma-2/3) applied as
    ``cap * tanh(logits / cap)`` when the config sets it."""
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap


def _mem_available() -> int:
    """MemAvailable in bytes, or total physical memory where /proc/meminfo cannot be read."""
    from minitron.runtime import available_memory_bytes

    avail = available_memory_bytes()
    return avail if avail is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def should_stream(checkpoint_dir: str | os.PathLike, *, compute_dtype: Optional[torch.dtype] = torch.float32,
                  fraction: float = STREAM_MEMORY_FRACTION, available: Optional[int] = None,
                  task: str = "importance") -> tuple[bool, str]:
    """The one streaming policy of the driver (streamed importance and streamed pruning).

    Streams when the in-memory copy of the weights (every tensor in ``compute_dtype``, or in its stored dtype
    when ``compute_dtype`` is None) would exceed ``fraction`` (:data:`STREAM_MEMORY_FRACTION`, one half) of the
    memory available now (``available`` bytes, default ``MemAvailable``; where it cannot be read, nothing streams).
    Reads only the checkpoint's headers (:class:`minitron.io.shards.ShardedCheckpoint`).

    Returns:
        ``(stream, reason)``: the decision and a one-line reason with the figures (for the log).
    """
    from minitron.io.shards import ShardedCheckpoint

    ck = ShardedCheckpoint(checkpoint_dir)
    if compute_dtype is None:
        need, what = ck.nbytes, "weights"
    else:
        elem = torch.empty((), dtype=compute_dtype).element_size()
        need = sum(math.prod(ck.shape(k)) for k in ck.keys()) * elem
        what = f"the {str(compute_dtype).replace('torch.', '')} copy of the weights"
    modes = {"importance": ("layer-streamed importance", "in-memory importance"),
             "pruning": ("streaming tensor by tensor", "pruning in memory")}[task]
    avail = _mem_available() if available is None else available
    gib = 1024 ** 3
    if avail is None:
        return False, f"{what} {need / gib:.2f} GiB; available memory unknown: {modes[1]}"
    limit = int(avail * fraction)
    verdict = need > limit
    reason = (f"{what} needs {need / gib:.2f} GiB, {'more' if verdict else 'not more'} than {fraction:.0%} of the "
              f"{avail / gib:.2f} GiB available ({limit / gib:.2f} GiB): {modes[0] if verdict else modes[1]}")
    return verdict, reason


def _checkpoint_float_dtype(reader: Any) -> torch.dtype:
    """The dtype of the checkpoint's floating-point weights (from its config, else its first float tensor)."""
    d = getattr(reader.config, "dtype", None) or getattr(reader.config, "torch_dtype", None)
    if isinstance(d, str):
        d = getattr(torch, d, None)
    if isinstance(d, torch.dtype) and d.is_floating_point:
        return d
    for name in reader.keys():
        t = reader.get(name)
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def _mm_rate(dtype: torch.dtype, m: int, k: int, n: int, repeats: int = 3) -> float:
    """Best-of-``repeats`` ``torch.mm`` rate in GFLOP/s for ``[m, k] x [k, n]`` in ``dtype`` (CPU)."""
    a = torch.randn(m, k).to(dtype)
    b = torch.randn(k, n).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2.0 * m * k * n / best / 1e9


def choose_compute_dtype(checkpoint_dir: str | os.PathLike, *, reader: Any = None,
                         speedup: float = 1.5) -> tuple[torch.dtype, str]:
    """Pick the dtype streamed layers are computed in: where this CPU is fast.

    A checkpoint stored in bf16/fp16 is computed in that dtype when a GEMM in it runs at least ``speedup``
    times faster than in fp32 on this machine (CPUs with AMX / AVX512-BF16 units; measured now, a few tens
    of milliseconds), else in fp32 (CPUs without such units run bf16 GEMMs several times slower than fp32).
    An fp32 checkpoint is computed in fp32. The accumulators are fp32 in every case.

    Returns:
        ``(dtype, reason)`` with the measured rates in the reason (for the log).
    """
    reader = reader if reader is not None else CheckpointReader(checkpoint_dir)
    stored = _checkpoint_float_dtype(reader)
    name = str(stored).replace("torch.", "")
    if stored == torch.float32 or stored == torch.float64:
        return torch.float32, f"the checkpoint is {name}: computing in float32"
    k = min(int(getattr(reader.config, "hidden_size", 1024)), 2048)
    fp32 = _mm_rate(torch.float32, 256, k, k)
    low = _mm_rate(stored, 256, k, k)
    if low >= speedup * fp32:
        return stored, (f"{name} GEMM runs at {low:.0f} GFLOP/s vs {fp32:.0f} in float32 on this CPU: "
                        f"computing in {name}")
    return torch.float32, (f"{name} GEMM runs at {low:.0f} GFLOP/s vs {fp32:.0f} in float32 on this CPU: "
                           "computing in float32")


# ---------------------------------------------------------------------------------------------- hidden states
class _HiddenStore:
    """Hidden states ``[B, S, H]`` of every batch, for several streams (main + skip streams).

    In memory (a dict of tensors) or, when ``spill_dir`` is given, in one memory-mapped file per stream.
    """

    def __init__(self, shapes: list[tuple[int, int, int]], dtype: torch.dtype, spill_dir: Optional[Path]) -> None:
        self.shapes = shapes
        self.dtype = dtype
        self.spill_dir = spill_dir
        self.offsets: list[int] = []
        total = 0
        for s in shapes:
            self.offsets.append(total)
            total += s[0] * s[1] * s[2]
        self.total = total
        self._mem: dict[tuple[int, int], torch.Tensor] = {}
        self._files: dict[int, torch.Tensor] = {}

    @property
    def spilled(self) -> bool:
        return self.spill_dir is not None

    def _file(self, stream: int) -> torch.Tensor:
        t = self._files.get(stream)
        if t is None:
            assert self.spill_dir is not None
            path = self.spill_dir / f"stream{stream}.bin"
            t = torch.from_file(str(path), shared=True, size=max(self.total, 1), dtype=self.dtype)
            self._files[stream] = t
        return t

    def get(self, stream: int, i: int) -> torch.Tensor:
        if not self.spilled:
            return self._mem[(stream, i)]
        b, s, h = self.shapes[i]
        off = self.offsets[i]
        return self._file(stream)[off: off + b * s * h].view(b, s, h)

    def put(self, stream: int, i: int, value: torch.Tensor) -> None:
        if not self.spilled:
            self._mem[(stream, i)] = value.contiguous()
        else:
            self.get(stream, i).copy_(value)

    def drop(self, stream: int) -> None:
        for key in [k for k in self._mem if k[0] == stream]:
            del self._mem[key]
        t = self._files.pop(stream, None)
        if t is not None:
            del t
            assert self.spill_dir is not None
            (self.spill_dir / f"stream{stream}.bin").unlink(missing_ok=True)

    def close(self) -> None:
        self._mem.clear()
        self._files.clear()


class _Stop(Exception):
    """Raised by the last layer recorder: the rest of the base model's forward is not needed."""


class _Recorder(nn.Module):
    """Stands in for decoder layer ``index``: records the arguments it gets and passes hidden states on."""

    def __init__(self, index: int, last: bool, sink: list) -> None:
        super().__init__()
        self.index, self.last, self.sink = index, last, sink

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        h = _first_tensor(args, kwargs, "hidden_states")
        rest_args = tuple(args[1:]) if args and isinstance(args[0], torch.Tensor) else tuple(args)
        rest_kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        self.sink.append((self.index, h, rest_args, rest_kwargs))
        if self.last:
            raise _Stop
        return h


# ---------------------------------------------------------------------------------------------- model skeleton
def _build_skeleton(config: Any, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _key_set(reader: Any) -> frozenset:
    """The reader's tensor names (cached on the reader object when it allows attributes)."""
    keys = getattr(reader, "_minitron_key_set", None)
    if keys is None:
        keys = frozenset(reader.keys())
        try:
            reader._minitron_key_set = keys
        except AttributeError:
            pass
    return keys


def _read_state(module: nn.Module, prefix: str, reader: Any, dtype: torch.dtype,
                aliases: Optional[Mapping[str, str]] = None) -> dict[str, torch.Tensor]:
    """Read (and cast to ``dtype``) every parameter/persistent buffer of ``module`` from the checkpoint.

    Uses only ``reader.keys()`` and ``reader.get(name)``. Checks each tensor's presence and shape against
    the skeleton; errors name the tensor and its file.
    """
    aliases = aliases or {}
    available = _key_set(reader)
    state: dict[str, torch.Tensor] = {}
    for name, ref in module.state_dict(keep_vars=True).items():
        key = prefix + name
        src_key = key if key in available else aliases.get(key, key)
        if src_key not in available:
            raise ValueError(f"the checkpoint {str(getattr(reader, 'path', '?'))!r} has no tensor {key!r}, which "
                             f"the {type(module).__name__} of this config needs")
        t = reader.get(src_key)
        if tuple(t.shape) != tuple(ref.shape):
            where = getattr(reader, "file_of", lambda n: "?")(src_key)
            raise ValueError(f"checkpoint tensor {src_key!r} in {str(where)!r} has shape {tuple(t.shape)}, but the "
                             f"config makes it {tuple(ref.shape)}")
        state[name] = t.to(dtype) if t.is_floating_point() else t
    return state


def _assign_state(module: nn.Module, prefix: str, state: dict[str, torch.Tensor]) -> None:
    """Put ``state`` (from :func:`_read_state`) into the meta ``module`` without copying."""
    module.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"{prefix or 'module'}: tensors {left} have no value after loading (not in the checkpoint)")


def _load_module(module: nn.Module, prefix: str, reader: Any, dtype: torch.dtype,
                 aliases: Optional[Mapping[str, str]] = None) -> None:
    """Materialise every parameter/persistent buffer of ``module`` from the checkpoint (cast to ``dtype``)."""
    _assign_state(module, prefix, _read_state(module, prefix, reader, dtype, aliases))


def _check_checkpoint(model: nn.Module, reader: Any, aliases: Mapping[str, str]) -> None:
    """Before any work: every tensor the skeleton needs is in the checkpoint, with the config's shape.

    Shapes are compared when the reader offers ``shape(name)`` (header only); otherwise each tensor's shape
    is checked when its layer is loaded.
    """
    if isinstance(reader, _ViewReader):
        _check_view_checkpoint(model, reader)
        return
    available = _key_set(reader)
    shape_of = getattr(reader, "shape", None)
    missing, wrong = [], []
    for name, ref in model.state_dict(keep_vars=True).items():
        src = name if name in available else aliases.get(name, name)
        if src not in available:
            missing.append(name)
        elif callable(shape_of):
            got = tuple(shape_of(src))
            if got != tuple(ref.shape):
                where = getattr(reader, "file_of", lambda n: "?")(src)
                wrong.append(f"{src!r} in {str(where)!r} has shape {got}, the config makes it {tuple(ref.shape)}")
    where = str(getattr(reader, "path", "the checkpoint"))
    if missing:
        raise ValueError(f"the checkpoint {where!r} lacks tensors this config needs: {', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}")
    if wrong:
        raise ValueError(f"checkpoint tensor {wrong[0]}" + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""))


def _check_view_checkpoint(model: nn.Module, reader: "_ViewReader") -> None:
    """:func:`_check_checkpoint` for a checkpoint saved in another layout (MoE: one tensor per expert): every
    tensor the model is assembled from is present with its shape."""
    inner = reader.reader
    available = _key_set(inner)
    shape_of = getattr(inner, "shape", None)
    expected = reader.view.expected_shapes(model)
    where = str(getattr(inner, "path", "the checkpoint"))
    missing = [k for k in expected if k not in available]
    if missing:
        raise ValueError(f"the checkpoint {where!r} lacks tensors this config needs: {', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}")
    if callable(shape_of):
        for k, shape in expected.items():
            got = tuple(shape_of(k))
            if got != tuple(shape):
                file = getattr(inner, "file_of", lambda n: "?")(k)
                raise ValueError(f"checkpoint tensor {k!r} in {str(file)!r} has shape {got}, the config makes it "
                                 f"{tuple(shape)}")


def _free_module(module: nn.Module) -> None:
    """Send the module's tensors back to the meta device (frees their memory; hooks stay attached)."""
    module.to("meta")


def _materialise_buffers(model: nn.Module, skip: Sequence[nn.Module]) -> None:
    """Rebuild on the CPU the parameter-less modules whose buffers are computed from the config (rotary)."""
    skip_names = [n for n, m in model.named_modules() if n and any(m is k for k in skip)]
    for name, module in list(model.named_modules()):
        if not name or any(name == k or name.startswith(k + ".") for k in skip_names):
            continue
        own_buffers = [b for b in module.buffers(recurse=False)]
        if not own_buffers or not any(b.is_meta for b in own_buffers) or any(True for _ in module.parameters(recurse=False)):
            continue
        try:
            with torch.device("cpu"):
                fresh = type(module)(config=model.config)
        except TypeError as e:
            raise TypeError(f"cannot rebuild the buffers of {name} ({type(module).__name__}) for streaming: {e}") from None
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, fresh)


# ---------------------------------------------------------------------------------------------- estimation
@dataclass
class StreamOptions:
    """How :func:`estimate_importance_streaming` reads the checkpoint and keeps the hidden states.

    Attributes:
        compute_dtype: dtype of each loaded layer and of the hidden states (default fp32: fast on CPUs
            without bf16 units; the accumulators are fp32 in any case). Floating-point dtypes only.
        spill_dir: directory for memory-mapped hidden-state files when they exceed ``max_hidden_bytes``
            (default: the system temporary directory). A private subdirectory is created and removed.
        max_hidden_bytes: keep hidden states in memory up to this many bytes (default 25% of the memory
            available at the start); ``0`` always spills.
        reader: an object with ``config`` (transformers config), ``keys()`` and ``get(name) -> Tensor``
            reading the checkpoint (default :class:`CheckpointReader` of ``checkpoint_dir``, which is
            then not used otherwise).
        prefetch: read and cast layer ``l + 1`` in a helper thread while layer ``l`` runs (hides the
            read/cast time; at most two decoder layers in memory). ``False``: one layer at a time.
    """

    compute_dtype: torch.dtype = torch.float32
    spill_dir: Optional[str | os.PathLike] = None
    max_hidden_bytes: Optional[int] = None
    reader: Any = None
    prefetch: bool = True

    def check(self) -> None:
        """TypeError/ValueError naming the bad setting."""
        dt, mhb, sd = self.compute_dtype, self.max_hidden_bytes, self.spill_dir
        if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
            raise TypeError(f"compute_dtype must be a floating-point torch.dtype, got {dt!r}")
        if mhb is not None and (isinstance(mhb, bool) or not isinstance(mhb, int) or mhb < 0):
            raise ValueError(f"max_hidden_bytes must be a non-negative int or None, got {mhb!r}")
        if sd is not None and not isinstance(sd, (str, os.PathLike)):
            raise TypeError(f"spill_dir must be a path or None, got {type(sd).__name__}")
        if sd is not None and not Path(sd).is_dir():
            raise ValueError(f"spill_dir {str(sd)!r} is not an existing directory")


def estimate_importance_streaming(
    checkpoint_dir: str | os.PathLike,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    seq_agg: str = "mean",
    batch_agg: str = "l2",
    layer_metrics: Sequence[str] = ("block_influence", "lm_loss"),
    max_batches: Optional[int] = None,
    progress: bool = True,
    backend: str = "auto",
    options: Optional[StreamOptions] = None,
    depth_max_tokens: Optional[int] = None,
    **stream: Any,
) -> ImportanceScores:
    """Importance of a safetensors checkpoint computed one decoder layer at a time (see the module docstring).

    Args:
        checkpoint_dir: a Hugging Face checkpoint directory (``config.json`` and ``model.safetensors`` or
            sharded ``model.safetensors.index.json``) of a supported family.
        batches: as in :func:`~minitron.compress.importance.estimate_importance`: dicts with
            ``"input_ids"`` [B, S] int64 and optional ``"attention_mask"`` [B, S]; read once, up front
            (they are small next to the hidden states).
        seq_agg, batch_agg, layer_metrics, max_batches, progress, backend: as in
            :func:`~minitron.compress.importance.estimate_importance`. ``"lm_loss"`` is exact here too
            (skip streams; up to ``num_layers + 1`` sets of hidden states).
        options: a :class:`StreamOptions` (compute_dtype, spill_dir, max_hidden_bytes, reader, prefetch).
        depth_max_tokens: the ``"lm_loss"`` metric's token budget, as in
            :func:`~minitron.compress.importance.estimate_importance`: skip streams (``L(L+1)/2`` layer passes per
            batch) run on the depth batches only.
        **stream: any field of :class:`StreamOptions` by name (``compute_dtype=torch.bfloat16``), over
            ``options``.
    Returns:
        :class:`~minitron.compress.importance.ImportanceScores` (fp32 CPU tensors), equal to the in-memory
        scores of the same checkpoint loaded in ``compute_dtype``. Under ``torch.distributed`` the batches
        are sharded over the ranks and the sums all-reduced, as in the in-memory path.
    Raises:
        ValueError / TypeError / FileNotFoundError: bad arguments, a bad checkpoint (naming the file or
            tensor) or a malformed batch, all before any layer is run.
    """
    from minitron.options import fold

    (o,) = fold("estimate_importance_streaming", stream, options if options is not None else StreamOptions())
    _check_estimation_args(seq_agg, batch_agg, layer_metrics, max_batches, backend, batches)
    check_depth_max_tokens(depth_max_tokens)
    o.check()
    run = _StreamedEstimation(checkpoint_dir, o, seq_agg=seq_agg, batch_agg=batch_agg,
                              layer_metrics=layer_metrics, max_batches=max_batches, progress=progress,
                              depth_max_tokens=depth_max_tokens)
    run.read_batches(batches)
    run.prepare_skeleton(backend)
    run.capture_layer_calls()
    try:
        run.open_hidden_store()
        run.run_layers()
        run.run_final_norm_and_head()
    finally:
        run.close()
    return run.scores()


class _ViewReader:
    """A checkpoint reader presenting the model's state-dict names where the checkpoint saves tensors otherwise
    (:class:`minitron.compress.moe_layout.CheckpointView`: a MoE layer's per-expert tensors are read and fused)."""

    def __init__(self, reader: Any, view: Any, dtype: Optional[torch.dtype] = None) -> None:
        self.reader, self.view, self.dtype = reader, view, dtype
        self.path = getattr(reader, "path", None)
        self.config = reader.config
        hidden = {src for name in list(view.stacked) + list(view.alias) for src in view.sources(name)}
        self._keys = [k for k in reader.keys() if k not in hidden] + list(view.stacked) + list(view.alias)

    @classmethod
    def wrap(cls, reader: Any, model: nn.Module, dtype: Optional[torch.dtype] = None) -> Any:
        """``reader`` itself when the checkpoint holds the model's names, else a view of it whose fused tensors are
        assembled directly in ``dtype`` (one copy)."""
        from minitron.compress.moe_layout import CheckpointView

        view = CheckpointView(model, reader.keys())
        return cls(reader, view, dtype) if (view.stacked or view.alias) else reader

    def keys(self) -> list:
        return list(self._keys)

    def get(self, name: str) -> torch.Tensor:
        return self.view.read(self.reader, name, self.dtype if name in self.view.stacked else None)

    def shape(self, name: str) -> tuple:
        srcs = self.view.sources(name)
        if name not in self.view.stacked:
            return tuple(self.reader.shape(srcs[0]))
        parts = self.view.stacked[name]
        R, C = self.reader.shape(parts[0][0])
        return (len(parts), R * len(parts[0]), C)

    def file_of(self, name: str) -> Any:
        return getattr(self.reader, "file_of", lambda n: "?")(self.view.sources(name)[0])


class _StreamedEstimation:
    """One streamed estimation run, phase by phase: the checkpoint and its skeleton (:meth:`__init__`), the
    calibration batches of this rank (:meth:`read_batches`), embedding / norm / rotary and the hooks
    (:meth:`prepare_skeleton`), every layer's call arguments (:meth:`capture_layer_calls`), the hidden-state
    store (:meth:`open_hidden_store`), the layers one at a time (:meth:`run_layers`), the final norm and LM head
    (:meth:`run_final_norm_and_head`), then the reduced scores (:meth:`scores`)."""


    def __init__(self, checkpoint_dir: str | os.PathLike, o: StreamOptions, *, seq_agg: str, batch_agg: str,
                 layer_metrics: Sequence[str], max_batches: Optional[int], progress: bool,
                 depth_max_tokens: Optional[int] = None) -> None:
        from minitron.compress.distributed import check_same_on_all_ranks, rank_info

        self.o, self.dtype = o, o.compute_dtype
        self.seq_agg, self.batch_agg, self.layer_metrics = seq_agg, batch_agg, layer_metrics
        self.max_batches = max_batches
        self.depth_max_tokens = depth_max_tokens
        self.reader = o.reader if o.reader is not None else CheckpointReader(checkpoint_dir)
        self.config = self.reader.config
        self.adapter = get_adapter(self.config)
        self.want_loss = "lm_loss" in layer_metrics
        self.info = rank_info()
        self.progress = bool(progress) and self.info.rank == 0
        self.started = time.perf_counter()
        model = self.model = _build_skeleton(self.config, self.dtype)
        self.adapter.check_model(model)
        self.dims = self.adapter.dims(self.config)
        self.n_layers = self.dims.num_hidden_layers
        self.signature = shape_signature(model)
        self.prefix_of = {id(m): n + "." for n, m in model.named_modules() if n}
        # MoE: per-expert tensors on disk, fused in the model (assembled in the compute dtype)
        self.reader = _ViewReader.wrap(self.reader, model, self.dtype)
        self.head = self.adapter.lm_head(model)
        self.embed = self.adapter.embedding(model)
        tied = bool(getattr(self.config, "tie_word_embeddings", False))
        self.head_aliases = ({self.prefix_of[id(self.head)] + "weight": self.prefix_of[id(self.embed)] + "weight"}
                             if tied else {})
        _check_checkpoint(model, self.reader, self.head_aliases)
        check_same_on_all_ranks(
            _args_fingerprint(self.adapter, self.config, self.signature, seq_agg=seq_agg, batch_agg=batch_agg,
                              layer_metrics=layer_metrics, max_batches=max_batches, mode="streamed",
                              depth_max_tokens=depth_max_tokens),
            stage="arguments")
        self.own: list[tuple[torch.Tensor, Optional[torch.Tensor]]] = []
        self.own_index: list[int] = []  # global batch index of each of this rank's batches
        self.n_depth = 0  # this rank's depth batches: the first n_depth of self.own
        self.depth_meta: dict = {}
        self.calls: list[list[tuple[tuple, dict]]] = []  # [batch][layer] -> (args, kwargs)
        self.first: list[torch.Tensor] = []
        self.store: Optional[_HiddenStore] = None
        self.spill_root: Optional[Path] = None
        self.bar: Any = None
        self.base_loss: Optional[float] = None
        self.lm_loss_drop: Optional[torch.Tensor] = None

    def read_batches(self, batches: Iterable[Mapping[str, torch.Tensor]]) -> None:
        """Validate every batch (up to ``max_batches``), keep this rank's share, check the data across ranks."""
        from minitron.compress.distributed import BatchDigest, check_same_on_all_ranks, owns_batch

        digest = BatchDigest()
        batch_tokens: list[int] = []
        for i, batch in enumerate(batches):
            if self.max_batches is not None and i >= self.max_batches:
                break
            ids, mask = _validate_batch(batch, i, self.dims.vocab_size)
            digest.update(ids, mask)
            batch_tokens.append(_batch_tokens(ids, mask))
            if owns_batch(i, self.info):
                self.own.append((ids, mask))
                self.own_index.append(i)
        check_same_on_all_ranks(_data_fingerprint(digest), stage="calibration data")
        if digest.count == 0:
            raise ValueError("batches is empty: importance needs at least one calibration batch")
        if self.want_loss:
            budget = depth_token_budget(self.depth_max_tokens, sum(batch_tokens), self.n_layers)
            k = depth_batch_count(batch_tokens, budget)
            self.n_depth = sum(1 for i in self.own_index if i < k)
            self.depth_meta = {"depth_max_tokens": budget, "depth_num_batches": k,
                               "depth_num_tokens": sum(batch_tokens[:k])}
            _log_depth_cost("streamed", self.n_layers, k, self.depth_meta["depth_num_tokens"], len(batch_tokens),
                            budget)

    def prepare_skeleton(self, backend: str) -> None:
        """Load the embedding and the final norm, rebuild the rotary buffers, set up the accumulators."""
        model, adapter = self.model, self.adapter
        self.layers = adapter.layers(model)
        self.base = adapter.base_model(model)
        self.norm = adapter.final_norm(model)
        _load_module(self.embed, self.prefix_of[id(self.embed)], self.reader, self.dtype)
        _load_module(self.norm, self.prefix_of[id(self.norm)], self.reader, self.dtype)
        _materialise_buffers(model, skip=[self.layers, self.head, self.embed, self.norm])
        leftovers = [n for n, t in list(self.base.named_parameters()) + list(self.base.named_buffers())
                     if t.is_meta and not n.startswith("layers.")]
        if leftovers:
            raise RuntimeError(f"streaming: base-model tensors {leftovers} are not in the checkpoint nor rebuildable")
        self.collector = _Collector(model, adapter, seq_agg=self.seq_agg, batch_agg=self.batch_agg,
                                    block_influence="block_influence" in self.layer_metrics, backend=backend,
                                    device=torch.device("cpu"), dtype=self.dtype)

    def capture_layer_calls(self) -> None:
        """Run every batch through the base model's forward with recorders in place of the layers: each layer's
        call arguments per batch, and layer 0's input (the embedding output); then free the embedding."""
        n_layers, adapter, model = self.n_layers, self.adapter, self.model
        originals = nn.ModuleList(list(self.layers))
        sink: list = []
        recorders = nn.ModuleList([_Recorder(l, l == n_layers - 1, sink) for l in range(n_layers)])
        for rec, layer in zip(recorders, originals):  # hybrid models pick each layer's mask by its block_type
            if isinstance(getattr(layer, "block_type", None), str):
                rec.block_type = layer.block_type
        adapter.set_layers(model, recorders)
        try:
            with torch.no_grad():
                for ids, mask in self.own:
                    sink.clear()
                    try:
                        self.base(input_ids=ids, attention_mask=None if mask is None else mask.long(), use_cache=False)
                    except _Stop:
                        pass
                    if len(sink) != n_layers or [s[0] for s in sink] != list(range(n_layers)):
                        raise RuntimeError(f"streaming: the {adapter.model_type} base model called its layers "
                                           f"{[s[0] for s in sink]}, expected 0..{n_layers - 1} in order")
                    if any(rec[1] is not sink[0][1] for rec in sink):
                        raise RuntimeError(f"streaming: the {adapter.model_type} base model does not pass each "
                                           "layer's output on as the next layer's input unchanged (tuple outputs?); "
                                           "layer streaming does not support this transformers version for this "
                                           "family")
                    self.first.append(sink[0][1])
                    self.calls.append([(s[2], s[3]) for s in sink])
        finally:
            adapter.set_layers(model, originals)
            sink.clear()
        # the embedding is only needed for the capture pass: free it before the layers load (a 128k x 4096 fp32
        # embedding is 2 GiB; a tied LM head is read again from the checkpoint)
        _free_module(self.embed)

    def open_hidden_store(self) -> None:
        """The hidden-state store (main stream + one skip stream per layer for lm_loss), spilled when too big."""
        from tqdm.auto import tqdm

        n_layers = self.n_layers
        shapes = [tuple(h.shape) for h in self.first]
        elem = torch.empty((), dtype=self.dtype).element_size()
        need = (sum(b * s * h for b, s, h in shapes) + n_layers * sum(b * s * h for b, s, h in shapes[:self.n_depth])
                ) * elem
        mhb = self.o.max_hidden_bytes
        limit = mhb if mhb is not None else int(_mem_available() * HIDDEN_MEMORY_FRACTION)
        if need > limit:
            sd = self.o.spill_dir
            self.spill_root = Path(tempfile.mkdtemp(prefix="minitron-hidden-", dir=None if sd is None else str(sd)))
            log.info("streamed importance: hidden states need %.1f MiB > %.1f MiB: spilling to %s",
                     need / 2 ** 20, limit / 2 ** 20, self.spill_root)
        self.store = _HiddenStore(shapes, self.dtype, self.spill_root)
        total_passes = len(self.own) * n_layers + self.n_depth * (n_layers * (n_layers - 1) // 2)
        self.bar = tqdm(total=total_passes, desc="importance (streamed)", unit="layer-batch",
                        disable=not self.progress)
        for i, h in enumerate(self.first):
            self.store.put(n_layers, i, h)
        self.first.clear()

    def _read_args(self, l: int) -> tuple:
        return (self.layers[l], self.prefix_of[id(self.layers[l])], self.reader, self.dtype)

    def run_layers(self) -> None:
        """Load each decoder layer in turn (the next one prefetched by a helper thread), run it on the main stream
        of every batch with the hooks on and on the earlier skip streams with the hooks off, then free it."""
        n_layers, collector = self.n_layers, self.collector
        collector.attach()
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="minitron-prefetch") if self.o.prefetch else None
        try:
            with torch.no_grad():
                pending = pool.submit(_read_state, *self._read_args(0)) if pool is not None and n_layers else None
                for l in range(n_layers):
                    if pool is not None:
                        state = pending.result()
                        pending = pool.submit(_read_state, *self._read_args(l + 1)) if l + 1 < n_layers else None
                    else:
                        state = _read_state(*self._read_args(l))
                    _assign_state(self.layers[l], self.prefix_of[id(self.layers[l])], state)
                    del state
                    try:
                        self._run_layer(l)
                    finally:
                        collector.active = True
                        _free_module(self.layers[l])
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def _run_layer(self, l: int) -> None:
        """Layer ``l`` (loaded) on every batch: skip stream ``l`` starts from its input; earlier skip streams
        pass through it (hooks off); the main stream passes with the hooks on."""
        store, collector, layer, main = self.store, self.collector, self.layers[l], self.n_layers
        for i, (ids, mask) in enumerate(self.own):
            args, kwargs = self.calls[i][l]
            h_in = store.get(main, i)
            depth = i < self.n_depth  # skip streams only on the depth batches
            if depth:
                store.put(l, i, h_in)  # skip stream l: layer l is the identity
            collector.active = False
            for d in range(l if depth else 0):
                out = layer(store.get(d, i), *args, **kwargs)
                store.put(d, i, _output_tensor(out))
                self.bar.update(1)
            collector.active = True
            collector.mask = mask
            out = layer(h_in, *args, **kwargs)
            collector.mask = None
            store.put(main, i, _output_tensor(out))
            self.bar.update(1)

    def run_final_norm_and_head(self) -> None:
        """The final norm on the main stream (its channel accumulator) and, for lm_loss, the LM head on every
        stream: the base loss and the per-layer loss drops (reduced over the ranks)."""
        n_layers, store, collector, norm = self.n_layers, self.store, self.collector, self.norm
        head = self.head if self.want_loss else None
        if head is not None:
            _load_module(head, self.prefix_of[id(head)], self.reader, self.dtype, aliases=self.head_aliases)
        main_sum, main_cnt = 0.0, 0
        skip_sums = [0.0] * n_layers
        skip_cnts = [0] * n_layers
        with torch.no_grad():
            for i, (ids, mask) in enumerate(self.own):
                collector.mask = mask
                hn = norm(store.get(n_layers, i))
                collector.mask = None
                if head is None:
                    continue
                if i >= self.n_depth:
                    continue
                s, c = _lm_loss_sums(_final_logits(self.config, head(hn)), ids, mask)
                main_sum, main_cnt = main_sum + s, main_cnt + c
                collector.active = False
                for d in range(n_layers):
                    s, c = _lm_loss_sums(_final_logits(self.config, head(norm(store.get(d, i)))), ids, mask)
                    skip_sums[d], skip_cnts[d] = skip_sums[d] + s, skip_cnts[d] + c
                collector.active = True
        if head is not None:
            _free_module(head)
        self._loss = (main_sum, main_cnt, skip_sums, skip_cnts)

    def close(self) -> None:
        """Detach the hooks, close the store and remove spilled files (on success and on error)."""
        if self.bar is not None:
            self.bar.close()
        collector = getattr(self, "collector", None)
        if collector is not None:
            collector.detach()
            collector.mask = None
            collector.active = True
        if self.store is not None:
            self.store.close()
        if self.spill_root is not None:
            shutil.rmtree(self.spill_root, ignore_errors=True)

    def scores(self) -> ImportanceScores:
        """Reduce the counts, losses and accumulators over the ranks and assemble the scores."""
        info, own = self.info, self.own
        num_samples = sum(ids.shape[0] for ids, _ in own)
        num_tokens = sum(int(m.sum()) if m is not None else ids.numel() for ids, m in own)
        num_samples, num_tokens, num_batches = _reduce_counts(num_samples, num_tokens, len(own))
        if self.want_loss:
            main_sum, main_cnt, skip_sums, skip_cnts = self._loss
            (main_sum,), (main_cnt,) = _reduce_loss_sums([main_sum], [main_cnt])
            if main_cnt == 0:
                raise ValueError("the calibration batches hold no next-token targets (sequences of length >= 2 "
                                 "needed)")
            self.base_loss = main_sum / main_cnt
            skip_sums, skip_cnts = _reduce_loss_sums(skip_sums, skip_cnts)
            self.lm_loss_drop = _drops_from_sums(skip_sums, skip_cnts, self.base_loss)
        if info.distributed:
            self.collector.all_reduce()
        dtype_name = str(self.dtype).replace("torch.", "")
        scores = _assemble_scores(
            self.collector, self.adapter, self.config, self.signature, seq_agg=self.seq_agg,
            batch_agg=self.batch_agg, layer_metrics=self.layer_metrics, num_samples=num_samples,
            num_tokens=num_tokens, num_batches=num_batches, base_loss=self.base_loss, lm_loss_drop=self.lm_loss_drop,
            extra_meta={"streamed": True, "compute_dtype": dtype_name,
                        "hidden_states_spilled": self.spill_root is not None, **self.depth_meta,
                        **({"world_size": info.world} if info.distributed else {})})
        if info.distributed:
            from minitron.compress.distributed import barrier

            barrier("barrier at the end of streamed importance estimation")
        log.info("streamed importance: %d layers, %d batch(es) on %s, computed in %s%s, %.1f s", self.n_layers,
                 len(own), info, dtype_name, ", hidden states spilled" if self.spill_root else "",
                 time.perf_counter() - self.started)
        return scores
