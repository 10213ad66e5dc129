"""The driver of one run: plans batches deterministically, looks up action keys, runs
misses on an executor, seals manifests and moves the ref.

Batch k of a step is rows [k*B, (k+1)*B) of the concatenation of its predecessor's
outputs in batch order, whatever order work finished in (DESIGN.md "Running" 2). A batch
is planned as soon as the contiguous prefix of its predecessors' done batches covers it,
so downstream work starts early while memory holds only in-flight batches.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import os
import queue
import random
import shutil
import signal
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from castore.errors import CastoreError, DamagedRef, PipelineError, RunInterrupted, StepFailed
from castore.hashing import hash_json
from castore.pipeline.batch import (
    BatchResult,
    Slice,
    TableCache,
    call_process,
    check_outputs,
    execute_batch,
    execute_in_process,
    read_input,
    skipped_batch,
    store_batch,
)
from castore.pipeline.executors import ProcessWorkers, ThreadWorkers
from castore.pipeline.progress import Progress
from castore.pipeline.remote_cache import RemoteCache
from castore.pipeline.step import GeneratorStep, GlobalStep, _Step, normalize_output, to_table
from castore.store.exports import Placer, is_link_to, stamp
from castore.store.locks import FileLock
from castore.store.manifests import (
    BatchRecord,
    RunManifest,
    RunStatus,
    StepManifest,
    StepRef,
    StepStats,
    Target,
)
from castore.store.models import ActionEntry

if TYPE_CHECKING:
    from castore.distiset import Distiset
    from castore.pipeline.pipeline import Pipeline
    from castore.store import Store

log = logging.getLogger("castore.run")

SEAL_EVERY = 5.0  # seconds between periodic manifest seals and progress lines


@dataclass
class Planned:
    step: str
    index: int
    key: str
    slices: list[list[Slice]]
    attempt: int = 0
    not_before: float = 0.0
    lease: FileLock | None = None


class Stream:
    """The rows a step has produced, as (object, rows) segments of its done prefix."""

    def __init__(self) -> None:
        self.segs: list[tuple[str, int]] = []
        self.starts: list[int] = []  # first row of each segment
        self.rows = 0

    def append(self, oid: str, n: int) -> None:
        self.starts.append(self.rows)
        self.segs.append((oid, n))
        self.rows += n

    def take(self, start: int, end: int) -> list[Slice]:
        """Slices covering rows [start, end)."""
        out: list[Slice] = []
        i = max(bisect.bisect_right(self.starts, start) - 1, 0)
        while start < end and i < len(self.segs):
            oid, n = self.segs[i]
            off = start - self.starts[i]
            if 0 <= off < n:
                length = min(n - off, end - start)
                out.append((oid, off, length))
                start += length
            i += 1
        return out


def route_choice(key: str, n: int, targets: list[str]) -> list[str]:
    """The successors a batch goes to: seeded from its action key, so deterministic."""
    rng = random.Random(int(key[:16], 16))
    return rng.sample(sorted(targets), min(n, len(targets)))


@dataclass
class StepState:
    name: str
    step: _Step
    fp: str
    sig: str
    preds: list[str]
    route: tuple[int, list[str]] | None = None  # (n, targets) when batches are routed
    done: dict[int, BatchRecord] = field(default_factory=dict)
    planned: int = 0
    inflight: int = 0
    total: int | None = None  # batches, once known
    prefix: int = 0  # contiguous done batches from 0
    out: Stream = field(default_factory=Stream)
    routed: dict[str, Stream] = field(default_factory=dict)
    pending: deque[Planned] = field(default_factory=deque)  # planned, not yet submitted
    waiting: list[Planned] = field(default_factory=list)  # leased by another run
    rows_done: int = 0
    columns: list[tuple[str, str]] = field(default_factory=list)
    stats: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(
            (
                "cached",
                "computed",
                "failed",
                "rows_cached",
                "rows_computed",
                "seconds",
                "seconds_saved",
                "tokens_spent",
                "tokens_saved",
            ),
            0,
        )
    )

    @property
    def complete(self) -> bool:
        return self.total is not None and self.prefix >= self.total

    def stream_for(self, successor: str) -> Stream:
        if self.route is None:
            return self.out
        return self.routed.setdefault(successor, Stream())

    def add(self, index: int, record: BatchRecord) -> None:
        self.done[index] = record
        self.rows_done += sum(record.rows)
        while self.prefix in self.done:
            rec = self.done[self.prefix]
            chosen = route_choice(rec.key, *self.route) if self.route else []
            for oid, n in zip(rec.outputs, rec.rows, strict=True):
                self.out.append(oid, n)
                for target in chosen:
                    self.stream_for(target).append(oid, n)
            self.prefix += 1


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
        if executor not in ("threads", "processes", "ray"):
            raise PipelineError(
                f"unknown executor {executor!r}: use 'threads', 'processes' or 'ray'"
            )
        self.p = pipeline
        self.store = store
        self.parameters = parameters
        self.use_cache = use_cache
        self.executor_kind = executor
        self.quiet = quiet
        self.target = target or Target(kind="api")
        self.stop_grace = stop_grace
        self.sigs = pipeline.signatures()
        self.sig = pipeline.signature(self.sigs)
        self.run_id = uuid.uuid4().hex
        self.started = datetime.now(UTC)
        self.order = pipeline.topological()
        self.states = {
            n: StepState(
                n,
                pipeline.steps[n],
                self.sigs[n]["fp"],
                self.sigs[n]["sig"],
                pipeline.predecessors(n),
                route=pipeline.routes.get(n),
            )
            for n in self.order
        }
        self.done_q: queue.Queue[Any] = queue.Queue()
        self.cache = TableCache()
        self.stop = threading.Event()
        self.cancel = threading.Event()
        self._told_late = False
        self.error: str | None = None
        self.run_dir = Path(store.layout.run_dir(pipeline.name, self.sig))
        self.yaml_oid: str | None = None
        self.remote = remote
        self.push = push
        self.ray_address = ray_address
        self.ray: Any = None
        if ray_storage not in ("store", "remote"):
            raise PipelineError(f"ray_storage must be 'store' or 'remote', not {ray_storage!r}")
        if ray_storage == "remote" and (executor != "ray" or remote is None):
            raise PipelineError("ray_storage='remote' needs executor='ray' and a remote")
        self.ray_storage = ray_storage
        self.rcache: RemoteCache | None = None

    # -- entry ---------------------------------------------------------------------------

    def run(self) -> Distiset:
        from castore.distiset import Distiset

        handlers = self._start_logging()
        lock = self.store.run_lock(self.run_id, {"name": self.p.name, "sig": self.sig})
        # A gc probing lock files holds a shared lock for an instant: wait it out.
        lock.acquire(timeout=10)
        restore: Any = lambda: None  # noqa: E731
        status: RunStatus = "failed"
        distiset: Distiset | None = None
        try:
            self._prepare()
            # After _prepare: ray.init installs handlers of its own.
            restore = self._install_signals()
            status = self._drive()
            self._late_interrupt(status)
        except CastoreError as e:
            self.error = str(e)
            raise
        except BaseException as e:
            self.error = f"{type(e).__name__}: {e}"
            status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            raise
        finally:
            try:
                manifest_oid = self._finish(status)
                if status == "finished":
                    # Under the run lock: a concurrent gc protects what a live run touches,
                    # including the leaf Arrow objects this writes.
                    distiset = Distiset.from_manifest(self.store, manifest_oid)
                    self._late_interrupt(status)
            finally:
                # Only now: a Ctrl+C while the manifest is sealed must not cut it short.
                restore()
                lock.release()
                self._stop_logging(handlers)
        if status == "interrupted":
            err = RunInterrupted(
                f"run {self.p.name} interrupted: {self._done_batches()} batches are stored; "
                f"`cas resume {self.p.name}` (or running it again) continues"
            )
            err.run_oid = manifest_oid
            raise err
        assert distiset is not None
        return distiset

    def _late_interrupt(self, status: RunStatus) -> None:
        if status == "finished" and self.stop.is_set() and not self._told_late:
            self._told_late = True
            log.warning(
                "interrupt received after the last batch was done: ignored, the run is complete"
            )

    # -- setup ---------------------------------------------------------------------------

    def _prepare(self) -> None:
        # Read before the first seal moves the ref to this run.
        try:
            self.prev_oid = self.store.get_ref(self.p.name, self.sig)
        except DamagedRef as e:
            # This run's first seal writes a good ref over it; nothing is lost.
            log.warning("%s; this run replaces it", e)
            self.prev_oid = None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        text = self.p.to_yaml(self.sigs)
        (self.run_dir / "pipeline.yaml").write_text(text, encoding="utf-8")
        self.yaml_oid = self.store.put_bytes(text.encode("utf-8"))
        log.info(
            "pipeline %s signature %s: %d steps; store %s",
            self.p.name,
            self.sig[:12],
            len(self.order),
            self.store.root,
        )
        if self.use_cache:
            self._log_earlier_run()
        else:
            log.info("use_cache=False: recomputing every batch")
        self.progress = Progress(self.order, enabled=not self.quiet)
        if self.remote is not None:
            self.rcache = RemoteCache(self.store, self.remote, push=self.push)
        self.replayed = self.use_cache and self._replay()
        if self.replayed:
            return  # no workers, no "running" seal: the final seal follows at once
        nworkers = sum(s.step.concurrency for s in self.states.values())
        gen_threads = sum(isinstance(s.step, GeneratorStep) for s in self.states.values())
        self.threads = ThreadWorkers(min(nworkers, 256) + gen_threads, self.done_q)
        self.procs = (
            ProcessWorkers(os.cpu_count() or 2, self.done_q)
            if self.executor_kind == "processes"
            else None
        )
        if self.executor_kind == "ray":
            from castore.pipeline.executors import RayWorkers

            _pickle_steps_by_value(self.p)
            self.ray = RayWorkers(self.done_q, address=self.ray_address)
        self._seal("running")

    def _log_earlier_run(self) -> None:
        from castore.store.manifests import load_model

        prev = self.prev_oid
        if prev is None:
            return
        try:
            run = load_model(self.store, prev, RunManifest)
        except CastoreError:
            return
        log.info(
            "loading from cache: an earlier run (%s, %s) of this pipeline exists",
            run.status,
            run.started.strftime("%Y-%m-%d %H:%M:%S"),
        )
        for name, st in run.stats.items():
            total = f"/{st.batches_total}" if st.batches_total is not None else ""
            log.info(
                "  step %s: %d%s batches done earlier (reused when still in the store)",
                name,
                st.batches_cached + st.batches_computed,
                total,
            )

    # -- the loop ------------------------------------------------------------------------

    def _replay(self) -> bool:
        """A finished earlier run of this exact pipeline whose objects are all present is
        reused whole: no planning and no lookups, only re-materialization."""
        from castore.store.manifests import load_model

        prev = self.prev_oid
        if prev is None:
            return False
        try:
            run = load_model(self.store, prev, RunManifest)
            if run.status != "finished":
                return False
            steps = {r.name: load_model(self.store, r.manifest, StepManifest) for r in run.steps}
        except CastoreError:
            return False
        if set(steps) != set(self.states) or not all(
            m.complete
            and m.signature == self.states[n].sig
            and all(not b.failed and all(map(self.store.reuse, b.outputs)) for b in m.batches)
            for n, m in steps.items()
        ):
            return False
        for name, man in steps.items():
            st = self.states[name]
            for i, b in enumerate(man.batches):
                self._record(
                    st, i, b.key, b.outputs, b.rows, cached=True, cost=(b.seconds, b.tokens)
                )
            st.total = len(man.batches)
            st.columns = man.columns
        log.info("every batch of this pipeline is in the store: no step work to do")
        return True

    def _drive(self) -> RunStatus:
        if self.replayed:
            return "finished"
        for st in self.states.values():
            if isinstance(st.step, GeneratorStep):
                self._start_generator(st)
        last_seal = time.monotonic()
        while not all(s.complete for s in self.states.values()):
            if self.stop.is_set():
                return self._drain()
            self._plan_all()
            self._check_waiting()
            self._submit_ready()
            if all(s.complete for s in self.states.values()):
                break  # everything was a cache hit: no reason to wait
            try:
                item = self.done_q.get(timeout=0.2)
            except queue.Empty:
                item = None
            while item is not None:
                self._handle(*item)
                try:
                    item = self.done_q.get_nowait()
                except queue.Empty:
                    item = None
            if time.monotonic() - last_seal > SEAL_EVERY:
                self._seal("running")
                if not self.progress.live:
                    self._progress()
                last_seal = time.monotonic()
        return "finished"

    def _drain(self) -> RunStatus:
        inflight = sum(s.inflight for s in self.states.values())
        log.warning(
            "stopping: no new batches; waiting up to %.0fs for %d in flight (Ctrl+C again "
            "to cancel them)",
            self.stop_grace,
            inflight,
        )
        deadline = time.monotonic() + self.stop_grace
        while any(s.inflight for s in self.states.values()) and not self.cancel.is_set():
            if time.monotonic() > deadline:
                log.warning("grace period over: abandoning in-flight batches")
                break
            with contextlib.suppress(queue.Empty):
                self._handle(*self.done_q.get(timeout=0.2), draining=True)
        return "interrupted"

    # -- planning ------------------------------------------------------------------------

    def _plan_all(self) -> None:
        progress = True
        while progress:
            progress = False
            for name in self.order:
                st = self.states[name]
                if isinstance(st.step, GeneratorStep) or st.total is not None:
                    continue
                for planned in self._plan_step(st):
                    progress = True
                    self._lookup_or_queue(st, planned)

    def _plan_step(self, st: StepState) -> list[Planned]:
        preds = [self.states[p] for p in st.preds]
        streams = [p.stream_for(st.name) for p in preds]
        ready = all(p.complete for p in preds)
        out: list[Planned] = []
        if isinstance(st.step, GlobalStep):
            if ready:
                total = self._aligned_total(st, preds, streams)
                out.append(self._planned(st, 0, [s.take(0, total) for s in streams]))
                st.total = 1
            return out
        b = st.step.input_batch_size
        while True:
            start = st.planned * b
            if ready:
                total = self._aligned_total(st, preds, streams)
                if start >= total:
                    st.total = st.planned
                    return out
                end = min(start + b, total)
            elif min(s.rows for s in streams) >= start + b:
                end = start + b
            else:
                return out
            out.append(self._planned(st, st.planned, [s.take(start, end) for s in streams]))

    @staticmethod
    def _aligned_total(st: StepState, preds: list[StepState], streams: list[Stream]) -> int:
        totals = {p.name: s.rows for p, s in zip(preds, streams, strict=True)}
        if len(set(totals.values())) > 1:
            shown = ", ".join(f"{k} ({v} rows)" for k, v in totals.items())
            raise PipelineError(
                f"step {st.name}: its predecessors differ in length: {shown}; rows are "
                "aligned one to one"
            )
        return next(iter(totals.values()))

    def _planned(self, st: StepState, index: int, slices: list[list[Slice]]) -> Planned:
        st.planned = index + 1
        desc = [[list(s) for s in pred] for pred in slices]
        return Planned(st.name, index, hash_json({"fp": st.fp, "in": desc}), slices)

    def _entry(self, key: str) -> ActionEntry | None:
        """The local action entry, else (read-through) the remote's."""
        if not self.use_cache:
            return None
        entry = self.store.get_action(key)
        if entry is None and self.rcache is not None:
            entry = self.rcache.lookup(key)
        return entry

    def _reusable(self, key: str) -> ActionEntry | None:
        """The entry for `key` when every output it names is intact (verified, then
        freshened so a concurrent gc keeps it); a corrupt output is quarantined and its
        entry dropped, so only this batch is recomputed."""
        entry = self._entry(key)
        if entry is None:
            return None
        if all(self.store.reuse(o) for o in entry.outputs):
            if self.store.rows_match(entry.outputs, entry.rows):
                return entry
            log.warning(
                "cached batch %s: its entry's row counts are wrong; recomputing it", key[:12]
            )
        else:
            log.warning("cached batch %s: an output failed verification; recomputing it", key[:12])
        self.store.delete_action(key)
        return None

    def _lookup(self, st: StepState, planned: Planned) -> bool:
        """Record a cache hit; the outputs are freshened so a concurrent gc keeps them."""
        entry = self._reusable(planned.key)
        if entry is None:
            return False
        self._record(
            st,
            planned.index,
            planned.key,
            entry.outputs,
            entry.rows,
            cached=True,
            cost=_cost(entry),
        )
        return True

    def _lookup_or_queue(self, st: StepState, planned: Planned) -> None:
        if not self._lookup(st, planned):
            st.pending.append(planned)

    def _check_waiting(self) -> None:
        """Batches another run is computing: take the entry once it lands, or the lease
        once its holder finished without one (failed) or died."""
        for st in self.states.values():
            still = []
            for planned in st.waiting:
                if self._lookup(st, planned):
                    continue
                if planned.lease is not None and planned.lease.try_acquire():
                    st.pending.appendleft(planned)
                else:
                    still.append(planned)
            st.waiting = still

    # -- execution -----------------------------------------------------------------------

    def _submit_ready(self) -> None:
        now = time.monotonic()
        for st in self.states.values():
            # Plan order within a step; a retry waiting for its backoff holds the queue
            # only for its own step.
            while st.pending and st.inflight < st.step.concurrency:
                if st.pending[0].not_before > now:
                    break
                planned = st.pending.popleft()
                if self._take_lease(planned):
                    self._submit(st, planned)
                else:
                    st.waiting.append(planned)

    def _take_lease(self, planned: Planned) -> bool:
        """A lease on the action key, so two runs never pay for the same batch at once.
        Without the cache there is nothing to share, so no lease."""
        if not self.use_cache:
            return True
        if planned.lease is None:
            planned.lease = self.store.lease(
                planned.key, {"run": self.run_id, "step": planned.step, "batch": planned.index}
            )
        if planned.lease.try_acquire():
            # The holder before us may have finished while we queued.
            if self._lookup(self.states[planned.step], planned):
                planned.lease.release()
                return True  # recorded as a hit; nothing to submit
            return True
        return False

    def _submit(self, st: StepState, planned: Planned) -> None:
        if planned.index in st.done:
            return  # became a hit while taking the lease
        st.inflight += 1
        tag = ("batch", planned)
        if self.ray is not None and self.ray_storage == "remote":
            table = read_input(self.store, planned.slices, self.cache)
            self.ray.submit(
                tag, self.remote.url, st.step, table, resources=st.step.resources, via_remote=True
            )
        elif self.ray is not None:
            self.ray.submit(
                tag,
                str(self.store.root),
                st.step,
                planned.key,
                planned.slices,
                resources=st.step.resources,
            )

        elif self.procs is not None:
            self.procs.submit(
                tag,
                execute_in_process,
                str(self.store.root),
                st.step,
                planned.key,
                planned.slices,
            )
        else:
            self.threads.submit(
                tag,
                lambda p=planned, s=st.step: execute_batch(
                    self.store, s, p.key, p.slices, self.cache
                ),
            )

    def _handle(self, kind: Any, payload: Any, error: Any, *, draining: bool = False) -> None:
        if kind == "gen-thread":  # the wrapper reports through its own messages
            return
        if kind == "gen-end":
            st = self.states[payload[0]]
            st.total = payload[1]
            if self.rcache is not None and error is None:
                self.rcache.upload(hash_json({"fp": st.fp, "generator_end": True}), [])
            if error is not None:
                self._fail(st, error)
            return
        if isinstance(kind, tuple) and kind[0] == "gen":
            st = self.states[kind[1]]
            index, key, res = payload
            self._record(st, index, key, res.outputs, res.rows, cached=False, result=res)
            return
        planned: Planned = kind[1]
        st = self.states[planned.step]
        st.inflight -= 1
        if planned.lease is not None:
            planned.lease.release()  # the entry (if any) is written: waiters can go on
        if error is None:
            self._handle_done(st, planned, payload)
            return
        if isinstance(error, StepFailed):
            self._fail(st, error)
        if planned.attempt < st.step.max_retries and not draining:
            delay = st.step.retry_backoff * (2**planned.attempt)
            log.warning(
                "step %s batch %d failed (%s); retry %d/%d in %.1fs",
                st.name,
                planned.index,
                error,
                planned.attempt + 1,
                st.step.max_retries,
                delay,
            )
            planned.attempt += 1
            planned.not_before = time.monotonic() + delay
            st.pending.append(planned)
            return
        if st.step.on_error == "skip":
            msg = f"{type(error).__name__}: {error}"
            log.warning(
                "step %s batch %d failed: %s; rows kept with None outputs, not "
                "cached (the next run retries it)",
                st.name,
                planned.index,
                msg,
            )
            res = skipped_batch(self.store, st.step, planned.slices, msg, self.cache)
            self._record(
                st, planned.index, planned.key, res.outputs, res.rows, cached=False, result=res
            )
            return
        self._fail(st, error)

    def _handle_done(self, st: StepState, planned: Planned, res: BatchResult) -> None:
        if self.ray_storage == "remote":
            from castore.remote import fetch_object

            # Read through: the worker wrote to the remote; verified on the way in.
            for oid in res.outputs:
                if not self.store.has(oid):
                    fetch_object(self.store, self.remote, oid)
        if not res.entry_written and res.skipped_error is None:
            # Ray workers write objects; the driver alone writes action entries.
            info = {"step": st.name, "seconds": round(res.seconds, 6), "tokens": res.tokens}
            self.store.put_action(
                planned.key, ActionEntry(outputs=res.outputs, rows=res.rows, info=info)
            )
        if res.skipped_error:
            log.warning(
                "step %s batch %d: %s; rows kept, batch not cached (the next run retries it)",
                st.name,
                planned.index,
                res.skipped_error,
            )
        self._record(
            st, planned.index, planned.key, res.outputs, res.rows, cached=False, result=res
        )

    def _fail(self, st: StepState, error: BaseException) -> None:
        msg = str(error) if isinstance(error, StepFailed) else f"{type(error).__name__}: {error}"
        if not isinstance(error, StepFailed):
            msg = f"step {st.name} failed: {msg}"
        log.error("%s", msg)
        raise StepFailed(msg)

    def _record(
        self,
        st: StepState,
        index: int,
        key: str,
        outputs: list[str],
        rows: list[int],
        *,
        cached: bool,
        result: BatchResult | None = None,
        cost: tuple[float, int] = (0.0, 0),
    ) -> None:
        """A batch is done: `result` when computed now; for a hit, `cost` is (seconds,
        tokens) that computing it took once, i.e. what the cache saved."""
        failed = result is not None and result.skipped_error is not None
        seconds, tokens = (result.seconds, result.tokens) if result else cost
        st.add(
            index,
            BatchRecord(
                key=key,
                outputs=outputs,
                rows=rows,
                cached=cached,
                seconds=round(seconds, 6),
                tokens=tokens,
                failed=failed,
            ),
        )
        n = sum(rows)
        if self.rcache is not None and not cached and not failed:
            self.rcache.upload(key, outputs)
        if cached:
            st.stats["cached"] += 1
            st.stats["rows_cached"] += n
            st.stats["seconds_saved"] += seconds
            st.stats["tokens_saved"] += tokens
        else:
            st.stats["failed" if failed else "computed"] += 1
            st.stats["rows_computed"] += n
            st.stats["seconds"] += seconds
            st.stats["tokens_spent"] += tokens
        if not st.columns and outputs:
            st.columns = result.columns if result is not None else self._columns_of(outputs[0])
        self.progress.update(
            st.name,
            len(st.done),
            st.total,
            st.rows_done,
            int(st.stats["cached"]),
        )

    def _columns_of(self, oid: str) -> list[tuple[str, str]]:
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(self.store.path_of(oid))
        except (OSError, ValueError):
            return []
        return [(f.name, str(f.type)) for f in schema]

    # -- generators ----------------------------------------------------------------------

    def _gen_key(self, st: StepState, index: int) -> str:
        return hash_json({"fp": st.fp, "batch": index})

    def _start_generator(self, st: StepState) -> None:
        end_key = hash_json({"fp": st.fp, "generator_end": True})
        index = offset = 0
        if self.use_cache:
            end = self._entry(end_key)
            known = end.info.get("batches") if end else None
            while True:
                key = self._gen_key(st, index)
                entry = self._reusable(key)
                if entry is None:
                    break
                self._record(
                    st, index, key, entry.outputs, entry.rows, cached=True, cost=_cost(entry)
                )
                offset += sum(entry.rows)
                index += 1
                if known is not None and index >= known:
                    st.total = index
                    return
        step = st.step
        assert isinstance(step, GeneratorStep)
        stop = self.stop

        def produce(first: int = index, row_offset: int = offset) -> int:
            i = first
            for chunk in normalize_output(call_process(step, row_offset)):
                if stop.is_set():
                    raise RunInterrupted("generator stopped")
                t0 = time.perf_counter()
                table = to_table([chunk])
                check_outputs(step, table)
                key = self._gen_key(st, i)
                res = store_batch(
                    self.store, step, key, table, time.perf_counter() - t0, cache=True
                )
                self.done_q.put((("gen", st.name), (i, key, res), None))
                i += 1
            self.store.put_action(end_key, ActionEntry(outputs=[], rows=[], info={"batches": i}))
            return i

        self.threads.submit("gen-thread", lambda: self._gen_wrapper(st, produce))

    def _gen_wrapper(self, st: StepState, produce: Any) -> None:
        try:
            self.done_q.put(("gen-end", (st.name, produce()), None))
        except RunInterrupted:
            pass
        except BaseException as e:
            self.done_q.put(("gen-end", (st.name, None), e))

    # -- sealing -------------------------------------------------------------------------

    def _done_batches(self) -> int:
        return sum(len(s.done) for s in self.states.values())

    def _step_manifest(self, st: StepState) -> str:
        man = StepManifest(
            name=st.name,
            step_class=f"{type(st.step).__module__}:{type(st.step).__qualname__}",
            fingerprint=st.fp,
            signature=st.sig,
            complete=st.complete,
            batches=[st.done[k] for k in sorted(st.done)],
            columns=st.columns,
        )
        return self.store.put_bytes(man.model_dump_json().encode())

    def _seal(self, status: RunStatus, log_oid: str | None = None) -> str:
        stats = {
            n: StepStats(
                batches_total=st.total,
                batches_cached=int(st.stats["cached"]),
                batches_computed=int(st.stats["computed"]),
                batches_failed=int(st.stats["failed"]),
                rows=st.rows_done,
                rows_cached=int(st.stats["rows_cached"]),
                rows_computed=int(st.stats["rows_computed"]),
                compute_seconds=round(st.stats["seconds"], 6),
                seconds_saved=round(st.stats["seconds_saved"], 6),
                tokens_spent=int(st.stats["tokens_spent"]),
                tokens_saved=int(st.stats["tokens_saved"]),
            )
            for n, st in self.states.items()
        }
        run = RunManifest(
            run_id=self.run_id,
            name=self.p.name,
            signature=self.sig,
            status=status,
            started=self.started,
            ended=None if status == "running" else datetime.now(UTC),
            steps=[
                StepRef(name=n, manifest=self._step_manifest(self.states[n])) for n in self.order
            ],
            edges=list(self.p.edges),
            leaves=self.p.leaves(),
            parameters=self.parameters,
            target=self.target,
            use_cache=self.use_cache,
            pipeline_yaml=self.yaml_oid,
            log=log_oid,
            stats=stats,
            error=self.error,
            previous=getattr(self, "prev_oid", None),
        )
        oid = self.store.put_bytes(run.model_dump_json().encode())
        self.store.set_ref(self.p.name, self.sig, oid)
        return oid

    def _finish(self, status: RunStatus) -> str:
        if hasattr(self, "progress"):
            self.progress.close()
        for pool in (getattr(self, "threads", None), getattr(self, "procs", None), self.ray):
            if pool is not None:
                pool.shutdown()
        self._summary(status)
        self._materialize()
        for h in log.handlers:
            h.flush()
        log_path = self.run_dir / "pipeline.log"
        log_oid = self.store.put_file(log_path) if log_path.exists() else None
        oid = self._seal(status, log_oid)
        if self.rcache is not None:
            self.rcache.finish(self.sig)
        return oid

    def _summary(self, status: RunStatus) -> None:
        for n, st in self.states.items():
            s = st.stats
            log.info(
                "step %s: %d batches (%d cached, %d computed, %d failed), %d rows, %.2fs compute",
                n,
                len(st.done),
                s["cached"],
                s["computed"],
                s["failed"],
                st.rows_done,
                s["seconds"],
            )
        log.info(
            "%s",
            saved_line(
                sum(int(st.stats["cached"]) for st in self.states.values()),
                sum(int(st.stats["rows_cached"]) for st in self.states.values()),
                sum(int(st.stats["tokens_saved"]) for st in self.states.values()),
                sum(st.stats["seconds_saved"] for st in self.states.values()),
            ),
        )
        log.info("run %s %s; data in %s", self.p.name, status, self.run_dir / "data")

    def _progress(self) -> None:
        parts = []
        for n, st in self.states.items():
            rows = st.rows_done
            total = f"/{st.total}" if st.total is not None else ""
            parts.append(
                f"{n} {len(st.done)}{total} batches ({rows} rows, {int(st.stats['cached'])} cached)"
            )
        log.info("progress: %s", "; ".join(parts))

    def _materialize(self) -> None:
        """runs/<name>/<sig>/data/<leaf>/NNNNN.parquet, one file per leaf batch object
        (reflinked, hard-linked or copied: castore/store/exports.py), built beside and
        renamed into place so a reader never sees a half-built folder. The stamp file
        lists the objects and how each file was placed; a folder whose files are all
        still those objects is kept as it is."""
        leaves = {
            leaf: [
                o for k in sorted(self.states[leaf].done) for o in self.states[leaf].done[k].outputs
            ]
            for leaf in self.p.leaves()
        }
        final = self.run_dir / "data"
        stamp_path = final / ".castore-batches.json"
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            doc = json.loads(stamp_path.read_text())
            if doc["leaves"] == leaves and self._placed_intact(final, leaves, doc["files"]):
                return
        tmp = self.run_dir / f"data.incomplete-{self.run_id[:8]}"
        shutil.rmtree(tmp, ignore_errors=True)
        placer = Placer()
        files: dict[str, list[int]] = {}
        for leaf, oids in leaves.items():
            d = tmp / leaf
            d.mkdir(parents=True, exist_ok=True)
            for i, oid in enumerate(oids, start=1):
                rel = f"{leaf}/{i:05d}.parquet"
                src = self.store.path_of(oid)
                placer.place(src, str(tmp / rel))
                # A hard link is checked by inode (freshening the object moves its mtime);
                # a clone or copy by its own stamp.
                files[rel] = [] if is_link_to(str(tmp / rel), src) else list(stamp(str(tmp / rel)))
        (tmp / ".castore-batches.json").write_text(json.dumps({"leaves": leaves, "files": files}))
        old = self.run_dir / f"data.old-{self.run_id[:8]}"
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)

    def _placed_intact(
        self, final: Path, leaves: dict[str, list[str]], files: dict[str, list[int]]
    ) -> bool:
        for leaf, oids in leaves.items():
            for i, oid in enumerate(oids, start=1):
                rel = f"{leaf}/{i:05d}.parquet"
                path = str(final / rel)
                recorded = files[rel]
                if recorded == [] and not is_link_to(path, self.store.path_of(oid)):
                    return False
                if recorded and list(stamp(path)) != recorded:
                    return False
            if len(os.listdir(final / leaf)) != len(oids):
                return False
        return True

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

    def _start_logging(self) -> list[logging.Handler]:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fmt = logging.Formatter("[%(asctime)s] %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
        handlers: list[logging.Handler] = [
            _RunLogFile(self.run_dir / "pipeline.log", mode="w", encoding="utf-8")
        ]
        console = logging.StreamHandler()
        # Quiet hides progress and info lines, never warnings (a remote gone, a retry).
        console.setLevel(logging.WARNING if self.quiet else logging.INFO)
        handlers.append(console)
        for h in handlers:
            h.setFormatter(fmt)
            log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False
        return handlers

    def _stop_logging(self, handlers: list[logging.Handler]) -> None:
        for h in handlers:
            log.removeHandler(h)
            h.close()


class _RunLogFile(logging.FileHandler):
    """pipeline.log. On a full disk or a vanished folder it stops writing instead of
    printing logging's traceback for every later line: the console still has them, and the
    run's error says what happened to the store."""

    def handleError(self, record: logging.LogRecord) -> None:
        self.close()
        self.setLevel(logging.CRITICAL + 1)


def _pickle_steps_by_value(pipeline: Pipeline) -> None:
    """Ray workers do not import the user's pipeline file: ship its step classes by
    value (cloudpickle), as Ray does for __main__."""
    import sys

    from ray import cloudpickle  # Ray ships its own copy

    for step in pipeline.steps.values():
        module = sys.modules.get(type(step).__module__)
        if module is not None and not module.__name__.startswith("castore."):
            with contextlib.suppress(ValueError):
                cloudpickle.register_pickle_by_value(module)


def saved_line(batches: int, rows: int, tokens: int, seconds: float) -> str:
    return (
        f"saved: {batches} batches, {rows} rows, {tokens} tokens, {seconds:.1f} seconds of compute"
    )


def _cost(entry: ActionEntry) -> tuple[float, int]:
    """(seconds, tokens) that computing an entry's batch took."""
    seconds, tokens = entry.info.get("seconds", 0.0), entry.info.get("tokens", 0)
    return (
        float(seconds) if isinstance(seconds, (int, float)) else 0.0,
        int(tokens) if isinstance(tokens, int) else 0,
    )
