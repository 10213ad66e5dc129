"""Read-through and write-through with a remote during a run (docs/remotes.md).

Nothing is listed at the start, so an all-local run costs the remote nothing: a local
miss asks the remote for that key's entry (asked ahead, several at once, for the batches
just planned) and fetches its outputs, verified. A missing or corrupt remote object
costs that batch only (computed here, with a warning naming the object); the remote
stays in use. The remote unreachable or slow degrades the run to local-only with one
warning: it never fails a run.

With `push` the run holds a writer lock on the remote (so a remote gc waits for it),
uploads each new batch as it is produced and the run's manifests and ref at the end,
and leases each batch it computes on the remote, so machines sharing the remote compute
a batch once: another machine's batch is waited for, its entry picked up when it lands.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial
from typing import Any

from castore import remote_segments
from castore.errors import (
    CastoreError,
    CorruptObject,
    LayoutVersionError,
    RemoteError,
    RemoteUnavailable,
)
from castore.remote_layout import Missing, require_store
from castore.remote_locks import Heartbeat, Leases, RemoteClaims, lock_ttl
from castore.store import Store
from castore.store.extend import needs_of
from castore.store.models import ActionEntry

log = logging.getLogger("castore.run")

LEASE_BELOW = 0.05  # seconds per batch: cheaper steps are not leased on the remote


class DaemonPool:
    """Threads that never keep the process alive: a hung remote must not stall exit."""

    def __init__(self, n: int) -> None:
        self._jobs: queue.Queue[tuple[Future[Any], Callable[[], Any]]] = queue.Queue()
        for i in range(n):
            threading.Thread(target=self._work, daemon=True, name=f"castore-remote-{i}").start()

    def submit(self, fn: Callable[[], Any]) -> Future[Any]:
        fut: Future[Any] = Future()
        self._jobs.put((fut, fn))
        return fut

    def _work(self) -> None:
        while True:
            fut, fn = self._jobs.get()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:
                fut.set_exception(e)


class RemoteCache:
    def __init__(
        self, store: Store, remote: Any, *, push: bool, timeout: float = 15.0, jobs: int = 8
    ) -> None:
        self.store = store
        self.remote = remote
        self.timeout = timeout
        self.poll = 1.0  # seconds between asks for a key the remote lacked
        self.active = True
        self.hits = 0
        self.uploaded = 0
        self.pool = DaemonPool(jobs)
        self._ahead: dict[str, Future[ActionEntry | None]] = {}
        self._missed: dict[str, float] = {}  # key -> when the remote last lacked it
        self._index: Future[Any] | None = None  # the remote's manifests, read on first need
        self._index_pool = DaemonPool(1)  # not the pool: lookups there wait for it
        self.heartbeat = Heartbeat(remote, lock_ttl())
        self.lock: Any = None
        self.leases: Leases | None = None
        self.claims: RemoteClaims | None = None
        self._claimed: dict[str, str] = {}  # action key -> our claim on its rows
        # Step fingerprint -> when to list its claims again, and the live ones listed.
        self._live: dict[str, tuple[float, set[str]]] = {}
        self._announced: dict[str, set[str]] = {}  # fingerprint -> segment markers seen
        self._looked: dict[str, float] = {}  # fingerprint -> when its markers were listed
        self._checking = threading.Lock()  # one look at the remote's layout file at a time
        self._uploads: queue.Queue[tuple[str, list[str], str | None] | None] = queue.Queue()
        self._uploader: threading.Thread | None = None
        if push:
            self._start_push()
        if self.active:
            log.info(
                "remote %s: read-through%s", remote.url, "; writing through" if self.lock else ""
            )

    def _start_push(self) -> None:
        from castore.remote_locks import WriterLock

        lock = WriterLock(self.remote, "push", exclusive=False, heartbeat=self.heartbeat)
        self._call(partial(self._require_store, "create"), "check its layout")
        try:
            self._call(lock.acquire, "take its writer lock")
        except CastoreError as e:  # a gc holds it: run, but do not write through
            log.warning("%s; not writing through (cas push later)", e)
            return
        if not self.active:
            return
        self.lock = lock
        self.leases = Leases(self.remote, self.heartbeat)
        self.claims = RemoteClaims(self.remote, self.heartbeat)
        self._uploader = threading.Thread(
            target=self._upload_loop, daemon=True, name="castore-push"
        )
        self._uploader.start()

    def _call(self, fn: Callable[[], Any], what: str) -> Any:
        """`fn()` on a pool thread, waited for up to the timeout. A castore error is the
        caller's; anything else (network, credentials, no answer) turns the remote off."""
        if not self.active:
            return None
        return self._wait(self.pool.submit(fn), what)

    def _require_store(self, missing: Missing = "error") -> None:
        """On a pool thread, before the first read or write: a URL that holds no castore
        remote, or one of a newer layout, turns the remote off for this run (one
        warning saying which), as an unreachable one does. Once checked, require_store
        returns at once."""
        with self._checking:
            try:
                require_store(self.remote, missing)
            except (RemoteError, LayoutVersionError) as e:
                raise RemoteUnavailable(str(e)) from None

    def _wait(self, fut: Future[Any], what: str) -> Any:
        try:
            return fut.result(self.timeout)
        except RemoteUnavailable as e:  # e.g. refs unreadable: local-only, never a failure
            self._down(what, str(e))
            return None
        except CastoreError:
            raise
        except Exception as e:
            from castore.remote_checks import explain_remote_error

            if not fut.done():
                reason = f"no answer in {self.timeout:.0f}s"
            else:
                reason = str(explain_remote_error(e) or f"{type(e).__name__}: {e}")
            self._down(what, reason)
            return None

    def _down(self, what: str, reason: str) -> None:
        if self.active:
            log.warning(
                "remote %s unavailable (%s: %s); continuing with the local store only",
                self.remote.url,
                what,
                reason,
            )
        self.active = False

    # -- read-through ----------------------------------------------------------------

    def prefetch(self, keys: list[str]) -> None:
        """Ask the remote for these keys' entries (and fetch their outputs) in parallel,
        ahead of the lookups that will want them."""
        now = time.monotonic()
        for key in keys:
            if self.active and key not in self._ahead and not self._asked_lately(key, now):
                self._ahead[key] = self.pool.submit(partial(self._get, key))

    def _asked_lately(self, key: str, now: float) -> bool:
        return now - self._missed.get(key, -self.poll) < self.poll

    def lookup(self, key: str) -> ActionEntry | None:
        """The remote's entry for `key`, its outputs fetched and verified into the store;
        None when the remote lacks it or any of it (asked again after `poll` seconds)."""
        if not self.active:
            return None
        fut = self._ahead.pop(key, None)
        if fut is None:
            if self._asked_lately(key, time.monotonic()):
                return None
            fut = self.pool.submit(partial(self._get, key))
        entry = self._wait(fut, "read an action entry")
        if entry is None:
            self._missed[key] = time.monotonic()
            return None
        self._missed.pop(key, None)
        self.store.put_action(key, entry)
        self.hits += 1
        return entry

    def _get(self, key: str) -> ActionEntry | None:
        """On a pool thread: the trusted entry with every output here, or None."""
        self._require_store()
        entry = self.remote.get_action(key)
        if entry is None:
            return None
        recorded = self._manifests()[0].get(key)
        if recorded is not None and (list(entry.outputs), list(entry.rows)) != recorded:
            log.warning(
                "remote %s: action entry %s disagrees with the step manifest that references "
                "it (tampered?); computing the batch here instead",
                self.remote.url,
                key[:12],
            )
            return None
        wanted = [*entry.outputs, *entry.needs()]
        return entry if all(self._fetch(o, key) for o in wanted) else None

    def _manifests(self) -> tuple[dict[str, tuple[list[str], list[int]]], dict[str, list[str]]]:
        """What the remote's (content-addressed) step manifests say each key produced, and
        each step's row-key segments; read once, the first time a remote entry is used,
        and only for runs this store has not read before (castore/remote_index.py)."""
        if self._index is None:
            self._index = self._index_pool.submit(partial(self.remote.manifest_index, self.store))
        return self._index.result()

    def _fetch(self, oid: str, key: str | None = None) -> bool:
        """An object read through, verified on the way in, and the objects it extends
        (named by its own footer, so by its id); False (with a warning naming it) when the
        remote lacks one or it is corrupt. Network errors propagate."""
        return self._fetch_one(oid, key) and all(
            self._fetch_one(n, key) for n in needs_of(self.store, oid)
        )

    def _fetch_one(self, oid: str, key: str | None) -> bool:
        from castore.remote import fetch_object

        if self.store.has(oid):
            return True
        try:
            fetch_object(self.store, self.remote, oid)
        except (CorruptObject, RemoteError) as e:
            batch = f" (batch {key[:12]})" if key else ""
            log.warning("remote %s: %s%s; computing it here instead", self.remote.url, e, batch)
            return False
        return self.store.has(oid)

    def fetch(self, oid: str) -> bool:
        """For the row index: an object a found row is in."""
        return bool(self._call(lambda: self._fetch(oid), "fetch an object"))

    def fetch_segments(self, fingerprint: str) -> None:
        """The remote's row-key segments of a step (of pushed runs, and announced by runs
        writing through), fetched and announced locally, so its rows are found by row
        key (their objects are fetched when used)."""
        index = self._call(self._manifests, "read run manifests")
        for seg in index[1].get(fingerprint, []) if index else []:
            if self.active and not self.store.has(seg) and self.fetch(seg):
                self.store.add_row_segment(fingerprint, seg)
        self._call(lambda: self._announced_segments(fingerprint), "list row segments")

    def _announced_segments(self, fingerprint: str) -> None:
        """On a pool thread: segments announced on the remote since we last looked (by
        runs writing through; castore.remote_segments), fetched and announced here;
        RowIndex.refresh reads them."""
        since = self._looked.get(fingerprint)
        if since is None:
            since = remote_segments.live_since(self.remote)
        self._looked[fingerprint] = time.time()
        seen = self._announced.setdefault(fingerprint, set())
        for seg in remote_segments.announced(self.remote, fingerprint, since, seen):
            seen.add(seg)
            if self.store.has(seg) or self._fetch(seg):
                self.store.add_row_segment(fingerprint, seg)

    # -- leases ------------------------------------------------------------------------

    @staticmethod
    def _cheap(tally: Any, rows: int | None = None) -> bool:
        """Computing it again costs less than asking the remote: batches of this step
        took less than LEASE_BELOW seconds each in this run (3 or more made), or with
        `rows` (a row-wise batch's rows to compute), those rows at this run's seconds per
        row paid for (rows found by key cost nothing, so a batch average would mislead)."""
        if tally is None or tally.computed < 3:
            return False
        if rows is None:
            return bool(tally.seconds < tally.computed * LEASE_BELOW)
        paid = tally.rows_computed - tally.rows_reused
        return paid > 0 and tally.seconds / paid * rows < LEASE_BELOW

    def lease(self, key: str, tally: Any = None) -> bool:
        """May this run compute `key`? With write-through: only while it holds the key's
        lease on the remote (another machine holding it is computing it). Cheap steps
        are not leased."""
        if self.leases is None or not self.active or key in self.leases.held:
            return True  # held: asked afresh when it was taken
        if self._cheap(tally):
            return True
        got = self._call(lambda: self.leases.try_acquire(key), "lease a batch")  # type: ignore[union-attr]
        if got:
            # Another machine may have made the batch since we last asked, and let go of
            # its lease: only a fresh answer tells (the caller asks again now).
            self._missed.pop(key, None)
            self._ahead.pop(key, None)
        return got is not False

    def release(self, key: str) -> None:
        """The batch was not computed after all (failed, retried, not started)."""
        if self.leases is not None and key in self.leases.held:
            self.pool.submit(lambda: self.leases.release(key))  # type: ignore[union-attr]
        self._unclaim(key)

    # -- row claims ----------------------------------------------------------------------

    def claim(
        self, fingerprint: str, keys: list[bytes], key: str, tally: Any = None
    ) -> bool | list[str]:
        """Claim these rows of a row-wise batch (action key `key`) before computing them.
        With write-through, True: this run now holds a claim on them on the remote
        (RemoteClaims), and the rows other machines announced meanwhile are here, for
        the caller to find by key; a list: other machines' claims on some of them (wait
        until `claims_held` is False). False: no claim needed (none to share with, held
        already, or a cheap step, which is not leased either)."""
        claims = self.claims
        if claims is None or not self.active or key in self._claimed:
            return False
        if self._cheap(tally, len(keys)):
            return False

        def take() -> str | list[str]:
            got = claims.take(fingerprint, keys, key)
            if isinstance(got, str):
                self._announced_segments(fingerprint)
            return got

        got = self._call(take, "claim rows")
        if isinstance(got, list):
            return got
        if got is None:  # the remote went away: nobody to share with
            return False
        self._claimed[key] = got
        return True

    def claims_held(self, fingerprint: str, blockers: list[str]) -> bool:
        """Whether other machines' claims a batch waits for still hold. One listing of a
        step's claims serves every batch waiting on it, taken again after a random
        0.15-0.35 s: two machines that both withdrew their claims do not ask again at
        the same instant."""
        if self.claims is None or not self.active:
            return False
        now = time.monotonic()
        when, live = self._live.get(fingerprint, (0.0, set()))
        if now >= when:
            claims = self.claims
            got = self._call(lambda: claims.live(fingerprint), "look at row claims")
            live = set(got or ())
            self._live[fingerprint] = (now + random.uniform(0.15, 0.35), live)
        return not live.isdisjoint(blockers)

    def outranked(self, blockers: list[str]) -> bool:
        return self.claims is not None and self.claims.outranked(blockers)

    def _unclaim(self, key: str) -> None:
        path = self._claimed.pop(key, None)
        if path is not None and self.claims is not None:
            self.pool.submit(partial(self.claims.release, path))

    # -- write-through -----------------------------------------------------------------

    def upload(self, key: str, outputs: list[str], fingerprint: str | None = None) -> None:
        """Write a new batch through; `fingerprint`: its step's, to announce a row-wise
        batch's segment. Its lease and row claim are let go once it is there."""
        if self._uploader is not None and self.active:
            self._uploads.put((key, outputs, fingerprint))
        else:
            self._unclaim(key)

    def _upload_loop(self) -> None:
        while (item := self._uploads.get()) is not None:
            key, outputs, fingerprint = item
            try:
                if not self.active or self.lock is None:
                    continue
                entry = self.store.get_action(key)
                segment = entry.row_segment() if entry is not None else None
                needs = entry.needs() if entry is not None else []
                # Before what names them; what the outputs extend first of all.
                for oid in [*needs, *outputs, *([segment] if segment else [])]:
                    self.remote.put_object(self.store, oid)
                if entry is not None:
                    self.lock.check()  # the objects it names are still there
                    self.remote.put_action(key, entry)
                    if segment is not None and fingerprint is not None:
                        remote_segments.announce(self.remote, fingerprint, segment)
                self.uploaded += 1
            except Exception as e:
                log.warning(
                    "remote %s: write-through failed (%s); continuing locally", self.remote.url, e
                )
                self.active = False
            finally:
                if self.leases is not None:
                    self.leases.release(key)  # after the entry: waiters find it
                if (path := self._claimed.pop(key, None)) and self.claims is not None:
                    self.claims.release(path)  # after the segment: waiters find its rows

    def finish(self, sig: str) -> None:
        """Drain uploads, push the run's manifests and ref, then let go of the remote."""
        try:
            if self._uploader is not None:
                self._uploads.put(None)
                self._uploader.join(self.timeout * 4)
            if self.lock is not None and self.active:
                self._push_run(sig)
        finally:
            if self.leases is not None:
                self.leases.release_all()
            if self.claims is not None:
                for path in list(self._claimed.values()):
                    self.claims.release(path)
                self._claimed.clear()
            if self.lock is not None:
                self.lock.release()
            self.heartbeat.close()

    def _push_run(self, sig: str) -> None:
        from castore.transfer import push

        try:
            result = self._call(lambda: push(self.store, self.remote, [sig]), "push the run")
        except CastoreError as e:
            log.warning("remote %s: run not pushed (%s); cas push later", self.remote.url, e)
            return
        if result is not None:
            log.info(
                "remote %s: pushed %d batches as they were made, then the run's manifests and ref",
                self.remote.url,
                self.uploaded,
            )
