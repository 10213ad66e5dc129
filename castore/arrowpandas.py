"""pyarrow imports pandas (~0.2 s) the first time it converts a Python list, only to ask
whether the list is a pandas object (its pandas shim, pyarrow/pandas-shim.pxi). Every run
that computes a batch converts lists, so each `cas run` in a new process paid for an
import castore never uses (a replay converts nothing and never did).

`spare_pandas_import()` lets the shim make that first check while pandas cannot be found
from this thread, so the shim records "no pandas", and first installs an import hook
that puts the shim right the moment anything imports pandas: asked by one of its APIs
(`compat`), the shim tries the import again and takes pandas as usual. A pandas object
cannot exist before pandas is imported, so no conversion ever sees the shim wrong (a
categorical Series still converts to a dictionary array: tests/test_startup.py). Where
the shim is not what this expects (another pyarrow), nothing is done."""

from __future__ import annotations

import contextlib
import sys
import threading
from importlib.abc import Loader, MetaPathFinder
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

_LOCK = threading.Lock()
_tried = False


def spare_pandas_import() -> None:
    """Before castore's first conversion of Python lists in this process (cheap after)."""
    global _tried
    if _tried:
        return
    with _LOCK:
        if _tried:
            return
        _tried = True
        if "pandas" in sys.modules:
            return
        import pyarrow as pa
        import pyarrow.lib

        shim = getattr(pyarrow.lib, "_pandas_api", None)
        if shim is None or not hasattr(type(shim), "compat"):
            return
        sys.meta_path.insert(0, _Watch())
        held = _HeldBack(threading.get_ident())
        sys.meta_path.insert(0, held)
        try:
            pa.array([0])  # the shim's first check, while pandas cannot be found
        finally:
            sys.meta_path.remove(held)


def _put_shim_right() -> None:
    import pyarrow.lib

    # A pandas pyarrow refuses (too old) stays unused, as pyarrow would have it.
    with contextlib.suppress(ImportError):
        pyarrow.lib._pandas_api.compat  # noqa: B018 - the shim imports pandas when asked


class _HeldBack(MetaPathFinder):
    """pandas cannot be found from one thread (others import it as usual)."""

    def __init__(self, thread: int) -> None:
        self._thread = thread

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> ModuleSpec | None:
        if name == "pandas" and threading.get_ident() == self._thread:
            raise ModuleNotFoundError("pandas held back for pyarrow's first check", name=name)
        return None


class _Watch(MetaPathFinder):
    """Finds pandas with the other finders; once it is imported, puts the shim right."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> ModuleSpec | None:
        if name != "pandas":
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or isinstance(finder, _HeldBack) or find is None:
                continue
            spec = find(name, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _ThenPutShimRight(spec.loader, self)
                return spec
        return None


class _ThenPutShimRight(Loader):
    """pandas' own loader; after it ran, the shim is put right and the hook removed."""

    def __init__(self, loader: Loader, watch: _Watch) -> None:
        self._loader = loader
        self._watch = watch

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self._loader  # pandas sees its own loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self._watch)
        _put_shim_right()
