"""Finding runs: by pipeline name, signature prefix or run-manifest id prefix, with one
rule for every command. (Rebuilding a run's pipeline is castore.pipeline.targets.)"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from castore.errors import AmbiguousId, CastoreError, ConfigError, NothingToResume, UnknownObject
from castore.hashing import validate_prefix
from castore.store import Store, live_lock
from castore.store import layout as L
from castore.store.manifests import RunManifest, load_model


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


Ref = tuple[str, str, str]  # (pipeline name, signature, run manifest id)


def select_refs(
    refs: list[Ref], specs: Sequence[str], updated: Callable[[str], datetime]
) -> list[Ref]:
    """The one rule every command resolves runs by. A spec is a pipeline name (its newest
    run), or a hex prefix (at least 4 characters) of exactly one run's signature or run
    manifest id. No specs: every ref. `updated` gives a run manifest's time, and is only
    asked when a name has several runs."""
    if not specs:
        return list(refs)
    out: list[Ref] = []
    for spec in specs:
        by_name = [r for r in refs if r[0] == spec]
        if by_name:
            hit = max(by_name, key=lambda r: updated(r[2])) if len(by_name) > 1 else by_name[0]
        elif len(spec) >= 4 and all(c in "0123456789abcdef" for c in spec):
            hits = {r for r in refs if r[1].startswith(spec) or r[2].startswith(spec)}
            if len(hits) > 1:
                raise ConfigError(f"run {spec!r} is ambiguous: {len(hits)} runs match; type more")
            if not hits:
                raise _unknown(spec, refs)
            hit = hits.pop()
        else:
            raise _unknown(spec, refs)
        if hit not in out:
            out.append(hit)
    return out


def _unknown(spec: str, refs: list[Ref]) -> ConfigError:
    known = ", ".join(sorted({r[0] for r in refs})) or "none"
    return ConfigError(f"no run named or matching {spec!r} (pipelines: {known})")


def resolve_run(store: Store, spec: str) -> RunInfo:
    """A run by pipeline name (its newest run), signature prefix or run id prefix; for
    reading commands also any earlier run by its id (at least 8 hex characters), such as
    the attempts before a resume that `cas explain` names."""
    runs = {r.oid: r for r in list_runs(store)}
    refs = [(r.name, r.sig, r.oid) for r in runs.values()]
    try:
        ((_, _, oid),) = select_refs(refs, [spec], lambda o: runs[o].manifest.updated)
    except ConfigError:
        earlier = _any_run(store, spec)
        if earlier is None:
            raise
        return earlier
    return runs[oid]


def _any_run(store: Store, spec: str) -> RunInfo | None:
    """A run manifest in the store by id prefix, whether or not a ref names it."""
    if len(spec) < 8 or any(c not in "0123456789abcdef" for c in spec):
        return None
    try:
        oid = resolve(store, spec)
        man = load_model(store, oid, RunManifest)
    except CastoreError:
        return None
    live = live_lock(store.layout.run_lock_path(man.run_id)) is not None
    return RunInfo(man.name, man.signature, oid, man, live)


def attempts(store: Store, info: RunInfo) -> list[RunInfo]:
    """The attempts of a run, oldest first: the run and, before it, each earlier run of
    the same pipeline signature that stopped (interrupted or failed) and was resumed."""
    out = [info]
    prev = info.manifest.previous
    while prev is not None and store.has(prev):
        try:
            man = load_model(store, prev, RunManifest)
        except CastoreError:
            break
        if man.signature != info.sig or man.status == "finished":
            break
        out.append(RunInfo(man.name, man.signature, prev, man, False))
        prev = man.previous
    return out[::-1]


def skipped_batches(run: RunManifest) -> int:
    """Batches of the run that failed and were kept with None outputs (not cached)."""
    return sum(s.batches_failed for s in run.stats.values())


def latest_resumable(store: Store, name: str | None = None) -> RunInfo:
    runs = [r for r in list_runs(store) if name is None or r.name == name]
    if name is not None and not runs:
        raise NothingToResume(f"no run of pipeline {name!r} in {store.root}")
    newest: set[str] = set()
    for r in runs:
        if r.status in ("interrupted", "failed", "waiting"):
            return r
        # A pipeline's newest run that finished with batches skipped (on_error="skip"):
        # their rows are None and not cached, work still to do.
        if r.name not in newest and r.status == "finished" and skipped_batches(r.manifest):
            return r
        newest.add(r.name)
    what = f"pipeline {name!r}" if name else "any pipeline"
    raise NothingToResume(
        f"nothing to resume: no interrupted, failed or waiting run of {what}, nor a newest "
        "run with failed batches"
    )


def resolve(store: Store, prefix: str) -> str:
    """An object's full id from a unique prefix of >= 8 hex chars (or a full id)."""
    validate_prefix(prefix)
    if len(prefix) == 64:
        return prefix
    try:
        names = os.listdir(os.path.join(store.layout.dir(L.OBJECTS), prefix[:2]))
    except FileNotFoundError:
        names = []
    found = [prefix[:2] + n for n in names if (prefix[:2] + n).startswith(prefix)]
    found = [f for f in found if L.path_to_oid(f[:2], f[2:])]
    if not found:
        raise UnknownObject(f"no object matches {prefix!r}")
    if len(found) > 1:
        raise AmbiguousId(f"{prefix!r} is ambiguous: matches {len(found)} ids; type more")
    return found[0]


def step_table(store: Store, info: RunInfo) -> list[dict[str, Any]]:
    """Per step of a run, in pipeline order: its class, batches and rows as stored, and
    the run's accounting (what `cas show` and `cas report` print)."""
    from castore.store.manifests import StepManifest, StepStats

    out: list[dict[str, Any]] = []
    for ref in info.manifest.steps:
        sm = load_model(store, ref.manifest, StepManifest)
        st = info.manifest.stats.get(ref.name) or StepStats()
        out.append(
            {
                "name": ref.name,
                "class": sm.step_class,
                "batches_done": len(sm.batches),
                "batches_total": st.batches_total,
                "batches_cached": st.batches_cached,
                "batches_computed": st.batches_computed,
                "batches_failed": st.batches_failed,
                "rows": sm.rows,
                "columns": [c for c, _ in sm.columns],
                "complete": sm.complete,
                "rows_cached": st.rows_cached,
                "rows_computed": st.rows_computed,
                "rows_reused": st.rows_reused,
                "compute_seconds": st.compute_seconds,
                "seconds_saved": st.seconds_saved,
                "tokens_spent": st.tokens_spent,
                "tokens_saved": st.tokens_saved,
                "cost_spent_usd": st.cost_spent_usd,
                "cost_saved_usd": st.cost_saved_usd,
            }
        )
    return out
