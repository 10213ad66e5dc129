"""`cas du`: bytes per pipeline name and run, and what dedupe saved."""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from dataclasses import dataclass, field

from castore.errors import CastoreError
from castore.runs import list_runs
from castore.store import Store
from castore.store import layout as L
from castore.store.manifests import run_closure


@dataclass
class Usage:
    logical: int = 0  # bytes of every object its manifests reference
    unique: int = 0  # bytes of the objects nothing else references


@dataclass
class DuReport:
    runs: dict[str, dict] = field(default_factory=dict)  # "name/sig12" -> facts
    names: dict[str, Usage] = field(default_factory=dict)
    physical: int = 0  # every object in objects/
    physical_referenced: int = 0  # objects some run references
    logical_sum: int = 0
    tokens_stored: int = 0  # LLM tokens whose results the action entries keep

    @property
    def saved_by_dedupe(self) -> int:
        return self.logical_sum - self.physical_referenced


def usage(store: Store) -> DuReport:
    """Account every object once: sizes are stat-ed once, closures walked per run."""
    report = DuReport()
    sizes: dict[str, int] = {}
    for oid in store.iter_oids():
        try:
            sizes[oid] = os.stat(store.path_of(oid)).st_size
        except FileNotFoundError:
            continue
    report.physical = sum(sizes.values())
    closures: dict[str, set[str]] = {}
    names: dict[str, str] = {}
    for r in list_runs(store):
        label = f"{r.name}/{r.sig[:12]}"
        try:
            _, reached = run_closure(store, r.oid)
        except CastoreError:
            reached = {r.oid}
        closures[label] = {o for o in reached if o in sizes}
        names[label] = r.name
    by_run = Counter(o for c in closures.values() for o in c)
    by_name_closure: dict[str, set[str]] = {}
    for label, objs in closures.items():
        by_name_closure.setdefault(names[label], set()).update(objs)
    by_name = Counter(o for objs in by_name_closure.values() for o in objs)
    for label, objs in closures.items():
        logical = sum(sizes[o] for o in objs)
        unique = sum(sizes[o] for o in objs if by_run[o] == 1)
        report.runs[label] = {
            "name": names[label],
            "logical": logical,
            "unique": unique,
            "objects": len(objs),
        }
        report.logical_sum += logical
    for name in sorted(by_name_closure):
        objs = by_name_closure[name]
        report.names[name] = Usage(
            logical=sum(sizes[o] for o in objs),
            unique=sum(sizes[o] for o in objs if by_name[o] == 1),
        )
    for key in store.iter_actions():
        entry = store.peek_action(key)  # a report drops nothing (get_action would)
        if entry is None or not all(store.has(o) for o in entry.outputs):
            continue
        tokens = entry.info.get("tokens")
        if isinstance(tokens, int) and entry.info.get("kind") != "leaf-arrow":
            report.tokens_stored += tokens
    referenced = set().union(*closures.values()) if closures else set()
    report.physical_referenced = sum(sizes[o] for o in referenced)
    return report


@dataclass(frozen=True)
class StoreStats:
    root: str
    layout_version: int
    objects: int
    object_bytes: int
    actions: int
    refs: int
    bytes_on_disk: int


def store_stats(store: Store) -> StoreStats:
    """`cas info`: counts, and bytes on disk with hard links under runs/ counted once."""
    objects = object_bytes = 0
    for oid in store.iter_oids():
        objects += 1
        object_bytes += store.size_of(oid)
    total = 0
    for dirpath, _dirs, files in os.walk(store.root):
        for name in files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(dirpath, name))
                # Hard links under runs/ share their object's blocks: count once.
                if st.st_nlink == 1 or dirpath.startswith(store.layout.dir(L.OBJECTS)):
                    total += st.st_size
    return StoreStats(
        root=str(store.root),
        layout_version=L.LAYOUT_VERSION,
        objects=objects,
        object_bytes=object_bytes,
        actions=sum(1 for _ in store.iter_actions()),
        refs=len(store.list_refs()),
        bytes_on_disk=total,
    )
