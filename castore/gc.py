"""Garbage collection: mark from the roots, sweep the rest (DESIGN.md "Garbage collection").

Roots are the refs that the policies keep, and the runs in progress (found by their live
lock files). Marked: every object a kept run reaches (run manifest, step manifests,
batches, pipeline.yaml, pipeline.log), and every object an action entry younger than
`cache_ttl` names.

Decision on action entries no ref reaches: they are what makes dedupe work across
pipelines after a ref is removed, so they (and their objects) are kept for `cache_ttl`
(default 7 days) after they were written; after that they go with their objects, and
`cache_ttl=0` drops them at once. An entry is dropped whenever one of its objects goes.

Nothing younger than `grace` (default 1 hour) is swept, and nothing a live run has
touched since it started (reused objects are freshened on every cache hit), so a run
writing right now is never robbed.

Sweep order (MUST), so that a gc killed at any moment leaves a store fsck calls clean:
refs removed by policy → action entries whose objects will go → objects → tmp/ leftovers
→ run folders of removed runs → stale lock files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from castore import remote_index
from castore.errors import CastoreError, ConfigError
from castore.hashing import validate_id
from castore.runs import RunInfo, list_runs
from castore.store import Store, actionpack, live_lock, read_lock, rowpack
from castore.store import layout as L
from castore.store.manifests import run_closure
from castore.store.models import ActionEntry

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

DEFAULT_GRACE = 3600.0
DEFAULT_CACHE_TTL = 7 * 86400.0
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """'90s', '30m', '1h', '30d', '2w' → seconds. A unit is required (is `3` three
    seconds or three days? a gc must not guess), except for 0."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not m or (not m.group(2) and float(m.group(1)) != 0):
        raise ConfigError(
            f"invalid duration {text!r}: give a number and a unit, e.g. 90s, 30m, 1h, 30d, 2w"
        )
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


@dataclass
class GcPlan:
    refs_removed: list[tuple[str, str]] = field(default_factory=list)  # (name, sig)
    # The run manifest each removed ref named when planned: a ref that moved since (a new
    # run of that pipeline) is not removed by sweeping an older plan.
    ref_targets: dict[str, str] = field(default_factory=dict)
    actions_dropped: list[str] = field(default_factory=list)
    # gc --remote: markers index/<fingerprint>/<segment> whose segment goes or is gone.
    markers_dropped: list[str] = field(default_factory=list)
    objects_removed: list[str] = field(default_factory=list)
    object_bytes: int = 0
    tmp_removed: list[str] = field(default_factory=list)
    tmp_bytes: int = 0
    run_dirs_removed: list[str] = field(default_factory=list)
    objects_kept: int = 0
    # Why objects were kept: named by a kept run, by an action entry younger than the
    # cache-ttl (and by no run), or younger than the grace period (and named by neither).
    kept_by_runs: int = 0
    kept_by_cache_ttl: int = 0
    kept_by_grace: int = 0
    live_runs: list[str] = field(default_factory=list)
    cutoff: float = 0.0  # objects touched after this are never swept
    # What the store remembers of remotes (castore/remote_index.py) and no read-through
    # used since this goes (now - cache-ttl).
    cache_cutoff: float = 0.0


@dataclass
class GcResult:
    plan: GcPlan
    dry_run: bool
    seconds: float

    @property
    def bytes_freed(self) -> int:
        return self.plan.object_bytes + self.plan.tmp_bytes


def _policy(
    runs: list[RunInfo], keep_last: int | None, older_than: float | None, now: float
) -> list[RunInfo]:
    """The runs the policies remove; a live run is never removed."""
    drop: dict[str, RunInfo] = {}
    if keep_last is not None:
        by_name: dict[str, list[RunInfo]] = {}
        for r in runs:  # newest first
            by_name.setdefault(r.name, []).append(r)
        for group in by_name.values():
            for r in group[keep_last:]:
                drop[r.oid] = r
    if older_than is not None:
        for r in runs:
            if now - r.manifest.updated.timestamp() > older_than:
                drop[r.oid] = r
    return [r for r in drop.values() if not r.live]


def _live_runs(store: Store) -> list[tuple[str, float, tuple[str, str] | None]]:
    """(run id, start time, (name, sig)) of every run a live process holds the lock of."""
    base = store.layout.run_locks_dir()
    out = []
    with contextlib.suppress(FileNotFoundError):
        for run_id in os.listdir(base):
            info = live_lock(os.path.join(base, run_id))
            if info is not None:
                d = info.detail
                where = (d["name"], d["sig"]) if "name" in d and "sig" in d else None
                out.append((run_id, info.created.timestamp(), where))
    return out


def plan_gc(
    store: Store,
    *,
    keep_last: int | None = None,
    older_than: float | None = None,
    grace: float = DEFAULT_GRACE,
    cache_ttl: float = DEFAULT_CACHE_TTL,
    now: float | None = None,
) -> GcPlan:
    """What a collection would remove, computed without changing anything."""
    now = time.time() if now is None else now
    plan = GcPlan()
    # MUST come before reading the refs: a run seals its final manifest and moves its
    # ref before it releases its lock, so a run not live now has its last ref in place,
    # and a run live now is protected by what it touched. Reading refs first would miss
    # a run that finished in between.
    live = _live_runs(store)
    runs = list_runs(store)
    removed = {r.oid for r in _policy(runs, keep_last, older_than, now)}
    plan.refs_removed = [(r.name, r.sig) for r in runs if r.oid in removed]
    plan.ref_targets = {f"{r.name}/{r.sig}": r.oid for r in runs if r.oid in removed}
    kept_runs = [r for r in runs if r.oid not in removed]
    plan.live_runs = [run_id for run_id, _, _ in live]
    entries = {key: store.peek_action(key) for key in store.iter_actions()}
    by_runs, marked = _mark(store, kept_runs, entries, cache_ttl, now)
    # A live run may hold objects no sealed manifest names yet: protect what it touched
    # since it started (minus a minute of clock slack).
    starts = [start for _, start, _ in live]
    protect_since = min(starts) - 60 if starts else None
    plan.cutoff = now - grace
    plan.cache_cutoff = now - cache_ttl
    _plan_objects(store, plan, by_runs, marked, cutoff=plan.cutoff, protect_since=protect_since)
    going = set(plan.objects_removed)
    plan.actions_dropped = [
        key
        for key, entry in entries.items()
        if entry is None
        or any(o in going or not store.has(o) for o in (*entry.outputs, *entry.needs()))
    ]
    _plan_packs(store, plan, entries)
    _plan_tmp(store, plan, now - grace)
    kept = {(r.name, r.sig) for r in kept_runs} | {where for _, _, where in live if where}
    plan.run_dirs_removed = _orphan_run_dirs(store, kept, set(plan.refs_removed))
    return plan


def _mark(
    store: Store,
    runs: list[RunInfo],
    entries: dict[str, ActionEntry | None],
    cache_ttl: float,
    now: float,
) -> tuple[set[str], set[str]]:
    """(objects the kept runs reach, those plus what action entries younger than the
    ttl name)."""
    marked: set[str] = set()
    for r in runs:
        try:
            marked |= run_closure(store, r.oid)[1]
        except CastoreError as e:
            # A damaged run keeps what it still names; fsck reports the damage.
            log.warning("run %s/%s: %s", r.name, r.sig[:12], e)
            marked.add(r.oid)
    by_runs = set(marked)
    for entry in entries.values():
        if entry is not None and now - entry.created.timestamp() < cache_ttl:
            marked.update(entry.outputs)
            marked.update(entry.needs())
            if (seg := entry.row_segment()) is not None:
                marked.add(seg)  # its row keys live as long as its rows
    # Entry packs are kept while their markers are; the sweep's repack replaces them by
    # one pack of the entries that stay and deletes the ones it replaced.
    marked |= actionpack.markers(store)
    for _fp, pack in rowpack.iter_pointers(store):
        # A pack is kept while every segment it covers is; a stale one ages out.
        covers = rowpack.covered(store, pack) if pack is not None else None
        if pack is not None and covers is not None and all(s in marked for s in covers):
            marked.add(pack)
    return by_runs, marked


def _plan_objects(
    store: Store,
    plan: GcPlan,
    by_runs: set[str],
    marked: set[str],
    *,
    cutoff: float,
    protect_since: float | None,
) -> None:
    for oid in store.iter_oids():
        if oid in marked:
            plan.objects_kept += 1
            if oid in by_runs:
                plan.kept_by_runs += 1
            else:
                plan.kept_by_cache_ttl += 1
            continue
        try:
            st = os.stat(store.path_of(oid))
        except FileNotFoundError:
            continue
        if st.st_mtime > cutoff or (protect_since is not None and st.st_mtime >= protect_since):
            plan.objects_kept += 1
            plan.kept_by_grace += 1
            continue
        plan.objects_removed.append(oid)
        plan.object_bytes += st.st_size


def _plan_packs(store: Store, plan: GcPlan, entries: dict[str, ActionEntry | None]) -> None:
    """An entry pack all of whose entries are dropped goes with them (the sweep's repack
    replaces the others). Entries that name no object (a generator's end) do not keep a
    pack alone: without them a run only runs that generator to its end again."""
    dropped = set(plan.actions_dropped)
    for oid in sorted(actionpack.markers(store)):
        keys = actionpack.pack_keys(store, oid)
        if keys is None or oid in plan.objects_removed:
            continue
        if any((e := entries.get(k)) is not None and e.outputs for k in keys - dropped):
            continue
        with contextlib.suppress(FileNotFoundError):
            plan.object_bytes += store.size_of(oid)
            plan.objects_removed.append(oid)
            plan.objects_kept -= 1
            plan.kept_by_cache_ttl -= 1


def _plan_tmp(store: Store, plan: GcPlan, cutoff: float) -> None:
    from castore.answers import live_journals

    kept = live_journals(store)  # old without being left over: their runs count on them
    with contextlib.suppress(FileNotFoundError):
        for e in os.scandir(store.layout.dir(L.TMP)):
            if e.is_dir(follow_symlinks=False) or e.name in kept:
                continue  # folders are not castore's (it stages files); live journals are in use
            with contextlib.suppress(FileNotFoundError):
                st = e.stat(follow_symlinks=False)
                if st.st_mtime <= cutoff:
                    plan.tmp_removed.append(e.name)
                    plan.tmp_bytes += st.st_size


def _orphan_run_dirs(
    store: Store, kept: set[tuple[str, str]], dropped: set[tuple[str, str]]
) -> list[str]:
    """Run folders of no kept run: whose ref is gone, or is `dropped` by this gc (its
    folder goes with it, not at the next gc; the sweep checks the ref went)."""
    base = store.layout.dir(L.RUNS)
    out = []
    with contextlib.suppress(FileNotFoundError):
        for name in sorted(os.listdir(base)):
            ndir = os.path.join(base, name)
            if not os.path.isdir(ndir):
                continue
            for sig in sorted(os.listdir(ndir)):
                run = (name, sig)
                if run not in kept and (run in dropped or _no_ref(store, name, sig)):
                    out.append(f"{name}/{sig}")
    return out


def _no_ref(store: Store, name: str, sig: str) -> bool:
    """No ref names this run (a damaged one counts as there: fsck --repair decides)."""
    try:
        return store.get_ref(name, sig) is None
    except CastoreError:
        return False


def collect(
    store: Store,
    *,
    dry_run: bool = False,
    keep_last: int | None = None,
    older_than: float | None = None,
    grace: float = DEFAULT_GRACE,
    cache_ttl: float = DEFAULT_CACHE_TTL,
    progress: Callable[[str, int], None] | None = None,
    plan: GcPlan | None = None,
) -> GcResult:
    """Plan and (unless `dry_run`) carry out a collection; with `plan`, carry out that
    plan (the one a user confirmed) instead of making a new one. Sweeping re-checks what
    changed since: an object touched after the plan's cutoff stays, and a ref that moved
    stays. Raises StoreLocked when another gc holds the store's gc lock."""
    t0 = time.perf_counter()
    lock = store.gc_lock()
    lock.acquire()
    try:
        if plan is None:
            plan = plan_gc(
                store, keep_last=keep_last, older_than=older_than, grace=grace, cache_ttl=cache_ttl
            )
        if not dry_run:
            _sweep(store, plan, progress)
    finally:
        lock.release()
    return GcResult(plan, dry_run, time.perf_counter() - t0)


def _sweep(store: Store, plan: GcPlan, progress: Callable[[str, int], None] | None) -> None:
    for name, sig in plan.refs_removed:
        planned = plan.ref_targets.get(f"{name}/{sig}")
        with contextlib.suppress(CastoreError):
            if planned is not None and store.get_ref(name, sig) != planned:
                continue  # a newer run of this pipeline owns the ref now
        store.delete_ref(name, sig)
    for key in plan.actions_dropped:
        store.delete_action(key)
    from castore.pipeline.appends import drop_stale

    drop_stale(store)  # a grown file's record, once its batches' entries went
    remote_index.prune(store, plan.cache_cutoff)
    _delete_objects(store, plan.objects_removed, plan.cutoff, progress)
    # One pack of the packed entries that stay; the packs it replaced go now (their
    # markers are gone, so no new reader finds them).
    replaced = actionpack.repack(store, set(plan.actions_dropped))
    _delete_objects(store, sorted(replaced), time.time(), None)
    for fp, seg in store.iter_row_segments():
        if not store.has(seg):
            store.drop_row_segment(fp, seg)  # its segment (and so its rows) went
    for fp, pack in rowpack.iter_pointers(store):
        if pack is None or not store.has(pack):
            rowpack.drop(store, fp)
    _remove_empty_shards(store)
    tmp = store.layout.dir(L.TMP)
    for name in plan.tmp_removed:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(tmp, name))
    # A run that started since the plan (after a prompt, say) may use an orphan folder.
    live = {f"{w[0]}/{w[1]}" for _, _, w in _live_runs(store) if w is not None}
    for rel in plan.run_dirs_removed:
        if rel in live or not _no_ref(store, *rel.split("/", 1)):
            continue  # a ref this gc spared (moved since the plan), or a run sealed since
        shutil.rmtree(os.path.join(store.layout.dir(L.RUNS), rel), ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(os.path.join(store.layout.dir(L.RUNS), rel)))
    _remove_stale_locks(store)


def _delete_objects(
    store: Store, oids: list[str], cutoff: float, progress: Callable[[str, int], None] | None
) -> None:
    """Unlink by shard through a directory fd: the kernel resolves one name instead of a
    five-component path (bench_gc; threads did not help).

    Each object is stat-ed again right before it goes: a run that reused it from the
    cache since the plan was made has freshened it, and it stays."""
    by_shard: dict[str, list[str]] = {}
    for oid in oids:
        by_shard.setdefault(oid[:2], []).append(validate_id(oid)[2:])
    base = store.layout.dir(L.OBJECTS)
    done = 0
    for shard, names in sorted(by_shard.items()):
        try:
            fd = os.open(os.path.join(base, shard), os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            continue
        try:
            for name in names:
                with contextlib.suppress(FileNotFoundError):
                    if os.stat(name, dir_fd=fd).st_mtime <= cutoff:
                        os.unlink(name, dir_fd=fd)
        finally:
            os.close(fd)
        done += len(names)
        if progress:
            progress("objects", done)


def _remove_empty_shards(store: Store) -> None:
    for kind in (L.OBJECTS, L.ACTIONS):
        base = store.layout.dir(kind)
        with contextlib.suppress(FileNotFoundError):
            for shard in os.listdir(base):
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.join(base, shard))  # only when empty


def _remove_stale_locks(store: Store) -> None:
    """Lock files whose holder is gone (leases, row claims and run locks of killed
    processes)."""
    for d in (store.layout.run_locks_dir(), store.layout.leases_dir(), store.layout.claims_dir()):
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(d):
                path = os.path.join(d, name)
                if live_lock(path) is None and read_lock(path) is not None:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)


# -- on a remote ------------------------------------------------------------------------
