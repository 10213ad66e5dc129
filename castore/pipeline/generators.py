"""A generator step's batches, produced on a generator thread from the row where the
stored ones stop: each stored as an object and reported to the scheduler as it comes
(GeneratorBatch), then the end entry that says how many there are (GeneratorEnd)."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from castore.errors import RunInterrupted
from castore.hashing import generator_end_key, generator_key
from castore.pipeline.appends import FileBatches, Reused
from castore.pipeline.batch import (
    BatchResult,
    TableCache,
    entry_cost,
    entry_of,
    generator_table,
    store_batch,
)
from castore.pipeline.calls import process_chunks
from castore.pipeline.executors import GeneratorBatch, GeneratorEnd
from castore.pipeline.step import GeneratorStep
from castore.store.models import ActionEntry

if TYPE_CHECKING:
    from castore.pipeline.schedule import Scheduler
    from castore.store import Store


def produce(
    store: Store,
    step: GeneratorStep,
    *,
    name: str,
    fp: str,
    index: int,
    offset: int,
    events: Any,
    stop: threading.Event,
    tables: TableCache,
    find: Callable[[str], ActionEntry | None] | None = None,
) -> None:
    """Batches `index`, `index`+1, … of `step` from input row `offset`, until it ends or
    the run stops; a failure is reported as the generator's end with its error. With
    `find` (a verified local lookup) and from the first batch, a loader over a grown
    jsonl file reuses the batches of the version it grew from (castore/pipeline/appends.py)."""
    i = index
    try:
        source: FileBatches | None = None
        if find is not None and index == 0 and step.append_source() is not None:
            source = FileBatches(store, step, fp, find)
        chunks = source if source is not None else process_chunks(step, offset)
        for chunk in chunks:
            if stop.is_set():
                return
            key = generator_key(fp, i)
            if isinstance(chunk, Reused):
                res = reused_batch(store, step, key, chunk.oid, chunk.rows)
            else:
                t0 = time.perf_counter()
                table = generator_table(step, chunk)
                res = store_batch(
                    store, step, key, table, time.perf_counter() - t0, cache=False, tables=tables
                )
                step.check_source()  # the object holds what was read: still what was keyed?
                store.put_action(key, entry_of(step.name, res), made_here=True)
            events.put(GeneratorBatch(name, i, key, res, cached=isinstance(chunk, Reused)))
            i += 1
        store.put_action(
            generator_end_key(fp), ActionEntry(outputs=[], rows=[], info={"batches": i})
        )
        if source is not None:
            source.record()
    except RunInterrupted:
        return
    except BaseException as e:
        events.put(GeneratorEnd(name, None, e))
        return
    events.put(GeneratorEnd(name, i))


def reused_batch(store: Store, step: GeneratorStep, key: str, oid: str, rows: int) -> BatchResult:
    """A batch that is an object already stored (and verified): its entry under `key`.
    Recorded as a hit, so the recorder reads its columns itself (once per step)."""
    res = BatchResult([oid], [rows], 0.0, [])
    store.put_action(key, entry_of(step.name, res), made_here=True)
    return res


def start_generator(sched: Scheduler, name: str) -> None:
    """Reuse the generator's stored batches from the first, then (unless its end is
    known) produce the rest on a thread from the row where they stop."""
    plan, step = sched.plans[name], sched.steps[name]
    assert isinstance(step, GeneratorStep) and sched.gen_threads is not None
    end_key = generator_end_key(plan.fp)
    index = offset = 0
    if sched.use_cache:
        end = sched._entry(end_key)
        known = end.info.get("batches") if end else None
        while (entry := sched.reusable(key := generator_key(plan.fp, index))) is not None:
            sched.recorder.record(
                name, index, key, entry.outputs, entry.rows, cached=True, cost=entry_cost(entry)
            )
            offset += sum(entry.rows)
            index += 1
            if known is not None and index >= known:
                plan.total = index
                return
    sched.gen_threads.run(
        functools.partial(
            produce,
            sched.store,
            step,
            name=name,
            fp=plan.fp,
            index=index,
            offset=offset,
            events=sched.events,
            stop=sched.stop,
            tables=sched.cache,
            find=functools.partial(sched.reusable, local=True) if sched.use_cache else None,
        )
    )
