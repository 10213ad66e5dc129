"""The source castore hashes is the code that runs.

A code version is the digest of source text (castore.hashing.code_digest), read from the
file when a fingerprint is computed. Python does not re-read a module's file when it
changes: a long-lived process (a notebook kernel) that imported a module, then had the
file edited, runs the code it loaded. Hashing the edited file there would file the old
code's results under the new code's key, and a later process running the new code would
be served them: wrong rows from a cache hit.

So each function's (and class's, and module's) digest is taken once per loaded version of
it, in this process, and kept while that object is what runs:

- the first time castore hashes an object, the file must still hold the code that was
  loaded: a file not modified since the process started is (a module is imported after
  its process starts); a newer file is compiled as the import compiled it and its code
  objects compared with the loaded ones (bytecode, constants, names, the line each
  starts at). A difference is an error: the loaded code has no source to hash;
- later, the same object keeps its digest whatever the file says now, with a warning
  once that the file changed and the edit does not run until the module is reloaded
  (`importlib.reload`, IPython's autoreload) or the process restarted. A reloaded module
  gives new objects, hashed anew.

Values that code objects do not show and that are hashed from the file's text (a
module-level list, a constant of a class hashed whole) are compared too the first time:
each one the file assigns once, as a literal, and never changes in place, must equal the
loaded value. Left out, and documented in docs/caching.md: such a value computed (a call,
a comprehension) or changed in place, edited between the import and the first run of a
long-lived process.
"""

from __future__ import annotations

import ast
import contextlib
import contextvars
import inspect
import logging
import math
import os
import sys
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from castore.errors import StaleCode
from castore.hashing import code_digest, hash_bytes

T = TypeVar("T")

log = logging.getLogger("castore")

_MAX = 10_000  # objects remembered; a long process past this hashes again (and checks)
# Seconds of doubt around the process's start (/proc gives it to a second or a tick).
_SLACK = 2.0
_TICK = 0.1  # seconds: more than any file clock's step (ext4's is a few ms)


def _process_start() -> float:
    """When this process started (Linux), else when castore was imported: a module
    imported before that time stays unchecked (on other systems only)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


PROCESS_START = _process_start()


@dataclass
class _Taken:
    obj: Any  # held, so its id is not reused while it is remembered
    value: Any
    path: str | None
    stat: tuple[int, int] | None  # the file's (mtime_ns, size) when it was taken
    codes: list[types.CodeType]
    values: list[tuple[str, Any]]  # (qualified name, loaded value) the file must give
    compute: Callable[[], Any]  # the value from the file as it is now


_taken: dict[tuple[Any, ...], _Taken] = {}  # by (kind, id(object), ids of its code)
_warned: set[tuple[str, tuple[int, int] | None]] = set()
# A file's code objects and literal assignments by qualified name, per (path, mtime_ns,
# size) or, for a file just written, (path, digest of its bytes): compiled once.
_compiled: dict[tuple[Any, ...], _Compiled] = {}
# What a `collecting()` block met: loaded code its file no longer holds.
_stale: contextvars.ContextVar[list[Stale] | None] = contextvars.ContextVar(
    "castore_stale", default=None
)


def _once(
    kind: str,
    obj: Any,
    version: tuple[types.CodeType, ...],
    where: Callable[[], _Where],
    compute: Callable[[], T],
) -> T:
    """`compute()` (read from `obj`'s source file as it is now), once per loaded `obj`,
    `version` (code objects that make another version of it when they change: IPython's
    autoreload patches a class's methods in place) and `kind`. `where()` gives, the first
    time, the source file (None: nothing to check, e.g. a notebook cell), the loaded
    code objects the file must still hold and the loaded values it must still give."""
    key = (kind, id(obj), *map(id, version))
    hit = _taken.get(key)
    if hit is not None and hit.obj is obj:
        _later(hit)
        return cast(T, hit.value)
    path, codes, values = where()
    stat = _stat(path)
    differs = _differs(path, stat, codes, values) if path and stat else None
    if differs == _CODE:
        raise StaleCode(
            f"{_name(obj)}: {path} was edited after this process loaded it, and the code "
            "that would run is not the file's; reload the module (importlib.reload) or "
            "restart the process"
        )
    if differs:
        raise StaleCode(
            f"{_name(obj)}: {path} assigns {differs} "
            "another value than the one this process runs "
            "(the file was edited after it was loaded, or the value set at run time); "
            "reload the module (importlib.reload) or restart the process"
        )
    value = compute()
    if len(_taken) >= _MAX:
        _taken.clear()
    _taken[key] = _Taken(obj, value, path, stat, codes, values, compute)
    return value


@dataclass(frozen=True)
class Stale:
    """Loaded code whose file now holds other code."""

    path: str
    name: str

    def __str__(self) -> str:
        return f"{self.path} changed after {self.name} was loaded"


@contextlib.contextmanager
def collecting() -> Iterator[list[Stale]]:
    """Within the block, loaded code whose file now holds other code (edited, not
    reloaded) is listed: a run whose workers import files anew (Ray, spawned processes)
    would run the file's code under the loaded code's key, and must refuse."""
    found: list[Stale] = []
    token = _stale.set(found)
    try:
        yield found
    finally:
        _stale.reset(token)


def function_digest(func: Any) -> str:
    """code_digest(func) of the code that runs: keyed by its code object, so a module
    reloaded (or a function redefined, or patched by autoreload) is hashed anew."""
    func = inspect.unwrap(func)
    code = getattr(func, "__code__", None)
    if not isinstance(code, types.CodeType) or code.co_name == "<lambda>":
        return code_digest(func)  # a lambda is hashed by its compiled code already
    return _once(
        "function", code, (), lambda: (source_file(func), [code], []), lambda: code_digest(func)
    )


def value_once(holder: Any, kind: str, compute: Callable[[], T]) -> T:
    """`compute()` once per `holder` (a module's spec, which a reload replaces; a class
    object) and `kind`, with no file to check: a value as it was when first taken."""
    return _once(kind, holder, (), lambda: (None, [], []), compute)


def class_value(cls: type, compute: Callable[[], T], kind: str = "class") -> T:
    """`compute()` (from the class's source) once per loaded version of `cls` and
    `kind` (what is computed)."""
    methods = tuple(_method_codes(cls))

    def where() -> _Where:
        path = source_file(cls)
        # pydantic replaces `model_config` with the config merged with its bases'
        values = [
            (f"{cls.__qualname__}.{k}", v)
            for k, v in vars(cls).items()
            if k != "model_config" and _compared(kind, v)
        ]
        return path, [c for c in methods if c.co_filename == path], values

    return _once(kind, cls, methods, where, compute)


def module_value(kind: str, module: types.ModuleType, compute: Callable[[], T]) -> T:
    """`compute()` (from the module's source) once per loaded version of `module`: its
    spec stands for it, which importlib.reload replaces (the module object stays)."""

    def where() -> _Where:
        path = source_file(module)
        out = []
        for value in vars(module).values():
            if getattr(value, "__module__", None) != module.__name__:
                continue
            codes = (
                _method_codes(value)
                if isinstance(value, type)
                else [getattr(value, "__code__", None)]
            )
            out += [c for c in codes if isinstance(c, types.CodeType) and c.co_filename == path]
        return path, out, [(k, v) for k, v in vars(module).items() if _compared(kind, v)]

    return _once(kind, getattr(module, "__spec__", None) or module, (), where, compute)


def _compared(kind: str, value: Any) -> bool:
    """Whether a loaded value must equal the file's literal: all of a class's or module's
    hashed whole (its source), only lists, dicts and sets of its assignments (other
    values are hashed as they are loaded, a number a notebook set included)."""
    return kind != "assignments" or isinstance(value, (list, dict, set))


def _method_codes(cls: type) -> list[types.CodeType]:
    out = []
    for value in vars(cls).values():
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        code = getattr(value, "__code__", None)
        if isinstance(code, types.CodeType):
            out.append(code)
    return out


def source_file(obj: Any) -> str | None:
    """The file inspect reads `obj`'s source from, when it is one."""
    try:
        path = inspect.getsourcefile(obj)
    except TypeError:
        return None
    return path if path and os.path.isfile(path) else None


def _stat(path: str | None) -> tuple[int, int] | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def _differs(
    path: str,
    stat: tuple[int, int],
    codes: list[types.CodeType],
    values: list[tuple[str, Any]],
) -> str | None:
    """Whether the file at `path` (as `stat` says it is now) may not hold `codes`, the
    loaded code (_CODE), or give `values` (the first name that differs): None for a file
    older than the process (the import read it)."""
    if stat[0] / 1e9 < PROCESS_START - _SLACK or not (codes or values):
        return None
    try:
        found = _code_in(path, stat)
    except (OSError, SyntaxError, ValueError):
        return _CODE  # it no longer compiles: not the loaded code
    for code in codes:
        # At the same line too: inspect reads a function's source from the line its
        # loaded code starts at.
        same = (
            other.co_firstlineno == code.co_firstlineno and _same(code, other)
            for other in found.codes.get(code.co_qualname, ())
        )
        if not any(same):
            return _CODE
    for name, value in values:
        literal = found.literals.get(name, _NONE)
        if literal is not _NONE and _plain(value) and not _equal(value, literal):
            return name
    return None


def _later(hit: _Taken) -> None:
    """A remembered object met again: its file may have been edited since."""
    if hit.path is None:
        return
    stat = _stat(hit.path)
    if stat == hit.stat or stat is None:
        return
    if not _differs(hit.path, stat, hit.codes, hit.values) and _same_value(hit):
        hit.stat = stat  # edited elsewhere (or back): this code is still the file's
        return
    stale = _stale.get()
    if stale is not None:
        stale.append(Stale(hit.path, _name(hit.obj)))
    if (hit.path, stat) in _warned:
        return
    _warned.add((hit.path, stat))
    log.warning(
        "%s changed after %s was loaded: this run keys and runs the loaded code; reload "
        "the module (importlib.reload) or restart the process to run the edit",
        hit.path,
        _name(hit.obj),
    )


def _same_value(hit: _Taken) -> bool:
    """Whether the file as it is now gives the value taken (a class's or module's
    digest, a module's assignments: what code objects alone do not show, such as a
    class constant or a module-level list)."""
    try:
        return bool(hit.compute() == hit.value)
    except (OSError, TypeError, SyntaxError):
        return False


def _name(obj: Any) -> str:
    for attr in ("co_qualname", "__qualname__", "name", "__name__"):
        value = getattr(obj, attr, None)
        if isinstance(value, str):
            return value
    return "?"


@dataclass
class _Compiled:
    codes: dict[str, list[types.CodeType]]  # by qualified name
    literals: dict[str, Any]  # "NAME" / "Class.NAME": the literal the file assigns


_Where = tuple[str | None, list[types.CodeType], list[tuple[str, Any]]]
_NONE = object()
_CODE = "\0code"  # what _differs says when the code differs (no name can be this)


def _code_in(path: str, stat: tuple[int, int]) -> _Compiled:
    """The code objects of the file as an import compiles it (bytes, so its coding
    cookie counts) and its literal assignments, by qualified name; compiled once per
    version of the file."""
    # (mtime, size) names a version only once the file clock has moved on: two writes
    # within one tick of it leave the same pair. A file written that recently is named
    # by its bytes.
    source = None
    if time.time() - stat[0] / 1e9 > _TICK:
        key: tuple[Any, ...] = (path, *stat)
    else:
        with open(path, "rb") as f:
            source = f.read()
        key = (path, hash_bytes(source))
    found = _compiled.get(key)
    if found is None:
        if source is None:
            with open(path, "rb") as f:
                source = f.read()
        tree = ast.parse(source, path)
        literals = _literals(tree)  # before a loader's rewrite changes the tree
        codes: dict[str, list[types.CodeType]] = {}
        todo = [_compile_as_imported(path, tree, source)]
        while todo:
            code = todo.pop()
            codes.setdefault(code.co_qualname, []).append(code)
            todo.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
        found = _Compiled(codes, literals)
        if len(_compiled) >= 64:
            _compiled.clear()
        _compiled[key] = found
    return found


def _compile_as_imported(path: str, tree: ast.Module, source: bytes) -> types.CodeType:
    """The file's code as its module's loader made it. Import hooks that transform code
    (pytest rewrites the asserts of test modules; typeguard and beartype instrument
    functions in `source_to_code`) give other bytecode than a plain compile, so without
    this a test module edited shortly before pytest started would be refused as edited
    after its import."""
    import importlib.machinery

    loader = next(
        (
            getattr(getattr(m, "__spec__", None), "loader", None)
            for m in list(sys.modules.values())
            if getattr(m, "__file__", None) == path
        ),
        None,
    )
    if type(loader).__name__ == "AssertionRewritingHook":
        with contextlib.suppress(Exception):  # pytest's internals: else a plain compile
            from _pytest.assertion.rewrite import rewrite_asserts

            rewrite_asserts(tree, source, path, getattr(loader, "config", None))
    elif isinstance(loader, importlib.machinery.SourceFileLoader) and (
        type(loader).source_to_code is not importlib.machinery.SourceFileLoader.source_to_code
    ):
        with contextlib.suppress(Exception):
            code = loader.source_to_code(source, path)
            if isinstance(code, types.CodeType):
                return code
    return compile(tree, path, "exec", dont_inherit=True)


# Calls that change a list, dict or set in place: a name they are called on anywhere in
# the file may hold another value than its literal, so it is not compared.
IN_PLACE = frozenset(
    "append extend insert update add setdefault pop popitem remove discard clear sort "
    "reverse".split()
)
_PLAIN = (str, bytes, int, float, complex, bool, type(None))


def _literals(tree: ast.Module) -> dict[str, Any]:
    """ "NAME" (module level) or "Class.NAME" (class body, nested classes too) -> the
    value, for each name its scope binds exactly once, by an assignment of a literal,
    and that no statement of the file changes in place."""
    changed = _changed_in_place(tree)
    out: dict[str, Any] = {}
    scopes: list[tuple[str, list[ast.stmt]]] = [("", tree.body)]
    while scopes:
        prefix, body = scopes.pop()
        bound: dict[str, int] = {}
        for node in _scope_nodes(body):
            for name in _binds(node):
                bound[name] = bound.get(name, 0) + 1
            if isinstance(node, ast.ClassDef):
                scopes.append((f"{prefix}{node.name}.", node.body))
        for node in body:
            target, value = _assigned(node)
            if target is None or bound.get(target) != 1 or target in changed:
                continue
            try:
                out[prefix + target] = ast.literal_eval(value)  # type: ignore[arg-type]
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                continue
    return out


def _changed_in_place(tree: ast.Module) -> set[str]:
    """Names the file may change without assigning them: `global X`, `X += ...`,
    `X[k] = ...`, `self.X.append(...)` (by the last name before the change)."""
    changed: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            changed.update(node.names)
        elif isinstance(node, ast.AugAssign):
            changed.add(_base(node.target))
        elif isinstance(node, (ast.Subscript, ast.Attribute)) and isinstance(
            node.ctx, (ast.Store, ast.Del)
        ):
            changed.add(_base(node))  # `cls.X = ...` rebinds X; `X[k] = ...` changes it
            changed.add(_base(node.value))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in IN_PLACE
        ):
            changed.add(_base(node.func.value))
    return changed


def _scope_nodes(body: list[ast.stmt]) -> Iterator[ast.AST]:
    """The nodes of a scope's statements, not those of the functions, classes and
    lambdas it defines (their own scopes), whose names it binds."""
    todo: list[ast.AST] = list(body)
    while todo:
        node = todo.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            todo.extend(ast.iter_child_nodes(node))


def _binds(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
        return [node.id]
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return [(a.asname or a.name).split(".")[0] for a in node.names]
    return []


def _assigned(node: ast.stmt) -> tuple[str | None, ast.expr | None]:
    if isinstance(node, ast.Assign) and len(node.targets) == 1:
        target = node.targets[0]
        if isinstance(target, ast.Name):
            return target.id, node.value
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value:
        return node.target.id, node.value
    return None, None


def _base(node: ast.expr) -> str:
    """The name a change reaches: `x` of `x[0]`, `NAME` of `self.NAME[k]`."""
    while isinstance(node, ast.Subscript):
        node = node.value
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else ""


def _plain(value: Any) -> bool:
    """Data a literal can give (not, say, an Enum member its class made of a literal)."""
    if isinstance(value, (list, tuple, set, frozenset)) and type(value) in (
        list,
        tuple,
        set,
        frozenset,
    ):
        return all(map(_plain, value))
    if type(value) is dict:
        return all(_plain(k) and _plain(v) for k, v in value.items())
    return type(value) in _PLAIN


def _equal(a: Any, b: Any) -> bool:
    """Equal and of the same types throughout (1, 1.0 and True differ; NaN is NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(_equal, a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(v, b[k]) for k, v in a.items())
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return bool(a == b)


def _same(a: types.CodeType, b: types.CodeType) -> bool:
    """The same code, line numbers aside."""
    if (
        a.co_code != b.co_code
        or a.co_names != b.co_names
        or a.co_varnames != b.co_varnames
        or a.co_freevars != b.co_freevars
        or a.co_cellvars != b.co_cellvars
        or a.co_flags != b.co_flags
        or (a.co_argcount, a.co_posonlyargcount, a.co_kwonlyargcount)
        != (b.co_argcount, b.co_posonlyargcount, b.co_kwonlyargcount)
        or len(a.co_consts) != len(b.co_consts)
    ):
        return False
    for x, y in zip(a.co_consts, b.co_consts, strict=True):
        if isinstance(x, types.CodeType) and isinstance(y, types.CodeType):
            if not _same(x, y):
                return False
        elif type(x) is not type(y) or x != y:
            return False
    return True
