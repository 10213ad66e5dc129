"""The driver of one run: the run lock, logging, signals, and the wiring of the planner
(plan.py), the scheduler (schedule.py), the executors (executors.py) and the recorder
(record.py). The finish order is written out in `run`.
"""

from __future__ import annotations

import contextlib
import queue
import signal
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from castore.errors import CastoreError, DamagedRef
from castore.pipeline import gil, runlog
from castore.pipeline.executors import check_executor, signatures_for
from castore.pipeline.neighbours import Neighbours
from castore.pipeline.plan import Planner
from castore.pipeline.progress import Progress
from castore.pipeline.record import Recorder, RunFacts
from castore.pipeline.runlog import log
from castore.pipeline.schedule import Scheduler
from castore.store.manifests import RunStatus, Target
from castore.store.runfolder import RunFolder

if TYPE_CHECKING:
    from castore.distiset import Distiset
    from castore.pipeline.pipeline import Pipeline
    from castore.store import FileLock, Store

SEAL_EVERY = 5.0  # seconds between periodic manifest seals and progress lines


class Runner:
    def __init__(
        self,
        pipeline: Pipeline,
        store: Store,
        *,
        parameters: dict[str, dict[str, Any]],
        use_cache: bool,
        executor: str,
        quiet: bool,
        target: Target | None,
        stop_grace: float,
        remote: Any = None,
        push: bool = False,
        ray_address: str | None = None,
        ray_storage: str = "store",
    ) -> None:
        check_executor(executor, ray_storage, remote, pipeline.steps.values())
        self.p, self.store, self.quiet, self.stop_grace = pipeline, store, quiet, stop_grace
        self.executor_kind, self.ray_address, self.ray_storage = executor, ray_address, ray_storage
        self.remote, self.push, self.use_cache = remote, push, use_cache
        self.sigs = signatures_for(pipeline, executor)
        self.sig = pipeline.signature(self.sigs)
        self.order = pipeline.topological()
        self.folder = RunFolder(store, pipeline.name, self.sig)
        self.stop, self.cancel = threading.Event(), threading.Event()
        self._told_late = False
        self._damaged_ref: str | None = None
        self.sched: Scheduler | None = None
        self.lock: FileLock | None = None
        self.progress = Progress(self.order, enabled=not quiet)
        self.planner = Planner.for_pipeline(pipeline, self.sigs, self.order)
        self.info = RunFacts(
            name=pipeline.name,
            signature=self.sig,
            run_id=uuid.uuid4().hex,
            started=datetime.now(UTC),
            edges=list(pipeline.edges),
            leaves=pipeline.leaves(),
            parameters=parameters,
            target=target or Target(kind="api"),
            use_cache=use_cache,
            previous=self._previous_ref(),
        )
        steps = {n: pipeline.steps[n] for n in self.order}
        self.recorder = Recorder(store, self.info, self.planner.plans, steps, self.sigs)

    def _previous_ref(self) -> str | None:
        try:
            return self.store.get_ref(self.p.name, self.sig)
        except DamagedRef as e:
            self._damaged_ref = str(e)  # said once logging is set up
            return None

    # -- entry ---------------------------------------------------------------------------

    @gil.short_switches()
    def run(self, *, distiset: bool = True) -> tuple[str, Distiset | None]:
        """Run; returns the final run manifest and, when asked, the Distiset (built under
        the run lock: a concurrent gc protects what a live run touches, including the
        leaf Arrow objects it writes)."""
        self.folder.create()
        handlers = runlog.start_logging(self.folder.live_log(self.info.run_id), self.quiet)
        lock = self.store.run_lock(self.info.run_id, {"name": self.p.name, "sig": self.sig})
        lock.acquire(timeout=10)  # a gc probing lock files holds one for an instant
        self.lock = lock
        restore: Any = lambda: None  # noqa: E731
        status: RunStatus = "failed"
        out: Distiset | None = None
        try:
            self._prepare()
            restore = self._install_signals()  # after _prepare: ray.init installs its own
            status = self._drive()
            self._late_interrupt(status)
        except CastoreError as e:
            self.recorder.error = str(e)
            raise
        except BaseException as e:
            self.recorder.error = f"{type(e).__name__}: {e}"
            status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            raise
        finally:
            try:
                # MUST, in this order: stop the workers, write the run folder, store the
                # log, seal (step manifests → run manifest → ref), push, build the Distiset.
                oid = self._finish(status)
                if status == "finished" and distiset:
                    from castore.distiset import Distiset

                    out = Distiset.from_manifest(self.store, oid)
                self._late_interrupt(status)
            finally:
                restore()  # only now: a Ctrl+C while sealing must not cut the seal short
                lock.release()
                runlog.stop_logging(handlers)
                self.folder.drop_live_log(self.info.run_id)
        if status in ("interrupted", "waiting"):
            parked = self.sched.parked if self.sched else []
            done, stopped = self.recorder.done_batches(), self.stop.is_set()
            raise runlog.stopped(self.p.name, status, done, parked, oid, interrupted=stopped)
        return oid, out

    def _late_interrupt(self, status: RunStatus) -> None:
        if status == "finished" and self.stop.is_set() and not self._told_late:
            self._told_late = True
            log.warning(
                "interrupt received after the last batch was done: ignored, the run is complete"
            )

    def _prepare(self) -> None:
        from castore.pipeline.remote_cache import RemoteCache

        if self._damaged_ref:
            log.warning("%s; this run replaces it", self._damaged_ref)
        self.recorder.inline = self.p.store_inline(self.store, self.sigs)
        self.recorder.pipeline_yaml = self.folder.place_pipeline_yaml(self.p.to_yaml(self.sigs))
        what = (self.p.name, self.sig[:12], len(self.order), self.store.root)
        log.info("pipeline %s signature %s: %d steps; store %s", *what)
        if not self.use_cache:
            log.info("use_cache=False: recomputing every batch")
        elif self.info.previous is not None:
            runlog.log_earlier_run(self.store, self.info.previous)
        rcache = RemoteCache(self.store, self.remote, push=self.push) if self.remote else None
        self.sched = sched = Scheduler(
            *(self.store, self.planner, self.recorder.steps, self.recorder),
            use_cache=self.use_cache,
            run_id=self.info.run_id,
            progress=self.progress,
            rcache=rcache,
            stop=self.stop,
            cancel=self.cancel,
        )
        if self.use_cache:  # before any lookup: a run that finished wrote its entries first
            assert self.lock is not None
            sched.neighbours = Neighbours(self.store, self.lock)
        if self.use_cache and self.recorder.replay(self.info.previous):
            return  # no workers, no "running" seal: the final seal follows at once
        ray_remote = self.remote if self.ray_storage == "remote" else None
        sched.start_workers(self.executor_kind, self.p, self.ray_address, ray_remote)
        self.recorder.seal("running")

    # -- the loop ------------------------------------------------------------------------

    def _drive(self) -> RunStatus:
        sched = self.sched
        assert sched is not None
        if self.planner.complete:
            return "finished"  # replayed
        sched.start_generators()
        last_seal = time.monotonic()
        while not self.planner.complete:
            if self.stop.is_set():
                sched.drain(self.stop_grace)
                # Batch jobs pending: the run cannot end before they do (exit 75, waiting).
                return "waiting" if sched.parked else "interrupted"
            sched.plan_all()
            sched.check_waiting()
            sched.submit_ready()
            if self.planner.complete:
                break  # everything was a cache hit: no reason to wait
            if sched.stalled():
                return "waiting"
            with contextlib.suppress(queue.Empty):
                sched.handle(sched.events.get(timeout=0.2))
                while True:
                    sched.handle(sched.events.get_nowait())
            if time.monotonic() - last_seal > SEAL_EVERY:
                self.recorder.seal("running")
                if not self.progress.live:
                    runlog.progress_line(self.planner.plans, self.recorder.tallies)
                last_seal = time.monotonic()
        return "finished"

    # -- the end -------------------------------------------------------------------------

    def _finish(self, status: RunStatus) -> str:
        sched = self.sched
        self.progress.close()
        if sched is not None:
            sched.stop_workers(failed=status == "failed", finished=status == "finished")
            sched.pack_indexes(finished=status == "finished")
        plans = self.planner.plans
        self.folder.materialize({x: plans[x].records() for x in self.info.leaves}, self.info.run_id)
        stats = {n: t.stats(plans[n]) for n, t in self.recorder.tallies.items()}
        if sched is not None:  # else it failed before planning: no summary to give
            runlog.log_summary(stats, self.p.name, status, self.folder.data)
        log_oid = self.folder.store_log(self.info.run_id)
        oid = self.recorder.seal(status, log_oid)
        if sched is not None and sched.rcache is not None:
            sched.rcache.finish(self.sig)
        return oid

    # -- signals and logging -------------------------------------------------------------

    def _install_signals(self) -> Any:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def handler(signum: int, _frame: Any) -> None:
            if self.stop.is_set():
                self.cancel.set()
                log.warning("second interrupt: cancelling in-flight batches")
            else:
                self.stop.set()

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

        def restore() -> None:
            for s, h in old.items():
                signal.signal(s, h)

        return restore
