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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from castore import remote_index
from castore.errors import CastoreError, ConfigError
from castore.hashing import validate_id
from castore.runs import RunInfo, list_runs
from castore.store import Store, actionpack, live_lock, read_lock, rowpack
from castore.store import layout as L
from castore.store.manifests import manifest_closure, run_closure
from castore.store.models import ActionEntry

if TYPE_CHECKING:
    import numpy as np

    from castore import remote_packs
    from castore.remote import Remote

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
        if entry is None or any(o in going or not store.has(o) for o in entry.outputs)
    ]
    _plan_packs(store, plan, entries)
    _plan_tmp(store, plan, now - grace)
    kept = {(r.name, r.sig) for r in kept_runs} | {where for _, _, where in live if where}
    plan.run_dirs_removed = _orphan_run_dirs(store, kept)
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
    with contextlib.suppress(FileNotFoundError):
        for e in os.scandir(store.layout.dir(L.TMP)):
            with contextlib.suppress(FileNotFoundError):
                st = e.stat(follow_symlinks=False)
                if st.st_mtime <= cutoff:
                    plan.tmp_removed.append(e.name)
                    plan.tmp_bytes += st.st_size


def _orphan_run_dirs(store: Store, kept: set[tuple[str, str]]) -> list[str]:
    base = store.layout.dir(L.RUNS)
    out = []
    with contextlib.suppress(FileNotFoundError):
        for name in sorted(os.listdir(base)):
            ndir = os.path.join(base, name)
            if not os.path.isdir(ndir):
                continue
            for sig in sorted(os.listdir(ndir)):
                if (name, sig) not in kept and store.get_ref(name, sig) is None:
                    out.append(f"{name}/{sig}")
    return out


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
    for rel in plan.run_dirs_removed:
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


def collect_remote(
    remote: Remote,
    *,
    grace: float = DEFAULT_GRACE,
    cache_ttl: float = DEFAULT_CACHE_TTL,
    dry_run: bool = False,
    jobs: int = 16,
    progress: Callable[[str, int], None] | None = None,
) -> GcResult:
    """gc on a remote with the same roots logic as the local one, and the same result
    shape. It holds the remote's exclusive writer lock (refreshed while it runs), so no
    push or write-through run can name an object it is deleting (docs/remotes.md); a dry
    run changes nothing and takes no lock. `progress(what, count)` is called as the
    listings and deletions advance ("entries listed", "objects listed", "entries
    dropped", "objects removed")."""
    from castore import remote_packs

    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        lock = None if dry_run else stack.enter_context(remote.writer_lock("gc", exclusive=True))
        now = time.time()
        result, entries, drop = _plan_remote(remote, now, grace, cache_ttl, jobs, progress=progress)
        if lock is not None:
            # Entries before objects: a gc killed in between leaves only garbage.
            for i, key in enumerate(result.actions_dropped):
                if i % 256 == 0:
                    lock.check()
                    _tell(progress, "entries dropped", i)
                with contextlib.suppress(FileNotFoundError):
                    remote.fs.rm_file(remote.layout.action_path(key))
            _tell(progress, "entries dropped", len(result.actions_dropped))
            for i, oid in enumerate(result.objects_removed):
                if i % 256 == 0:
                    lock.check()
                    _tell(progress, "objects removed", i)
                remote.delete_object(oid)
            _tell(progress, "objects removed", len(result.objects_removed))
            lock.check()
            remote_packs.merge(remote, entries, drop)
            _remove_dead_locks(remote)
    return GcResult(result, dry_run, time.perf_counter() - t0)


def _tell(progress: Callable[[str, int], None] | None, what: str, count: int) -> None:
    if progress is not None:
        progress(what, count)


def _plan_remote(
    remote: Remote,
    now: float,
    grace: float,
    cache_ttl: float,
    jobs: int,
    *,
    progress: Callable[[str, int], None] | None = None,
) -> tuple[GcPlan, remote_packs.Entries, np.ndarray]:
    """The plan, the entries it read, and the mask of those it drops.

    What is kept per entry and object is arrays of 32-byte ids (castore.remote_packs):
    the outputs the entries name, sorted (an id named twice is found at its first place),
    with flags for marked (a run reaches it, or an entry younger than the cache-ttl names
    it), seen in the objects' listing, and going (listed, unmarked, older than the grace
    period)."""
    import numpy as np

    from castore import remote_packs

    result = GcPlan(cutoff=now - grace)
    got = remote_packs.read_entries(remote, jobs, lambda n: _tell(progress, "entries listed", n))
    counts = got.counts()
    named = got.live & got.valid()
    outs = got.outs()
    per_out = np.repeat(named, counts)
    ids = outs[per_out]
    ids.sort()  # in place: no second copy
    young = np.repeat(named & (got.created() > now - cache_ttl), counts)
    marked = np.zeros(len(ids), dtype=np.bool_)
    for _chunk, _mine, at in _places(ids, outs, young):
        marked[at] = True
    del young
    others = _mark_remote(remote, jobs, ids, marked) | got.markers  # reached, named by none
    seen = np.zeros(len(ids), dtype=np.bool_)
    going_named = np.zeros(len(ids), dtype=np.bool_)
    going: dict[str, int] = {}
    listed = 0
    for page in remote.pages(L.OBJECTS):  # one page at a time
        listed += len(page)
        _tell(progress, "objects listed", listed)
        at, hit = _find(ids, _as_ids([o for o, *_ in page]))
        seen[at] = True
        ats = iter(at.tolist())
        for (oid, mtime, size, _tag), h in zip(page, hit.tolist(), strict=True):
            i = next(ats) if h else -1
            if (marked[i] if h else oid in others) or now - mtime < grace:
                result.objects_kept += 1
            else:
                going[oid] = size
                if h:
                    going_named[i] = True
    bad = going_named | ~seen  # gone from the remote, or going now
    del seen, going_named, marked
    # An entry goes when it is malformed or any object it names is bad.
    bad_out = np.zeros(len(outs), dtype=np.bool_)
    for chunk, mine, at in _places(ids, outs, per_out):
        bad_out[chunk][mine] = bad[at]
    has = counts > 0
    any_bad = np.zeros(len(counts), dtype=np.bool_)
    if has.any():
        starts = (np.cumsum(counts) - counts)[has]
        any_bad[has] = np.logical_or.reduceat(bad_out, starts)
    drop = got.live & (~got.valid() | any_bad)
    result.actions_dropped = got.hexes(drop)
    result.objects_removed = sorted(going)
    result.object_bytes = sum(going.values())
    return result, got, drop


_CHUNK = 1 << 16


def _places(
    ids: np.ndarray, outs: np.ndarray, mask: np.ndarray
) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
    """Per chunk of `outs` (bounded memory): the chunk, `mask` over it, and the places in
    the sorted `ids` of its outputs in `mask` (every one is there: `ids` holds them all)."""
    for lo in range(0, len(outs), _CHUNK):
        chunk = slice(lo, lo + _CHUNK)
        mine = mask[chunk]
        yield chunk, mine, _find(ids, outs[chunk][mine])[0]


def _as_ids(hexes: list[str]) -> np.ndarray:
    import numpy as np

    from castore import remote_packs

    return np.array([bytes.fromhex(h) for h in hexes], dtype=remote_packs.ID)


def _find(ids: np.ndarray, want: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first places in the sorted `ids` of the `want` it holds, a mask of which it
    holds)."""
    import numpy as np

    if not len(ids):
        return np.zeros(0, dtype=np.int64), np.zeros(len(want), dtype=np.bool_)
    at = np.minimum(np.searchsorted(ids, want), len(ids) - 1)
    hit = ids[at] == want
    return at[hit], hit


def _remove_dead_locks(remote: Remote) -> None:
    """Writer locks and batch leases whose holders stopped refreshing them."""
    from castore.remote_locks import is_stale, lock_ttl, locks

    ttl = lock_ttl()
    for base in (remote.layout.dir(L.LOCKS), remote.layout.leases_dir()):
        for p, info in locks(remote, base):
            if is_stale(info, ttl):
                with contextlib.suppress(OSError):
                    remote.fs.rm_file(p)


def _mark_remote(remote: Remote, jobs: int, ids: np.ndarray, marked: np.ndarray) -> set[str]:
    """Mark in `marked` (a mask over the sorted `ids`) what the remote's refs reach;
    returns what they reach that `ids` does not hold (manifests, pipeline.yaml...)."""
    from concurrent.futures import ThreadPoolExecutor

    others: set[str] = set()
    runs = sorted({oid for _name, _sig, oid in remote.list_refs(jobs=jobs)})
    with ThreadPoolExecutor(jobs) as pool:  # a request per manifest
        for _run, reached in pool.map(lambda oid: manifest_closure(remote.load_json, oid), runs):
            want = sorted(reached)
            at, hit = _find(ids, _as_ids(want))
            marked[at] = True
            others.update(o for o, h in zip(want, hit.tolist(), strict=True) if not h)
    return others
