"""Which batches run when: lookups (local, then the remote cache), leases, pending /
waiting / in-flight batches per step, retry with backoff and the on_error policy,
generators, and the replay of a finished run. It consumes the executors' typed events.

A cache hit is verified before it is trusted (Store.reuse): a corrupt output is
quarantined, its entry dropped, and only that batch is computed again.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from castore import jobctx
from castore.answers import Answers
from castore.errors import BatchWaiting, CastoreError, RowsFailed, StepFailed
from castore.hashing import entry_check, generator_end_key
from castore.pipeline.batch import (
    BatchResult,
    TableCache,
    entry_cost,
    entry_of,
    read_input,
    skipped_batch,
)
from castore.pipeline.claims import RowClaims
from castore.pipeline.executors import (
    BatchDone,
    BatchNotStarted,
    BatchStopped,
    Event,
    Events,
    Executor,
    GeneratorBatch,
    GeneratorEnd,
    Task,
    ThreadWorkers,
    make_executor,
    pickle_steps_by_value,
)
from castore.pipeline.generators import start_generator
from castore.pipeline.leasing import Leasing
from castore.pipeline.plan import PlannedBatch, Planner
from castore.pipeline.queues import Pending, Queues
from castore.pipeline.rows import PACK_AFTER, RowIndex, RowPlan, write_segment
from castore.pipeline.step import GeneratorStep, _Step
from castore.store import actionpack
from castore.store.models import ActionEntry
from castore.store.parquet import rows_match

if TYPE_CHECKING:
    from castore.pipeline.neighbours import Neighbours
    from castore.pipeline.progress import Progress
    from castore.pipeline.record import Recorder
    from castore.pipeline.remote_cache import RemoteCache
    from castore.store import Store

log = logging.getLogger("castore.run")

# Seconds a stopping run waits, once its batches gave up their LLM requests, for them to
# store the answers that came: Parquet writes, not requests.
GIVE_UP = 10.0


class Scheduler(Leasing):
    def __init__(
        self,
        store: Store,
        planner: Planner,
        steps: dict[str, _Step],
        recorder: Recorder,
        *,
        use_cache: bool,
        run_id: str,
        progress: Progress,
        rcache: RemoteCache | None,
        stop: threading.Event,
        cancel: threading.Event | None = None,
    ) -> None:
        self.store, self.planner, self.plans, self.steps = store, planner, planner.plans, steps
        self.recorder, self.use_cache, self.run_id = recorder, use_cache, run_id
        self.progress, self.rcache, self.stop = progress, rcache, stop
        # Set by a second Ctrl+C, or by `drain` when the grace period is over: batches in
        # flight give up their LLM requests (jobctx.ABANDON) and keep what was answered.
        self.cancel = cancel if cancel is not None else threading.Event()
        # LLM answers as they come (castore.answers): --no-cache reuses none.
        self.answers = Answers(store, run_id, recorder.info.signature) if use_cache else None
        self._checked: set[str] = set()  # objects verified for a hit in this run
        self.queues = {name: Queues() for name in self.plans}
        self.events: Events = Events()
        self.cache = TableCache()
        self.executor: Executor | None = None
        # Other live runs on this store (None: --no-cache, which leases nothing), and the
        # batches in flight, leased or not, by id of their Pending.
        self.neighbours: Neighbours | None = None
        self.running: dict[int, Pending] = {}
        self.claims = RowClaims(store, run_id)
        self.told_waits: set[str] = set()  # steps whose wait for another run's rows was said
        self.computed_keys: list[str] = []  # this run's new entries, packed at its end
        self.gen_threads: ThreadWorkers | None = None
        recorder.on_record = self._after_record
        self.row_indexes: dict[str, RowIndex] = {}  # row-wise steps', on a first miss
        self.parked: list[str] = []  # batches waiting for a provider's batch job

    def stalled(self) -> bool:
        """Nothing more can happen in this run: batches wait for batch jobs, and nothing
        is in flight, queued or still to come from a generator."""
        return (
            bool(self.parked)
            and self.inflight == 0
            and not any(q.pending or q.waiting for q in self.queues.values())
            and all(p.complete for p in self.plans.values() if p.kind == "generator")
        )

    @property
    def inflight(self) -> int:
        return sum(q.inflight for q in self.queues.values())

    # -- recording -----------------------------------------------------------------------

    def _after_record(
        self, step: str, key: str, outputs: list[str], cached: bool, failed: bool
    ) -> None:
        """Write-through of a new batch, and the progress display."""
        if not cached and not failed:
            self.computed_keys.append(key)
            if self.rcache is not None:
                # Its remote lease and row claim are let go once it is uploaded.
                self.rcache.upload(key, outputs, self.plans[step].fp)
        elif self.rcache is not None:
            self.rcache.release(key)
        plan, tally = self.plans[step], self.recorder.tallies[step]
        self.progress.update(step, len(plan.done), plan.total, plan.rows_done, tally.cached)

    # -- lookups -------------------------------------------------------------------------

    def _entry(self, key: str, *, local: bool = False, checked: bool = False) -> ActionEntry | None:
        """The local entry, else (read-through unless `local`) the remote's; `checked`:
        the caller verifies its outputs, which finds a missing one."""
        if not self.use_cache:
            return None
        entry = self.store.get_action(key, outputs_checked=checked)
        if entry is None and self.rcache is not None and not local:
            entry = self.rcache.lookup(key)
        return entry

    def reusable(self, key: str, *, local: bool = False) -> ActionEntry | None:
        """The entry for `key` when every output it names is intact (verified, then
        freshened so a concurrent gc keeps it) and its row counts are the objects'; else
        the entry is dropped and None returned, so only this batch is recomputed. `local`:
        this store's only (a generator thread asks; the remote's client is the scheduler's)."""
        entry = self._entry(key, local=local, checked=True)
        if entry is None:
            return None
        state: bool | None = True
        # What the outputs extend is earlier steps' outputs, mostly checked by their hits.
        for oid in [*entry.outputs, *(o for o in entry.needs() if o not in self._checked)]:
            state = self.store.check_reuse(oid)
            if state is not True:
                break
            self._checked.add(oid)
        if state is None:  # gone (collected, removed by hand): not a damaged cache
            log.info("action entry %s names a missing object; dropping it", key)
        elif state and self._counts_hold(key, entry):
            return entry
        else:
            why = "an output failed verification; recomputing it"
            if state:
                why = "its entry's row counts are wrong; recomputing it"
            log.warning("cached batch %s: %s", key[:12], why)
        self.store.delete_action(key)
        return None

    def _counts_hold(self, key: str, entry: ActionEntry) -> bool:
        """The entry's row counts are its objects': by its check when this store's runs
        wrote it, else against the (verified) objects' Parquet footers."""
        if entry.check is not None:
            return entry.check == entry_check(key, entry.outputs, entry.rows)
        return rows_match([self.store.path_of(o) for o in entry.outputs], entry.rows)

    def _lookup(self, batch: PlannedBatch, keys: RowPlan | None = None) -> bool:
        """Record a hit. A row-wise hit at planning (`keys` None) adds its rows to the
        step's stream by its segment, unread; one whose segment is gone or damaged gets
        its keys computed and the segment written again (same bytes, same id in the same
        stream), so its rows stay findable."""
        entry = self.reusable(batch.key)
        if entry is None:
            return False
        segment = entry.row_segment()
        intact = segment is not None and self.store.reuse(segment)
        if keys is None and self.steps[batch.step].row_wise:
            if intact:
                assert segment is not None
                self._index(batch.step).hit(segment)
            else:
                keys = self._row_keys(batch)
        if segment is not None and not intact:
            info = entry.row_info()
            segment = write_segment(self.store, keys, entry.outputs[0], info) if keys else None
        self.recorder.record(
            batch.step,
            batch.index,
            batch.key,
            entry.outputs,
            entry.rows,
            cached=True,
            cost=entry_cost(entry),
            row_index=segment,
            extends=bool(entry.needs()),
        )
        return True

    def plan_all(self) -> None:
        """Plan what the done prefixes cover; hits are recorded at once (and can make more
        batches plannable), misses queued with their row keys (row-wise steps), computed
        here in stream order: the n-th equal row of a step's input has its own key."""
        while batches := self.planner.next_batches():
            if self.rcache is not None and self.use_cache:  # ask the remote all at once
                have = self.store.get_action
                self.rcache.prefetch([b.key for b in batches if have(b.key) is None])
            for batch in batches:
                if self._lookup(batch):
                    continue
                rows = self._row_results(batch.step, self._row_keys(batch))
                self.queues[batch.step].pending.append(Pending(batch, rows=rows))

    def check_waiting(self) -> None:
        """Batches another run is computing: take the entry once it lands, or the lease
        once its holder finished without one (failed) or died."""
        if self.rcache is not None:
            self.rcache.prefetch([p.batch.key for q in self.queues.values() for p in q.waiting])
        for q in self.queues.values():
            still = []
            for p in q.waiting:
                if p.blockers is not None and self.claims.held(p.blockers):
                    still.append(p)
                    continue
                rc, theirs, fp = self.rcache, p.remote_blockers, self.plans[p.batch.step].fp
                if rc is not None and theirs is not None and rc.claims_held(fp, theirs):
                    still.append(p)
                    continue
                p.blockers = p.remote_blockers = None  # made or failed: the claim finds which
                if self._lookup(p.batch, p.rows):
                    continue
                if self._take_lease(p):
                    q.put_back(p)
                else:
                    still.append(p)
            q.waiting = still

    # -- submitting ----------------------------------------------------------------------

    def submit_ready(self) -> None:
        assert self.executor is not None
        if self.neighbours is not None and not self.neighbours.may_compute():
            return
        now = time.monotonic()
        for name, q in self.queues.items():
            limit = self.executor.inflight(self.steps[name].concurrency)
            # Plan order within a step (or its reverse: Queues.backward); a retry waiting
            # for its backoff holds the queue only for its own step.
            while q.pending and q.inflight < limit:
                if q.next().not_before > now:
                    break
                p = q.take()
                if not self._take_lease(p):
                    q.waiting.append(p)
                elif p.batch.index not in self.plans[name].done:  # not a hit meanwhile
                    q.inflight += 1
                    p.computing = True
                    self.running[id(p)] = p
                    self.executor.submit(
                        Task(p.batch, self.steps[name], p, p.rows, computed=p.computed)
                    )

    def _index(self, step: str) -> RowIndex:
        index = self.row_indexes.get(step)
        if index is None:
            rc = self.rcache
            index = RowIndex(
                self.store,
                self.plans[step].fp,
                fetch_segments=rc.fetch_segments if rc is not None else None,
                fetch=rc.fetch if rc is not None else None,
            )
            self.row_indexes[step] = index
        return index

    def pack_indexes(self, *, finished: bool) -> None:
        """At a run's end: its journaled entries (and dead runs') go into an entry pack
        (castore.store.actionpack), with, after a finished run, its loose entry files;
        and a finished run merges row-wise steps' segments into a pack when many are
        outside it (castore.store.rowpack), so the next run's first miss reads one object
        instead of a segment per batch."""
        loose: list[str] = []
        if finished:
            for name, index in self.row_indexes.items():
                # Fewer new segments are packed by a later load, once they add up.
                if self.recorder.tallies[name].computed >= PACK_AFTER:
                    RowIndex.load(self.store, index.fingerprint)
            ends = [
                generator_end_key(self.plans[n].fp)
                for n, s in self.steps.items()
                if isinstance(s, GeneratorStep)
            ]
            loose = self.computed_keys + ends
        actionpack.pack_run(self.store, self.run_id, loose)

    def _row_keys(self, batch: PlannedBatch) -> RowPlan | None:
        """A row-wise step's batch: its row keys, in stream order."""
        step = self.steps[batch.step]
        if not step.row_wise:
            return None
        table = read_input(self.store, batch.slice_lists(), self.cache, step)
        return self._index(batch.step).keys(step, table)

    def _row_results(self, step: str, keys: RowPlan | None) -> RowPlan | None:
        """A batch miss: the rows made before. --no-cache finds none, but still writes the
        row keys of what it computes."""
        if keys is None or not self.use_cache:
            return keys
        return self.row_indexes[step].found(keys)

    # -- events --------------------------------------------------------------------------

    def handle(self, event: Event, *, draining: bool = False) -> None:
        if isinstance(event, GeneratorBatch):
            r = event.result
            if event.cached:
                self.recorder.record(
                    event.step, event.index, event.key, r.outputs, r.rows, cached=True
                )
            else:
                self.recorder.record(
                    event.step, event.index, event.key, r.outputs, r.rows, cached=False, result=r
                )
        elif isinstance(event, GeneratorEnd):
            self._generator_end(event)
        elif isinstance(event, BatchNotStarted):
            p = self._settle(event.task)
            self._release(p)
            self.queues[p.batch.step].put_back(p)
        elif isinstance(event, BatchDone):
            self._done(event.task, event.result)
        elif isinstance(event, BatchStopped):
            self._stopped(event.task, event.error)
        else:
            self._failed(event.task, event.error, draining)

    def _generator_end(self, event: GeneratorEnd) -> None:
        plan = self.plans[event.step]
        if event.error is not None:
            raise StepFailed.logged(event.step, event.error)
        plan.total = event.batches
        if self.rcache is not None:
            self.rcache.upload(generator_end_key(plan.fp), [])

    def _settle(self, task: Task) -> Pending:
        p: Pending = task.ticket
        p.computing = False
        self.queues[p.batch.step].inflight -= 1
        self.running.pop(id(p), None)
        if p.lease is not None:
            p.lease.release()  # the entry (if any) is written: waiters can go on
        p.unclaim()  # so is its row-key segment
        return p

    def _done(self, task: Task, res: BatchResult) -> None:
        p = self._settle(task)
        b = p.batch
        if not res.entry_written and res.skipped_error is None:
            # Ray workers write objects; the driver alone writes action entries.
            self.store.put_action(b.key, entry_of(b.step, res), made_here=True)
        if res.skipped_error:
            log.warning(
                "step %s batch %d: %s; rows kept, batch not cached (the next run retries it)",
                b.step,
                b.index,
                res.skipped_error,
            )
        self._computed(b, res)

    def _computed(self, b: PlannedBatch, res: BatchResult) -> None:
        self.recorder.record(
            b.step, b.index, b.key, res.outputs, res.rows, cached=False, result=res
        )

    def _stopped(self, task: Task, error: BaseException) -> None:
        """A batch that gave up its requests as the run stopped: not done, and neither
        retried nor failed; the rows answered (a row-wise step's) were stored by key."""
        p = self._settle(task)
        self._release(p)
        b = p.batch
        if isinstance(error, RowsFailed):  # paid for
            self.recorder.tallies[b.step].spend(error.tokens, error.usd, error.seconds)
        kept = " (its answered rows are kept)" if p.rows is not None else ""
        log.info("step %s batch %d: stopped with the run%s", b.step, b.index, kept)
        self.queues[b.step].put_back(p)

    def _failed(self, task: Task, error: BaseException, draining: bool) -> None:
        """Retry with exponential backoff, then on_error: 'skip' keeps the rows with None
        outputs (not cached), 'fail' fails the run."""
        p = self._settle(task)
        self._release(p)
        b, step = p.batch, task.step
        if isinstance(error, BatchWaiting):  # neither done nor failed: the next run polls
            self.parked.append(f"step {b.step} batch {b.index}: {error}")
            log.info("step %s batch %d waits: %s", b.step, b.index, error)
            return
        if isinstance(error, StepFailed):
            raise StepFailed.logged(b.step, error)
        if isinstance(error, RowsFailed):  # paid for, though the batch failed
            self.recorder.tallies[b.step].spend(error.tokens, error.usd, error.seconds)
        if p.attempt < step.max_retries and not draining:
            delay = step.retry_backoff * (2**p.attempt)
            log.warning(
                "step %s batch %d failed (%s); retry %d/%d in %.1fs",
                b.step,
                b.index,
                error,
                p.attempt + 1,
                step.max_retries,
                delay,
            )
            p.attempt += 1
            p.not_before = time.monotonic() + delay
            if p.rows is not None and isinstance(error, RowsFailed):
                # The attempt stored the rows that succeeded: the retry asks for the rest.
                self._index(b.step).refresh()
                p.rows = self._row_results(b.step, p.rows)
            self.queues[b.step].pending.append(p)
            return
        if step.on_error != "skip":
            raise StepFailed.logged(b.step, error)
        msg = f"{type(error).__name__}: {error}"
        log.warning(
            "step %s batch %d failed: %s; rows kept with None outputs, not cached (the next "
            "run retries it)",
            b.step,
            b.index,
            msg,
        )
        res = skipped_batch(self.store, step, b.slice_lists(), msg, self.cache)
        self._computed(b, res)

    def start_workers(
        self, kind: str, pipeline: Any, ray_address: str | None, ray_remote: Any
    ) -> None:
        """Generator threads and the executor for batches ('threads', 'processes', 'ray')."""
        steps = self.steps.values()
        rc = self.rcache if self.rcache is not None and self.rcache.active else None
        # An offline LLM step records its batch jobs in the store (and on the remote).
        jobctx.use_store(
            self.store, rc and rc.remote, push=bool(rc and rc.leases), pipeline=pipeline.name
        )
        from castore.arrowpandas import spare_pandas_import  # here: replays never load it

        spare_pandas_import()  # before any worker (worker processes: calls.to_table)
        self.gen_threads = ThreadWorkers(max(sum(isinstance(s, GeneratorStep) for s in steps), 1))
        if kind == "ray":
            pickle_steps_by_value(pipeline)
        self.executor = make_executor(
            kind,
            self.store,
            self.events,
            concurrency=[s.concurrency for s in steps],
            stop=self.stop,
            abandon=self.cancel,
            answers=self.answers,
            cache=self.cache,
            ray_address=ray_address,
            ray_remote=ray_remote,
        )

    def stop_workers(self, *, failed: bool = False, finished: bool = False) -> None:
        if failed and self.executor is not None:
            self.executor.hold()  # a batch queued ahead does not start
            self.settle_storing()
        for pool in (self.gen_threads, self.executor):
            if pool is not None:
                pool.shutdown()
        if self.answers is not None:
            if self.answers.reused:
                log.info("%d LLM answers a stopped run received were used", self.answers.reused)
            self.answers.close(finished=finished)
        for step in self.steps.values():
            step._in_run = False  # called by hand again, process sees rows as given
            if step._loaded:  # loaded in this process (threads); workers' copies die
                step._loaded = False
                try:
                    step.unload()
                except Exception as e:  # a failing unload must not lose the run's seal
                    log.warning("step %s: unload() failed: %s", step.name, e)
        for q in self.queues.values():  # a library run's process lives on: let go now
            for p in (*q.pending, *q.waiting):
                self._release(p)
        if self.neighbours is not None:
            self.neighbours.done()  # no run needs to wait for this one any more

    def start_generators(self) -> None:
        for name, step in self.steps.items():
            if isinstance(step, GeneratorStep):
                start_generator(self, name)

    def drain(self, grace: float) -> None:
        """After Ctrl+C: no new batches; wait up to `grace` seconds for those in flight.
        Then, or at a second Ctrl+C (which sets `cancel`), batches in flight give up their
        LLM requests: their answered rows are stored by key (row-wise steps; any step's
        answers are in the run's journal, castore.answers), which takes a moment (up to
        GIVE_UP seconds is waited for); other work is abandoned."""
        log.warning(
            "stopping: no new batches; waiting up to %.0fs for %d in flight (Ctrl+C again "
            "to cancel them)",
            grace,
            self.inflight,
        )
        if not self._handle_until(lambda: not self.inflight or self.cancel.is_set(), grace):
            log.warning("grace period over: cancelling in-flight batches")
        self.cancel.set()
        if self.executor is None or self.executor.abandon is None:
            return
        if self._asking():
            log.warning("keeping the answers that came for the batches in flight")
            self._handle_until(lambda: not self._asking(), GIVE_UP)

    def _asking(self) -> bool:
        """An LLM step's batch is in flight (giving up its requests, once `cancel` is set)."""
        return any(getattr(self.steps[p.batch.step], "llm", None) for p in self.running.values())

    def settle_storing(self, grace: float = 30.0) -> None:
        """After a failure: batches whose `process` returned are paid for, so wait (up to
        `grace` seconds) for them to be stored and record them: the failed run's manifest
        and its partial Distiset have them. Calls still running are not waited for."""
        stored = lambda: all(p.computing for p in self.running.values())  # noqa: E731
        self._handle_until(stored, grace, failed=True)

    def _handle_until(self, done: Callable[[], bool], grace: float, failed: bool = False) -> bool:
        """Handle events (no retries) until `done()`; False when `grace` seconds passed
        first. `failed`: the run has failed already, so another failure changes nothing."""
        deadline = time.monotonic() + grace
        while not done():
            if time.monotonic() > deadline:
                return False
            with contextlib.suppress(queue.Empty):
                event = self.events.get(timeout=0.2)
                try:
                    self.handle(event, draining=True)
                except CastoreError:
                    if not failed:
                        raise
        return True
