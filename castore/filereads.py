"""Files read through Python's `open`: a step's while it computes, and a user module's as
it is imported (docs/caching.md "Files a step reads").

Their contents decide its rows, so the cache key must follow them: a step lists them in
`code_files` (their contents then enter its code version) or, when they cannot change
its rows (a credential, a cache of its own), in `ignore_files`. Any other file the step's
code opens for reading while castore runs its `load()` or `process` stops the run with
one line saying so, before a row made from it is cached: a key that misses an input
serves the old rows after the file is edited, which is worse than no cache.

Reads are seen through Python's audit hook ("open" events) on the thread computing the
batch. A file counts when the step's own code opens it (the first frame outside the
standard library is the user's code, castore/usercode.py), wherever it is; and when a
library the step's code calls opens it (a jinja2 FileSystemLoader, pandas.read_csv)
and it is inside the working directory, outside hidden folders: a library's own files
elsewhere (a tokenizer's cache in ~/.cache, ~/.netrc, an installed package's data) are
not the step's inputs; nor are castore's own reads, imports, and the interpreter's and
the system's data (source lines for a traceback, time zones, /etc). A SQLite database
counts as read when `sqlite3.connect` opens it (its audit event), and a file pyarrow's
readers open by path as they are called (castore.arrowfiles). A file opened by other C
code without Python's `open`, or in a subprocess, is not seen.

As a user module is imported (after castore's step module, which installs the hook), the
files its top-level statements read are recorded by statement line with their stat,
judged as a step's reads are: an object made from them (a jinja2 template), which has no
value to hash, is keyed by the contents they had then (castore.fingerprint), and refused
once a file has changed.
"""

from __future__ import annotations

import functools
import glob
import os
import sys
import sysconfig
import threading
import urllib.parse
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from castore.errors import PipelineError, StepFailed
from castore.hashing import local_digest, local_stamp, stamped_digest
from castore.usercode import is_user_file

if TYPE_CHECKING:
    from castore.pipeline.step import _Step


def file_parts(step: str | None, patterns: Iterable[str]) -> dict[str, str]:
    """{"file <path>": digest} of every file the `code_files` patterns match (globs,
    relative to the working directory as `open` takes them; `**` spans folders). A
    pattern that matches no file is an error: a key that names nothing would not follow
    the file the step reads."""
    out: dict[str, str] = {}
    for pattern in patterns:
        paths = _matched(pattern)
        if not paths:
            raise PipelineError(
                f"step {step}: code_files pattern {pattern!r} matches no file (relative "
                f"paths start in the working directory, {os.getcwd()})"
            )
        for path in paths:
            out[f"file {path.replace(os.sep, '/')}"] = local_digest(path)
    return out


def _matched(pattern: str) -> list[str]:
    """The files a code_files or ignore_files pattern matches, sorted."""
    return sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))


class _Watch:
    __slots__ = ("busy", "refused", "step")

    def __init__(self, step: _Step) -> None:
        self.step = step
        self.refused: str | None = None
        self.busy = False  # while it checks a read: its own file system calls are not

    def read(self, path: str, *, by_library: bool) -> None:
        if self.busy:
            return
        self.busy = True
        try:
            real = os.path.realpath(path)
            if not _may_be_input(path, real, by_library=by_library):
                return
            step = self.step
            for pattern in (*step.code_files, *step.ignore_files):
                if any(os.path.realpath(p) == real for p in _matched(pattern)):
                    return
            refused = self.refused = (
                f"step {step.name} read {path} while computing, and its contents are not in "
                "the step's cache key (after an edit the old rows would be served): list it "
                "in the step's code_files to key the step by its contents, or in ignore_files "
                "if they cannot change the rows"
            )
        finally:
            self.busy = False
        raise StepFailed(refused)


# The system's own data (time zones read by the C zoneinfo, /etc, /proc): read for the
# interpreter, not a step's input, unless it is inside the working directory.
# (macOS: /etc is /private/etc, and /usr/share/zoneinfo links into /private/var/db.)
_SYSTEM_DIRS = (
    *("/usr/share/", "/usr/lib/", "/etc/", "/proc/", "/sys/", "/dev/", "/run/"),
    *("/System/", "/Library/", "/private/etc/", "/private/var/db/"),
)


def _may_be_input(path: str, real: str, *, by_library: bool) -> bool:
    """Whether a file read for the user's code (opened as `path`, `real` once links are
    followed) may be its input: a regular file, not one a step wrote in this process (a
    scratch file), not source code (a traceback's lines), an installed package's, or the
    system's (by the path opened or the one it links to); and when a library opened it,
    inside the project (not a library's own configuration or cache: ~/.netrc,
    ~/.cache/...)."""
    if real in _written or real.endswith((".py", ".pyc", ".pyi")) or not os.path.isfile(real):
        return False
    system = real.startswith(_SYSTEM_DIRS) or os.path.abspath(path).startswith(_SYSTEM_DIRS)
    if (system or by_library) and not _in_project(real):
        return False
    return is_user_file(real)


def _in_project(real: str) -> bool:
    """Inside the working directory and in no hidden folder (.git, .cache, .venv)."""
    parts = os.path.relpath(real, os.path.realpath(os.getcwd())).split(os.sep)
    return not any(p.startswith(".") for p in parts)  # `..` first: outside it


_local = threading.local()
# Files steps' code wrote in this process (read back, a scratch file is not an input),
# the latest _WRITTEN_MAX: a step writing a new file per batch must not grow it forever,
# and a scratch file is read back soon after it is written.
_written: dict[str, None] = {}
_WRITTEN_MAX = 10_000
_written_lock = threading.Lock()


def _wrote(path: str) -> None:
    real = os.path.realpath(path)
    with _written_lock:
        _written.pop(real, None)
        _written[real] = None
        if len(_written) > _WRITTEN_MAX:
            del _written[next(iter(_written))]


_hooked = False
_hook_lock = threading.Lock()


class watching:
    """Refuse a file the step's own code reads in this block that is neither in its
    code_files nor in its ignore_files: the open raises, and so does the block's end,
    should the step's code have caught that. A class, not a generator: it is entered
    for every batch."""

    __slots__ = ("outer", "watch")

    def __init__(self, step: _Step) -> None:
        # (the hook is installed: castore.pipeline.step, which made `step`, installs it)
        self.watch = _Watch(step)
        self.outer: _Watch | None = None

    def __enter__(self) -> None:
        self.outer = getattr(_local, "watch", None)
        _local.watch = self.watch

    def __exit__(self, kind: object, *_: object) -> None:
        _local.watch = self.outer
        if kind is None and self.watch.refused is not None:
            raise StepFailed(self.watch.refused)


def install() -> None:
    """Watch opens from now on (for the life of the process: hooks cannot be removed).
    castore's step module calls it as it is imported, so that the user modules imported
    after it are seen as they are imported."""
    global _hooked
    if _hooked:
        return
    with _hook_lock:
        if not _hooked:
            sys.addaudithook(_hook)
            _hooked = True


def _modules_being_imported() -> dict[str, Any]:
    """importlib's per-module import locks: an entry lives while its module is being
    imported (a weak reference dropped as the import ends), so the dict is empty between
    imports. Not a public API: without it, every open is looked at."""
    import importlib._bootstrap as bootstrap

    locks = getattr(bootstrap, "_module_locks", None)
    return locks if isinstance(locks, dict) else {"?": None}


_IMPORTING = _modules_being_imported()
_READ_MODES = frozenset(("r", "rt", "rb", "br", "tr"))
_WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _hook(event: str, args: tuple[Any, ...]) -> None:
    # Called for every audit event of the process: the first test must stay this cheap.
    if event != "open":
        if event == "sqlite3.connect":
            _sqlite(args[0])
        return
    watch = getattr(_local, "watch", None)
    if watch is None and not _IMPORTING:  # castore's store reads pay nothing more
        return
    path, mode, flags = args
    if not isinstance(path, (str, bytes, os.PathLike)):
        return  # a file descriptor
    if watch is None and mode not in _READ_MODES:
        return  # as a module is imported: what `open` reads
    writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
        mode is None and isinstance(flags, int) and bool(flags & _WRITES)
    )
    _opened(watch, os.fsdecode(path), sys._getframe(1), writes=writes)


def _sqlite(database: Any) -> None:
    """`sqlite3.connect(database)`: the C library reads the file without Python's `open`,
    so the connect stands for the read (a lookup table kept in SQLite is an input like a
    JSON file); a database the step creates is its own, as a file it writes."""
    path = _sqlite_path(database)
    if path is None:
        return
    watch = getattr(_local, "watch", None)
    if watch is None and not _IMPORTING:
        return
    _opened(watch, path, sys._getframe(2), writes=not os.path.exists(path))


def _opened(watch: _Watch | None, path: str, frame: Any, *, writes: bool) -> None:
    """A file opened at `frame` (the caller of `open` or `sqlite3.connect`): as a module
    is imported (no watch), a read is recorded for its statement; while a step computes,
    a file it writes is its own when read back (a scratch file), and a read is judged."""
    if watch is None:
        if not writes:
            _at_import(frame, path)
        return
    if watch.busy:
        return
    if writes:
        _wrote(path)
        return
    opener = _opener(frame, at_import=False)
    if opener is not None:
        watch.read(path, by_library=opener[0])


def _sqlite_path(database: Any) -> str | None:
    """The file a sqlite3 database name opens, or None (in memory, or not a name)."""
    if not isinstance(database, (str, bytes, os.PathLike)):
        return None
    name = os.fsdecode(database)
    if name.startswith("file:") and not os.path.exists(name):  # a URI (uri=True)
        uri = urllib.parse.urlsplit(name)
        if "mode=memory" in uri.query:
            return None
        name = urllib.parse.unquote(uri.path)
    return None if name in ("", ":memory:") else name


# Files read by the top-level statements of user modules as they were imported: module
# name -> (the module's spec as it ran: a reload makes another, [(line, path as opened,
# real path, local_stamp)]).
_imports: dict[str, tuple[object, list[tuple[int, str, str, tuple[int, ...]]]]] = {}
_imports_lock = threading.Lock()


def _at_import(frame: Any, path: str) -> None:
    """Record a read made by a user module's top-level statement (or what it calls), as
    a step's read is judged: the user's own open anywhere, a library's in the project."""
    opener = _opener(frame, at_import=True)
    if opener is None:
        return
    by_library, module = opener
    if not module.f_globals.get("__file__"):
        return  # a notebook's cell: its values are keyed as they are
    real = os.path.realpath(path)
    try:
        if not _may_be_input(path, real, by_library=by_library):
            return
        stamp = local_stamp(real)
    except OSError:
        return
    name, spec = module.f_globals.get("__name__"), module.f_globals.get("__spec__")
    with _imports_lock:
        held = _imports.get(name)
        if held is None or held[0] is not spec:
            held = _imports[name] = (spec, [])
        held[1].append((module.f_lineno, path, real, stamp))


def import_reads(module: Any, lines: Iterable[tuple[int, int]]) -> dict[str, str]:
    """{"file <path>": digest} of the files `module`'s statements on `lines` (first,
    last) read as it was imported, with the contents they had then: a file changed since
    is refused, since what the module made from it is not what the file now holds."""
    held = _imports.get(getattr(module, "__name__", ""))
    if held is None or held[0] is not getattr(module, "__spec__", None):
        return {}
    spans = list(lines)
    out: dict[str, str] = {}
    for line, path, real, stamp in list(held[1]):
        if not any(lo <= line <= hi for lo, hi in spans):
            continue
        try:
            same = local_stamp(real) == stamp
        except OSError:
            same = False
        if not same:
            raise PipelineError(
                f"{module.__name__}: {path} was read as the module was imported and has "
                "changed since; reload the module (importlib.reload) or restart the process"
            )
        out[f"file {path}"] = stamped_digest(real, stamp)
    return out


def _opener(frame: Any, *, at_import: bool) -> tuple[bool, Any] | None:
    """Whom a file is opened for, walking out from the frame that opens it: (whether a
    third-party package opened it rather than the user's code itself, the user's frame:
    the first one, or with `at_import` the module frame whose top-level statement runs),
    or None (castore, the import system or the interpreter opened it, or no user code
    did)."""
    by_library = False
    while frame is not None:
        kind = _kind(frame.f_code.co_filename, frame.f_globals.get("__name__") or "")
        if kind in ("castore", "import"):
            return None
        if kind == "user" and (not at_import or frame.f_code.co_name == "<module>"):
            return by_library, frame
        by_library = by_library or kind == "other"
        frame = frame.f_back
    return None


# Standard-library modules that read the interpreter's or the system's own data (source
# lines for a traceback, time zones, locales, MIME types): not the step's inputs.
_SYSTEM = frozenset(
    "ctypes encodings gettext inspect linecache locale mimetypes netrc platform site ssl "
    "sysconfig tokenize traceback uuid zoneinfo _strptime".split()
)


@functools.cache
def _kind(filename: str, module: str) -> str:
    """ "user", "stdlib", "castore", "import" (the import system and _SYSTEM: not a
    read of the step's) or "other" (a third-party package)."""
    if module == "castore" or module.startswith("castore."):
        return "castore"
    # <frozen importlib._bootstrap...>: an import reading a module is not a read.
    if module.partition(".")[0] in _SYSTEM or (
        filename.startswith("<") and "importlib" in filename
    ):
        return "import"
    if filename.startswith("<"):
        return "user" if module == "__main__" else "stdlib"  # a notebook's cell, or exec
    real = os.path.realpath(filename)
    parts = real.split(os.sep)
    if "site-packages" in parts or "dist-packages" in parts:  # inside the stdlib's folder too
        return "other"
    if any(real.startswith(root + os.sep) for root in _stdlib_roots()):
        return "stdlib"
    return "user" if is_user_file(real) else "other"


@functools.cache
def _stdlib_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    return tuple({os.path.realpath(paths[k]) for k in ("stdlib", "platstdlib") if paths.get(k)})
