"""Logit distillation of a pruned student from a frozen teacher (Minitron), and teacher correction.

The distillation loss is :func:`minitron.ops.fused_linear_kl_div` on the final hidden states (the
base model's ``last_hidden_state``, after the final norm) and the LM-head weights of both models, so
the ``[tokens x vocab]`` logits are never materialised. Padding positions are masked out. An LM
(cross-entropy) term can be mixed in with ``lm_loss_weight``::

    loss = kl_weight * KL_mode(teacher || student; temperature) + lm_loss_weight * CE(student, next token)

Both the distillation and the teacher correction (LM fine-tuning of the teacher on the distillation
data before pruning) run through the shared loop of :func:`minitron.train.loop.train`.

Hidden-state terms (``hidden_loss`` = ``"cosine"`` or ``"mse"``): for every mapped pair ``(s, t)`` of decoder
layers (``layer_map``), the **output of student decoder layer s** (the residual stream after the layer, before the
final norm, captured by a forward hook on the layer module) is compared with the output of teacher decoder layer
``t`` by :func:`minitron.ops.hidden_loss.hidden_state_loss` (teacher constant, padding skipped), optionally
through a learned linear projection ``student width -> teacher width``; the term is the mean over the pairs::

    loss = kl_weight * KL + lm_loss_weight * CE + hidden_weight * alpha * mean_pairs(hidden_state_loss)

with ``alpha = 1`` (``hidden_balance="none"``) or, with ``hidden_balance="dynamic"``,
``alpha = (kl_weight * KL + lm_loss_weight * CE) / mean_pairs(hidden_state_loss)`` computed on detached values at
every step: the hidden term then always weighs ``hidden_weight`` times the logit terms (its gradient still comes
from the hidden loss alone). See ``docs/distill-beyond-logits.md``.

Vocabularies that differ in size (a head padded to a multiple of 64/128, appended special tokens): the KL gets the
real vocabulary size (``vocab_size``; detected by :func:`resolve_vocab_size` from the tokenizers and the heads), so
that the columns at or above it count as ``-inf`` on both sides.

Known limitation: models whose logits are post-processed after the LM head (final logit soft-capping
or scaling) are distilled on the raw ``hidden @ W.T`` logits; none of the supported families do this.
"""
from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from dataclasses import dataclass, asdict, fields
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from minitron.train.loop import Callback, TrainConfig, TrainResult, train
from minitron.io.data import Batch, PackedDataset
from minitron.ops import KL_MODES, MAX_TEMPERATURE  # the ops' declared modes and bound: one list, one number
from minitron.options import option

log = logging.getLogger(__name__)

#: hidden-state losses (``none``: logits only)
HIDDEN_LOSSES = ("none", "cosine", "mse")
#: how the hidden term is weighed against the logit terms
HIDDEN_BALANCES = ("none", "dynamic")
#: where :func:`distill_model` saves the trained projections (in the run directory)
PROJECTIONS_NAME = "hidden_projections.safetensors"


def check_temperature(t: Any, name: str) -> None:
    """Refuse a temperature the loss ops would refuse (outside ``(0, minitron.ops.MAX_TEMPERATURE]``), naming
    ``name``: the ops' own check (:func:`minitron.ops.check_kl_options`) run where the user typed the value."""
    from minitron.ops import check_kl_options

    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
        raise TypeError(f"{name} must be a finite number, got {t!r}")
    try:
        check_kl_options(temperature=t)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def parse_layer_map(value: Any, name: str = "--layer-map") -> Optional[List[Tuple[int, int]]]:
    """``"auto"`` -> None; ``"0:0,1:2"`` or a sequence of ``(student, teacher)`` pairs -> the list of pairs.

    Raises:
        ValueError/TypeError naming ``name`` on a malformed map, a negative index or a repeated pair.
    """
    if isinstance(value, str):
        text = value.strip()
        if text == "auto":
            return None
        items: List[Any] = [part.strip() for part in text.split(",")] if text else []
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise TypeError(f"{name} must be 'auto', a string 's:t,s:t,...' or a list of (student, teacher) pairs, "
                        f"got {type(value).__name__}")
    pairs: List[Tuple[int, int]] = []
    for item in items:
        if isinstance(item, str):
            parts = item.split(":")
            if len(parts) != 2 or not all(p.strip().lstrip("-").isdigit() for p in parts):
                raise ValueError(f"{name}: {item!r} is not a student:teacher pair of layer indices (e.g. 0:0,1:2,5:9)")
            pair = (int(parts[0]), int(parts[1]))
        elif (isinstance(item, (list, tuple)) and len(item) == 2
              and all(isinstance(v, int) and not isinstance(v, bool) for v in item)):
            pair = (int(item[0]), int(item[1]))
        else:
            raise ValueError(f"{name}: {item!r} is not a (student, teacher) pair of layer indices")
        if pair[0] < 0 or pair[1] < 0:
            raise ValueError(f"{name}: layer indices must be >= 0, got {pair[0]}:{pair[1]}")
        if pair in pairs:
            raise ValueError(f"{name}: the pair {pair[0]}:{pair[1]} is given twice")
        pairs.append(pair)
    if not pairs:
        raise ValueError(f"{name} is empty; give 'auto' or student:teacher pairs (e.g. 0:0,1:2)")
    return pairs


def format_layer_map(pairs: Optional[Sequence[Tuple[int, int]]]) -> str:
    """The canonical text of a layer map (``"auto"`` for None)."""
    return "auto" if pairs is None else ",".join(f"{s}:{t}" for s, t in pairs)


@dataclass
class DistillConfig:
    """Loss settings for distillation.

    Attributes:
        mode: "forward" (KL(teacher || student), the Minitron default), "reverse" or "jsd".
        temperature: softmax temperature of both models (the loss is scaled by T^2).
        beta: JSD mixing weight (mode="jsd" only; TRL/Liger convention: 0 = forward KL, 1 = reverse KL).
        kl_weight: weight of the KL term.
        lm_loss_weight: weight of the student's next-token cross-entropy (0: pure distillation).
        chunk_size: tokens per chunk in the fused KL (None: the op's default).
        backend: KL kernel backend ("auto", "cpp", "cuda", "triton", "reference").
        hidden_loss: "none" (logits only), "cosine" or "mse" between the outputs of mapped decoder layers.
        hidden_weight: weight of the hidden-state term (the mean over the mapped pairs).
        layer_map: "auto" (from the student's pruning record ``config.minitron_pruning``; 1:1 when the layer
            counts match and there is no record) or student:teacher pairs, ``"0:0,1:2,5:9"`` (or a list of pairs).
        hidden_projection: None (a learned projection exactly when the hidden sizes differ), True (require one:
            an error for equal widths), False (never: an error for different widths).
        hidden_balance: "none" (``hidden_weight`` as is) or "dynamic" (rescaled every step so that the hidden
            term weighs ``hidden_weight`` times the logit terms; see the module docstring).
        hidden_backend: backend of :func:`minitron.ops.hidden_loss.hidden_state_loss` (same names as ``backend``).
        vocab_size: the real vocabulary for the KL (columns at or above it count as -inf on both sides);
            None: detected from the tokenizers and heads (:func:`resolve_vocab_size`).
    """

    mode: str = option("forward", help="KL direction", choices=KL_MODES, flag=("--kl-mode",))
    temperature: float = option(1.0, help=f"softmax temperature of both models, in (0, {MAX_TEMPERATURE:g}] "
                                         "(minitron.ops.MAX_TEMPERATURE)")
    beta: float = option(0.5, help="JSD mixing weight, in [0, 1] (--kl-mode jsd)")
    kl_weight: float = option(1.0, help="weight of the KL term")
    lm_loss_weight: float = option(0.0, help="weight of the student's LM loss mixed in")
    chunk_size: Optional[int] = option(None, help="tokens per chunk in the fused KL", default_text="the op's")
    backend: str = option("auto", help="KL kernel backend: auto, cpp, cuda, triton, reference",
                          aliases=("kl_backend",))
    hidden_loss: str = option("none", help="hidden-state loss between the outputs of mapped decoder layers",
                              choices=HIDDEN_LOSSES)
    hidden_weight: float = option(1.0, help="weight of the hidden-state term (mean over the mapped layer pairs)")
    layer_map: Any = option("auto", help="student:teacher decoder-layer pairs for --hidden-loss, e.g. 0:0,1:2,5:9, or "
                            "auto (from the pruning record in the student's config; 1:1 for equal layer counts)")
    hidden_projection: Optional[bool] = option(None, help="learned student->teacher width projection for "
                                               "--hidden-loss (--no-hidden-projection: never)",
                                               default_text="exactly when the hidden sizes differ")
    hidden_balance: str = option("none", help="none, or dynamic: rescale the hidden term every step to "
                                 "--hidden-weight times the logit terms", choices=HIDDEN_BALANCES)
    hidden_backend: str = option("auto", help="hidden-state loss kernel backend: auto, cpp, cuda, triton, reference")
    vocab_size: Optional[int] = option(None, help="real vocabulary size for the KL (padded columns at or above it "
                                       "count as -inf)", default_text="detected from the tokenizers and heads")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError/TypeError naming the first bad field."""
        if self.mode not in KL_MODES:
            raise ValueError(f"DistillConfig.mode must be one of {KL_MODES}, got {self.mode!r}")
        for name in ("temperature", "beta", "kl_weight", "lm_loss_weight", "hidden_weight"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise TypeError(f"DistillConfig.{name} must be a finite number, got {v!r}")
        check_temperature(self.temperature, "DistillConfig.temperature")
        if not 0 <= self.beta <= 1:
            raise ValueError(f"DistillConfig.beta must be in [0, 1], got {self.beta}")
        if self.hidden_loss not in HIDDEN_LOSSES:
            raise ValueError(f"DistillConfig.hidden_loss must be one of {HIDDEN_LOSSES}, got {self.hidden_loss!r}")
        if self.hidden_balance not in HIDDEN_BALANCES:
            raise ValueError(f"DistillConfig.hidden_balance must be one of {HIDDEN_BALANCES}, got "
                             f"{self.hidden_balance!r}")
        hidden = self.hidden_loss != "none"
        if self.hidden_weight < 0 or (hidden and self.hidden_weight == 0):
            raise ValueError(f"DistillConfig.hidden_weight must be > 0 with a hidden loss (and never < 0), got "
                             f"{self.hidden_weight}")
        if self.kl_weight < 0 or self.lm_loss_weight < 0 or (self.kl_weight + self.lm_loss_weight == 0 and not hidden):
            raise ValueError(
                f"DistillConfig: kl_weight ({self.kl_weight}) and lm_loss_weight ({self.lm_loss_weight}) must be "
                ">= 0 and not both 0 (unless a hidden-state loss is on)"
            )
        self.layer_map = format_layer_map(parse_layer_map(self.layer_map, "DistillConfig.layer_map (--layer-map)"))
        if self.hidden_projection is not None and not isinstance(self.hidden_projection, bool):
            raise TypeError(f"DistillConfig.hidden_projection must be None, True or False, got "
                            f"{self.hidden_projection!r}")
        if not hidden and (self.hidden_projection or self.layer_map != "auto" or self.hidden_balance != "none"):
            raise ValueError("DistillConfig: layer_map (--layer-map), hidden_projection and hidden_balance need a "
                             "hidden-state loss (--hidden-loss cosine or mse)")
        if self.vocab_size is not None and (not isinstance(self.vocab_size, int) or isinstance(self.vocab_size, bool)
                                            or self.vocab_size < 1):
            raise ValueError(f"DistillConfig.vocab_size must be a positive int or None, got {self.vocab_size!r}")
        if self.chunk_size is not None and (not isinstance(self.chunk_size, int) or self.chunk_size < 1):
            raise ValueError(f"DistillConfig.chunk_size must be a positive int or None, got {self.chunk_size!r}")
        for name in ("backend", "hidden_backend"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"DistillConfig.{name} must be a string, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, d: Optional[Dict[str, Any]]) -> "DistillConfig":
        """Build from a mapping; unknown keys raise a ValueError naming the valid ones."""
        d = dict(d or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown distillation option(s) {unknown}; valid: {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> Dict[str, Any]:
        """The settings as a dict; the hidden-state and vocabulary fields only when not at their defaults (so a run
        recorded before they existed resumes unchanged)."""
        d = asdict(self)
        for name, default in _LATER_DEFAULTS.items():
            if d[name] == default:
                del d[name]
        return d


_LATER_DEFAULTS = {"hidden_loss": "none", "hidden_weight": 1.0, "layer_map": "auto", "hidden_projection": None,
                   "hidden_balance": "none", "hidden_backend": "auto", "vocab_size": None}


# --------------------------------------------------------------------------------------------------
# hidden-state distillation: the layer map, the projections, the captured layer outputs


def pruning_record(config: Any) -> Optional[Dict[str, Any]]:
    """The pruning record a pruned student carries in its config (``config.minitron_pruning``), or None.

    The record: ``{"source_num_hidden_layers": L0, "kept_layers": [teacher layer of each student layer],
    "source_hidden_size": H0, "kept_channels": [teacher channel of each student channel] or None}``.

    Raises:
        ValueError: a record that is malformed or does not fit ``config`` (naming the field).
    """
    config = getattr(config, "config", config)
    rec = getattr(config, "minitron_pruning", None)
    if rec is None:
        return None
    where = "the student's pruning record (config.minitron_pruning)"
    if not isinstance(rec, dict):
        raise ValueError(f"{where} must be a mapping, got {type(rec).__name__}")
    n_layers, width = int(config.num_hidden_layers), int(config.hidden_size)
    l0, kept = rec.get("source_num_hidden_layers"), rec.get("kept_layers")
    if not isinstance(l0, int) or l0 < n_layers:
        raise ValueError(f"{where}: source_num_hidden_layers must be an int >= the student's {n_layers} layers, "
                         f"got {l0!r}")
    if (not isinstance(kept, (list, tuple)) or len(kept) != n_layers
            or not all(isinstance(i, int) and 0 <= i < l0 for i in kept)):
        raise ValueError(f"{where}: kept_layers must list one teacher layer in [0, {l0}) per student layer "
                         f"({n_layers}), got {kept!r}")
    h0, chans = rec.get("source_hidden_size"), rec.get("kept_channels")
    if h0 is not None and (not isinstance(h0, int) or h0 < 1):
        raise ValueError(f"{where}: source_hidden_size must be a positive int, got {h0!r}")
    if chans is not None and (not isinstance(chans, (list, tuple)) or len(chans) != width or h0 is None
                              or not all(isinstance(c, int) and 0 <= c < h0 for c in chans)
                              or len(set(chans)) != width):
        raise ValueError(f"{where}: kept_channels must be None or {width} distinct teacher channels in "
                         f"[0, source_hidden_size)")
    return {"source_num_hidden_layers": l0, "kept_layers": [int(i) for i in kept], "source_hidden_size": h0,
            "kept_channels": None if chans is None else [int(c) for c in chans]}


@dataclass
class HiddenPlan:
    """What a hidden-state distillation compares: ``pairs`` of (student layer, teacher layer), the widths, and
    whether (and from which kept channels) a projection student -> teacher width is learned."""

    pairs: List[Tuple[int, int]]
    student_hidden: int
    teacher_hidden: int
    projection: bool
    kept_channels: Optional[List[int]]
    source: str  # how the pairs were chosen (for the log)


def plan_hidden_distillation(config: DistillConfig, student_config: Any, teacher_config: Any) -> Optional[HiddenPlan]:
    """Resolve ``config.layer_map`` and the projection against the two models' configs (nothing is loaded).

    ``student_config``/``teacher_config``: the models' configs (or the models). Returns None without a hidden loss.

    Raises:
        ValueError naming ``--layer-map`` (a layer that does not exist, ``auto`` without a record for different
        layer counts, a record from another teacher) or ``--hidden-projection`` (asked for equal widths, refused for
        different widths).
    """
    if config.hidden_loss == "none":
        return None
    s_cfg, t_cfg = getattr(student_config, "config", student_config), getattr(teacher_config, "config", teacher_config)
    ls, lt = int(s_cfg.num_hidden_layers), int(t_cfg.num_hidden_layers)
    hs, ht = int(s_cfg.hidden_size), int(t_cfg.hidden_size)
    rec = pruning_record(s_cfg)
    pairs = parse_layer_map(config.layer_map)
    if pairs is None:
        if rec is not None:
            if rec["source_num_hidden_layers"] != lt:
                raise ValueError(f"--layer-map auto: the student's pruning record says it was cut from a "
                                 f"{rec['source_num_hidden_layers']}-layer model, the teacher has {lt} layers; give "
                                 "--layer-map explicitly")
            pairs, source = list(enumerate(rec["kept_layers"])), "the pruning record"
        elif ls == lt:
            pairs, source = [(i, i) for i in range(ls)], "1:1 (equal layer counts)"
        else:
            raise ValueError(f"--layer-map auto: the student has {ls} decoder layers and the teacher {lt}, and the "
                             "student's config holds no pruning record (config.minitron_pruning); give --layer-map "
                             "explicitly, e.g. 0:0,1:2")
    else:
        source = "--layer-map"
        for s, t in pairs:
            if s >= ls:
                raise ValueError(f"--layer-map: student layer {s} does not exist (the student has {ls} decoder "
                                 f"layers, 0..{ls - 1})")
            if t >= lt:
                raise ValueError(f"--layer-map: teacher layer {t} does not exist (the teacher has {lt} decoder "
                                 f"layers, 0..{lt - 1})")
    if config.hidden_projection is True and hs == ht:
        raise ValueError(f"--hidden-projection: the student and the teacher have the same hidden size ({hs}); a "
                         "projection is only learned between different widths")
    if config.hidden_projection is False and hs != ht:
        raise ValueError(f"--no-hidden-projection: the hidden sizes differ (student {hs}, teacher {ht}); their states "
                         "cannot be compared without a projection")
    chans = None
    if hs != ht and rec is not None and rec["kept_channels"] is not None and rec["source_hidden_size"] == ht:
        chans = rec["kept_channels"]
    return HiddenPlan(pairs, hs, ht, hs != ht, chans, source)


def _pair_key(s: int, t: int) -> str:
    return f"s{s}_t{t}"


class HiddenProjections(torch.nn.Module):
    """One learned ``Linear(student_hidden -> teacher_hidden, bias=False)`` per mapped layer pair.

    Initialised from the pruning's kept channels: ``weight[kept[j], j] = 1`` (identity on the kept channels, zero
    elsewhere), so at step 0 the projected student state sits on the teacher channels it was cut from. Without a
    channel record the first ``min(Hs, Ht)`` channels are mapped to each other (a warning says so).
    """

    def __init__(self, plan: HiddenPlan) -> None:
        super().__init__()
        hs, ht = plan.student_hidden, plan.teacher_hidden
        chans = plan.kept_channels
        if chans is None:
            log.warning("hidden-state projections %d -> %d: no kept-channel record in the student's config; "
                        "initialised as identity on the first %d channels", hs, ht, min(hs, ht))
            rows, cols = list(range(min(hs, ht))), list(range(min(hs, ht)))
        else:
            rows, cols = list(chans), list(range(hs))
        self.pairs = list(plan.pairs)
        self.proj = torch.nn.ModuleDict()
        for s, t in plan.pairs:
            lin = torch.nn.Linear(hs, ht, bias=False)
            with torch.no_grad():
                lin.weight.zero_()
                lin.weight[rows, cols] = 1.0
            self.proj[_pair_key(s, t)] = lin

    def forward(self, s: int, t: int, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [..., Hs]`` of student layer ``s`` projected to ``[..., Ht]`` for teacher layer ``t``."""
        lin = self.proj[_pair_key(s, t)]
        return F.linear(hidden.to(lin.weight.dtype), lin.weight)  # under autocast: in the autocast dtype


def save_projections(projections: HiddenProjections, path: Any, plan: HiddenPlan, hidden_loss: str) -> Path:
    """Write the projections as safetensors (keys ``proj.s{S}_t{T}.weight`` ``[Ht, Hs]`` fp32, metadata: the
    pairs, widths and loss), atomically."""
    import json as _json

    from safetensors.torch import save

    from minitron.io.files import atomic_write_bytes

    tensors = {k: v.detach().float().cpu().contiguous() for k, v in projections.state_dict().items()}
    meta = {"pairs": _json.dumps(plan.pairs), "student_hidden": str(plan.student_hidden),
            "teacher_hidden": str(plan.teacher_hidden), "hidden_loss": hidden_loss}
    path = Path(path)
    atomic_write_bytes(path, save(tensors, metadata=meta))
    return path


@contextlib.contextmanager
def capture_layer_outputs(model: torch.nn.Module, indices: Sequence[int]) -> Iterator[Dict[int, torch.Tensor]]:
    """Within the block, every forward of ``model`` fills ``{i: output of decoder layer i}`` (``[B, S, H]``: the
    residual stream after the layer, before the final norm) for the layers ``indices``, via forward hooks that are
    removed on exit (on error too). Layers returning a tuple give its first element."""
    from minitron.models import get_adapter

    store: Dict[int, torch.Tensor] = {}
    handles = []
    if indices:
        layers = get_adapter(model).layers(model)
        for i in sorted(set(indices)):

            def hook(module: torch.nn.Module, args: Any, output: Any, i: int = i) -> None:
                store[i] = output[0] if isinstance(output, (tuple, list)) else output

            handles.append(layers[i].register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------------------------------
# vocabularies


def resolve_vocab_size(student: torch.nn.Module, teacher: Optional[torch.nn.Module], *, tokenizers: Sequence[Any] = (),
                       requested: Optional[int] = None, teacher_vocab: Optional[int] = None) -> Optional[int]:
    """The real vocabulary size the KL must use, or None when both heads are exactly the vocabulary.

    The heads' rows (``Vs``, ``Vt``; ``teacher_vocab`` stands for the teacher's head with a stored teacher) may
    exceed the tokenizer (a head padded to a multiple of 64 or 128) and may differ from each other. With
    tokenizers (the student's and the teacher's, or one of them), they must agree on every id they share
    (:func:`minitron.io.tokenizer.shared_vocab_size`: only padding and appended special tokens may differ) and the
    real vocabulary is the shared ids; without, heads of different sizes are refused. ``requested``
    (``--vocab-size``) overrides the detection but must fit both heads. What was done is logged.

    Raises:
        ValueError naming the first differing token ids, or a vocabulary larger than a head.
    """
    from minitron.io.tokenizer import shared_vocab_size
    from minitron.models import get_adapter

    vs = int(get_adapter(student).lm_head(student).weight.shape[0])
    vt = int(get_adapter(teacher).lm_head(teacher).weight.shape[0]) if teacher is not None else int(teacher_vocab or vs)
    toks = [t for t in tokenizers if t is not None]
    n_tok = None
    if len(toks) >= 2:
        n_tok = shared_vocab_size(toks[0], toks[1])
    elif len(toks) == 1:
        n_tok = len(toks[0])
    if requested is not None:
        if requested > min(vs, vt):
            raise ValueError(f"vocab_size (--vocab-size) {requested} exceeds a head: student {vs} rows, teacher {vt}")
        real, why = int(requested), "given (--vocab-size)"
    elif n_tok is not None:
        if n_tok > min(vs, vt):
            raise ValueError(f"the tokenizer has {n_tok} tokens but the {'student' if vs < vt else 'teacher'}'s LM "
                             f"head only {min(vs, vt)} rows; the models do not fit the tokenizer")
        real, why = n_tok, "from the tokenizer" + ("s" if len(toks) >= 2 else "")
    elif vs != vt:
        raise ValueError(f"student vocabulary ({vs}) differs from the teacher's ({vt}) and no tokenizer shows which "
                         "ids they share; give the tokenizers, or the real vocabulary size (vocab_size / --vocab-size)")
    else:
        return None
    if real == vs == vt:
        return None
    log.info("vocabulary: student head %d rows, teacher head %d rows; the KL uses the first %d ids (%s), the columns "
             "at or above %d count as -inf on both sides", vs, vt, real, why, real)
    return real


# --------------------------------------------------------------------------------------------------
# the loss


def final_hidden_and_head(model: torch.nn.Module, batch: Batch) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Run the decoder stack only.

    Returns:
        ``(hidden [B, S, H] (after the final norm), lm_head weight [V, H], lm_head bias [V] or None)``.
    """
    from minitron.models import get_adapter

    adapter = get_adapter(model)
    out = adapter.base_model(model)(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    )
    head = adapter.lm_head(model)
    return out.last_hidden_state, head.weight, getattr(head, "bias", None)


def check_distillable(student: torch.nn.Module, teacher: torch.nn.Module, *, vocab_size: Optional[int] = None) -> None:
    """Raise ValueError/TypeError unless student and teacher are supported LMs sharing a vocabulary: heads of the
    same size, or (``vocab_size``, the real vocabulary from :func:`resolve_vocab_size`) heads that both hold it."""
    from minitron.models import get_adapter

    for name, m in (("student", student), ("teacher", teacher)):
        if not isinstance(m, torch.nn.Module):
            raise TypeError(f"{name} must be a torch.nn.Module, got {type(m).__name__}")
        get_adapter(m).check_model(m)
    if student is teacher:
        raise ValueError("student and teacher are the same model object; prune a copy of the teacher")
    vs = get_adapter(student).lm_head(student).weight.shape[0]
    vt = get_adapter(teacher).lm_head(teacher).weight.shape[0]
    if vocab_size is None and vs != vt:
        raise ValueError(f"student vocabulary ({vs}) differs from the teacher's ({vt}); give the tokenizers (or the "
                         "real vocabulary size, vocab_size / --vocab-size) when one head is padded")
    if vocab_size is not None and vocab_size > min(vs, vt):
        raise ValueError(f"vocab_size {vocab_size} exceeds a head (student {vs} rows, teacher {vt})")


class DistillationLoss:
    """``loss(student, batch) -> (loss, metrics)``: the distillation loss for :func:`minitron.train.loop.train`.

    The teacher runs under ``torch.no_grad`` (it must be in eval mode with frozen parameters). Metrics (detached
    0-d tensors, so that the loss compiles without graph breaks): ``kl``; with an LM term ``lm``; with a hidden
    loss ``hidden`` (mean over the pairs, unweighted) and, balanced, ``hidden_alpha``.

    Hidden-state terms (``hidden``: a :class:`HiddenPlan`) capture the mapped decoder-layer outputs of both models
    with forward hooks during their one forward each; ``projections`` (a :class:`HiddenProjections`, trained with
    the student) is returned by :meth:`trainable_modules`, which the loop adds to the optimizer and checkpoints.
    ``vocab_size``: the real vocabulary passed to the KL op (None: the heads are the vocabulary).

    Under FSDP2 the loop replaces the teacher by a sharded copy (:meth:`with_frozen_models`); its root-group
    parameters (embeddings, final norm, LM head) are unsharded around the teacher's use
    (:func:`minitron.train.distributed.gathered`), and the student's are unsharded by the forward of the
    FSDP root module that calls this loss.
    """

    def __init__(self, teacher: torch.nn.Module, config: DistillConfig, *, hidden: Optional[HiddenPlan] = None,
                 projections: Optional[HiddenProjections] = None, vocab_size: Optional[int] = None) -> None:
        self.teacher = teacher
        self.config = config
        self.hidden = hidden if config.hidden_loss != "none" else None
        self.projections = projections
        self.vocab_size = vocab_size
        if self.hidden is not None and self.hidden.projection and projections is None:
            raise ValueError("the hidden-state plan needs projections (widths differ): pass projections=")

    def frozen_models(self) -> Dict[str, torch.nn.Module]:
        """The frozen models the loss uses (for sharding under FSDP2)."""
        return {"teacher": self.teacher}

    def with_frozen_models(self, models: Dict[str, torch.nn.Module]) -> "DistillationLoss":
        """A copy of this loss using ``models["teacher"]``."""
        return DistillationLoss(models["teacher"], self.config, hidden=self.hidden, projections=self.projections,
                                vocab_size=self.vocab_size)

    def trainable_modules(self) -> Dict[str, torch.nn.Module]:
        """Modules trained with the student (the hidden-state projections), by name; empty without."""
        return {"hidden_projections": self.projections} if self.projections is not None else {}

    def _hidden_term(self, s_states: Dict[int, torch.Tensor], t_states: Dict[int, torch.Tensor],
                     mask: torch.Tensor) -> torch.Tensor:
        """Mean over the mapped pairs of ``hidden_state_loss`` (fp32 scalar)."""
        from minitron.ops.hidden_loss import hidden_state_loss

        assert self.hidden is not None
        total = None
        for s, t in self.hidden.pairs:
            hs, ht = s_states[s], t_states[t].detach()
            if self.projections is not None:
                hs = self.projections(s, t, hs)
            if hs.dtype != ht.dtype:
                ht = ht.to(hs.dtype)
            term = hidden_state_loss(hs, ht, mask, loss=self.config.hidden_loss, reduction="mean",
                                     backend=self.config.hidden_backend).float()
            total = term if total is None else total + term
        assert total is not None
        return total / len(self.hidden.pairs)

    def __call__(self, student: torch.nn.Module, batch: Batch) -> Tuple[torch.Tensor, Dict[str, Any]]:
        from minitron.ops import fused_linear_kl_div
        from minitron.train.distributed import gathered

        config = self.config
        mask = batch["attention_mask"] != 0
        pairs = self.hidden.pairs if self.hidden is not None else []
        with capture_layer_outputs(student, [s for s, _ in pairs]) as s_states:
            s_hidden, s_weight, s_bias = final_hidden_and_head(student, batch)
        # under autocast the hidden states may be bf16 while the (master) weights are fp32
        if s_hidden.dtype != s_weight.dtype:
            s_hidden = s_hidden.to(s_weight.dtype)
        metrics: Dict[str, Any] = {}
        loss = torch.zeros((), device=s_hidden.device, dtype=torch.float32)
        vocab_kw = {"vocab_size": self.vocab_size} if self.vocab_size is not None else {}
        t_states: Dict[int, torch.Tensor] = {}
        if config.kl_weight > 0 or pairs:
            # Under FSDP2 the teacher's head weight is an unsharded tensor only inside this block; the op
            # saves only its gradients for backward, so nothing of the teacher is needed after it.
            with gathered(self.teacher):
                with torch.no_grad(), capture_layer_outputs(self.teacher, [t for _, t in pairs]) as t_states:
                    t_hidden, t_weight, t_bias = final_hidden_and_head(self.teacher, batch)
                    if t_hidden.dtype != t_weight.dtype:
                        t_hidden = t_hidden.to(t_weight.dtype)
                if config.kl_weight > 0:
                    kl = fused_linear_kl_div(
                        s_hidden, s_weight, t_hidden, t_weight,
                        student_bias=s_bias, teacher_bias=t_bias, mode=config.mode, temperature=config.temperature,
                        beta=config.beta, reduction="mean", mask=mask, chunk_size=config.chunk_size,
                        backend=config.backend, **vocab_kw,
                    )
                    metrics["kl"] = kl.detach()
                    loss = loss + config.kl_weight * kl
        if config.lm_loss_weight > 0:
            logits = F.linear(s_hidden[:, :-1], s_weight, s_bias).float()
            if self.vocab_size is not None and self.vocab_size < logits.shape[-1]:
                logits = logits[..., :self.vocab_size]  # padded rows of the head are no tokens
            valid = mask[:, 1:] & mask[:, :-1]
            targets = batch["input_ids"][:, 1:].masked_fill(~valid, -100)
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
            metrics["lm"] = ce.detach()
            loss = loss + config.lm_loss_weight * ce
        if pairs:
            hid = self._hidden_term(s_states, t_states, mask)
            metrics["hidden"] = hid.detach()
            weight: Any = config.hidden_weight
            if config.hidden_balance == "dynamic" and (config.kl_weight > 0 or config.lm_loss_weight > 0):
                alpha = loss.detach() / hid.detach().clamp_min(1e-12)
                metrics["hidden_alpha"] = alpha
                weight = weight * alpha
            loss = loss + weight * hid
        return loss, metrics


def make_distillation_loss(teacher: torch.nn.Module, config: DistillConfig, **kw: Any) -> DistillationLoss:
    """The loss ``loss_fn(student, batch) -> (loss, metrics)`` for :func:`minitron.train.loop.train`
    (a :class:`DistillationLoss`; ``**kw``: its ``hidden``, ``projections``, ``vocab_size``).

    The teacher runs under ``torch.no_grad`` in eval mode. Metrics: ``kl`` and, with an LM term, ``lm``.
    """
    return DistillationLoss(teacher, config, **kw)


@contextlib.contextmanager
def frozen(model: torch.nn.Module, device: torch.device) -> Iterator[torch.nn.Module]:
    """``model`` moved to ``device``, in eval mode with gradients off, for the ``with`` block; its training flag
    and ``requires_grad`` flags are restored afterwards (on error too). The teacher of a distillation run and of
    a teacher-logit pass is held this way."""
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was_training)


def distill_model(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    data: PackedDataset,
    train_config: TrainConfig,
    distill_config: DistillConfig,
    output_dir: Any,
    *,
    run_info: Optional[Dict[str, Any]] = None,
    tokenizers: Sequence[Any] = (),
    **run: Any,
) -> TrainResult:
    """Distil ``teacher`` into ``student`` (trained in place; the teacher is frozen and not modified).

    Args:
        tokenizers: the student's and the teacher's tokenizers (or one shared one), to detect padded or differing
            heads (:func:`resolve_vocab_size`); empty: from the heads alone.
        **run: :func:`minitron.train.loop.train`'s keywords (``eval_data``: the student's LM loss / perplexity,
            ``resume``, ``callbacks``).

    With a hidden-state loss whose widths differ, the projections are trained with the student (and carried by
    the checkpoints and ``resume``) and saved to ``output_dir/hidden_projections.safetensors``
    (``result.extra["hidden_projections"]``).
    """
    if not isinstance(distill_config, DistillConfig):
        raise TypeError(f"distill_config must be a DistillConfig, got {type(distill_config).__name__}")
    distill_config.validate()
    for name, m in (("student", student), ("teacher", teacher)):
        if not isinstance(m, torch.nn.Module):
            raise TypeError(f"{name} must be a torch.nn.Module, got {type(m).__name__}")
    vocab = resolve_vocab_size(student, teacher, tokenizers=tuple(tokenizers), requested=distill_config.vocab_size)
    check_distillable(student, teacher, vocab_size=vocab)
    plan = plan_hidden_distillation(distill_config, student.config, teacher.config)
    projections = None
    if plan is not None:
        from minitron.ops.hidden_loss import hidden_state_loss
        from minitron.runtime import resolve_device as _dev

        probe = torch.zeros(1, 2, device=_dev(train_config.device))  # the backend must run here: fail before training
        hidden_state_loss(probe, probe, loss=distill_config.hidden_loss, backend=distill_config.hidden_backend)

        log.info("hidden-state distillation (%s, weight %g, balance %s): %d layer pairs from %s: %s%s",
                 distill_config.hidden_loss, distill_config.hidden_weight, distill_config.hidden_balance,
                 len(plan.pairs), plan.source, format_layer_map(plan.pairs),
                 f"; projections {plan.student_hidden} -> {plan.teacher_hidden}" if plan.projection else "")
        if plan.projection:
            if train_config.strategy == "fsdp2":
                raise ValueError("hidden-state projections (different widths) are not supported under --strategy "
                                 "fsdp2 yet; use ddp, or a student of the teacher's width")
            projections = HiddenProjections(plan)
    from minitron.runtime import resolve_device

    info = dict(run_info or {})
    info.setdefault("distill", distill_config.to_dict())
    if vocab is not None:
        info.setdefault("vocab_size", vocab)
    if plan is not None:
        info.setdefault("layer_map", format_layer_map(plan.pairs))
    loss = make_distillation_loss(teacher, distill_config, hidden=plan, projections=projections, vocab_size=vocab)
    title = f"distillation ({distill_config.mode} KL, T={distill_config.temperature}" + (
        f", {distill_config.hidden_loss} hidden states)" if plan is not None else ")")
    with frozen(teacher, resolve_device(train_config.device)):
        result = train(student, loss, data, train_config, output_dir, run_info=info, plot_title=title, **run)
    if projections is not None and plan is not None:
        from minitron.train.distributed import is_main_process

        path = Path(output_dir) / PROJECTIONS_NAME
        if is_main_process():
            save_projections(projections, path, plan, distill_config.hidden_loss)
            log.info("hidden-state projections saved to %s", path)
        result.extra["hidden_projections"] = str(path)
    return result
