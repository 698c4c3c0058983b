"""The real-model demo (``minitron demo``, :func:`minitron.demo.run_real_demo`) on a tiny checkpoint with tiny
budgets (no network), its fallback to the toy demo when the model cannot be fetched, and the README block
generated from the committed record (``docs/demo/results.json``)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from minitron import _ext

ROOT = Path(__file__).resolve().parents[2]
VALID = ROOT / "data" / "wikitext-2" / "valid.txt"
TEST = ROOT / "data" / "wikitext-2" / "test.txt"
BACKEND = "auto" if _ext.available() else "reference"
LABELS = ["teacher", "teacher (corrected)", "width pruned", "width distilled", "depth pruned", "depth distilled"]


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A tiny Llama checkpoint (9 heads in 3 KV groups, like SmolLM2) with a BPE tokenizer saved beside it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from minitron.io.tokenizer import train_bpe_tokenizer

    d = tmp_path_factory.mktemp("demo-real") / "teacher"
    tok = train_bpe_tokenizer(texts=[VALID.read_text(encoding="utf-8")[:40_000]], vocab_size=300)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=72, intermediate_size=96, num_attention_heads=9,
                      num_key_value_heads=3, head_dim=8, num_hidden_layers=4, max_position_embeddings=128,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    LlamaForCausalLM(cfg).save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d


def _tiny_preset():
    from minitron.demo import RealPreset

    return RealPreset(
        seq_len=32,
        correct=dict(steps=3, batch_size=4, lr=1e-3, warmup_steps=1, log_every=1),
        distill=dict(batch_size=4, lr=3e-3, warmup_steps=1, log_every=1),
        steps={"width": 4, "depth": 3},
        importance=dict(batch_size=4, max_batches=2, layer_metrics=["block_influence"]),
        eval_max_tokens=512, eval_batch_size=8, max_new_tokens=5, threads=1,
    )


def test_real_demo_on_a_tiny_model(tiny_teacher, tmp_path, monkeypatch):
    from minitron import demo

    monkeypatch.setitem(demo.REAL_PRESETS, "default", _tiny_preset())
    out = tmp_path / "demo"
    res = demo.run_demo(out, model=str(tiny_teacher), wikitext_valid=VALID, wikitext_test=TEST, backend=BACKEND)
    assert "fallback" not in res
    saved = json.loads((out / "results.json").read_text())
    rows = {r["label"]: r for r in saved["rows"]}
    assert list(rows) == LABELS
    assert len({r["tokens"] for r in saved["rows"]}) == 1 and saved["eval_tokens"] == rows["teacher"]["tokens"]
    assert rows["teacher (corrected)"]["ppl_ratio"] == pytest.approx(1.0)
    # width: 6 of 9 heads, 2 of 3 KV heads, head_dim 8 -> hidden 48; depth: 2 of 4 layers
    assert saved["students"]["width"]["config"]["hidden_size"] == 48
    assert saved["students"]["width"]["config"]["num_key_value_heads"] == 2
    assert saved["students"]["depth"]["config"]["num_hidden_layers"] == 2
    emb = 300 * 72
    assert rows["teacher"]["non_embedding_parameters"] == rows["teacher"]["parameters"] - emb
    assert rows["width pruned"]["non_embedding_parameters"] == rows["width pruned"]["parameters"] - 300 * 48
    assert 0.3 < rows["width pruned"]["non_embedding_fraction"] < 0.6
    assert 0.4 < rows["depth pruned"]["non_embedding_fraction"] < 0.6
    for name in ("width", "depth"):
        assert rows[f"{name} distilled"]["loss"] < rows[f"{name} pruned"]["loss"]
    assert set(saved["continuations"]) == {"teacher", "teacher (corrected)", "width distilled", "depth distilled"}
    assert saved["budgets"]["tokens"]["distill_width"] == 4 * 4 * 32
    for key in ("pipeline/correct_teacher", "pipeline/importance", "pipeline/width/distill", "generate", "total"):
        assert key in saved["timings"], key
    assert {"torch", "transformers", "python"} <= set(saved["versions"]) and "commit" in saved
    md = (out / "results.md").read_text()
    assert "| width distilled |" in md and "ppl / corrected teacher" in md and saved["prompt"] in md
    for f in ("pipeline/teacher_corrected/model/config.json", "pipeline/students/depth/distill/model/config.json"):
        assert (out / f).is_file(), f


def test_cli_demo_flags(monkeypatch, tmp_path, capsys):
    """``minitron demo`` dispatches: real by default (``--model``), ``--toy``/``--quick`` the toy demo."""
    from minitron import demo
    from minitron.cli import EXIT_BAD_INPUT, main

    calls = []
    fake = {"table": "| t |\n", "timings": {"total": 1.0}, "output_dir": "x"}
    monkeypatch.setattr(demo, "run_real_demo", lambda out, **kw: calls.append(("real", out, kw["model"])) or
                        dict(fake, prompt="p", continuations={"teacher": "a b"}))
    monkeypatch.setattr(demo, "run_toy_demo", lambda out, **kw: calls.append(("toy", out, kw.get("quick"))) or
                        dict(fake, loss_gap_recovered_by_distillation={"width": 0.5}))
    assert main(["demo"]) == 0
    assert main(["demo", "--model", "some/ckpt", "--output", str(tmp_path / "o")]) == 0
    assert main(["demo", "--toy"]) == 0
    assert main(["demo", "--quick"]) == 0
    assert calls == [("real", "runs/demo", "smollm2-135m"), ("real", str(tmp_path / "o"), "some/ckpt"),
                     ("toy", "runs/demo", False), ("toy", "runs/demo-quick", True)]
    assert main(["demo", "--toy", "--model", "x"]) == EXIT_BAD_INPUT
    assert "greedy continuations" in capsys.readouterr().out


def test_falls_back_to_the_toy_demo_when_the_model_cannot_be_fetched(monkeypatch, tmp_path, caplog):
    from minitron import api, demo
    from minitron.io.fetch import FetchError

    def no_registry(name, *a, **kw):
        raise FetchError("no registry reachable (test)")

    toy_calls = []
    monkeypatch.setattr(api, "fetch", no_registry)
    monkeypatch.setattr(demo, "run_toy_demo", lambda out, **kw: toy_calls.append((out, kw)) or {"table": "t"})
    out = tmp_path / "demo"
    with caplog.at_level("WARNING", logger="minitron.demo"):
        res = demo.run_demo(out, shakespeare=None, seed=3)
    assert toy_calls == [(out, {"shakespeare": None, "seed": 3})]
    assert "cannot be fetched" in res["fallback"] and "no registry reachable" in res["fallback"]
    assert any("running the toy demo instead" in r.getMessage() for r in caplog.records)
    assert not out.exists()  # the real demo wrote nothing before it gave up


def test_readme_demo_block_is_generated_from_the_committed_record():
    from benchmarks import report

    record = json.loads((ROOT / "docs" / "demo" / "results.json").read_text())
    assert [r["label"] for r in record["rows"]] == LABELS
    block = report.default_render()("demo")
    assert record["table"] in block
    readme = (ROOT / "README.md").read_text()
    assert "<!-- generated:demo begin -->\n" + block in readme
    assert report.render_blocks(readme, report.default_render()) == readme
