"""Where batches run: daemon threads (default) or a process pool.

Threads are daemons on purpose: a non-daemon pool (concurrent.futures) is joined at
interpreter exit, which is how a second Ctrl+C ends up hanging on a stuck LLM call. Every
task reports to one completion queue that the driver waits on.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from typing import Any

Done = tuple[Any, Any, BaseException | None]  # (tag, result, error)


class ThreadWorkers:
    def __init__(self, n: int, done: queue.Queue[Done]) -> None:
        self._tasks: queue.Queue[tuple[Any, Callable[[], Any]] | None] = queue.Queue()
        self._done = done
        self._threads = [
            threading.Thread(target=self._loop, name=f"castore-worker-{i}", daemon=True)
            for i in range(n)
        ]
        for t in self._threads:
            t.start()

    def _loop(self) -> None:
        while (item := self._tasks.get()) is not None:
            tag, fn = item
            try:
                self._done.put((tag, fn(), None))
            except BaseException as e:  # the driver decides: retry, skip or fail
                self._done.put((tag, None, e))

    def submit(self, tag: Any, fn: Callable[[], Any]) -> None:
        self._tasks.put((tag, fn))

    def shutdown(self) -> None:
        for _ in self._threads:
            self._tasks.put(None)


class ProcessWorkers:
    """A process pool for CPU-bound steps; results land on the same completion queue."""

    def __init__(self, n: int, done: queue.Queue[Done]) -> None:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # fork: the child inherits the pipeline's modules, including a target loaded from
        # a file, so step classes unpickle without being importable by path.
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        self._pool = ProcessPoolExecutor(
            max_workers=n,
            mp_context=mp.get_context(method),
            initializer=_worker_init,
            initargs=(os.getpid(),),
        )
        self._done = done

    def submit(self, tag: Any, fn: Callable[..., Any], *args: Any) -> None:
        fut = self._pool.submit(fn, *args)

        def report(f: Any) -> None:
            err = f.exception()
            self._done.put((tag, None if err else f.result(), err))

        fut.add_done_callback(report)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


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
        return libc.prctl(1, int(sig), 0, 0, 0) == 0  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return False


def _watch_parent(driver_pid: int) -> None:
    import time

    while os.getppid() == driver_pid:
        time.sleep(0.5)
    os._exit(1)


class RayWorkers:
    """Batches as Ray tasks, on a local Ray instance or the cluster at `address`.

    Workers compute a batch and write its output object into the store (a filesystem all
    nodes see); the driver writes the action entry when the result arrives, so the
    crash-safety order (object, then entry, then manifests) holds. A thread waits on the
    task refs and reports to the same completion queue as the other executors."""

    def __init__(
        self, done: queue.Queue[Done], *, address: str | None, num_cpus: int | None = None
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

        self._fn = ray.remote(execute_for_ray)
        self._fn_remote = ray.remote(execute_for_ray_remote)
        self._done = done
        self._pending: dict[Any, Any] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._waiter = threading.Thread(
            target=self._wait_loop, daemon=True, name="castore-ray-wait"
        )
        self._waiter.start()

    def submit(
        self,
        tag: Any,
        *args: Any,
        resources: dict[str, float] | None = None,
        via_remote: bool = False,
    ) -> None:
        """`via_remote`: args are (remote url, step, input table) for nodes that do not
        see the store; else (store root, step, key, slices)."""
        opts: dict[str, Any] = {}
        for key in ("num_cpus", "num_gpus"):
            if resources and key in resources:
                opts[key] = resources[key]
        base = self._fn_remote if via_remote else self._fn
        fn = base.options(**opts) if opts else base
        ref = fn.remote(*args)
        with self._lock:
            self._pending[ref] = tag

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
                    tag = self._pending.pop(ref)
                try:
                    self._done.put((tag, self._ray.get(ref), None))
                except Exception as e:  # a task error: the driver retries, skips or fails
                    self._done.put((tag, None, e))

    def shutdown(self) -> None:
        self._stop.set()
        if self._owned:
            self._ray.shutdown()
