"""The architecture, enforced: the layers contract (import-linter), no import cycles, small modules and
functions, the formatter's line length (docs/architecture.md)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest
from helpers import REPO, gpu_machine_env

PACKAGE = REPO / "dualenc"
MAX_MODULE_LINES = 300
MAX_FUNCTION_LINES = 80
LONG_FUNCTIONS_ALLOWED = {("dualenc/training/loop.py", "_train")}  # the one training loop
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the package under ``root`` (cwd and PYTHONPATH there, so that copy is analysed)."""
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env={"PATH": str(LINT_IMPORTS.parent), "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_layers_contract_is_kept():
    result = _lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "dualenc layers KEPT" in result.stdout


@pytest.mark.parametrize(
    ("module", "planted", "message"),
    [
        # a lower layer importing an upper one, at import time
        (
            "io/atomic.py",
            "import dualenc.training.loop\n",
            "dualenc.io is not allowed to import dualenc.training",
        ),
        # hidden behind TYPE_CHECKING: still an import
        (
            "model/options.py",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import dualenc.retrieval.index\n",
            "dualenc.model is not allowed to import dualenc.retrieval",
        ),
        # two packages of one layer must not import each other
        (
            "evaluation/pipeline.py",
            "import dualenc.negcache.table\n",
            "dualenc.evaluation is not allowed to import dualenc.negcache",
        ),
    ],
)
def test_the_contract_catches_a_planted_import(tmp_path, module, planted, message):
    """The check can fail: a copy of the package with one forbidden import breaks the contract."""
    shutil.copytree(PACKAGE, tmp_path / "dualenc", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "dualenc" / module
    target.write_text(target.read_text(encoding="utf-8") + "\n" + planted, encoding="utf-8")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout
    assert "dualenc layers BROKEN" in result.stdout
    assert message in " ".join(result.stdout.split())


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), i.e. import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.find_modules_directly_imported_by(node):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_import_cycles():
    graph = grimp.build_graph("dualenc", cache_dir=None)
    # a package imports its own modules to re-export them; that edge is not a cycle of the code
    for package in [m for m in graph.modules if (PACKAGE.parent / m.replace(".", "/")).is_dir()]:
        for child in graph.find_children(package):
            if graph.direct_import_exists(importer=package, imported=child):
                graph.remove_import(importer=package, imported=child)
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = grimp.ImportGraph()
    for module in ("a", "b", "c", "d"):
        graph.add_module(module)
    graph.add_import(importer="a", imported="b")
    graph.add_import(importer="b", imported="c")
    graph.add_import(importer="c", imported="a")
    graph.add_import(importer="c", imported="d")
    assert _cycles(graph) == [["a", "b", "c"]]


def _python_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_modules_are_small():
    sizes = {
        str(p.relative_to(REPO)): len(p.read_text(encoding="utf-8").splitlines()) for p in _python_files()
    }
    assert {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES} == {}


def test_functions_are_short():
    long = []
    for path in _python_files():
        name = str(path.relative_to(REPO))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES and (name, node.name) not in LONG_FUNCTIONS_ALLOWED:
                    long.append((name, node.name, length))
    assert long == []


def test_every_package_names_its_public_api():
    for init in sorted(PACKAGE.rglob("__init__.py")):
        tree = ast.parse(init.read_text(encoding="utf-8"))
        assert ast.get_docstring(tree), f"{init}: no docstring"
        names = [
            node.value
            for node in ast.walk(tree)
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets)
        ]
        assert names, f"{init}: no __all__"


def test_ruff_lint_and_format_are_clean():
    """Line length 110 (E501 on), imports sorted, the formatter's output everywhere, no formatter escapes."""
    ruff = Path(sys.executable).with_name("ruff")
    lint = subprocess.run([str(ruff), "check", "."], cwd=REPO, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = subprocess.run([str(ruff), "format", "--check", "."], cwd=REPO, capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr
    listed = ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"]
    tracked = subprocess.run(listed, cwd=REPO, capture_output=True, text=True).stdout.split()
    needles = ("# fmt" + ": skip", "# fmt" + ": off")  # spelled in two parts so this file does not match
    skips = [
        f
        for f in tracked
        if (REPO / f).exists() and any(n in (REPO / f).read_text(encoding="utf-8") for n in needles)
    ]
    assert skips == []


def test_every_package_imports_without_the_data_libraries(tmp_path):
    """On a machine with torch, transformers and accelerate only (no datasets, faiss, ir_measures, pyarrow),
    every package imports: those libraries are imported where files are read, indexed or scored."""
    packages = sorted(
        p.parent.relative_to(REPO).as_posix().replace("/", ".") for p in PACKAGE.rglob("__init__.py")
    )
    code = "import importlib\n" + "".join(f"importlib.import_module({p!r})\n" for p in packages)
    result = subprocess.run(
        [sys.executable, "-c", code], env=gpu_machine_env(tmp_path), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    blocked = subprocess.run(
        [sys.executable, "-c", "import datasets"],
        env=gpu_machine_env(tmp_path),
        capture_output=True,
        text=True,
    )
    assert "not installed on the GPU machine" in blocked.stderr  # the blocker works
