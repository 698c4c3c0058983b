"""Logit distillation of a pruned student from a frozen teacher (Minitron), and teacher correction.

The distillation loss is :func:`minitron.ops.fused_linear_kl_div` on the final hidden states (the
base model's ``last_hidden_state``, after the final norm) and the LM-head weights of both models, so
the ``[tokens x vocab]`` logits are never materialised. Padding positions are masked out. An LM
(cross-entropy) term can be mixed in with ``lm_loss_weight``::

    loss = kl_weight * KL_mode(teacher || student; temperature) + lm_loss_weight * CE(student, next token)

Both the distillation and the teacher correction (LM fine-tuning of the teacher on the distillation
data before pruning) run through the shared loop of :func:`minitron.train.loop.train`.

Known limitation: models whose logits are post-processed after the LM head (final logit soft-capping
or scaling) are distilled on the raw ``hidden @ W.T`` logits; none of the supported families do this.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, asdict, fields
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from minitron.train.loop import Callback, TrainConfig, TrainResult, train
from minitron.io.data import Batch, PackedDataset
from minitron.ops import KL_MODES, MAX_TEMPERATURE  # the ops' declared modes and bound: one list, one number
from minitron.options import option

log = logging.getLogger(__name__)



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

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError/TypeError naming the first bad field."""
        if self.mode not in KL_MODES:
            raise ValueError(f"DistillConfig.mode must be one of {KL_MODES}, got {self.mode!r}")
        for name in ("temperature", "beta", "kl_weight", "lm_loss_weight"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise TypeError(f"DistillConfig.{name} must be a finite number, got {v!r}")
        check_temperature(self.temperature, "DistillConfig.temperature")
        if not 0 <= self.beta <= 1:
            raise ValueError(f"DistillConfig.beta must be in [0, 1], got {self.beta}")
        if self.kl_weight < 0 or self.lm_loss_weight < 0 or self.kl_weight + self.lm_loss_weight == 0:
            raise ValueError(
                f"DistillConfig: kl_weight ({self.kl_weight}) and lm_loss_weight ({self.lm_loss_weight}) must be "
                ">= 0 and not both 0"
            )
        if self.chunk_size is not None and (not isinstance(self.chunk_size, int) or self.chunk_size < 1):
            raise ValueError(f"DistillConfig.chunk_size must be a positive int or None, got {self.chunk_size!r}")
        if not isinstance(self.backend, str):
            raise TypeError(f"DistillConfig.backend must be a string, got {self.backend!r}")

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
        return asdict(self)


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


def check_distillable(student: torch.nn.Module, teacher: torch.nn.Module) -> None:
    """Raise ValueError/TypeError unless student and teacher are supported LMs sharing a vocabulary."""
    from minitron.models import get_adapter

    for name, m in (("student", student), ("teacher", teacher)):
        if not isinstance(m, torch.nn.Module):
            raise TypeError(f"{name} must be a torch.nn.Module, got {type(m).__name__}")
        get_adapter(m).check_model(m)
    if student is teacher:
        raise ValueError("student and teacher are the same model object; prune a copy of the teacher")
    vs = get_adapter(student).lm_head(student).weight.shape[0]
    vt = get_adapter(teacher).lm_head(teacher).weight.shape[0]
    if vs != vt:
        raise ValueError(f"student vocabulary ({vs}) differs from the teacher's ({vt}); they must share a tokenizer")


class DistillationLoss:
    """``loss(student, batch) -> (loss, metrics)``: the distillation loss for :func:`minitron.train.loop.train`.

    The teacher runs under ``torch.no_grad`` (it must be in eval mode with frozen parameters). Metrics
    (detached 0-d tensors, so that the loss compiles without graph breaks): ``kl`` and, with an LM term, ``lm``.

    Under FSDP2 the loop replaces the teacher by a sharded copy (:meth:`with_frozen_models`); its root-group
    parameters (embeddings, final norm, LM head) are unsharded around the teacher's use
    (:func:`minitron.train.distributed.gathered`), and the student's are unsharded by the forward of the
    FSDP root module that calls this loss.
    """

    def __init__(self, teacher: torch.nn.Module, config: DistillConfig) -> None:
        self.teacher = teacher
        self.config = config

    def frozen_models(self) -> Dict[str, torch.nn.Module]:
        """The frozen models the loss uses (for sharding under FSDP2)."""
        return {"teacher": self.teacher}

    def with_frozen_models(self, models: Dict[str, torch.nn.Module]) -> "DistillationLoss":
        """A copy of this loss using ``models["teacher"]``."""
        return DistillationLoss(models["teacher"], self.config)

    def __call__(self, student: torch.nn.Module, batch: Batch) -> Tuple[torch.Tensor, Dict[str, Any]]:
        from minitron.ops import fused_linear_kl_div
        from minitron.train.distributed import gathered

        config = self.config
        mask = batch["attention_mask"] != 0
        s_hidden, s_weight, s_bias = final_hidden_and_head(student, batch)
        # under autocast the hidden states may be bf16 while the (master) weights are fp32
        if s_hidden.dtype != s_weight.dtype:
            s_hidden = s_hidden.to(s_weight.dtype)
        metrics: Dict[str, Any] = {}
        loss = torch.zeros((), device=s_hidden.device, dtype=torch.float32)
        if config.kl_weight > 0:
            # Under FSDP2 the teacher's head weight is an unsharded tensor only inside this block; the op
            # saves only its gradients for backward, so nothing of the teacher is needed after it.
            with gathered(self.teacher):
                with torch.no_grad():
                    t_hidden, t_weight, t_bias = final_hidden_and_head(self.teacher, batch)
                    if t_hidden.dtype != t_weight.dtype:
                        t_hidden = t_hidden.to(t_weight.dtype)
                kl = fused_linear_kl_div(
                    s_hidden, s_weight, t_hidden, t_weight,
                    student_bias=s_bias, teacher_bias=t_bias, mode=config.mode, temperature=config.temperature,
                    beta=config.beta, reduction="mean", mask=mask, chunk_size=config.chunk_size,
                    backend=config.backend,
                )
            metrics["kl"] = kl.detach()
            loss = loss + config.kl_weight * kl
        if config.lm_loss_weight > 0:
            logits = F.linear(s_hidden[:, :-1], s_weight, s_bias).float()
            valid = mask[:, 1:] & mask[:, :-1]
            targets = batch["input_ids"][:, 1:].masked_fill(~valid, -100)
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
            metrics["lm"] = ce.detach()
            loss = loss + config.lm_loss_weight * ce
        return loss, metrics


def make_distillation_loss(teacher: torch.nn.Module, config: DistillConfig) -> DistillationLoss:
    """The loss ``loss_fn(student, batch) -> (loss, metrics)`` for :func:`minitron.train.loop.train`
    (a :class:`DistillationLoss`).

    The teacher runs under ``torch.no_grad`` in eval mode. Metrics: ``kl`` and, with an LM term, ``lm``.
    """
    return DistillationLoss(teacher, config)


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
    **run: Any,
) -> TrainResult:
    """Distil ``teacher`` into ``student`` (trained in place; the teacher is frozen and not modified).

    See :func:`minitron.train.loop.train` for the loop, checkpoints and resume; ``**run`` are its keywords
    (``eval_data``: the student's LM loss / perplexity, ``resume``, ``callbacks``).
    """
    if not isinstance(distill_config, DistillConfig):
        raise TypeError(f"distill_config must be a DistillConfig, got {type(distill_config).__name__}")
    distill_config.validate()
    check_distillable(student, teacher)
    from minitron.runtime import resolve_device

    info = dict(run_info or {})
    info.setdefault("distill", distill_config.to_dict())
    with frozen(teacher, resolve_device(train_config.device)):
        return train(
            student, make_distillation_loss(teacher, distill_config), data, train_config, output_dir,
            run_info=info, **run,
            plot_title=f"distillation ({distill_config.mode} KL, T={distill_config.temperature})",
        )
