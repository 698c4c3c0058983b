"""Importance estimation under ``torch.distributed`` (``torchrun``): batch sharding, checks, reductions.

When a default process group is initialised (``torchrun --nproc-per-node N ...`` sets the environment and
the caller runs ``torch.distributed.init_process_group``), :func:`minitron.compress.importance.estimate_importance`
and :func:`minitron.compress.streaming.estimate_importance_streaming` give rank ``r`` of ``world`` the
calibration batches ``i`` with ``i % world == r`` (any batch count works, also one that does not divide by
the world size), check that every rank was called with the same arguments and the same data (an all-gather
of a small fingerprint; a mismatch raises ``ValueError`` naming the argument), and all-reduce the fused
accumulators, the block-influence sums and the LM-loss sums, so that every rank returns the scores one
process would compute on all batches (up to the fp32 order of the reduction).

A collective that fails (a rank died, or the process group's ``timeout`` passed) raises
:class:`DistributedImportanceError` naming the step, the rank and the world size, so no rank hangs longer
than the process group's timeout.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, TypeVar

import torch

log = logging.getLogger(__name__)

__all__ = ["DistributedImportanceError", "RankInfo", "rank_info", "owns_batch", "BatchDigest",
           "check_same_on_all_ranks", "collective", "all_reduce_sum_", "barrier", "init_from_env", "shutdown",
           "DEFAULT_TIMEOUT_S", "group_for"]

#: Default process-group timeout of :func:`init_from_env`: a dead or stuck rank fails the others after this.
DEFAULT_TIMEOUT_S = 600.0

T = TypeVar("T")


class DistributedImportanceError(RuntimeError):
    """A collective of a distributed importance run failed (another rank died or timed out)."""


@dataclass(frozen=True)
class RankInfo:
    """This process's place in the default process group (``rank 0 of 1`` without one)."""

    rank: int
    world: int

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world > 1

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.world}"


def rank_info() -> RankInfo:
    """The rank and world size of the default process group, or ``RankInfo(0, 1)`` when none is initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return RankInfo(dist.get_rank(), dist.get_world_size())
    return RankInfo(0, 1)


def owns_batch(index: int, info: RankInfo) -> bool:
    """Whether batch ``index`` (0-based position in the calibration stream) is this rank's: ``index % world == rank``."""
    return index % info.world == info.rank


class BatchDigest:
    """SHA-256 over the calibration batches in order (ids and masks, shapes and values) and their count.

    Every rank feeds every batch (its own and the others'), so equal digests mean equal data on all ranks.
    """

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self.count = 0

    def update(self, ids: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
        """Fold one validated batch (``ids`` int64 [B, S], ``mask`` bool [B, S] or None) into the digest."""
        self._h.update(f"{tuple(ids.shape)}|".encode())
        self._h.update(ids.to(torch.int64).contiguous().numpy().tobytes())
        if mask is None:
            self._h.update(b"nomask")
        else:
            self._h.update(mask.to(torch.bool).contiguous().numpy().tobytes())
        self.count += 1

    def hexdigest(self) -> str:
        """The digest so far (hex)."""
        return self._h.hexdigest()


def collective(what: str, fn: Callable[[], T]) -> T:
    """Run one collective; turn a failure (dead peer, timeout) into :class:`DistributedImportanceError`."""
    try:
        return fn()
    except DistributedImportanceError:
        raise
    except (RuntimeError, OSError, ConnectionError) as exc:  # DistBackendError/DistNetworkError are RuntimeErrors
        info = rank_info()
        raise DistributedImportanceError(
            f"distributed importance: the collective '{what}' failed on {info} ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}); another rank probably died or "
            "the process group's timeout passed. Every rank must run the same command with the same data"
        ) from exc


def check_same_on_all_ranks(fingerprint: Mapping[str, Any], *, stage: str) -> None:
    """All-gather ``fingerprint`` (a small JSON-able dict) and raise ``ValueError`` where ranks disagree.

    The error names each mismatching argument with rank 0's value and the first differing rank's value;
    every rank raises the same error. No-op without a process group of more than one rank.
    """
    import torch.distributed as dist

    info = rank_info()
    if not info.distributed:
        return
    gathered: list[Any] = [None] * info.world
    group = group_for(torch.device("cpu"))
    collective(f"{stage}: argument check (all_gather_object)",
               lambda: dist.all_gather_object(gathered, dict(fingerprint), group=group))
    ref = gathered[0]
    diffs = []
    for key in sorted({k for g in gathered for k in g}):
        for r, g in enumerate(gathered[1:], start=1):
            if g.get(key) != ref.get(key):
                diffs.append(f"{key}: rank 0 has {ref.get(key)!r}, rank {r} has {g.get(key)!r}")
                break
    if diffs:
        raise ValueError(
            f"distributed importance ({stage}): the ranks were called with different arguments or data: "
            + "; ".join(diffs) + ". Every rank must get the same arguments and the same calibration batches"
        )


_CPU_GROUP: list[Any] = []


def _default_backend() -> str:
    import torch.distributed as dist

    return str(dist.get_backend())


def group_for(device: torch.device) -> Any:
    """The process group to reduce tensors on ``device`` with: ``None`` (the default group) unless the default
    backend cannot handle them (CPU tensors under NCCL), then a gloo group over the same ranks, created once
    (a collective: every rank reaches this call at the same point of the run)."""
    import torch.distributed as dist

    if not rank_info().distributed or device.type != "cpu" or _default_backend() == "gloo":
        return None
    if not _CPU_GROUP:
        _CPU_GROUP.append(collective("creation of a gloo group for CPU tensors",
                                     lambda: dist.new_group(backend="gloo")))
    return _CPU_GROUP[0]


def all_reduce_sum_(t: torch.Tensor, what: str) -> torch.Tensor:
    """SUM-all-reduce ``t`` in place across the default group's ranks (no-op on one rank); returns ``t``."""
    import torch.distributed as dist

    if rank_info().distributed:
        group = group_for(t.device)
        collective(what, lambda: dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group))
    return t


def barrier(what: str) -> None:
    """A barrier on the default group (no-op on one rank), failures as :class:`DistributedImportanceError`."""
    import torch.distributed as dist

    if rank_info().distributed:
        group = group_for(torch.device("cpu"))
        collective(what, lambda: dist.barrier(group=group))


def init_from_env(*, backend: Optional[str] = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                  threads_per_rank: Optional[int] = None) -> RankInfo:
    """Join the process group ``torchrun`` describes in the environment (no-op when not launched by it).

    Reads ``WORLD_SIZE`` / ``RANK`` (and ``MASTER_ADDR`` / ``MASTER_PORT`` through ``env://``). With
    ``WORLD_SIZE`` unset or 1, or a group already initialised, nothing is done.

    Args:
        backend: ``"gloo"`` or ``"nccl"``; default ``"nccl"`` when CUDA is available, else ``"gloo"``.
        timeout_s: the process group's timeout: a collective waiting longer (a rank died or hangs) fails
            with :class:`DistributedImportanceError` on the other ranks.
        threads_per_rank: ``torch.set_num_threads`` for this process (default: the CPU count divided by
            ``LOCAL_WORLD_SIZE``, at least 1), so that the ranks of one machine do not oversubscribe it.
    Returns:
        this process's :class:`RankInfo`.
    """
    import os
    from datetime import timedelta

    import torch.distributed as dist

    if not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool) or timeout_s <= 0:
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return rank_info()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    threads = threads_per_rank if threads_per_rank is not None else max(1, (os.cpu_count() or 1) // local)
    torch.set_num_threads(int(threads))
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, init_method="env://", timeout=timedelta(seconds=float(timeout_s)))
    info = rank_info()
    log.info("joined the %s process group as %s (%d thread(s))", backend, info, threads)
    return info


def shutdown() -> None:
    """Destroy the default process group if one is initialised (call once at the end, on every rank)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        _CPU_GROUP.clear()
        dist.destroy_process_group()
