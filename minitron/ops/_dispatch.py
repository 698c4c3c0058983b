"""Capability-based backend selection shared by every minitron op.

Each op declares its backends with what they can handle (device types, dtypes and an availability
check). ``select`` picks the first capable backend in the op's automatic
order for the device (CPU tensors: the C++ kernels; CUDA tensors: CUDA C++ when built, else Triton)
or validates an explicit ``backend=`` request. When nothing fits it raises
:class:`BackendUnavailableError` listing why each backend was rejected; it never falls back silently
to the (slow) torch reference, which runs only when asked for by name.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from minitron import _ext

BACKENDS = ("cpp", "cuda", "triton", "reference")
AUTO_ORDER: dict[str, tuple[str, ...]] = {"cpu": ("cpp",), "cuda": ("cuda", "triton")}
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

Reason = Optional[str]


class BackendUnavailableError(RuntimeError):
    """No backend can run the op on the given inputs (the message lists why for each)."""


def triton_unavailable(device_type: str) -> Reason:
    """Why Triton cannot run on ``device_type`` (None when it can)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if device_type == "cuda":
        return None
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return "CPU tensors run under Triton only with TRITON_INTERPRET=1 (correctness testing)"
    return f"triton does not support device type {device_type!r}"


def native_unavailable(native_op: str, device_type: str) -> Reason:
    """Why the compiled kernel ``torch.ops.minitron.<native_op>`` cannot run on ``device_type``."""
    if not _ext.available():
        return "extension minitron._C is not built (run `make build`)"
    if not _ext.has_native_op(native_op):
        return f"extension has no {native_op} (rebuild it)"
    if device_type == "cuda" and not _ext.cuda_built():
        return "extension was built without CUDA (rebuild with FORCE_CUDA=1 on a CUDA torch)"
    return None


@dataclass
class Backend:
    name: str
    devices: tuple[str, ...]
    fn: Callable[..., Any]
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
    unavailable: Callable[[str], Reason] = lambda device_type: None

    def rejection(self, device_type: str, dtype: Optional[torch.dtype]) -> Reason:
        if device_type not in self.devices:
            return f"runs on {'/'.join(self.devices)} tensors, not {device_type}"
        if dtype is not None and dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            return f"dtype {str(dtype).replace('torch.', '')} not supported ({names})"
        return self.unavailable(device_type) or None


@dataclass
class OpBackends:
    """The backends of one op, keyed by name."""

    op: str
    backends: dict[str, Backend] = field(default_factory=dict)

    def register(self, name: str, devices: tuple[str, ...], *, dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES,
                 unavailable: Callable[[str], Reason] | None = None) -> Callable[[Callable], Callable]:
        if name not in BACKENDS:
            raise ValueError(f"unknown backend name {name!r}")

        def deco(fn: Callable) -> Callable:
            self.backends[name] = Backend(name, devices, fn, dtypes, unavailable or (lambda d: None))
            return fn

        return deco

    def select(self, backend: str, device: torch.device | str, dtype: torch.dtype | None = None,
               **_unused_shape: Any) -> Backend:
        """The backend that runs the op for ``backend`` (a name or ``"auto"``) on ``device``/``dtype``.

        Keyword arguments beyond ``dtype`` are accepted and ignored (``minitron/ops/kl.py`` still passes the
        vocabulary size from the days of per-backend shape limits, which no backend declares any more).
        """
        device_type = torch.device(device).type
        if backend != "auto":
            if backend not in BACKENDS:
                raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, BACKENDS))}; got {backend!r}")
            impl = self.backends.get(backend)
            if impl is None:
                raise BackendUnavailableError(f"{self.op}: backend {backend!r} is not implemented for this op")
            why = impl.rejection(device_type, dtype)
            if why:
                raise BackendUnavailableError(f"{self.op}: backend {backend!r} cannot run here: {why}")
            return impl
        reasons = []
        for name in AUTO_ORDER.get(device_type, ()):
            impl = self.backends.get(name)
            if impl is None:
                reasons.append(f"{name}: not implemented for this op")
                continue
            why = impl.rejection(device_type, dtype)
            if why is None:
                return impl
            reasons.append(f"{name}: {why}")
        for name, impl in self.backends.items():
            if name not in AUTO_ORDER.get(device_type, ()) and name != "reference":
                why = impl.rejection(device_type, dtype)
                if why is None or not why.startswith("runs on"):
                    reasons.append(f"{name}: {why or 'not used automatically on ' + device_type}")
        raise BackendUnavailableError(
            f"{self.op}: no backend can run on device={device_type} dtype={dtype}:\n  - "
            + "\n  - ".join(reasons)
            + "\n(the torch reference is available explicitly with backend='reference'; it is not chosen "
            "automatically because it is much slower)"
        )

    def describe(self, device_type: str, dtype: torch.dtype = torch.float32) -> str:
        """One line: which backend ``auto`` picks for this device, or why none can."""
        try:
            return self.select("auto", device_type, dtype).name
        except BackendUnavailableError as exc:
            return "none (" + "; ".join(line.strip("- ").strip() for line in str(exc).splitlines()[1:-2]) + ")"


REGISTRY: dict[str, OpBackends] = {}


def op_backends(op: str) -> OpBackends:
    """The backend table of ``op`` (created on first use)."""
    if op not in REGISTRY:
        REGISTRY[op] = OpBackends(op)
    return REGISTRY[op]
