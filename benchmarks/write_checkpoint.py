"""Write a random-weight checkpoint of a published architecture, tensor by tensor (never the whole model in memory).

Usage::

    python -m benchmarks.write_checkpoint --arch llama-3.1-8b --out /work/scale-scratch/llama8b [--dtype bf16]
        [--seed 0] [--init normal|pool] [--shard-bytes 5e9] [--overwrite] [--no-tokenizer]

The tensors are those of ``AutoModelForCausalLM.from_config(config)`` (built on the ``meta`` device), in its
state-dict order (mixture-of-experts layers as transformers saves them: one 2-D tensor per expert and projection,
e.g. ``mlp.experts.{e}.gate_proj.weight``), written into transformers-style shards with :class:`minitron.io.shards.ShardedWriter`
(5 GB by default), plus ``config.json`` and ``generation_config.json``. Initialisation as transformers'
``_init_weights``: matrices normal(0, 0.02), norm weights 1, biases 0. ``--init normal`` draws every
value (about 80 M values/s per core); ``--init pool`` copies random windows of a 16 Mi-value normal pool
(memory-bandwidth speed; the values are still N(0, 0.02) but not independent across windows), enough for
pruning and loading benchmarks. A byte-level tokenizer (256 byte tokens, no merges, built offline with
``tokenizers``) is added unless ``--no-tokenizer``: ids 0..255 are bytes, so any model with a larger
vocabulary can read its output; it does not match the published tokenizer.

Peak memory: the largest tensor (the embedding, e.g. 1.3 GB for Mistral-NeMo-12B in bf16) plus the pool.
The output is written into a hidden temporary sibling and renamed when complete.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional, Union

import torch

log = logging.getLogger("minitron.benchmarks.write_checkpoint")

__all__ = ["write_random_checkpoint", "byte_level_tokenizer", "DTYPES"]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_POOL = 1 << 24
_CHUNK = 1 << 20


def byte_level_tokenizer() -> Any:
    """A 256-token byte-level ``PreTrainedTokenizerFast`` (token id = byte value), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # GPT-2's byte -> printable character map, so id == byte value
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    char_of = {b: chr(c) for b, c in zip(bs, cs)}
    vocab = {char_of[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False)


def _layout(config: Any, dtype: torch.dtype) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """The checkpoint's tensors in state-dict order; a mixture-of-experts layer's fused experts are written as
    transformers saves them, one 2-D tensor per expert and projection
    (:class:`minitron.compress.moe_layout.CheckpointView`)."""
    from transformers import AutoModelForCausalLM

    from minitron.compress.moe_layout import CheckpointView

    from minitron.models import get_adapter
    from minitron.models.base import MoeAdapter

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    shapes = CheckpointView(skeleton, ()).expected_shapes(skeleton)
    ad = get_adapter(config)
    if not isinstance(ad, MoeAdapter):  # a family saving other names (Nemotron-H: backbone.*), as save_pretrained does
        shapes = {ad.checkpoint_name(k): s for k, s in shapes.items()}
    return [(k, s, dtype) for k, s in shapes.items()]


class _Filler:
    """Fills tensors like transformers' init: matrices N(0, std), norm weights 1, biases 0."""

    def __init__(self, init: str, seed: int, std: float, dtype: torch.dtype) -> None:
        if init not in ("normal", "pool"):
            raise ValueError(f"init must be 'normal' or 'pool', got {init!r}")
        self.init, self.std, self.dtype = init, std, dtype
        self.g = torch.Generator().manual_seed(seed)
        self.pool = torch.empty(_POOL + _CHUNK, dtype=dtype).normal_(0.0, std, generator=self.g) if init == "pool" else None

    def __call__(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        t = torch.empty(shape, dtype=self.dtype)
        if len(shape) == 1:
            t.fill_(1.0 if "norm" in name else 0.0)
            return t
        if self.pool is None:
            return t.normal_(0.0, self.std, generator=self.g)
        flat = t.view(-1)
        offs = torch.randint(0, _POOL, ((flat.numel() + _CHUNK - 1) // _CHUNK,), generator=self.g).tolist()
        for i, off in enumerate(offs):
            a = i * _CHUNK
            b = min(a + _CHUNK, flat.numel())
            flat[a:b].copy_(self.pool[off: off + (b - a)])
        return t


def write_random_checkpoint(
    arch: Union[str, Any],
    out: Union[str, os.PathLike],
    *,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    init: str = "normal",
    shard_bytes: int = 5 * 10**9,
    overwrite: bool = False,
    tokenizer: bool = True,
    progress: bool = True,
) -> Path:
    """Write a random-weight checkpoint of ``arch`` (an architecture name or a transformers config) to ``out``.

    Returns ``out`` as a Path. See the module docstring for the initialisation and memory use.
    """
    from transformers import GenerationConfig

    from minitron.io.files import make_temp_dir, normalize_permissions, publish_dir, remove_stale_temporaries
    from minitron.io.safety import check_output_dir
    from minitron.io.shards import ShardedWriter
    from minitron.resources.architectures import load_architecture

    config = load_architecture(arch) if isinstance(arch, str) else arch
    config.dtype = dtype
    layout = _layout(config, dtype)
    total = sum(dtype.itemsize * int(torch.Size(s).numel()) for _, s, _ in layout)
    outp = check_output_dir(out, overwrite=overwrite, what="--out", estimated_bytes=total + (64 << 20))
    std = float(getattr(config, "initializer_range", 0.02) or 0.02)
    fill = _Filler(init, seed, std, dtype)
    remove_stale_temporaries(outp)
    tmp = make_temp_dir(outp)
    t0 = time.perf_counter()
    try:
        with ShardedWriter(tmp, max_shard_bytes=shard_bytes, layout=layout) as w:
            done = 0
            for i, (name, shape, _) in enumerate(layout):
                t = fill(name, shape)
                w.add(name, t)
                done += t.numel() * t.element_size()
                del t
                if progress and (i % 20 == 0 or i == len(layout) - 1):
                    el = time.perf_counter() - t0
                    log.info("%d/%d tensors, %.2f/%.2f GB, %.0f s", i + 1, len(layout), done / 1e9, total / 1e9, el)
        config.save_pretrained(str(tmp))
        GenerationConfig.from_model_config(config).save_pretrained(str(tmp))
        if tokenizer:
            byte_level_tokenizer().save_pretrained(str(tmp))
        normalize_permissions(tmp)
        publish_dir(tmp, outp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s: %.2f GB in %.1f s", outp, total / 1e9, time.perf_counter() - t0)
    return outp


def main(argv: Optional[list[str]] = None) -> int:
    from minitron.resources.architectures import architecture_names

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", required=True, choices=architecture_names())
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", default="normal", choices=("normal", "pool"))
    ap.add_argument("--shard-bytes", type=float, default=5e9)
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--no-tokenizer", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(message)s")
    write_random_checkpoint(args.arch, args.out, dtype=DTYPES[args.dtype], seed=args.seed, init=args.init,
                            shard_bytes=int(args.shard_bytes), overwrite=args.overwrite,
                            tokenizer=not args.no_tokenizer, progress=not args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
