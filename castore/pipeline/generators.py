"""A generator step's batches, produced on a generator thread from the row where the
stored ones stop: each stored as an object and reported to the scheduler as it comes
(GeneratorBatch), then the end entry that says how many there are (GeneratorEnd)."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from castore.errors import RunInterrupted
from castore.hashing import generator_end_key, generator_key
from castore.pipeline.batch import TableCache, call_process, generator_table, store_batch
from castore.pipeline.executors import GeneratorBatch, GeneratorEnd
from castore.pipeline.step import GeneratorStep, normalize_output
from castore.store.models import ActionEntry

if TYPE_CHECKING:
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
) -> None:
    """Batches `index`, `index`+1, … of `step` from input row `offset`, until it ends or
    the run stops; a failure is reported as the generator's end with its error."""
    i = index
    try:
        for chunk in normalize_output(call_process(step, offset)):
            if stop.is_set():
                return
            t0 = time.perf_counter()
            table = generator_table(step, chunk)
            key = generator_key(fp, i)
            res = store_batch(
                store, step, key, table, time.perf_counter() - t0, cache=True, tables=tables
            )
            events.put(GeneratorBatch(name, i, key, res))
            i += 1
        store.put_action(
            generator_end_key(fp), ActionEntry(outputs=[], rows=[], info={"batches": i})
        )
    except RunInterrupted:
        return
    except BaseException as e:
        events.put(GeneratorEnd(name, None, e))
        return
    events.put(GeneratorEnd(name, i))
