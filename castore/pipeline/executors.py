"""Where batches run, behind one protocol: `submit(task)`, and a typed event on the
completion queue when it is done. Threads (default), a process pool, Ray tasks writing
into the store, or Ray tasks writing to a remote the driver reads through.

Threads are daemons on purpose: a non-daemon pool (concurrent.futures) is joined at
interpreter exit, which is how a second Ctrl+C ends up hanging on a stuck LLM call.
"""

from __future__ import annotations

import collections
import contextvars
import functools
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from castore import jobctx
from castore.pipeline import gil
from castore.pipeline.batch import (
    BatchResult,
    TableCache,
    execute_batch,
    execute_in_process,
    read_input,
)
from castore.pipeline.plan import PlannedBatch
from castore.pipeline.rows import RowPlan

if TYPE_CHECKING:
    from castore.answers import Answers
    from castore.pipeline.step import _Step
    from castore.store import Store


@dataclass(frozen=True)
class Task:
    """A batch to compute; `ticket` comes back in its event (the scheduler's own record)."""

    batch: PlannedBatch
    step: _Step
    ticket: Any
    rows: RowPlan | None = None  # row-wise steps: what earlier results were found
    # Called on the worker once `process` returned, before the batch is stored.
    computed: Callable[[], None] | None = None


# -- events on the completion queue ------------------------------------------------------


@dataclass(frozen=True)
class BatchDone:
    task: Task
    result: BatchResult


@dataclass(frozen=True)
class BatchNotStarted:
    """A batch queued ahead that was not started because the run is stopping."""

    task: Task


@dataclass(frozen=True)
class BatchFailed:
    task: Task
    error: BaseException


@dataclass(frozen=True)
class BatchStopped:
    """A batch that ended early because the run gave up its requests (jobctx.ABANDON):
    not done, not failed; what it stored (a row-wise step's answered rows) is kept."""

    task: Task
    error: BaseException


@dataclass(frozen=True)
class GeneratorBatch:
    step: str
    index: int
    key: str
    result: BatchResult
    cached: bool = False  # an object already stored (a grown file's unchanged batches)


@dataclass(frozen=True)
class GeneratorEnd:
    step: str
    batches: int | None  # None when it failed
    error: BaseException | None = None


Event = BatchDone | BatchNotStarted | BatchFailed | BatchStopped | GeneratorBatch | GeneratorEnd
Events = queue.Queue[Event]


class Executor(Protocol):
    # Set when the run gives up its requests in flight; None where batches cannot be
    # told to (process and Ray workers: their requests run to the end or die with them).
    abandon: threading.Event | None

    def inflight(self, concurrency: int) -> int:
        """How many of a step's batches may be submitted and not yet computed: its
        `concurrency` where the scheduler's count is what bounds the calls."""

    def submit(self, task: Task) -> None: ...

    def hold(self) -> None:
        """Start no batch that has not started (the run failed)."""

    def shutdown(self) -> None: ...


# -- threads -----------------------------------------------------------------------------


class ThreadWorkers:
    """Daemon threads running callables; the generic pool under ThreadExecutor and the
    generator threads."""

    def __init__(self, n: int) -> None:
        self._tasks: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._threads = [
            threading.Thread(target=self._loop, name=f"castore-worker-{i}", daemon=True)
            for i in range(n)
        ]
        for t in self._threads:
            t.start()

    def _loop(self) -> None:
        while (fn := self._tasks.get()) is not None:
            fn()

    def run(self, fn: Callable[[], None]) -> None:
        # In the caller's context (a copy per task, as asyncio.to_thread does): the run's
        # one code version (castore.fingerprint) holds on these threads too, so a loader
        # there does not read its code again (~2.5 ms) and sees the version its
        # fingerprint was made from.
        self._tasks.put(functools.partial(contextvars.copy_context().run, fn))

    def shutdown(self) -> None:
        for _ in self._threads:
            self._tasks.put(None)


class ThreadExecutor:
    """Batches on threads. Each step's `concurrency` is a semaphore held only while
    `process` runs, so the scheduler can queue batches ahead (`inflight`) and a thread
    starts the next call the moment one returns; storing a batch holds no slot."""

    ahead = 2

    def __init__(
        self,
        store: Store,
        cache: TableCache,
        events: Events,
        concurrency: Iterable[int],
        stop: threading.Event,
        *,
        abandon: threading.Event | None = None,
        answers: Answers | None = None,
    ) -> None:
        self._store, self._cache, self._events, self._stop = store, cache, events, stop
        # jobctx.ABANDON and jobctx.ANSWERS of every batch computed here
        self.abandon, self._answers = abandon, answers
        self._held = threading.Event()
        # A thread for every batch the scheduler lets be in flight: none waits for one.
        self._pool = ThreadWorkers(min(sum(map(self.inflight, concurrency)), 256))
        self._slots: dict[str, threading.BoundedSemaphore] = {}
        # per step: on the driver's thread or not
        self._pace: collections.defaultdict[str, gil.Pace] = collections.defaultdict(gil.Pace)
        self._inline_ok = not gil.loop_running()  # made on the driver's thread

    def inflight(self, concurrency: int) -> int:
        # Queued ahead, a thread starts the next call the moment one returns instead of
        # after a round trip through the scheduler: with 8 calls at once that round trip
        # is what kept an I/O-bound step at 0.83 of ideal (0.90 queued ahead). At one call
        # at a time it also keeps a slow step busy while the driver runs a quick step's
        # batch on its own thread (gil.py): bench_overhead's 2-ms cold run 4.36 -> 4.29 s.
        return concurrency * self.ahead

    def submit(self, task: Task) -> None:
        name = task.batch.step
        slot = self._slots.get(name)
        if slot is None:
            slot = self._slots[name] = threading.BoundedSemaphore(task.step.concurrency)
        pace = self._pace[name]
        inline = self._inline_ok and pace.inline and gil.may_run_inline(task.step)

        def work() -> None:
            b = task.batch
            slot.acquire()
            t0 = time.perf_counter()  # the batch's own time, not its wait for the slot
            c0 = time.thread_time()
            held = True
            answers = self._answers.batch() if self._answers is not None else None
            stored = False  # whole, its entry written: its answers are needed no more

            def computed() -> None:
                nonlocal held
                if held:
                    held = False
                    slot.release()
                if task.computed is not None:
                    task.computed()

            try:
                if self._stop.is_set() or self._held.is_set():  # queued ahead, run ending
                    self._events.put(BatchNotStarted(task))
                    return
                jobctx.ABANDON.set(self.abandon)  # in this task's own context
                jobctx.ANSWERS.set(answers)
                res = execute_batch(
                    self._store,
                    task.step,
                    b.key,
                    b.slice_lists(),
                    self._cache,
                    rows=task.rows,
                    computed=computed,
                )
                stored = res.skipped_error is None
            except BaseException as e:  # the scheduler decides: retry, skip or fail
                if inline and isinstance(e, KeyboardInterrupt):
                    self._events.put(BatchNotStarted(task))  # on the driver: the run stops
                    raise
                gave_up = self.abandon is not None and self.abandon.is_set()
                self._events.put(BatchStopped(task, e) if gave_up else BatchFailed(task, e))
                return
            finally:
                if held:
                    slot.release()
                if answers is not None:
                    answers.done(stored=stored)
                pace.took(time.perf_counter() - t0, time.thread_time() - c0, inline=inline)
            self._events.put(BatchDone(task, res))

        if inline:  # in a copy of the context, as on a worker
            contextvars.copy_context().run(work)
        else:
            self._pool.run(work)

    def hold(self) -> None:
        self._held.set()

    def shutdown(self) -> None:
        self._pool.shutdown()


# -- processes ---------------------------------------------------------------------------


class ProcessExecutor:
    """A process pool for CPU-bound steps; workers live and die with the driver."""

    abandon: threading.Event | None = None

    def inflight(self, concurrency: int) -> int:
        return concurrency

    def __init__(self, store: Store, events: Events, n: int) -> None:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        self._pool = ProcessPoolExecutor(
            max_workers=n,
            mp_context=mp.get_context(process_start_method()),
            initializer=_worker_init,
            initargs=(os.getpid(),),
        )
        self._root = str(store.root)
        self._events = events

    def submit(self, task: Task) -> None:
        b = task.batch
        fut = self._pool.submit(
            execute_in_process, self._root, task.step, b.key, b.slice_lists(), task.rows
        )

        def report(f: Any) -> None:
            err = f.exception()
            self._events.put(BatchFailed(task, err) if err else BatchDone(task, f.result()))

        fut.add_done_callback(report)

    def hold(self) -> None:
        pass  # shutdown cancels what has not started

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def process_start_method() -> str:
    """fork where there is one: the child inherits the pipeline's modules, including a
    target loaded from a file, so step classes unpickle without being importable by path
    (and run the code the driver loaded and keyed). Else spawn, which imports them."""
    import multiprocessing as mp

    return "fork" if "fork" in mp.get_all_start_methods() else "spawn"


def _worker_init(driver_pid: int) -> None:
    """A pool worker lives and dies with its driver."""
    import signal

    # Ctrl+C reaches the whole process group; only the driver decides what it means.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if _set_parent_death_signal(signal.SIGKILL) and os.getppid() == driver_pid:
        return
    # No prctl (not Linux), or the driver already died: watch for being orphaned.
    threading.Thread(target=_watch_parent, args=(driver_pid,), daemon=True).start()


def _set_parent_death_signal(sig: int) -> bool:
    """Linux: the kernel sends `sig` when the parent dies (kill -9 included)."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return bool(libc.prctl(1, int(sig), 0, 0, 0) == 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return False


def _watch_parent(driver_pid: int) -> None:
    import time

    while os.getppid() == driver_pid:
        time.sleep(0.5)
    os._exit(1)


# -- Ray ---------------------------------------------------------------------------------


class RayExecutor:
    """Batches as Ray tasks, on a local Ray instance or the cluster at `address`.

    Workers compute a batch and write its output object: into the store (a filesystem
    all nodes see), or with `remote` to that remote, which the driver then reads through
    (verified). The driver alone writes action entries when results arrive, so the
    crash-safety order (object, then entry, then manifests) holds. A thread waits on the
    task refs and reports to the same completion queue as the other executors."""

    abandon: threading.Event | None = None

    def inflight(self, concurrency: int) -> int:
        return concurrency

    def __init__(
        self,
        store: Store,
        events: Events,
        *,
        address: str | None,
        remote: Any = None,
        cache: TableCache | None = None,
        num_cpus: int | None = None,
    ) -> None:
        import ray

        self._ray = ray
        self._owned = not ray.is_initialized()
        if self._owned:
            ray.init(
                address=address,
                num_cpus=num_cpus if address is None else None,
                include_dashboard=False,
                log_to_driver=False,
                ignore_reinit_error=True,
            )
        from castore.pipeline.batch import execute_for_ray, execute_for_ray_remote

        # Typed Any: two task signatures behind one attribute (Ray types each separately).
        self._fn: Any = ray.remote(
            execute_for_ray_remote if remote is not None else execute_for_ray
        )
        self._store, self._remote, self._cache = store, remote, cache or TableCache()
        self._settings: dict[str, Any] = {}
        self._secrets: dict[str, str] = {}
        if remote is not None:
            from castore.remote import worker_env
            from castore.remote_layout import require_store

            require_store(remote, "create")  # the workers write their outputs there
            settings, self._secrets = worker_env()
            if settings:
                self._settings = {"runtime_env": {"env_vars": settings}}
        self._events = events
        self._pending: dict[Any, Task] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._waiter = threading.Thread(
            target=self._wait_loop, daemon=True, name="castore-ray-wait"
        )
        self._waiter.start()

    def submit(self, task: Task) -> None:
        opts = {**self._settings, **ray_options(task.step.resources)}
        fn = self._fn.options(**opts) if opts else self._fn
        b = task.batch
        if self._remote is not None:
            # Nodes without the store get their input rows with the task.
            table = read_input(self._store, b.slice_lists(), self._cache, task.step)
            ref = fn.remote(self._remote.url, task.step, table, self._secrets)
        else:
            ref = fn.remote(str(self._store.root), task.step, b.key, b.slice_lists(), task.rows)
        with self._lock:
            self._pending[ref] = task

    def _wait_loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                refs = list(self._pending)
            if not refs:
                self._stop.wait(0.02)
                continue
            ready, _ = self._ray.wait(refs, num_returns=1, timeout=0.2)
            for ref in ready:
                with self._lock:
                    task = self._pending.pop(ref)
                try:
                    res = self._ray.get(ref)
                    if self._remote is not None:
                        self._read_through(res)
                except Exception as e:  # a task error: the scheduler retries, skips or fails
                    # Ray's error is the worker's traceback; its `cause` is the one line.
                    cause = getattr(e, "cause", None)
                    self._events.put(
                        BatchFailed(task, cause if isinstance(cause, Exception) else e)
                    )
                    continue
                self._events.put(BatchDone(task, res))

    def _read_through(self, res: BatchResult) -> None:
        from castore.remote import fetch_object

        for oid in res.outputs:
            if not self._store.has(oid):
                fetch_object(self._store, self._remote, oid)  # verified on the way in

    def hold(self) -> None:
        pass  # Ray tasks are submitted as they are planned: none waits here

    def shutdown(self) -> None:
        self._stop.set()
        if self._owned:
            self._ray.shutdown()


def pickle_steps_by_value(pipeline: Any) -> None:
    """Ray workers do not import the user's pipeline file: ship its step classes by
    value (cloudpickle), as Ray does for __main__."""
    import contextlib

    from ray import cloudpickle  # Ray ships its own copy

    for module in _by_value(pipeline):
        with contextlib.suppress(ValueError):
            cloudpickle.register_pickle_by_value(module)


def _by_value(pipeline: Any) -> list[Any]:
    """The modules of a pipeline's user steps (Ray gets them by value, not by import)."""
    import sys

    out = []
    for step in pipeline.steps.values():
        module = sys.modules.get(type(step).__module__)
        if module is not None and not module.__name__.startswith("castore.") and module not in out:
            out.append(module)
    return out


EXECUTORS = ("threads", "processes", "ray")


RAY_OPTIONS = ("num_cpus", "num_gpus", "memory")  # Ray task options; other keys: custom


def ray_options(resources: dict[str, float] | None) -> dict[str, Any]:
    """A step's `resources` as Ray task options: num_cpus, num_gpus and memory (bytes) as
    such, any other key a custom resource."""
    res = resources or {}
    opts: dict[str, Any] = {k: res[k] for k in RAY_OPTIONS if k in res}
    custom = {k: v for k, v in res.items() if k not in RAY_OPTIONS}
    if custom:
        opts["resources"] = custom
    return opts


def check_executor(kind: str, ray_storage: str, remote: Any, steps: Iterable[_Step] = ()) -> None:
    """Refuse an executor setup that cannot work, before anything runs."""
    from castore.errors import PipelineError

    if kind != "ray":
        wanting = next((s for s in steps if s.resources), None)
        if wanting is not None:
            # Threads and processes cannot reserve them: running anyway would ignore them.
            raise PipelineError(
                f"step {wanting.name}: resources={wanting.resources} are reserved per batch "
                "on Ray only; run with executor='ray' (cas run --executor ray) or drop them"
            )
    if kind not in EXECUTORS:
        raise PipelineError(f"unknown executor {kind!r}: use {', '.join(EXECUTORS)}")
    if ray_storage not in ("store", "remote"):
        raise PipelineError(f"ray_storage must be 'store' or 'remote', not {ray_storage!r}")
    if ray_storage == "remote" and (kind != "ray" or remote is None):
        raise PipelineError("ray_storage='remote' needs executor='ray' and a remote")
    if kind == "ray":
        import importlib.util

        from castore.errors import ConfigError

        if importlib.util.find_spec("ray") is None:
            raise ConfigError(
                "executor 'ray' needs Ray, which is not installed: pip install 'castore[ray]'"
            )


def signatures_for(pipeline: Any, kind: str) -> dict[str, dict[str, str]]:
    """`pipeline.signatures()`, refused when some code it hashes was edited after it was
    loaded (castore.loaded) and `kind`'s workers would import that code from its file:
    processes where fork is not available, and Ray for modules other than the steps' own
    (those are shipped by value: `pickle_steps_by_value`). They would run the edit under
    the loaded code's key. Threads and forked processes run the loaded code."""
    from castore import loaded
    from castore.errors import StaleCode

    with loaded.collecting() as stale:
        sigs: dict[str, dict[str, str]] = pipeline.signatures()
    if kind == "ray":
        shipped = {getattr(m, "__file__", None) for m in _by_value(pipeline)}
        stale = [s for s in stale if s.path not in shipped]
    elif kind != "processes" or process_start_method() == "fork":
        stale = []
    if stale:
        raise StaleCode(
            f"{stale[0]}, and the {kind} executor's workers import it anew: they would run "
            "the edit under the loaded code's key; reload the module (importlib.reload) or "
            "restart the process"
        )
    return sigs


def make_executor(
    kind: str,
    store: Store,
    events: Events,
    *,
    concurrency: Iterable[int],
    cache: TableCache,
    stop: threading.Event,
    abandon: threading.Event | None = None,
    answers: Answers | None = None,
    ray_address: str | None = None,
    ray_remote: Any = None,
) -> Executor:
    """The executor named by `kind` ('threads', 'processes' or 'ray'). `abandon`: set when
    the run gives up requests in flight; `answers`: the run's journal of LLM answers
    (threads only: jobctx.ABANDON, jobctx.ANSWERS)."""
    if kind == "processes":
        return ProcessExecutor(store, events, os.cpu_count() or 2)
    if kind == "ray":
        return RayExecutor(store, events, address=ray_address, remote=ray_remote, cache=cache)
    return ThreadExecutor(store, cache, events, concurrency, stop, abandon=abandon, answers=answers)
