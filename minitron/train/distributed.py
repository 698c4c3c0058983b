"""Training under ``torchrun``: process-group session, data sharding, DDP / FSDP2 wrapping, sharded checkpoints.

Everything here runs on the distributed engine of PyTorch (``torch.distributed``; gloo on CPU, NCCL on GPUs);
:func:`minitron.train.loop.train` uses it when ``TrainConfig.strategy`` is ``"ddp"`` or ``"fsdp2"`` (or when a
process group is initialised and no strategy is given: then DDP).

Pieces:

- :func:`distributed_session` creates (and destroys) the process group from the ``torchrun`` environment,
  with a bounded timeout so that a dying rank makes the others fail instead of hanging forever.
- :class:`ShardedBatchStream`: every rank draws the same global batch of ``batch_size * world_size``
  sequences and keeps its contiguous slice ``[rank * batch_size, (rank + 1) * batch_size)`` of every tensor,
  so an N-rank run sees the same data, in the same order, as a 1-rank run with ``batch_size * N``.
- :class:`LossModule`: ``forward(batch) -> (loss, metrics)``; owns the student (the teacher, frozen, is
  referenced by the loss function and not registered). It is what DDP / FSDP2 wrap, so that the wrapper's
  forward runs around the whole loss (DDP's reducer, FSDP2's unshard of the root parameters: the LM-head
  weight that the fused-linear KL reads directly is unsharded inside this forward).
- :func:`gathered`: explicit ``unshard()`` / ``reshard()`` of an FSDP2 module (used for the frozen teacher,
  whose root forward is never called).
- :func:`check_same_across_ranks`: all-gathers a fingerprint of the arguments and raises naming the first
  argument that differs between ranks.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

__all__ = ["STRATEGIES", "DEFAULT_TIMEOUT_S", "DistState", "distributed_session", "resolve_strategy",
           "ShardedBatchStream", "LossModule", "gathered", "shard_fsdp2", "check_same_across_ranks",
           "data_fingerprint", "all_reduce_mean", "barrier", "DistributedError", "rank_and_world", "is_main_process",
           "broadcast_from_main", "full_state_dict", "frozen_copy_sharded", "mixed_precision_policy"]

STRATEGIES = ("ddp", "fsdp2")
#: Process-group timeout used by :func:`distributed_session` when none is given (seconds).
DEFAULT_TIMEOUT_S = 600.0


class DistributedError(RuntimeError):
    """A collective failed (another rank died, or a rank did not arrive within the process-group timeout)."""


def rank_and_world() -> Tuple[int, int]:
    """``(rank, world_size)`` of the default process group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def distributed_session(timeout: float = DEFAULT_TIMEOUT_S, backend: Optional[str] = None) -> Iterator[Tuple[int, int]]:
    """Initialise the default process group from the ``torchrun`` environment, for the duration of a block.

    Under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT`` set) the group is created
    with ``init_method="env://"`` and destroyed at the end of the block. Without that environment, or when a
    group already exists (created by the caller), nothing is created or destroyed.

    Args:
        timeout: seconds a collective may wait for the other ranks before failing (a rank that dies makes
            the others raise within about this time).
        backend: "gloo", "nccl", ...; default: NCCL when CUDA is available, else gloo.

    Yields:
        ``(rank, world_size)``; ``(0, 1)`` outside ``torchrun``.
    """
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    created = False
    if dist.is_available() and not dist.is_initialized() and "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl" and "LOCAL_RANK" in os.environ:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend=backend, init_method="env://",
                                timeout=datetime.timedelta(seconds=float(timeout)))
        created = True
        log.info("process group initialised: rank %d of %d (%s, timeout %.0fs)", dist.get_rank(),
                 dist.get_world_size(), backend, timeout)
    try:
        yield rank_and_world()
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def resolve_strategy(strategy: Optional[str]) -> Optional[str]:
    """The strategy to use: ``None`` (one process), "ddp" or "fsdp2".

    With no strategy and an initialised process group, DDP (logged). A strategy without a process group
    raises a ValueError.
    """
    if strategy is not None and strategy not in STRATEGIES:
        raise ValueError(f"strategy must be None or one of {STRATEGIES}, got {strategy!r}")
    initialised = dist.is_available() and dist.is_initialized()
    if strategy is None:
        if initialised:
            log.info("torch.distributed is initialised (%d ranks) and no strategy was given: using ddp",
                     dist.get_world_size())
            return "ddp"
        return None
    if not initialised:
        raise ValueError(
            f"strategy={strategy!r} needs an initialised torch.distributed process group: launch with torchrun "
            "and wrap the call in minitron.train.distributed.distributed_session()"
        )
    return strategy


def is_main_process() -> bool:
    """True on rank 0 (and without a process group): the process that writes shared outputs."""
    return rank_and_world()[0] == 0


def broadcast_from_main(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (any picklable object; the value itself without a process group).

    E.g. the run directory that rank 0 alone created with ``begin_output``.
    """
    rank, world = rank_and_world()
    if world == 1:
        return value
    box = [value if rank == 0 else None]
    try:
        dist.broadcast_object_list(box, src=0)
    except Exception as e:
        raise _collective_error("broadcast from rank 0", e) from e
    return box[0]


def barrier() -> None:
    """``dist.barrier()`` when a process group exists (a failure raises :class:`DistributedError`)."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        except Exception as e:
            raise _collective_error("barrier", e) from e


def _collective_error(what: str, e: BaseException) -> DistributedError:
    rank, world = rank_and_world()
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    return DistributedError(
        f"rank {rank} of {world}: collective {what} failed: another rank died or did not arrive within the "
        f"process-group timeout ({type(e).__name__}: {first})"
    )


def all_reduce_mean(values: List[float], device: torch.device) -> List[float]:
    """Mean over ranks of a list of floats (one all-reduce of a small fp64 vector)."""
    rank, world = rank_and_world()
    if world == 1 or not values:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    try:
        dist.all_reduce(t)
    except Exception as e:
        raise _collective_error("all_reduce of the loss metrics", e) from e
    return (t / world).tolist()


# --------------------------------------------------------------------------------------------------
# data


class ShardedBatchStream:
    """This rank's slice of a global :class:`~minitron.io.data.BatchStream`.

    ``stream`` draws global batches of ``batch_size * world_size`` sequences; every tensor of each global
    batch dict is sliced along dim 0 to ``[rank * batch_size, (rank + 1) * batch_size)``, whatever keys the
    batch has. The state (the global position) is the same on every rank.
    """

    def __init__(self, stream: Any, rank: int, world_size: int) -> None:
        gb = int(stream.batch_size)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if gb % world_size:
            raise ValueError(f"the global batch ({gb}) does not divide by world_size={world_size}")
        self.stream = stream
        self.rank = rank
        self.world_size = world_size
        self.batch_size = gb // world_size

    def __iter__(self) -> "ShardedBatchStream":
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        batch = next(self.stream)
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        return {k: (v[lo:hi] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    @property
    def epoch(self) -> float:
        return self.stream.epoch

    @property
    def position(self) -> int:
        return self.stream.position

    def state_dict(self) -> Dict[str, int]:
        return self.stream.state_dict()

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.stream.load_state_dict(state)


def data_fingerprint(data: Any) -> str:
    """sha256 (16 hex digits) of a packed dataset's ``input_ids`` and ``attention_mask``."""
    h = hashlib.sha256()
    for name in ("input_ids", "attention_mask"):
        t = getattr(data, name, None)
        if isinstance(t, torch.Tensor):
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def check_same_across_ranks(args: Dict[str, Any]) -> None:
    """Raise ValueError naming the first argument whose value differs between ranks.

    ``args`` maps argument names to JSON-able values (or short fingerprints); every rank must call this
    with the same names. One ``all_gather_object``.
    """
    rank, world = rank_and_world()
    if world == 1:
        return
    mine = {k: hashlib.sha256(json.dumps(v, sort_keys=True, default=str).encode()).hexdigest()[:16]
            for k, v in args.items()}
    gathered_: List[Optional[Dict[str, str]]] = [None] * world
    try:
        dist.all_gather_object(gathered_, mine)
    except Exception as e:
        raise _collective_error("all_gather of the argument fingerprints", e) from e
    for name in sorted(set().union(*[set(g or {}) for g in gathered_])):
        vals = [(g or {}).get(name) for g in gathered_]
        if len(set(vals)) > 1:
            differing = [r for r, v in enumerate(vals) if v != vals[0]]
            raise ValueError(
                f"argument {name!r} differs across ranks (rank {rank} sees {json.dumps(args.get(name), default=str)[:200]}; "
                f"ranks {differing} differ from rank 0): every rank must get the same {name}"
            )


# --------------------------------------------------------------------------------------------------
# models


class LossModule(torch.nn.Module):
    """``forward(batch) -> (loss, metrics)`` = ``loss_fn(model, batch)``; the module DDP / FSDP2 wrap.

    Only ``model`` (the trained one) is a registered submodule; anything else the loss needs (the frozen
    teacher) is held by ``loss_fn``.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[..., Any]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, Any]]:
        return self.loss_fn(self.model, batch)


@contextlib.contextmanager
def gathered(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within the block the FSDP2 ``module``'s own (root-group) parameters are unsharded full tensors.

    Use it to read e.g. the LM-head weight of a sharded model outside that model's ``forward``. A no-op for a
    module that is not an FSDP2 module.
    """
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(module, FSDPModule):
        yield module
        return
    module.unshard()
    try:
        yield module
    finally:
        module.reshard()


def decoder_layers(model: torch.nn.Module) -> List[torch.nn.Module]:
    """The decoder layers of a supported model (via its adapter)."""
    from minitron.models import get_adapter

    return list(get_adapter(model).layers(model))


def shard_fsdp2(model: torch.nn.Module, *, root: Optional[torch.nn.Module] = None,
                mp_policy: Any = None, reshard_after_forward: bool = True) -> torch.nn.Module:
    """``fully_shard`` every decoder layer of ``model``, then ``root`` (default: ``model``) over the world.

    The root group holds what is left (embeddings, final norm, LM head). Returns ``root``.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw: Dict[str, Any] = {"reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        if not isinstance(mp_policy, MixedPrecisionPolicy):
            raise TypeError(f"mp_policy must be a MixedPrecisionPolicy, got {type(mp_policy).__name__}")
        kw["mp_policy"] = mp_policy
    for layer in decoder_layers(model):
        fully_shard(layer, **kw)
    root = model if root is None else root
    fully_shard(root, **kw)
    return root


def mixed_precision_policy(device: torch.device, bf16: bool) -> Any:
    """bf16 parameters / fp32 gradient reduction on devices with bf16 support; None (fp32) otherwise (CPU)."""
    if not bf16 or device.type != "cuda" or not torch.cuda.is_bf16_supported():
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def frozen_copy_sharded(model: torch.nn.Module, mp_policy: Any = None) -> torch.nn.Module:
    """A frozen, eval-mode FSDP2-sharded copy of ``model`` (layers, then the model as root)."""
    m = copy.deepcopy(model)
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return shard_fsdp2(m, mp_policy=mp_policy)


def full_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The full (unsharded) state dict of an FSDP2-sharded model on rank 0 (CPU tensors; empty on other ranks).

    Collective: every rank must call it.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


@dataclass
class DistState:
    """How :func:`minitron.train.loop.train` runs: strategy (None/"ddp"/"fsdp2"), rank, world size."""

    strategy: Optional[str]
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.strategy is not None
