"""save_model / load_model: plain HF checkpoints that reload without minitron; refusals."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from minitron.io.checkpoint import OutputExistsError, load_model, save_model
from minitron.compress.prune import prune_depth, prune_width
from tests.driver.conftest import BACKEND, FAMILIES, make_model, random_scores


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, 96)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def pruned(family, tie=False):
    model = make_model(family, tie=tie)
    s = random_scores(model)
    prune_width(model, s, hidden_size=24, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
                backend=BACKEND)
    prune_depth(model, num_hidden_layers=3, scores=s, metric="block_influence")
    return model


RELOAD = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    dirs = json.loads(sys.argv[1])
    ids = torch.load(sys.argv[2])
    out = {}
    for name, d in dirs.items():
        m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        with torch.no_grad():
            out[name] = m(input_ids=ids).logits
        out[name + ":tied"] = m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
        out[name + ":layers"] = m.config.num_hidden_layers
    assert "minitron" not in sys.modules
    torch.save(out, sys.argv[3])
""")


def test_pruned_checkpoints_reload_without_minitron(tmp_path):
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    dirs, want = {}, {}
    cases = [(f, False) for f in FAMILIES] + [("qwen2", True)]
    for fam, tie in cases:
        name = fam + ("-tied" if tie else "")
        model = pruned(fam, tie)
        with torch.no_grad():
            want[name] = model(input_ids=ids).logits
        dirs[name] = str(tmp_path / name)
        save_model(model, dirs[name], tokenizer=tiny_tokenizer() if fam == "llama" else None)
        cfg = json.loads((tmp_path / name / "config.json").read_text())
        assert cfg["hidden_size"] == 24 and cfg["num_hidden_layers"] == 3
        assert cfg["head_dim"] == (12 if fam in ("qwen3", "gemma3_text") else 8)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MINITRON_EXT")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-c", RELOAD, json.dumps(dirs), str(tmp_path / "ids.pt"),
                           str(tmp_path / "out.pt")], cwd=str(tmp_path), env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    for name in dirs:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5)
        assert got[name + ":layers"] == 3
    assert got["qwen2-tied:tied"] and not got["qwen2:tied"]


def test_load_model_roundtrip(tmp_path):
    model = pruned("phi3")
    save_model(model, tmp_path / "a", tokenizer=tiny_tokenizer())
    m2, tok = load_model(tmp_path / "a")
    assert tok is not None and tok.convert_tokens_to_ids("w5") == 5
    ids = torch.randint(3, 96, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(m2(input_ids=ids).logits, model(input_ids=ids).logits)
    assert not m2.training
    save_model(model, tmp_path / "b")
    m3, tok3 = load_model(str(tmp_path / "b"), dtype="bfloat16")
    assert tok3 is None and m3.model.embed_tokens.weight.dtype == torch.bfloat16


def test_existing_output_refused(tmp_path):
    model = make_model("mistral")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(OutputExistsError, match="overwrite"):
        save_model(model, out)
    with pytest.raises(ValueError):  # OutputExistsError is also a ValueError
        save_model(model, out)
    assert os.listdir(out) == ["keep.txt"]
    save_model(model, out, overwrite=True)
    assert (out / "config.json").is_file() and not (out / "keep.txt").exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        save_model(model, tmp_path / "file", overwrite=True)


def test_input_path_protected(tmp_path):
    model = make_model("qwen3")
    inp = tmp_path / "in"
    save_model(model, inp)
    before = sorted(os.listdir(inp))
    with pytest.raises(ValueError, match="input"):
        save_model(model, inp, overwrite=True, input_path=inp)
    with pytest.raises(ValueError, match="input"):
        save_model(model, str(inp) + "/", overwrite=True, input_path=str(inp))
    with pytest.raises(ValueError, match="input"):
        save_model(model, inp / "sub", input_path=inp)
    with pytest.raises(ValueError, match="contains the input"):
        save_model(model, tmp_path, overwrite=True, input_path=inp)
    assert sorted(os.listdir(inp)) == before


def test_failed_save_leaves_nothing_behind(tmp_path):
    class BadTokenizer:
        def save_pretrained(self, path):
            raise RuntimeError("disk full")

    model = make_model("llama")
    out = tmp_path / "out"
    save_model(model, out)
    first = (out / "model.safetensors").read_bytes()
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(make_model("llama", seed=1), out, tokenizer=BadTokenizer(), overwrite=True)
    assert (out / "model.safetensors").read_bytes() == first
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_bad_arguments(tmp_path):
    model = make_model("llama")
    with pytest.raises(TypeError):
        save_model(object(), tmp_path / "x")
    with pytest.raises(TypeError):
        save_model(model, tmp_path / "x", tokenizer=object())
    with pytest.raises(TypeError):
        save_model(model, None)
    assert not (tmp_path / "x").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        load_model(tmp_path / "empty")
    with pytest.raises(ValueError, match="dtype"):
        load_model(tmp_path / "empty", dtype="float77")


def test_load_refuses_unsupported_family(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32)).save_pretrained(tmp_path / "g")
    with pytest.raises(ValueError, match="supported model types"):
        load_model(tmp_path / "g")
