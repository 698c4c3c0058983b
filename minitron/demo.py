"""``minitron demo``: the whole Minitron recipe in minutes on a laptop CPU.

By default (:func:`run_real_demo`) on a real pretrained model, SmolLM2-135M-Instruct (fetched once through
:func:`minitron.api.fetch`, or any ``--model``): evaluate the teacher, correct it on WikiText-2 valid (the
distillation data), estimate importance there, prune to about half the non-embedding parameters by width and,
separately, by depth, distil both from the corrected teacher, evaluate every stage on WikiText-2 test and continue
one prompt greedily with the teacher and the students. When the model cannot be fetched it falls back to the toy
demo, saying why.

The toy demo (``--toy``, :func:`run_toy_demo`, offline; ``--quick`` is its tiny preset):

1. train a byte-level BPE tokenizer on Tiny Shakespeare + WikiText-2 valid (never on the test split);
2. pre-train a small Llama teacher on Tiny Shakespeare (the teacher's "original" data);
3. correct the teacher on WikiText-2 valid (the distillation data, a different domain);
4. estimate importance on WikiText-2 valid, prune to about half the parameters by width and,
   separately, by depth;
5. distil both students from the corrected teacher on WikiText-2 valid, and the width student once more
   from a stored top-k teacher (the corrected teacher's top-k log-probabilities written once to a store,
   then distillation without the teacher: ``width-topk``);
6. report WikiText-2 test perplexity of a random-init model, the teacher, the corrected teacher, the
   pruned and the distilled students (printed, and saved as ``results.md``/``results.json``).

The text is read from the data shipped in the package (``minitron/resources/data``, also reachable as
``data/`` in a checkout) by default, or from the paths given.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

from minitron import api
from minitron.api import atomic_write_json, atomic_write_text
from minitron.specs import DataSpec

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


@dataclasses.dataclass(frozen=True)
class DemoPreset:
    """Sizes and budgets of one demo flavour (token caps are per file; None = all)."""

    vocab_size: int
    seq_len: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int
    pretrain: Dict[str, Any]
    correct: Dict[str, Any]
    distill: Dict[str, Any]
    importance: Dict[str, Any]
    width: Dict[str, int]
    depth_layers: int
    pretrain_max_tokens: Optional[int]
    train_max_tokens: Optional[int]
    eval_max_tokens: Optional[int]
    eval_batch_size: int
    store_top_k: int = 64


PRESETS: Dict[str, DemoPreset] = {
    # ~2.8M-parameter teacher; about 12 CPU-minutes (single thread), well under 15 minutes on 2 cores
    "default": DemoPreset(
        vocab_size=2048, seq_len=128,
        hidden_size=192, intermediate_size=512, num_attention_heads=6, num_key_value_heads=3, num_hidden_layers=6,
        pretrain=dict(steps=500, batch_size=16, lr=3e-3, warmup_steps=25, min_lr_ratio=0.1, weight_decay=0.1),
        correct=dict(steps=150, batch_size=16, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1, weight_decay=0.1),
        distill=dict(steps=250, batch_size=16, lr=2e-3, warmup_steps=20, min_lr_ratio=0.1, weight_decay=0.1,
                     eval_every=125, eval_batches=8, save_every=125),
        importance=dict(batch_size=16, max_batches=8),
        width=dict(hidden_size=128, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2),
        depth_layers=3,
        pretrain_max_tokens=None, train_max_tokens=None, eval_max_tokens=65536, eval_batch_size=32,
    ),
    # ~0.23M-parameter teacher; well under 2 minutes (used by the tests)
    "quick": DemoPreset(
        vocab_size=512, seq_len=64,
        hidden_size=64, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4,
        pretrain=dict(steps=60, batch_size=8, lr=5e-3, warmup_steps=5, min_lr_ratio=0.1, weight_decay=0.1),
        correct=dict(steps=20, batch_size=8, lr=2e-3, warmup_steps=2, min_lr_ratio=0.1, weight_decay=0.1),
        distill=dict(steps=30, batch_size=8, lr=4e-3, warmup_steps=3, min_lr_ratio=0.1, weight_decay=0.1,
                     save_every=10),
        importance=dict(batch_size=8, max_batches=4),
        width=dict(hidden_size=48, intermediate_size=96, num_attention_heads=2, num_key_value_heads=2),
        depth_layers=2,
        pretrain_max_tokens=40_000, train_max_tokens=30_000, eval_max_tokens=8192, eval_batch_size=16,
        store_top_k=16,
    ),
}

DATA_FILES = {
    "shakespeare": ("tinyshakespeare", "input.txt"),
    "wikitext_valid": ("wikitext-2", "valid.txt"),
    "wikitext_test": ("wikitext-2", "test.txt"),
}


def _data_files(data_dir: Optional[PathLike], given: Dict[str, Optional[PathLike]]) -> Dict[str, Path]:
    """The demo's text files for the keys of ``given`` (of :data:`DATA_FILES`): the given path, else the file in
    ``data_dir`` (default: the data shipped in the package); each must exist and be text (errors name its flag)."""
    from minitron.api import check_text_file

    base = Path(data_dir) if data_dir is not None else default_data_dir()
    files = {key: Path(given[key]) if given[key] is not None else base.joinpath(*DATA_FILES[key]) for key in given}
    holding = " and ".join(f"{sub}/{name}" for sub, name in (DATA_FILES[k] for k in given))
    for key, f in files.items():
        if not f.is_file():
            raise FileNotFoundError(f"demo data file {str(f)!r} not found; pass --data-dir DIR (holding {holding}) "
                                    f"or --{key.replace('_', '-')} FILE")
    for key, f in files.items():
        check_text_file(f, f"--{key.replace('_', '-')}")
    return files


def default_data_dir() -> Path:
    """The text data shipped inside the package (:func:`minitron.resources.data_dir`)."""
    return api.packaged_data_dir()


def _teacher_config(p: DemoPreset, vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
        num_attention_heads=p.num_attention_heads, num_key_value_heads=p.num_key_value_heads,
        num_hidden_layers=p.num_hidden_layers, max_position_embeddings=max(256, p.seq_len),
        tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0, pad_token_id=1,
    )


def run_toy_demo(
    output_dir: PathLike = "runs/demo",
    *,
    quick: bool = False,
    data_dir: Optional[PathLike] = None,
    shakespeare: Optional[PathLike] = None,
    wikitext_valid: Optional[PathLike] = None,
    wikitext_test: Optional[PathLike] = None,
    overwrite: bool = False,
    resume: bool = False,
    device: str = "auto",
    backend: str = "auto",
    threads: Optional[int] = None,
    seed: int = 0,
) -> Dict[str, Any]:
    """Run the toy demo (offline); return the results (``"table"`` is the markdown perplexity table).

    Args:
        output_dir: where everything goes (refused if it exists unless ``overwrite``/``resume``).
        quick: the tiny preset (under 2 minutes) instead of the default one.
        data_dir: directory with ``tinyshakespeare/input.txt`` and ``wikitext-2/{valid,test}.txt``
            (default: the data shipped in the package); ``shakespeare``/``wikitext_valid``/``wikitext_test``
            override single files.
        device, backend: where to run and which kernel backend every op uses.
        threads: ``torch.set_num_threads`` (default: leave torch's setting).
    """
    from minitron.api import abandon_output, begin_output, check_output_dir, finish_output
    from minitron.runtime import check_backends, resolve_device

    preset = PRESETS["quick" if quick else "default"]
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    files = _data_files(data_dir, {"shakespeare": shakespeare, "wikitext_valid": wikitext_valid,
                                   "wikitext_test": wikitext_test})
    out = check_output_dir(output_dir, overwrite=overwrite, resume=resume, resumable=True,
                           inputs={"--data-dir": data_dir, **{f"--{k.replace('_', '-')}": v for k, v in files.items()}})
    dev = resolve_device(device)
    check_backends(dev, backend)
    if threads is not None:
        torch.set_num_threads(threads)
    final_out = out
    out = begin_output(final_out, overwrite=overwrite)
    try:
        summary = _stages(out, final_out, files, preset, quick=quick, resume=resume, dev=dev, backend=backend, seed=seed)
    except BaseException:
        abandon_output(out, final_out)
        raise
    finish_output(out, final_out)
    return summary


def _stages(out: Path, final_out: Path, files: Dict[str, Path], preset: DemoPreset, *, quick: bool, resume: bool,
            dev: torch.device, backend: str, seed: int) -> Dict[str, Any]:
    """The demo's stages, writing into ``out`` (``final_out`` or its temporary sibling)."""
    from minitron.pipeline import run_pipeline
    from minitron.runtime import count_parameters, seed_everything

    t_start = time.time()
    timings: Dict[str, float] = {}
    log.info("demo (%s preset) -> %s; torch threads %d", "quick" if quick else "default", out, torch.get_num_threads())

    # 1. tokenizer
    t0 = time.time()
    tok_dir = out / "tokenizer"
    tok = api.train_tokenizer([files["shakespeare"], files["wikitext_valid"]], vocab_size=preset.vocab_size,
                              output_dir=tok_dir, reuse=True)
    timings["tokenizer"] = round(time.time() - t0, 2)

    # 2. teacher pre-training on Tiny Shakespeare
    t0 = time.time()
    cfg = _teacher_config(preset, len(tok))
    from transformers import LlamaForCausalLM

    seed_everything(seed)
    teacher = LlamaForCausalLM(cfg)
    test_data = DataSpec(data=str(files["wikitext_test"]), tokenizer=str(tok_dir), seq_len=preset.seq_len,
                         max_tokens=preset.eval_max_tokens)
    random_eval = api.evaluate_perplexity(teacher, test_data, batch_size=preset.eval_batch_size, device=str(dev))
    random_row = dict({k: random_eval[k] for k in ("loss", "ppl", "tokens", "sequences")},
                      label="random init (teacher arch.)", kind="random", parameters=count_parameters(teacher))
    log.info("random-init teacher: WikiText-2 test ppl %.1f (%d parameters)", random_eval["ppl"], random_row["parameters"])
    tdir = out / "teacher"
    if (tdir / "model" / "config.json").is_file():
        log.info("teacher: reusing %s", tdir / "model")
    else:
        shakespeare = DataSpec(data=str(files["shakespeare"]), tokenizer=str(tok_dir), seq_len=preset.seq_len,
                               max_tokens=preset.pretrain_max_tokens)
        res = api.train_lm(teacher, shakespeare, output_dir=tdir, resume=resume,
                           train=dict(preset.pretrain, seed=seed, device=str(dev)))
        log.info("teacher pre-trained: final train loss %.3f in %.0fs", res.final_loss, res.elapsed_s)
    timings["pretrain_teacher"] = round(time.time() - t0, 2)
    del teacher

    # 3-6. the Minitron pipeline on WikiText-2
    pipe_cfg = {
        "output_dir": str(out / "pipeline"),
        "teacher": str(tdir / "model"),
        "seed": seed,
        "device": str(dev),
        "backend": backend,
        "data": {
            "train": str(files["wikitext_valid"]),
            "eval": str(files["wikitext_test"]),
            "eval_name": "WikiText-2 test",
            "seq_len": preset.seq_len,
            "max_tokens": preset.train_max_tokens,
            "eval_max_tokens": preset.eval_max_tokens,
        },
        "correct_teacher": dict(preset.correct),
        "importance": dict(preset.importance),
        "students": {"width": dict(preset.width), "depth": {"num_hidden_layers": preset.depth_layers},
                     "width-topk": dict(preset.width, distill={"teacher_logits": True})},
        "distill": dict(preset.distill),
        "teacher_logits": {"top_k": preset.store_top_k},
        "evaluate": {"batch_size": preset.eval_batch_size},
    }
    pipe_dir = out / "pipeline"
    pipe = run_pipeline(pipe_cfg, resume=resume and pipe_dir.exists(), extra_rows=[random_row])
    timings.update({f"pipeline/{k}": v for k, v in pipe["timings"].items()})
    timings["total"] = round(time.time() - t_start, 2)

    rows = pipe["rows"]
    by_label = {r["label"]: r for r in rows}
    ref = by_label.get("teacher (corrected)", by_label["teacher"])
    recovery = {}
    for name in ("width", "depth", "width-topk"):
        pr, di = by_label[f"{name} pruned"], by_label[f"{name} distilled"]
        gap = pr["loss"] - ref["loss"]
        recovery[name] = (pr["loss"] - di["loss"]) / gap if gap > 0 else None
    table = pipe["table"]
    summary = {
        "preset": "quick" if quick else "default",
        "rows": rows,
        "table": table,
        "timings": timings,
        "loss_gap_recovered_by_distillation": recovery,
        "eval_tokens": pipe["eval_tokens"],
        "torch_threads": torch.get_num_threads(),
        "device": str(dev),
        "output_dir": str(final_out),
    }
    atomic_write_json(out / "results.json", summary)
    lines = [
        f"# minitron demo ({summary['preset']} preset)\n",
        f"WikiText-2 test perplexity over {pipe['eval_tokens']} predicted tokens "
        f"(teacher pre-trained on Tiny Shakespeare, corrected and distilled on WikiText-2 valid).\n",
        table,
        "Rows: *random init* is the teacher architecture before training; *teacher* is pre-trained on Tiny "
        "Shakespeare only (another domain: it can be worse than random on WikiText-2); *teacher (corrected)* is "
        "fine-tuned on WikiText-2 valid; *pruned* students are cut from the corrected teacher (about half the "
        "parameters), *distilled* ones are trained from it with forward KL on WikiText-2 valid; *width-topk* is "
        f"the width student distilled from the corrected teacher's stored top-{preset.store_top_k} "
        "log-probabilities (no teacher in memory while distilling).\n",
        "Share of the pruning loss gap (vs the corrected teacher) recovered by distillation: "
        + ", ".join(f"{k}: {v * 100:.0f}%" if v is not None else f"{k}: n/a" for k, v in recovery.items()) + "\n",
        f"Total time {timings['total']:.0f}s on {dev} with {torch.get_num_threads()} threads.\n",
    ]
    atomic_write_text(out / "results.md", "\n".join(lines))
    return summary


# ----------------------------------------------------------------------------------------------
# the real demo (the default): a pretrained model, SmolLM2-135M-Instruct unless --model says otherwise
# ----------------------------------------------------------------------------------------------

DEFAULT_MODEL = "smollm2-135m"
PROMPT = "The history of the city begins in"


@dataclasses.dataclass(frozen=True)
class RealPreset:
    """Budgets of the real demo. Token budgets are ``steps * batch_size * seq_len`` (one epoch never ends: the
    distillation data, WikiText-2 valid, holds about 270k tokens of SmolLM2's tokenizer)."""

    seq_len: int
    correct: Dict[str, Any]            # TrainConfig of the teacher correction (LM loss)
    distill: Dict[str, Any]            # TrainConfig shared by both distillations (forward KL, fused linear KL)
    steps: Dict[str, int]              # distillation steps of each student ("width", "depth")
    importance: Dict[str, Any]
    eval_max_tokens: int               # WikiText-2 test tokens read for every row (the same for all)
    eval_batch_size: int
    width_fraction: float = 2 / 3      # heads, KV heads and MLP kept by the width student
    depth_fraction: float = 0.5        # layers kept by the depth student
    max_new_tokens: int = 30
    threads: int = 2

    def tokens(self) -> Dict[str, int]:
        per = lambda c, steps: int(steps) * int(c.get("batch_size", 8)) * int(c.get("grad_accum", 1)) * self.seq_len
        out = {"correct_teacher": per(self.correct, self.correct["steps"])}
        out.update({f"distill_{k}": per(self.distill, v) for k, v in self.steps.items()})
        cal = self.importance
        out["importance"] = int(cal["batch_size"]) * int(cal["max_batches"]) * self.seq_len
        out["evaluation_read"] = self.eval_max_tokens
        return out


REAL_PRESETS: Dict[str, RealPreset] = {
    # Sized from the throughput on 2 cores (fp32, seq 512, batch 4 = 2048 tokens a step): about 20 s an LM step of
    # the 135M teacher, 17 s a fused-KL distillation step (teacher forward + half-size student), 9 s for 4k
    # evaluation tokens of the teacher -> about 12 minutes on an idle 2-core machine, most of it distillation.
    "default": RealPreset(
        seq_len=512,
        correct=dict(steps=3, batch_size=4, lr=1e-4, warmup_steps=1, min_lr_ratio=0.1, weight_decay=0.01, log_every=1),
        distill=dict(batch_size=4, lr=4e-4, warmup_steps=2, min_lr_ratio=0.1, weight_decay=0.01, log_every=1),
        steps={"width": 16, "depth": 10},
        importance=dict(batch_size=4, max_batches=2, layer_metrics=["block_influence"]),
        eval_max_tokens=8192, eval_batch_size=4,
    ),
}


def _width_targets(config: Any, fraction: float) -> Dict[str, int]:
    """Width targets keeping about ``fraction`` of the heads, KV heads and MLP channels; the head dimension is
    kept, so the hidden size is heads * head_dim (Llama refuses a hidden size that heads do not divide)."""
    heads, kv = int(config.num_attention_heads), int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    new_heads = max(1, round(heads * fraction))
    new_kv = max(1, min(kv, round(kv * fraction)))
    while new_heads % new_kv:
        new_kv -= 1
    return {"hidden_size": new_heads * head_dim, "intermediate_size": max(1, round(config.intermediate_size * fraction)),
            "num_attention_heads": new_heads, "num_key_value_heads": new_kv}


def _resolve_model(model: PathLike) -> str:
    """A checkpoint directory or ``.gguf`` as given; anything else is a catalogue name, fetched (cached)."""
    if Path(model).exists():
        return str(model)
    return str(api.fetch(str(model)))


def _git_commit() -> Optional[str]:
    """HEAD of the checkout minitron runs from (``-dirty`` with uncommitted tracked changes); None outside one."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> Dict[str, Optional[str]]:
    import platform

    import transformers

    import minitron

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "minitron": getattr(minitron, "__version__", None)}


def run_demo(output_dir: Optional[PathLike] = None, *, toy: bool = False, quick: bool = False,
             model: PathLike = DEFAULT_MODEL, **kwargs: Any) -> Dict[str, Any]:
    """``minitron demo``: the real demo (:func:`run_real_demo`) on ``model``, or the toy demo
    (:func:`run_toy_demo`) with ``toy`` or ``quick`` (its tiny preset), or when the model cannot be fetched
    (``FetchError``: logged, and recorded as ``"fallback"`` in the results). ``kwargs`` go to the chosen demo
    (``shakespeare`` only to the toy one)."""
    if toy or quick:
        return run_toy_demo(output_dir or ("runs/demo-quick" if quick else "runs/demo"), quick=quick, **kwargs)
    toy_only = {k: kwargs.pop(k) for k in ("shakespeare",) if k in kwargs}
    try:
        return run_real_demo(output_dir or "runs/demo", model=model, **kwargs)
    except api.fetch_error() as e:
        reason = f"the model {str(model)!r} cannot be fetched ({e})"
    log.warning("%s: running the toy demo instead (offline; `minitron demo --toy` runs it directly)", reason)
    summary = run_toy_demo(output_dir or "runs/demo", **kwargs, **toy_only)
    summary["fallback"] = reason
    return summary


def run_real_demo(
    output_dir: PathLike = "runs/demo",
    *,
    model: PathLike = DEFAULT_MODEL,
    preset: Union[str, RealPreset] = "default",
    data_dir: Optional[PathLike] = None,
    wikitext_valid: Optional[PathLike] = None,
    wikitext_test: Optional[PathLike] = None,
    overwrite: bool = False,
    resume: bool = False,
    device: str = "auto",
    backend: str = "auto",
    threads: Optional[int] = None,
    seed: int = 0,
) -> Dict[str, Any]:
    """Run the demo on a pretrained model; return the results (``"table"``: the markdown table).

    Args:
        model: a catalogue name (fetched and cached by :func:`minitron.api.fetch`), a checkpoint directory or a
            ``.gguf`` file, with its tokenizer.
        preset: the budgets (a :class:`RealPreset` or a name of :data:`REAL_PRESETS`).
        threads: ``torch.set_num_threads`` (default: the preset's, 2).
        Others as :func:`run_toy_demo`.
    Raises:
        FetchError: the model is a catalogue name and cannot be fetched (before anything is written).
    """
    from minitron.api import abandon_output, begin_output, check_output_dir, finish_output
    from minitron.runtime import check_backends, resolve_device

    p = REAL_PRESETS[preset] if isinstance(preset, str) else preset
    threads = p.threads if threads is None else threads
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    files = _data_files(data_dir, {"wikitext_valid": wikitext_valid, "wikitext_test": wikitext_test})
    dev = resolve_device(device)
    check_backends(dev, backend)
    t0 = time.time()
    teacher = _resolve_model(model)
    fetch_s = round(time.time() - t0, 2)
    out = check_output_dir(output_dir, overwrite=overwrite, resume=resume, resumable=True,
                           inputs={"--model": teacher, **{f"--{k.replace('_', '-')}": v for k, v in files.items()}})
    torch.set_num_threads(threads)
    final_out = out
    out = begin_output(final_out, overwrite=overwrite)
    try:
        summary = _real_stages(out, final_out, teacher, files, p, resume=resume, dev=dev, backend=backend, seed=seed)
    except BaseException:
        abandon_output(out, final_out)
        raise
    summary["timings"]["fetch"] = fetch_s
    summary["model"] = str(model)
    atomic_write_json(out / "results.json", summary)
    finish_output(out, final_out)
    return summary


def _real_pipeline_config(out: Path, teacher: str, files: Dict[str, Path], p: RealPreset, teacher_config: Any, *,
                          dev: torch.device, backend: str, seed: int) -> Dict[str, Any]:
    layers = max(1, round(int(teacher_config.num_hidden_layers) * p.depth_fraction))
    return {
        "output_dir": str(out / "pipeline"), "teacher": teacher, "seed": seed, "device": str(dev), "backend": backend,
        "data": {"train": str(files["wikitext_valid"]), "eval": str(files["wikitext_test"]),
                 "eval_name": "WikiText-2 test", "seq_len": p.seq_len, "eval_max_tokens": p.eval_max_tokens},
        "correct_teacher": dict(p.correct),
        "importance": dict(p.importance),
        "students": {
            "width": dict(_width_targets(teacher_config, p.width_fraction), distill={"steps": p.steps["width"]}),
            "depth": {"num_hidden_layers": layers, "depth_metric": "block_influence", "contiguous": True,
                      "distill": {"steps": p.steps["depth"]}},
        },
        "distill": dict(p.distill),
        "evaluate": {"batch_size": p.eval_batch_size},
    }


def _real_stages(out: Path, final_out: Path, teacher: str, files: Dict[str, Path], p: RealPreset, *, resume: bool,
                 dev: torch.device, backend: str, seed: int) -> Dict[str, Any]:
    """Teacher -> correction -> importance -> width and depth students (the pipeline), then the prompt."""
    from minitron.api import read_config
    from minitron.pipeline import run_pipeline

    t_start, load_start = time.time(), os.getloadavg()
    log.info("real demo on %s -> %s; torch threads %d; token budgets %s", teacher, out, torch.get_num_threads(),
             p.tokens())
    tcfg = read_config(teacher, "--model")
    cfg = _real_pipeline_config(out, teacher, files, p, tcfg, dev=dev, backend=backend, seed=seed)
    pipe_dir = out / "pipeline"
    pipe = run_pipeline(cfg, resume=resume and pipe_dir.exists())
    timings = {f"pipeline/{k}": v for k, v in pipe["timings"].items()}

    t0 = time.time()
    sources = {"teacher": teacher, "teacher (corrected)": pipe_dir / "teacher_corrected" / "model",
               "width distilled": pipe_dir / "students" / "width" / "distill" / "model",
               "depth distilled": pipe_dir / "students" / "depth" / "distill" / "model"}
    continuations = {label: api.generate(str(src), PROMPT, max_new_tokens=p.max_new_tokens)
                     for label, src in sources.items() if label == "teacher" or Path(src).is_dir()}
    timings["generate"] = round(time.time() - t0, 2)
    timings["total"] = round(time.time() - t_start, 2)

    rows = _real_rows(pipe, tcfg)
    summary = {
        "demo": "real", "teacher_path": teacher, "rows": rows, "table": _real_table(rows),
        "eval_tokens": pipe["eval_tokens"], "eval_data": pipe["eval_data"], "prompt": PROMPT,
        "continuations": continuations, "students": pipe["students"],
        "budgets": dict(dataclasses.asdict(p), tokens=p.tokens()), "timings": timings,
        "torch_threads": torch.get_num_threads(), "device": str(dev),
        "load_average": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()]},
        "cpu_count": os.cpu_count(), "versions": _versions(), "commit": _git_commit(),
        "output_dir": str(final_out),
    }
    atomic_write_text(out / "results.md", real_results_markdown(summary))
    return summary


def _real_rows(pipe: Dict[str, Any], tcfg: Any) -> list:
    """The pipeline's rows with non-embedding parameter counts and the ratio to the corrected teacher."""
    tied = bool(getattr(tcfg, "tie_word_embeddings", True))
    hidden = {"width": pipe["students"]["width"]["config"]["hidden_size"]}
    by_label = {r["label"]: r for r in pipe["rows"]}
    ref = by_label.get("teacher (corrected)", by_label["teacher"])
    rows = []
    for r in pipe["rows"]:
        h = hidden.get(r["label"].split(" ")[0], int(tcfg.hidden_size))
        emb = int(tcfg.vocab_size) * h * (1 if tied else 2)
        rows.append(dict(r, non_embedding_parameters=r["parameters"] - emb, ppl_ratio=r["ppl"] / ref["ppl"]))
    teacher_ne = rows[0]["non_embedding_parameters"]
    for r in rows:
        r["non_embedding_fraction"] = r["non_embedding_parameters"] / teacher_ne
    return rows


def _real_table(rows: list) -> str:
    lines = ["| model | parameters | non-embedding | % of teacher's non-emb. | WikiText-2 test ppl | ppl / corrected teacher |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['parameters'] / 1e6:.1f}M | {r['non_embedding_parameters'] / 1e6:.1f}M | "
                     f"{r['non_embedding_fraction'] * 100:.0f}% | {r['ppl']:.1f} | {r['ppl_ratio']:.2f}x |")
    return "\n".join(lines) + "\n"


def real_results_markdown(summary: Dict[str, Any]) -> str:
    """``results.md`` of the real demo (also what ``python -m benchmarks.report`` puts in the README)."""
    b, t = summary["budgets"], summary["timings"]
    tok = b["tokens"]
    lines = [
        summary["table"],
        f"WikiText-2 test perplexity over the same {summary['eval_tokens']:,} predicted tokens for every row "
        f"(sequences of {b['seq_len']}). Teacher correction: {tok['correct_teacher']:,} tokens of WikiText-2 valid "
        f"(LM loss); importance: {tok['importance']:,} tokens; distillation (forward KL from the corrected teacher, "
        f"fused linear KL): width {tok['distill_width']:,} tokens, depth {tok['distill_depth']:,} tokens.",
        "",
        f"Greedy continuation of \"{summary['prompt']}\" ({b['max_new_tokens']} new tokens):",
        "",
    ]
    for label, text in summary["continuations"].items():
        lead = " " if text[:1].isspace() else ""
        lines.append(f"- **{label}**: *{summary['prompt']}*{lead}{' '.join(text.split())}")
    lines += ["", f"Total {t['total'] / 60:.1f} min on {summary['device']} with {summary['torch_threads']} threads "
              f"(load average {summary['load_average']['start'][0]:.1f} at the start, "
              f"{summary['load_average']['end'][0]:.1f} at the end; {summary['cpu_count']} CPUs); "
              f"commit {summary.get('commit') or 'unknown'}."]
    return "\n".join(lines) + "\n"
