"""GGUF files through the CLI: `minitron convert`, `minitron fetch` (bad names), and a `.gguf` given as --model to
the in-memory and the streamed commands (converted once into $MINITRON_CACHE, then read as any checkpoint)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minitron.cli import main
from tests.io.test_gguf import write_tiny_gguf

REPO = Path(__file__).resolve().parents[2]
VALID = REPO / "minitron" / "resources" / "data" / "wikitext-2" / "valid.txt"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    c = tmp_path / "cache"
    monkeypatch.setenv("MINITRON_CACHE", str(c))
    return c


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path)
    return path


def test_convert_command_writes_a_plain_checkpoint(tiny_gguf, tmp_path, cache, capsys):
    out = tmp_path / "plain"
    assert main(["--log-level", "WARNING", "convert", str(tiny_gguf), "--output", str(out), "--dtype", "bf16"]) == 0
    assert "converted" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "quantization_config" not in cfg
    assert all(t.dtype == torch.bfloat16 for t in load_file(str(out / "model.safetensors")).values())
    # an existing output is refused, naming it; nothing of the user's is replaced
    before = sorted(p.name for p in out.iterdir())
    assert main(["convert", str(tiny_gguf), "--output", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and sorted(p.name for p in out.iterdir()) == before


def test_convert_refuses_a_truncated_file_before_any_output(tiny_gguf, tmp_path, cache, capsys):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    assert main(["convert", str(bad), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "cut.gguf" in err and "truncated" in err
    assert not (tmp_path / "o").exists()
    # the same file as --model is refused the same way, before anything is loaded
    assert main(["evaluate", "--model", str(bad), "--data", str(VALID), "--seq-len", "32"]) == 2
    assert "truncated" in capsys.readouterr().err


def test_fetch_of_an_unknown_name_lists_the_known_ones(cache, capsys):
    assert main(["fetch", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "no-such-model" in err and "smollm2-135m" in err


def test_gguf_as_model_in_memory_and_streamed(tiny_gguf, tmp_path, cache, capsys):
    common = ["--log-level", "WARNING", "importance", "--model", str(tiny_gguf), "--data", str(VALID),
              "--seq-len", "32", "--batch-size", "2", "--max-batches", "2", "--layer-metrics", "block_influence,lm_loss"]
    assert main([*common, "--output", str(tmp_path / "mem"), "--no-streaming"]) == 0
    assert main([*common, "--output", str(tmp_path / "str"), "--streaming"]) == 0
    a = load_file(str(tmp_path / "mem" / "importance.safetensors"))
    b = load_file(str(tmp_path / "str" / "importance.safetensors"))
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    # converted once into the cache, reused by the second command
    assert len(list((cache / "gguf").glob("tiny-*/fp32/config.json"))) == 1
    assert main(["--log-level", "WARNING", "prune", "--model", str(tiny_gguf), "--importance", str(tmp_path / "mem"),
                 "--output", str(tmp_path / "pruned"), "--num-layers", "1", "--depth-metric", "block_influence"]) == 0
    cfg = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 1
    assert (tmp_path / "pruned" / "tokenizer.json").is_file()  # the converted tokenizer travels with the student
    capsys.readouterr()
    assert main(["evaluate", "--model", str(tiny_gguf), "--data", str(VALID), "--seq-len", "32",
                 "--max-batches", "1"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert torch.isfinite(torch.tensor(res["ppl"]))
