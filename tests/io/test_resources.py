"""The shipped text data is package data: found via importlib.resources, inside the wheel, and from a checkout."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FILES = {  # sha256 from minitron/resources/data/README.md
    "wikitext-2/valid.txt": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
    "wikitext-2/test.txt": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
    "tinyshakespeare/input.txt": "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
}


def test_resource_lookup_finds_every_file_with_its_checksum():
    from minitron.resources import data_dir, data_file

    assert data_dir().is_dir()
    for rel, sha in FILES.items():
        p = data_file(*rel.split("/"))
        assert hashlib.sha256(p.read_bytes()).hexdigest() == sha
    with pytest.raises(FileNotFoundError, match="missing"):
        data_file("nope.txt")


def test_checkout_path_data_still_works():
    # the README's commands use data/wikitext-2/valid.txt from the repository root
    for rel in FILES:
        assert (ROOT / "data" / rel).is_file()
    assert (ROOT / "data").resolve() == (ROOT / "minitron" / "resources" / "data").resolve()


def test_demo_defaults_to_the_shipped_data():
    from minitron.demo import default_data_dir
    from minitron.resources import data_dir

    assert default_data_dir() == data_dir()


def test_wheel_ships_the_data_and_finds_it_when_installed(tmp_path):
    env = dict(os.environ, MINITRON_NO_EXT="1")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "whl"), str(ROOT)], check=True, env=env, cwd=tmp_path, timeout=300)
    (wheel,) = (tmp_path / "whl").glob("minitron-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for rel in FILES:
            assert f"minitron/resources/data/{rel}" in names
        assert "minitron/resources/data/README.md" in names
        site = tmp_path / "site"
        z.extractall(site)
    # an "installed" copy, away from the checkout: the lookup resolves inside it
    code = ("import minitron.resources as r, minitron.demo as d; "
            "print(r.data_file('wikitext-2', 'valid.txt')); print(d.default_data_dir())")
    out = subprocess.run([sys.executable, "-c", code], env=dict(env, PYTHONPATH=str(site)), cwd=tmp_path,
                         capture_output=True, text=True, timeout=300, check=True).stdout.split()
    assert all(Path(line).resolve().is_relative_to(site.resolve()) for line in out), out
