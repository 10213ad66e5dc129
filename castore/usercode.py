"""Which code is the user's, and the code that assigns a name in it: a module's
statements, a class body's, or a notebook cell's (IPython's `In`). castore/fingerprint.py
keys a step's code version with them; castore/loaded.py keeps each reading to the code
this process loaded."""

from __future__ import annotations

import ast
import functools
import importlib.util
import inspect
import os
import site
import sys
import sysconfig
import textwrap
import types
from typing import Any

from castore import loaded
from castore.hashing import hash_json, tagged


@functools.cache
def _library_roots() -> tuple[str, ...]:
    paths = set()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        with_default = sysconfig.get_paths().get(key)
        if with_default:
            paths.add(os.path.realpath(with_default))
    for p in [*site.getsitepackages(), site.getusersitepackages(), sys.base_prefix]:
        if p:
            paths.add(os.path.realpath(p))
    if sys.prefix != sys.base_prefix:
        paths.add(os.path.realpath(sys.prefix))
    return tuple(sorted(paths))


@functools.cache
def _is_user_file(path: str) -> bool:
    real = os.path.realpath(path)
    return not any(real == r or real.startswith(r + os.sep) for r in _library_roots())


def is_user_module(module: types.ModuleType | None) -> bool:
    """A module of the user's own code: has a source file outside the standard library and
    site-packages, and is not castore; or is `__main__` without a file, a notebook's cells
    (IPython keeps each cell's source for inspect)."""
    if module is None:
        return False
    name = module.__name__
    if name == "castore" or name.startswith("castore."):
        return False
    path = getattr(module, "__file__", None)
    if not path:
        return name == "__main__"
    return str(path).endswith(".py") and _is_user_file(str(path))


def without_source(where: types.ModuleType | type | None) -> bool:
    """A notebook's namespace (or a class defined there): its assignments have no file
    to be read from, so values are hashed as they are."""
    module = module_of(where) if isinstance(where, type) else where
    return module is not None and not getattr(module, "__file__", None)


def module_of(obj: Any) -> types.ModuleType | None:
    return sys.modules.get(getattr(obj, "__module__", None) or "")


def const_digest(value: Any) -> str | None:
    """A stable digest of a constant's value, or None for values that are not data."""
    try:
        return hash_json(tagged(value))
    except (TypeError, ValueError):
        return None


def cell_digest(where: types.ModuleType | type | None, name: str) -> str | None:
    """Normalized AST of the statements that assign `name` in the last notebook cell run
    that assigns it (IPython keeps the cells run, in order, as `In`), as a file's
    assignment is hashed; None outside IPython, or for a class's attribute."""
    cells = vars(where).get("In") if isinstance(where, types.ModuleType) else None
    if not isinstance(cells, list):
        return None
    for cell in reversed(cells):
        if not isinstance(cell, str) or name not in cell:
            continue
        try:
            statements = _assignments(ast.parse(cell).body).get(name)
        except SyntaxError:
            continue
        if statements:
            return hash_json(statements)
    return None


def loaded_digest(value: Any) -> str | None:
    """A value defined where no source can be read (a notebook cell), as it is: data by
    value, a partial by its arguments, another object by its repr unless that names its
    address (a default repr tells no version) or elides (numpy's and pandas' for large
    data: equal for other contents)."""
    if isinstance(value, functools.partial):
        return const_digest([list(value.args), value.keywords])
    digest = const_digest(value)
    if digest is not None:
        return digest
    text = repr(value)
    if " at 0x" in text or "..." in text:  # an address, or a summary (a large array)
        return None
    return hash_json([f"{type(value).__module__}.{type(value).__qualname__}", text])


def assigned(where: types.ModuleType | type | None, name: str) -> str | None:
    if isinstance(where, types.ModuleType):
        return assignment_digest(where, name)
    if isinstance(where, type):
        return class_assignment_digest(where, name)
    return None


def assignment_digest(module: types.ModuleType, name: str, depth: int = 0) -> str | None:
    """Normalized AST of the module-level statements that assign `name` (in the user
    module it is imported from, if it is: `from prompts import LABELS`), or None."""
    try:
        found = loaded.module_value("assignments", module, lambda: _module_assignments(module))
    except (OSError, TypeError, SyntaxError):
        return None
    statements = found.get(name)
    if statements:
        return hash_json(statements)
    origins = [found[f"from {name}"]] if f"from {name}" in found else []
    origins += [[source, name] for source in found.get("from *", [])]
    for source_name, original in origins if depth < 8 else []:
        source = sys.modules.get(source_name)
        if source is not None and is_user_module(source):
            digest = assignment_digest(source, original, depth + 1)
            if digest is not None:
                return digest
    return None


def class_assignment_digest(cls: type, name: str) -> str | None:
    """Normalized AST of the statements of `cls`'s body that assign `name`, or None."""
    try:
        found = loaded.class_value(cls, lambda: _class_assignments(cls), kind="assignments")
    except (OSError, TypeError, SyntaxError):
        return None
    statements = found.get(name)
    return hash_json(statements) if statements else None


def _class_assignments(cls: type) -> dict[str, list[str]]:
    node = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]
    return _assignments(node.body if isinstance(node, ast.ClassDef) else [])


def _module_assignments(module: types.ModuleType) -> dict[str, list[str]]:
    """Name -> the dumped module-level statements that assign it, read once per loaded
    version of the module (castore.loaded: a reloaded module is read again)."""
    body = ast.parse(inspect.getsource(module)).body
    out = _assignments(body)
    for node in body:
        if isinstance(node, ast.ImportFrom):
            try:
                source = importlib.util.resolve_name(
                    "." * node.level + (node.module or ""), module.__package__
                )
            except (ImportError, ValueError):
                continue
            for alias in node.names:
                if alias.name == "*":
                    out.setdefault("from *", []).append(source)
                else:
                    out[f"from {alias.asname or alias.name}"] = [source, alias.name]
    return out


def _assignments(body: list[ast.stmt]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for node in body:
        targets = (
            node.targets
            if isinstance(node, ast.Assign)
            else [node.target]
            if isinstance(node, (ast.AnnAssign, ast.AugAssign))
            else []
        )
        for t in targets:
            if isinstance(t, ast.Name):
                out.setdefault(t.id, []).append(ast.dump(node, include_attributes=False))
    return out
