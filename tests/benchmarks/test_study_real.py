"""The real-teacher path of the study (``--teacher PATH``) on a tiny local checkpoint, the one-pass aggregation
sweep, and the README table generator (``benchmarks.study.tables``)."""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks.study import experiment as study


def _backend() -> str:
    from minitron import _ext

    return "auto" if _ext.available() else "reference"


def _data_available() -> bool:
    try:
        for rel in study.DATA_FILES.values():
            study.resolve_data_path(rel)
    except FileNotFoundError:
        return False
    return True


needs_data = pytest.mark.skipif(not _data_available(), reason="shipped data (data/ or ../shared/data) not found")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny Llama with tied embeddings (as SmolLM2) and a BPE tokenizer, saved as a plain checkpoint."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from minitron.io.tokenizer import train_bpe_tokenizer

    path = tmp_path_factory.mktemp("tiny_ckpt")
    text = study.resolve_data_path(study.DATA_FILES["distill_data"]).read_text(encoding="utf-8")[:60_000]
    tok = train_bpe_tokenizer(texts=text.splitlines(keepends=True), vocab_size=300)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).float().save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def real_quick_run(tiny_checkpoint, tmp_path_factory):
    from benchmarks.minitron_study import main

    out = tmp_path_factory.mktemp("study_real") / "real"
    rc = main(["--teacher", str(tiny_checkpoint), "--quick", "--seeds", "1", "--out", str(out), "--backend",
               _backend(), "--threads", "1"])
    assert rc == 0
    return out


@needs_data
def test_real_teacher_quick_run(real_quick_run, tiny_checkpoint):
    out = real_quick_run
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["teacher_model"] == str(tiny_checkpoint)
    assert res["teacher"]["pretrain_tokens"] == 0
    assert set(res["arms"]) == {"a", "b", "c", "d", "e"}
    for key, arm in res["arms"].items():
        assert set(arm["seeds"]) == {"0"}, key
        assert arm["seeds"]["0"]["test_ppl"] > 1
    # the training text is WikiText-2 valid + Tiny Shakespeare
    assert res["data"]["distill_train_tokens"] > res["data"]["teacher_train_tokens"]
    assert "licences" in res and "wikitext-2" in res["licences"]
    assert set(res["aggregation"]) >= {"mean/l2", "l2/mean", "max/max", study.MAGNITUDE}
    assert all(v.get("0") for v in res["aggregation"].values())
    md = (out / "results.md").read_text()
    assert "real teacher" in md and "Licences" in md


def test_one_pass_sweep_matches_estimate_importance():
    from transformers import AutoModelForCausalLM, LlamaConfig

    from benchmarks.study.sweep import scores_for_pairs
    from minitron.compress.importance import estimate_importance

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)).float().eval()
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(3):
        ids = torch.randint(0, 64, (2, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    pairs = [("mean", "l2"), ("max", "mean"), ("var", "sum"), ("l2", "max")]
    swept = scores_for_pairs(model, batches, pairs, backend=_backend())
    assert list(swept) == pairs
    for s, b in pairs:
        ref = estimate_importance(model, batches, seq_agg=s, batch_agg=b, layer_metrics=(), progress=False,
                                  backend=_backend())
        for name in ("heads", "kv_groups", "neurons", "channels"):
            torch.testing.assert_close(getattr(swept[(s, b)], name), getattr(ref, name), msg=f"{s}/{b} {name}")
        assert swept[(s, b)].meta["config_fingerprint"] == ref.meta["config_fingerprint"]


README_SAMPLE = """# minitron

## Before

text

## The papers in miniature

The toy study's prose and table.

| arm | test ppl |
| --- | --- |
| (a) | 1 |

## Layout
"""


@needs_data
def test_table_generator_inserts_then_rewrites_the_block(real_quick_run, tmp_path):
    from benchmarks.study import tables

    readme = tmp_path / "README.md"
    readme.write_text(README_SAMPLE)
    results = real_quick_run / "results.json"
    assert tables.main(["--results", str(results), "--readme", str(readme), "--check"]) == 1
    assert tables.main(["--results", str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    # the block opens the section; the toy table stays below it
    section = text.split("## The papers in miniature", 1)[1]
    assert section.lstrip("\n").startswith(tables.BEGIN)
    assert section.index(tables.END) < section.index("The toy study's prose and table.")
    block = section.split(tables.BEGIN, 1)[1].split(tables.END, 1)[0]
    res = json.loads(results.read_text())
    for key in ("a", "b", "c", "d", "e"):
        assert f"| ({key}) " in block
    c_ppl = res["arms"]["c"]["seeds"]["0"]["test_ppl"]
    assert f"{c_ppl:,.2f}" in block
    assert "Budget:" in block and "Licences:" in block and "(f) Perplexity right after width pruning" in block
    # idempotent, and --check agrees
    assert tables.main(["--results", str(results), "--readme", str(readme), "--check"]) == 0
    assert tables.main(["--results", str(results), "--readme", str(readme)]) == 0
    assert readme.read_text() == text
    # a partial record (seed 1 planned, not run) is labelled as such
    res["config"]["seeds"] = [0, 1]
    body = tables.render(res)
    assert "*Partial run*" in body
    # the marker never collides with benchmarks.report's generated blocks
    assert "generated:" not in tables.BEGIN + tables.END
