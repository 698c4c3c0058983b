"""Data loading, tokenisation and packing: determinism, masking, resumable streams, and errors."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from minitron.io.data import (
    BatchStream,
    PackedDataset,
    check_seq_len,
    load_packed,
    load_texts,
    pack_tokens,
    tokenize_corpus,
)

ROOT = Path(__file__).resolve().parents[2]
VALID = ROOT / "data" / "wikitext-2" / "valid.txt"
SHAKESPEARE = ROOT / "data" / "tinyshakespeare" / "input.txt"


@pytest.fixture(scope="module")
def tok():
    from minitron.io.tokenizer import train_bpe_tokenizer

    text = SHAKESPEARE.read_text(encoding="utf-8")[:200_000]
    return train_bpe_tokenizer(texts=[text], vocab_size=300)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; tiny models run fastest single-threaded
    yield
    torch.set_num_threads(n)


def test_shipped_data_is_intact():
    import hashlib

    readme = (ROOT / "data" / "README.md").read_text()
    for rel in ("wikitext-2/valid.txt", "wikitext-2/test.txt", "tinyshakespeare/input.txt"):
        digest = hashlib.sha256((ROOT / "data" / rel).read_bytes()).hexdigest()
        assert f"{rel} {digest}" in readme
    assert "CC BY-SA 3.0" in readme and "public domain" in readme


def test_tokenizer_roundtrip_and_save(tok, tmp_path):
    from minitron.io.tokenizer import load_tokenizer

    s = "First Citizen:\nBefore we proceed any further, hear me speak.\n  ünïcödé ☃"
    ids = tok(s, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == s
    assert len(tok) == 300 and tok.eos_token_id == 0 and tok.pad_token_id == 1
    tok.save_pretrained(str(tmp_path / "t"))
    again = load_tokenizer(tmp_path / "t")
    assert again(s, add_special_tokens=False)["input_ids"] == ids
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_tokenizer(tmp_path / "empty")


def test_tokenizer_training_is_deterministic():
    from minitron.io.tokenizer import train_bpe_tokenizer

    text = [SHAKESPEARE.read_text(encoding="utf-8")[:50_000]]
    a = train_bpe_tokenizer(texts=text, vocab_size=280)
    b = train_bpe_tokenizer(texts=text, vocab_size=280)
    assert a.get_vocab() == b.get_vocab()
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(texts=text, vocab_size=100)
    with pytest.raises(ValueError, match="exactly one"):
        train_bpe_tokenizer()


def test_plain_text_is_one_stream(tok, tmp_path):
    """Lines of a .txt file are concatenated as-is (line breaks kept, no EOS between lines)."""
    f = tmp_path / "a.txt"
    text = "hello world\n\nsecond line here\nthird\n"
    f.write_text(text)
    corpus = load_texts(f)
    assert corpus.is_lines and "".join(corpus.texts) == text
    ids = tokenize_corpus(corpus, tok)
    assert tok.decode(ids.tolist()) == text
    assert tok.eos_token_id not in ids.tolist()


def test_records_get_eos(tok, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"content": t, "n": i}) for i, t in enumerate(["one doc", "two doc"])) + "\n")
    ids = tokenize_corpus(load_texts(f, text_column="content"), tok).tolist()
    assert ids.count(tok.eos_token_id) == 2 and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[: ids.index(tok.eos_token_id)]) == "one doc"


def test_parquet_and_dataset_sources(tok, tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"body": ["alpha beta", "gamma delta"], "x": [1, 2]})
    ds.to_parquet(str(tmp_path / "d.parquet"))
    a = load_texts(tmp_path / "d.parquet", text_column="body")
    b = load_texts(ds, text_column="body")
    assert a.texts == b.texts == ["alpha beta", "gamma delta"]
    assert load_texts(["x", "y"]).texts == ["x", "y"]


def test_packing_is_deterministic_and_exact(tok):
    a = load_packed(VALID, tok, seq_len=64, max_tokens=5000)
    b = load_packed(VALID, tok, seq_len=64, max_tokens=5000)
    assert torch.equal(a.input_ids, b.input_ids) and a.input_ids.shape == (5000 // 64, 64)
    assert a.attention_mask.all()
    stream_tokens = tokenize_corpus(load_texts(VALID), tok, max_tokens=5000)
    assert torch.equal(a.input_ids.reshape(-1), stream_tokens[: a.input_ids.numel()])


def test_padding_is_masked(tok):
    tokens = torch.arange(2, 2 + 150)
    p = pack_tokens(tokens, 64, pad_id=1, drop_remainder=False)
    assert p.input_ids.shape == (3, 64)
    assert p.attention_mask[:2].all()
    assert p.attention_mask[2, :22].all() and not p.attention_mask[2, 22:].any()
    assert (p.input_ids[2, 22:] == 1).all()
    assert p.num_tokens == 150
    dropped = pack_tokens(tokens, 64, drop_remainder=True)
    assert dropped.input_ids.shape == (2, 64) and dropped.num_tokens == 128
    # a single leftover token predicts nothing: no padded row for it
    assert len(pack_tokens(torch.arange(129), 64, drop_remainder=False)) == 2


def test_stream_order_is_seeded_and_resumable():
    data = PackedDataset(torch.arange(40 * 4).reshape(40, 4), torch.ones(40, 4, dtype=torch.long))
    s1 = data.stream(8, seed=3)
    first = [next(s1)["input_ids"] for _ in range(12)]  # 2.4 epochs
    again = data.stream(8, seed=3)
    assert all(torch.equal(x, next(again)["input_ids"]) for x in first)
    other = data.stream(8, seed=4)
    assert not all(torch.equal(x, next(other)["input_ids"]) for x in first)
    # each epoch visits every sequence exactly once
    epoch0 = torch.cat([b[:, 0] for b in first[:5]]) // 4
    assert sorted(epoch0.tolist()) == list(range(40))
    assert not torch.equal(torch.cat(first[:5]), torch.cat(first[5:10]))  # reshuffled per epoch
    # resume from a saved position
    state = s1.state_dict()
    s2 = data.stream(8, seed=3)
    s2.load_state_dict(state)
    s3 = data.stream(8, seed=3)
    for _ in range(12):
        next(s3)
    for _ in range(7):
        assert torch.equal(next(s2)["input_ids"], next(s3)["input_ids"])
    with pytest.raises(ValueError, match="does not match"):
        data.stream(4, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        BatchStream(data, 41)


def test_perplexity_excludes_padding(tok):
    """A right-padded sequence scores exactly like the same real tokens without padding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from minitron.eval.perplexity import perplexity

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    tokens = tokenize_corpus(load_texts(VALID), tok, max_tokens=100)
    padded = pack_tokens(tokens, 64, pad_id=1, drop_remainder=False)  # 64 real + 36 real / 28 pad
    assert padded.num_tokens == 100
    res = perplexity(model, padded, batch_size=2)
    assert res["tokens"] == 63 + 35
    with torch.no_grad():
        nll = 0.0
        for seq in (tokens[:64], tokens[64:]):
            logits = model(input_ids=seq[None]).logits[0, :-1]
            nll += float(torch.nn.functional.cross_entropy(logits, seq[1:], reduction="sum"))
    assert math.isclose(res["loss"], nll / 98, rel_tol=1e-5)
    # changing what sits in the padding changes nothing
    garbage = PackedDataset(padded.input_ids.clone(), padded.attention_mask)
    garbage.input_ids[1, 36:] = 7
    assert math.isclose(perplexity(model, garbage, batch_size=2)["loss"], res["loss"], rel_tol=1e-6)


# ---------------------------------------------------------------------------------------------- errors


def test_missing_text_column_names_available_columns(tok, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"content": "x", "meta": 1}) + "\n")
    with pytest.raises(ValueError, match=r"'text' not found.*available columns: 'content', 'meta'"):
        load_packed(f, tok, seq_len=8)
    with pytest.raises(ValueError, match="available columns: 'text'"):
        load_texts(VALID, text_column="body")
    with pytest.raises(TypeError, match="must hold strings"):
        load_texts(f, text_column="meta")


def test_seq_len_checked_against_model_positions(tok, tmp_path):
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, max_position_embeddings=32)
    with pytest.raises(ValueError, match="larger than the llama model's max_position_embeddings=32"):
        check_seq_len(64, cfg)
    assert check_seq_len(32, cfg) == 32
    missing = tmp_path / "nope.txt"
    # validated before the data is read: no error about the missing file
    with pytest.raises(ValueError, match="max_position_embeddings"):
        load_packed(missing, tok, seq_len=64, model_configs=[cfg])
    with pytest.raises(TypeError):
        check_seq_len(16.0)
    with pytest.raises(ValueError):
        check_seq_len(1)


def test_bad_sources(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_texts(tmp_path / "missing.txt")
    bad = tmp_path / "x.bin"
    bad.write_bytes(b"\0")
    with pytest.raises(ValueError, match="unsupported data file type"):
        load_texts(bad)
    empty = tmp_path / "emptydir"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no data files"):
        load_texts(empty)
    small = tmp_path / "small.txt"
    small.write_text("tiny\n")
    with pytest.raises(ValueError, match="fewer than one sequence"):
        load_packed(small, tok, seq_len=64)
    with pytest.raises(TypeError, match="unsupported data source"):
        load_texts(123)
    with pytest.raises(ValueError, match="tokenizer is needed"):
        load_packed(small, None, seq_len=8)
