"""The scheduler's leases and claims: what stops two runs on one store, or two machines
on one remote, from paying for the same batch or row at once (docs/gc.md "Leases",
docs/remotes.md). A part of castore.pipeline.schedule.Scheduler, kept apart for size."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from castore.pipeline.claims import RowClaims
    from castore.pipeline.neighbours import Neighbours
    from castore.pipeline.plan import PlannedBatch
    from castore.pipeline.queues import Pending, Queues
    from castore.pipeline.record import Recorder
    from castore.pipeline.remote_cache import RemoteCache
    from castore.pipeline.rows import RowIndex, RowPlan
    from castore.store import FileLock, Store

log = logging.getLogger("castore.run")


class Leasing:
    """Leases on action keys and claims on row keys, taken before a batch is submitted."""

    store: Store
    run_id: str
    use_cache: bool
    neighbours: Neighbours | None
    rcache: RemoteCache | None
    recorder: Recorder
    claims: RowClaims
    queues: dict[str, Queues]
    running: dict[int, Pending]
    told_waits: set[str]

    if TYPE_CHECKING:  # the Scheduler's

        def _lookup(self, batch: PlannedBatch, keys: RowPlan | None = None) -> bool: ...
        def _index(self, step: str) -> RowIndex: ...
        def _row_results(self, step: str, keys: RowPlan | None) -> RowPlan | None: ...

    def _take_lease(self, p: Pending) -> bool:
        """A lease on the action key, so two runs never pay for the same batch at once.
        Without the cache there is nothing to share, and a run alone on its store has no
        one to share with: no lease (neighbours.py)."""
        if not self.use_cache:
            return True
        b = p.batch
        if self.neighbours is None or self.neighbours.need_leases(self._lease_running):
            if p.lease is None:
                p.lease = self._lease(b)
            if not p.lease.try_acquire():
                return False
            if not self._claim(p):
                p.lease.release()
                return False
        tally = self.recorder.tallies[b.step]
        if self.rcache is not None and not self.rcache.lease(b.key, tally):  # another machine's
            self._release(p)
            return False
        if self.rcache is not None and not self._claim_remote(p, tally):
            self._release(p)
            return False
        # The holder before us may have finished while we queued.
        leased = p.lease is not None or (self.rcache is not None and self.rcache.leases)
        if leased and self._lookup(b, p.rows):
            self._release(p)
        return True

    def _claim(self, p: Pending, *, submitted: bool = False) -> bool:
        """Claim the rows a row-wise batch computes (castore.pipeline.claims), then take
        those stored meanwhile, unless `submitted` (its worker has its rows); False when
        another run computes some of them now (`p.blockers`)."""
        if p.rows is None or p.claim is not None or not (keys := p.rows.missing):
            return True
        got = self.claims.take(p.rows.fingerprint, keys)
        if isinstance(got, list):
            p.blockers = got
            self._tell_wait(p, f"run {', '.join(self.claims.holders(got))}")
            return False
        p.claim = got
        if not submitted:  # outside the claims lock: finding them may read the remote
            self._index(p.batch.step).refresh()
            p.rows = self._row_results(p.batch.step, p.rows)
        return True

    def _claim_remote(self, p: Pending, tally: Any) -> bool:
        """`_claim` across machines writing through to a remote (RemoteCache.claim);
        False when another machine computes some of the rows (`p.remote_blockers`)."""
        assert self.rcache is not None
        if p.rows is None or not (keys := p.rows.missing):
            return True
        got = self.rcache.claim(p.rows.fingerprint, keys, p.batch.key, tally)
        if isinstance(got, list):
            p.remote_blockers = got
            self.queues[p.batch.step].backward |= self.rcache.outranked(got)
            self._tell_wait(p, "another machine")
            return False
        if got:
            self._index(p.batch.step).refresh()
            p.rows = self._row_results(p.batch.step, p.rows)
        return True

    def _tell_wait(self, p: Pending, who: str) -> None:
        b = p.batch
        say = log.debug if b.step in self.told_waits else log.info  # once a step at info
        self.told_waits.add(b.step)
        say("step %s batch %d: %s computes some of its rows now; waiting", b.step, b.index, who)

    def _release(self, p: Pending) -> None:
        """Let go of a batch this run will not compute (now): others may take it."""
        if p.lease is not None:
            p.lease.release()
        p.unclaim()
        if self.rcache is not None:
            self.rcache.release(p.batch.key)

    def _lease_running(self) -> None:
        """Another run appeared: lease every batch in flight before telling it so."""
        for p in self.running.values():
            if p.lease is not None:
                continue
            b = p.batch
            p.lease = self._lease(b)
            # Neither can fail: newcomers compute nothing until this run says "shared".
            if not p.lease.try_acquire() or not self._claim(p, submitted=True):
                log.warning("step %s batch %d: its lease is held by another run", b.step, b.index)

    def _lease(self, b: PlannedBatch) -> FileLock:
        return self.store.lease(b.key, {"run": self.run_id, "step": b.step, "batch": b.index})
