"""The thread executor: `concurrency` bounds calls in progress (batches are queued ahead
and stored outside the slot), a stop leaves queued batches unstarted, and a table kept
in memory for the next step is the table the store reads back."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import threading
import time

import pyarrow as pa
import pytest

from castore import Pipeline, Step, StepInput
from castore.errors import RunInterrupted
from castore.steps import LoadDataFromDicts
from castore.store.parquet import as_read, encode_parquet, round_trips
from tests.conftest import store_calls


class Counts:
    """Calls of Probe, and the most in progress at once."""

    lock = threading.Lock()
    now = peak = calls = 0
    stop_after: int | None = None


class Probe(Step):
    outputs = ["y"]

    def process(self, inputs: StepInput):
        with Counts.lock:
            Counts.calls += 1
            Counts.now += 1
            Counts.peak = max(Counts.peak, Counts.now)
            calls = Counts.calls
        if Counts.stop_after == calls:
            os.kill(os.getpid(), signal.SIGINT)  # the run's handler: stop, drain
        time.sleep(0.01)
        with Counts.lock:
            Counts.now -= 1
        return [{**r, "y": r["x"] * 2} for r in inputs]


@pytest.fixture
def probe():
    Counts.now = Counts.peak = Counts.calls = 0
    Counts.stop_after = None
    return Counts


def test_concurrency_bounds_calls_in_progress(store, probe):
    with Pipeline(name="bound") as p:
        LoadDataFromDicts(data=[{"x": i} for i in range(300)], batch_size=100) >> Probe(
            input_batch_size=5, concurrency=3
        )
    ds = p.run(cache_dir=store.root, quiet=True)
    assert probe.calls == 60
    assert probe.peak == 3  # reached, never exceeded, though 6 are queued at a time
    assert sorted(r["y"] for r in ds["probe"]["train"].to_list()) == [2 * i for i in range(300)]


def test_a_stop_starts_no_batch_queued_ahead(store, probe):
    probe.stop_after = 1
    with Pipeline(name="stop") as p:
        LoadDataFromDicts(data=[{"x": i} for i in range(50)], batch_size=50) >> Probe(
            input_batch_size=5
        )
    with pytest.raises(RunInterrupted):
        p.run(cache_dir=store.root, quiet=True)
    # The call in progress finished and was stored; the batch queued behind it (its
    # slot was taken) did not start after the stop.
    assert probe.calls == 1
    probe.stop_after = None
    ds = p.run(cache_dir=store.root, quiet=True)
    assert probe.calls == 1 + 9  # the first batch is not paid for again
    assert [r["y"] for r in ds["probe"]["train"].to_list()] == [2 * i for i in range(50)]


def test_a_kept_table_is_what_the_store_reads_back(store):
    table = pa.Table.from_pylist(
        [
            {
                "i": 1,
                "f": float("nan"),
                "s": "a",
                "b": b"\x00",
                "l": [1, 2],
                "st": {"k": "v", "n": None},
                "t": dt.datetime(2026, 1, 1, 12, 0, 0, 123456),
                "d": dt.date(2026, 1, 1),
                "none": None,
                "flag": True,
                "nested": [{"a": [1.5, -0.0]}],
            },
            {"i": None, "f": -0.0, "s": None, "l": None, "st": None, "nested": []},
        ]
    )
    assert round_trips(table.schema)
    buf = encode_parquet(table)
    kept = as_read(table, buf)
    assert kept is not None
    back = store.get_table(store.put_encoded(buf))
    assert str(kept.schema) == str(back.schema)  # list items read back as "element"
    assert str(kept.schema) != str(table.schema)
    # NaN in the same place, -0.0 kept: the same values (JSON tells -0.0 from 0.0)
    assert json.dumps(kept.to_pylist(), default=str) == json.dumps(back.to_pylist(), default=str)
    assert json.dumps(kept.to_pylist(), default=str) == json.dumps(table.to_pylist(), default=str)
    # Arrow mislabels a sliced struct array: such a table is read back, not kept.
    assert as_read(table.slice(1), encode_parquet(table.slice(1))) is None
    inner = pa.StructArray.from_arrays([pa.array([[1], [2], [3]]).slice(1)], names=["l"])
    nested = pa.table({"s": inner})
    assert as_read(nested, encode_parquet(nested)) is None
    coded = pa.table({"c": pa.array(["x", "y"]).dictionary_encode()})
    assert not round_trips(coded.schema)
    assert not round_trips(pa.schema([("d", pa.decimal128(5, 2))]))


def test_a_step_reads_its_input_from_memory_not_the_store(store, where, monkeypatch):
    """Stored tables are kept for the steps that read them next; a leaf's are not (no
    one reads them in the run), so they do not push its inputs out of the budget."""
    from castore.pipeline.batch import TableCache

    monkeypatch.setattr(TableCache.__init__, "__defaults__", (160 << 10,))
    reads = store_calls(monkeypatch, "get_table")
    rows = [{"x": i, "pad": f"{i:06d}" * 40} for i in range(400)]
    with Pipeline(name="kept") as p:
        (
            LoadDataFromDicts(data=rows, batch_size=10)
            >> Traced(input_batch_size=10)
            >> Traced(name="leaf", input_batch_size=10)
        )
    p.execute(cache_dir=store.root, quiet=True)
    assert len(where.threads) == 80
    assert reads == []


def test_read_types_are_remembered_per_exact_schema():
    """The read-back schema is looked up once per schema, by every name and metadata
    value: tables differing only in long metadata are not confused."""
    rows = [{"l": [1, 2]}]
    a = pa.Table.from_pylist(rows).replace_schema_metadata({"k": "a" * 300})
    b = pa.Table.from_pylist(rows).replace_schema_metadata({"k": "a" * 299 + "b"})
    for t in (a, b, a):
        kept = as_read(t, encode_parquet(t))
        assert kept is not None and kept.schema.metadata == t.schema.metadata
        assert kept.schema.field("l").type.value_field.name == "element"


class Where:
    """The thread each call of Traced ran on, and the calls that sleep or fail once."""

    threads: list[str] = []
    slow: set[int] = set()
    fail: set[int] = set()


class Traced(Step):
    outputs = ["y"]

    def process(self, inputs: StepInput):
        call = len(Where.threads)
        Where.threads.append(threading.current_thread().name)
        if call in Where.slow:
            time.sleep(0.5)  # over gil.WAITING: back to a thread
        if call in Where.fail:
            Where.fail.discard(call)
            raise SystemExit(3)  # a failed batch on a worker: so too on the driver's thread
        return [{**r, "y": r["x"] * 2} for r in inputs]


@pytest.fixture
def where(monkeypatch):
    # Quick by a wide margin, so a busy test machine does not make a batch "slow".
    monkeypatch.setattr("castore.pipeline.gil.QUICK", 0.2)
    monkeypatch.setattr("castore.pipeline.gil.WAITING", 0.3)
    Where.threads, Where.slow, Where.fail = [], set(), set()
    return Where


def traced_pipeline(n: int = 100, **kw) -> Pipeline:
    with Pipeline(name="traced") as p:
        LoadDataFromDicts(data=[{"x": i} for i in range(n)], batch_size=n) >> Traced(
            input_batch_size=5, **kw
        )
    return p


def test_quick_batches_run_on_the_driver_thread(store, where):
    from castore.pipeline.gil import QUICK_AFTER

    ds = traced_pipeline().run(cache_dir=store.root, quiet=True)
    driver = threading.current_thread().name
    assert len(where.threads) == 20
    # Measured on workers first (with one batch queued ahead), then on the driver's thread.
    first = where.threads.index(driver)
    assert QUICK_AFTER <= first <= QUICK_AFTER + 1
    assert all(t.startswith("castore-worker") for t in where.threads[:first])
    assert set(where.threads[first:]) == {driver}
    assert [r["y"] for r in ds["traced"]["train"].to_list()] == [2 * i for i in range(100)]


def test_a_slow_batch_sends_the_step_back_to_a_thread(store, where):
    from castore.pipeline.gil import QUICK_AFTER

    where.slow = {6}
    traced_pipeline().run(cache_dir=store.root, quiet=True)
    driver = threading.current_thread().name
    assert where.threads[6] == driver  # it was quick until then
    after = where.threads[7 : 7 + QUICK_AFTER]
    assert all(t.startswith("castore-worker") for t in after)
    assert where.threads[-1] == driver  # quick again


def test_a_batch_failing_on_the_driver_thread_is_retried(store, where):
    where.fail = {8}
    ds = traced_pipeline(max_retries=1, retry_backoff=0).run(cache_dir=store.root, quiet=True)
    assert where.threads[8] == threading.current_thread().name
    assert len(where.threads) == 21  # the failed call and its retry
    assert [r["y"] for r in ds["traced"]["train"].to_list()] == [2 * i for i in range(100)]


def test_steps_that_stay_on_threads(store, where):
    """Concurrent steps, LLM steps, and any step while the driver's thread runs an event
    loop (a notebook), where a `process` calling asyncio.run() must keep working."""
    import asyncio

    from castore.llms import OpenAILLM
    from castore.pipeline.gil import may_run_inline
    from castore.steps import TextGeneration

    traced_pipeline(concurrency=2).run(cache_dir=store.root, quiet=True)
    assert all(t.startswith("castore-worker") for t in where.threads)
    llm = OpenAILLM(model="m", base_url="http://127.0.0.1:9/v1", api_key="k")
    assert not may_run_inline(TextGeneration(llm=llm))

    where.threads.clear()

    async def in_a_loop():
        traced_pipeline(60).run(cache_dir=store.root, quiet=True)

    asyncio.run(in_a_loop())
    assert len(where.threads) == 12
    assert all(t.startswith("castore-worker") for t in where.threads)


def test_the_switch_interval_is_short_while_runs_are_live(store):
    """Shorter while any run of the process is live, restored by the last to end, and
    never longer than the process had set."""
    import sys

    from castore.pipeline.gil import SWITCH_INTERVAL, short_switches

    seen: list[float] = []

    class Look(Step):
        outputs = ["y"]

        def process(self, inputs: StepInput):
            seen.append(sys.getswitchinterval())
            return [{**r, "y": 1} for r in inputs]

    before = sys.getswitchinterval()
    with Pipeline(name="switch") as p:
        LoadDataFromDicts(data=[{"x": i} for i in range(10)], batch_size=10) >> Look()
    p.run(cache_dir=store.root, quiet=True)
    assert seen == [SWITCH_INTERVAL] and sys.getswitchinterval() == before
    with short_switches():
        with short_switches():  # a second run in another thread
            assert sys.getswitchinterval() == SWITCH_INTERVAL
        assert sys.getswitchinterval() == SWITCH_INTERVAL  # the first is still live
    assert sys.getswitchinterval() == before
    sys.setswitchinterval(SWITCH_INTERVAL / 2)
    try:
        with short_switches():
            assert sys.getswitchinterval() == SWITCH_INTERVAL / 2
    finally:
        sys.setswitchinterval(before)


def test_the_pace_of_a_step_waiting_for_the_gil_keeps_it_on_the_driver():
    """A batch is quick by its wall time, or by its thread's CPU time when its wall time
    is under gil.WAITING (the rest was a wait for the GIL, or short I/O); a step sent back
    to threads needs twice as many quick batches to return each time."""
    from castore.pipeline.gil import QUICK, QUICK_AFTER, WAITING, Pace

    pace = Pace()
    for _ in range(QUICK_AFTER):
        assert not pace.inline
        pace.took(2 * QUICK, QUICK / 3, inline=False)  # on a thread, waiting for the GIL
    assert pace.inline
    pace.took(1.5 * QUICK, QUICK / 2, inline=True)  # on the driver, the loader held the GIL
    assert pace.inline
    pace.took(16 * QUICK, 15 * QUICK, inline=True)  # a garbage collection: back to a thread
    assert not pace.inline
    for _ in range(2 * QUICK_AFTER - 1):
        pace.took(QUICK / 2, QUICK / 2, inline=False)
    assert not pace.inline
    pace.took(QUICK / 2, QUICK / 2, inline=False)
    assert pace.inline
    waiting = Pace()  # I/O for longer than WAITING: never on the driver, however idle
    for _ in range(50):
        waiting.took(WAITING * 1.2, QUICK / 10, inline=False)
    assert not waiting.inline


def test_a_step_waiting_on_io_stays_on_threads(store, where):
    where.slow = set(range(20))  # each batch sleeps 0.5 s: no CPU, but long
    traced_pipeline(n=30).run(cache_dir=store.root, quiet=True)
    assert len(where.threads) == 6
    assert all(t.startswith("castore-worker") for t in where.threads)
