"""Issue 16: nothing the user owns is ever lost; broken inputs are refused before work, in one line.

Every case runs the real command line in-process (``minitron.cli.main``) on tiny models and asserts
the exit status, that stderr is one line naming the argument / file / key, that every input is
unchanged byte for byte and that a previous output is intact.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from minitron.cli import EXIT_BAD_INPUT, EXIT_RUNTIME, main
from tests.driver.conftest import make_model

ROOT = Path(__file__).resolve().parents[2]
VALID = ROOT / "data" / "wikitext-2" / "valid.txt"


# ------------------------------------------------------------------------------------------- helpers
def tree(path: Path) -> dict:
    """{relative path: sha256} of a file or of every file under a directory (symlinks not followed)."""
    path = Path(path)
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and not p.is_symlink()}


def run(capsys, *args: str) -> tuple[int, str]:
    """Run the CLI in-process; return (exit status, stderr) and assert stderr is at most one line."""
    capsys.readouterr()
    try:
        rc = main(["--log-level", "WARNING", *map(str, args)])
    except SystemExit as e:  # argparse usage errors
        rc = e.code
    err = capsys.readouterr().err.strip()
    if os.environ.get("MINITRON_SAFETY_LOG"):  # the per-case outcome list of the issue-16 report
        with open(os.environ["MINITRON_SAFETY_LOG"], "a") as f:
            f.write(json.dumps({"case": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0], "rc": rc,
                                "stderr": err.splitlines()[-1] if err and rc else ""}) + "\n")
    if rc != 0:  # an error is one line (progress bars of a successful run may precede nothing)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1, f"stderr is not one line:\n{err}"
    assert "Traceback" not in err
    return rc, err


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tokenizer, a teacher checkpoint (with that tokenizer), calibration data and importance scores."""
    from minitron import api
    from minitron.io.checkpoint import save_model
    from minitron.io.tokenizer import train_bpe_tokenizer

    base = tmp_path_factory.mktemp("safety")
    text = VALID.read_text(encoding="utf-8")[:60_000]
    tok = train_bpe_tokenizer(texts=[text], vocab_size=300)
    tok_dir = base / "tok"
    tok.save_pretrained(str(tok_dir))
    # a compact tokenizer.json: any re-save through AutoTokenizer would change its bytes
    tj = tok_dir / "tokenizer.json"
    tj.write_text(json.dumps(json.loads(tj.read_text()), separators=(",", ":")))
    data_dir = base / "data"
    data_dir.mkdir()
    (data_dir / "train.txt").write_text(text[:30_000], encoding="utf-8")
    teacher = make_model("llama", vocab_size=len(tok), attention_bias=False, mlp_bias=False)
    save_model(teacher, base / "teacher", tokenizer_dir=tok_dir)
    api.estimate_importance(base / "teacher", data_dir / "train.txt", output_dir=base / "imp", seq_len=32,
                            batch_size=4, max_batches=2, backend="reference", plot=False)
    return base


@pytest.fixture
def w(world, tmp_path):
    """A private copy of the world (tests may be destructive if the code is wrong)."""
    for name in ("tok", "data", "teacher", "imp"):
        shutil.copytree(world / name, tmp_path / name, symlinks=True)
    return tmp_path


COMMON = ("--seq-len", "32", "--max-tokens", "2048")


def train_args(steps: int = 2) -> tuple:
    return ("--steps", str(steps), "--batch-size", "4", "--warmup-steps", "0", "--device", "cpu")


# ------------------------------------------------------------------- outputs never clobber inputs
@pytest.mark.parametrize("where", ["data_dir", "data_parent", "inside_data_dir"])
def test_importance_output_vs_data(w, capsys, where):
    data = w / "corpus" / "set"
    shutil.copytree(w / "data", data)
    out = {"data_dir": data, "data_parent": w / "corpus", "inside_data_dir": data / "imp"}[where]
    before = tree(w)
    rc, err = run(capsys, "importance", "--model", w / "teacher", "--data", data, "--output", out,
                  "--overwrite", "--backend", "reference", *COMMON)
    assert rc == EXIT_BAD_INPUT and "--data" in err and "input" in err
    assert tree(w) == before


def test_importance_output_is_model(w, capsys):
    before = tree(w)
    rc, err = run(capsys, "importance", "--model", w / "teacher", "--data", w / "data" / "train.txt",
                  "--output", w / "teacher" / "imp", *COMMON)
    assert rc == EXIT_BAD_INPUT and "--model" in err
    assert tree(w) == before


@pytest.mark.parametrize("arg", ["--importance", "--tokenizer"])
def test_prune_output_is_importance_or_tokenizer(w, capsys, arg):
    before = tree(w)
    target = w / ("imp" if arg == "--importance" else "tok")
    rc, err = run(capsys, "prune", "--model", w / "teacher", "--importance", w / "imp", "--tokenizer", w / "tok",
                  "--hidden-size", "24", "--output", target, "--overwrite")
    assert rc == EXIT_BAD_INPUT and arg in err and str(target) in err
    assert tree(w) == before


def test_output_through_a_symlink_to_an_input(w, capsys):
    os.symlink(w / "teacher", w / "alias")
    before = tree(w / "teacher")
    rc, err = run(capsys, "prune", "--model", w / "teacher", "--importance", w / "imp", "--hidden-size", "24",
                  "--output", w / "alias", "--overwrite")
    assert rc == EXIT_BAD_INPUT and "--model" in err
    assert tree(w / "teacher") == before


@pytest.mark.parametrize("cmd", ["correct-teacher", "distill"])
def test_training_output_containing_the_data(w, capsys, cmd):
    models = (("--model", w / "teacher") if cmd == "correct-teacher"
              else ("--student", w / "teacher", "--teacher", w / "teacher"))
    before = tree(w)
    rc, err = run(capsys, cmd, *models, "--data", w / "data" / "train.txt", "--output", w / "data", "--overwrite",
                  *COMMON, *train_args())
    assert rc == EXIT_BAD_INPUT and "--data" in err
    assert tree(w) == before


@pytest.mark.parametrize("target", ["config", "datafile", "inside_model"])
def test_evaluate_output_never_replaces_an_input(w, capsys, target):
    out = {"config": w / "teacher" / "config.json", "datafile": w / "data" / "train.txt",
           "inside_model": w / "teacher" / "ev.json"}[target]
    before = tree(w)
    extra = ("--overwrite",) if target != "inside_model" else ()
    rc, err = run(capsys, "evaluate", "--model", w / "teacher", "--data", w / "data" / "train.txt",
                  "--output", out, *extra, *COMMON)
    assert rc == EXIT_BAD_INPUT and ("--model" in err or "--data" in err) and "input" in err
    assert tree(w) == before and not (w / "teacher" / "ev.json").exists()


def test_demo_output_is_its_data_dir(w, capsys):
    data = w / "demo-data"
    shutil.copytree(ROOT / "data", data)
    before = tree(data)
    rc, err = run(capsys, "demo", "--quick", "--data-dir", data, "--output", data, "--overwrite")
    assert rc == EXIT_BAD_INPUT and "--data-dir" in err
    assert tree(data) == before


def _pipeline(w: Path, out: Path, **over) -> Path:
    import yaml

    cfg = {"output_dir": str(out), "teacher": str(w / "teacher"), "backend": "reference", "device": "cpu",
           "data": {"train": str(w / "data" / "train.txt"), "eval": str(w / "data" / "train.txt"), "seq_len": 32,
                    "max_tokens": 2048, "eval_max_tokens": 512},
           "correct_teacher": {"steps": 0},
           "importance": {"batch_size": 4, "max_batches": 2},
           "students": {"depth": {"num_hidden_layers": 2}},
           "distill": {"steps": 1, "batch_size": 4, "warmup_steps": 0}}
    for path, value in over.items():
        node = cfg
        keys = path.split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    p = w / "pipe.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_pipeline_output_containing_its_data(w, capsys):
    shutil.copytree(w / "data", w / "corpus" / "d")
    cfg = _pipeline(w, w / "corpus", **{"data.train": str(w / "corpus" / "d" / "train.txt")})
    before = tree(w)
    rc, err = run(capsys, "pipeline", "--config", cfg, "--overwrite")
    assert rc == EXIT_BAD_INPUT and "data.train" in err and "output_dir" in err
    assert tree(w) == before


# ------------------------------------------------------------- --overwrite only swaps when complete
def _previous_output(path: Path) -> dict:
    path.mkdir()
    (path / "model").mkdir()
    (path / "model" / "precious.bin").write_bytes(os.urandom(64))
    (path / "run.json").write_text("{}")
    return tree(path)


def test_distill_overwrite_then_bad_argument_keeps_previous_run(w, capsys):
    prev = _previous_output(w / "run")
    rc, err = run(capsys, "distill", "--student", w / "teacher", "--teacher", w / "teacher", "--data",
                  w / "data" / "train.txt", "--output", w / "run", "--overwrite", "--seq-len", "100000",
                  *train_args())
    assert rc == EXIT_BAD_INPUT and "seq" in err
    assert tree(w / "run") == prev
    assert not [p for p in w.iterdir() if p.name.startswith(".run.")]


def test_correct_teacher_overwrite_nan_loss_keeps_previous_run(w, capsys):
    prev = _previous_output(w / "run")
    rc, err = run(capsys, "correct-teacher", "--model", w / "teacher", "--data", w / "data" / "train.txt",
                  "--output", w / "run", "--overwrite", "--lr", "1e30", "--max-grad-norm", "1e30", *COMMON,
                  *train_args(steps=6))
    assert rc == EXIT_RUNTIME and "step" in err and ("nan" in err.lower() or "inf" in err.lower())
    assert tree(w / "run") == prev
    assert not [p for p in w.iterdir() if p.name.startswith(".run.")]


def test_overwrite_replaces_only_after_success_and_cleans_leftovers(w, capsys):
    prev = _previous_output(w / "pruned")
    stale = w / ".pruned.tmp-killed"
    stale.mkdir()
    (stale / "junk").write_text("x")
    rc, err = run(capsys, "prune", "--model", w / "teacher", "--importance", w / "imp", "--hidden-size", "24",
                  "--output", w / "pruned", "--overwrite")
    assert rc == 0, err
    assert not stale.exists()
    assert (w / "pruned" / "config.json").is_file() and tree(w / "pruned") != prev


def test_interrupted_swap_is_restored_by_the_next_run(tmp_path):
    from minitron.io.safety import begin_output

    old = tmp_path / ".out.old-abc"
    old.mkdir()
    (old / "model.bin").write_bytes(b"previous")
    begin_output(tmp_path / "out", overwrite=True)  # killed between the two renames last time
    assert (tmp_path / "out" / "model.bin").read_bytes() == b"previous"


def test_outputs_get_ordinary_permissions(w, capsys):
    mask = os.umask(0o022)
    try:
        rc, err = run(capsys, "prune", "--model", w / "teacher", "--importance", w / "imp", "--hidden-size", "24",
                      "--output", w / "pruned")
        rc2, err2 = run(capsys, "importance", "--model", w / "teacher", "--data", w / "data" / "train.txt",
                        "--output", w / "imp2", "--backend", "reference", *COMMON)
    finally:
        os.umask(mask)
    assert rc == 0 and rc2 == 0, (err, err2)
    for d in (w / "pruned", w / "imp2"):
        assert (d.stat().st_mode & 0o777) == 0o755
        for f in d.iterdir():
            assert (f.stat().st_mode & 0o777) == 0o644, f


def test_pruned_model_carries_the_tokenizer_files_byte_for_byte(w, capsys):
    rc, err = run(capsys, "prune", "--model", w / "teacher", "--importance", w / "imp", "--hidden-size", "24",
                  "--output", w / "pruned")
    assert rc == 0, err
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (w / "pruned" / name).read_bytes() == (w / "tok" / name).read_bytes(), name


# ---------------------------------------------------------------------------- strict loading
def _break_tensor(ckpt: Path, how: str) -> str:
    from safetensors.torch import load_file, save_file

    f = ckpt / "model.safetensors"
    sd = load_file(f)
    key = "model.layers.1.mlp.up_proj.weight"
    if how == "missing":
        del sd[key]
    elif how == "nan":
        sd[key] = sd[key].clone()
        sd[key][0, 0] = float("nan")
    elif how == "shape":
        sd[key] = sd[key][:8].clone()
    elif how == "unexpected":
        key = "model.extra.weight"
        sd[key] = torch.zeros(3)
    save_file(sd, f, metadata={"format": "pt"})
    return key


@pytest.mark.parametrize("how", ["missing", "nan", "shape", "unexpected"])
@pytest.mark.parametrize("cmd", ["importance", "prune", "evaluate"])
def test_broken_checkpoint_is_refused_naming_the_tensor(w, capsys, how, cmd):
    key = _break_tensor(w / "teacher", how)
    before = tree(w)
    args = {"importance": ("--data", w / "data" / "train.txt", "--output", w / "o", "--backend", "reference", *COMMON),
            "prune": ("--importance", w / "imp", "--num-layers", "3", "--output", w / "o"),
            "evaluate": ("--data", w / "data" / "train.txt", *COMMON)}[cmd]
    rc, err = run(capsys, cmd, "--model", w / "teacher", *args)
    assert rc == EXIT_BAD_INPUT and key in err and str(w / "teacher") in err, err
    if how in ("nan", "shape"):
        assert "model.safetensors" in err
    assert tree(w) == before and not (w / "o").exists()


@pytest.mark.parametrize("target", ["weights_truncated", "weights_garbage", "config_truncated"])
def test_corrupt_checkpoint_file_is_named(w, capsys, target):
    f = w / "teacher" / ("config.json" if target == "config_truncated" else "model.safetensors")
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if target != "weights_garbage" else os.urandom(200))
    rc, err = run(capsys, "evaluate", "--model", w / "teacher", "--data", w / "data" / "train.txt", *COMMON)
    assert rc == EXIT_BAD_INPUT and str(f) in err and "corrupt or truncated" in err, err


@pytest.mark.parametrize("target", ["importance.safetensors", "importance.json"])
def test_corrupt_importance_file_is_named(w, capsys, target):
    f = w / "imp" / target
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    rc, err = run(capsys, "prune", "--model", w / "teacher", "--importance", w / "imp", "--hidden-size", "24",
                  "--output", w / "o")
    assert rc == EXIT_BAD_INPUT and str(f) in err and "corrupt or truncated" in err, err
    assert not (w / "o").exists()


@pytest.mark.parametrize("kind", ["width", "depth"])
def test_importance_of_another_model_is_refused(w, capsys, kind):
    from minitron.io.checkpoint import save_model

    # same config sizes, other tensors (attention biases): the config fingerprint alone cannot tell
    other = make_model("llama", vocab_size=300, attention_bias=True, mlp_bias=False)
    save_model(other, w / "other", tokenizer_dir=w / "tok")
    target = ("--hidden-size", "24") if kind == "width" else ("--num-layers", "3")
    rc, err = run(capsys, "prune", "--model", w / "other", "--importance", w / "imp", *target, "--output", w / "o")
    assert rc == EXIT_BAD_INPUT and "different model" in err, err
    assert not (w / "o").exists()


def test_depth_importance_of_a_model_with_other_sizes_is_refused(w, capsys):
    from minitron.io.checkpoint import save_model

    other = make_model("llama", vocab_size=300, hidden_size=36, num_attention_heads=6, num_key_value_heads=2,
                       attention_bias=False, mlp_bias=False)
    save_model(other, w / "other", tokenizer_dir=w / "tok")
    rc, err = run(capsys, "prune", "--model", w / "other", "--importance", w / "imp", "--num-layers", "3",
                  "--output", w / "o")
    assert rc == EXIT_BAD_INPUT and "hidden_size" in err, err


def test_nan_weights_loaded_in_python_are_refused_before_importance(w):
    from minitron import api

    model = make_model("llama", vocab_size=300)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="q_proj.weight"):
        api.estimate_importance(model, w / "data" / "train.txt", tokenizer=w / "tok", seq_len=32, max_batches=1,
                                backend="reference")


def test_allow_nonfinite_loads_for_inspection(w):
    from minitron.io.checkpoint import load_model

    _break_tensor(w / "teacher", "nan")
    model, _ = load_model(w / "teacher", allow_nonfinite=True)
    assert torch.isnan(model.model.layers[1].mlp.up_proj.weight).any()


# ---------------------------------------------------------------------------- bad data and paths
@pytest.mark.parametrize("content", [b"", b"\x00\x01\x02binary\xff" * 50, b"\xff\xfe\xfa not utf8" * 10, b"  \n\n "])
def test_empty_binary_or_non_utf8_data_is_refused(w, capsys, content):
    bad = w / "data" / "bad.txt"
    bad.write_bytes(content)
    rc, err = run(capsys, "importance", "--model", w / "teacher", "--data", bad, "--output", w / "o", *COMMON)
    assert rc == EXIT_BAD_INPUT and "--data" in err and str(bad) in err, err
    assert bad.read_bytes() == content and not (w / "o").exists()


def test_mistyped_relative_path_is_not_taken_for_a_hub_name(w, capsys, monkeypatch):
    monkeypatch.chdir(w)
    t0 = time.time()
    rc, err = run(capsys, "evaluate", "--model", "teacher/typo", "--data", "data/train.txt", *COMMON)
    assert rc == EXIT_BAD_INPUT and "teacher/typo" in err and "does not exist" in err
    assert time.time() - t0 < 10


def test_typo_of_a_local_checkpoint_name_is_not_looked_up_on_the_hub(w, capsys, monkeypatch):
    monkeypatch.chdir(w)
    t0 = time.time()
    rc, err = run(capsys, "evaluate", "--model", "teachr", "--data", "data/train.txt", *COMMON)
    assert rc == EXIT_BAD_INPUT and "'teachr'" in err and "did you mean 'teacher'" in err
    assert time.time() - t0 < 10


def test_hub_name_while_offline_is_refused_at_once(w, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    rc, err = run(capsys, "evaluate", "--model", "someorg/somemodel", "--data", w / "data" / "train.txt", *COMMON)
    assert rc == EXIT_BAD_INPUT and "offline" in err and "--model" in err
    assert time.time() - t0 < 10


def test_impossible_output_location_is_refused_before_work(w, capsys):
    rc, err = run(capsys, "prune", "--model", w / "teacher", "--importance", w / "imp", "--hidden-size", "24",
                  "--output", w / "data" / "train.txt" / "sub")
    assert rc == EXIT_BAD_INPUT and "not a directory" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_location_is_refused_before_work(w, capsys):
    ro = w / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        rc, err = run(capsys, "prune", "--model", w / "teacher", "--importance", w / "imp", "--hidden-size", "24",
                      "--output", ro / "out")
    finally:
        ro.chmod(0o700)
    assert rc == EXIT_BAD_INPUT and "not writable" in err


def test_not_enough_disk_space_is_refused(tmp_path):
    from minitron.io.safety import check_output

    with pytest.raises(ValueError, match="disk space"):
        check_output(tmp_path / "o", estimated_bytes=1 << 62)


# ---------------------------------------------------------------------------- messages
def test_existing_output_message_suggests_resume_only_where_it_exists(w, capsys):
    (w / "o").mkdir()
    (w / "o" / "f").write_text("x")
    rc, err = run(capsys, "prune", "--model", w / "teacher", "--importance", w / "imp", "--hidden-size", "24",
                  "--output", w / "o")
    assert rc == EXIT_BAD_INPUT and "--overwrite" in err and "--resume" not in err
    rc, err = run(capsys, "correct-teacher", "--model", w / "teacher", "--data", w / "data" / "train.txt",
                  "--output", w / "o", *COMMON, *train_args())
    assert rc == EXIT_BAD_INPUT and "--resume" in err


def test_usage_errors_are_one_line(capsys):
    rc, err = run(capsys, "prune", "--model", "x", "--hidden-size", "abc")
    assert rc == EXIT_BAD_INPUT and "--hidden-size" in err


# ---------------------------------------------------------------------------- pipeline YAML
@pytest.mark.parametrize("key,value,expect", [
    ("students.depth.contiguous", "yes", "students.depth.contiguous"),
    ("students.depth.depth_metric", "lm_los", "students.depth.depth_metric"),
    ("students.depth.layers_to_drop", [0, 9], "students.depth.layers_to_drop"),
    ("importance.seq_agg", "meen", "importance.seq_agg"),
    ("importance.layer_metrics", ["block_influense"], "importance.layer_metrics"),
    ("importance.layer_metrics", ["block_influence"], "students.depth.depth_metric"),
    ("evaluate.batch_size", 0, "evaluate.batch_size"),
    ("distill.lr", "fast", "distill.lr"),
    ("distill.temperature", -1, "distill.temperature"),
    ("students.depth.distill", {"steps": 0}, "students.depth.distill.steps"),
    ("data.seq_len", 100000, "data.seq_len"),
    ("device", "gpu0", "device"),
])
def test_pipeline_yaml_values_are_checked_before_any_stage(w, capsys, key, value, expect):
    cfg = _pipeline(w, w / "pout", **{key: value})
    t0 = time.time()
    rc, err = run(capsys, "pipeline", "--config", cfg)
    assert rc == EXIT_BAD_INPUT and expect in err and str(cfg) in err, err
    assert not (w / "pout").exists()
    assert time.time() - t0 < 20


def test_interrupt_during_overwrite_keeps_previous_run_and_leaves_no_temporary(w):
    from minitron import api

    prev = _previous_output(w / "run")

    def interrupt(step, record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        api.correct_teacher(w / "teacher", w / "data" / "train.txt", output_dir=w / "run", overwrite=True, seq_len=32,
                            max_tokens=2048, steps=3, batch_size=4, device="cpu", callbacks=[interrupt])
    assert tree(w / "run") == prev
    assert not [p for p in w.iterdir() if p.name.startswith(".run.")]


def test_trained_model_carries_the_tokenizer_files_byte_for_byte(w, capsys):
    rc, err = run(capsys, "correct-teacher", "--model", w / "teacher", "--data", w / "data" / "train.txt",
                  "--output", w / "run", *COMMON, *train_args(steps=1))
    assert rc == 0, err
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (w / "run" / "model" / name).read_bytes() == (w / "tok" / name).read_bytes(), name


def test_truncated_training_checkpoint_is_named_on_resume(w, capsys):
    rc, err = run(capsys, "correct-teacher", "--model", w / "teacher", "--data", w / "data" / "train.txt",
                  "--output", w / "run", "--save-every", "1", *COMMON, *train_args(steps=2))
    assert rc == 0, err
    ckpt = sorted((w / "run" / "checkpoints").glob("step-*"))[-1]
    f = ckpt / "optimizer.pt"
    f.write_bytes(f.read_bytes()[:100])
    rc, err = run(capsys, "correct-teacher", "--model", w / "teacher", "--data", w / "data" / "train.txt",
                  "--output", w / "run", "--save-every", "1", "--resume", *COMMON, *train_args(steps=2))
    assert rc == EXIT_BAD_INPUT and str(f) in err and "corrupt or truncated" in err, err


def test_resume_cleans_temporaries_inside_the_run_directory(tmp_path):
    from minitron.io.safety import begin_output

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "log.jsonl").write_text("{}\n")
    (run_dir / ".run.json.tmp-abc.tmp").write_text("half")
    (run_dir / "checkpoints" / ".evaluations.json.tmp-x.tmp").write_text("half")
    assert begin_output(run_dir, overwrite=False) == run_dir
    assert sorted(p.name for p in run_dir.rglob("*")) == ["checkpoints", "log.jsonl"]


def test_broken_yaml_is_one_line_naming_the_file(w, capsys):
    cfg = w / "bad.yaml"
    cfg.write_text("teacher: [unclosed\n  data: {train: x\n")
    rc, err = run(capsys, "pipeline", "--config", cfg)
    assert rc == EXIT_BAD_INPUT and str(cfg) in err and "YAML" in err


def test_config_without_model_type_is_named(w, capsys):
    (w / "teacher" / "config.json").write_text("{}")
    rc, err = run(capsys, "evaluate", "--model", w / "teacher", "--data", w / "data" / "train.txt", *COMMON)
    assert rc == EXIT_BAD_INPUT and "--model" in err and str(w / "teacher") in err, err


def test_unwritable_location_message(tmp_path, monkeypatch):
    from minitron.io import safety

    real = os.access
    monkeypatch.setattr(safety.os, "access", lambda p, mode: False if Path(p) == tmp_path else real(p, mode))
    with pytest.raises(ValueError, match="not writable"):
        safety.check_output(tmp_path / "out", what="--output")


def test_prune_refuses_a_nan_model_given_in_python(w):
    from minitron import api
    from minitron.compress.importance import ImportanceScores

    model = make_model("llama", vocab_size=300, attention_bias=False, mlp_bias=False)
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight[1, 1] = float("inf")
    scores = ImportanceScores.load(w / "imp")
    with pytest.raises(ValueError, match="down_proj.weight"):
        api.prune(model, importance=scores, num_hidden_layers=3, output_dir=w / "o")
    assert not (w / "o").exists()


def test_evaluate_allow_nonfinite_flag_loads_a_nan_model(w, capsys):
    _break_tensor(w / "teacher", "nan")
    before = tree(w)
    rc, err = run(capsys, "evaluate", "--model", w / "teacher", "--data", w / "data" / "train.txt", *COMMON)
    assert rc == EXIT_BAD_INPUT and "--allow-nonfinite" in err
    rc, err = run(capsys, "evaluate", "--model", w / "teacher", "--data", w / "data" / "train.txt", "--allow-nonfinite",
                  *COMMON)
    assert rc == 0, err
    assert tree(w) == before
