"""``minitron search`` on the command line: the dry run on the shipped 8B/12B configs, and bad input (exit 2, one
line, before any work)."""
from __future__ import annotations

import pytest

from minitron.cli import COMMANDS, EXIT_BAD_INPUT, main
from minitron.resources.architectures import architectures_dir


def test_search_is_a_command():
    assert "search" in COMMANDS


@pytest.mark.parametrize("model,budget,row", [
    ("llama-3.1-8b", "4.52e9", "| `h3072-i9216-a32-kv8-l32` | width | 3072 | 9216 | 32/8 | 32 | 4,512.7M |"),
    (str(architectures_dir() / "mistral-nemo-12b.json"), "8.42B",
     "| `h4096-i11520-a32-kv8-l40` | width | 4096 | 11520 | 32/8 | 40 | 8,414.1M |"),
])
def test_dry_run_on_the_shipped_configs(model, budget, row, capsys):
    assert main(["--log-level", "WARNING", "search", "--model", model, "--target-params", budget, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert row in out
    assert "candidates meet" in out and "nothing loaded; nothing written" in out


def test_dry_run_writes_the_table_when_given_an_output(tmp_path, capsys):
    import json

    argv = ["--log-level", "WARNING", "search", "--model", "llama-3.1-8b", "--target-params", "4.52e9", "--dry-run",
            "--output", str(tmp_path / "t")]
    assert main(argv) == 0
    s = json.loads((tmp_path / "t" / "search.json").read_text())
    assert s["dry_run"] and "h3072-i9216-a32-kv8-l32" in {r["id"] for r in s["candidates"]}
    assert "h3072-i9216-a32-kv8-l32" in (tmp_path / "t" / "search.md").read_text()
    capsys.readouterr()
    assert main(argv) == EXIT_BAD_INPUT  # an existing output needs --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0


def test_dry_run_with_a_memory_budget(capsys):
    rc = main(["--log-level", "WARNING", "search", "--model", "llama-3.1-8b", "--target-memory", "10GB",
               "--memory-seq-len", "8192", "--memory-batch", "2", "--dry-run"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "10,000,000,000 bytes of weights + KV cache at 8192 tokens x 2" in out


@pytest.mark.parametrize("argv,msg", [
    (["--target-params", "1e12"], "at or above the model's own size"),
    (["--target-params", "1e9"], "below the smallest size reachable"),
    (["--target-params", "4.5e9", "--max-width-prune", "1"], "max_width_prune must be a number in [0, 1)"),
    (["--target-params", "4.5e9", "--max-depth-prune", "1.5"], "max_depth_prune must be a number in [0, 1)"),
    (["--target-params", "4.5e9", "--top-k", "0"], "top_k must be an int >= 1"),
    ([], "give a budget"),
])
def test_bad_input_exits_2_with_one_line(argv, msg, capsys):
    rc = main(["search", "--model", "llama-3.1-8b", "--dry-run", *argv])
    assert rc == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1
    if "reachable" in msg or "own size" in msg:
        assert "to 8,030,261,248 parameters" in err  # the largest reachable size: the teacher itself


def test_full_search_needs_importance_and_output(tmp_path, capsys):
    rc = main(["search", "--model", "llama-3.1-8b", "--target-params", "4.52e9", "--data", str(tmp_path)])
    assert rc == EXIT_BAD_INPUT
    assert "needs --importance" in capsys.readouterr().err


def test_importance_then_search_on_a_tiny_checkpoint(tmp_path, capsys):
    """The full command: a tiny Llama checkpoint with a word-level tokenizer, `minitron importance` (with the LM-loss
    layer metric), then `minitron search`; the winner is a checkpoint transformers loads."""
    import json
    import random

    from transformers import AutoModelForCausalLM

    from tests.driver.test_checkpoint import tiny_tokenizer
    from tests.search.conftest import make_model

    model = make_model("llama", num_hidden_layers=5)
    model.save_pretrained(tmp_path / "teacher")
    tiny_tokenizer().save_pretrained(tmp_path / "teacher")
    rnd = random.Random(0)
    (tmp_path / "train.txt").write_text("\n".join(" ".join(f"w{rnd.randrange(4, 96)}" for _ in range(40))
                                                  for _ in range(12)) + "\n")
    data = ["--data", str(tmp_path / "train.txt"), "--seq-len", "16"]
    assert main(["--log-level", "WARNING", "importance", "--model", str(tmp_path / "teacher"), *data,
                 "--output", str(tmp_path / "imp"), "--layer-metrics", "block_influence,lm_loss",
                 "--batch-size", "4"]) == 0
    total = sum(p.numel() for p in model.parameters())
    argv = ["--log-level", "WARNING", "search", "--model", str(tmp_path / "teacher"), "--importance",
            str(tmp_path / "imp"), *data, "--target-params", str(int(total * 0.8)), "--hidden-multiple", "6",
            "--mlp-multiple", "8", "--tolerance", "0.06", "--top-k", "2", "--distill-tokens", "32",
            "--score-tokens", "32", "--batch-size", "2", "--device", "cpu", "--output", str(tmp_path / "out")]
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    s = json.loads((tmp_path / "out" / "search.json").read_text())
    assert f"winner {s['winner']}" in out and s["train"]["batch_size"] == 2 and s["train"]["lr"] == 4e-4
    win = next(r for r in s["candidates"] if r["id"] == s["winner"])
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model")
    assert sum(p.numel() for p in m.parameters()) == win["parameters"]
    assert (tmp_path / "out" / "model" / "tokenizer.json").is_file()
    assert main(argv) == EXIT_BAD_INPUT  # exists: --overwrite or --resume
    assert main(argv + ["--resume"]) == 0  # everything is in the state: nothing recomputed
