"""The teacher top-k logit store: encodings, round trip, resume after a crash or a kill, refusals."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from minitron.io.data import PackedDataset
from minitron.io.logit_store import (MANIFEST_NAME, VALUE_ENCODINGS, StoreError, TeacherLogitStore, bytes_per_token,
                                     decode_values, encode_values, index_bits, pack_bits, topk_logprobs, unpack_bits)
from minitron.train.teacher_logits import write_teacher_logits
from minitron.io.safety import OutputExistsError
from tests.driver.conftest import make_model

ROOT = Path(__file__).resolve().parents[2]
V = 96  # the tiny models' vocabulary -> 7-bit indices


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def teacher():
    return make_model("llama", seed=1)


def make_data(n: int = 7, s: int = 12, seed: int = 0, pad_last: bool = True) -> PackedDataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (n, s), generator=g)
    mask = torch.ones(n, s, dtype=torch.long)
    if pad_last:
        mask[-1, s // 2:] = 0
        ids[-1, s // 2:] = 0
    return PackedDataset(ids, mask, "random tokens")


def exact_topk(teacher, data: PackedDataset, k: int, temperature: float = 1.0):
    """The exact (fp32, dense) top-k of the teacher on every sequence: ([N, S, k] int64, [N, S, k] fp32)."""
    with torch.no_grad():
        logits = teacher(input_ids=data.input_ids, attention_mask=data.attention_mask).logits.float()
    lp = torch.log_softmax(logits / temperature, -1)
    vals, idx = lp.topk(k, dim=-1)
    return idx, vals


# ---------------------------------------------------------------------------------------------- encodings


@pytest.mark.parametrize("bits", [1, 2, 7, 8, 13, 17, 31, 32])
def test_pack_bits_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randint(0, 2**bits, (5, 11), generator=g, dtype=torch.int64)
    x[0, 0], x[-1, -1] = 0, 2**bits - 1
    p = pack_bits(x, bits)
    assert p.dtype == torch.uint8 and p.shape == (5, -(-11 * bits // 8))
    assert torch.equal(unpack_bits(p, bits, 11), x)


def test_index_bits_and_sizes():
    assert index_bits(128256) == 17 and index_bits(131072) == 17 and index_bits(131073) == 18
    assert index_bits(96) == 7 and index_bits(2) == 1 and index_bits(1) == 1
    # k=128, V=128256: 272 bytes of indices + 128 (u8) + 8 per-token scalars
    assert bytes_per_token(128, 128256, "u8") == 272 + 128 + 8
    assert bytes_per_token(64, 128256, "fp16") == 136 + 128
    with pytest.raises(ValueError, match="value_encoding"):
        bytes_per_token(64, 100, "int4")


@pytest.mark.parametrize("encoding", sorted(VALUE_ENCODINGS))
def test_encodings_bounded_error_and_mass(encoding):
    g = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(torch.randn(200, 500, generator=g) * 4, -1).topk(33).values
    lp[0, -3:] = float("-inf")  # entries of zero probability survive every encoding
    dec = decode_values(encode_values(lp, encoding), encoding)
    assert dec.dtype == torch.float32 and dec.shape == lp.shape
    assert torch.isneginf(dec[0, -3:]).all()
    fin = torch.isfinite(lp)
    err = (dec - lp)[fin].abs().max().item()
    bound = {"fp32": 0.0, "fp16": 2e-3 * 20, "bf16": 8e-3 * 20, "u8": None}[encoding]
    if encoding == "u8":
        span = (lp[:, 0] - torch.where(fin, lp, lp[:, :1]).amin(-1)).max().item()
        bound = span / 254 / 2 + 1e-3 + 0.05  # half a step + the renormalisation shift (tiny here)
    assert err <= bound + 1e-7
    assert (torch.logsumexp(dec, -1) <= 1e-6).all()  # decoded mass never exceeds 1
    assert (dec <= 0).all()
    # the order (decreasing probability) is preserved
    assert (dec[:, :-1] >= dec[:, 1:]).all()


def test_u8_decoding_renormalises_excess_mass():
    lp = torch.log(torch.tensor([[0.5, 0.4999, 0.0001]]))
    enc = encode_values(lp, "u8")
    enc["values"][0, 1] = 0  # force rounding up: 0.5 + 0.5 + 0.0001 > 1
    dec = decode_values(enc, "u8")
    assert abs(torch.logsumexp(dec, -1).item()) < 1e-6


def test_topk_logprobs_chunked_matches_dense():
    g = torch.Generator().manual_seed(0)
    h, w, b = torch.randn(37, 16, generator=g), torch.randn(101, 16, generator=g), torch.randn(101, generator=g)
    for t in (1.0, 2.0):
        idx, lp = topk_logprobs(h, w, b, 9, t, chunk_tokens=5)
        ref = torch.log_softmax((h @ w.T + b) / t, -1).topk(9)
        assert torch.equal(idx, ref.indices)
        torch.testing.assert_close(lp, ref.values, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("encoding,k,temperature", [("fp32", 7, 1.0), ("u8", 16, 2.0), ("fp16", 1, 1.0),
                                                    ("bf16", 96, 1.0)])
def test_round_trip(tmp_path, teacher, encoding, k, temperature):
    data = make_data()
    out = write_teacher_logits(teacher, data, tmp_path / "store", top_k=k, temperature=temperature,
                               value_encoding=encoding, batch_size=2, shard_sequences=3, progress=False)
    store = TeacherLogitStore(out, verify_hashes=True)
    m = store.manifest
    assert m["complete"] and m["num_shards"] == 3 and [e["stop"] for e in m["shards"]] == [3, 6, 7]
    assert (m["k"], m["vocab_size"], m["index_bits"], m["value_encoding"]) == (k, V, 7, encoding)
    assert m["temperature"] == temperature and m["data"]["seq_len"] == 12 and len(store) == 7
    assert len(m["data"]["input_ids_sha256"]) == 64 and len(m["teacher"]["config_sha256"]) == 64
    idx, lp = store.get(torch.arange(7))
    ref_idx, ref_lp = exact_topk(teacher, data, k, temperature)
    assert idx.dtype == torch.int64 and lp.dtype == torch.float32 and idx.shape == (7, 12, k)
    tol = {"fp32": 1e-5, "fp16": 5e-3, "bf16": 5e-2, "u8": 0.05}[encoding]
    # indices equal wherever the teacher has no near-tie at the k-th place (tiny random model: check most)
    assert (idx == ref_idx).float().mean() > 0.98
    same = (idx == ref_idx).all(-1)
    assert (lp - ref_lp)[same].abs().max() <= tol
    # any order, repeats, a single int
    sel = [6, 0, 4, 4, 1]
    i2, l2 = store.get(sel)
    assert torch.equal(i2, idx[sel]) and torch.equal(l2, lp[sel])
    i3, _ = store.get(5)
    assert torch.equal(i3[0], idx[5])
    with pytest.raises(IndexError, match="out of range"):
        store.get([7])
    # the files are ordinary files; no temporaries left behind
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_dataset_feeds_a_dataloader(tmp_path, teacher):
    data = make_data()
    store = TeacherLogitStore(write_teacher_logits(teacher, data, tmp_path / "s", top_k=5, batch_size=4,
                                                   shard_sequences=2, progress=False))
    ds = store.dataset(data)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, shuffle=False)
    batches = list(loader)
    assert [b["input_ids"].shape[0] for b in batches] == [3, 3, 1]
    b = batches[1]
    assert torch.equal(b["input_ids"], data.input_ids[3:6]) and torch.equal(b["sequence_index"], torch.arange(3, 6))
    i, l = store.get([3, 4, 5])
    assert torch.equal(b["teacher_indices"], i) and torch.equal(b["teacher_logprobs"], l)
    # worker processes reopen the shards
    loader2 = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1)
    got = torch.cat([x["teacher_indices"] for x in loader2])
    assert torch.equal(got, store.get(range(7))[0])


def test_streaming_memory_is_bounded_by_a_chunk(monkeypatch):
    """The extraction never forms more logits than its chunk (small budget forces many chunks)."""
    import minitron.io.logit_store as ls

    monkeypatch.setattr(ls, "_LOGIT_BUDGET", 96 * 4)
    shapes = []
    real = torch.nn.functional.linear

    def spy(x, w, b=None):
        shapes.append(x.shape[0])
        return real(x, w, b)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    g = torch.Generator().manual_seed(0)
    idx, lp = ls.topk_logprobs(torch.randn(30, 8, generator=g), torch.randn(96, 8, generator=g), None, 3)
    assert max(shapes) == 4 and idx.shape == (30, 3)


# ---------------------------------------------------------------------------------------------- resume


def _files(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name.startswith("shard-")}


def test_resume_after_simulated_crash(tmp_path, teacher):
    data = make_data(n=9)
    ref = write_teacher_logits(teacher, data, tmp_path / "ref", top_k=6, batch_size=2, shard_sequences=2,
                               progress=False)
    out = tmp_path / "store"

    def crash(i, entry):
        if i == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_teacher_logits(teacher, data, out, top_k=6, batch_size=2, shard_sequences=2, progress=False,
                             on_shard=crash)
    m = json.loads((out / MANIFEST_NAME).read_text())
    assert not m["complete"] and len(m["shards"]) == 2
    with pytest.raises(StoreError, match="incomplete"):
        TeacherLogitStore(out)
    # a half-written shard (temporary) and a shard file the manifest does not list (killed before the manifest)
    (out / ".shard-00002.safetensors.tmp-abc.tmp").write_bytes(b"partial")
    (out / "shard-00002.safetensors").write_bytes(b"garbage")
    with pytest.raises(OutputExistsError, match="resume"):
        write_teacher_logits(teacher, data, out, top_k=6, batch_size=2, shard_sequences=2, progress=False)
    written = []
    write_teacher_logits(teacher, data, out, top_k=6, batch_size=2, shard_sequences=2, progress=False, resume=True,
                         on_shard=lambda i, e: written.append(i))
    assert written == [2, 3, 4]  # continued after the last complete shard
    assert _files(out) == _files(ref)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    TeacherLogitStore(out, verify_hashes=True)
    # resuming a complete store is a no-op; other settings are refused, naming them
    write_teacher_logits(teacher, data, out, top_k=6, batch_size=2, shard_sequences=2, progress=False, resume=True,
                         on_shard=lambda i, e: pytest.fail("rewrote a shard"))
    with pytest.raises(StoreError, match="k: 6"):
        write_teacher_logits(teacher, data, out, top_k=5, batch_size=2, shard_sequences=2, progress=False,
                             resume=True)
    with pytest.raises(StoreError, match="input_ids_sha256"):
        write_teacher_logits(teacher, make_data(n=9, seed=5), out, top_k=6, batch_size=2, shard_sequences=2,
                             progress=False, resume=True)


def test_resume_rewrites_a_damaged_committed_shard(tmp_path, teacher):
    data = make_data(n=6)
    out = tmp_path / "store"

    def crash(i, entry):
        if i == 1:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_teacher_logits(teacher, data, out, top_k=4, shard_sequences=2, progress=False, on_shard=crash)
    f = out / "shard-00001.safetensors"
    f.write_bytes(f.read_bytes()[:-10])  # truncated after commit
    written = []
    write_teacher_logits(teacher, data, out, top_k=4, shard_sequences=2, progress=False, resume=True,
                         on_shard=lambda i, e: written.append(i))
    assert written == [1, 2]
    TeacherLogitStore(out, verify_hashes=True)


_KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys, torch
    sys.path.insert(0, {root!r})
    torch.set_num_threads(1)
    from tests.io.test_logit_store import make_data
    from tests.driver.conftest import make_model
    from minitron.train.teacher_logits import write_teacher_logits

    def kill(i, entry):
        if i == 1:
            os.kill(os.getpid(), signal.SIGKILL)

    write_teacher_logits(make_model("llama", seed=1), make_data(n=9), sys.argv[1], top_k=6, batch_size=2,
                         shard_sequences=2, progress=False, on_shard=kill)
""")


def test_resume_after_a_real_kill(tmp_path, teacher):
    script = tmp_path / "run.py"
    script.write_text(_KILL_SCRIPT.format(root=str(ROOT)))
    out = tmp_path / "store"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script), str(out)], cwd=ROOT, env=env, capture_output=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert len(json.loads((out / MANIFEST_NAME).read_text())["shards"]) == 2
    data = make_data(n=9)
    write_teacher_logits(teacher, data, out, top_k=6, batch_size=2, shard_sequences=2, progress=False, resume=True)
    ref = write_teacher_logits(teacher, data, tmp_path / "ref", top_k=6, batch_size=2, shard_sequences=2,
                               progress=False)
    assert _files(out) == _files(ref)


# ---------------------------------------------------------------------------------------------- refusals


def test_output_safety(tmp_path, teacher):
    data = make_data(n=3)
    tdir = tmp_path / "teacher"
    tdir.mkdir()
    (tdir / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="inside the input teacher"):
        write_teacher_logits(teacher, data, tdir / "store", top_k=2, teacher_path=tdir, progress=False)
    with pytest.raises(ValueError, match="is the input data"):
        write_teacher_logits(teacher, data, tdir, top_k=2, data_path=tdir, progress=False)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "precious.txt").write_text("keep")
    with pytest.raises(OutputExistsError, match="overwrite"):
        write_teacher_logits(teacher, data, mine, top_k=2, progress=False)
    assert (mine / "precious.txt").read_text() == "keep"
    # overwrite replaces only once the new store is complete: a failure leaves the old contents
    with pytest.raises(RuntimeError):
        write_teacher_logits(teacher, data, mine, top_k=2, shard_sequences=1, overwrite=True, progress=False,
                             on_shard=lambda i, e: (_ for _ in ()).throw(RuntimeError("fail")))
    assert (mine / "precious.txt").read_text() == "keep"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # resume never writes into a directory that is not a store
    with pytest.raises(StoreError, match="not a teacher-logit store"):
        write_teacher_logits(teacher, data, mine, top_k=2, resume=True, progress=False)
    (mine / MANIFEST_NAME).write_text('{"format": "something else"}')
    with pytest.raises(StoreError, match="not a teacher-logit store manifest"):
        write_teacher_logits(teacher, data, mine, top_k=2, resume=True, progress=False)
    assert sorted(p.name for p in mine.iterdir()) == [MANIFEST_NAME, "precious.txt"]
    write_teacher_logits(teacher, data, mine, top_k=2, overwrite=True, progress=False)
    assert not (mine / "precious.txt").exists() and TeacherLogitStore(mine).k == 2


def test_bad_arguments(tmp_path, teacher):
    data = make_data(n=3)
    out = tmp_path / "s"
    with pytest.raises(ValueError, match="top_k=97 is larger than the teacher's vocabulary"):
        write_teacher_logits(teacher, data, out, top_k=97, progress=False)
    with pytest.raises(ValueError, match="top_k"):
        write_teacher_logits(teacher, data, out, top_k=0, progress=False)
    with pytest.raises(ValueError, match="temperature"):
        write_teacher_logits(teacher, data, out, top_k=2, temperature=0.0, progress=False)
    with pytest.raises(ValueError, match="value_encoding"):
        write_teacher_logits(teacher, data, out, top_k=2, value_encoding="int4", progress=False)
    with pytest.raises(TypeError, match="data must be a PackedDataset"):
        write_teacher_logits(teacher, [[1, 2]], out, top_k=2, progress=False)
    with pytest.raises(TypeError, match="teacher"):
        write_teacher_logits("gpt2", data, out, top_k=2, progress=False)
    assert not out.exists()


@pytest.fixture
def store_dir(tmp_path, teacher):
    return write_teacher_logits(teacher, make_data(), tmp_path / "store", top_k=4, shard_sequences=3, progress=False)


def test_open_refuses_damaged_stores(tmp_path, store_dir):
    with pytest.raises(StoreError, match="does not exist"):
        TeacherLogitStore(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(StoreError, match="manifest.json.*missing"):
        TeacherLogitStore(empty)
    shard = store_dir / "shard-00001.safetensors"
    blob = shard.read_bytes()
    shard.write_bytes(blob[:-7])
    with pytest.raises(StoreError, match=r"shard-00001\.safetensors.*truncated"):
        TeacherLogitStore(store_dir)
    flipped = bytearray(blob)
    flipped[-1] ^= 0xFF
    shard.write_bytes(bytes(flipped))
    TeacherLogitStore(store_dir)  # same size: only the hash check sees it
    with pytest.raises(StoreError, match=r"shard-00001\.safetensors.*sha256"):
        TeacherLogitStore(store_dir, verify_hashes=True)
    shard.unlink()
    with pytest.raises(StoreError, match=r"shard-00001\.safetensors.*missing"):
        TeacherLogitStore(store_dir)
    shard.write_bytes(blob)
    m = store_dir / MANIFEST_NAME
    text = m.read_text()
    m.write_text(text[: len(text) // 2])
    with pytest.raises(StoreError, match="corrupt or truncated"):
        TeacherLogitStore(store_dir)
    d = json.loads(text)
    d["format_version"] = 99
    m.write_text(json.dumps(d))
    with pytest.raises(StoreError, match="format version 99"):
        TeacherLogitStore(store_dir)


def test_check_compatible_names_the_mismatch(store_dir, teacher):
    store = TeacherLogitStore(store_dir)
    data = make_data()
    store.check_compatible(data, vocab_size=V)
    with pytest.raises(StoreError, match="vocabulary size 96, the student has 128"):
        store.check_compatible(data, vocab_size=128)
    with pytest.raises(StoreError, match="seq_len 12, the data has seq_len 10"):
        store.check_compatible(make_data(s=10))
    with pytest.raises(StoreError, match="holds 7 sequences, the data has 6"):
        store.check_compatible(make_data(n=6))
    with pytest.raises(StoreError, match="token ids hash differs"):
        store.check_compatible(make_data(seed=3))
    mask_changed = make_data(pad_last=False)
    mask_changed.input_ids[-1] = data.input_ids[-1]
    with pytest.raises(StoreError, match="attention mask hash differs"):
        store.check_compatible(mask_changed)
    store.manifest["tokenizer"]["sha256"] = "a" * 64
    with pytest.raises(StoreError, match="another tokenizer"):
        store.check_compatible(data, tokenizer_hash="b" * 64)
    store.check_compatible(data, tokenizer_hash="a" * 64)


def test_tokenizer_hash_recorded(tmp_path, teacher):
    from minitron.io.logit_store import tokenizer_hash

    tdir = tmp_path / "teacher"
    tdir.mkdir()
    (tdir / "tokenizer.json").write_text('{"a": 1}')
    (tdir / "tokenizer_config.json").write_text("{}")
    h = tokenizer_hash(tdir)
    assert h is not None and tokenizer_hash(tmp_path / "none") is None
    out = write_teacher_logits(teacher, make_data(n=2), tmp_path / "s", top_k=2, teacher_path=tdir, progress=False)
    assert TeacherLogitStore(out).tokenizer_hash == h
    (tdir / "tokenizer.json").write_text('{"a": 2}')
    assert tokenizer_hash(tdir) != h


# ---------------------------------------------------------------------------------------------- properties

from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 32), n=st.integers(1, 4), m=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_pack_bits_property(bits, n, m, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, m, generator=g, dtype=torch.float64) * (2**bits)).long().clamp_max(2**bits - 1)
    assert torch.equal(unpack_bits(pack_bits(x, bits), bits, m), x)


@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 50), scale=st.floats(0.01, 20.0), seed=st.integers(0, 2**16),
       encoding=st.sampled_from(sorted(VALUE_ENCODINGS)))
def test_decoded_values_are_valid_teacher_logprobs(k, scale, seed, encoding):
    """Whatever the distribution, decoded entries are sorted, <= 0, of mass <= 1, accepted by the sparse KL op."""
    from minitron.ops import topk_kl_div

    g = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(torch.randn(6, 64, generator=g, dtype=torch.float64) * scale, -1).topk(k)
    dec = decode_values(encode_values(lp.values.float(), encoding), encoding)
    assert (dec <= 0).all() and (torch.logsumexp(dec, -1) <= 1e-6).all()
    assert (dec[:, :-1] >= dec[:, 1:]).all()
    loss = topk_kl_div(torch.randn(6, 64, generator=g), lp.indices, dec, backend="reference")
    assert torch.isfinite(loss) and loss >= -1e-6


def test_bf16_teacher(tmp_path):
    teacher = make_model("llama", seed=1).to(torch.bfloat16)
    data = make_data(n=3)
    store = TeacherLogitStore(write_teacher_logits(teacher, data, tmp_path / "s", top_k=8, progress=False))
    idx, lp = store.get(range(3))
    with torch.no_grad():
        logits = teacher(input_ids=data.input_ids, attention_mask=data.attention_mask).logits.float()
    ref = torch.log_softmax(logits, -1).topk(8)
    assert (idx == ref.indices).float().mean() > 0.95
    assert next(teacher.parameters()).dtype == torch.bfloat16  # the teacher is left as it was
