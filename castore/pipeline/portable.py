"""pipeline.yaml that runs on another machine: paths it records are relative to the
project, the folder the run was started in.

A custom step's class is recorded as `module:qualname` plus the file that defines it
when that module is a script (a `cas run` target, or `__main__` of `python script.py`),
and a loader's local data path as given; both are written relative to the project
folder when they lie inside it. `cas run pipeline.yaml` started in a checkout of the same
project (anywhere, on any machine) then finds them; what lies outside the project stays
absolute, and a missing file is an error that says so.
"""

from __future__ import annotations

import os
import sys
from typing import Any

MAIN_PREFIX = "castore_main_"


def project_root() -> str:
    return os.getcwd()


def relative(path: str, root: str) -> str:
    """`path` relative to `root` when it is a local path inside it, else unchanged."""
    if "://" in path or not os.path.isabs(path):
        return path
    rel = os.path.relpath(path, root)
    return path if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel


def step_file(cls: type) -> str | None:
    """The script that defines `cls`, when its module is a script (not importable by
    name elsewhere)."""
    module = sys.modules.get(cls.__module__)
    source = getattr(module, "__castore_source__", None)
    if source is None and cls.__module__ == "__main__":
        source = getattr(module, "__file__", None)
    return os.path.abspath(source) if source else None


def portable_params(step: Any, params: dict[str, Any], root: str) -> dict[str, Any]:
    """The step's params with its path fields made relative to the project."""
    out = dict(params)
    for name in getattr(step, "path_fields", ()):
        value = out.get(name)
        if isinstance(value, str):
            out[name] = relative(os.path.abspath(os.path.expanduser(value)), root)
    return out
