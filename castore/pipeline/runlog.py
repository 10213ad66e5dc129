"""A run's log: pipeline.log in its run folder and the console, and the lines the run
writes about earlier runs and progress."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from castore.errors import CastoreError, RunInterrupted, RunWaiting
from castore.pipeline import progress
from castore.store.manifests import RunManifest, load_model

if TYPE_CHECKING:
    from castore.pipeline.plan import StepPlan
    from castore.pipeline.record import StepTally
    from castore.store import Store
    from castore.store.manifests import StepStats

log = logging.getLogger("castore.run")


class _RunLogFile(logging.FileHandler):
    """pipeline.log. On a full disk or a vanished folder it stops writing instead of
    printing logging's traceback for every later line: the console still has them, and the
    run's error says what happened to the store."""

    def handleError(self, record: logging.LogRecord) -> None:
        self.close()
        self.setLevel(logging.CRITICAL + 1)


class _Console(logging.StreamHandler):
    """stderr, through the progress bars while they are live (never printed over them)."""

    def emit(self, record: logging.LogRecord) -> None:
        write = progress.console_write
        if write is None:
            super().emit(record)
            return
        try:
            write(self.format(record))
        except Exception:
            self.handleError(record)


def start_logging(path: Path, quiet: bool) -> list[logging.Handler]:
    fmt = logging.Formatter("[%(asctime)s] %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    console = _Console()
    # Quiet hides progress and info lines, never warnings (a remote gone, a retry).
    console.setLevel(logging.WARNING if quiet else logging.INFO)
    handlers: list[logging.Handler] = [_RunLogFile(path, mode="w", encoding="utf-8"), console]
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)
    log.setLevel(logging.INFO)
    log.propagate = False
    return handlers


def stop_logging(handlers: list[logging.Handler]) -> None:
    for h in handlers:
        log.removeHandler(h)
        h.close()


def log_earlier_run(store: Store, prev: str) -> None:
    try:
        run = load_model(store, prev, RunManifest)
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


def progress_line(plans: dict[str, StepPlan], tallies: dict[str, StepTally]) -> None:
    """The periodic progress line when there is no live progress bar."""
    parts = []
    for n, plan in plans.items():
        total = f"/{plan.total}" if plan.total is not None else ""
        parts.append(
            f"{n} {len(plan.done)}{total} batches ({plan.rows_done} rows, "
            f"{tallies[n].cached} cached)"
        )
    log.info("progress: %s", "; ".join(parts))


def log_summary(stats: dict[str, StepStats], name: str, status: str, data: Path) -> None:
    """The lines a run's log ends with (the same RunSummary that `cas run` prints)."""
    from castore.summary import Saved, step_lines

    for line in step_lines(stats):
        log.info("%s", line)
    log.info("%s", Saved.of(stats).line())
    log.info("run %s %s; data in %s", name, status, data)
    for h in log.handlers:
        h.flush()


def stopped(
    name: str, status: str, done: int, parked: list[str], oid: str, *, interrupted: bool = False
) -> RunInterrupted:
    """What a run that stopped before its end raises (after sealing): interrupted, or
    waiting for batch jobs (RunWaiting, exit 75; also when interrupted while some were
    pending: the run cannot end before they do)."""
    err = RunInterrupted(
        f"run {name} interrupted: {done} batches are stored; `cas resume {name}` (or running "
        "it again) continues"
    )
    if status == "waiting":
        stopped_too = " (interrupted: its other batches stopped too)" if interrupted else ""
        err = RunWaiting(
            f"run {name} waiting for batch jobs ({'; '.join(parked)}){stopped_too}; {done} "
            f"batches are stored; `cas resume {name}` later collects them (`cas jobs` shows "
            "their state)"
        )
    err.run_oid = oid
    return err
