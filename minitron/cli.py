"""The ``minitron`` command line (also ``python -m minitron``).

Subcommands: ``info``, ``importance``, ``prune``, ``correct-teacher``, ``teacher-logits``, ``distill``,
``evaluate``, ``pipeline --config FILE.yaml``, ``demo``. Run ``minitron COMMAND --help`` for the options.

Under ``torchrun`` (``RANK``/``WORLD_SIZE`` in the environment) the process group is created for the command
(gloo on CPU, NCCL on GPUs; ``--dist-timeout`` seconds before a collective gives up on a dead rank):
``importance`` shards its batches over the ranks, ``correct-teacher`` and ``distill`` train with
``--strategy ddp`` (default) or ``fsdp2``; only rank 0 writes outputs and prints.

Errors are one line on stderr, never a traceback (unless ``--log-level DEBUG``): bad input (an
existing output without ``--overwrite``, an output that is, contains or lies inside an input, a
corrupt or truncated file, a missing text column, ...) exits with status 2 before any work is done;
a failure during the work (a NaN loss, out of memory or disk, ...) exits with status 1, and the
previous output, if any, is left intact.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

log = logging.getLogger("minitron.cli")

#: Commands that join the process group under torchrun (the others run as one process per rank).
DISTRIBUTED_COMMANDS = ("importance", "correct-teacher", "distill")
EXIT_BAD_INPUT = 2
EXIT_RUNTIME = 1
#: Exceptions that mean "the input is wrong" (exit 2); anything else raised during the work exits 1.
INPUT_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                PermissionError, KeyError)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) if str(exc) else ""
    if isinstance(exc, KeyError) and text.startswith("'") and text.endswith("'"):
        text = text[1:-1]
    if isinstance(exc, INPUT_ERRORS) or isinstance(exc, RuntimeError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_list(s: str) -> List[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}")


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def _size(s: str) -> int:
    """A byte count: ``5GB``, ``500MB``, ``2GiB`` or a plain integer."""
    import re

    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", s)
    unit = m.group(2).upper() if m else None
    if m is None or unit not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"expected a size like 5GB, 500MB or 2GiB, got {s!r}")
    n = int(float(m.group(1)) * _SIZE_UNITS[unit])
    if n < 1:
        raise argparse.ArgumentTypeError(f"a size must be positive, got {s!r}")
    return n


def _bf16(s: str) -> Any:
    m = {"auto": "auto", "on": True, "true": True, "off": False, "false": False}
    if s.lower() not in m:
        raise argparse.ArgumentTypeError("expected auto, on or off")
    return m[s.lower()]


def _add_data(p: argparse.ArgumentParser, *, eval_data: bool = False, required: bool = True) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", required=required,
                   help="text data: a .txt/.json/.jsonl/.parquet/.csv file, a directory of them, a saved dataset, "
                        "or a hub dataset name")
    g.add_argument("--text-column", default="text", help="column holding the text (default: text)")
    g.add_argument("--split", default=None, help="dataset split (default: train); slicing like train[:10%%] works")
    g.add_argument("--dataset-config", default=None, help="hub dataset configuration name")
    g.add_argument("--seq-len", type=int, default=None,
                   help="packed sequence length (default: min(512, the model's max_position_embeddings))")
    g.add_argument("--max-tokens", type=int, default=None, help="use at most this many tokens of --data")
    g.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    if eval_data:
        g.add_argument("--eval-data", default=None, help="evaluation data (perplexity during training)")
        g.add_argument("--eval-split", default=None)
        g.add_argument("--eval-max-tokens", type=int, default=None)


def _add_train(p: argparse.ArgumentParser, *, steps: int, lr: float) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=steps, help=f"optimizer steps (default {steps})")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr})")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of --lr")
    g.add_argument("--warmup-steps", type=int, default=10)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: at the end only)")
    g.add_argument("--eval-batches", type=int, default=None)
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: at the end only)")
    g.add_argument("--keep-checkpoints", type=int, default=2)
    g.add_argument("--log-every", type=int, default=1)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--bf16", type=_bf16, default="auto", help="bf16 autocast: auto (CUDA with bf16), on, off")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--resume", action="store_true", help="continue an interrupted run in --output")
    g.add_argument("--strategy", default=None, choices=["ddp", "fsdp2"],
                   help="under torchrun: ddp (replicated student, the default) or fsdp2 (student and teacher "
                        "sharded per decoder layer)")


def _add_output(p: argparse.ArgumentParser, *, required: bool = True, help: str = "output directory") -> None:
    p.add_argument("--output", "-o", required=required, help=help)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")


def _train_kwargs(a: argparse.Namespace) -> Dict[str, Any]:
    return dict(
        steps=a.steps, batch_size=a.batch_size, grad_accum=a.grad_accum, lr=a.lr, min_lr_ratio=a.min_lr_ratio,
        warmup_steps=a.warmup_steps, weight_decay=a.weight_decay, max_grad_norm=a.max_grad_norm,
        eval_every=a.eval_every, eval_batches=a.eval_batches, save_every=a.save_every,
        keep_checkpoints=a.keep_checkpoints, log_every=a.log_every, seed=a.seed, bf16=a.bf16, device=a.device,
        strategy=a.strategy,
    )


def _data_kwargs(a: argparse.Namespace, *, eval_data: bool = False) -> Dict[str, Any]:
    d = dict(tokenizer=a.tokenizer, seq_len=a.seq_len, text_column=a.text_column, split=a.split,
             dataset_config=a.dataset_config, max_tokens=a.max_tokens)
    if eval_data:
        d.update(eval_data=a.eval_data, eval_split=a.eval_split, eval_max_tokens=a.eval_max_tokens)
    return d


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``minitron`` command."""
    parser = _Parser(
        prog="minitron",
        description="Minitron-style structured pruning and logit distillation of Hugging Face LLMs.",
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--dist-timeout", type=float, default=600.0,
                        help="under torchrun: seconds a collective waits for the other ranks (a dead rank makes "
                             "the others fail after this long)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("info", help="build/backend information (same as python -m minitron.info)",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)

    p = sub.add_parser("importance", help="estimate head/neuron/channel/layer importance on calibration data")
    p.add_argument("--model", required=True, help="checkpoint directory (or hub name)")
    _add_data(p)
    _add_output(p, help="directory for importance.safetensors/.json/.png")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int, default=32)
    p.add_argument("--seq-agg", default="mean")
    p.add_argument("--batch-agg", default="l2")
    p.add_argument("--layer-metrics", default="block_influence,lm_loss",
                   help="comma-separated: block_influence, lm_loss")
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", default="auto", help="kernel backend: auto, cpp, cuda, triton, reference")
    p.add_argument("--streaming", action=argparse.BooleanOptionalAction, default=None,
                   help="run one decoder layer at a time from the checkpoint's files (default: when the model "
                        "would not fit comfortably in memory)")
    p.add_argument("--spill-dir", default=None, help="where streamed hidden states spill when they do not fit")

    p = sub.add_parser("prune", help="width- and/or depth-prune a model using importance scores")
    p.add_argument("--model", required=True)
    p.add_argument("--importance", default=None, help="directory written by `minitron importance`")
    _add_output(p, help="directory for the pruned checkpoint")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--hidden-size", type=int)
    p.add_argument("--intermediate-size", type=int)
    p.add_argument("--num-attention-heads", type=int)
    p.add_argument("--num-key-value-heads", type=int)
    p.add_argument("--num-layers", "--num-hidden-layers", dest="num_hidden_layers", type=int)
    p.add_argument("--depth-metric", default="lm_loss", choices=["lm_loss", "block_influence"])
    p.add_argument("--non-contiguous", action="store_true", help="drop individual layers, not one block")
    p.add_argument("--layers-to-drop", type=_int_list, default=None, help="explicit layers, e.g. 3,4")
    p.add_argument("--backend", default="auto")
    p.add_argument("--streaming", action=argparse.BooleanOptionalAction, default=None,
                   help="cut the checkpoint tensor by tensor without loading the model (default: when the model "
                        "would not fit comfortably in memory)")
    p.add_argument("--shard-size", type=_size, default=None,
                   help="output shard size when streaming (default 5GB, as transformers)")

    p = sub.add_parser("correct-teacher", help="fine-tune the teacher with the LM loss on the distillation data")
    p.add_argument("--model", required=True)
    _add_data(p, eval_data=True)
    _add_output(p, help="run directory (final model in OUTPUT/model)")
    _add_train(p, steps=100, lr=1e-4)

    p = sub.add_parser("teacher-logits",
                       help="run the teacher once and store its top-k log-probabilities per token (for distill "
                            "--teacher-logits)")
    p.add_argument("--model", required=True, help="the (corrected) teacher")
    _add_data(p)
    _add_output(p, help="store directory (shards + manifest.json)")
    p.add_argument("--top-k", type=int, default=64, help="entries kept per token (default 64)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--value-encoding", default=None, help="how log-probabilities are stored (default: the store's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--resume", action="store_true", help="continue an interrupted extraction")

    p = sub.add_parser("distill", help="distil a (corrected) teacher into a pruned student")
    p.add_argument("--student", required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--teacher", help="the (corrected) teacher checkpoint")
    src.add_argument("--teacher-logits", help="a store written by `minitron teacher-logits` (no teacher is loaded)")
    _add_data(p, eval_data=True)
    _add_output(p, help="run directory (final student in OUTPUT/model)")
    _add_train(p, steps=100, lr=1e-4)
    g = p.add_argument_group("distillation loss")
    g.add_argument("--kl-mode", default="forward", choices=["forward", "reverse", "jsd"])
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--beta", type=float, default=0.5, help="JSD mixing weight")
    g.add_argument("--kl-weight", type=float, default=1.0)
    g.add_argument("--lm-loss-weight", type=float, default=0.0, help="mix in the student's LM loss")
    g.add_argument("--chunk-size", type=int, default=None)
    g.add_argument("--backend", default="auto", help="KL kernel backend")
    g.add_argument("--no-tail", dest="tail", action="store_false",
                   help="with --teacher-logits: renormalise the teacher over its k entries instead of matching its "
                        "remaining mass as one bucket")

    p = sub.add_parser("evaluate", help="token-weighted perplexity on a dataset split")
    p.add_argument("--model", required=True, help="checkpoint or training output directory")
    _add_data(p)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--bf16", type=_bf16, default=False)
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="load a checkpoint holding NaN/inf weights (refused otherwise), to inspect a broken model")
    _add_output(p, required=False, help="also write the result to this JSON file")

    p = sub.add_parser("pipeline", help="run the whole recipe from a YAML config")
    p.add_argument("--config", required=True, help="pipeline YAML (see examples/pipeline.yaml)")
    _add_output(p, required=False, help="output directory (overrides output_dir of the config)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted pipeline")

    p = sub.add_parser("demo", help="offline end-to-end demo on Tiny Shakespeare and WikiText-2")
    p.add_argument("--quick", action="store_true", help="tiny preset (under 2 minutes)")
    _add_output(p, required=False, help="output directory (default runs/demo, or runs/demo-quick)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--data-dir", default=None, help="directory with tinyshakespeare/ and wikitext-2/ (default: the data shipped with minitron)")
    p.add_argument("--shakespeare", default=None, help="Tiny Shakespeare text file")
    p.add_argument("--wikitext-valid", default=None, help="WikiText-2 valid text file")
    p.add_argument("--wikitext-test", default=None, help="WikiText-2 test text file")
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    return parser


def _run(a: argparse.Namespace) -> int:
    from minitron import api

    if a.command == "info":
        from minitron.info import main as info_main

        return int(info_main(list(a.rest)) or 0)
    if a.command == "importance":
        metrics = tuple(m.strip() for m in a.layer_metrics.split(",") if m.strip())
        scores = api.estimate_importance(
            a.model, a.data, output_dir=a.output, overwrite=a.overwrite, batch_size=a.batch_size,
            max_batches=a.max_batches, seq_agg=a.seq_agg, batch_agg=a.batch_agg, layer_metrics=metrics,
            device=a.device, backend=a.backend, progress=True, streaming=a.streaming, spill_dir=a.spill_dir,
            **_data_kwargs(a),
        )
        _say(f"importance of {scores.num_layers} layers saved to {a.output}")
        return 0
    if a.command == "prune":
        import torch

        from minitron.runtime import count_parameters

        model = api.prune(
            a.model, importance=a.importance, output_dir=a.output, overwrite=a.overwrite, tokenizer=a.tokenizer,
            hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
            num_attention_heads=a.num_attention_heads, num_key_value_heads=a.num_key_value_heads,
            num_hidden_layers=a.num_hidden_layers, depth_metric=a.depth_metric, contiguous=not a.non_contiguous,
            layers_to_drop=a.layers_to_drop, backend=a.backend, streaming=a.streaming, shard_bytes=a.shard_size,
        )
        if isinstance(model, torch.nn.Module):
            print(f"pruned model ({count_parameters(model):,} parameters) saved to {a.output}")
        else:
            print(f"pruned model (streamed) saved to {a.output}")
        return 0
    if a.command == "teacher-logits":
        out = api.write_teacher_logits(
            a.model, a.data, output_dir=a.output, top_k=a.top_k, temperature=a.temperature,
            value_encoding=a.value_encoding, batch_size=a.batch_size, device=a.device, overwrite=a.overwrite,
            resume=a.resume, progress=True, **_data_kwargs(a),
        )
        print(f"teacher top-{a.top_k} store written to {out}")
        return 0
    if a.command == "correct-teacher":
        res = api.correct_teacher(a.model, a.data, output_dir=a.output, overwrite=a.overwrite, resume=a.resume,
                                  **_data_kwargs(a, eval_data=True), **_train_kwargs(a))
        _say(_train_summary(res))
        return 0
    if a.command == "distill":
        res = api.distill(
            a.student, a.teacher, a.data, output_dir=a.output, overwrite=a.overwrite, resume=a.resume,
            teacher_logits=a.teacher_logits, tail=a.tail,
            mode=a.kl_mode, temperature=a.temperature, beta=a.beta, kl_weight=a.kl_weight,
            lm_loss_weight=a.lm_loss_weight, chunk_size=a.chunk_size, kl_backend=a.backend,
            **_data_kwargs(a, eval_data=True), **_train_kwargs(a),
        )
        _say(_train_summary(res))
        return 0
    if a.command == "evaluate":
        res = api.evaluate_perplexity(
            a.model, a.data, batch_size=a.batch_size, max_batches=a.max_batches, device=a.device, bf16=a.bf16,
            output=a.output, overwrite=a.overwrite, allow_nonfinite=a.allow_nonfinite, **_data_kwargs(a),
        )
        print(json.dumps({k: res[k] for k in ("ppl", "loss", "tokens", "sequences", "seq_len")}))
        return 0
    if a.command == "pipeline":
        from minitron.pipeline import run_pipeline

        res = run_pipeline(a.config, output_dir=a.output, overwrite=a.overwrite, resume=a.resume)
        print(res["table"], end="")
        print(f"results in {res['output_dir']}/results.md")
        return 0
    if a.command == "demo":
        from minitron.demo import run_demo

        out = a.output or ("runs/demo-quick" if a.quick else "runs/demo")
        res = run_demo(out, quick=a.quick, data_dir=a.data_dir, shakespeare=a.shakespeare,
                       wikitext_valid=a.wikitext_valid, wikitext_test=a.wikitext_test, overwrite=a.overwrite,
                       resume=a.resume, device=a.device, backend=a.backend, threads=a.threads, seed=a.seed)
        print(res["table"], end="")
        rec = res["loss_gap_recovered_by_distillation"]
        print("distillation recovered " + ", ".join(
            f"{k}: {v * 100:.0f}%" if v is not None else f"{k}: n/a" for k, v in rec.items()
        ) + " of the pruning loss gap")
        print(f"total {res['timings']['total']:.0f}s; results in {res['output_dir']}/results.md")
        return 0
    raise AssertionError(a.command)  # pragma: no cover


def _say(text: str) -> None:
    """Print a command's result line (on rank 0 only under torchrun)."""
    from minitron.train.distributed import is_main_process

    if is_main_process():
        print(text)


def _train_summary(res: Any) -> str:
    ev = res.final_eval or {}
    parts = [f"{res.steps} steps in {res.elapsed_s:.0f}s", f"final train loss {res.final_loss:.4f}"]
    if "eval_ppl" in ev:
        parts.append(f"eval ppl {ev['eval_ppl']:.2f}")
    return "; ".join(parts) + f"; model saved to {res.extra.get('model_dir')}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``minitron`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "info":  # everything after `info` belongs to minitron.info
        from minitron.info import main as info_main

        return int(info_main(argv[1:]) or 0)
    parser = build_parser()
    a = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, a.log_level), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    _quiet_libraries(debug=a.log_level == "DEBUG")
    if os.environ.get("RANK", "0") != "0" and a.log_level != "DEBUG":  # torchrun: rank 0 reports progress
        logging.getLogger().setLevel(max(logging.WARNING, getattr(logging, a.log_level)))
    try:
        if "WORLD_SIZE" in os.environ and "RANK" in os.environ and a.command in DISTRIBUTED_COMMANDS:
            from minitron.train.distributed import distributed_session

            with distributed_session(timeout=a.dist_timeout):
                return _run(a)
        return _run(a)
    except KeyboardInterrupt:
        print(f"minitron {a.command}: interrupted (any previous output is intact)", file=sys.stderr)
        return 130
    except Exception as e:
        if a.log_level == "DEBUG":
            raise
        code = EXIT_BAD_INPUT if isinstance(e, INPUT_ERRORS) else EXIT_RUNTIME
        print(f"minitron {a.command}: error: {_one_line(e)}", file=sys.stderr)
        return code


def _quiet_libraries(debug: bool = False) -> None:
    """Silence the progress bars and load reports of datasets / transformers (our own logging reports
    progress, and errors are ours, in one line)."""
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except Exception:  # pragma: no cover
        pass
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if not debug:
            hf_logging.set_verbosity_error()
    except Exception:  # pragma: no cover
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
