"""The training loop shared by LM fine-tuning (teacher correction, LM-only baselines) and distillation.

:func:`train` runs AdamW with linear warmup + cosine decay, gradient accumulation, gradient clipping,
optional bf16 autocast (on by default only on CUDA devices that support bf16), periodic evaluation,
and checkpoints every ``save_every`` steps. A checkpoint directory holds the model, optimizer,
scheduler, RNG states and data-stream position and is written atomically (temporary directory, then
rename), so a run killed at any moment resumes from its last complete checkpoint and reproduces the
loss curve of an uninterrupted run. The loss log is JSON lines (``log.jsonl``) with a PNG plot
(``loss.png``) next to it.

Output directory layout::

    log.jsonl          one record per logged step: {"type": "train"|"eval", "step": ..., ...}
    loss.png           training (and evaluation) loss curves
    checkpoints/       step-00000100/ {model.pt, optimizer.pt, scheduler.pt, rng.pt, state.json}
                                      (+ extra.pt: modules trained with the model, e.g. hidden-state projections)
                       latest          (text: name of the newest complete checkpoint)

Modules trained with the model: a loss object with ``trainable_modules() -> {name: module}`` (the distillation
loss's hidden-state projections) gets them registered under the loss module (``extra.<name>``), so DDP
synchronises their gradients, the optimizer updates them (after the model's parameters) and every checkpoint
carries their state in ``extra.pt``; ``resume`` restores them.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from minitron.io.data import Batch, BatchStream, PackedDataset
from minitron.io.files import atomic_write_json, atomic_write_text, current_umask, read_json, json_default as _json_default
from minitron.runtime import autocast_context, resolve_bf16, resolve_device, seed_everything
from minitron.options import option, parse_bf16
from minitron.train.distributed import (DistState, DistributedError, LossModule, ShardedBatchStream, all_reduce_mean,
                                        barrier, check_same_across_ranks, data_fingerprint, gathered,
                                        mixed_precision_policy, rank_and_world, resolve_strategy, shard_fsdp2)

log = logging.getLogger(__name__)

__all__ = ["TrainConfig", "TrainResult", "NonFiniteLossError", "train", "lm_loss", "make_optimizer", "latest_checkpoint", "read_log",
           "default_eval_fn", "LOG_NAME", "PLOT_NAME", "CKPT_DIR", "RESUMABLE_CHANGES"]

LossFn = Callable[[torch.nn.Module, Batch], Tuple[torch.Tensor, Dict[str, float]]]
Callback = Callable[[int, Dict[str, Any]], None]
PathLike = Union[str, os.PathLike]

LOG_NAME = "log.jsonl"
PLOT_NAME = "loss.png"
CKPT_DIR = "checkpoints"

# TrainConfig fields that may change when a run is resumed (everything else must match).
RESUMABLE_CHANGES = {"eval_every", "eval_batches", "save_every", "keep_checkpoints", "log_every", "device", "strategy",
                     "compile"}


# --------------------------------------------------------------------------------------------------
# configuration


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf (the run stops; checkpoints already written are kept)."""


@dataclass
class TrainConfig:
    """Optimisation settings.

    Attributes:
        steps: optimizer steps.
        batch_size: sequences per micro-batch.
        grad_accum: micro-batches per optimizer step.
        lr: peak learning rate; linear warmup over ``warmup_steps`` then cosine decay to
            ``lr * min_lr_ratio`` at ``steps``.
        weight_decay: AdamW decoupled weight decay (matrices only; norms and biases get none).
        betas: AdamW betas.
        max_grad_norm: gradient-norm clipping (None: no clipping).
        eval_every: evaluate every N steps (0: only at the end; needs evaluation data).
        eval_batches: cap on evaluation batches (None: the whole evaluation set).
        save_every: checkpoint every N steps (0: only at the end).
        keep_checkpoints: how many of the newest checkpoints to keep.
        log_every: log a training record every N steps.
        seed: seeds the RNGs and the data order.
        bf16: "auto" (on for CUDA with bf16 support, off on CPU), True or False.
        device: "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ... (under torchrun "auto"/"cuda"
            means ``cuda:LOCAL_RANK``).
        strategy: None (one process; DDP when a process group is initialised), "ddp" or "fsdp2"
            (:mod:`minitron.train.distributed`). ``batch_size`` is per rank: each optimizer micro-step
            consumes a global batch of ``batch_size * world_size`` sequences, rank r taking its contiguous slice.
        compile: ``torch.compile`` the loss module (student forward, teacher forward and the fused loss):
            True (default backend, inductor) or a ``torch.compile`` backend name ("inductor", "aot_eager").
    """

    steps: int = option(100, help="optimizer steps")
    batch_size: int = option(8, help="sequences per micro-batch (per rank under torchrun)")
    grad_accum: int = option(1, help="micro-batches per optimizer step")
    lr: float = option(1e-3, help="peak learning rate")
    min_lr_ratio: float = option(0.1, help="cosine floor as a fraction of --lr")
    warmup_steps: int = option(10, help="linear warmup steps")
    weight_decay: float = option(0.01, help="AdamW weight decay (matrices only)")
    betas: Tuple[float, float] = option((0.9, 0.95), help="AdamW betas", cli=False)
    max_grad_norm: Optional[float] = option(1.0, help="gradient-norm clipping")
    eval_every: int = option(0, help="evaluate every N steps (0: at the end only)")
    eval_batches: Optional[int] = option(None, help="cap on evaluation batches", default_text="all")
    save_every: int = option(0, help="checkpoint every N steps (0: at the end only)")
    keep_checkpoints: int = option(2, help="how many of the newest checkpoints to keep")
    log_every: int = option(1, help="log a training record every N steps")
    seed: int = option(0, help="seed of the RNGs and the data order")
    bf16: Union[str, bool] = option("auto", help="bf16 autocast: auto (CUDA with bf16), on, off", parse=parse_bf16)
    device: str = option("auto", help="auto, cpu, cuda, cuda:N")
    strategy: Optional[str] = option(None, help="under torchrun: ddp (replicated student) or fsdp2 (student and "
                                     "teacher sharded per decoder layer)", choices=("ddp", "fsdp2"),
                                     default_text="ddp")
    compile: Union[bool, str] = option(False, help="torch.compile the loss module (True or a backend name)", cli=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise TypeError/ValueError naming the first bad field."""
        ints = {
            "steps": 1, "batch_size": 1, "grad_accum": 1, "warmup_steps": 0, "eval_every": 0,
            "save_every": 0, "keep_checkpoints": 1, "log_every": 1, "seed": 0,
        }
        for name, lo in ints.items():
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise TypeError(f"TrainConfig.{name} must be an int, got {v!r}")
            if v < lo:
                raise ValueError(f"TrainConfig.{name} must be >= {lo}, got {v}")
        if self.eval_batches is not None and (not isinstance(self.eval_batches, int) or self.eval_batches < 1):
            raise ValueError(f"TrainConfig.eval_batches must be a positive int or None, got {self.eval_batches!r}")
        for name in ("lr", "min_lr_ratio", "weight_decay"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ValueError(f"TrainConfig.{name} must be a finite number >= 0, got {v!r}")
        if self.lr <= 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if self.min_lr_ratio > 1:
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.max_grad_norm is not None and (not isinstance(self.max_grad_norm, (int, float)) or self.max_grad_norm <= 0):
            raise ValueError(f"TrainConfig.max_grad_norm must be > 0 or None, got {self.max_grad_norm!r}")
        betas = tuple(self.betas)
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise ValueError(f"TrainConfig.betas must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = (float(betas[0]), float(betas[1]))
        if self.bf16 not in ("auto", True, False):
            raise ValueError(f"TrainConfig.bf16 must be 'auto', True or False, got {self.bf16!r}")
        if self.strategy is not None and self.strategy not in ("ddp", "fsdp2"):
            raise ValueError(f"TrainConfig.strategy must be None, 'ddp' or 'fsdp2', got {self.strategy!r}")
        if not isinstance(self.compile, (bool, str)) or self.compile == "":
            raise TypeError(f"TrainConfig.compile must be a bool or a torch.compile backend name, got {self.compile!r}")
        if not isinstance(self.device, str):
            raise TypeError(f"TrainConfig.device must be a string, got {self.device!r}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError as e:
                raise ValueError(f"TrainConfig.device: invalid device {self.device!r}") from e

    @classmethod
    def from_dict(cls, d: Optional[Dict[str, Any]]) -> "TrainConfig":
        """Build from a mapping; unknown keys raise a ValueError naming the valid ones."""
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; valid: {sorted(names)}")
        if "betas" in d and d["betas"] is not None:
            d["betas"] = tuple(d["betas"])
        return cls(**d)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


# --------------------------------------------------------------------------------------------------
# losses


def lm_loss(model: torch.nn.Module, batch: Batch) -> Tuple[torch.Tensor, Dict[str, float]]:
    """Next-token cross-entropy, averaged over the predicted tokens whose target is not padding.

    Args:
        batch: ``input_ids`` LongTensor [B, S], ``attention_mask`` [B, S] (1 real, 0 pad).

    Returns:
        (scalar fp32 loss, metrics dict).
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    valid = (mask[:, 1:] != 0) & (mask[:, :-1] != 0)
    targets = ids[:, 1:].masked_fill(~valid, -100)
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
    return loss, {}


# --------------------------------------------------------------------------------------------------
# checkpoints


def _lr_lambda_factory(config: TrainConfig) -> Callable[[int], float]:
    warm, total, floor = config.warmup_steps, config.steps, config.min_lr_ratio

    def factor(step: int) -> float:  # step = number of scheduler.step() calls so far
        if warm > 0 and step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (dim >= 2) only."""
    decay, no_decay = [], []
    seen = set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=config.betas)


def _rng_state() -> Dict[str, Any]:
    state: Dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(output_dir: PathLike) -> Optional[Path]:
    """The newest complete checkpoint directory under ``output_dir/checkpoints`` (None if none)."""
    root = Path(output_dir) / CKPT_DIR
    if not root.is_dir():
        return None
    pointer = root / "latest"
    if pointer.is_file():
        cand = root / pointer.read_text().strip()
        if (cand / "state.json").is_file():
            return cand
    done = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def _fsync_tree(path: Path) -> None:
    for f in sorted(path.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _save_checkpoint(
    output_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    stream: Any,
    state: Dict[str, Any],
    keep: int,
    ds: Optional[DistState] = None,
    extra: Optional[torch.nn.Module] = None,
) -> Path:
    """Write ``checkpoints/step-N`` atomically (temporary directory, then rename), update ``latest``, prune.

    One process / DDP: rank 0 writes ``model.pt``, ``optimizer.pt`` (the single-process format); FSDP2: every
    rank writes its shard with ``torch.distributed.checkpoint`` into ``dcp/``. Every rank writes its own RNG
    state (``rng.pt`` on rank 0, ``rng-rank<r>.pt`` on the others); rank 0 renames after a barrier.
    """
    ds = ds or DistState(None)
    root = output_dir / CKPT_DIR
    name = f"step-{step:08d}"
    final = root / name
    if ds.distributed:
        tmp = root / f".tmp-{name}"  # the same name on every rank
        if ds.is_main:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            os.chmod(tmp, 0o777 & ~current_umask())
        barrier()
    else:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{name}-"))
        os.chmod(tmp, 0o777 & ~current_umask())
    try:
        if ds.strategy == "fsdp2":
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            msd, osd = get_state_dict(model, optimizer)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / "dcp"))
        elif ds.is_main:
            torch.save(model.state_dict(), tmp / "model.pt")
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            if extra is not None:
                torch.save(extra.state_dict(), tmp / "extra.pt")
        if ds.is_main:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(_rng_state(), tmp / "rng.pt")
            full_state = dict(state, step=step, data=stream.state_dict(), world_size=ds.world_size,
                              strategy=ds.strategy)
            (tmp / "state.json").write_text(json.dumps(full_state, indent=2, default=_json_default))
        else:
            torch.save(_rng_state(), tmp / f"rng-rank{ds.rank}.pt")
        barrier()
        if ds.is_main:
            _fsync_tree(tmp)  # make the files durable before the rename publishes them
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
    except BaseException:
        if not ds.distributed:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if ds.is_main:
        atomic_write_text(root / "latest", name + "\n")
        old = sorted(p for p in root.glob("step-*") if p.is_dir())
        for p in old[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
        log.info("checkpoint saved: %s", final)
    barrier()
    return final


def read_log(path: PathLike) -> List[Dict[str, Any]]:
    """Records of a JSON-lines log (an unparsable last line, left by a kill, is skipped)."""
    records: List[Dict[str, Any]] = []
    p = Path(path)
    if not p.is_file():
        return records
    for line in p.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("skipping a truncated line in %s", p)
    return records


# --------------------------------------------------------------------------------------------------
# the loop


@dataclass
class TrainResult:
    """What a :func:`train` call did.

    Attributes:
        steps: optimizer steps completed (in total, across resumptions).
        history: all log records (train and eval).
        final_loss: mean training loss over the last 10 logged steps.
        final_eval: the last evaluation record (None without evaluation).
        elapsed_s: wall time of the whole run (across resumptions), seconds.
        resumed_from: the step this invocation resumed from (None for a fresh run).
        output_dir, log_path, plot_path: where things were written.
    """

    steps: int
    history: List[Dict[str, Any]]
    final_loss: Optional[float]
    final_eval: Optional[Dict[str, Any]]
    elapsed_s: float
    resumed_from: Optional[int]
    output_dir: Path
    log_path: Path
    plot_path: Optional[Path] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def train_losses(self) -> List[Tuple[int, float]]:
        return [(r["step"], r["loss"]) for r in self.history if r.get("type") == "train"]


def _move_batch(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def default_eval_fn(eval_data: PackedDataset, config: TrainConfig) -> Callable[[torch.nn.Module], Dict[str, float]]:
    """Evaluation callback: token-weighted LM loss / perplexity on ``eval_data``."""
    from minitron.eval.perplexity import perplexity

    def run(model: torch.nn.Module) -> Dict[str, float]:
        res = perplexity(model, eval_data, batch_size=config.batch_size, max_batches=config.eval_batches,
                         bf16=config.bf16)
        return {"eval_loss": res["loss"], "eval_ppl": res["ppl"], "eval_tokens": res["tokens"]}

    return run


EvalFn = Callable[[torch.nn.Module], Dict[str, float]]


@dataclass
class _Setup:
    """What :func:`train` resolves before touching the model: placement, output, data stream, run description."""

    config: TrainConfig
    ds: DistState
    out: Path
    log_path: Path
    ckpt: Optional[Path]
    stream: Any
    device: torch.device
    use_bf16: bool
    run_info: Dict[str, Any]
    eval_fn: Optional[EvalFn]
    plot_title: str

    @property
    def strategy(self) -> Optional[str]:
        return self.ds.strategy


@dataclass
class _Engine:
    """The modules a run trains: ``work`` (the model, or its FSDP2-sharded copy), ``root`` (the loss module that
    wraps it, what FSDP2 checkpoints), ``engine`` (what a micro-batch is fed to: ``root`` or its DDP wrapper)."""

    work: torch.nn.Module
    root: torch.nn.Module
    engine: torch.nn.Module
    extra: Optional[torch.nn.Module] = None

    @property
    def trained(self) -> torch.nn.Module:
        """What the optimizer updates: the model, plus the extra modules when there are some."""
        return self.root if self.extra is not None else self.work


@dataclass
class _Progress:
    """Where a run stands: restored from a checkpoint or fresh, then advanced by every step."""

    start_step: int = 0
    elapsed_before: float = 0.0
    resumed_from: Optional[int] = None
    history: List[Dict[str, Any]] = field(default_factory=list)
    tokens_seen: int = 0
    last_eval: Optional[Dict[str, Any]] = None
    plot_path: Optional[Path] = None
    plotted: int = -1
    t0: float = 0.0

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.t0


def _check_train_args(data: Any, config: Any, eval_data: Any) -> None:
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    config.validate()
    if not isinstance(data, PackedDataset):
        raise TypeError(f"data must be a PackedDataset, got {type(data).__name__}")
    if eval_data is not None and not isinstance(eval_data, PackedDataset) and not callable(eval_data):
        raise TypeError(f"eval_data must be a PackedDataset or a callable, got {type(eval_data).__name__}")


def _setup(data: PackedDataset, config: TrainConfig, output_dir: PathLike, eval_data: Any, resume: bool,
           run_info: Optional[Dict[str, Any]], plot_title: str) -> _Setup:
    """Check the arguments against the output directory and the other ranks; resolve device, bf16, data stream."""
    _check_train_args(data, config, eval_data)
    strategy = resolve_strategy(config.strategy)
    rank, world = rank_and_world() if strategy else (0, 1)
    ds = DistState(strategy, rank, world)
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output directory {str(out)!r} is a file")
    log_path = out / LOG_NAME
    ckpt = latest_checkpoint(out)
    if not resume and (ckpt is not None or log_path.exists()):
        raise ValueError(
            f"{str(out)!r} already holds a training run (log or checkpoints); resume it or use a new directory"
        )
    if world > 1 and len(data) < config.batch_size * world:
        raise ValueError(
            f"the training data has only {len(data)} sequences, fewer than the global batch of batch_size="
            f"{config.batch_size} x world size {world}; use more data or a smaller --batch-size"
        )
    global_stream = data.stream(config.batch_size * world, seed=config.seed)  # validates batch size vs data
    stream: Any = global_stream if world == 1 else ShardedBatchStream(global_stream, rank, world)
    device = resolve_device(config.device)
    if strategy and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    eval_fn: Optional[EvalFn] = None
    if isinstance(eval_data, PackedDataset):
        eval_fn = default_eval_fn(eval_data, config)
    elif eval_data is not None:
        eval_fn = eval_data
    info = json.loads(json.dumps(run_info or {}, default=_json_default))
    info.setdefault("num_sequences", len(data))
    info.setdefault("seq_len", data.seq_len)
    if strategy:
        check_same_across_ranks({
            "config": {k: v for k, v in config.to_dict().items() if k != "device"},
            "run_info": info,
            "data": data_fingerprint(data),
            "eval_data": data_fingerprint(eval_data) if isinstance(eval_data, PackedDataset) else None,
            "output_dir": str(out.resolve()),
            "resume": bool(resume),
            "checkpoint": ckpt.name if (resume and ckpt is not None) else None,
        })
    return _Setup(config, ds, out, log_path, ckpt, stream, device, resolve_bf16(config.bf16, device), info, eval_fn,
                  plot_title)


def _build_engine(model: torch.nn.Module, loss_fn: LossFn, s: _Setup) -> _Engine:
    """Place the model and wrap it for the strategy (FSDP2 shards a copy, and the loss's frozen models)."""
    config = s.config
    extras = dict(loss_fn.trainable_modules()) if hasattr(loss_fn, "trainable_modules") else {}  # type: ignore[attr-defined]
    extra = torch.nn.ModuleDict(extras).to(s.device) if extras else None
    if extra is not None and s.strategy == "fsdp2":
        raise ValueError(f"modules trained with the model ({sorted(extras)}) are not supported under strategy fsdp2 "
                         "yet; use ddp")
    if s.strategy == "fsdp2":
        work = copy.deepcopy(model)  # sharded in place; the trained weights go back into ``model`` at the end
        work.to(s.device)
        work.train()
        mp_policy = mixed_precision_policy(s.device, s.use_bf16)
        run_loss = loss_fn
        if hasattr(loss_fn, "frozen_models") and hasattr(loss_fn, "with_frozen_models"):
            from minitron.train.distributed import frozen_copy_sharded

            run_loss = loss_fn.with_frozen_models(  # type: ignore[attr-defined]
                {k: frozen_copy_sharded(m.to(s.device), mp_policy)
                 for k, m in loss_fn.frozen_models().items()})  # type: ignore[attr-defined]
        root: torch.nn.Module = LossModule(work, run_loss)
        shard_fsdp2(work, root=root, mp_policy=mp_policy)
        if mp_policy is not None:
            s.use_bf16 = False  # FSDP2 casts the parameters to bf16 itself
        if config.compile:
            root.compile(**_compile_kwargs(config.compile))
        engine: torch.nn.Module = root
    else:
        work = model
        work.to(s.device)
        work.train()
        root = LossModule(work, loss_fn)
        if extra is not None:
            root.extra = extra  # registered: DDP syncs its gradients, the optimizer and checkpoints include it
        if config.compile:
            root.compile(**_compile_kwargs(config.compile))
        if s.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            engine = DistributedDataParallel(root, device_ids=[s.device.index] if s.device.type == "cuda" else None)
        else:
            engine = root
    if s.strategy:
        log.info("rank %d of %d: %s on %s (per-rank batch %d, global batch %d)", s.ds.rank, s.ds.world_size,
                 s.strategy, s.device, config.batch_size, config.batch_size * s.ds.world_size)
    return _Engine(work, root, engine, extra)


def _load_checkpoint_file(ckpt: Path, name: str, **kw: Any) -> Any:
    try:
        return torch.load(ckpt / name, **kw)
    except Exception as e:  # truncated zip, pickle errors
        raise ValueError(
            f"checkpoint file {str(ckpt / name)!r} is corrupt or truncated ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); delete {ckpt.name} to resume from the one before"
        ) from None


def _restore(s: _Setup, e: _Engine, optimizer: torch.optim.Optimizer, scheduler: Any, resume: bool) -> _Progress:
    """The run's progress: fresh, or restored from the newest checkpoint (weights, optimizer, scheduler, RNG, data
    position, the log up to that step)."""
    p = _Progress()
    ckpt = s.ckpt
    if resume and ckpt is not None:
        state = read_json(ckpt / "state.json", "checkpoint state")
        _check_resumable(state, s.config, s.run_info, ckpt, world_size=s.ds.world_size, strategy=s.strategy)
        if s.strategy == "fsdp2":
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            msd, osd = get_state_dict(e.root, optimizer)
            sd = {"model": msd, "optim": osd}
            dcp.load(sd, checkpoint_id=str(ckpt / "dcp"))
            set_state_dict(e.root, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        else:
            e.work.load_state_dict(_load_checkpoint_file(ckpt, "model.pt", map_location=s.device, weights_only=True))
            if e.extra is not None:
                if not (ckpt / "extra.pt").is_file():
                    raise ValueError(f"cannot resume {ckpt}: it holds no extra.pt, but this run trains extra modules "
                                     "with the model (e.g. hidden-state projections)")
                e.extra.load_state_dict(_load_checkpoint_file(ckpt, "extra.pt", map_location=s.device,
                                                              weights_only=True))
            optimizer.load_state_dict(_load_checkpoint_file(ckpt, "optimizer.pt", map_location=s.device,
                                                            weights_only=True))
        scheduler.load_state_dict(_load_checkpoint_file(ckpt, "scheduler.pt", weights_only=True))
        own = ckpt / f"rng-rank{s.ds.rank}.pt"
        _set_rng_state(_load_checkpoint_file(ckpt, own.name if s.ds.rank and own.is_file() else "rng.pt",
                                             weights_only=False))
        s.stream.load_state_dict(state["data"])
        p.start_step = int(state["step"])
        p.elapsed_before = float(state.get("elapsed_s", 0.0))
        p.resumed_from = p.start_step
        p.history = [r for r in read_log(s.log_path) if int(r.get("step", 0)) <= p.start_step]
        if s.ds.is_main:
            atomic_write_text(s.log_path, "".join(json.dumps(r) + "\n" for r in p.history))
        log.info("resumed from %s (step %d of %d)", ckpt, p.start_step, s.config.steps)
    elif resume:
        if s.log_path.exists() and s.ds.is_main:
            log.warning("no checkpoint in %s: restarting from step 0", s.out)
            s.log_path.unlink()
    last_train = next((r for r in reversed(p.history) if r.get("type") == "train"), None)
    p.tokens_seen = int(last_train.get("tokens", 0)) if last_train else 0
    p.last_eval = next((r for r in reversed(p.history) if r.get("type") == "eval"), None)
    p.plot_path = s.out / PLOT_NAME if (s.out / PLOT_NAME).is_file() else None
    p.plotted = len(p.history) if p.plot_path is not None else -1
    return p


def _forward_backward(s: _Setup, e: _Engine, step: int) -> Tuple[float, int, Dict[str, float]]:
    """The micro-batches of one optimizer step: ``(mean loss, tokens, summed metrics)``, reduced over the ranks."""
    config = s.config
    losses: List[float] = []
    metric_sums: Dict[str, float] = {}
    step_tokens = 0
    for micro in range(config.grad_accum):
        batch = _move_batch(next(s.stream), s.device)
        step_tokens += int(batch["attention_mask"].sum())
        sync = micro == config.grad_accum - 1
        if s.strategy == "fsdp2":
            e.root.set_requires_gradient_sync(sync)  # type: ignore[operator]
        no_sync = e.engine.no_sync() if s.strategy == "ddp" and not sync else contextlib.nullcontext()
        with no_sync:
            with autocast_context(s.device, s.use_bf16):
                loss, metrics = e.engine(batch)
            if not s.strategy and not torch.isfinite(loss):
                _raise_non_finite(float(loss.detach()), step, config, s.out)
            (loss.float() / config.grad_accum).backward()
        losses.append(float(loss.detach()))
        for k, v in metrics.items():
            metric_sums[k] = metric_sums.get(k, 0.0) + float(v)
    mean_loss = sum(losses) / len(losses)
    if s.strategy:
        keys = sorted(metric_sums)
        reduced = all_reduce_mean([mean_loss, float(step_tokens)] + [metric_sums[k] for k in keys], s.device)
        mean_loss, step_tokens = reduced[0], int(round(reduced[1] * s.ds.world_size))
        metric_sums = dict(zip(keys, reduced[2:]))
        if not math.isfinite(mean_loss):  # the same value on every rank: all stop together
            _raise_non_finite(mean_loss, step, config, s.out)
    return mean_loss, step_tokens, metric_sums


def _train_step(s: _Setup, e: _Engine, optimizer: torch.optim.Optimizer, scheduler: Any, p: _Progress,
                step: int) -> Dict[str, Any]:
    """One optimizer step (forward/backward over the micro-batches, clipping, update); returns its log record."""
    config = s.config
    mean_loss, step_tokens, metric_sums = _forward_backward(s, e, step)
    p.tokens_seen += step_tokens
    grad_norm = None
    if config.max_grad_norm is not None:
        params = [q for g in optimizer.param_groups for q in g["params"]]
        gn = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        if hasattr(gn, "full_tensor"):
            gn = gn.full_tensor()
        grad_norm = float(gn)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    record: Dict[str, Any] = {
        "type": "train",
        "step": step,
        "loss": mean_loss,
        "lr": lr,
        "tokens": p.tokens_seen,
        "epoch": round(s.stream.epoch, 4),
        "elapsed_s": round(p.elapsed(), 3),
    }
    if grad_norm is not None:
        record["grad_norm"] = grad_norm
    record.update({k: v / config.grad_accum for k, v in metric_sums.items()})
    return record


def _evaluate(s: _Setup, e: _Engine) -> Dict[str, float]:
    if s.strategy == "fsdp2":
        with gathered(e.root), torch.no_grad():  # the root group (embeddings, norm, head) stays unsharded
            ev = dict(s.eval_fn(e.work))  # type: ignore[misc]
    else:
        ev = dict(s.eval_fn(e.work))  # type: ignore[misc]
    e.work.train()
    return ev


def _after_step(s: _Setup, e: _Engine, optimizer: torch.optim.Optimizer, scheduler: Any, p: _Progress,
                record: Dict[str, Any], emit: Callable[[Dict[str, Any]], None]) -> None:
    """Log the step's record, evaluate and checkpoint on their cadence (and at the last step)."""
    config, step = s.config, record["step"]
    if step % config.log_every == 0 or step == config.steps:
        emit(record)
        if step == p.start_step + 1 or step % max(1, config.steps // 20) == 0 or step == config.steps:
            log.info("step %d/%d loss %.4f lr %.2e (%.1fs)", step, config.steps, record["loss"], record["lr"],
                     p.elapsed())
    if s.eval_fn is not None and ((config.eval_every and step % config.eval_every == 0) or step == config.steps):
        ev = _evaluate(s, e)
        p.last_eval = {"type": "eval", "step": step, **ev, "elapsed_s": round(p.elapsed(), 3)}
        emit(p.last_eval)
        log.info("step %d eval %s", step, {k: round(v, 4) for k, v in ev.items() if isinstance(v, float)})
    if (config.save_every and step % config.save_every == 0) or step == config.steps:
        _save_checkpoint(
            s.out, step, e.root if s.strategy == "fsdp2" else e.work, optimizer, scheduler, s.stream,
            {"config": config.to_dict(), "run_info": s.run_info, "elapsed_s": p.elapsed(),
             "global_batch_size": config.batch_size * s.ds.world_size},
            config.keep_checkpoints, s.ds, e.extra,
        )
        if s.ds.is_main:
            p.plot_path = _plot(p.history, s.out, s.plot_title)
        p.plotted = len(p.history)


def _run_steps(model: torch.nn.Module, s: _Setup, e: _Engine, optimizer: torch.optim.Optimizer, scheduler: Any,
               p: _Progress, callbacks: Sequence[Callback]) -> None:
    """The steps from ``p.start_step + 1`` to the end; the log is appended as records come; a failed collective
    becomes a :class:`DistributedError` naming this rank."""
    logf = open(s.log_path, "a", encoding="utf-8") if s.ds.is_main else None
    try:

        def emit(record: Dict[str, Any]) -> None:
            p.history.append(record)
            if logf is not None:
                logf.write(json.dumps(record) + "\n")
                logf.flush()

        for step in range(p.start_step + 1, s.config.steps + 1):
            record = _train_step(s, e, optimizer, scheduler, p, step)
            _after_step(s, e, optimizer, scheduler, p, record, emit)
            for cb in callbacks:
                cb(step, record)
        if s.strategy == "fsdp2":
            from minitron.train.distributed import full_state_dict

            full = full_state_dict(e.work)
            if s.ds.is_main:
                model.load_state_dict(full)
    except DistributedError:
        raise
    except Exception as exc:
        if s.strategy and _is_collective_failure(exc):
            raise DistributedError(
                f"rank {s.ds.rank} of {s.ds.world_size}: a collective failed during training (another rank died, or "
                f"did not arrive within the process-group timeout): {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}"
            ) from exc
        raise
    finally:
        if logf is not None:
            logf.close()


def _finish(s: _Setup, p: _Progress) -> TrainResult:
    if s.ds.is_main and p.plotted != len(p.history):
        p.plot_path = _plot(p.history, s.out, s.plot_title)
    train_recs = [r for r in p.history if r.get("type") == "train"]
    final_loss = sum(r["loss"] for r in train_recs[-10:]) / len(train_recs[-10:]) if train_recs else None
    return TrainResult(
        steps=s.config.steps,
        history=p.history,
        final_loss=final_loss,
        final_eval=p.last_eval,
        elapsed_s=p.elapsed(),
        resumed_from=p.resumed_from,
        output_dir=s.out,
        log_path=s.log_path,
        plot_path=p.plot_path,
        extra={"strategy": s.strategy, "world_size": s.ds.world_size},
    )


def train(
    model: torch.nn.Module,
    loss_fn: LossFn,
    data: PackedDataset,
    config: TrainConfig,
    output_dir: PathLike,
    *,
    eval_data: Union[PackedDataset, EvalFn, None] = None,
    resume: bool = False,
    callbacks: Sequence[Callback] = (),
    run_info: Optional[Dict[str, Any]] = None,
    plot_title: str = "training loss",
) -> TrainResult:
    """Train ``model`` in place by minimising ``loss_fn`` over batches of ``data``.

    Args:
        model: trained in place (moved to the configured device). Under FSDP2 a sharded copy is trained
            and the trained weights are loaded back into ``model`` on rank 0 at the end (other ranks' ``model``
            keeps its initial weights).
        loss_fn: ``loss_fn(model, batch) -> (scalar loss, {name: float or 0-d tensor})``; batches hold
            ``input_ids``/``attention_mask`` LongTensors [B, S] on the training device. Under a strategy it
            runs inside the forward of the DDP / FSDP2-wrapped :class:`~minitron.train.distributed.LossModule`.
            A loss object with ``frozen_models()`` / ``with_frozen_models(dict)`` (e.g. the distillation loss)
            gets its frozen models (the teacher) sharded under FSDP2.
        data: training sequences (shuffled per epoch with ``config.seed``).
        config: optimisation settings (``config.strategy``: None, "ddp", "fsdp2").
        output_dir: receives ``log.jsonl``, ``loss.png`` and ``checkpoints/`` (written by rank 0 only; FSDP2
            checkpoint shards by every rank). A fresh run refuses a directory that already holds a log or
            checkpoints.
        eval_data: evaluation every ``config.eval_every`` steps and at the end: a PackedDataset (LM loss /
            perplexity on it, :func:`default_eval_fn`) or a callable ``eval_fn(model) -> {name: float}``. Under
            a strategy every rank evaluates (the same numbers); rank 0 logs.
        resume: continue from the newest checkpoint in ``output_dir`` (a fresh start when there is
            none). The configuration must match the checkpoint's except for logging/eval/save cadence.
            DDP (and one process) may resume with another world size when ``batch_size * world_size`` is
            unchanged; FSDP2 refuses a different world size.
        callbacks: called as ``cb(step, record)`` after every optimizer step, on every rank (an exception
            stops the run, as an interruption would).
        run_info: JSON-able description stored in checkpoints and checked on resume (e.g. data
            source, model shapes).

    Returns:
        TrainResult (``extra``: ``strategy``, ``world_size``).

    Raises:
        DistributedError: a collective failed (another rank died or timed out).
        ValueError: bad arguments, or arguments that differ across ranks (naming the argument).
    """
    s = _setup(data, config, output_dir, eval_data, resume, run_info, plot_title)
    if s.ds.is_main:
        s.out.mkdir(parents=True, exist_ok=True)
        for stale in (s.out / CKPT_DIR).glob(".tmp-*"):  # left by a kill during a checkpoint save
            shutil.rmtree(stale, ignore_errors=True)
    seed_everything(config.seed)
    e = _build_engine(model, loss_fn, s)
    optimizer = make_optimizer(e.trained, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda_factory(config))
    p = _restore(s, e, optimizer, scheduler, resume)
    barrier()
    p.t0 = time.time()
    _run_steps(model, s, e, optimizer, scheduler, p, callbacks)
    return _finish(s, p)


def _compile_kwargs(compile_: Union[bool, str]) -> Dict[str, Any]:
    return {"backend": compile_} if isinstance(compile_, str) else {}


def _raise_non_finite(value: float, step: int, config: TrainConfig, out: Path) -> None:
    last = latest_checkpoint(out)
    raise NonFiniteLossError(
        f"training stopped: the loss is {value} at step {step} of {config.steps}; "
        + (f"the last checkpoint {last.name} is intact" if last is not None else "no checkpoint was written")
        + " (try a lower lr, bf16 off, or check the data and the model's weights)"
    )


def _is_collective_failure(e: BaseException) -> bool:
    dist_error = getattr(torch.distributed, "DistError", None)
    if dist_error is not None and isinstance(e, dist_error):
        return True
    text = f"{type(e).__name__} {e}".lower()
    return any(w in text for w in ("gloo", "nccl", "connection closed", "connection reset", "timed out", "timeout",
                                   "broken pipe", "distbackenderror"))


def _check_resumable(state: Dict[str, Any], config: TrainConfig, run_info: Dict[str, Any], ckpt: Path,
                     world_size: int = 1, strategy: Optional[str] = None) -> None:
    old = state.get("config", {})
    new = config.to_dict()
    defaults = TrainConfig().to_dict()  # fields added since the checkpoint was written take their defaults
    old_world = int(state.get("world_size", 1))
    old_strategy = state.get("strategy", old.get("strategy"))
    skip = set(RESUMABLE_CHANGES)
    if (old_strategy == "fsdp2") != (strategy == "fsdp2"):
        raise ValueError(
            f"cannot resume {ckpt}: it was written with strategy {old_strategy!r}, this run uses {strategy!r} "
            "(FSDP2 checkpoints are sharded; resume with the same strategy)"
        )
    if old_world != world_size:
        if strategy == "fsdp2":
            raise ValueError(
                f"cannot resume {ckpt}: it holds FSDP2 shards of world size {old_world}, this run has world size "
                f"{world_size}; resume with {old_world} processes (torchrun --nproc-per-node {old_world})"
            )
        old_global = int(old.get("batch_size", 0)) * old_world
        if old_global != config.batch_size * world_size:
            raise ValueError(
                f"cannot resume {ckpt}: the global batch would change (batch_size {old.get('batch_size')} x world size "
                f"{old_world} = {old_global}, now {config.batch_size} x world size {world_size}); with world size "
                f"{world_size} use batch_size {old_global // world_size if old_global % world_size == 0 else '(none fits)'}"
            )
        skip.add("batch_size")
    diffs = [f"{k}: {old.get(k, defaults.get(k))!r} -> {new[k]!r}" for k in new
             if k not in skip and old.get(k, defaults.get(k)) != new[k]]
    if diffs:
        raise ValueError(f"cannot resume {ckpt}: training configuration changed ({'; '.join(diffs)})")
    old_info = state.get("run_info", {})
    idiffs = [f"{k}: {old_info.get(k)!r} -> {run_info[k]!r}" for k in run_info if k in old_info and old_info[k] != run_info[k]]
    if idiffs:
        raise ValueError(f"cannot resume {ckpt}: run changed ({'; '.join(idiffs)})")


def _plot(history: List[Dict[str, Any]], out: Path, title: str) -> Optional[Path]:
    try:
        from minitron.io.plotting import plot_loss_curves
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        return None
    try:
        return plot_loss_curves(history, out / PLOT_NAME, title=title)
    except Exception as e:  # a plot must never kill a training run
        log.warning("could not plot the loss curve: %s", e)
        return None
