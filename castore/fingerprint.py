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
  them), by value; lists, dicts and sets by the code that assigns them (and the functions
  and classes they hold by their code); other objects (a compiled pattern, a partial, an
  instance) by the code that makes them and their class if it is the user's; names
  imported `from` a user module by their assignment there; wrapped functions
  (`functools.cache`) by the code they wrap;
- attributes of the user's own modules reached as `module.name`, and a whole user module
  referenced as a value, by its normalized source;
- the user's classes in the MRO of a step that subclasses a built-in one (castore's
  `process` calls their overrides) and of the step's field values (an LLM subclass),
  each whole (castore.pipeline.step: `_user_classes`);
- installed versions of the packages a step names in `code_packages`.

"The user's own code" is every module that is not in the standard library, not in
site-packages and not castore itself, and `__main__` without a file (a notebook's cells:
a list or object there is hashed by the last cell run that assigns it, IPython's `In`,
else as loaded).
Third-party packages are not followed: upgrading a library must not silently re-pay LLM
work (name it in `code_packages` to opt in).

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
import importlib.util
import inspect
import itertools
import logging
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
_CALL = {"PRECALL", "CALL", "KW_NAMES", "CACHE"}
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


def _without_source(where: types.ModuleType | type | None) -> bool:
    """A notebook's namespace (or a class defined there): its assignments have no file
    to be read from, so values are hashed as they are."""
    module = _module_of(where) if isinstance(where, type) else where
    return module is not None and not getattr(module, "__file__", None)


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
        on_self = typed = False  # typed: `type(self)` is being called
        for ins in dis.get_instructions(code):
            if (typed or chain == ["super"]) and ins.opname in _CALL:
                continue  # to the attribute read from `type(self)` or `super()`
            if ins.opname in _LOAD_GLOBAL:
                chain = [str(ins.argval)]
                chains.append(chain)
                on_self = typed = False
            elif ins.opname in _LOAD_ATTR and chain is not None:
                chain.append(str(ins.argval))
            elif ins.opname in _LOAD_ATTR and (on_self or typed):
                self_attrs.append(str(ins.argval))
                # `self.__class__.NAME` reads the class's NAME
                on_self, typed = ins.argval == "__class__", False
            else:
                loads = first_arg is not None and ins.argval == first_arg
                loads = loads and _loads_self(
                    code is func.__code__, ins.opname, first_arg in code.co_freevars
                )
                typed = loads and chain == ["type"]
                on_self = loads and not typed
                chain = None
    return chains, self_attrs


def _default_chains(func: types.FunctionType) -> list[list[str]]:
    """The names an argument default reads (`def f(v, k=FACTOR)`): evaluated where the
    function is defined, they are not in its bytecode, and its text holds the name only."""
    if not (func.__defaults__ or func.__kwdefaults__):
        return []
    try:
        node = ast.parse(textwrap.dedent(inspect.getsource(func))).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return []
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return []
    chains: list[list[str]] = []
    todo: list[ast.AST] = [*node.args.defaults, *(d for d in node.args.kw_defaults if d)]
    while todo:
        expr = todo.pop()
        attrs: list[str] = []
        inner = expr
        while isinstance(inner, ast.Attribute):
            attrs.insert(0, inner.attr)
            inner = inner.value
        if isinstance(inner, ast.Name):
            chains.append([inner.id, *attrs])
        else:
            todo.extend(ast.iter_child_nodes(expr))
    return chains


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
        # A @step function's defaults are its params, hashed as such.
        self._function_refs(root, owner, defaults=owner is not None)
        self.drain()

    def drain(self) -> None:
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
            whole = True
        except (OSError, TypeError):
            # A class defined in a notebook cell: inspect cannot read a class's source
            # there (its functions' it can), so its methods and values count one by one.
            if not _without_source(cls):
                return
            whole = False
        for name, value in vars(cls).items():
            func = _as_function(value)
            if func is not None and not is_user_module(_module_of(func)):
                continue  # pydantic's model_post_init, set on the class: not the user's
            if func is not None and whole:
                self.seen.add(id(func))  # its text is in the class digest already
                self._function_refs(func, cls)
            elif func is not None:
                self.visit(func, cls)
            elif not whole and not name.startswith("__"):
                self.add(f"constant {_qualname(cls)}.{name}", _loaded_digest(value))

    def _function_refs(
        self, func: types.FunctionType, owner: type | None, defaults: bool = True
    ) -> None:
        chains, self_attrs = _references(func)
        if defaults:
            chains += _default_chains(func)
        for chain in chains:
            if chain[0] == "super" and len(chain) > 1 and owner is not None:
                self._inherited(owner, chain[1])
                continue
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

    def _inherited(self, owner: type, name: str) -> None:
        """`super().name`: every definition of `name` in the user's classes `owner`
        inherits from (which one runs depends on the class the call is made in)."""
        for klass in owner.__mro__[1:]:
            func = _as_function(vars(klass).get(name))
            if func is not None and is_user_module(_module_of(func)):
                self.visit(func, owner)

    def _class_attribute(self, owner: type, name: str) -> None:
        """`self.NAME` that is no method: a class constant of a user class (by value; a
        list, dict or set by the class-body code that assigns it), a nested class. An
        instance attribute (a pydantic field: hashed as a param) is in no class."""
        klass = next((k for k in owner.__mro__ if name in vars(k)), None)
        if klass is None or not is_user_module(_module_of(klass)):
            return
        self._value(f"{_qualname(klass)}.{name}", vars(klass)[name], (), klass)

    def _resolve(self, namespace: dict[str, Any], chain: list[str]) -> None:
        if chain[0] not in namespace:
            return  # a builtin, or a global that does not exist (yet)
        module = sys.modules.get(str(namespace.get("__name__")))
        self._value(chain[0], namespace[chain[0]], chain[1:], module)

    def _value(
        self,
        label: str,
        value: Any,
        rest: Iterable[str],
        module: types.ModuleType | type | None = None,  # where it is assigned
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
        inner = _unwrapped(value)
        if inner is not value:  # functools.cache and other wrappers: the code they run
            self._value(label, inner, ())
            return
        if isinstance(value, functools.partial):
            self._value(label, value.func, ())  # and its arguments, by its assignment
        self.add(f"constant {label}", self._data_digest(label, value, module))

    def _data_digest(
        self, label: str, value: Any, where: types.ModuleType | type | None
    ) -> str | None:
        name = label.rsplit(".", 1)[-1]
        if isinstance(value, (list, tuple, dict, set, frozenset)):
            # Functions and classes held in it (a table of handlers): their code
            items = value.values() if isinstance(value, dict) else value
            for item in itertools.islice(items, _MAX_ITEMS):
                if isinstance(item, (types.FunctionType, type)):
                    self._value(label, item, ())
        if isinstance(value, (list, dict, set)):
            # A mutable global may be a registry or a counter the run itself changes: its
            # code, not its value at this moment, is what the step depends on.
            if _without_source(where):
                return _cell_digest(where, name) or _loaded_digest(value)
            return _assigned(where, name)
        digest = _const_digest(value)
        if digest is None and not isinstance(value, _NEUTRAL):
            # An object (a compiled pattern, a template, a client, a partial): keyed by
            # the code that makes it, and by its class when that is the user's.
            if is_user_module(_module_of(type(value))):
                self.visit(type(value), type(value))
            if _without_source(where):
                digest = _cell_digest(where, name) or _loaded_digest(value)
            else:
                digest = _assigned(where, name)
        return digest


# Objects that do not change what a step returns: not keyed by their assignment, so
# steps that log keep their keys.
_NEUTRAL = (logging.Logger, logging.LoggerAdapter)


def _cell_digest(where: types.ModuleType | type | None, name: str) -> str | None:
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


def _loaded_digest(value: Any) -> str | None:
    """A value defined where no source can be read (a notebook cell), as it is: data by
    value, a partial by its arguments, another object by its repr unless that names its
    address (a default repr tells no version) or elides (numpy's and pandas' for large
    data: equal for other contents)."""
    if isinstance(value, functools.partial):
        return _const_digest([list(value.args), value.keywords])
    digest = _const_digest(value)
    if digest is not None:
        return digest
    text = repr(value)
    if " at 0x" in text or "..." in text:  # an address, or a summary (a large array)
        return None
    return hash_json([f"{type(value).__module__}.{type(value).__qualname__}", text])


def _unwrapped(value: Any) -> Any:
    """The function a wrapper made with functools.wraps (functools.cache's too) calls."""
    if not callable(value) or isinstance(value, types.FunctionType):
        return value
    try:
        return inspect.unwrap(value)
    except ValueError:  # a cycle of __wrapped__
        return value


def _assigned(where: types.ModuleType | type | None, name: str) -> str | None:
    if isinstance(where, types.ModuleType):
        return _assignment_digest(where, name)
    if isinstance(where, type):
        return _class_assignment_digest(where, name)
    return None


def _assignment_digest(module: types.ModuleType, name: str, depth: int = 0) -> str | None:
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
            digest = _assignment_digest(source, original, depth + 1)
            if digest is not None:
                return digest
    return None


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


def _as_function(attr: Any) -> types.FunctionType | None:
    """The function behind a class attribute: a method, static or class method, or a
    property's (or cached property's) getter."""
    if isinstance(attr, (staticmethod, classmethod)):
        attr = attr.__func__
    if isinstance(attr, property):
        attr = attr.fget
    if isinstance(attr, functools.cached_property):
        attr = attr.func
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
    func: Callable[..., Any],
    owner: type | None = None,
    packages: Iterable[str] = (),
    classes: Iterable[type | types.FunctionType] = (),
) -> tuple[str, Parts]:
    """(digest of `func` itself, what it and `classes` (user classes hashed whole, or
    methods of `owner`'s that run without `func` calling them) reach in the user's own
    code)."""
    memo = _MEMO.get()
    key = (func, owner, tuple(packages), tuple(classes))
    if memo is not None and key in memo:
        return memo[key]
    result = _code_parts(func, owner, key[2], key[3])
    if memo is not None:
        memo[key] = result
    return result


def user_classes(cls: type) -> list[type]:
    """The classes of `cls`'s MRO defined in the user's own code."""
    return [c for c in cls.__mro__ if is_user_module(_module_of(c))]


def _code_parts(
    func: Callable[..., Any],
    owner: type | None,
    packages: Iterable[str],
    classes: Iterable[type | types.FunctionType],
) -> tuple[str, Parts]:
    func = inspect.unwrap(func)
    root = loaded.function_digest(func)  # raises OSError without source, as before
    walk = _Walk()
    if isinstance(func, types.FunctionType) and is_user_module(_module_of(func)):
        walk.run(func, owner)
    for obj in classes:
        walk.visit(obj, obj if isinstance(obj, type) else owner)
    walk.drain()
    return root, {**walk.parts, **package_versions(packages)}


def code_version(root: str, parts: Parts) -> str:
    """The code version a fingerprint hashes: the plain digest when nothing is followed
    (so those steps keep their keys), else a digest over the root and every part."""
    if not parts:
        return root
    return hash_json({"process": root, "reaches": dict(sorted(parts.items()))})
