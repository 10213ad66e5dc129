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
import inspect
import itertools
import logging
import os
import re
import sys
import textwrap
import types
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from castore import loaded
from castore.filereads import import_reads
from castore.hashing import hash_json, source_digest
from castore.usercode import (
    cell_digest,
    chains_read,
    const_digest,
    is_user_module,
    loaded_digest,
    made_by,
    module_of,
    without_source,
)

# Followed items of one step: "kind name" -> digest, e.g. "function helpers.clean".
Parts = dict[str, str]

_LOAD_GLOBAL = {"LOAD_GLOBAL", "LOAD_NAME"}
_LOAD_ATTR = {"LOAD_ATTR", "LOAD_METHOD"}
_CALL = {"PRECALL", "CALL", "KW_NAMES", "CACHE"}
_MAX_ITEMS = 2000  # a walk that reaches more than this is a sign of following a library


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


Refs = tuple[list[list[str]], list[str], list[tuple[list[str], str | tuple[str]]]]


def _references(func: types.FunctionType) -> Refs:
    """(global chains, self attributes, named reads): `mod.helper.x` as ["mod", "helper",
    "x"], the names read as `self.name` (self = the first argument), and each chain that
    may be an environment read (`os.environ.get`, `os.getenv`...) with the constant it is
    given (`"X"`, or `(NAME,)` for a global). One pass over the bytecode: a second one
    per reached function doubled a warm code version (bench_fingerprint)."""
    chains: list[list[str]] = []
    self_attrs: list[str] = []
    named: list[tuple[list[str], str | tuple[str]]] = []
    first_arg = func.__code__.co_varnames[0] if func.__code__.co_argcount else None
    for code in _code_objects(func.__code__):
        chain: list[str] | None = None
        on_self = typed = False  # typed: `type(self)` is being called
        for ins in dis.get_instructions(code):
            if (typed or chain == ["super"]) and ins.opname in _CALL:
                continue  # to the attribute read from `type(self)` or `super()`
            if ins.opname in _LOAD_GLOBAL:
                if chain is not None and chain[-1] in _ENV_ENDS:
                    named.append((chain, (str(ins.argval),)))
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
                if chain is not None and chain[-1] in _ENV_ENDS and isinstance(ins.argval, str):
                    if ins.opname == "LOAD_CONST":
                        named.append((chain, ins.argval))
                loads = first_arg is not None and ins.argval == first_arg
                loads = loads and _loads_self(
                    code is func.__code__, ins.opname, first_arg in code.co_freevars
                )
                typed = loads and chain == ["type"]
                on_self = loads and not typed
                chain = None
    return chains, self_attrs, named


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
    defaults = [*node.args.defaults, *(d for d in node.args.kw_defaults if d)]
    return chains_read([n for d in defaults for n in ast.walk(d)])


def _changed_cells(func: types.FunctionType) -> set[str]:
    """Free variables `func` (or code nested in it) changes in place (`seen.append(x)`):
    keyed by value, they would give each run another key."""
    out: set[str] = set()
    for code in _code_objects(func.__code__):
        cell = None
        for ins in dis.get_instructions(code):
            if ins.opname in _LOAD_ATTR and cell is not None and ins.argval in loaded.IN_PLACE:
                out.add(cell)
            cell = str(ins.argval) if ins.opname == "LOAD_DEREF" else None
    return out


# Names of variables that hold credentials: they select who pays, not what is computed,
# and a secret must never reach a hash (a stored digest of a short one can be guessed).
_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASS|CREDENTIAL|AUTH|COOKIE|SESSION|PRIVATE|CERT")


_ENV_ENDS = ("environ", "get", "getenv")


def _env_name(g: dict[str, Any], chain: list[str], given: str | tuple[str]) -> str | None:
    """The variable an environment read names (`os.environ["X"]`, `os.environ.get("X",
    ...)`, `os.getenv("X")`, with `environ` or `getenv` imported from os too, and the
    name written or held by a module-level string), else None."""
    target: Any = g.get(chain[0])
    for attr in chain[1:]:
        target = getattr(target, attr, None)
    reads = (
        target is os.environ
        or target is os.getenv
        or (getattr(target, "__self__", None) is os.environ and chain[-1] == "get")
    )
    if not reads:
        return None
    name = g.get(given[0]) if isinstance(given, tuple) else given
    return name if isinstance(name, str) else None


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
        self.made: set[tuple[int, str]] = set()  # (module, name) whose reads are followed

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
            if not without_source(cls):
                return
            whole = False
        for name, value in vars(cls).items():
            func = _as_function(value)
            if func is not None and not is_user_module(module_of(func)):
                continue  # pydantic's model_post_init, set on the class: not the user's
            if func is not None and whole:
                self.seen.add(id(func))  # its text is in the class digest already
                self._function_refs(func, cls)
            elif func is not None:
                self.visit(func, cls)
            elif not whole and not name.startswith("__"):
                self.add(f"constant {_qualname(cls)}.{name}", loaded_digest(value))

    def _function_refs(
        self, func: types.FunctionType, owner: type | None, defaults: bool = True
    ) -> None:
        chains, self_attrs, named = _references(func)
        if defaults:
            chains += _default_chains(func)
        for chain in chains:
            if chain[0] == "super" and len(chain) > 1 and owner is not None:
                self._inherited(owner, chain[1])
                continue
            self._resolve(func.__globals__, chain)
        self._environment(func, named)
        changed = _changed_cells(func) if func.__closure__ else set()
        for name, cell in zip(func.__code__.co_freevars, func.__closure__ or (), strict=False):
            if name in changed:
                continue  # state the step keeps (a list it appends to), not configuration
            try:
                self._value(name, cell.cell_contents, ())
            except ValueError:  # an empty cell
                continue
        if owner is not None and is_user_module(module_of(owner)):
            for name in self_attrs:
                method = _as_function(inspect.getattr_static(owner, name, None))
                if method is None:
                    self._class_attribute(owner, name)
                elif is_user_module(module_of(method)):
                    self.visit(method, owner)

    def _environment(
        self, func: types.FunctionType, named: list[tuple[list[str], str | tuple[str]]]
    ) -> None:
        """Environment variables read by a constant name: their values, as a constant's
        (not a credential's: a secret never reaches a hash)."""
        for chain, given in named:
            name = _env_name(func.__globals__, chain, given)
            if name is not None and not _SECRET_NAME.search(name.upper()):
                self.add(f"environment variable {name}", hash_json(os.environ.get(name)))

    def _inherited(self, owner: type, name: str) -> None:
        """`super().name`: every definition of `name` in the user's classes `owner`
        inherits from (which one runs depends on the class the call is made in)."""
        for klass in owner.__mro__[1:]:
            func = _as_function(vars(klass).get(name))
            if func is not None and is_user_module(module_of(func)):
                self.visit(func, owner)

    def _class_attribute(self, owner: type, name: str) -> None:
        """`self.NAME` that is no method: a class constant of a user class (by value; a
        list, dict or set by the class-body code that assigns it), a nested class. An
        instance attribute (a pydantic field: hashed as a param) is in no class."""
        klass = next((k for k in owner.__mro__ if name in vars(k)), None)
        if klass is None or not is_user_module(module_of(klass)):
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
            if is_user_module(module_of(value)):
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
            return self._made_by(where, name, value)
        digest = const_digest(value)
        if digest is None and not isinstance(value, _NEUTRAL):
            # An object (a compiled pattern, a template, a client, a partial): keyed by
            # the code that makes it, and by its class when that is the user's.
            if is_user_module(module_of(type(value))):
                self.visit(type(value), type(value))
            digest = self._made_by(where, name, value)
        return digest

    def _made_by(self, where: types.ModuleType | type | None, name: str, value: Any) -> str | None:
        """The statements that make `value`: in its file (with what they read, followed
        as a function's globals are), else in the last notebook cell that assigns it; a
        closure's cell (a step factory's argument) or a notebook without history has
        none, so the value as it is."""
        if where is None:
            return loaded_digest(value)
        if without_source(where):
            return cell_digest(where, name) or loaded_digest(value)
        made = made_by(where, name)
        if made is None:
            return None
        if made.module is not None and (id(made.module), name) not in self.made:
            self.made.add((id(made.module), name))
            for chain in made.reads:
                self._resolve(vars(made.module), chain)
        if not made.computed:
            # A literal (`COUNTS = {}`, `LABELS = ["a"]`): its statements say it all, and
            # a registry or counter the run itself fills keeps its key.
            return made.digest
        # Made by a call (`PROMPTS = json.load(open("prompts.json"))`): the value, as it
        # was when first hashed in this process (what this loaded version of the module
        # made; a reload makes another).
        first = _first_value(where, name, value)
        if first is None and made.module is not None:
            # An object with no value to hash (`T = env.get_template("a.j2")`): the
            # contents of the files its statements read as the module was imported.
            files = import_reads(made.module, made.lines)
            if files:
                return hash_json([made.digest, None, files])
        return hash_json([made.digest, first])


def _first_value(where: types.ModuleType | type, name: str, value: Any) -> str | None:
    """const_digest of a module's (or class's) value made by a call, the first time it
    is hashed in this process for this loaded version (a module's spec, which a reload
    replaces; a class object): stable while the run changes it, new after a reload."""
    holder = getattr(where, "__spec__", None) if isinstance(where, types.ModuleType) else None
    return loaded.value_once(holder or where, f"value {name}", lambda: const_digest(value))


# Objects that do not change what a step returns: not keyed by their assignment, so
# steps that log keep their keys.
_NEUTRAL = (logging.Logger, logging.LoggerAdapter)


def _unwrapped(value: Any) -> Any:
    """The function a wrapper made with functools.wraps (functools.cache's too) calls."""
    if not callable(value) or isinstance(value, types.FunctionType):
        return value
    try:
        return inspect.unwrap(value)
    except ValueError:  # a cycle of __wrapped__
        return value


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
    return [c for c in cls.__mro__ if is_user_module(module_of(c))]


def _code_parts(
    func: Callable[..., Any],
    owner: type | None,
    packages: Iterable[str],
    classes: Iterable[type | types.FunctionType],
) -> tuple[str, Parts]:
    func = inspect.unwrap(func)
    root = loaded.function_digest(func)  # raises OSError without source, as before
    walk = _Walk()
    if isinstance(func, types.FunctionType) and is_user_module(module_of(func)):
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
