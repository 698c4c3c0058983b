"""Reproduce the Minitron papers' findings in miniature: ``python -m benchmarks.minitron_study``.

Pre-trains a small Llama teacher on Tiny Shakespeare, corrects it on WikiText-2 valid, prunes it to about
half its non-embedding parameters (width and depth) and compares, at one token budget and over several
seeds, training from scratch, LM fine-tuning, distillation (with and without teacher correction), and the
perplexity right after pruning for every importance aggregation (see :mod:`benchmarks.study.experiment`). Writes
``results.md`` (tables and verdicts), ``results.json``, ``curves.png`` and ``aggregation.png`` to ``--out``.

Examples::

    python -m benchmarks.minitron_study                       # full study (~36 min measured, one thread)
    python -m benchmarks.minitron_study --quick               # tiny smoke run (~1 min)
    python -m benchmarks.minitron_study --seeds 3 --out runs/study3
    python -m benchmarks.minitron_study --backend reference   # without the built C++ extension
    python -m benchmarks.minitron_study --threads 2           # on an otherwise idle machine
    python -m benchmarks.minitron_study --teacher smollm2-135m --threads 2 --out runs/study-smollm2
                                                              # a real pretrained teacher (15-52 min on 2 cores)
    python -m benchmarks.minitron_study --teacher ./tiny-ckpt --quick   # any local checkpoint (or .gguf)

With ``--teacher NAME_OR_PATH`` the teacher is a pretrained checkpoint (a catalogue name of ``minitron fetch``,
a local checkpoint directory or a ``.gguf`` file) instead of the toy Llama pre-trained here: no pre-training,
the checkpoint's tokenizer, training text WikiText-2 valid + Tiny Shakespeare, and the budget of
:meth:`benchmarks.study.experiment.StudyConfig.real_config`.
"""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
from typing import List, Optional, Sequence, Tuple

log = logging.getLogger("benchmarks.minitron_study")


def _positive(value: str) -> int:
    v = int(value)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _pairs(value: str) -> List[Tuple[str, str]]:
    """``"mean/l2,l2/mean"`` -> [("mean", "l2"), ("l2", "mean")]; ``"all"`` -> all 25."""
    from benchmarks.study.experiment import AGGREGATIONS

    if value == "all":
        return [(s, b) for s in AGGREGATIONS for b in AGGREGATIONS]
    out = []
    for item in value.split(","):
        parts = item.strip().split("/")
        if len(parts) != 2 or any(p not in AGGREGATIONS for p in parts):
            raise argparse.ArgumentTypeError(
                f"bad aggregation pair {item!r}: use SEQ/BATCH with each of {', '.join(AGGREGATIONS)}, or 'all'"
            )
        out.append((parts[0], parts[1]))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.minitron_study",
        description="Reproduce the Minitron papers' findings in miniature (table + validation curves).",
    )
    p.add_argument("--teacher", default="toy",
                   help="'toy' (default: a small Llama pre-trained on Tiny Shakespeare here), a catalogue name "
                        "(smollm2-135m), a local checkpoint directory or a .gguf file")
    p.add_argument("--quick", action="store_true", help="tiny configuration for tests and smoke runs (~1 min)")
    p.add_argument("--seeds", type=_positive, default=2, help="number of seeds of the student stage (default 2)")
    p.add_argument("--out", default=None, help="output directory (default runs/minitron_study[_quick])")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--backend", default="auto",
                   help="kernel backend of the importance, slicing and KL ops: auto (needs `make build`), cpp, "
                        "triton or reference (plain torch)")
    p.add_argument("--threads", type=_positive, default=1,
                   help="torch CPU threads (default 1: the study's small matrices gain little from a second "
                        "thread and lose up to 10x when another process competes for the cores)")
    g = p.add_argument_group("data (default: the project's data/ copies, else ../shared/data)")
    g.add_argument("--teacher-data", default=None, help="teacher pre-training text (Tiny Shakespeare)")
    g.add_argument("--distill-data", default=None, help="correction/calibration/distillation text (WikiText-2 valid)")
    g.add_argument("--eval-data", default=None, help="evaluation text (WikiText-2 test)")
    g.add_argument("--eval-tokens", type=_positive, default=None, help="cap on the test tokens (default: all)")
    g = p.add_argument_group("budget (defaults: the full or --quick configuration)")
    g.add_argument("--teacher-steps", type=_positive, default=None)
    g.add_argument("--correction-steps", type=_positive, default=None)
    g.add_argument("--student-steps", type=_positive, default=None, help="the token budget of every arm, in steps")
    g.add_argument("--eval-every", type=_positive, default=None)
    g.add_argument("--scratch-multiplier", type=int, default=None,
                   help="also train the student from scratch with K times the token budget (0: off)")
    g.add_argument("--aggregations", type=_pairs, default=None,
                   help="SEQ/BATCH pairs of arm f, comma-separated, or 'all' (default: all 25; quick: 3)")
    g.add_argument("--sweep-eval-tokens", type=_positive, default=None, help="test tokens used by arm f")
    g.add_argument("--calib-sequences", type=_positive, default=None, help="calibration sequences of importance")
    return p


def config_from_args(args: argparse.Namespace):
    """The :class:`benchmarks.study.experiment.StudyConfig` the arguments describe."""
    from benchmarks.study.experiment import StudyConfig

    overrides = {"seeds": list(range(args.seeds)), "backend": args.backend}
    for name in ("teacher_data", "distill_data", "eval_data", "eval_tokens", "teacher_steps", "correction_steps",
                 "student_steps", "eval_every", "scratch_multiplier", "aggregations", "sweep_eval_tokens",
                 "calib_sequences"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    teacher = getattr(args, "teacher", "toy")
    if teacher != "toy":
        return StudyConfig.real_config(teacher, quick=args.quick, **overrides)
    return StudyConfig.quick_config(**overrides) if args.quick else StudyConfig(**overrides)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    import torch

    from benchmarks.study.experiment import run_study

    torch.set_num_threads(args.threads)
    out = args.out or ("runs/minitron_study" + ("_real" if args.teacher != "toy" else "")
                       + ("_quick" if args.quick else ""))
    command = "python -m benchmarks.minitron_study " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else list(argv)))
    try:
        config = config_from_args(args)
        results = run_study(config, out, overwrite=args.overwrite, command=command.strip())
    except (ValueError, TypeError, FileNotFoundError) as e:
        log.error("%s", e)
        return 2
    from pathlib import Path

    print((Path(out) / "results.md").read_text(encoding="utf-8"))
    print(f"written: {out}/results.md, results.json, curves.png, aggregation.png "
          f"({results['timing_s']['total']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
