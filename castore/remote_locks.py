"""Writer locks, batch leases and row claims on a remote, for machines that cannot see
each other's files (docs/remotes.md "Several machines on one remote").

Writer locks keep gc away from anything a push or a write-through run may still name.
Each holder writes its own lock object and only then lists the others; it backs off when
it sees one it conflicts with (gc conflicts with every writer, a push only with gc). Of
two writers that race, at least the later one sees the other, so they never both go on;
this needs listings that show a write once it returned (S3, GCS, Azure and folders do).

Leases say "this machine is computing this batch": one object per action key, created
only when absent (S3 `If-None-Match: *`, a hard link on a folder), so two machines never
both get one. A lease whose holder stops refreshing it is free after the TTL.

Row claims (RemoteClaims) say "this machine is computing these rows of a row-wise step"
for batches that share no lease.

All are kept alive by one heartbeat thread that rewrites them every TTL/4. A holder that
could not refresh for 3/4 of the TTL (paused, cut off) has lost its locks: `check()`
raises before it writes anything that names objects, since a gc may have swept by then.
Clocks of the machines must agree within TTL/4 (NTP); the TTL is `CASTORE_REMOTE_LOCK_TTL`
seconds (60 by default).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import posixpath
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from castore.errors import ConfigError, RemoteError, StoreLocked
from castore.store import layout as L

if TYPE_CHECKING:
    from castore.remote import Remote

log = logging.getLogger(__name__)

DEFAULT_TTL = 60.0


def lock_ttl() -> float:
    """Seconds a lock or lease lives without a heartbeat: CASTORE_REMOTE_LOCK_TTL, else
    60. A value that is not a number of seconds >= 1 is an error, not a guess."""
    raw = os.environ.get("CASTORE_REMOTE_LOCK_TTL", "")
    if not raw:
        return DEFAULT_TTL
    try:
        ttl = float(raw)
    except ValueError:
        ttl = 0.0
    if not ttl >= 1:  # also NaN
        raise ConfigError(
            f"CASTORE_REMOTE_LOCK_TTL={raw!r}: give a number of seconds, 1 or more (default 60)"
        )
    return ttl


def holder_info(kind: str) -> dict[str, Any]:
    return {
        "kind": kind,
        "holder": uuid.uuid4().hex,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "time": time.time(),
    }


class Heartbeat:
    """Rewrites the lock and lease objects this process holds every TTL/4."""

    def __init__(self, remote: Remote, ttl: float) -> None:
        self.remote = remote
        self.ttl = ttl
        self._held: dict[str, tuple[dict[str, Any], float]] = {}  # path -> (info, renewed)
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, path: str, info: dict[str, Any]) -> None:
        """`path` was just written with `info`."""
        with self._mutex:
            self._held[path] = (info, time.monotonic())
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, daemon=True, name="castore-heartbeat"
                )
                self._thread.start()

    def remove(self, path: str) -> None:
        with self._mutex:
            self._held.pop(path, None)

    def alive(self, path: str) -> bool:
        with self._mutex:
            held = self._held.get(path)
        return held is not None and time.monotonic() - held[1] < self.ttl * 0.75

    def close(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            with self._mutex:
                held = [(path, info) for path, (info, _) in self._held.items()]
            for path, info in held:
                info = {**info, "time": time.time()}
                try:
                    self.remote.write(path, json.dumps(info).encode())
                except Exception as e:  # the next beat tries again; check() tells the holder
                    log.debug("remote %s: heartbeat of %s failed: %s", self.remote.url, path, e)
                    continue
                with self._mutex:
                    released = path not in self._held
                    if not released:
                        self._held[path] = (self._held[path][0], time.monotonic())
                if released:  # let go while we rewrote it: do not leave it standing
                    with contextlib.suppress(Exception):
                        self.remote.fs.rm_file(path)


def _asked_first(info: dict[str, Any]) -> tuple[float, str]:
    """Order of writers: who started asking for the lock first (ties: holder id)."""
    try:
        since = float(info.get("since", info.get("time", 0)))
    except (TypeError, ValueError):
        since = 0.0
    return since, str(info.get("holder", ""))


def locks(remote: Remote, base: str) -> list[tuple[str, dict[str, Any]]]:
    """The readable lock (or lease) objects directly under `base`: (path, info)."""
    listed = remote.listing(base)  # fresh: a lock written a moment ago must be seen
    return [(p, info) for p, _ in listed if (info := read_lock(remote, p)) is not None]


def read_lock(remote: Remote, path: str) -> dict[str, Any] | None:
    try:
        info = json.loads(remote.read(path))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def is_stale(info: dict[str, Any], ttl: float) -> bool:
    try:
        return time.time() - float(info.get("time", 0)) >= ttl
    except (TypeError, ValueError):
        return True


class WriterLock:
    """A push's, write-through run's or gc's lock on a remote (see the module doc)."""

    def __init__(self, remote: Remote, kind: str, *, exclusive: bool, heartbeat: Heartbeat):
        self.remote = remote
        self.kind = kind
        self.exclusive = exclusive
        self.heartbeat = heartbeat
        self.info = holder_info(kind)
        base = remote.layout.dir(L.LOCKS)
        self.path = remote.layout.join(base, f"{kind}-{self.info['holder']}.json")

    def acquire(self, wait: float = 5.0) -> WriterLock:
        """Write our lock (state "waiting"), then look at the others: go on (state
        "held") when no conflicting writer holds the lock and none that conflicts has
        been waiting longer; else keep waiting, our lock in place, so writers that come
        later queue behind us (a gc in a loop cannot starve a push). Locks stay in place
        from their first write, so of two conflicting writers the later sees the
        earlier: they never both go on."""
        deadline = time.monotonic() + wait
        self.remote.fs.makedirs(self.remote.layout.dir(L.LOCKS), exist_ok=True)
        self.info.update(since=time.time(), state="waiting")
        while True:
            self._write()
            blocking = [
                w
                for w in self.remote.writers()
                if self._conflicts(w)
                and (w.get("state", "held") == "held" or _asked_first(w) < _asked_first(self.info))
            ]
            if not blocking:
                self.info["state"] = "held"
                self._write()
                return self
            if time.monotonic() >= deadline:
                self.release()
                w = min(blocking, key=_asked_first)
                left = max(0.0, self.heartbeat.ttl - (time.time() - float(w.get("time", 0))))
                raise StoreLocked(
                    f"remote {self.remote.url} is locked by {w.get('kind')} (pid "
                    f"{w.get('pid')} on {w.get('host')}); try again later (if it died, its "
                    f"lock expires in {left:.0f}s)"
                )
            time.sleep(random.uniform(0.1, 0.4))

    def _write(self) -> None:
        self.info["time"] = time.time()
        self.remote.write(self.path, json.dumps(self.info).encode())
        self.heartbeat.add(self.path, self.info)

    def _conflicts(self, other: dict[str, Any]) -> bool:
        if other.get("path") == self.path or other.get("holder") == self.info["holder"]:
            return False
        return self.exclusive or other.get("kind") == "gc"

    def check(self) -> None:
        """Raise unless the lock is certainly still ours (refreshed within 3/4 TTL)."""
        if not self.heartbeat.alive(self.path):
            raise RemoteError(
                f"lost the {self.kind} lock on remote {self.remote.url} (not refreshed for "
                f"{self.heartbeat.ttl * 0.75:.0f}s); stopped before naming objects a gc may "
                "have removed; run it again"
            )

    def release(self) -> None:
        self.heartbeat.remove(self.path)
        with contextlib.suppress(Exception):  # unreachable: it expires by itself
            self.remote.fs.rm_file(self.path)


@contextlib.contextmanager
def writer_lock(remote: Remote, kind: str, *, exclusive: bool) -> Iterator[WriterLock]:
    heartbeat = Heartbeat(remote, lock_ttl())
    lock = WriterLock(remote, kind, exclusive=exclusive, heartbeat=heartbeat).acquire()
    try:
        yield lock
    finally:
        lock.release()
        heartbeat.close()


class Leases:
    """This run's leases on batches, by action key (see the module doc)."""

    def __init__(self, remote: Remote, heartbeat: Heartbeat, poll: float = 1.0) -> None:
        self.remote = remote
        self.heartbeat = heartbeat
        self.poll = poll
        self.info = holder_info("lease")
        self.held: set[str] = set()
        self._tried: dict[str, float] = {}

    def path(self, key: str) -> str:
        return self.remote.layout.lease_path(key)

    def try_acquire(self, key: str) -> bool:
        """True when this run may compute `key`: it holds the lease. Asks the remote at
        most once per `poll` seconds per key."""
        if key in self.held:
            return True
        now = time.monotonic()
        if now - self._tried.get(key, -self.poll) < self.poll:
            return False
        self._tried[key] = now
        path = self.path(key)
        info = {**self.info, "time": time.time()}
        data = json.dumps(info).encode()
        if not self.remote.create(path, data):
            other = read_lock(self.remote, path)
            if other is not None and not is_stale(other, self.heartbeat.ttl):
                return False
            # Its holder died (or the lease was just released): remove it and race for it
            # once more; the create decides which machine gets it.
            with contextlib.suppress(OSError):
                self.remote.fs.rm_file(path)
            if not self.remote.create(path, data):
                return False
        self.held.add(key)
        self._tried.pop(key, None)
        self.heartbeat.add(path, info)
        return True

    def release(self, key: str) -> None:
        if key not in self.held:
            return
        self.held.discard(key)
        path = self.path(key)
        self.heartbeat.remove(path)
        with contextlib.suppress(Exception):  # unreachable: it expires by itself
            self.remote.fs.rm_file(path)

    def release_all(self) -> None:
        for key in list(self.held):
            self.release(key)


class RemoteClaims:
    """This run's claims on rows of row-wise steps on a remote: machines whose batches of
    a step differ (batch size, input) never share a lease, yet meet in rows.

    A claim is an object locks/claims/<fingerprint>/<holder>-<n>.json listing the row keys
    a batch computes (and its action key), kept alive by the heartbeat. A claimer writes
    its claim and only then lists the others': of two overlapping claims the later one
    sees the earlier, so they never both go on. One that sees a live overlapping claim
    withdraws its own and waits, holding nothing, so two machines never wait for each
    other; when both withdrew, each asks again after a random pause. A claim is let go
    once its batch's entry and row-key segment are on the remote (or the batch failed)."""

    def __init__(self, remote: Remote, heartbeat: Heartbeat) -> None:
        self.remote = remote
        self.heartbeat = heartbeat
        self.info = holder_info("claim")
        self._n = itertools.count()
        # Others' claims read so far: path -> its keys (a claim's keys never change; None:
        # unreadable, taken to overlap everything while it lives).
        self._keys: dict[str, frozenset[str] | None] = {}

    def dir(self, fingerprint: str) -> str:
        layout = self.remote.layout
        return layout.join(layout.dir(L.LOCKS), L.CLAIMS, fingerprint)

    def take(self, fingerprint: str, keys: list[bytes], action_key: str) -> str | list[str]:
        """Our claim's path; or, when live claims of other machines hold some of `keys`,
        their paths (wait until `live` no longer lists them)."""
        want = {k.hex() for k in keys}
        base = self.dir(fingerprint)
        path = self.remote.layout.join(base, f"{self.info['holder']}-{next(self._n)}.json")
        info = {**self.info, "time": time.time(), "batch": action_key, "keys": sorted(want)}
        self.remote.write(path, json.dumps(info).encode())
        self.heartbeat.add(path, info)
        blockers = [
            p
            for p in self._live_others(fingerprint)
            if (theirs := self._keys.get(p)) is None or not want.isdisjoint(theirs)
        ]
        if blockers:
            self.release(path)
        return blockers or path

    def live(self, fingerprint: str) -> list[str]:
        """Other holders' claims on rows of this step refreshed within the TTL (by the
        listing's modification times: the heartbeat rewrites them)."""
        now, ttl, mine = time.time(), self.heartbeat.ttl, self.info["holder"]
        return [
            p
            for p, mtime in self.remote.listing(self.dir(fingerprint))
            if not posixpath.basename(p).startswith(mine) and now - mtime < ttl
        ]

    def _live_others(self, fingerprint: str) -> list[str]:
        """`live`, with the keys of each claim read once (one request each)."""
        from concurrent.futures import ThreadPoolExecutor

        live = self.live(fingerprint)
        self._keys = {p: self._keys[p] for p in live if p in self._keys}
        new = [p for p in live if p not in self._keys]
        with ThreadPoolExecutor(min(8, len(new) or 1)) as pool:
            for p, (there, theirs) in zip(new, pool.map(self._read_keys, new), strict=True):
                if there:
                    self._keys[p] = theirs
                else:
                    live.remove(p)  # let go between the listing and the read
        return live

    def _read_keys(self, path: str) -> tuple[bool, frozenset[str] | None]:
        """(whether the claim is still there, its keys: None when unreadable, taken to
        overlap everything while it lives)."""
        try:
            info = json.loads(self.remote.read(path))
        except FileNotFoundError:
            return False, None
        except (OSError, ValueError):
            return True, None
        theirs = info.get("keys") if isinstance(info, dict) else None
        return True, frozenset(theirs) if isinstance(theirs, list) else None

    def release(self, path: str) -> None:
        self.heartbeat.remove(path)
        with contextlib.suppress(Exception):  # unreachable: it expires by itself
            self.remote.fs.rm_file(path)

    def outranked(self, blockers: list[str]) -> bool:
        """Whether a holder of these claims ranks before us (holder ids ordered): of two
        machines that meet, exactly one sees True, and turns to the other end of its
        batches so that they work towards each other (Queues.backward)."""
        theirs = (posixpath.basename(p).rsplit("-", 1)[0] for p in blockers)
        return min(theirs, default=self.info["holder"]) < self.info["holder"]


__all__ = ["Heartbeat", "Leases", "RemoteClaims", "WriterLock", "lock_ttl", "writer_lock"]
