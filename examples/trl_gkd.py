"""Distil a tiny Llama with TRL's GKDTrainer (or DistillationTrainer), the loss computed by minitron's kernels.

Offline and on CPU: the tokenizer is a byte-level BPE trained here on Tiny Shakespeare, the teacher and the
student are random tiny Llamas built from ``LlamaConfig`` (the teacher wider), and the data are chat pairs of
consecutive lines of the play text. The trainer is ``MinitronGKDTrainer`` (TRL's ``GKDTrainer`` whose
``generalized_jsd_loss`` is :func:`minitron.integrations.trl.generalized_jsd_loss`); ``--trl-loss`` runs TRL's
own loss instead, for comparison.

``--trainer distillation`` runs TRL's on-policy ``DistillationTrainer`` instead (the student generates the
completions of the prompts; hidden states + LM heads, no logits), its loss swapped for
:func:`minitron.integrations.trl.chunked_divergence_loss` by ``patch_distillation_trainer()``.

    python examples/trl_gkd.py --steps 8 --beta 0.5
    python examples/trl_gkd.py --steps 8 --beta 0.5 --trl-loss
    python examples/trl_gkd.py --trainer distillation --steps 3

With a real model: pass ``model=AutoModelForCausalLM.from_pretrained(...)`` (and a teacher) to
``MinitronGKDTrainer`` exactly as to ``GKDTrainer``; nothing else changes.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402

log = logging.getLogger("examples.trl_gkd")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = REPO / "data" / "tinyshakespeare" / "input.txt"
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trainer", choices=("gkd", "distillation"), default="gkd",
                   help="TRL's GKDTrainer (logits) or DistillationTrainer (on-policy, fused linear)")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps")
    p.add_argument("--max-completion-length", type=int, default=8, help="generated tokens (distillation)")
    p.add_argument("--beta", type=float, default=0.5, help="0 forward KL, 1 reverse KL, else generalised JSD")
    p.add_argument("--lmbda", type=float, default=0.0,
                   help="fraction of on-policy (student-generated) batches; 0 = the dataset's completions")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--vocab-size", type=int, default=320, help="BPE vocabulary trained on the text")
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="plain-text file (default: Tiny Shakespeare)")
    p.add_argument("--examples", type=int, default=64, help="chat pairs in the dataset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trl-loss", action="store_true", help="use TRL's own generalized_jsd_loss (for comparison)")
    p.add_argument("--output-dir", type=Path, default=None, help="trainer output dir (default: a temporary one)")
    return p.parse_args(argv)


def build_tokenizer(text: str, vocab_size: int):
    """A byte-level BPE tokenizer trained on ``text`` with a minimal chat template."""
    from minitron.io.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(texts=[text], vocab_size=vocab_size)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_models(tok, seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(student, teacher): random tiny Llamas sharing the tokenizer's vocabulary; the teacher is wider."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    base = dict(vocab_size=len(tok), intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, initializer_range=0.2)
    torch.manual_seed(seed)
    student = AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=32, **base))
    torch.manual_seed(seed + 1)
    teacher = AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=64, **base))
    return student.float(), teacher.float().eval()


def build_dataset(text: str, n: int):
    """``n`` chat examples: a line of the text as the user turn, the next line as the assistant turn."""
    from datasets import Dataset

    lines = [line.strip() for line in text.splitlines() if line.strip()]
    rows = [{"messages": [{"role": "user", "content": lines[2 * i]},
                          {"role": "assistant", "content": lines[2 * i + 1]}]} for i in range(n)]
    return Dataset.from_list(rows)


def build_trainer(args: argparse.Namespace, output_dir: str):
    """The configured ``MinitronGKDTrainer`` (or TRL's ``GKDTrainer`` with ``--trl-loss``)."""
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from minitron.integrations.trl import MinitronGKDTrainer

    text = args.text.read_text(encoding="utf-8")[:200_000]
    tok = build_tokenizer(text, args.vocab_size)
    student, teacher = build_models(tok, args.seed)
    config = GKDConfig(
        output_dir=output_dir, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        lmbda=args.lmbda, beta=args.beta, max_length=args.max_length, learning_rate=args.lr,
        lr_scheduler_type="constant", logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
        dataloader_num_workers=0, seed=args.seed, disable_tqdm=True,
    )
    cls = GKDTrainer if args.trl_loss else MinitronGKDTrainer
    return cls(model=student, teacher_model=teacher, args=config, train_dataset=build_dataset(text, args.examples),
               processing_class=tok)


def build_distillation_trainer(args: argparse.Namespace, output_dir: str):
    """TRL's ``DistillationTrainer`` on prompts of the text (build and train it inside
    ``patch_distillation_trainer()`` for minitron's loss)."""
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    text = args.text.read_text(encoding="utf-8")[:200_000]
    tok = build_tokenizer(text, args.vocab_size)
    student, teacher = build_models(tok, args.seed)
    lines = [line.strip() for line in text.splitlines() if line.strip()][: args.examples]
    prompts = Dataset.from_list([{"prompt": [{"role": "user", "content": line}]} for line in lines])
    config = DistillationConfig(
        output_dir=output_dir, per_device_train_batch_size=args.batch_size, max_steps=args.steps, beta=args.beta,
        max_completion_length=args.max_completion_length, learning_rate=args.lr, lr_scheduler_type="constant",
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, dataloader_num_workers=0, seed=args.seed,
        disable_tqdm=True,
    )
    return DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=prompts,
                               processing_class=tok)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Train for ``--steps`` steps; returns ``{"losses": [per-step training loss], "trainer": trainer}``."""
    from minitron.integrations.trl import patch_distillation_trainer

    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.trainer == "gkd":
            trainer = build_trainer(args, str(args.output_dir or tmp))
            trainer.train()
        else:
            with contextlib.nullcontext() if args.trl_loss else patch_distillation_trainer():
                trainer = build_distillation_trainer(args, str(args.output_dir or tmp))
                trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    log.info("%s loss per step (%s): %s", args.trainer, "TRL" if args.trl_loss else "minitron",
             " ".join(f"{x:.4f}" for x in losses))
    return {"losses": losses, "trainer": trainer}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
