"""Perplexity evaluation: token-weighted next-token loss with padding excluded."""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, Iterable, Optional, Union

import torch
import torch.nn.functional as F

from minitron.io.data import Batch, PackedDataset

log = logging.getLogger(__name__)

__all__ = ["perplexity"]


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    data: Union[PackedDataset, Iterable[Batch]],
    *,
    batch_size: int = 8,
    max_batches: Optional[int] = None,
    bf16: Union[str, bool] = False,
    device: Optional[Union[str, torch.device]] = None,
) -> Dict[str, Any]:
    """Token-weighted perplexity of a causal LM.

    Every position ``t`` whose token and next token are both real (attention mask 1) contributes
    ``-log p(x[t+1] | x[<=t])``; the mean over all such positions of all batches is the loss and
    ``exp(loss)`` the perplexity (so a padded sequence counts exactly its real tokens).

    Args:
        model: a ``transformers`` causal LM (returns ``.logits`` [B, S, V]).
        data: a PackedDataset (batched in order) or an iterable of batches with ``input_ids`` /
            ``attention_mask`` LongTensors [B, S].
        batch_size: sequences per forward pass (PackedDataset only).
        max_batches: evaluate at most this many batches.
        bf16: autocast to bf16 (``"auto"``: on CUDA with bf16 support).
        device: where to run (default: the model's device; the model is not moved).

    Returns:
        ``{"loss": float, "ppl": float, "tokens": int (predicted tokens), "sequences": int}``.

    Raises:
        ValueError: the data has no predictable token.
    """
    from minitron.runtime import autocast_context, resolve_bf16

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(data, PackedDataset):
        batches: Iterable[Batch] = data.batches(batch_size, max_batches=max_batches)
    else:
        batches = data
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    use_bf16 = resolve_bf16(bf16, dev)
    was_training = model.training
    model.eval()
    total_nll = 0.0
    total_tokens = 0
    sequences = 0
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            ids = batch["input_ids"].to(dev)
            mask = batch["attention_mask"].to(dev)
            with autocast_context(dev, use_bf16):
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            valid = (mask[:, 1:] != 0) & (mask[:, :-1] != 0)
            nll = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
            )
            total_nll += float((nll * valid.reshape(-1)).sum(dtype=torch.float64))
            total_tokens += int(valid.sum())
            sequences += int(ids.shape[0])
    finally:
        model.train(was_training)
    if total_tokens == 0:
        raise ValueError("perplexity: the evaluation data has no predictable (unpadded) token")
    loss = total_nll / total_tokens
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": total_tokens, "sequences": sequences}
