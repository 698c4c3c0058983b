"""Validate .github/workflows/ci.yml: YAML syntax, required keys and jobs, and that every `run:` step only uses
Makefile targets, Python modules and repository files that exist (and is valid bash)."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"
MAKEFILE = ROOT / "Makefile"
EXTERNAL_MODULES = {"pip", "pytest", "venv", "torch"}


def load_workflow(path: Path = WORKFLOW) -> dict:
    with open(path) as f:
        wf = yaml.safe_load(f)
    assert isinstance(wf, dict), f"{path} is not a YAML mapping"
    if True in wf and "on" not in wf:  # YAML 1.1 reads a bare `on:` key as the boolean True
        wf["on"] = wf.pop(True)
    return wf


def make_targets(path: Path = MAKEFILE) -> set[str]:
    targets = set()
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-/$()]+(?:\s+[A-Za-z0-9_.\-/$()]+)*)\s*:(?!=)", line)
        if m and not line.startswith("\t"):
            targets.update(t for t in m.group(1).split() if not t.startswith("."))
    return targets


def _module_exists(module: str) -> bool:
    if module.split(".")[0] in EXTERNAL_MODULES:
        return True
    rel = Path(*module.split("."))
    return (ROOT / rel.with_suffix(".py")).exists() or (ROOT / rel / "__main__.py").exists()


def _strip_expressions(script: str) -> str:
    return re.sub(r"\$\{\{.*?\}\}", "EXPR", script)


def run_step_problems(script: str, targets: set[str]) -> list[str]:
    """Why a `run:` script references something missing (empty list when all is fine)."""
    problems = []
    script = _strip_expressions(script)
    for raw_line in script.splitlines():
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        for command in re.split(r"&&|\|\||;|\|", line):
            try:
                words = shlex.split(command)
            except ValueError:
                words = command.split()
            if not words:
                continue
            while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):  # VAR=value prefixes
                words = words[1:]
            if not words:
                continue
            if words[0] == "make":
                for w in words[1:]:
                    if w.startswith("-") or "=" in w:
                        continue
                    if w not in targets:
                        problems.append(f"`make {w}`: no such Makefile target")
            for i, w in enumerate(words[:-1]):
                if w == "-m" and re.search(r"python[0-9.]*$", words[i - 1] if i else ""):
                    if not _module_exists(words[i + 1]):
                        problems.append(f"`python -m {words[i + 1]}`: no such module in the repository")
            for w in words:
                w = w.strip("\"'")
                if "$" in w or "://" in w or w.startswith("-") or "/" not in w or w.startswith(".venv/"):
                    continue
                if "=" in w:
                    continue
                if not (ROOT / w).exists():
                    problems.append(f"{w}: no such file in the repository")
    return problems


@pytest.fixture(scope="module")
def wf() -> dict:
    assert WORKFLOW.exists(), f"{WORKFLOW} is missing"
    return load_workflow()


def test_required_keys(wf):
    assert wf.get("name")
    triggers = wf["on"]
    assert "push" in triggers and "pull_request" in triggers
    assert set(wf["jobs"]) >= {"cpu", "gpu"}
    for name, job in wf["jobs"].items():
        assert "runs-on" in job, name
        assert isinstance(job.get("steps"), list) and job["steps"], name
        for step in job["steps"]:
            assert ("uses" in step) != ("run" in step), f"{name}: step must have exactly one of uses/run: {step}"
            if "uses" in step:
                assert re.match(r"^[\w.-]+/[\w.-]+@v\d+", step["uses"]), f"{name}: unpinned action {step['uses']}"


def test_gpu_job(wf):
    job = wf["jobs"]["gpu"]
    assert job["runs-on"] == ["self-hosted", "gpu"]
    assert str(job["env"]["FORCE_CUDA"]) == "1"
    assert str(job.get("env", {}).get("TRITON_INTERPRET", "0")) != "1", "GPU tests must use real Triton"
    scripts = "\n".join(s.get("run", "") for s in job["steps"])
    assert "make build" in scripts
    assert "make test" in scripts
    assert "cuda_built()" in scripts  # the build is checked to contain the CUDA kernels
    assert "python -m benchmarks" in scripts and "--compare" in scripts and "benchmarks/baselines/" in scripts


def test_cpu_job(wf):
    job = wf["jobs"]["cpu"]
    assert job["runs-on"] == "ubuntu-latest"
    runs = [s["run"] for s in job["steps"] if "run" in s]
    assert any(re.search(r"\bmake test\b", r) for r in runs)
    # the tests themselves must not be allowed to fail silently
    for step in job["steps"]:
        if "make test" in step.get("run", ""):
            assert not step.get("continue-on-error")


def test_run_steps_reference_existing_things(wf):
    targets = make_targets()
    problems = []
    for name, job in wf["jobs"].items():
        for step in job["steps"]:
            if "run" in step:
                problems += [f"{name} / {step.get('name', step['run'][:40])}: {p}"
                             for p in run_step_problems(step["run"], targets)]
    assert not problems, "\n".join(problems)


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not available")
def test_run_steps_are_valid_bash(wf):
    for name, job in wf["jobs"].items():
        for step in job["steps"]:
            if "run" in step:
                proc = subprocess.run(["bash", "-n"], input=_strip_expressions(step["run"]), text=True,
                                      capture_output=True)
                assert proc.returncode == 0, f"{name}: {proc.stderr}"


def test_checker_catches_missing_things():
    targets = make_targets()
    assert {"build", "test", "bench", "bench-check"} <= targets
    assert run_step_problems("make test JOBS=4", targets) == []
    assert run_step_problems("make no-such-target", targets) == ["`make no-such-target`: no such Makefile target"]
    assert run_step_problems(".venv/bin/python -m no_such_module.x", targets)
    assert run_step_problems(".venv/bin/python -m benchmarks --device cuda", targets) == []
    assert run_step_problems("cat benchmarks/no_such_file.jsonl", targets)
    assert run_step_problems('ls "benchmarks/baselines/${slug}.jsonl"', targets) == []


def test_workflow_yaml_errors_are_detected(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("jobs:\n  cpu:\n    steps: [\n")
    with pytest.raises(yaml.YAMLError):
        load_workflow(bad)
