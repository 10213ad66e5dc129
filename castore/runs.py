"""Finding runs (by name, signature prefix or run-manifest id prefix) and rebuilding the
pipeline a run was made from, for `cas resume`."""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from castore.errors import CastoreError, ConfigError, NothingToResume
from castore.store import Store, live_lock
from castore.store.manifests import RunManifest, Target, load_model

if TYPE_CHECKING:
    from castore.pipeline.pipeline import Pipeline


@dataclass(frozen=True)
class RunInfo:
    name: str
    sig: str
    oid: str
    manifest: RunManifest
    live: bool  # a process holds the run's lock right now

    @property
    def status(self) -> str:
        """The sealed status, with a run whose process died while running shown as
        'interrupted' (its last periodic seal says 'running')."""
        if self.manifest.status == "running" and not self.live:
            return "interrupted"
        return self.manifest.status


def list_runs(store: Store) -> list[RunInfo]:
    """Every ref's run, newest first; refs whose manifest is unreadable are skipped."""
    out = []
    for name, sig, oid in store.list_refs():
        try:
            man = load_model(store, oid, RunManifest)
        except CastoreError:
            continue
        live = live_lock(store.layout.run_lock_path(man.run_id)) is not None
        out.append(RunInfo(name, sig, oid, man, live))
    out.sort(key=lambda r: r.manifest.updated, reverse=True)
    return out


def resolve_run(store: Store, spec: str) -> RunInfo:
    """A run by pipeline name (its latest run), signature prefix or manifest id prefix."""
    runs = list_runs(store)
    by_name = [r for r in runs if r.name == spec]
    if by_name:
        return by_name[0]
    if len(spec) >= 4 and all(c in "0123456789abcdef" for c in spec):
        hits = {r.oid: r for r in runs if r.sig.startswith(spec) or r.oid.startswith(spec)}
        if len(hits) == 1:
            return next(iter(hits.values()))
        if len(hits) > 1:
            raise ConfigError(f"run {spec!r} is ambiguous: {len(hits)} runs match; type more")
    known = ", ".join(sorted({r.name for r in runs})) or "none"
    raise ConfigError(f"no run named or matching {spec!r} (pipelines in this store: {known})")


def latest_resumable(store: Store, name: str | None = None) -> RunInfo:
    runs = [r for r in list_runs(store) if name is None or r.name == name]
    if name is not None and not runs:
        raise NothingToResume(f"no run of pipeline {name!r} in {store.root}")
    for r in runs:
        if r.status in ("interrupted", "failed"):
            return r
    what = f"pipeline {name!r}" if name else "any pipeline"
    raise NothingToResume(f"nothing to resume: no interrupted or failed run of {what}")


def load_target(
    target: Target, store: Store | None = None, manifest: RunManifest | None = None
) -> Pipeline:
    """The Pipeline a target names: a file (optionally `:attr`), a module attribute, a
    pipeline.yaml, or, for library runs, the pipeline.yaml stored with the run."""
    from castore.pipeline.pipeline import Pipeline, load_file_module, pipelines_in

    if target.kind == "yaml":
        if not target.path or not os.path.exists(target.path):
            raise ConfigError(f"the run's pipeline.yaml {target.path} is gone")
        return Pipeline.from_yaml(target.path)
    if target.kind == "api":
        if store is None or manifest is None or manifest.pipeline_yaml is None:
            raise ConfigError("the run was started from Python and has no stored pipeline.yaml")
        return Pipeline.from_yaml(store.get_bytes(manifest.pipeline_yaml).decode())
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
