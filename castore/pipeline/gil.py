"""How batches share the GIL with the run's driver (the thread running `Runner.run`):
quick steps run on the driver's thread, and the switch interval is short while runs are
live. Both measured on bench_overhead's 0-ms anchor (1,200 batch-steps, one Parquet
object each), where the driver's time between batches is most of the run."""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from castore.pipeline.step import _Step

# A step that computes one batch at a time and whose last QUICK_AFTER batches each took
# under QUICK seconds (read, computed and stored) runs its batches on the driver's thread:
# handing a batch to a worker and back is two GIL hand-offs and a wake-up, which for a
# filter or a formatter costs more than its work (bench_overhead's 0-ms anchor: 1.33 ->
# 1.19 s median, 1,200 batch-steps). A slower batch sends the step back to a thread, so the
# driver is held up by one such batch at a time. Never for LLM steps (their time is the
# provider's), nor while the driver's thread runs an event loop (a notebook's: `process`
# calling asyncio.run() there would fail).
QUICK, QUICK_AFTER = 0.005, 3
# Much of a batch's wall time can be its wait for the GIL: on a worker thread, for the
# driver (the anchor's: 6-7 ms median for 1.9 ms of CPU, 60-70 % of them over QUICK); on
# the driver, for the loader's thread (5-8 ms for 2 ms). So a batch is quick when its
# thread's CPU time is under QUICK and its wall time under WAITING (a step that waits on
# I/O for longer never runs on the driver; one that waits less may, holding the driver up
# by under WAITING a batch). Judged by wall time alone, such waits sent a step back to
# threads again and again, in one run in three for most of it (bench_overhead's anchor:
# 1.2-1.3 s -> 1.6-1.8 s). Each time a step is sent back (a garbage collection of 70-80
# ms), it needs twice as many quick batches to return.
WAITING = 3 * QUICK
_MAX_NEED = QUICK_AFTER << 6


class Pace:
    """Whether one step's batches run on the driver's thread, from how its last ones went."""

    __slots__ = ("need", "quick")

    def __init__(self) -> None:
        self.quick = 0  # quick batches in a row
        self.need = QUICK_AFTER  # how many bring the step to the driver

    @property
    def inline(self) -> bool:
        return self.quick >= self.need

    def took(self, wall: float, cpu: float, *, inline: bool) -> None:
        """A batch took `wall` seconds, `cpu` of them computing on its thread."""
        if cpu < QUICK and wall < WAITING:
            self.quick += 1
            return
        if inline:
            self.need = min(2 * self.need, _MAX_NEED)
        self.quick = 0


def may_run_inline(step: _Step) -> bool:
    """Whether `step`'s batches may run on the driver's thread once they are quick."""
    return step.concurrency == 1 and getattr(step, "llm", None) is None


def loop_running() -> bool:
    """Whether this thread runs an asyncio event loop (without importing asyncio: a
    process that has not imported it runs none)."""
    asyncio = sys.modules.get("asyncio")
    if asyncio is None:
        return False
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


# The driver lets go of the GIL at every file operation of a batch it stores; while
# another thread computes (a loader, a worker) it then waits up to the interpreter's
# switch interval (5 ms) to get it back. While runs are live the interval is 0.5 ms:
# bench_overhead's 0-ms anchor 1.09 -> 1.02 s; restored when the last run ends.
SWITCH_INTERVAL = 0.0005
_switching = threading.Lock()
_live_runs = 0
_saved_interval = 0.0


@contextlib.contextmanager
def short_switches() -> Iterator[None]:
    """SWITCH_INTERVAL while any run of this process is live (never a longer one than
    the process had set)."""
    global _live_runs, _saved_interval
    with _switching:
        if _live_runs == 0:
            _saved_interval = sys.getswitchinterval()
            sys.setswitchinterval(min(_saved_interval, SWITCH_INTERVAL))
        _live_runs += 1
    try:
        yield
    finally:
        with _switching:
            _live_runs -= 1
            if _live_runs == 0:
                sys.setswitchinterval(_saved_interval)
