"""The package's layering, checked by walking the imports of every module (ast, no import is executed), and the
size rules of the driver: short functions, few parameters on public functions (specs instead)."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, Tuple

import pytest

PKG = Path(__file__).resolve().parents[1] / "minitron"
TOP = {"api", "cli", "pipeline", "demo"}
BELOW_API = {"search", "compress", "train", "io", "eval", "models", "ops", "kernels", "runtime", "options", "specs",
             "info", "integrations", "resources", "_ext"}
#: What lies below ``search`` (it uses compress, train and eval; only api and above may use it).
BELOW_SEARCH = BELOW_API - {"search"}
DRIVER = ("api", "cli", "pipeline", "demo", "specs", "options", "search", "compress", "train", "io", "eval", "models")
PUBLIC = ("api", "search", "compress", "train", "io")
OWN_ROOM = {"io/gguf.py", "io/fetch.py"}  # written by another engineer (not checked for size)
#: Known debt: none left (issue 25); a function that breaks a size rule is split, not listed.
LONG_DEBT: set = set()
WIDE_DEBT: set = set()


def _modules() -> Iterator[Tuple[str, ast.Module]]:
    for f in sorted(PKG.rglob("*.py")):
        rel = f.relative_to(PKG).as_posix()
        yield rel, ast.parse(f.read_text(encoding="utf-8"), filename=str(f))


def _part(rel: str) -> str:
    return rel.split("/")[0].removesuffix(".py")


def _imports(tree: ast.Module) -> Iterator[str]:
    """Every minitron module named by an import statement (at any depth), as its first component below minitron."""
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names if node.module == "minitron"]
        for n in names:
            parts = n.split(".")
            if parts[0] == "minitron" and len(parts) > 1:
                yield parts[1]


def test_no_module_below_api_imports_the_driver_top():
    bad = [(rel, m) for rel, tree in _modules() if _part(rel) in BELOW_API for m in _imports(tree) if m in TOP]
    assert not bad, f"modules below api import api/cli/pipeline/demo: {bad}"


def test_nothing_below_search_imports_search():
    bad = [(rel, m) for rel, tree in _modules() if _part(rel) in BELOW_SEARCH for m in _imports(tree) if m == "search"]
    assert not bad, f"modules below search import it (search sits above compress/train/eval, below api): {bad}"


#: What the drivers at the top (cli, pipeline, demo) may import from the package: the front door and each other.
TOP_MAY_IMPORT = TOP | {"specs", "options", "runtime", "info"}


def test_cli_pipeline_and_demo_go_through_api():
    bad = [(rel, m) for rel, tree in _modules() if _part(rel) in TOP - {"api"} for m in _imports(tree)
           if m not in TOP_MAY_IMPORT]
    assert not bad, f"cli/pipeline/demo import below api (use minitron.api): {bad}"


def test_io_imports_neither_compress_nor_train():
    bad = [(rel, m) for rel, tree in _modules() if _part(rel) == "io" for m in _imports(tree)
           if m in ("compress", "train", "eval")]
    assert not bad, f"io imports a layer above it: {bad}"


def test_ops_and_kernels_import_nothing_from_the_driver():
    driver = {"api", "cli", "pipeline", "demo", "compress", "train", "io", "eval", "specs", "options"}
    bad = [(rel, m) for rel, tree in _modules() if _part(rel) in ("ops", "kernels") for m in _imports(tree)
           if m in driver]
    assert not bad, f"ops/kernels import the driver: {bad}"


def _functions(tree: ast.Module) -> Iterator[Tuple[str, ast.AST, bool]]:
    """(qualified name, node, public) of every function; methods are public when their class is."""
    def walk(node: ast.AST, prefix: str, public: bool) -> Iterator[Tuple[str, ast.AST, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                pub = public and not child.name.startswith("_")
                yield prefix + child.name, child, pub
                yield from walk(child, prefix + child.name + ".", False)
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, prefix + child.name + ".", public and not child.name.startswith("_"))
    yield from walk(tree, "", True)


def test_no_driver_function_over_120_lines():
    long = []
    for rel, tree in _modules():
        if _part(rel) not in DRIVER or rel in OWN_ROOM:
            continue
        for name, node, _ in _functions(tree):
            n = node.end_lineno - node.lineno + 1
            if n > 120:
                long.append(f"{rel}:{name}")
    assert set(long) <= LONG_DEBT, "driver functions over 120 lines: " + ", ".join(sorted(set(long) - LONG_DEBT))
    assert set(long) == LONG_DEBT, f"fixed, remove from LONG_DEBT: {sorted(LONG_DEBT - set(long))}"


def test_no_public_driver_function_with_more_than_10_parameters():
    wide = []
    for rel, tree in _modules():
        if _part(rel) not in PUBLIC or rel in OWN_ROOM:
            continue
        for name, node, public in _functions(tree):
            if not public:
                continue
            a = node.args
            params = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs if p.arg not in ("self", "cls")]
            if len(params) > 10:
                wide.append(f"{rel}:{name}")
    new = sorted(set(wide) - WIDE_DEBT)
    if new:
        pytest.fail("public driver functions with more than 10 parameters (use a spec): " + ", ".join(new))
    assert set(wide) == WIDE_DEBT, f"fixed, remove from WIDE_DEBT: {sorted(WIDE_DEBT - set(wide))}"
