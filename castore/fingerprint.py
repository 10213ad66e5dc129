"""Code versions that follow the code: what a step's `process` reaches in the user's own
code, not only its own text.

From `process` (or a `@step` function) the walk follows, through the bytecode's global and
attribute loads (so local variables never count):

- functions and classes defined in the user's own modules, transitively, each by the
  digest of its normalized AST (comments, docstrings and formatting do not count);
- methods reached as `self.name` from a method of a user class, and class constants
  reached so (by value; lists, dicts and sets by the class-body code that assigns them),
  `self` also being read from a comprehension or closure (a cell on Python 3.11);
- module-level constants they read (numbers, strings, bytes, None and containers of
  them), by value; lists, dicts and sets by the code that assigns them;
- attributes of the user's own modules reached as `module.name`, and a whole user module
  referenced as a value, by its normalized source;
- installed versions of the packages a step names in `code_packages`.

"The user's own code" is every module that is not in the standard library, not in
site-packages and not castore itself. Third-party packages are not followed: upgrading a
library must not silently re-pay LLM work (name it in `code_packages` to opt in).

What cannot be followed (documented in docs/caching.md next to `cache_version`): calls
through `getattr` with a computed name or other dynamic dispatch, objects passed in at run
time, data read from files outside a loader, mutable globals changed while running, and
code without source (a REPL, C extensions).

A step whose `process` reaches nothing beyond itself keeps the plain AST digest of
`process`, so adding this walk invalidated no cache of such steps.
"""

from __future__ import annotations

import ast
import contextlib
import contextvars
import dis
import functools
import importlib.metadata
import inspect
import os
import site
import sys
import sysconfig
import textwrap
import types
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from castore import loaded
from castore.hashing import hash_json, source_digest, tagged

# Followed items of one step: "kind name" -> digest, e.g. "function helpers.clean".
Parts = dict[str, str]

_LOAD_GLOBAL = {"LOAD_GLOBAL", "LOAD_NAME"}
_LOAD_ATTR = {"LOAD_ATTR", "LOAD_METHOD"}
_MAX_ITEMS = 2000  # a walk that reaches more than this is a sign of following a library


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
    site-packages, and is not castore."""
    if module is None:
        return False
    name = module.__name__
    if name == "castore" or name.startswith("castore."):
        return False
    path = getattr(module, "__file__", None)
    return bool(path) and str(path).endswith(".py") and _is_user_file(str(path))


def _module_of(obj: Any) -> types.ModuleType | None:
    return sys.modules.get(getattr(obj, "__module__", None) or "")


def _const_digest(value: Any) -> str | None:
    """A stable digest of a constant's value, or None for values that are not data."""
    try:
        return hash_json(tagged(value))
    except (TypeError, ValueError):
        return None


def _source_digest(obj: type | types.ModuleType) -> str:
    """Normalized-AST digest of a class's or module's source (its decorators count), of
    the version this process loaded (castore.loaded)."""

    def digest() -> str:
        return source_digest(inspect.getsource(obj), keep_decorators=True)

    if isinstance(obj, types.ModuleType):
        return loaded.module_value("module", obj, digest)
    return loaded.class_value(obj, digest)


def _code_objects(code: types.CodeType) -> Iterable[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_objects(const)


def _references(func: types.FunctionType) -> tuple[list[list[str]], list[str]]:
    """(global chains, self attributes): `mod.helper.x` as ["mod", "helper", "x"], and the
    names read as `self.name` (self = the first argument)."""
    chains: list[list[str]] = []
    self_attrs: list[str] = []
    first_arg = func.__code__.co_varnames[0] if func.__code__.co_argcount else None
    for code in _code_objects(func.__code__):
        chain: list[str] | None = None
        on_self = False
        for ins in dis.get_instructions(code):
            if ins.opname in _LOAD_GLOBAL:
                chain = [str(ins.argval)]
                chains.append(chain)
                on_self = False
            elif ins.opname in _LOAD_ATTR and chain is not None:
                chain.append(str(ins.argval))
            elif ins.opname in _LOAD_ATTR and on_self:
                self_attrs.append(str(ins.argval))
                on_self = False
            else:
                chain = None
                on_self = (
                    first_arg is not None
                    and ins.argval == first_arg
                    and _loads_self(
                        code is func.__code__, ins.opname, first_arg in code.co_freevars
                    )
                )
    return chains, self_attrs


def _loads_self(outer: bool, opname: str, free: bool) -> bool:
    """Whether an instruction loads the method's first argument. A comprehension or
    closure that uses it makes it a cell (Python 3.11): the method loads it with
    LOAD_DEREF, and the nested code, where it is a free variable, too."""
    if outer:
        return opname in ("LOAD_FAST", "LOAD_DEREF")
    return free and opname == "LOAD_DEREF"


class _Walk:
    def __init__(self) -> None:
        self.found: dict[str, set[str]] = {}
        self.seen: set[int] = set()
        self.todo: list[tuple[Any, type | None]] = []

    def add(self, label: str, digest: str | None) -> None:
        # Labels leave out the module (a script is `__main__` under python and another name
        # under `cas run`, and must keep its keys); two items with one label are both kept.
        if digest is not None:
            self.found.setdefault(label, set()).add(digest)

    @property
    def parts(self) -> Parts:
        return {
            label: next(iter(ds)) if len(ds) == 1 else hash_json(sorted(ds))
            for label, ds in sorted(self.found.items())
        }

    def visit(self, obj: Any, owner: type | None = None) -> None:
        if id(obj) in self.seen or len(self.seen) > _MAX_ITEMS:
            return
        self.seen.add(id(obj))
        self.todo.append((obj, owner))

    def run(self, root: types.FunctionType, owner: type | None) -> None:
        self.seen.add(id(root))
        self._function_refs(root, owner)
        while self.todo:
            obj, owner = self.todo.pop()
            if isinstance(obj, types.FunctionType):
                self.add(f"function {_qualname(obj)}", _function_digest(obj))
                self._function_refs(obj, owner)
            elif isinstance(obj, type):
                self._class(obj)

    def _class(self, cls: type) -> None:
        try:
            self.add(f"class {_qualname(cls)}", _source_digest(cls))
        except (OSError, TypeError):
            return
        for value in vars(cls).values():
            func = _as_function(value)
            if func is not None:
                self.seen.add(id(func))  # its text is in the class digest already
                self._function_refs(func, cls)

    def _function_refs(self, func: types.FunctionType, owner: type | None) -> None:
        chains, self_attrs = _references(func)
        for chain in chains:
            self._resolve(func.__globals__, chain)
        for name, cell in zip(func.__code__.co_freevars, func.__closure__ or (), strict=False):
            try:
                self._value(name, cell.cell_contents, ())
            except ValueError:  # an empty cell
                continue
        if owner is not None and is_user_module(_module_of(owner)):
            for name in self_attrs:
                method = _as_function(inspect.getattr_static(owner, name, None))
                if method is None:
                    self._class_attribute(owner, name)
                elif is_user_module(_module_of(method)):
                    self.visit(method, owner)

    def _class_attribute(self, owner: type, name: str) -> None:
        """`self.NAME` that is no method: a class constant of a user class (by value; a
        list, dict or set by the class-body code that assigns it), a nested class. An
        instance attribute (a pydantic field: hashed as a param) is in no class."""
        klass = next((k for k in owner.__mro__ if name in vars(k)), None)
        if klass is None or not is_user_module(_module_of(klass)):
            return
        value = vars(klass)[name]
        label = f"{_qualname(klass)}.{name}"
        if isinstance(value, (list, dict, set)):
            digest = _class_assignment_digest(klass, name)
            if digest is not None:
                self.add(f"constant {label}", digest)
            return
        self._value(label, value, ())

    def _resolve(self, namespace: dict[str, Any], chain: list[str]) -> None:
        if chain[0] not in namespace:
            return  # a builtin, or a global that does not exist (yet)
        module = sys.modules.get(str(namespace.get("__name__")))
        self._value(chain[0], namespace[chain[0]], chain[1:], module)

    def _value(
        self, label: str, value: Any, rest: Iterable[str], module: types.ModuleType | None = None
    ) -> None:
        rest = list(rest)
        if isinstance(value, types.ModuleType):
            if not is_user_module(value):
                return
            if rest and rest[0] in vars(value):
                attr = vars(value)[rest[0]]
                self._value(f"{value.__name__}.{rest[0]}", attr, rest[1:], value)
            elif id(value) not in self.seen:
                self.seen.add(id(value))
                try:
                    self.add(f"module {value.__name__}", _source_digest(value))
                except (OSError, TypeError):
                    pass
            return
        if isinstance(value, (types.FunctionType, type)):
            if is_user_module(_module_of(value)):
                self.visit(value, value if isinstance(value, type) else None)
            return
        if callable(value):
            return  # library objects (and instances with __call__) are not followed
        if isinstance(value, (list, dict, set)):
            # A mutable global may be a registry or a counter the run itself changes: its
            # code, not its value at this moment, is what the step depends on.
            name = label.rsplit(".", 1)[-1]
            digest = _assignment_digest(module, name) if module is not None else None
        else:
            digest = _const_digest(value)
        if digest is not None:
            self.add(f"constant {label}", digest)


def _assignment_digest(module: types.ModuleType, name: str) -> str | None:
    """Normalized AST of the module-level statements that assign `name`, or None."""
    try:
        found = loaded.module_value("assignments", module, lambda: _module_assignments(module))
    except (OSError, TypeError, SyntaxError):
        return None
    statements = found.get(name)
    return hash_json(statements) if statements else None


def _class_assignment_digest(cls: type, name: str) -> str | None:
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
    return _assignments(ast.parse(inspect.getsource(module)).body)


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


def _as_function(attr: Any) -> types.FunctionType | None:
    """The function behind a class attribute: a method, static or class method, or a
    property's getter."""
    if isinstance(attr, (staticmethod, classmethod)):
        attr = attr.__func__
    if isinstance(attr, property):
        attr = attr.fget
    return attr if isinstance(attr, types.FunctionType) else None


def _qualname(obj: Any) -> str:
    return str(getattr(obj, "__qualname__", getattr(obj, "__name__", "?")))


def _function_digest(func: types.FunctionType) -> str | None:
    try:
        return loaded.function_digest(func)
    except (OSError, TypeError):
        return None


def package_versions(packages: Iterable[str]) -> Parts:
    """'package NAME' -> installed version (or 'not installed')."""
    out: Parts = {}
    for name in sorted(set(packages)):
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = "not installed"
        out[f"package {name}"] = version
    return out


_MEMO: contextvars.ContextVar[dict[Any, tuple[str, Parts]] | None] = contextvars.ContextVar(
    "castore_code_parts", default=None
)


@contextlib.contextmanager
def one_code_version() -> Iterator[None]:
    """Within the block, each function's code parts are computed once: a run needs them
    for its signatures and again for pipeline.yaml. Outside, every call walks the code
    again (a long-lived process may have reloaded some of it); each digest is that of the
    code this process loaded (castore.loaded)."""
    token = _MEMO.set({})
    try:
        yield
    finally:
        _MEMO.reset(token)


def code_parts(
    func: Callable[..., Any], owner: type | None = None, packages: Iterable[str] = ()
) -> tuple[str, Parts]:
    """(digest of `func` itself, what it reaches in the user's own code)."""
    memo = _MEMO.get()
    key = (func, owner, tuple(packages))
    if memo is not None and key in memo:
        return memo[key]
    result = _code_parts(func, owner, key[2])
    if memo is not None:
        memo[key] = result
    return result


def _code_parts(
    func: Callable[..., Any], owner: type | None, packages: Iterable[str]
) -> tuple[str, Parts]:
    func = inspect.unwrap(func)
    root = loaded.function_digest(func)  # raises OSError without source, as before
    walk = _Walk()
    if isinstance(func, types.FunctionType) and is_user_module(_module_of(func)):
        walk.run(func, owner)
    return root, {**walk.parts, **package_versions(packages)}


def code_version(root: str, parts: Parts) -> str:
    """The code version a fingerprint hashes: the plain digest when nothing is followed
    (so those steps keep their keys), else a digest over the root and every part."""
    if not parts:
        return root
    return hash_json({"process": root, "reaches": dict(sorted(parts.items()))})
