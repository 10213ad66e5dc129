"""Leases only when they can matter: while another live run shares the store.

A lease (a lock file per action key) stops two runs from paying for the same batch at
once. A run that is alone needs none, and taking one per batch cost the driver a quarter
of its time at small batches (open, flock, write, unlink and close on every batch). So a
run starts *alone* unless another run's lock is live, and turns *shared* the moment one
appears:

- Every run says its mode in its run lock's detail (`leases`): "alone", "shared", or
  "done" once it computes nothing more. A lock without the field is a castore that
  always leases.
- An alone run notices a newcomer cheaply (a stat of the run-lock folder at most every
  STAT_EVERY seconds, a full look every RESCAN_EVERY seconds, since a folder's mtime can
  miss a change made within the same clock tick). It then takes leases on every batch it
  has in flight, and only after that says "shared". Noticing late costs the newcomer
  time, never a batch: it computes nothing before this run says "shared".
- A run that finds others computes nothing until each of them says "shared" or "done":
  from then on, every batch either of them computes is under a lease, so no batch is paid
  for twice. Once shared, a run stays shared: going back to alone could overlap a
  newcomer that read its earlier "shared".
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from castore.store.journal import JournalWriter
from castore.store.locks import live_lock

if TYPE_CHECKING:
    from castore.store import FileLock, Store
    from castore.store.models import LockInfo

log = logging.getLogger("castore.run")

RESCAN_EVERY = 0.5
# Not a stat per batch submitted: a syscall on the driver thread hands the GIL to a
# worker and waits to get it back (a quarter of the driver's time with 8 I/O-bound
# batches in flight, 200 of them).
STAT_EVERY = 0.02
# A live run that has not said "shared" by then (its driver stuck before its loop) is
# not waited for longer: leases still guard everything it computes from now on.
ACK_TIMEOUT = 60.0
ALONE, SHARED, DONE = "alone", "shared", "done"


class Neighbours:
    """This run's view of the other live runs on its store."""

    def __init__(self, store: Store, lock: FileLock) -> None:
        self.store = store
        self.dir = store.layout.run_locks_dir()
        self.lock = lock
        self.own = os.path.basename(lock.path)
        self._dead: set[str] = set()  # lock files whose holder is gone stay so
        self._mtime = self._stat()
        self._scanned = self._statted = time.monotonic()
        self.shared = bool(self.others())
        self._since: float | None = time.monotonic() if self.shared else None
        self._told = False
        if not self.shared:  # alone: entries go to one journal (castore.store.journal)
            store.journal = JournalWriter(store, self.own)
        lock.update_detail(leases=SHARED if self.shared else ALONE)

    def _stat(self) -> int:
        try:
            return os.stat(self.dir).st_mtime_ns
        except FileNotFoundError:
            return 0

    def others(self) -> dict[str, LockInfo]:
        """The other live runs' lock infos, by run id."""
        out: dict[str, LockInfo] = {}
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return out
        for name in names:
            if name == self.own or name in self._dead:
                continue
            info = live_lock(os.path.join(self.dir, name))
            if info is None:
                self._dead.add(name)
            else:
                out[name] = info
        return out

    def need_leases(self, take_inflight: Callable[[], None]) -> bool:
        """True when batches must be leased. An alone run that finds a newcomer first
        leases what it has in flight (`take_inflight`), then says so."""
        if self.shared:
            return True
        now = time.monotonic()
        if now - self._statted < STAT_EVERY:
            return False
        self._statted, mtime = now, self._stat()
        if mtime == self._mtime and now - self._scanned < RESCAN_EVERY:
            return False
        self._mtime, self._scanned = mtime, now
        if not self.others():
            return False
        take_inflight()
        # Every append is in the journal before the newcomer reads it (after our
        # "shared"); later entries are loose files, which it finds as they land.
        journal, self.store.journal = self.store.journal, None
        if journal is not None:
            journal.close()
        # Nothing to wait for: a newcomer found this run at its start, so it waits for
        # this "shared" before computing anything.
        self.shared = True
        self.lock.update_detail(leases=SHARED)
        log.info("another run shares this store: leasing batches from now on")
        return True

    def may_compute(self) -> bool:
        """Whether a shared run may start computing: every other live run leases what it
        computes (or computes nothing more)."""
        if not self.shared or self._since is None:
            return True
        waiting = [
            f"{rid} (pid {info.pid})"
            for rid, info in self.others().items()
            # An unreadable lock file ("unknown": read mid-rewrite) is asked again.
            if info.kind == "unknown" or info.detail.get("leases", SHARED) not in (SHARED, DONE)
        ]
        if not waiting:
            self._since = None  # acknowledged: never asked again
            self.store.journals.refresh()  # their journals are complete now
            return True
        waited = time.monotonic() - self._since
        if waited > ACK_TIMEOUT:
            log.warning(
                "run %s has not started leasing after %.0f s; going on (a batch it computes "
                "unleased may be computed twice)",
                ", ".join(waiting),
                waited,
            )
            self._since = None
            return True
        if waited > 2 and not self._told:
            self._told = True
            log.info("waiting for run %s to start leasing its batches", ", ".join(waiting))
        return False

    def done(self) -> None:
        """This run computes nothing more: nobody needs to wait for it."""
        self.lock.update_detail(leases=DONE)
