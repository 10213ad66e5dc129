"""What a run tells the LLM code running in its batches: the store, remote and pipeline
name for offline batch jobs (castore.batchjobs), set by the scheduler at every run's start
and read by an LLM step's jobs, and when to give up requests (ABANDON). A module of its own
so that a run that asks no LLM never imports the jobs' machinery (asyncio and the LLM
client: ~20 ms of every `cas run`, replays included)."""

from __future__ import annotations

import threading
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from castore.store import Store

# Set around each batch a run computes on its threads: once the event is set (a second
# Ctrl+C, or the stop grace period over) the batch's LLM requests still unanswered are
# given up (castore.errors.RequestAbandoned), so the batch returns at once with the rows
# answered so far, which a row-wise step stores as row results: a stopped run keeps
# every answer it received, and the next run asks only for the rest.
ABANDON: ContextVar[threading.Event | None] = ContextVar("castore_abandon", default=None)
# And the run's journal of answers as this batch uses it (castore.answers.BatchAnswers):
# each answer is appended as it comes, and a request another run was answered (then
# killed) is not sent again.
ANSWERS: ContextVar[Any] = ContextVar("castore_answers", default=None)


def stopping() -> bool:
    """The batch being computed here belongs to a run that gave up its requests."""
    event = ABANDON.get()
    return event is not None and event.is_set()


STORE: dict[str, Store] = {}  # the run's store (steps have none)
REMOTE: dict[str, Any] = {}  # and its remote, when the run reads through one
PIPELINE: dict[str, str | None] = {}  # and its pipeline's name


def use_store(
    store: Store, remote: Any = None, *, push: bool = False, pipeline: str | None = None
) -> None:
    """The run's store, and its read-through remote (`--remote`; `push`: `--push`): a job
    record the store lacks is looked for there, and a record this run submits is written
    there at once. (Two machines writing through at once do not both submit: the batch
    is leased on the remote while it is computed, castore/remote_locks.py.) `pipeline`:
    the run's pipeline, named in the records of the jobs it asks (`cas jobs --run`)."""
    STORE["store"] = store
    PIPELINE["name"] = pipeline
    REMOTE.clear()
    if remote is not None:
        REMOTE.update(remote=remote, push=push)
