"""Study: distillation from a stored top-k teacher vs from the live teacher, on the demo's data.

Runs the demo (``minitron.demo.run_demo``; its teacher pre-trained on Tiny Shakespeare, corrected on WikiText-2
valid, and its width-pruned student), unless ``--demo-dir`` points at a finished demo run. Then, from the same
pruned student, with the demo's distillation settings (steps, batch size, lr, seed) on the same WikiText-2 valid
sequences, it distils:

* ``live``: the corrected teacher in memory, dense forward KL (:func:`minitron.train.distill.distill_model`, the
  demo's row);
* ``store k=K``: a top-K store of the corrected teacher (:func:`minitron.train.teacher_logits.write_teacher_logits`)
  and :func:`minitron.train.stored.distill_from_store` (no teacher loaded), for each K and value encoding given;

and reports the WikiText-2 test perplexity of each student, the wall time per training step, the store's
extraction time and size. Writes ``results.json`` / ``results.md`` in ``--output``.

``python -m benchmarks.study.stored_vs_live --output runs/stored-vs-live [--quick] [--ks 16,64]``
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

log = logging.getLogger("stored_vs_live")


def _evaluate(model, eval_data, batch_size: int) -> Dict[str, float]:
    from minitron.eval.perplexity import perplexity

    r = perplexity(model, eval_data, batch_size=batch_size)
    return {"loss": round(float(r["loss"]), 4), "ppl": round(float(r["ppl"]), 3)}


def run_study(output: Path, *, quick: bool, ks: List[int], encodings: List[str], demo_dir: Optional[Path],
              steps: Optional[int], tails: tuple = (True,), backend: str = "auto", seed: int = 0) -> Dict[str, Any]:
    from minitron.demo import PRESETS, run_demo
    from minitron.io.checkpoint import load_model
    from minitron.io.data import load_packed
    from minitron.io.logit_store import TeacherLogitStore, tokenizer_hash
    from minitron.train.teacher_logits import write_teacher_logits
    from minitron.train.distill import DistillConfig, distill_model
    from minitron.train.loop import TrainConfig
    from minitron.train.stored import StoredDistillConfig, distill_from_store

    preset = PRESETS["quick" if quick else "default"]
    output.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if demo_dir is None:
        demo_dir = output / "demo"
        if not (demo_dir / "results.json").is_file():
            run_demo(demo_dir, quick=quick, resume=demo_dir.exists(), device="cpu", backend=backend, seed=seed)
    demo_s = round(time.time() - t0, 1)
    pipe = demo_dir / "pipeline"
    teacher_dir = pipe / "teacher_corrected" / "model"
    pruned_dir = pipe / "students" / "width" / "pruned"
    data_dir = Path(__file__).resolve().parents[2] / "data"
    valid, test = data_dir / "wikitext-2" / "valid.txt", data_dir / "wikitext-2" / "test.txt"
    teacher, tok = load_model(teacher_dir)
    train_data = load_packed(valid, tok, seq_len=preset.seq_len, max_tokens=preset.train_max_tokens,
                             model_configs=[teacher.config])
    eval_data = load_packed(test, tok, seq_len=preset.seq_len, max_tokens=preset.eval_max_tokens,
                            drop_remainder=False, model_configs=[teacher.config])
    tcfg_d = {k: v for k, v in preset.distill.items() if k not in ("eval_every", "eval_batches")}
    if steps is not None:
        tcfg_d["steps"] = steps
    tcfg_d.update(seed=seed, device="cpu", bf16=False)
    rows: List[Dict[str, Any]] = []
    pruned, _ = load_model(pruned_dir)
    rows.append({"label": "width pruned (no distillation)", **_evaluate(pruned, eval_data, preset.eval_batch_size)})
    rows.append({"label": "teacher (corrected)", **_evaluate(teacher, eval_data, preset.eval_batch_size)})

    def per_step(res) -> float:
        recs = [r for r in res.history if r.get("type") == "train"]
        return round((recs[-1]["elapsed_s"] - recs[0]["elapsed_s"]) / max(1, len(recs) - 1), 4)

    # live teacher (the demo's distillation)
    student, _ = load_model(pruned_dir)
    res = distill_model(student, teacher, train_data, TrainConfig.from_dict(tcfg_d), DistillConfig(backend=backend),
                        output / "live", run_info={"study": "live"})
    rows.append({"label": "distilled, live teacher (dense forward KL)", "s_per_step": per_step(res),
                 "final_train_loss": round(res.final_loss, 4), **_evaluate(student, eval_data, preset.eval_batch_size)})
    log.info("%s", rows[-1])
    tok_hash = tokenizer_hash(teacher_dir)
    for enc in encodings:
        for k in ks:
            sdir = output / f"store-k{k}-{enc}"
            t1 = time.time()
            write_teacher_logits(teacher, train_data, sdir, top_k=k, value_encoding=enc, batch_size=16,
                                 teacher_path=teacher_dir, progress=False, device="cpu", overwrite=sdir.exists())
            extract_s = round(time.time() - t1, 2)
            store = TeacherLogitStore(sdir)
            for tail in tails:
                student, _ = load_model(pruned_dir)
                res = distill_from_store(student, store, train_data, TrainConfig.from_dict(tcfg_d),
                                         StoredDistillConfig(tail=tail, backend=backend),
                                         output / f"run-k{k}-{enc}-{'tail' if tail else 'renorm'}",
                                         tokenizer_hash=tok_hash)
                rows.append({"label": f"distilled from store k={k} ({enc}, {'tail' if tail else 'renorm'})",
                             "s_per_step": per_step(res), "final_train_loss": round(res.final_loss, 4),
                             "extract_s": extract_s, "store_bytes": store.nbytes(),
                             "store_bytes_per_token": round(store.nbytes() / (len(train_data) * train_data.seq_len), 1),
                             **_evaluate(student, eval_data, preset.eval_batch_size)})
                log.info("%s", rows[-1])
    result = {"preset": "quick" if quick else "default", "train": tcfg_d, "train_sequences": len(train_data),
              "seq_len": train_data.seq_len, "vocab_size": len(tok), "eval_tokens": eval_data.num_tokens,
              "threads": torch.get_num_threads(), "demo_s": demo_s, "rows": rows,
              "total_s": round(time.time() - t0, 1)}
    (output / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Distillation from a stored top-k teacher vs the live teacher ({result['preset']} demo preset)", "",
             f"{tcfg_d['steps']} steps, batch {tcfg_d['batch_size']}, seq_len {train_data.seq_len}, vocabulary "
             f"{len(tok)}, seed {seed}, {torch.get_num_threads()} threads; WikiText-2 test over "
             f"{eval_data.num_tokens} tokens.", "",
             "| student | WikiText-2 test ppl | s / step | extraction s | store bytes / token |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['ppl']:.2f} | {r.get('s_per_step', '')} | {r.get('extract_s', '')} | "
                     f"{r.get('store_bytes_per_token', '')} |")
    (output / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--quick", action="store_true", help="the demo's quick preset")
    p.add_argument("--demo-dir", type=Path, default=None, help="a finished demo run to reuse")
    p.add_argument("--ks", default="16,64")
    p.add_argument("--encodings", default="u8")
    p.add_argument("--steps", type=int, default=None, help="override the preset's distillation steps")
    p.add_argument("--tails", default="tail", help="comma list of tail (tail=True) and renorm (tail=False)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    run_study(args.output, quick=args.quick, ks=[int(x) for x in args.ks.split(",")],
              encodings=args.encodings.split(","), demo_dir=args.demo_dir, steps=args.steps,
              tails=tuple(t == "tail" for t in args.tails.split(",")), backend=args.backend)


if __name__ == "__main__":
    main()
