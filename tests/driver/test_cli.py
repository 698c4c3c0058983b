"""The ``minitron`` CLI end to end: ``demo --quick``, ``pipeline`` on a small YAML, kill + ``--resume``,
``evaluate``, and the bad-input errors (exit status 2, nothing written)."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minitron import _ext
from minitron.cli import EXIT_BAD_INPUT, main

ROOT = Path(__file__).resolve().parents[2]
VALID = ROOT / "data" / "wikitext-2" / "valid.txt"
TEST = ROOT / "data" / "wikitext-2" / "test.txt"
BACKEND = "auto" if _ext.available() else "reference"
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           TOKENIZERS_PARALLELISM="false")


def run_cli(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "minitron", "--log-level", "WARNING", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"minitron {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "demo"
    t0 = time.time()
    proc = run_cli("demo", "--quick", "--output", str(out), "--threads", "1", "--backend", BACKEND)
    return {"out": out, "stdout": proc.stdout, "elapsed": time.time() - t0,
            "results": json.loads((out / "results.json").read_text())}


def test_demo_quick(demo):
    res, out = demo["results"], demo["out"]
    rows = {r["label"]: r for r in res["rows"]}
    assert list(rows) == ["random init (teacher arch.)", "teacher", "teacher (corrected)", "width pruned",
                          "width distilled", "depth pruned", "depth distilled", "width-topk pruned",
                          "width-topk distilled"]
    # distillation from the stored top-k teacher recovers part of the pruning gap too
    assert rows["width-topk distilled"]["loss"] < rows["width-topk pruned"]["loss"]
    assert 0.35 < rows["width pruned"]["param_fraction"] < 0.65
    assert 0.35 < rows["depth pruned"]["param_fraction"] < 0.65
    assert rows["teacher (corrected)"]["loss"] < rows["teacher"]["loss"]
    for name in ("width", "depth"):
        assert rows[f"{name} distilled"]["loss"] < rows[f"{name} pruned"]["loss"]
        assert rows[f"{name} distilled"]["parameters"] == rows[f"{name} pruned"]["parameters"]
    assert "| width distilled |" in demo["stdout"] and "| width distilled |" in (out / "results.md").read_text()
    for f in ("tokenizer/tokenizer.json", "teacher/model/config.json", "teacher/loss.png",
              "pipeline/importance/importance.json", "pipeline/students/width/distill/model/model.safetensors",
              "pipeline/students/depth/distill/log.jsonl", "pipeline/losses.png"):
        assert (out / f).is_file(), f
    assert demo["elapsed"] < 300  # 2 minutes on an idle 2-core machine; generous for a shared one


def test_evaluate_matches_demo_table(demo, tmp_path, capsys):
    out_json = tmp_path / "ev.json"
    model = demo["out"] / "pipeline" / "students" / "width" / "distill"  # a training output dir: uses model/
    rc = main(["--log-level", "WARNING", "evaluate", "--model", str(model), "--data", str(TEST), "--seq-len", "64",
               "--max-tokens", "8192", "--batch-size", "16", "--output", str(out_json)])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = {r["label"]: r for r in demo["results"]["rows"]}["width distilled"]
    assert math.isclose(printed["ppl"], expected["ppl"], rel_tol=1e-4)
    assert json.loads(out_json.read_text())["tokens"] == expected["tokens"]
    # the output file is not overwritten without --overwrite
    rc = main(["evaluate", "--model", str(model), "--data", str(TEST), "--seq-len", "64", "--output", str(out_json)])
    assert rc == EXIT_BAD_INPUT and "already exists" in capsys.readouterr().err


def _pipeline_yaml(path: Path, demo_out: Path, out: Path) -> Path:
    import yaml

    cfg = {
        "output_dir": str(out),
        "teacher": str(demo_out / "teacher"),  # a training output directory: its model/ is used
        "backend": BACKEND,
        "data": {"train": str(VALID), "eval": str(TEST), "seq_len": 32, "max_tokens": 6000, "eval_max_tokens": 1024},
        "correct_teacher": {"steps": 4, "batch_size": 4, "lr": 1e-3},
        "importance": {"batch_size": 4, "max_batches": 2, "layer_metrics": ["block_influence"]},
        "students": {
            "narrow": {"intermediate_size": 96, "num_attention_heads": 2},
            "shallow": {"num_hidden_layers": 3, "depth_metric": "block_influence",
                        "distill": {"steps": 3, "temperature": 2.0}},
        },
        "distill": {"steps": 4, "batch_size": 4, "lr": 2e-3, "save_every": 2, "lm_loss_weight": 0.1},
        "evaluate": {"batch_size": 16},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_pipeline_from_yaml(demo, tmp_path, capsys):
    out = tmp_path / "pipe"
    cfg = _pipeline_yaml(tmp_path / "p.yaml", demo["out"], out)
    proc = run_cli("pipeline", "--config", str(cfg))
    res = json.loads((out / "results.json").read_text())
    labels = [r["label"] for r in res["rows"]]
    assert labels == ["teacher", "teacher (corrected)", "narrow pruned", "narrow distilled", "shallow pruned",
                      "shallow distilled"]
    assert res["students"]["narrow"]["config"]["intermediate_size"] == 96
    assert res["students"]["shallow"]["config"]["num_hidden_layers"] == 3
    assert len([l for l in (out / "students/shallow/distill/log.jsonl").read_text().splitlines()
                if '"train"' in l]) == 3
    assert "| narrow distilled |" in proc.stdout
    # running it again is refused and leaves everything as it was
    before = _listing(out)
    assert main(["pipeline", "--config", str(cfg)]) == EXIT_BAD_INPUT
    assert "already exists" in capsys.readouterr().err
    assert _listing(out) == before
    # --resume of a finished pipeline reuses every stage
    assert main(["--log-level", "WARNING", "pipeline", "--config", str(cfg), "--resume"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert [r["ppl"] for r in again["rows"]] == [r["ppl"] for r in res["rows"]]


def test_sigkilled_distillation_resumes_exactly(demo, tmp_path):
    student = demo["out"] / "pipeline" / "students" / "width" / "pruned"
    teacher = demo["out"] / "pipeline" / "teacher_corrected"
    args = ["distill", "--student", str(student), "--teacher", str(teacher), "--data", str(VALID), "--seq-len", "32",
            "--max-tokens", "4000", "--steps", "24", "--batch-size", "4", "--lr", "3e-3",
            "--save-every", "4", "--temperature", "2", "--lm-loss-weight", "0.2", "--backend", BACKEND]
    # the reference run and the resumption run in this process (through the same CLI entry point); the
    # interrupted run is a subprocess killed with SIGKILL right after its first checkpoint
    assert main(["--log-level", "WARNING", *args, "--output", str(tmp_path / "full")]) == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "minitron", "--log-level", "WARNING", *args, "--output", str(killed)],
                            cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (killed / "checkpoints" / "latest").is_file():
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "model").exists()
    partial = [json.loads(l) for l in (killed / "log.jsonl").read_text().splitlines() if l.strip().endswith("}")]
    assert 4 <= len(partial) < 24

    # without --resume the run directory is refused
    assert main([*args, "--output", str(killed)]) == EXIT_BAD_INPUT
    assert main(["--log-level", "WARNING", *args, "--output", str(killed), "--resume"]) == 0
    full = [json.loads(l) for l in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    resumed = [json.loads(l) for l in (killed / "log.jsonl").read_text().splitlines()]
    assert [(r["type"], r["step"]) for r in resumed] == [(r["type"], r["step"]) for r in full]
    for a, b in zip(full, resumed):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5, abs_tol=1e-7), (a, b)
        assert a["kl"] == pytest.approx(b["kl"], rel=1e-5, abs=1e-7)
    assert (killed / "model" / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------- bad input


def _listing(p: Path):
    return sorted((str(q.relative_to(p)), q.stat().st_mtime_ns) for q in p.rglob("*"))


def test_bad_input_is_refused_before_any_work(demo, tmp_path, capsys):
    model = demo["out"] / "teacher" / "model"
    untouched = _listing(demo["out"])

    def fails(argv, *needles):
        rc = main(["--log-level", "WARNING", *argv])
        err = capsys.readouterr().err
        assert rc == EXIT_BAD_INPUT, err
        for n in needles:
            assert n in err, err

    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps({"content": "hello there", "id": 1}) + "\n")
    fails(["evaluate", "--model", str(model), "--data", str(jsonl)], "'text' not found", "'content', 'id'")
    fails(["evaluate", "--model", str(model), "--data", str(TEST), "--seq-len", "100000"], "max_position_embeddings")
    fails(["evaluate", "--model", str(tmp_path / "nope"), "--data", str(TEST)], "does not exist")
    fails(["importance", "--model", str(model), "--data", str(tmp_path / "missing.txt"), "--output", str(tmp_path / "i")],
          "does not exist")
    fails(["prune", "--model", str(model), "--output", str(model), "--num-layers", "2", "--layers-to-drop", "0,1"],
          "is the input")
    fails(["prune", "--model", str(model), "--output", str(tmp_path / "p"), "--num-layers", "2"],
          "importance scores or layers_to_drop")
    fails(["prune", "--model", str(model), "--output", str(tmp_path / "p"), "--hidden-size", "4096",
           "--importance", str(demo["out"] / "pipeline" / "importance")], "larger than the model's hidden_size")
    fails(["distill", "--student", str(model), "--teacher", str(model), "--data", str(VALID), "--output",
           str(demo["out"] / "teacher")], "contains the input")
    fails(["distill", "--student", str(model), "--teacher", str(model), "--data", str(VALID), "--output",
           str(demo["out"] / "tokenizer")], "already exists")
    fails(["correct-teacher", "--model", str(model), "--data", str(VALID), "--output", str(tmp_path / "c"),
           "--steps", "0"], "steps must be >= 1")
    fails(["demo", "--quick", "--output", str(demo["out"])], "already exists")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("teacher: x\nstudentz: {}\n")
    fails(["pipeline", "--config", str(bad_yaml), "--output", str(tmp_path / "o")], "unknown key(s) ['studentz']")
    assert not any((tmp_path / n).exists() for n in ("i", "p", "c", "o"))
    assert _listing(demo["out"]) == untouched


def test_info_subcommand(capsys):
    assert main(["info"]) == 0
    assert "torch" in capsys.readouterr().out


def test_help_lists_every_command():
    proc = run_cli("--help")
    for cmd in ("info", "importance", "prune", "correct-teacher", "distill", "evaluate", "search", "pipeline", "demo"):
        assert cmd in proc.stdout


def test_example_config_and_default_demo_preset_are_valid(tmp_path):
    """examples/pipeline.yaml validates against the default demo teacher, whose students are about half size."""
    import yaml
    from transformers import LlamaConfig, LlamaForCausalLM

    from minitron.demo import PRESETS, _teacher_config
    from minitron.pipeline import parse_pipeline_config

    p = PRESETS["default"]
    cfg = _teacher_config(p, p.vocab_size)
    cfg.save_pretrained(str(tmp_path / "teacher"))  # the config is all validation reads
    example = yaml.safe_load((ROOT / "examples" / "pipeline.yaml").read_text())
    assert example["students"]["width"] == p.width and example["students"]["depth"]["num_hidden_layers"] == p.depth_layers
    example["teacher"] = str(tmp_path / "teacher")
    spec = parse_pipeline_config(example, output_dir=tmp_path / "out")
    assert [s.name for s in spec.students] == ["width", "depth"]
    assert spec.students[0].loss.mode == "forward" and spec.students[0].train.steps == 250

    def params(c):
        with torch.device("meta"):
            m = LlamaForCausalLM(c)
        return sum(t.numel() for t in {id(q): q for q in m.parameters()}.values())

    full = params(cfg)
    width = LlamaConfig(**{**cfg.to_dict(), **p.width, "head_dim": cfg.hidden_size // cfg.num_attention_heads})
    depth = LlamaConfig(**{**cfg.to_dict(), "num_hidden_layers": p.depth_layers})
    assert 0.4 < params(width) / full < 0.6
    assert 0.4 < params(depth) / full < 0.6


def test_importance_then_prune_commands(demo, tmp_path, capsys):
    from minitron.io.checkpoint import load_model
    from minitron.compress.importance import ImportanceScores

    model = demo["out"] / "teacher" / "model"
    rc = main(["--log-level", "WARNING", "importance", "--model", str(model), "--data", str(VALID), "--seq-len", "32",
               "--max-tokens", "2048", "--batch-size", "4", "--max-batches", "3", "--output", str(tmp_path / "imp"),
               "--backend", BACKEND])
    assert rc == 0, capsys.readouterr().err
    scores = ImportanceScores.load(tmp_path / "imp")
    assert scores.meta["num_batches"] == 3 and scores.meta["num_tokens"] == 3 * 4 * 32
    assert (tmp_path / "imp" / "importance.png").is_file()
    rc = main(["--log-level", "WARNING", "prune", "--model", str(model), "--importance", str(tmp_path / "imp"),
               "--hidden-size", "48", "--num-attention-heads", "2", "--num-layers", "3", "--output",
               str(tmp_path / "pruned"), "--backend", BACKEND])
    assert rc == 0, capsys.readouterr().err
    pruned, tok = load_model(tmp_path / "pruned")
    assert (pruned.config.hidden_size, pruned.config.num_attention_heads, pruned.config.num_hidden_layers) == (48, 2, 3)
    assert tok is not None and len(tok) == pruned.config.vocab_size


def _imp_args(model: Path, out: Path, *extra: str) -> list:
    return ["--log-level", "WARNING", "importance", "--model", str(model), "--data", str(VALID), "--seq-len", "32",
            "--max-tokens", "2048", "--batch-size", "4", "--max-batches", "3", "--output", str(out),
            "--backend", BACKEND, *extra]


def test_streaming_importance_and_prune_equal_in_memory(demo, tmp_path, capsys):
    """--streaming (one layer / one tensor at a time from the files) gives what --no-streaming gives."""
    from safetensors.torch import load_file

    from minitron.compress.importance import ImportanceScores

    model = demo["out"] / "teacher" / "model"
    assert main(_imp_args(model, tmp_path / "imp_s", "--streaming")) == 0, capsys.readouterr().err
    assert main(_imp_args(model, tmp_path / "imp_m", "--no-streaming")) == 0, capsys.readouterr().err
    a, b = ImportanceScores.load(tmp_path / "imp_s"), ImportanceScores.load(tmp_path / "imp_m")
    for name in ("heads", "neurons", "channels"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(a.layer_scores("lm_loss"), b.layer_scores("lm_loss"))
    common = ["--log-level", "WARNING", "prune", "--model", str(model), "--importance", str(tmp_path / "imp_m"),
              "--hidden-size", "48", "--num-layers", "3", "--backend", BACKEND]
    assert main(common + ["--output", str(tmp_path / "p_s"), "--streaming", "--shard-size", "100KB"]) == 0
    assert main(common + ["--output", str(tmp_path / "p_m"), "--no-streaming"]) == 0
    assert (tmp_path / "p_s" / "model.safetensors.index.json").is_file()
    streamed = {}
    for f in sorted((tmp_path / "p_s").glob("model-*.safetensors")):
        streamed.update(load_file(f))
    assert len(list((tmp_path / "p_s").glob("model-*.safetensors"))) > 1
    memory = load_file(tmp_path / "p_m" / "model.safetensors")
    assert sorted(streamed) == sorted(memory)
    assert all(torch.equal(streamed[k], memory[k]) for k in memory)
    # --shard-size without streaming, and streaming a loaded-model-only source, are refused
    assert main(common + ["--output", str(tmp_path / "p_x"), "--no-streaming", "--shard-size", "1MB"]) == EXIT_BAD_INPUT
    assert not (tmp_path / "p_x").exists()


def test_teacher_logits_then_distill_from_the_store(demo, tmp_path, capsys):
    from minitron.io.logit_store import TeacherLogitStore

    teacher = demo["out"] / "pipeline" / "teacher_corrected" / "model"
    student = demo["out"] / "pipeline" / "students" / "width" / "pruned"
    data = ["--data", str(VALID), "--seq-len", "32", "--max-tokens", "4096"]
    rc = main(["--log-level", "WARNING", "teacher-logits", "--model", str(teacher), *data, "--top-k", "8",
               "--output", str(tmp_path / "store")])
    assert rc == 0, capsys.readouterr().err
    store = TeacherLogitStore(tmp_path / "store")
    assert store.k == 8 and store.seq_len == 32
    rc = main(["--log-level", "WARNING", "distill", "--student", str(student), "--teacher-logits",
               str(tmp_path / "store"), *data, "--steps", "3", "--batch-size", "4", "--output", str(tmp_path / "d"),
               "--backend", BACKEND])
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "d" / "model" / "config.json").is_file()
    capsys.readouterr()
    # other data than the store's: refused before work, naming the mismatch
    rc = main(["--log-level", "WARNING", "distill", "--student", str(student), "--teacher-logits",
               str(tmp_path / "store"), "--data", str(VALID), "--seq-len", "32", "--max-tokens", "2048",
               "--steps", "3", "--output", str(tmp_path / "d2")])
    assert rc == EXIT_BAD_INPUT and "not the same data" in capsys.readouterr().err
    assert not (tmp_path / "d2").exists()
    with pytest.raises(SystemExit) as e:
        main(["distill", "--student", str(student), "--teacher", str(teacher), "--teacher-logits",
              str(tmp_path / "store"), "--data", str(VALID), "--output", str(tmp_path / "d3")])
    assert e.value.code == EXIT_BAD_INPUT


def _torchrun(*args: str, nproc: int = 2, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m",
           "minitron", "--log-level", "WARNING", "--dist-timeout", "30", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_torchrun_importance_and_distill(demo, tmp_path, capsys):
    """`torchrun -m minitron importance` equals one process; `distill --strategy ddp|fsdp2` writes one model."""
    from minitron.compress.importance import ImportanceScores

    model = demo["out"] / "teacher" / "model"
    assert main(_imp_args(model, tmp_path / "one")) == 0, capsys.readouterr().err
    proc = _torchrun(*_imp_args(model, tmp_path / "two")[2:])
    assert proc.stdout.count("saved to") == 1  # rank 0 reports
    a, b = ImportanceScores.load(tmp_path / "one"), ImportanceScores.load(tmp_path / "two")
    for name in ("heads", "neurons", "channels"):
        x, y = getattr(a, name), getattr(b, name)
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-6 * float(x.abs().max())), name
    assert b.meta["num_batches"] == 3
    teacher = demo["out"] / "pipeline" / "teacher_corrected" / "model"
    student = demo["out"] / "pipeline" / "students" / "width" / "pruned"
    for strategy in ("ddp", "fsdp2"):
        out = tmp_path / f"d_{strategy}"
        _torchrun("distill", "--student", str(student), "--teacher", str(teacher), "--data", str(VALID),
                  "--seq-len", "32", "--max-tokens", "4096", "--steps", "2", "--batch-size", "2", "--strategy",
                  strategy, "--output", str(out), "--backend", BACKEND)
        assert (out / "model" / "config.json").is_file() and (out / "run.json").is_file()
