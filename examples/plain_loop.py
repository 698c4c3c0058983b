"""Distil in a plain PyTorch loop with minitron's KL loss: no trainer framework.

Three ways to call the loss, picked with ``--loss``:

* ``kl_div`` (default): ``minitron.ops.kl_div(student_logits, teacher_logits, mode=..., temperature=...,
  mask=attention_mask)``, our functional API (``T**2`` scaling on, the Hinton convention);
* ``module``: the same through the ``minitron.ops.KLDivLoss`` module;
* ``torch``: ``minitron.integrations.liger.KLDivLoss``, the ``torch.nn.KLDivLoss(reduction="batchmean")``
  drop-in (student log-probs, teacher probs), on the unpadded tokens.

Offline and on CPU: byte-level BPE trained here on Tiny Shakespeare, random tiny Llamas (teacher wider).

    python examples/plain_loop.py --steps 20
    python examples/plain_loop.py --steps 20 --loss torch
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from minitron.integrations.liger import KLDivLoss as TorchStyleKLDivLoss
from minitron.ops import KLDivLoss, kl_div

log = logging.getLogger("examples.plain_loop")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = REPO / "data" / "tinyshakespeare" / "input.txt"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--loss", choices=("kl_div", "module", "torch"), default="kl_div")
    p.add_argument("--mode", choices=("forward", "reverse", "jsd"), default="forward")
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build(args: argparse.Namespace):
    """(student, teacher, batches): tiny Llamas and a list of (input_ids, attention_mask) batches."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from minitron.io.tokenizer import train_bpe_tokenizer

    text = args.text.read_text(encoding="utf-8")[:200_000]
    tok = train_bpe_tokenizer(texts=[text], vocab_size=args.vocab_size)
    ids = torch.tensor(tok(text[:60_000])["input_ids"], dtype=torch.long)
    n = ids.numel() // args.block
    ids = ids[: n * args.block].view(n, args.block)
    mask = torch.ones_like(ids)
    g = torch.Generator().manual_seed(args.seed)
    for i in range(0, n, 3):  # padded tails on every third sequence
        keep = int(torch.randint(args.block // 2, args.block, (1,), generator=g))
        ids[i, keep:] = tok.pad_token_id
        mask[i, keep:] = 0
    batches = [(ids[i:i + args.batch_size], mask[i:i + args.batch_size])
               for i in range(0, n - args.batch_size + 1, args.batch_size)]
    base = dict(vocab_size=len(tok), intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=max(128, args.block), pad_token_id=tok.pad_token_id,
                initializer_range=0.2)
    torch.manual_seed(args.seed)
    student = AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=32, **base)).float()
    torch.manual_seed(args.seed + 1)
    teacher = AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=64, **base)).float().eval()
    return student, teacher.requires_grad_(False), batches


def make_loss(args: argparse.Namespace):
    """``loss(student_logits [B, S, V], teacher_logits [B, S, V], attention_mask [B, S]) -> scalar``."""
    if args.loss == "kl_div":
        return lambda s, t, m: kl_div(s, t, mode=args.mode, beta=args.beta, temperature=args.temperature,
                                      mask=m.bool())
    if args.loss == "module":
        module = KLDivLoss(mode=args.mode, beta=args.beta, temperature=args.temperature)
        return lambda s, t, m: module(s, t, m.bool())
    torch_style = TorchStyleKLDivLoss(reduction="batchmean")
    temperature = args.temperature

    def torch_loss(s: torch.Tensor, t: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        keep = m.bool()  # rows = unpadded tokens, so batchmean = mean over tokens
        return temperature ** 2 * torch_style((s[keep] / temperature).log_softmax(-1),
                                              (t[keep] / temperature).softmax(-1))

    return torch_loss


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Train ``--steps`` steps; returns ``{"losses": [...], "student": model}``."""
    args = parse_args(argv)
    student, teacher, batches = build(args)
    loss_fn = make_loss(args)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr)
    student.train()
    losses = []
    for step in range(args.steps):
        ids, mask = batches[step % len(batches)]
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, attention_mask=mask).logits
        s_logits = student(input_ids=ids, attention_mask=mask).logits
        loss = loss_fn(s_logits, t_logits, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss))
        log.info("step %d loss %.4f", step, losses[-1])
    return {"losses": losses, "student": student}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
