"""Describing benchmark cases: :class:`BenchConfig`, :class:`Case`, :class:`Bench`, :func:`autograd_bench` and
small helpers for a case's setup (see :mod:`benchmarks._harness` for how a script plugs in)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from minitron.runtime import available_memory_bytes  # noqa: F401  (re-exported by the harness)

MODES = ("forward", "backward", "full")


class Unavailable(Exception):
    """Raised by a case's setup when the provider cannot run here (recorded, not a failure)."""


@dataclass
class BenchConfig:
    """What a benchmark module's ``cases(cfg)`` is asked for."""

    quick: bool = False  # small shapes, few repeats (CI)
    full: bool = False  # the full (GPU-sized) sweep
    device: str = "cpu"  # "cpu" or "cuda"
    heavy: bool = True  # include the heavy headline cases that take minutes on a CPU

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Bench:
    """What a case's setup returns: the timed callable and optional untimed hooks."""

    fn: Callable[[], Any]
    prepare: Optional[Callable[[], Any]] = None
    reset: Optional[Callable[[], Any]] = None
    keep: Any = None  # anything that must stay alive while timing (inputs)
    bytes_moved: Optional[float] = None  # overrides Case.bytes_moved when only setup knows it (e.g. masked rows)


@dataclass
class Case:
    bench: str  # op / benchmark name, e.g. "kl_div"
    provider: str  # "minitron-cpp", "torch-eager", "torch-compile", "liger", ...
    mode: str  # "forward" | "backward" | "full"
    shape: dict  # sizes, e.g. {"N": 1024, "V": 128256}
    dtype: str  # "float32", "bfloat16", ...
    setup: Callable[..., Bench]  # setup(case=Case, device=str) -> Bench
    params: dict = field(default_factory=dict)  # other options, e.g. {"kl_mode": "forward", "T": 1.0}
    reference: Optional[str] = None  # provider ratios are taken against
    ours: Optional[bool] = None  # defaults to provider.startswith("minitron")
    bytes_moved: Optional[float] = None
    exps: Optional[float] = None
    flops: Optional[float] = None
    size: Optional[float] = None
    size_label: Optional[str] = None
    warmup: Optional[int] = None  # overrides the run's default
    repeats: Optional[int] = None  # overrides the run's default
    max_time_s: Optional[float] = None  # stop sampling after this much time (>= 1 sample)
    timeout_s: Optional[float] = None  # kill the worker after this long
    note: str = ""
    info: dict = field(default_factory=dict)  # recorded verbatim, e.g. {"grad_bytes": ...}
    tolerance: Optional[float] = None  # regression-check tolerance for this case when larger than the run's

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"Case.mode must be one of {MODES}, got {self.mode!r}")
        if self.ours is None:
            self.ours = self.provider.startswith("minitron")

    @property
    def shape_str(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.shape.items())

    @property
    def params_str(self) -> str:
        return ",".join(f"{k}={v}" for k, v in sorted(self.params.items()))

    @property
    def case_key(self) -> str:
        """Identifies the workload (everything but the provider)."""
        parts = [self.bench, self.mode, self.shape_str, self.dtype]
        if self.params:
            parts.append(self.params_str)
        return "|".join(parts)

    @property
    def id(self) -> str:
        return f"{self.case_key}|{self.provider}"

    @property
    def x(self) -> float:
        if self.size is not None:
            return float(self.size)
        return float(math.prod(v for v in self.shape.values() if isinstance(v, (int, float))))


def our_backends(device: str) -> list[str]:
    """minitron backends that run on ``device`` (``cpp`` on CPU; ``cuda`` and ``triton`` on CUDA)."""
    return ["cpp"] if device == "cpu" else ["cuda", "triton"]


def require_free_memory(nbytes: float, what: str = "this case") -> None:
    """Raise :class:`Unavailable` when the machine has less than ``nbytes`` available (CPU)."""
    avail = available_memory_bytes()
    if avail is not None and avail < nbytes:
        raise Unavailable(f"{what} needs about {nbytes / 2**30:.1f} GiB of memory, {avail / 2**30:.1f} GiB available")


def dtype_of(name: str):
    import torch

    return getattr(torch, name)


def tensor_bytes(*tensors) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors))


def autograd_bench(forward: Callable[[], Any], params: Sequence[Any], mode: str) -> Bench:
    """Bench for a differentiable ``forward() -> scalar loss`` w.r.t. tensors ``params`` in ``mode``.

    forward: ``forward()`` under ``torch.no_grad()``. backward: ``forward()`` untimed, ``loss.backward()``
    timed. full: ``forward().backward()`` timed. ``.grad`` of ``params`` is dropped before each call so
    every call allocates (and the memory measurement counts) a fresh gradient.
    """
    import torch

    def clear() -> None:
        for p in params:
            p.grad = None

    if mode == "forward":
        def fn() -> Any:
            with torch.no_grad():
                return forward()

        return Bench(fn=fn, keep=params)
    if mode == "full":
        def fn_full() -> None:
            clear()
            forward().backward()

        return Bench(fn=fn_full, reset=clear, keep=params)
    if mode == "backward":
        state: dict = {}

        def prep() -> None:
            clear()
            state["loss"] = forward()

        def fn_bwd() -> None:
            state.pop("loss").backward()

        return Bench(fn=fn_bwd, prepare=prep, reset=clear, keep=params)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
