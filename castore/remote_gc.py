"""gc of a remote (`cas gc --remote`): the local gc's roots logic (castore.gc) over a
remote's listings, holding arrays of ids rather than Python objects, under the remote's
exclusive writer lock (docs/remotes.md)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Container, Iterator
from typing import TYPE_CHECKING, Any

from castore import remote_segments
from castore.gc import DEFAULT_CACHE_TTL, DEFAULT_GRACE, GcPlan, GcResult
from castore.store import layout as L
from castore.store.manifests import manifest_closure

if TYPE_CHECKING:
    import numpy as np

    from castore import remote_packs
    from castore.remote import Remote


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
    from castore.remote_layout import require_store

    t0 = time.perf_counter()
    require_store(remote)  # a mistyped URL is not an empty remote with nothing to keep
    fix_mmap_threshold()
    with contextlib.ExitStack() as stack:
        lock = None if dry_run else stack.enter_context(remote.writer_lock("gc", exclusive=True))
        now = time.time()
        # objects/ is listed beside entries and refs (_ObjectPages).
        with _ObjectPages(remote) as objects:
            result, entries, drop = _plan_remote(
                remote,
                objects,
                now=now,
                grace=grace,
                cache_ttl=cache_ttl,
                jobs=jobs,
                progress=progress,
            )
        if lock is not None:
            # Entries before objects: a gc killed in between leaves only garbage.
            for i, key in enumerate(result.actions_dropped):
                if i % 256 == 0:
                    lock.check()
                    _tell(progress, "entries dropped", i)
                with contextlib.suppress(FileNotFoundError):
                    remote.fs.rm_file(remote.layout.action_path(key))
            _tell(progress, "entries dropped", len(result.actions_dropped))
            for path in result.markers_dropped:  # before their segments, as entries
                with contextlib.suppress(FileNotFoundError):
                    remote.fs.rm_file(path)
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


# glibc's mallopt parameter number for the mmap threshold.
_M_MMAP_THRESHOLD = -3


def fix_mmap_threshold(size: int = 1 << 18) -> bool:
    """Have glibc give blocks of `size` bytes and more their own mappings for the rest of
    the process. By default it raises that threshold each time such a block is freed (up
    to 32 MiB), after which a gc's growing arrays and freed pages share the heap, which it
    cannot give back: at 60,000 entries ~45 bytes more peak memory per entry, and twice
    the spread (benchmarks/bench_team.py part 2m). Only allocations that large are
    affected. False where the C library is not glibc (nothing is changed)."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        return bool(ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, size))
    except (OSError, AttributeError):
        return False


def _tell(progress: Callable[[str, int], None] | None, what: str, count: int) -> None:
    if progress is not None:
        progress(what, count)


def _plan_remote(
    remote: Remote,
    objects: _ObjectPages,
    *,
    now: float,
    grace: float,
    cache_ttl: float,
    jobs: int,
    progress: Callable[[str, int], None] | None = None,
) -> tuple[GcPlan, remote_packs.Entries, np.ndarray]:
    """The plan, the entries it read, and the mask of those it drops.

    What is kept per entry and object is arrays of 32-byte ids (castore.remote_packs):
    the outputs the entries name, in sorted order (_Sorted: an id named twice is found at
    its first place), with flags for marked (a run reaches it, or an entry younger than the
    cache-ttl names it), seen in the objects' listing, and going (listed, unmarked, older
    than the grace period). `objects`: the listing of objects/ as pages of (ids, mtimes, sizes)."""
    import numpy as np

    from castore import remote_packs

    result = GcPlan(cutoff=now - grace)
    got = remote_packs.read_entries(
        remote, jobs, lambda n: _tell(progress, "entries listed", n), packs_read=objects.start
    )
    counts = got.counts()
    named = got.live & got.valid()
    outs = got.outs()
    per_out = np.repeat(named, counts)
    ids = _Sorted(outs, per_out)
    young = np.repeat(named & (got.created() > now - cache_ttl), counts)
    marked = np.zeros(len(ids), dtype=np.bool_)
    for _chunk, _mine, at in _places(ids, outs, young):
        marked[at] = True
    del young
    others = _mark_remote(remote, jobs, ids, marked) | got.markers  # reached, named by none
    announced = _Announced(remote, now - cache_ttl)
    others |= announced.young
    seen = np.zeros(len(ids), dtype=np.bool_)
    going_named = np.zeros(len(ids), dtype=np.bool_)
    going: dict[str, int] = {}
    listed = 0
    for blob, mtimes, sizes in objects:
        page = np.frombuffer(blob, dtype=remote_packs.ID)
        listed += len(page)
        _tell(progress, "objects listed", listed)
        at, hit = ids.find(page)
        seen[at] = True
        keep = now - mtimes < grace
        keep[hit] |= marked[at]
        announced.saw(page)
        for j in np.flatnonzero(~hit).tolist():  # named by no entry: hex ids needed
            keep[j] |= blob[32 * j : 32 * j + 32].hex() in others
        result.objects_kept += int(keep.sum())
        going_named[at[~keep[hit]]] = True
        for j in np.flatnonzero(~keep).tolist():
            going[blob[32 * j : 32 * j + 32].hex()] = int(sizes[j])
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
    result.markers_dropped = announced.dropped(going)
    result.objects_removed = sorted(going)
    result.object_bytes = sum(going.values())
    return result, got, drop


_CHUNK = 1 << 16


def _places(
    ids: _Sorted, outs: np.ndarray, mask: np.ndarray
) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
    """Per chunk of `outs` (bounded memory): the chunk, `mask` over it, and the places in
    `ids` of its outputs in `mask` (every one is there: `ids` holds them all)."""
    for lo in range(0, len(outs), _CHUNK):
        chunk = slice(lo, lo + _CHUNK)
        mine = mask[chunk]
        yield chunk, mine, ids.find(outs[chunk][mine])[0]


def _as_ids(hexes: list[str]) -> np.ndarray:
    import numpy as np

    from castore import remote_packs

    return np.array([bytes.fromhex(h) for h in hexes], dtype=remote_packs.ID)


class _Sorted:
    """The ids of `base` in `mask` (all when None) in sorted order, held as their places
    in `base` (4 bytes an id where a sorted copy would take 32: at 10^6 entries the
    difference is 28 MB). A place is a position in that order; an id held twice is found
    at its first place."""

    def __init__(self, base: np.ndarray, mask: np.ndarray | None = None) -> None:
        import numpy as np

        order = np.argsort(base, kind="stable")
        if mask is not None:
            order = order[mask[order]]
        self._base = base
        self._order = order.astype(np.int32 if len(base) < 1 << 31 else np.int64)

    def __len__(self) -> int:
        return len(self._order)

    def find(self, want: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the first places of the `want` held, a mask of which are held)."""
        import numpy as np

        n = len(self._order)
        if not n:
            return np.zeros(0, dtype=np.intp), np.zeros(len(want), dtype=np.bool_)
        # numpy's searchsorted takes an order only of the whole array, so the binary search
        # is done here: per step, each `want` moves on by `step` while the id there is
        # smaller. `below` ends as the last place of an id smaller than it.
        below = np.full(len(want), -1, dtype=np.intp)
        step = 1 << (n.bit_length() - 1)
        while step:
            ahead = below + step
            less = (ahead < n) & (self._at(np.minimum(ahead, n - 1)) < want)
            below[less] = ahead[less]
            step >>= 1
        at = np.minimum(below + 1, n - 1)
        hit = self._at(at) == want
        return at[hit], hit

    def _at(self, places: np.ndarray) -> np.ndarray:
        return self._base[self._order[places]]


class _Announced:
    """The row-key segments runs writing through announced (markers
    index/<fp>/<bucket>/<segment>, castore.remote_segments). A marker is a hint for runs
    going on at once: younger than the cache-ttl it keeps its segment, as a young entry
    keeps its outputs; it goes when older (a pushed run's manifests name its segments),
    with its segment, or when that is gone already."""

    def __init__(self, remote: Remote, young_after: float) -> None:
        self.markers: list[tuple[str, str]] = []  # (segment, path)
        self.young: set[str] = set()
        self.old: list[str] = []
        for path, seg, mtime in remote_segments.markers(remote):
            if mtime > young_after:
                self.markers.append((seg, path))
                self.young.add(seg)
            else:
                self.old.append(path)
        self.present: set[str] = set()
        self._sorted = sorted(self.young)  # the young segments, and as ids
        self._ids = _Sorted(_as_ids(self._sorted))

    def saw(self, page: np.ndarray) -> None:
        """A page of the objects' listing (their ids)."""
        at, _hit = self._ids.find(page)
        self.present.update(self._sorted[i] for i in at.tolist())

    def dropped(self, going: Container[str]) -> list[str]:
        gone = (p for seg, p in self.markers if seg in going or seg not in self.present)
        return sorted([*self.old, *gone])


class _ObjectPages:
    """The listing of objects/, read by a thread once the entry packs are read, so that
    it overlaps the listing of actions/ and the reading of refs: on S3 each listing is a
    chain of page requests, and a gc needs both whole (on the local S3 server, 20,000
    entries and objects: 11 s one after the other, 9 s together; started before the
    packs, it slowed their reads, which the listing of actions/ waits for). Pages are
    handed over as (ids as 32-byte strings, mtimes, sizes), 48 bytes an object, at most
    AHEAD pages ahead of the reader; an error of the listing is raised to the reader."""

    AHEAD = 256

    def __init__(self, remote: Remote) -> None:
        import queue
        import threading

        self._remote = remote
        self._pages: queue.Queue[Any] = queue.Queue(self.AHEAD)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._list, name="castore-gc-list", daemon=True)

    def __enter__(self) -> _ObjectPages:
        return self

    def start(self) -> None:
        """Start listing (at most once)."""
        if self._thread.ident is None:
            self._thread.start()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join()

    def _put(self, item: object) -> bool:
        import queue

        while not self._stop.is_set():
            with contextlib.suppress(queue.Full):
                self._pages.put(item, timeout=0.05)
                return True
        return False

    def _list(self) -> None:
        import numpy as np

        pages = self._remote.pages(L.OBJECTS)
        try:
            for page in pages:
                blob = b"".join(bytes.fromhex(oid) for oid, *_ in page)
                mtimes = np.array([m for _, m, _, _ in page], dtype=np.float64)
                sizes = np.array([n for _, _, n, _ in page], dtype=np.int64)
                if not self._put((blob, mtimes, sizes)):
                    return
            self._put(None)
        except BaseException as e:  # raised in the reader
            self._put(e)
        finally:
            pages.close()

    def __iter__(self) -> Iterator[tuple[bytes, np.ndarray, np.ndarray]]:
        from castore.remote import handed_over

        self.start()
        return handed_over(self._pages)


def _remove_dead_locks(remote: Remote) -> None:
    """Writer locks, batch leases and row claims whose holders stopped refreshing them."""
    from castore.remote_locks import is_stale, lock_ttl, locks

    ttl = lock_ttl()
    claims = remote.layout.join(remote.layout.dir(L.LOCKS), L.CLAIMS)
    try:
        per_step = [str(p) for p in remote.fs.ls(claims, detail=False)]
    except (FileNotFoundError, NotADirectoryError):
        per_step = []
    for base in (remote.layout.dir(L.LOCKS), remote.layout.leases_dir(), *per_step):
        for p, info in locks(remote, base):
            if is_stale(info, ttl):
                with contextlib.suppress(OSError):
                    remote.fs.rm_file(p)


def _mark_remote(remote: Remote, jobs: int, ids: _Sorted, marked: np.ndarray) -> set[str]:
    """Mark in `marked` (a mask over the places of `ids`) what the remote's refs reach;
    returns what they reach that `ids` does not hold (manifests, pipeline.yaml...)."""
    from concurrent.futures import ThreadPoolExecutor

    others: set[str] = set()
    runs = sorted({oid for _name, _sig, oid in remote.list_refs(jobs=jobs)})
    with ThreadPoolExecutor(jobs) as pool:  # a request per manifest
        for _run, reached in pool.map(lambda oid: manifest_closure(remote.load_json, oid), runs):
            want = sorted(reached)
            at, hit = ids.find(_as_ids(want))
            marked[at] = True
            others.update(o for o, h in zip(want, hit.tolist(), strict=True) if not h)
    return others
