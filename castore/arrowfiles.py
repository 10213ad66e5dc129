"""Files pyarrow's readers and writers open by path (and so `pandas.read_parquet`,
`DataFrame.to_parquet`): pyarrow opens them in C++, where Python's audit hook does not
see them, so a step reading a lookup table with `pq.read_table` would be keyed without
it and serve the old rows after an edit. Its entry points that take a path are wrapped
to report the path as Python's `open` would (castore.filereads judges it: code_files,
ignore_files, scratch files, refusal).

Wrapped: `pyarrow.parquet`'s ParquetFile, ParquetDataset and ParquetWriter (every
Parquet read and write by path goes through one of them: read_table, read_metadata,
read_schema, write_table, pandas' engine), `pyarrow.csv`'s read_csv, open_csv and
write_csv, `pyarrow.json`'s read_json and open_json, `pyarrow.feather`'s read_table,
read_feather and write_feather, and `pyarrow.dataset`'s dataset and write_dataset. They are
module attributes, looked up at each call (`pq.read_table`, pandas'
`pyarrow.parquet.read_table`), so wrapping the attribute is seen by every caller that did
not bind the function before castore was imported. A module is wrapped as it finishes
importing (a meta path finder: pyarrow.dataset alone takes 0.3 s to import, so none is
imported for this), or at once when it already was.

Not seen: pyarrow's file objects (`pa.memory_map`, `pa.OSFile`, `pa.input_stream`),
`pyarrow.ipc` and `pyarrow.orc`, and a function bound before castore was imported.
"""

from __future__ import annotations

import functools
import importlib.abc
import os
import sys
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from castore import filereads
from castore.hashing import local_stamp

# module -> {attribute (a function, or Class.__init__): (reads or writes, position of
# the path argument counting `self`, its keyword)}
_WRAPPED: dict[str, dict[str, tuple[str, int, str]]] = {
    "pyarrow.parquet.core": {
        "ParquetFile.__init__": ("r", 1, "source"),
        "ParquetDataset.__init__": ("r", 1, "path_or_paths"),
        "ParquetWriter.__init__": ("w", 1, "where"),
    },
    "pyarrow.csv": {
        "read_csv": ("r", 0, "input_file"),
        "open_csv": ("r", 0, "input_file"),
        "write_csv": ("w", 1, "output_file"),
    },
    "pyarrow.json": {
        "read_json": ("r", 0, "input_file"),
        "open_json": ("r", 0, "input_file"),
    },
    "pyarrow.feather": {
        "read_table": ("r", 0, "source"),
        "read_feather": ("r", 0, "source"),
        "write_feather": ("w", 1, "dest"),
    },
    "pyarrow.dataset": {
        "dataset": ("r", 0, "source"),
        "write_dataset": ("w", 1, "base_dir"),
    },
}
_done: set[str] = set()


def install() -> None:
    """Wrap the modules already imported, and the others as they are imported."""
    for name in _WRAPPED:
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__spec__", None) is not None:
            _wrap(module)
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


class _Finder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: hands one of the modules above the spec the other finders
    give, with a loader that wraps the module once it has run."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name not in _WRAPPED or name in _done:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(name, path, target)
            if spec is not None:
                if hasattr(spec.loader, "exec_module"):
                    spec.loader = _Wrapping(spec.loader)
                return spec
        return None


class _Wrapping(importlib.abc.Loader):
    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.loader.exec_module(module)
        _wrap(module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_code, is_package, ...
        return getattr(self.loader, name)


def _wrap(module: Any) -> None:
    if module.__name__ in _done:
        return
    _done.add(module.__name__)
    for attr, how in _WRAPPED[module.__name__].items():
        owner, _, name = attr.rpartition(".")
        target = getattr(module, owner, None) if owner else module
        fn = getattr(target, name, None)  # another pyarrow may lack one: not wrapped
        if fn is not None and not getattr(fn, "_castore_wrapped", False):
            wrapped = _wrapper(fn, *how)
            if not owner:
                # Pickled by reference as the attribute it now is (`pool.map(read_csv,
                # ...)`): pickle refuses a function its module does not hold under its name.
                wrapped.__module__, wrapped.__qualname__ = module.__name__, name
            setattr(target, name, wrapped)


def _wrapper(fn: Callable[..., Any], kind: str, pos: int, keyword: str) -> Callable[..., Any]:
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        local = filereads._local
        watch = getattr(local, "watch", None)
        # The first test is all that castore's own reads of its store pay; a call made by
        # a wrapped one (read_table's ParquetDataset) was reported by the outer one.
        if (watch is None and not filereads._IMPORTING) or getattr(local, "arrow", False):
            return fn(*args, **kwargs)
        source = args[pos] if len(args) > pos else kwargs.get(keyword)
        frame = _caller(sys._getframe(1))
        local.arrow = True
        try:
            if kind == "r":
                for path, _named in _files(source):
                    filereads._opened(watch, path, frame, writes=False)
                return fn(*args, **kwargs)
            # What the call writes is the step's own (read back, a scratch file): a file
            # named, whatever its stamp; in a folder named, only the files it added or
            # changed (the others may be inputs).
            before = {p: _stamp(p) for p, named in _files(source) if not named}
            try:
                return fn(*args, **kwargs)
            finally:
                for path, named in _files(source):
                    if named or path not in before or before[path] != _stamp(path):
                        filereads._opened(watch, path, frame, writes=True)
        finally:
            local.arrow = False

    call._castore_wrapped = True  # type: ignore[attr-defined]
    return call


def _caller(frame: Any) -> Any:
    """The first frame outside pyarrow: the user's code calling `pq.read_table` opens the
    file itself (a read anywhere counts), pandas calling it is a library's read."""
    while frame is not None and (frame.f_globals.get("__name__") or "").startswith("pyarrow"):
        frame = frame.f_back
    return frame


def _files(source: Any) -> Iterator[tuple[str, bool]]:
    """(path, whether `source` names it itself) of the local files a path argument names:
    itself, each of a list, and for a folder the files pyarrow reads in it (not hidden,
    not starting with `_`). Buffers and file objects name none (a Python file object was
    seen as it was opened), nor do URLs other than file://."""
    items: Sequence[Any] = source if isinstance(source, (list, tuple)) else [source]
    for item in items:
        if not isinstance(item, (str, bytes, os.PathLike)):
            continue
        path = os.fsdecode(item)
        if path.startswith("file://"):  # pyarrow's parquet and dataset readers take these
            path = urllib.parse.unquote(urllib.parse.urlsplit(path).path)
        elif "://" in path:
            continue  # another filesystem: not a file here
        if not os.path.isdir(path):
            yield path, True
            continue
        for root, dirs, names in os.walk(path):
            dirs[:] = [d for d in dirs if not d.startswith((".", "_"))]
            for n in names:
                if not n.startswith((".", "_")):
                    yield os.path.join(root, n), False


def _stamp(path: str) -> tuple[int, ...] | None:
    """What a write to `path` changes, or None when it is absent: a write is seen as a
    stamp that changed (file timestamps lag the clock, so not by time)."""
    try:
        return local_stamp(path)
    except OSError:
        return None
