"""Scoring candidates right after pruning: held-out LM loss and KL to the teacher, against activations of the
teacher computed once.

The teacher's decoder stack runs once over the scoring data (:class:`TeacherReference`): its final hidden states
(after the final norm, fp32, ``[tokens, hidden]`` -- a few MB, not the ``[tokens, vocab]`` logits) are kept with
its own loss. Each candidate is pruned in memory from the teacher (:func:`build_candidate`: a deep copy, width
then depth, no checkpoint written), runs its own forward once, and its loss and KL are computed chunk by chunk
(:func:`score_model`); the teacher's logits of a chunk are one GEMM of the kept hidden states with its LM head.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from minitron.search.space import Candidate

log = logging.getLogger(__name__)

__all__ = ["TeacherReference", "build_candidate", "score_model", "CHUNK_TOKENS"]

#: Tokens per chunk of the loss/KL computation (two [chunk, vocab] fp32 logit blocks at a time).
CHUNK_TOKENS = 512


def _targets(batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flattened ``(next-token targets [N], CE-valid [N], KL-valid [N])`` of a batch ``[B, S]``: position ``t``
    predicts ``t + 1`` when both are real tokens; the KL counts every real token."""
    ids, mask = batch["input_ids"], batch["attention_mask"] != 0
    tgt = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)
    ce_ok = torch.cat([mask[:, :-1] & mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)
    return tgt.reshape(-1), ce_ok.reshape(-1), mask.reshape(-1)


def _hidden_and_head(model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor,
                                                                                    Optional[torch.Tensor]]:
    from minitron.train.distill import final_hidden_and_head

    h, w, b = final_hidden_and_head(model, batch)
    return h.reshape(-1, h.shape[-1]).float(), w.float(), None if b is None else b.float()


@dataclasses.dataclass
class TeacherReference:
    """The teacher's side of the scoring, computed once and shared by every candidate.

    Attributes:
        batches: the scoring batches (``input_ids``/``attention_mask`` LongTensors ``[B, S]``, on the device).
        hidden: per batch, the teacher's final hidden states ``[B*S, H]`` fp32.
        head_weight: the teacher's LM head ``[V, H]`` (its own tensor, not copied); head_bias ``[V]`` or None.
        loss: the teacher's held-out LM loss; tokens: its predicted-token count.
        forward_s: wall time of one teacher pass over the scoring data (forward + loss), the unit of the
            candidates' scoring cost.
    """

    batches: List[Dict[str, torch.Tensor]]
    hidden: List[torch.Tensor]
    head_weight: torch.Tensor
    head_bias: Optional[torch.Tensor]
    loss: float
    tokens: int
    forward_s: float

    @classmethod
    @torch.no_grad()
    def compute(cls, teacher: torch.nn.Module, batches: Sequence[Dict[str, torch.Tensor]]) -> "TeacherReference":
        """Run ``teacher`` (eval mode) once over ``batches`` (already on its device)."""
        was = teacher.training
        teacher.eval()
        t0 = time.perf_counter()
        hidden, total, count = [], 0.0, 0
        try:
            for batch in batches:
                h, w, b = _hidden_and_head(teacher, batch)
                hidden.append(h)
                tgt, ce_ok, _ = _targets(batch)
                for s in range(0, h.shape[0], CHUNK_TOKENS):
                    logits = F.linear(h[s:s + CHUNK_TOKENS], w, b)
                    ok = ce_ok[s:s + CHUNK_TOKENS]
                    nll = F.cross_entropy(logits, tgt[s:s + CHUNK_TOKENS], reduction="none")
                    total += float((nll * ok).sum(dtype=torch.float64))
                    count += int(ok.sum())
        finally:
            teacher.train(was)
        if count == 0:
            raise ValueError("the scoring data has no predictable (unpadded) token; give more --score-tokens")
        from minitron.models import get_adapter

        head = get_adapter(teacher).lm_head(teacher)
        bias = getattr(head, "bias", None)
        return cls(list(batches), hidden, head.weight, bias, total / count, count, time.perf_counter() - t0)


@torch.no_grad()
def score_model(model: torch.nn.Module, ref: TeacherReference) -> Dict[str, float]:
    """Held-out LM loss and forward KL(teacher || model) of ``model`` on the scoring data of ``ref``.

    Returns:
        ``{"loss": mean next-token cross-entropy over real (token, next token) pairs, "kl": mean
        KL(teacher || model) of the next-token distributions over real tokens (nats), "ppl": exp(loss),
        "tokens": predicted tokens, "score_s": wall time}``.
    """
    was = model.training
    model.eval()
    t0 = time.perf_counter()
    nll_sum, kl_sum, n_ce, n_kl = 0.0, 0.0, 0, 0
    tw = ref.head_weight.float()
    tb = None if ref.head_bias is None else ref.head_bias.float()
    try:
        for batch, th in zip(ref.batches, ref.hidden):
            h, w, b = _hidden_and_head(model, batch)
            tgt, ce_ok, kl_ok = _targets(batch)
            for s in range(0, h.shape[0], CHUNK_TOKENS):
                sl = slice(s, s + CHUNK_TOKENS)
                ls = torch.log_softmax(F.linear(h[sl], w, b), dim=-1)
                lt = torch.log_softmax(F.linear(th[sl], tw, tb), dim=-1)
                nll = -ls.gather(1, tgt[sl, None]).squeeze(1)
                kl = (lt.exp() * (lt - ls)).sum(-1)
                nll_sum += float((nll * ce_ok[sl]).sum(dtype=torch.float64))
                kl_sum += float((kl * kl_ok[sl]).sum(dtype=torch.float64))
                n_ce += int(ce_ok[sl].sum())
                n_kl += int(kl_ok[sl].sum())
    finally:
        model.train(was)
    loss = nll_sum / max(n_ce, 1)
    import math

    return {"loss": loss, "kl": kl_sum / max(n_kl, 1), "ppl": math.exp(min(loss, 700.0)), "tokens": n_ce,
            "score_s": time.perf_counter() - t0}


def build_candidate(teacher: torch.nn.Module, scores: Any, candidate: Candidate, *, depth_metric: str = "lm_loss",
                    backend: str = "auto") -> Tuple[torch.nn.Module, List[int]]:
    """``(pruned copy of teacher, dropped layer indices)``: a deep copy of ``teacher`` width-pruned to the
    candidate's sizes with ``scores`` (:func:`minitron.compress.prune.prune_width`), then depth-pruned by one
    contiguous block chosen by ``depth_metric`` (:func:`minitron.compress.prune.prune_depth`); the teacher is not
    modified and nothing is written. Its parameter count is checked against the candidate's."""
    from minitron.compress.prune import plan_depth, prune_depth, prune_width
    from minitron.models import get_adapter

    model = copy.deepcopy(teacher)
    t = get_adapter(teacher).dims(teacher.config)
    s = candidate.shape
    width = s.width()
    if width != {"hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
                 "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads}:
        prune_width(model, scores, backend=backend, **width)
    dropped: List[int] = []
    if s.num_hidden_layers != t.num_hidden_layers:
        dropped = plan_depth(model.config, num_hidden_layers=s.num_hidden_layers, scores=scores, metric=depth_metric,
                             contiguous=True)
        prune_depth(model, num_hidden_layers=s.num_hidden_layers, scores=scores, metric=depth_metric, contiguous=True)
    real = sum(p.numel() for p in model.parameters())
    if real != candidate.parameters:
        raise RuntimeError(f"candidate {candidate.id}: the pruned model has {real:,} parameters, the search counted "
                           f"{candidate.parameters:,}")
    return model, dropped
