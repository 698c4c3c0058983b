"""Distil with the Hugging Face ``Trainer`` and minitron's fused linear + KL loss (no logits materialised).

``FusedDistillationTrainer.compute_loss`` runs the student's and the teacher's *backbones* (``model.model``:
hidden states after the final norm, never the LM head), then :func:`minitron.ops.fused_linear_kl_div` projects
them through both LM-head weights chunk by chunk inside the loss: neither ``[tokens, vocab]`` logits tensor
ever exists. Padding positions (``attention_mask == 0``) do not count. ``--compile`` runs the student backbone
under ``torch.compile`` (the loss op itself is compile-safe too).

Offline and on CPU: byte-level BPE trained here on Tiny Shakespeare, random tiny Llamas from ``LlamaConfig``
(the teacher wider than the student), blocks of the play text with random padding.

    python examples/hf_trainer_fused.py --steps 10
    python examples/hf_trainer_fused.py --steps 10 --compile
"""
from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from minitron.ops import fused_linear_kl_div

log = logging.getLogger("examples.hf_trainer_fused")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = REPO / "data" / "tinyshakespeare" / "input.txt"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--mode", choices=("forward", "reverse", "jsd"), default="forward")
    p.add_argument("--beta", type=float, default=0.5, help="JSD weight (mode jsd): 0 forward KL, 1 reverse KL")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--block", type=int, default=64, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="run the student backbone under torch.compile")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    p.add_argument("--output-dir", type=Path, default=None)
    return p.parse_args(argv)


class BlockDataset(torch.utils.data.Dataset):
    """Fixed-length blocks of token ids; some blocks end in padding (``attention_mask`` 0)."""

    def __init__(self, ids: torch.Tensor, block: int, pad_id: int, seed: int) -> None:
        n = ids.numel() // block
        self.ids = ids[: n * block].view(n, block).clone()
        self.mask = torch.ones_like(self.ids)
        g = torch.Generator().manual_seed(seed)
        for i in range(0, n, 3):  # every third block: a random-length padded tail
            keep = int(torch.randint(block // 2, block, (1,), generator=g))
            self.ids[i, keep:] = pad_id
            self.mask[i, keep:] = 0

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i]}


def _trainer_class():
    from transformers import Trainer

    class FusedDistillationTrainer(Trainer):
        """``Trainer`` whose loss is minitron's fused linear KL between the student and a frozen teacher.

        Args (besides ``Trainer``'s): ``teacher_model`` (a ``*ForCausalLM`` sharing the vocabulary), ``mode``,
        ``temperature``, ``beta`` (as :func:`minitron.ops.fused_linear_kl_div`), ``compile_backbone``
        (``torch.compile`` backend name for the student backbone, or None).
        """

        def __init__(self, *args: Any, teacher_model: nn.Module, mode: str = "forward", temperature: float = 2.0,
                     beta: float = 0.5, compile_backbone: Optional[str] = None, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.teacher = teacher_model.to(self.args.device).eval().requires_grad_(False)
            self.kl_kwargs = dict(mode=mode, temperature=float(temperature), beta=float(beta))
            backbone = self.model.get_decoder()
            # Compiled callable kept off the module tree: parameter names and checkpoints stay unchanged.
            self._student_backbone = torch.compile(backbone, backend=compile_backbone) if compile_backbone else backbone

        def compute_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                         num_items_in_batch: Optional[torch.Tensor] = None):
            ids, attention = inputs["input_ids"], inputs["attention_mask"]
            h_s = self._student_backbone(input_ids=ids, attention_mask=attention).last_hidden_state
            with torch.no_grad():
                h_t = self.teacher.get_decoder()(input_ids=ids, attention_mask=attention).last_hidden_state
            head_s, head_t = model.get_output_embeddings(), self.teacher.get_output_embeddings()
            mask = attention.bool()
            loss = fused_linear_kl_div(h_s, head_s.weight, h_t, head_t.weight, student_bias=head_s.bias,
                                       teacher_bias=head_t.bias, mask=mask,
                                       reduction="sum" if num_items_in_batch is not None else "mean",
                                       **self.kl_kwargs)
            if num_items_in_batch is not None:
                loss = loss / num_items_in_batch
            return (loss, {"hidden_states": h_s}) if return_outputs else loss

    return FusedDistillationTrainer


def build(args: argparse.Namespace, output_dir: str):
    """(trainer, tokenizer) for ``args``."""
    from transformers import AutoModelForCausalLM, LlamaConfig, TrainingArguments

    from minitron.io.tokenizer import train_bpe_tokenizer

    text = args.text.read_text(encoding="utf-8")[:200_000]
    tok = train_bpe_tokenizer(texts=[text], vocab_size=args.vocab_size)
    ids = torch.tensor(tok(text[:60_000])["input_ids"], dtype=torch.long)
    base = dict(vocab_size=len(tok), intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=max(128, args.block), pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, initializer_range=0.2)
    torch.manual_seed(args.seed)
    student = AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=32, **base)).float()
    torch.manual_seed(args.seed + 1)
    teacher = AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=64, **base)).float()
    targs = TrainingArguments(output_dir=output_dir, per_device_train_batch_size=args.batch_size,
                              max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant",
                              logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                              dataloader_num_workers=0, remove_unused_columns=False, seed=args.seed,
                              disable_tqdm=True)
    trainer = _trainer_class()(model=student, args=targs,
                               train_dataset=BlockDataset(ids, args.block, tok.pad_token_id, args.seed),
                               teacher_model=teacher, mode=args.mode, temperature=args.temperature, beta=args.beta,
                               compile_backbone=args.compile_backend if args.compile else None)
    return trainer, tok


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Train ``--steps`` steps; returns ``{"losses": [...], "trainer": trainer}``."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        trainer, _ = build(args, str(args.output_dir or tmp))
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    log.info("loss per step: %s", " ".join(f"{x:.4f}" for x in losses))
    return {"losses": losses, "trainer": trainer}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
