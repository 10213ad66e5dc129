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
from typing import Any, NamedTuple

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
def is_user_file(path: str) -> bool:
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
    return str(path).endswith(".py") and is_user_file(str(path))


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


class Made(NamedTuple):
    """How a module-level (or class-level) value is made."""

    digest: str  # of the statements that make or change it
    module: types.ModuleType | None  # whose globals they read
    reads: list[list[str]]  # the global chains they read
    computed: bool  # they call something (json.load(...), make()): the value is not in them
    lines: tuple[tuple[int, int], ...] = ()  # (first, last) line of each, in the module's file


def made_by(where: types.ModuleType | type | None, name: str) -> Made | None:
    """(digest of the statements that make `name` where it is assigned, the module whose
    globals they read, the global chains they read: `PAT = re.compile(PATTERN)` reads
    `re.compile` and `PATTERN`, which make the value as much as the statement does), or
    None when no statement of the file makes it."""
    if isinstance(where, types.ModuleType):
        return _module_made_by(where, name)
    if isinstance(where, type):
        try:
            found = loaded.class_value(where, lambda: _class_assignments(where), "assignments")
        except (OSError, TypeError, SyntaxError):
            return None
        if not found.get(name):
            return None
        # (lines of the class's source, not of its module: no import reads are matched)
        made = _made(found, name, module_of(where))._replace(lines=())
        # `Cls.K["s"] = ...` after the class: the module's statements that change it.
        outside = None
        if made.module is not None and where.__qualname__ == where.__name__:
            outside = _module_made_by(made.module, where.__name__, depth=8)
        if outside is None:
            return made
        return Made(
            hash_json([made.digest, outside.digest]),
            made.module,
            made.reads + [c for c in outside.reads if c not in made.reads],
            made.computed or outside.computed,
            outside.lines,  # a class body's lines are not the module's
        )
    return None


def _module_made_by(module: types.ModuleType, name: str, depth: int = 0) -> Made | None:
    """In `module`, or in the user module it imports `name` from (`from prompts import
    LABELS`)."""
    try:
        found = loaded.module_value("assignments", module, lambda: _module_assignments(module))
    except (OSError, TypeError, SyntaxError):
        return None
    if found.get(name):
        return _made(found, name, module)
    origins = [found[f"from {name}"]] if f"from {name}" in found else []
    origins += [[source, name] for source in found.get("from *", [])]
    for source_name, original in origins if depth < 8 else []:
        source = sys.modules.get(source_name)
        if source is not None and is_user_module(source):
            made = _module_made_by(source, original, depth + 1)
            if made is not None:
                return made
    return None


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


def _made(found: dict[str, list[Any]], name: str, module: types.ModuleType | None) -> Made:
    reads = [list(c) for c in found.get(f"reads {name}", []) if isinstance(c, list)]
    lines = tuple((lo, hi) for lo, hi in found.get(f"lines {name}", []))
    return Made(hash_json(found[name]), module, reads, bool(found.get(f"calls {name}")), lines)


# Scopes of their own: what they bind is not the module's (a function or class defined at
# module level is followed as code, not as a value).
_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)


def _assignments(body: list[ast.stmt]) -> dict[str, list[Any]]:
    """Name -> the dumped statements of `body` that make or change it: assign it (also by
    unpacking, as a loop or `with` target), assign or delete into it (`D["k"] = v`), or
    call a method on it as a statement (`L.append(x)`), anywhere within the statement (a
    branch of an `if`, a `try`, a loop: the whole statement then, its conditions with it),
    and functions that declare it `global`;
    "reads <name>" -> the global chains those statements read; "calls <name>" when one
    of them calls something."""
    out: dict[str, list[Any]] = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            # `global NAME` in a function: calling it (as the module is imported, say)
            # makes NAME; its code counts, and NAME's value as when first hashed.
            # (its own statements: where `global` is written; walking every function's
            # whole body cost 10 % of a cold code version)
            touched = {n for g in node.body if isinstance(g, ast.Global) for n in g.names}
            if not touched:
                continue
            reads, calls = [], True
        elif isinstance(node, (*_SCOPES, ast.Import, ast.ImportFrom)):
            continue
        else:
            nodes = _inside(node)
            touched = _touched(nodes)
            if not touched:
                continue
            reads = chains_read(nodes)
            calls = any(isinstance(n, ast.Call) for n in nodes)
        dump = ast.dump(node, include_attributes=False)
        for name in sorted(touched):
            out.setdefault(name, []).append(dump)
            mine = out.setdefault(f"reads {name}", [])
            # Not the module's own dunders (`__file__`: where the file is does not count).
            mine.extend(
                c for c in reads if c[0] != name and not c[0].startswith("__") and c not in mine
            )
            if calls:
                out[f"calls {name}"] = [True]
                out.setdefault(f"lines {name}", []).append([node.lineno, node.end_lineno])
    return out


def _inside(node: ast.AST) -> list[ast.AST]:
    """`node` and what it holds, without the bodies of functions, classes and lambdas."""
    out, todo = [], [node]
    while todo:
        n = todo.pop()
        out.append(n)
        todo.extend(c for c in ast.iter_child_nodes(n) if not isinstance(c, _SCOPES))
    return out


def _touched(nodes: list[ast.AST]) -> set[str]:
    names: set[str] = set()
    for n in nodes:
        targets: list[ast.expr] = []
        if isinstance(n, ast.Assign):
            targets = n.targets
        elif isinstance(n, (ast.AugAssign, ast.AnnAssign, ast.For, ast.AsyncFor, ast.NamedExpr)):
            targets = [n.target]
        elif isinstance(n, ast.Delete):
            targets = n.targets
        elif isinstance(n, ast.withitem) and n.optional_vars is not None:
            targets = [n.optional_vars]
        elif (
            isinstance(n, ast.Expr)
            and isinstance(n.value, ast.Call)
            and isinstance(n.value.func, ast.Attribute)
        ):
            targets = [n.value.func.value]  # L.append(x), D.update(...): changed in place
        for t in targets:
            names.update(_bases(t))
    return names


def _bases(target: ast.expr) -> list[str]:
    """The names a target binds or changes: `X`, `X[k]`, `X.a.b`, `A, *B`."""
    if isinstance(target, (ast.Tuple, ast.List)):
        return [n for e in target.elts for n in _bases(e)]
    while isinstance(target, (ast.Subscript, ast.Attribute, ast.Starred)):
        target = target.value
    return [target.id] if isinstance(target, ast.Name) else []


def chains_read(nodes: list[ast.AST]) -> list[list[str]]:
    """The global chains a statement's `nodes` read (`re.compile`, `PATTERN`,
    `cfg.PROMPT`): maximal attribute chains on a name, and names read alone."""
    inner = {id(n.value) for n in nodes if isinstance(n, ast.Attribute)}
    chains: list[list[str]] = []
    for n in nodes:
        if id(n) in inner:
            continue
        if isinstance(n, ast.Attribute):
            attrs: list[str] = []
            base: ast.expr = n
            while isinstance(base, ast.Attribute):
                attrs.insert(0, base.attr)
                base = base.value
            if isinstance(base, ast.Name):
                chains.append([base.id, *attrs])
        elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load):
            chains.append([n.id])
    return chains
