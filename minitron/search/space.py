"""The search space: every pruned shape of a model that meets a parameter / memory budget, from its config alone.

A candidate is a shape ``(hidden_size, intermediate_size, num_attention_heads, num_key_value_heads,
num_hidden_layers)`` reached from the teacher by width pruning (the grid below) and depth pruning (dropping one
contiguous block of layers). The grid (:func:`axis_values`):

* hidden and MLP sizes: multiples of ``hidden_multiple`` / ``mlp_multiple`` (64 by default, the papers'
  hardware-friendly grid) between ``(1 - max_width_prune)`` of the teacher's size and the teacher's size (the
  teacher's own size is always on the grid);
* query heads: per kept KV-head count ``kv`` (at least ``(1 - max_width_prune)`` of the teacher's), every
  multiple ``kv * r`` with ``r`` up to the teacher's heads per group (a KV group keeps at most its own heads) and at
  least ``(1 - max_width_prune)`` of the teacher's heads; for multi-head attention (KV heads == heads) both shrink
  together; shapes the family refuses (Llama: ``hidden_size % num_attention_heads``) are skipped;
* layers: from ``(1 - max_depth_prune)`` of the teacher's layers to all of them.

Closest from below: for each combination of hidden size, heads, KV heads and layers, the one candidate with the
largest MLP size on the grid that meets the budget. The table keeps those within ``tolerance`` of the budget
(default 5%: one MLP grid step of a small model is 2-3% of it; a combination whose MLP size hits its pruning
limit falls further below and is left out). Parameter counts are exact for the supported families (checked
against a model built on the ``meta`` device from the config: :func:`check_parameter_formula`).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

log = logging.getLogger(__name__)

__all__ = ["Shape", "Candidate", "teacher_shape", "count_parameters", "embedding_parameters", "kv_cache_bytes",
           "weight_dtype_bytes", "axis_values", "enumerate_candidates", "reachable_range", "check_parameter_formula",
           "SearchSpaceError", "BUDGET_KINDS"]

#: What ``target_params`` counts: every parameter (tied embeddings once) or all but the embedding and LM head.
BUDGET_KINDS = ("total", "non_embedding")


class SearchSpaceError(ValueError):
    """A budget no candidate can meet (the message gives the smallest and largest reachable sizes)."""


@dataclasses.dataclass(frozen=True)
class Shape:
    """The prunable sizes of a model (all ints)."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int

    @property
    def id(self) -> str:
        """A stable name, e.g. ``h3072-i9216-a32-kv8-l32``."""
        return (f"h{self.hidden_size}-i{self.intermediate_size}-a{self.num_attention_heads}-"
                f"kv{self.num_key_value_heads}-l{self.num_hidden_layers}")

    def width(self) -> Dict[str, int]:
        """The four width sizes (keyword arguments of :func:`minitron.compress.prune.prune_width`)."""
        return {"hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
                "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads}


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One pruned shape and what it costs.

    Attributes:
        shape: the sizes.
        parameters: every parameter (a tied LM head counted once).
        non_embedding_parameters: ``parameters`` minus the embedding (and the untied LM head).
        weight_bytes: ``parameters`` x the checkpoint dtype's size.
        kv_cache_bytes: K and V of every layer at the search's ``memory_seq_len`` x ``memory_batch``.
        kind: ``"width"`` (all layers kept), ``"depth"`` (only layers dropped) or ``"width+depth"``.
        budget_fraction: the budgeted measure of this candidate / the budget (<= 1).
    """

    shape: Shape
    parameters: int
    non_embedding_parameters: int
    weight_bytes: int
    kv_cache_bytes: int
    kind: str
    budget_fraction: float

    @property
    def id(self) -> str:
        return self.shape.id

    @property
    def memory_bytes(self) -> int:
        """Weights + KV cache."""
        return self.weight_bytes + self.kv_cache_bytes

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self.shape)
        d.update(id=self.id, parameters=self.parameters, non_embedding_parameters=self.non_embedding_parameters,
                 weight_bytes=self.weight_bytes, kv_cache_bytes=self.kv_cache_bytes, memory_bytes=self.memory_bytes,
                 kind=self.kind, budget_fraction=self.budget_fraction)
        return d


# ---------------------------------------------------------------------------------------------- counting
def _config(config: Any) -> Any:
    return getattr(config, "config", config)


def teacher_shape(config: Any) -> Tuple[Shape, int]:
    """``(shape, head_dim)`` of ``config`` (read through its family's adapter)."""
    from minitron.models import get_adapter

    d = get_adapter(_config(config)).dims(_config(config))
    return Shape(d.hidden_size, d.intermediate_size, d.num_attention_heads, d.num_key_value_heads,
                 d.num_hidden_layers), d.head_dim


def _family_terms(config: Any) -> Dict[str, bool]:
    """Which optional tensors a layer of this family holds: q/k/v biases, the o_proj bias, MLP biases,
    per-head q/k norms."""
    mt = getattr(config, "model_type", "")
    attn_bias = bool(getattr(config, "attention_bias", False))
    return {
        "qkv_bias": mt == "qwen2" or (attn_bias and mt in ("llama", "qwen3", "mistral")),
        "o_bias": attn_bias and mt in ("llama", "qwen3", "mistral"),
        "mlp_bias": bool(getattr(config, "mlp_bias", False)) and mt == "llama",
        "qk_norm": mt == "qwen3",
    }


def _tied(config: Any) -> bool:
    return bool(getattr(config, "tie_word_embeddings", False))


def _layer_parameters(terms: Dict[str, bool], s: Shape, head_dim: int) -> Tuple[int, int]:
    """``(parameters of one layer without the MLP, MLP parameters per intermediate unit)``."""
    H, q, kv = s.hidden_size, s.num_attention_heads * head_dim, s.num_key_value_heads * head_dim
    base = H * q + 2 * H * kv + q * H + 2 * H  # q, k, v, o projections; the two norms
    if terms["qkv_bias"]:
        base += q + 2 * kv
    if terms["o_bias"]:
        base += H
    if terms["qk_norm"]:
        base += 2 * head_dim
    per_unit = 3 * H + (2 if terms["mlp_bias"] else 0)
    if terms["mlp_bias"]:
        base += H  # down_proj bias
    return base, per_unit


def embedding_parameters(config: Any, hidden_size: int) -> int:
    """Parameters of the embedding and (when untied) the LM head at ``hidden_size``."""
    config = _config(config)
    return int(config.vocab_size) * hidden_size * (1 if _tied(config) else 2)


def count_parameters(config: Any, shape: Shape) -> int:
    """Exact parameter count of ``config``'s family at ``shape`` (a tied LM head counted once)."""
    config = _config(config)
    _, head_dim = teacher_shape(config)
    base, per_unit = _layer_parameters(_family_terms(config), shape, head_dim)
    per_layer = base + per_unit * shape.intermediate_size
    return shape.num_hidden_layers * per_layer + embedding_parameters(config, shape.hidden_size) + shape.hidden_size


def weight_dtype_bytes(config: Any) -> int:
    """Bytes per weight of the checkpoint dtype (``dtype``/``torch_dtype`` of the config; fp32 when unset)."""
    config = _config(config)
    dt = getattr(config, "dtype", None) or vars(config).get("torch_dtype") or torch.float32
    if isinstance(dt, str):
        dt = getattr(torch, dt.replace("torch.", ""), torch.float32)
    return int(torch.empty((), dtype=dt).element_size()) if isinstance(dt, torch.dtype) else 4


def kv_cache_bytes(config: Any, shape: Shape, *, seq_len: int, batch: int) -> int:
    """Bytes of the K and V cache of every layer for ``batch`` sequences of ``seq_len`` tokens (checkpoint
    dtype)."""
    _, head_dim = teacher_shape(config)
    return (2 * shape.num_hidden_layers * shape.num_key_value_heads * head_dim * seq_len * batch
            * weight_dtype_bytes(config))


def check_parameter_formula(config: Any, shapes: Sequence[Shape]) -> None:
    """Compare :func:`count_parameters` with the ``numel`` of models built on the ``meta`` device at ``shapes``
    (no memory used); ``ValueError`` when they differ (a family whose tensors the formula does not know)."""
    from transformers import AutoModelForCausalLM

    for s in shapes:
        cfg = _shaped_config(_config(config), s)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        real = sum(p.numel() for p in model.parameters())
        mine = count_parameters(config, s)
        if real != mine:
            raise ValueError(f"the search cannot count the parameters of {getattr(cfg, 'model_type', '?')} models "
                             f"(formula {mine:,} vs the model's {real:,} at {s.id}); this family is not supported "
                             "by `minitron search`")


def _shaped_config(config: Any, s: Shape) -> Any:
    from minitron.compress.prune import depth_config_update
    from minitron.models import get_adapter

    cfg = get_adapter(config).pruned_config(config, **s.width())
    depth_config_update(cfg, list(range(s.num_hidden_layers)))
    return cfg


# ---------------------------------------------------------------------------------------------- the grid
def _floor_limit(value: int, prune: float) -> int:
    """The smallest size pruning by at most ``prune`` keeps (at least 1)."""
    return max(1, math.ceil(value * (1.0 - prune) - 1e-9))


def axis_values(full: int, prune: float, multiple: int) -> List[int]:
    """Sizes on the grid: multiples of ``multiple`` in [``(1 - prune) * full``, ``full``], plus ``full``."""
    lo = _floor_limit(full, prune)
    vals = set(range(math.ceil(lo / multiple) * multiple, full + 1, multiple))
    vals.add(full)
    return sorted(v for v in vals if v >= lo)


def _head_pairs(heads: int, kv: int, prune: float) -> List[Tuple[int, int]]:
    """``(query heads, KV heads)`` pairs within the limit, KV groups respected."""
    if heads == kv:  # multi-head attention: heads and KV heads shrink together
        return [(h, h) for h in range(_floor_limit(heads, prune), heads + 1)]
    per_group = heads // kv
    out = []
    for k in range(_floor_limit(kv, prune), kv + 1):
        for r in range(1, per_group + 1):
            if k * r >= _floor_limit(heads, prune):
                out.append((k * r, k))
    return out


def _width_ok(config: Any, cache: Dict[Tuple[int, int, int], bool], hidden: int, heads: int, kv: int,
              teacher: Shape) -> bool:
    """Whether the family accepts these width sizes (:func:`minitron.compress.prune.validate_width_targets`)."""
    key = (hidden, heads, kv)
    if key not in cache:
        from minitron.compress.prune import validate_width_targets

        try:
            validate_width_targets(config, hidden_size=hidden, intermediate_size=teacher.intermediate_size,
                                   num_attention_heads=heads, num_key_value_heads=kv)
            cache[key] = True
        except ValueError:
            cache[key] = False
    return cache[key]


def _measure(c_params: int, c_nonemb: int, kind: str) -> int:
    return c_params if kind == "total" else c_nonemb


class _Space:
    """The grid of one config under one set of limits; counts are linear in the MLP size per combination."""

    def __init__(self, config: Any, spec: Any) -> None:
        self.config = _config(config)
        self.teacher, self.head_dim = teacher_shape(self.config)
        self.spec = spec
        self.terms = _family_terms(self.config)
        self.dtype_bytes = weight_dtype_bytes(self.config)
        t, w = self.teacher, spec.max_width_prune
        self.hidden = axis_values(t.hidden_size, w, spec.hidden_multiple)
        self.mlp = axis_values(t.intermediate_size, w, spec.mlp_multiple)
        self.heads = _head_pairs(t.num_attention_heads, t.num_key_value_heads, w)
        self.layers = list(range(_floor_limit(t.num_hidden_layers, spec.max_depth_prune), t.num_hidden_layers + 1))
        self._ok: Dict[Tuple[int, int, int], bool] = {}

    def combos(self):
        """``(hidden, heads, kv, layers)`` the family accepts."""
        for h in self.hidden:
            for a, k in self.heads:
                if not _width_ok(self.config, self._ok, h, a, k, self.teacher):
                    continue
                for n in self.layers:
                    yield h, a, k, n

    def candidate(self, s: Shape) -> Candidate:
        params = count_parameters(self.config, s)
        nonemb = params - embedding_parameters(self.config, s.hidden_size)
        kv = (2 * s.num_hidden_layers * s.num_key_value_heads * self.head_dim * self.spec.memory_seq_len
              * self.spec.memory_batch * self.dtype_bytes)  # as kv_cache_bytes
        t = self.teacher
        width = s.width() != t.width()
        depth = s.num_hidden_layers != t.num_hidden_layers
        kind = "width+depth" if width and depth else ("depth" if depth else "width")
        measure = self.budget_measure(params, nonemb, params * self.dtype_bytes + kv)
        return Candidate(s, params, nonemb, params * self.dtype_bytes, kv, kind,
                         measure / self.primary_budget())

    def budget_measure(self, params: int, nonemb: int, memory: int) -> int:
        """The measure the primary budget constrains."""
        if self.spec.target_params is not None:
            return _measure(params, nonemb, self.spec.params_kind)
        return memory

    def primary_budget(self) -> int:
        return int(self.spec.target_params if self.spec.target_params is not None else self.spec.target_memory)

    def meets(self, c: Candidate) -> bool:
        sp = self.spec
        if sp.target_params is not None and _measure(c.parameters, c.non_embedding_parameters,
                                                     sp.params_kind) > sp.target_params:
            return False
        return sp.target_memory is None or c.memory_bytes <= sp.target_memory

    def best_mlp(self, h: int, a: int, k: int, n: int) -> Optional[Candidate]:
        """The candidate with the largest MLP size on the grid that meets the budget, or None."""
        lo, hi = 0, len(self.mlp) - 1
        best = None
        while lo <= hi:  # every measure grows with the MLP size: bisect
            mid = (lo + hi) // 2
            c = self.candidate(Shape(h, self.mlp[mid], a, k, n))
            if self.meets(c):
                best, lo = c, mid + 1
            else:
                hi = mid - 1
        return best


def _range_text(space: _Space, lo: Candidate, hi: Candidate) -> str:
    sp = space.spec
    if sp.target_params is not None:
        what = "parameters" if sp.params_kind == "total" else "non-embedding parameters"
        a = _measure(lo.parameters, lo.non_embedding_parameters, sp.params_kind)
        b = _measure(hi.parameters, hi.non_embedding_parameters, sp.params_kind)
        return f"{a:,} to {b:,} {what}"
    return f"{lo.memory_bytes:,} to {hi.memory_bytes:,} bytes of weights + KV cache"


def reachable_range(config: Any, spec: Any) -> Tuple[Candidate, Candidate]:
    """``(smallest, largest)`` candidate within the pruning limits: every axis at its smallest grid value (the
    smallest accepted by the family), and the teacher itself."""
    space = _Space(config, spec)
    t = space.teacher
    smallest = None
    for h, a, k, n in space.combos():
        c = space.candidate(Shape(h, space.mlp[0], a, k, n))
        if smallest is None or space.budget_measure(c.parameters, c.non_embedding_parameters, c.memory_bytes) < \
                space.budget_measure(smallest.parameters, smallest.non_embedding_parameters, smallest.memory_bytes):
            smallest = c
    largest = space.candidate(t)
    return (smallest if smallest is not None else largest), largest


def enumerate_candidates(config: Any, spec: Any) -> List[Candidate]:
    """Every candidate meeting ``spec``'s budget within its limits, closest to the budget first.

    Args:
        config: the teacher's config (a transformers config or a model).
        spec: a :class:`minitron.search.SearchSpec` (budget, limits, grid, tolerance, memory settings).
    Returns:
        One candidate per accepted combination of hidden size, heads, KV heads and layers (the largest MLP size
        meeting the budget), those within ``spec.tolerance`` of the budget, sorted by budget fraction (largest
        first), then by id.
    Raises:
        SearchSpaceError: the budget is at or above the teacher's size, or below the smallest reachable size, or
            no candidate lands within the tolerance; the message gives the smallest and largest reachable sizes.
    """
    space = _Space(config, spec)
    lo, hi = reachable_range(config, spec)
    where = f"reachable within --max-width-prune {spec.max_width_prune} and --max-depth-prune {spec.max_depth_prune}"
    if space.meets(hi):
        raise SearchSpaceError(f"the budget is at or above the model's own size: nothing to prune (sizes "
                               f"{where}: {_range_text(space, lo, hi)})")
    if not space.meets(lo):
        raise SearchSpaceError(f"no candidate meets the budget: it is below the smallest size {where} "
                               f"({_range_text(space, lo, hi)}); raise the budget or the pruning limits")
    out = []
    for h, a, k, n in space.combos():
        c = space.best_mlp(h, a, k, n)
        if c is not None and c.budget_fraction >= 1.0 - spec.tolerance:
            out.append(c)
    if not out:
        raise SearchSpaceError(f"no candidate lands within --tolerance {spec.tolerance} below the budget (sizes "
                               f"{where}: {_range_text(space, lo, hi)}); raise --tolerance or refine the grid")
    out.sort(key=lambda c: (-c.budget_fraction, c.id))
    log.info("search space: %d hidden x %d MLP x %d head sizes x %d layer counts on the grid; %d candidates within "
             "%.1f%% of the budget", len(space.hidden), len(space.mlp), len(space.heads), len(space.layers), len(out),
             spec.tolerance * 100)
    return out
