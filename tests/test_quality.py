"""The project's own checks, run with the suite so CI and developers run the same thing."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO


def test_ruff_clean():
    p = subprocess.run(
        [sys.executable, "-m", "ruff", "check", str(REPO)], capture_output=True, text=True, cwd=REPO
    )
    assert p.returncode == 0, p.stdout + p.stderr


def test_docs_build_strict(tmp_path):
    if shutil.which("mkdocs") is None and not _has_module("mkdocs"):
        pytest.fail("mkdocs is part of the test extra and must be installed")
    p = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert (tmp_path / "site" / "index.html").exists()
    cli = (tmp_path / "site" / "cli" / "index.html").read_text()
    assert "<code>cas status</code>" in cli or "cas status" in cli
    assert "UNSET" not in cli  # click's no-default sentinel is shown as "none"
    # The API reference is generated from the docstrings, pydantic fields included.
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for name in ("Pipeline", "dry_run", "structured_output", "MagpieGenerator", "Distiset"):
        assert name in api, name


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_mypy_clean():
    p = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert p.returncode == 0, p.stdout + p.stderr


def _modules() -> dict[str, object]:
    """castore's modules (cli/ as castore.cli) -> their source file."""
    out = {}
    for root in ("castore", "cli"):
        for path in (REPO / root).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[0] == "cli":
                parts = ["castore", "cli", *parts[1:]]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imports(path, modules) -> set[str]:
    """castore modules `path` imports, function-local imports included, TYPE_CHECKING
    blocks excluded; `from package import submodule` counts as the submodule."""
    import ast

    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            skip |= {id(n) for n in ast.walk(node)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = [f"{node.module}.{a.name}" for a in node.names]
            subs = [s for s in subs if s in modules]
            names = subs if len(subs) == len(node.names) else [node.module, *subs]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def test_no_import_cycle():
    """Layering: no module imports (at top level or inside a function) one that imports
    it back, directly or not. A cycle means a module cannot be understood alone."""
    modules = _modules()
    graph = {m: _imports(p, modules) - {m} for m, p in modules.items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = [*path[path.index(n) :], n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_module_sizes():
    """No castore module over 600 lines; the run driver's wiring stays small."""
    sizes = {m: len(p.read_text().splitlines()) for m, p in _modules().items()}
    big = {m: n for m, n in sizes.items() if n > 600}
    assert not big, big
    assert sizes["castore.pipeline.runner"] <= 250, sizes["castore.pipeline.runner"]


def test_every_package_is_installed():
    """pyproject lists packages by hand (cli/ installs as castore.cli), so a new package
    missing from the list would be absent from every non-editable install."""
    import tomllib

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    on_disk = set()
    for root in ("castore", "cli"):
        for init in (REPO / root).rglob("__init__.py"):
            parts = init.parent.relative_to(REPO).parts
            on_disk.add(".".join(("castore", *parts) if parts[0] == "cli" else parts))
    assert set(pyproject["tool"]["setuptools"]["packages"]) == on_disk
