"""What `cas run` and `cas resume` run: a Python file (optionally FILE:NAME), a module
attribute, a pipeline.yaml, or for library runs the pipeline.yaml stored with the run."""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING

from castore.errors import ConfigError
from castore.pipeline.pipeline import Pipeline, load_file_module, pipelines_in
from castore.store.manifests import RunManifest, Target

if TYPE_CHECKING:
    from castore.store import Store


def load_target(
    target: Target, store: Store | None = None, manifest: RunManifest | None = None
) -> Pipeline:
    """The Pipeline a target names: a file (optionally `:attr`), a module attribute, a
    pipeline.yaml, or, for library runs, the pipeline.yaml stored with the run."""
    if target.kind == "yaml":
        if not target.path or not os.path.exists(target.path):
            raise ConfigError(f"the run's pipeline.yaml {target.path} is gone")
        return Pipeline.from_yaml(target.path, store)
    if target.kind == "api":
        if store is None or manifest is None or manifest.pipeline_yaml is None:
            raise ConfigError("the run was started from Python and has no stored pipeline.yaml")
        return Pipeline.from_yaml(store.get_bytes(manifest.pipeline_yaml).decode(), store)
    if target.kind == "file":
        if not target.path or not os.path.exists(target.path):
            raise ConfigError(f"the run's target file {target.path} is gone")
        module = load_file_module(target.path)
    else:
        try:
            module = importlib.import_module(target.path or "")
        except ImportError as e:
            raise ConfigError(f"cannot import {target.path}: {e}") from None
    if target.attr:
        obj = getattr(module, target.attr, None)
        if not isinstance(obj, Pipeline):
            raise ConfigError(f"{target.path} has no Pipeline named {target.attr!r}")
        return obj
    found = list(pipelines_in(module))
    if len(found) != 1:
        names = ", ".join(n for n, _ in found) or "none"
        raise ConfigError(
            f"{target.path} defines {len(found)} pipelines ({names}); name one as FILE:NAME"
        )
    return found[0][1]


def parse_target(spec: str) -> Target:
    """`file.py`, `file.py:name`, `package.module:name` or `pipeline.yaml`."""
    path, _, attr = spec.partition(":") if not os.path.exists(spec) else (spec, "", "")
    if path.endswith((".yaml", ".yml")):
        if not os.path.isfile(path):
            raise ConfigError(f"{path} does not exist")
        return Target(kind="yaml", path=os.path.abspath(path), cwd=os.getcwd())
    if path.endswith(".py") or os.sep in path:
        if not os.path.isfile(path):
            raise ConfigError(f"{path} does not exist")
        return Target(kind="file", path=os.path.abspath(path), attr=attr or None, cwd=os.getcwd())
    return Target(kind="module", path=path, attr=attr or None, cwd=os.getcwd())
