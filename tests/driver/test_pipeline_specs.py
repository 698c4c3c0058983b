"""The pipeline runs every stage through minitron.api (so YAML gains streaming), and bounds are checked where
the user typed them: a CLI flag or a YAML key, before any model is loaded or any output created."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from minitron.cli import EXIT_BAD_INPUT, build_parser, main

ROOT = Path(__file__).resolve().parents[2]
VALID = ROOT / "data" / "wikitext-2" / "valid.txt"
TEST = ROOT / "data" / "wikitext-2" / "test.txt"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from minitron.io.checkpoint import save_model
    from minitron.io.tokenizer import train_bpe_tokenizer

    d = tmp_path_factory.mktemp("pipe") / "teacher"
    tok = train_bpe_tokenizer(texts=VALID.read_text().splitlines()[:2000], vocab_size=300)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=2, num_hidden_layers=3, max_position_embeddings=64, bos_token_id=0,
                      eos_token_id=0, pad_token_id=1)
    save_model(LlamaForCausalLM(cfg), d, tokenizer=tok)
    return d


def _config(teacher: Path, out: Path, **extra) -> dict:
    cfg = {
        "output_dir": str(out), "teacher": str(teacher), "device": "cpu", "backend": "reference",
        "data": {"train": str(VALID), "eval": str(TEST), "seq_len": 32, "max_tokens": 4096, "eval_max_tokens": 1024},
        "correct_teacher": {"steps": 2, "batch_size": 4},
        "importance": {"batch_size": 4, "max_batches": 2},
        "students": {"width": {"hidden_size": 16, "intermediate_size": 32},
                     "depth": {"num_hidden_layers": 2},
                     "width-topk": {"hidden_size": 16, "distill": {"teacher_logits": True}}},
        "distill": {"steps": 2, "batch_size": 4},
        "teacher_logits": {"top_k": 8},
        "evaluate": {"batch_size": 8},
    }
    cfg.update(extra)
    return cfg


def test_pipeline_yaml_with_streaming(teacher, tmp_path, capsys, monkeypatch):
    import minitron.compress.stream_prune as sp
    import minitron.compress.streaming as st

    calls = []
    for mod, name in ((sp, "prune_checkpoint_streaming"), (st, "estimate_importance_streaming")):
        def spy(*a, _f=getattr(mod, name), _n=name, **k):
            calls.append(_n)
            return _f(*a, **k)
        monkeypatch.setattr(mod, name, spy)
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump(_config(teacher, tmp_path / "out", streaming=True), sort_keys=False))
    assert main(["--log-level", "WARNING", "pipeline", "--config", str(cfg)]) == 0, capsys.readouterr().err
    out = tmp_path / "out"
    res = json.loads((out / "results.json").read_text())
    labels = [r["label"] for r in res["rows"]]
    assert labels == ["teacher", "teacher (corrected)", "width pruned", "width distilled", "depth pruned",
                      "depth distilled", "width-topk pruned", "width-topk distilled"]
    assert (out / "importance" / "importance.json").is_file()
    assert (out / "teacher_logits" / "manifest.json").is_file()
    # importance and every pruning streamed from the (corrected) teacher's checkpoint
    assert calls.count("estimate_importance_streaming") == 1 and calls.count("prune_checkpoint_streaming") == 3
    assert res["students"]["width"]["config"]["hidden_size"] == 16
    assert res["students"]["depth"]["config"]["num_hidden_layers"] == 2


def test_temperature_bound_checked_before_any_load(tmp_path, capsys):
    out = tmp_path / "d"
    rc = main(["distill", "--student", str(tmp_path / "no-student"), "--teacher", str(tmp_path / "no-teacher"),
               "--data", str(tmp_path / "no-data.txt"), "--output", str(out), "--temperature", "200"])
    err = capsys.readouterr().err
    assert rc == EXIT_BAD_INPUT and "temperature" in err and "100" in err, err
    assert not out.exists()
    rc = main(["teacher-logits", "--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "no-data.txt"),
               "--output", str(out), "--temperature", "1000"])
    err = capsys.readouterr().err
    assert rc == EXIT_BAD_INPUT and "temperature" in err, err
    assert not out.exists()


def test_temperature_bound_in_yaml(teacher, tmp_path, capsys, monkeypatch):
    import minitron.api as api

    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(api, "load_model", no_load)
    cfg = _config(teacher, tmp_path / "out")
    cfg["distill"]["temperature"] = 200
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(cfg))
    rc = main(["pipeline", "--config", str(p)])
    err = capsys.readouterr().err
    assert rc == EXIT_BAD_INPUT and "distill.temperature" in err and "100" in err, err
    assert not (tmp_path / "out").exists()


def test_every_flag_has_help_with_default():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        if name == "info":
            continue
        for a in p._actions:
            if a.dest == "help":
                continue
            assert a.help, f"minitron {name} {a.option_strings}: no help"
            assert "default" in a.help or "required" in a.help, f"minitron {name} {a.option_strings}: {a.help!r}"


def test_prune_help_describes_width_targets(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--hidden-size", "--intermediate-size", "--num-attention-heads", "--num-key-value-heads"):
        assert flag in text
    assert text.count("keep the teacher's") >= 5
