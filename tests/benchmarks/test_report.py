"""The generated performance tables (benchmarks/report.py): rules, and the committed README/docs being current."""
from __future__ import annotations

import subprocess

import pytest

from benchmarks import report as rp

CLEAN = "a" * 40
OTHER = "b" * 40


def _res(run, provider, ms, peak, *, case="c1", commit=CLEAN, status="ok"):
    return {"kind": "result", "run_id": run, "case": case, "provider": provider, "median_ms": ms, "peak_bytes": peak,
            "status": status, "git_commit": commit, "device": "CPU X", "threads": 2, "timestamp": "2026-12-01T00:00:00",
            "versions": {"torch": "2.13.0"}}


def _machine(run, commit=CLEAN):
    return {"kind": "machine", "run_id": run, "git_commit": commit, "limits": {"copy_gbps": 30.0}}


SPEC = rp.TableSpec("t", "x.jsonl", ["minitron-cpp", "torch-eager", "torch-compile"], [rp.Row("row one", "c1")])


def _never_changed(commit, paths):
    return False


def test_bold_marks_the_best_entry_whoever_it_is():
    recs = [_machine("r1"), _res("r1", "minitron-cpp", 30.4, 3038 * 2**20), _res("r1", "torch-eager", 31.3, 7014 * 2**20),
            _res("r1", "torch-compile", 29.1, 2036 * 2**20)]
    out = rp.render_table(SPEC, recs, _never_changed)
    row = next(line for line in out.splitlines() if line.startswith("| row one"))
    assert "**29.1 ms**, **2,036 MiB**" in row  # torch.compile is faster and smaller: it is bold, ours is not
    assert "| 30.4 ms, 3,038 MiB |" in row
    assert f"`{CLEAN[:7]}`" in row and CLEAN in out  # the row names its commit, the footer the full hash


def test_row_cells_come_from_one_run_and_clean_runs_win():
    recs = [_res("r1", "minitron-cpp", 10.0, 0), _res("r1", "torch-eager", 100.0, 0),
            _res("r2", "minitron-cpp", 5.0, 0, commit=OTHER + "-dirty"), _res("r2", "torch-eager", 1.0, 0,
                                                                                commit=OTHER + "-dirty")]
    out = rp.render_table(SPEC, recs, _never_changed)
    row = next(line for line in out.splitlines() if line.startswith("| row one"))
    assert "**10.0 ms**" in row and "100 ms" in row and "5.00" not in row  # r1 (clean) over the later dirty r2
    assert "†" not in out
    # only a dirty run: used, but marked as not traceable
    out = rp.render_table(SPEC, recs[2:], _never_changed)
    assert "†" in out and "not traceable" in out and "**1.00 ms**" in out


def test_missing_record_and_stale_code_are_said():
    out = rp.render_table(SPEC, [], _never_changed)
    assert "no record" in out
    recs = [_res("r1", "minitron-cpp", 10.0, 0), _res("r1", "torch-eager", 100.0, 0)]
    out = rp.render_table(SPEC, recs, lambda commit, paths: True)
    assert "has changed since this commit" in out
    out = rp.render_table(SPEC, [_res("r1", "minitron-cpp", 10.0, 0, commit=None)], _never_changed)
    assert "No commit recorded" in out and "†" in out


def test_render_blocks_only_touches_marked_text():
    text = "intro 1.0 ms\n<!-- generated:t begin -->\nold\n<!-- generated:t end -->\noutro\n"
    new = rp.render_blocks(text, lambda name: f"NEW {name}\n")
    assert new == "intro 1.0 ms\n<!-- generated:t begin -->\nNEW t\n<!-- generated:t end -->\noutro\n"
    with pytest.raises(KeyError, match="unknown generated block"):
        rp.render_blocks("<!-- generated:nope begin -->\n<!-- generated:nope end -->", rp.default_render())


def test_code_changed_since_uses_git_history():
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=rp.REPO_ROOT, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    assert rp.code_changed_since(head.stdout.strip(), rp.CPU_CODE) is False
    assert rp.code_changed_since("0" * 40, rp.CPU_CODE) is None


def test_committed_readme_and_docs_match_the_generator():
    shallow = subprocess.run(["git", "rev-parse", "--is-shallow-repository"], cwd=rp.REPO_ROOT, capture_output=True,
                             text=True)
    if shallow.returncode != 0 or shallow.stdout.strip() == "true":
        pytest.skip("needs a git checkout with history (the tables say whether the code changed since a run)")
    for path in rp.DOCS:
        assert "<!-- generated:" in path.read_text(), f"{path} has no generated tables"
    diffs = rp.check()
    assert not diffs, "README/docs tables differ from the records; run `python -m benchmarks.report`:\n" + \
        "\n".join(diffs)[:6000]
