"""Where and how work runs: device and bf16 resolution, seeding, kernel-backend checks, parameter counts."""
from __future__ import annotations

import logging
import random
from typing import Optional, Sequence, Union

import torch

log = logging.getLogger(__name__)

__all__ = ["resolve_device", "resolve_bf16", "autocast_context", "seed_everything", "check_backends",
           "count_parameters"]

def resolve_device(device: Union[str, torch.device]) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def resolve_bf16(bf16: Union[str, bool], device: torch.device) -> bool:
    """Whether to autocast to bf16: ``"auto"`` means CUDA with bf16 support only."""
    if bf16 == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return bool(bf16)


def autocast_context(device: torch.device, enabled: bool):
    """``torch.autocast`` to bf16 on ``device`` when enabled (a no-op context otherwise)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:  # pragma: no cover
        pass


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


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




def available_memory_bytes() -> Optional[int]:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (None where it cannot be read)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
