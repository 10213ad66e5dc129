"""Row-level reuse: a row-wise step never computes a row it has computed before under the
same fingerprint, whatever moved around it. Each scenario counts the expensive step's
calls and compares the dataset with a fresh --no-cache run in another store."""

from __future__ import annotations

import json
import random
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from castore import Pipeline, Step, StepInput, step
from castore.errors import PipelineError, StepFailed
from castore.pipeline import rows as rows_mod
from castore.remote import Remote
from castore.steps import FilterRows, KeepColumns, LoadDataFromDicts, LoadDataFromFileSystem
from castore.store import Store, rowpack
from castore.transfer import pull, push
from tests.conftest import cas_inproc

CALLS: list[str] = []
_LOCK = threading.Lock()


@step(inputs=["text"], outputs=["label"], row_wise=True)
def Label(inputs: StepInput, suffix: str = "!"):
    with _LOCK:
        CALLS.extend(r["text"] for r in inputs)
    return [{**r, "label": r["text"].upper() + suffix} for r in inputs]


def write_rows(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def base_rows(n: int = 120) -> list[dict]:
    return [{"id": i, "text": f"review number {i} " + "x" * (i % 17)} for i in range(n)]


def build(
    data: Path,
    *,
    name: str = "rows",
    min_len: int = 0,
    batch: int = 16,
    load_batch: int = 25,
    suffix: str = "!",
) -> Pipeline:
    with Pipeline(name=name) as p:
        load = LoadDataFromFileSystem(data_files=str(data), batch_size=load_batch)
        keep_long = FilterRows(column="id", op=">=", value=min_len)
        label = Label(input_batch_size=batch, suffix=suffix)
        load >> keep_long >> label >> KeepColumns(columns=["id", "text", "label"])
    return p


def run(p: Pipeline, cache: Path, **kw) -> tuple[list[dict], int, dict]:
    CALLS.clear()
    ds = p.run(cache_dir=cache, quiet=True, **kw)
    stats = ds.run.stats["label"]
    return ds["keep_columns"]["train"].to_list(), len(CALLS), stats.model_dump()


def fresh(p: Pipeline, tmp_path: Path) -> list[dict]:
    """The same configuration computed from nothing, in another store."""
    d = tmp_path / f"fresh-{random.random()}"
    return run(p, d, use_cache=False)[0]


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "reviews.jsonl"
    write_rows(path, base_rows())
    return path


def test_append_rows_computes_only_them(tmp_path, data):
    cache = tmp_path / "c"
    assert run(build(data), cache)[1] == 120
    write_rows(data, [*base_rows(), *[{"id": 1000 + i, "text": f"new {i}"} for i in range(5)]])
    rows, computed, stats = run(build(data), cache)
    assert computed == 5 and sorted(CALLS) == [f"new {i}" for i in range(5)]
    assert stats["rows_reused"] + stats["rows_cached"] == 120 and stats["rows_computed"] == 5
    assert rows == fresh(build(data), tmp_path)
    show = cas_inproc("show", "rows", "--json", cache_dir=cache).json()
    label = next(s for s in show["steps"] if s["name"] == "label")
    assert label["rows_reused"] == stats["rows_reused"] > 0 and label["rows_computed"] == 5
    assert show["saved"]["rows_by_key"] == stats["rows_reused"]
    explained = cas_inproc("explain", "rows", "label", "--json", cache_dir=cache).json()
    assert explained["steps"][0]["rows_reused"] == stats["rows_reused"]
    text = cas_inproc("explain", "rows", "label", cache_dir=cache).stdout
    assert "reused by row key" in text


@pytest.mark.parametrize(
    "change",
    [
        {"min_len": 30},  # a tighter upstream filter
        {"batch": 7},  # another input_batch_size
        {"load_batch": 9, "name": "other-name"},  # another pipeline, other loader batches
    ],
)
def test_moves_that_compute_nothing(tmp_path, data, change):
    cache = tmp_path / "c"
    run(build(data), cache)
    rows, computed, stats = run(build(data, **change), cache)
    assert computed == 0, CALLS[:5]
    assert stats["rows_reused"] + stats["rows_cached"] == stats["rows"]
    assert rows == fresh(build(data, **change), tmp_path)


def test_shuffled_input_and_an_unread_column_compute_nothing(tmp_path, data):
    cache = tmp_path / "c"
    run(build(data), cache)
    rows = base_rows()
    random.Random(7).shuffle(rows)
    write_rows(data, [{**r, "lang": "en"} for r in rows])
    got, computed, _ = run(build(data), cache)
    assert computed == 0
    assert got == fresh(build(data), tmp_path)


def test_equal_rows_are_separate_requests_and_stay_so(tmp_path):
    """Two rows with the same input are two samples (an LLM at temperature > 0), not
    one answer copied; a re-run with another batch size reuses both."""
    path = tmp_path / "dup.jsonl"
    write_rows(path, [{"id": i, "text": "same prompt"} for i in range(6)])
    cache = tmp_path / "c"
    assert run(build(path), cache)[1] == 6
    assert run(build(path, batch=4), cache)[1] == 0
    write_rows(path, [{"id": i, "text": "same prompt"} for i in range(8)])
    assert run(build(path, batch=4), cache)[1] == 2  # the 7th and 8th samples


def test_a_changed_param_computes_everything(tmp_path, data):
    cache = tmp_path / "c"
    run(build(data), cache)
    assert run(build(data, suffix="?"), cache)[1] == 120


SLOW = 0.02  # seconds per row


@step(inputs=["text"], outputs=["label"], row_wise=True)
def SlowLabel(inputs: StepInput):
    time.sleep(SLOW * len(inputs))
    return [{**r, "label": r["text"].upper()} for r in inputs]


def test_saved_counts_the_seconds_the_rows_reused_by_key_took(tmp_path, monkeypatch):
    """ "saved" counts what the rows taken by row key cost when they were made: each
    segment records its rows' compute seconds per row, a pack keeps them, and a batch
    of reused rows passes their cost on to its own segment."""
    monkeypatch.setattr(rows_mod, "PACK_AFTER", 2)  # the second run packs the first's
    data = tmp_path / "d.jsonl"
    write_rows(data, base_rows(24))
    cache = tmp_path / "c"

    def stats(batch: int):
        with Pipeline(name="slow") as p:
            LoadDataFromFileSystem(data_files=str(data), batch_size=24) >> SlowLabel(
                name="label", input_batch_size=batch
            )
        return p.run(cache_dir=cache, quiet=True).run.stats["label"]

    first = stats(4)
    assert first.rows_computed == 24 and first.compute_seconds >= 24 * SLOW
    assert first.seconds_saved == 0
    # Other batch sizes: (almost) no batch key hits, rows are taken by key (from the
    # first run's segments, then from the pack the second run wrote, then from rows the
    # second and third runs reused themselves).
    for batch in (5, 6, 7):
        st = stats(batch)
        assert st.rows_reused + st.rows_cached == 24 and st.rows_reused >= 16
        assert st.rows_computed == 0
        assert 24 * SLOW <= st.seconds_saved <= first.compute_seconds + 0.001, batch
    store = Store(cache)
    fp = next(store.iter_row_segments())[0]
    pack = rowpack.read(store, rowpack.current(store, fp) or "")
    assert pack is not None and pack.infos
    assert all(i is not None and (i.seconds_per_row or 0) >= SLOW for i in pack.infos)
    summary = cas_inproc("show", "slow", "--json", cache_dir=cache).json()
    assert summary["saved"]["seconds"] >= 24 * SLOW


META = "castore_metadata"


@step(inputs=["text"], outputs=["extra"])
def Tag(inputs: StepInput, v: int = 1):
    """An upstream step writing its own metadata entry (as an LLM task does)."""
    return [{**r, "extra": v, META: {**(r.get(META) or {}), "tag": {"v": v}}} for r in inputs]


class Judge(Step):
    """Row-wise, files its metadata entry under its name (as LLM tasks do)."""

    inputs = ["text"]
    outputs = ["score"]
    row_wise = True

    def process(self, inputs: StepInput):
        for r in inputs:
            CALLS.append(r["text"])
            meta = {**(r.get(META) or {}), self.name: {"len": len(r["text"])}}
            meta[f"raw_output_{self.name}"] = r["text"]  # as distilabel's tasks name it
            yield [{**r, "score": len(r["text"]), META: meta}]


def _metadata(ds, leaf: str) -> list[dict]:
    """The leaf's rows with their metadata column."""
    from castore import Distiset

    kept = Distiset.from_run(ds.run_oid, ds.store_root, enable_metadata=True)
    return kept[leaf]["train"].to_list()


def test_a_reused_rows_metadata_is_the_current_inputs_plus_the_steps_own(tmp_path):
    """A row taken by key carries the current upstream entries (not those of the run
    that computed it), and the step's own entry under its current name."""
    cache = tmp_path / "c"
    rows = [{"text": f"row {i}"} for i in range(6)]

    def go(*, v: int | None, name: str, batch: int):
        with Pipeline(name=f"meta-{name}") as p:
            load = LoadDataFromDicts(data=rows, batch_size=6)
            head = load >> Tag(v=v) if v is not None else load
            head >> Judge(name=name, input_batch_size=batch)
        CALLS.clear()
        ds = p.run(cache_dir=cache, quiet=True)
        return _metadata(ds, name), len(CALLS)

    def own(name: str, r: dict) -> dict:
        return {name: {"len": len(r["text"])}, f"raw_output_{name}": r["text"]}

    first, computed = go(v=1, name="judge", batch=3)
    assert computed == 6 and first[0][META] == {"tag": {"v": 1}, **own("judge", first[0])}
    # The upstream step changed (its entry too), the judge's inputs did not.
    got, computed = go(v=2, name="judge", batch=2)
    assert computed == 0 and [r["extra"] for r in got] == [2] * 6
    assert all(r[META] == {"tag": {"v": 2}, **own("judge", r)} for r in got)
    # Another pipeline, the judge under another name, no upstream entry at all.
    got, computed = go(v=None, name="grader", batch=4)
    assert computed == 0
    assert all(r[META] == own("grader", r) for r in got), got[0]
    # Rows first computed without any upstream entry keep the current ones.
    got, computed = go(v=3, name="grader", batch=5)
    assert computed == 0
    assert all(r[META] == {"tag": {"v": 3}, **own("grader", r)} for r in got)


def test_row_reuse_survives_gc_and_travels_with_push_pull(tmp_path, data):
    a, b = tmp_path / "a", tmp_path / "b"
    run(build(data), a)
    r = cas_inproc("gc", "--grace", "0", "--cache-ttl", "0", cache_dir=a)
    assert r.returncode == 0, r
    assert run(build(data, batch=5), a)[1] == 0  # the ref kept its rows and their keys
    assert cas_inproc("fsck", cache_dir=a).returncode == 0
    remote = tmp_path / "remote"
    push(Store(a), Remote(str(remote)))
    pull(Store(b), Remote(str(remote)))
    rows, computed, _ = run(build(data, batch=11), b)
    assert computed == 0 and rows == fresh(build(data, batch=11), tmp_path)


def test_a_damaged_segment_is_reported_and_its_rows_recomputed(tmp_path, data):
    cache = tmp_path / "c"
    run(build(data), cache)
    store = Store(cache)
    _, seg = next(store.iter_row_segments())
    path = Path(store.path_of(seg))
    path.chmod(0o644)
    path.write_bytes(b"not a segment")
    rows, computed, _ = run(build(data, batch=9), cache)
    assert 0 < computed < 120  # only the rows that segment named
    assert rows == fresh(build(data, batch=9), tmp_path)
    # The first configuration's run names the quarantined segment: running it again
    # writes the segment anew from the row keys (its batches are all cache hits).
    assert run(build(data), cache)[1] == 0
    assert cas_inproc("fsck", cache_dir=cache).returncode == 0
    # Same bytes, same id (its metadata too: the seconds per row its entry records), so
    # the entry that names it is whole again.
    assert Store(cache).reuse(seg)


def test_row_wise_needs_declared_columns(tmp_path):
    @step(row_wise=True)
    def Nothing(inputs: StepInput):
        return inputs

    with Pipeline("bad") as p:
        Nothing()
    with pytest.raises(PipelineError, match="row-wise step declares"):
        p.validate()


def test_text_generation_requests_only_new_rows(tmp_path):
    from castore.llms import OpenAILLM
    from castore.steps import LoadDataFromDicts, TextGeneration
    from tests.llm_server import LLMServer

    server = LLMServer().start()
    try:

        def gen(n: int, batch: int) -> Pipeline:
            with Pipeline(name="gen-rows") as p:
                LoadDataFromDicts(
                    data=[{"instruction": f"q {i}"} for i in range(n)], batch_size=20
                ) >> TextGeneration(
                    llm=OpenAILLM(model="m", base_url=server.base_url, backoff=0.01),
                    input_batch_size=batch,
                )
            return p

        cache = tmp_path / "c"
        gen(65, 10).run(cache_dir=cache, quiet=True)
        assert server.requests == 65
        gen(65, 7).run(cache_dir=cache, quiet=True)  # another batch size: nothing sent
        assert server.requests == 65
        ds = gen(70, 7).run(cache_dir=cache, quiet=True)  # 5 rows appended
        assert server.requests == 70
        rows = ds["text_generation"]["train"].to_list()
        assert [r["generation"] for r in rows] == [
            f"answer(m): {f'q {i}'[::-1]}" for i in range(70)
        ]
        st = ds.run.stats["text_generation"]
        assert st.rows_reused + st.rows_cached == 65 and st.rows_computed == 5
    finally:
        server.stop()


def test_after_a_partial_failure_only_failed_rows_are_requested_again(tmp_path):
    from castore.llms import OpenAILLM
    from castore.steps import LoadDataFromDicts, TextGeneration
    from tests.llm_server import LLMServer

    server = LLMServer().start()
    try:

        def gen() -> Pipeline:
            with Pipeline(name="partial") as p:
                LoadDataFromDicts(
                    data=[{"instruction": f"q {i}"} for i in range(30)], batch_size=30
                ) >> TextGeneration(
                    llm=OpenAILLM(model="m", base_url=server.base_url, backoff=0.01, max_retries=1),
                    input_batch_size=10,
                    on_error="skip",
                )
            return p

        cache = tmp_path / "c"
        server.always_fail = "q 1"  # every prompt containing "q 1": q 1, q 10..q 19
        first = gen().run(cache_dir=cache, quiet=True)
        failing = [f"q {i}" for i in range(30) if "q 1" in f"q {i}"]
        rows = first["text_generation"]["train"].to_list()
        assert sum(r["generation"] is None for r in rows) == len(failing)
        server.always_fail = "\x00never"
        before = server.requests
        again = gen().run(cache_dir=cache, quiet=True)
        assert server.requests - before == len(failing)  # only the failed rows
        assert all(r["generation"] for r in again["text_generation"]["train"].to_list())
    finally:
        server.stop()


@pytest.mark.parametrize(
    "executor", ["threads", "processes", pytest.param("ray", marks=pytest.mark.slow)]
)
def test_a_failing_row_with_on_error_fail_costs_only_its_own_requests(tmp_path, executor):
    """on_error="fail" (the default) and step retries: each retry, and the next run, asks
    only for the row that failed; the rows answered on the first attempt are kept (before,
    10 rows x 3 attempts = 30 requests, and 10 more in the next run)."""
    from castore.errors import StepFailed
    from castore.llms import OpenAILLM
    from castore.steps import LoadDataFromDicts, TextGeneration
    from tests.llm_server import LLMServer

    server = LLMServer().start()
    try:

        def gen() -> Pipeline:
            with Pipeline(name="fail-retry") as p:
                LoadDataFromDicts(
                    data=[{"instruction": f"q {i}"} for i in range(12)]
                ) >> TextGeneration(
                    llm=OpenAILLM(model="m", base_url=server.base_url, backoff=0, max_retries=0),
                    input_batch_size=10,
                    max_retries=2,
                    retry_backoff=0,
                )
            return p

        cache = tmp_path / "c"
        server.always_fail = "q 3"
        with pytest.raises(StepFailed, match=r"1 row\(s\) failed.*the rows answered are kept") as e:
            gen().run(cache_dir=cache, quiet=True, executor=executor)
        assert "\n" not in str(e.value)  # one line, from Ray's workers too
        # The failing batch: 10 requests, then q 3 twice; the other batch at most 2.
        assert 12 <= server.requests <= 14
        assert sum("q 3" in b["messages"][-1]["content"] for b in server.bodies) == 3
        # The failed run's account has the tokens its answered rows cost.
        from castore.runs import list_runs
        from castore.store import Store

        failed = list_runs(Store(cache))[0].manifest
        assert failed.status == "failed"
        answered = server.requests - 3  # all but the three for q 3, 6 tokens each
        assert failed.stats["text_generation"].tokens_spent == 6 * answered
        before = server.requests
        server.always_fail = "\x00never"
        ds = gen().run(cache_dir=cache, quiet=True)
        asked = [b["messages"][-1]["content"] for b in server.bodies[before:]]
        assert "q 3" in asked and not {f"q {i}" for i in range(10) if i != 3} & set(asked)
        assert ds["text_generation"]["train"]["generation"] == [
            f"answer(m): {f'q {i}'[::-1]}" for i in range(12)
        ]
    finally:
        server.stop()


@pytest.mark.slow
def test_kill_9_mixing_reused_and_new_rows_then_resume(tmp_path):
    """300 rows done; 300 appended; kill -9 mid-run; resume: the dataset equals a fresh
    run's, and no row was computed twice beyond the batches in flight at the kill."""
    import os
    import signal
    import time

    from tests.conftest import REPO, run_cas, start_cas

    pipeline = REPO / "tests" / "pipelines" / "rowwise.py"
    data, calls, cache = tmp_path / "data.jsonl", tmp_path / "calls.txt", tmp_path / "c"
    rows = [{"id": i, "text": f"row {i}"} for i in range(600)]
    write_rows(data, rows[:300])
    env = {"CASTORE_TEST_DATA": str(data), "CASTORE_TEST_CALLS": str(calls)}
    assert run_cas("run", str(pipeline), cache_dir=cache, env=env).returncode == 0
    write_rows(data, rows)
    calls.write_text("")
    proc = start_cas("run", str(pipeline), cache_dir=cache, env=env)
    deadline = time.monotonic() + 60
    while len(calls.read_text().splitlines()) < 60 and time.monotonic() < deadline:
        assert proc.poll() is None
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    r = run_cas("resume", "rowwise", "--json", cache_dir=cache, env=env)
    assert r.returncode == 0, r
    computed = [line.split(" ", 1)[1] for line in calls.read_text().splitlines()]
    assert set(computed) == {f"row {i}" for i in range(300, 600)}  # never an old row
    assert len(computed) <= 300 + 2 * 15  # repeats only from the two batches in flight
    fresh_cache = tmp_path / "fresh"
    f = run_cas("run", str(pipeline), "--no-cache", "--json", cache_dir=fresh_cache, env=env)
    from castore.distiset import Distiset

    got = Distiset.from_run("rowwise", cache)["keep_columns"]["train"].to_list()
    want = Distiset.from_run("rowwise", fresh_cache)["keep_columns"]["train"].to_list()
    assert f.returncode == 0 and got == want


def test_rows_are_read_through_from_a_remote(tmp_path, data):
    """A second machine with only read-through (no pull) reuses rows by key: the step's
    segments and the objects its rows are in come from the remote, verified."""
    a, c, remote = tmp_path / "a", tmp_path / "c", tmp_path / "remote"
    run(build(data), a)
    push(Store(a), Remote(str(remote)))
    rows, computed, stats = run(build(data, batch=13), c, remote=str(remote))
    assert computed == 0 and stats["rows_reused"] == stats["rows"]
    assert rows == fresh(build(data, batch=13), tmp_path)
    assert cas_inproc("fsck", cache_dir=c).returncode == 0


def test_row_reuse_with_the_process_executor(tmp_path, data):
    """Workers in other processes get the row plan and read found rows themselves."""
    cache = tmp_path / "c"
    run(build(data), cache, executor="processes")
    write_rows(data, [*base_rows(), *[{"id": 2000 + i, "text": f"late {i}"} for i in range(3)]])
    rows, _, stats = run(build(data, batch=9), cache, executor="processes")
    assert stats["rows_computed"] == 3 and stats["rows_reused"] + stats["rows_cached"] == 120
    assert rows == fresh(build(data, batch=9), tmp_path)


def test_rows_computed_without_the_cache_are_reused_later(tmp_path, data):
    cache = tmp_path / "c"
    assert run(build(data), cache, use_cache=False)[1] == 120
    assert run(build(data, batch=6), cache)[1] == 0


def test_a_row_wise_step_that_reorders_its_rows_fails_in_one_line(tmp_path, data):
    @step(inputs=["text"], outputs=["label"], row_wise=True)
    def Reversed(inputs: StepInput):
        return [{**r, "label": "x"} for r in reversed(inputs)]

    from castore.errors import StepFailed

    with Pipeline("reorder") as p:
        LoadDataFromFileSystem(data_files=str(data), batch_size=25) >> Reversed(input_batch_size=8)
    with pytest.raises(StepFailed, match="do not keep the order and values of input column"):
        p.run(cache_dir=tmp_path / "c", quiet=True)


def test_a_row_wise_step_that_returns_an_undeclared_column_fails_in_one_line(tmp_path, data):
    """Only declared outputs are kept per row key: a column beside them would be dropped
    (it was, silently) or exist only for the rows computed in this run."""

    @step(inputs=["text"], outputs=["label"], row_wise=True)
    def Chatty(inputs: StepInput):
        return [{**r, "label": "x", "score": 1} for r in inputs]

    from castore.errors import StepFailed

    with Pipeline("chatty") as p:
        LoadDataFromFileSystem(data_files=str(data), batch_size=25) >> Chatty(input_batch_size=8)
    with pytest.raises(
        StepFailed, match=r"returned column 'score', which is not among its outputs \['label'\]"
    ):
        p.run(cache_dir=tmp_path / "c", quiet=True)


@step(inputs=["text"], outputs=["label"], row_wise=True)
def Peeks(inputs: StepInput, strict: bool = False):
    """Would read a column it does not declare: `id` is in every row it is given."""
    get = (lambda r: r["id"]) if strict else (lambda r: r.get("id", -1))
    return [{**r, "label": f"{r['text'][:6]}#{get(r)}"} for r in inputs]


def test_a_row_wise_step_sees_only_the_columns_its_rows_are_keyed_by(tmp_path):
    """A row found by key is reused for any row with the same input values, so a row-wise
    step is given its declared inputs alone (the other columns come back from the input):
    a computed row cannot depend on what the key leaves out, and reading such a column is
    an error that names it, not a wrong row reused later."""
    from castore.steps import LoadDataFromDicts

    def peeks(ids: list[int], strict: bool = False) -> Pipeline:
        with Pipeline(name="peeks") as p:
            data = [{"id": i, "text": "same text"} for i in ids]
            LoadDataFromDicts(data=data, batch_size=4) >> Peeks(strict=strict, input_batch_size=3)
        return p

    a, b = tmp_path / "a", tmp_path / "b"
    peeks([1, 2, 3]).run(cache_dir=a, quiet=True)
    got = peeks([7, 8, 9]).run(cache_dir=a, quiet=True)["peeks"]["train"].to_list()
    fresh = peeks([7, 8, 9]).run(cache_dir=b, quiet=True, use_cache=False)
    assert got == fresh["peeks"]["train"].to_list()
    assert [r["id"] for r in got] == [7, 8, 9]  # the input's own columns, not the stored
    assert {r["label"] for r in got} == {"same t#-1"}
    with pytest.raises(StepFailed, match="reads column 'id', which is not among its inputs"):
        peeks([1], strict=True).run(cache_dir=tmp_path / "c", quiet=True)


STOPPING_SCRIPT = """
import os
from castore import Pipeline
from castore.llms import OpenAILLM
from castore.steps import LoadDataFromDicts, TextGeneration

with Pipeline(name="stopping") as pipeline:
    LoadDataFromDicts(data=[{"instruction": f"q {i}"} for i in range(120)]) >> TextGeneration(
        llm=OpenAILLM(
            model="m", base_url=os.environ["TEST_LLM_URL"], max_concurrent_requests=4
        ),
        input_batch_size=40,
        concurrency=2,
    )
"""


@dataclass
class Stopping:
    """`cas run` of STOPPING_SCRIPT (two 40-row LLM batches at once, 4 requests at a
    time, 0.1 s each) left running until 30 requests were sent."""

    proc: subprocess.Popen
    script: Path
    cache: Path
    env: dict[str, str]
    server: Any
    resumed: Any = None  # the `cas resume` result
    resumed_from = fresh_from = 0  # the server's request counts at the resume, and after

    @classmethod
    def start(
        cls, tmp_path: Path, server: Any, *args: str, source: str = STOPPING_SCRIPT, until: int = 30
    ) -> Stopping:
        from tests.conftest import start_cas

        script = tmp_path / "stopping.py"
        script.write_text(source)
        env = {"TEST_LLM_URL": server.base_url, "OPENAI_API_KEY": "sk-test-secret"}
        cache = tmp_path / "c"
        proc = start_cas("run", str(script), *args, cache_dir=cache, env=env)
        deadline = time.monotonic() + 60
        while server.requests < until and time.monotonic() < deadline:
            assert proc.poll() is None
            time.sleep(0.01)
        return cls(proc, script, cache, env, server)

    def answered(self) -> set[str]:
        """The prompts whose answers reached the client, from the answers journals the
        stopped runs left (the server's echo: "answer(m): <prompt reversed>")."""
        out = set()
        for journal in (self.cache / "tmp").glob("answers-*"):
            for line in journal.read_bytes().splitlines():  # <key> <digest> <body>
                body = json.loads(json.loads(line.split(b" ", 2)[2]))
                out.add(body["choices"][0]["message"]["content"].split(": ", 1)[1][::-1])
        return out

    def never_asked_twice(self, answered: set[str], on_the_wire: int = 4) -> None:
        """No prompt whose answer came before a stop was asked after it, and the resume
        asked every other one once; asked again at all: at most what was on the wire at
        the stops (max_concurrent_requests each; counted by prompt, as a retry under
        load is not a second row)."""
        prompts = [b["messages"][-1]["content"] for b in self.server.bodies]
        before, resumed = prompts[: self.resumed_from], prompts[self.resumed_from : self.fresh_from]
        again = answered & set(resumed)
        assert not again, sorted(again)
        assert sorted(resumed) == sorted({f"q {i}" for i in range(120)} - answered)
        unanswered = set(before) - answered
        assert len(unanswered) <= on_the_wire, sorted(unanswered)

    def resume_equals_a_fresh_run(self, tmp_path: Path) -> None:
        """`cas resume`, then its dataset against a --no-cache run's (the metadata aside:
        attempts is 0 where an answer came from a journal)."""
        from castore.distiset import Distiset
        from tests.conftest import run_cas

        self.resumed_from = self.server.requests
        r = run_cas("resume", "stopping", cache_dir=self.cache, env=self.env)
        assert r.returncode == 0, r
        self.fresh_from = self.server.requests
        fresh = tmp_path / "fresh"
        f = run_cas("run", str(self.script), "--no-cache", cache_dir=fresh, env=self.env)
        assert f.returncode == 0, f
        got, want = (
            [
                {**row, "castore_metadata": None}
                for row in Distiset.from_run("stopping", c)["default"]["train"].to_list()
            ]
            for c in (self.cache, fresh)
        )
        assert got == want and len(got) == 120
        self.resumed = r


@pytest.mark.parametrize("how", ["ctrl_c_twice", "grace_over"])
def test_a_stopped_run_keeps_the_answers_of_its_batches_in_flight(tmp_path, how):
    """Ctrl+C twice, or once with the grace period running out, while two 40-row LLM
    batches are half answered: the run gives up their unanswered requests and stores the
    answered rows by key, so `cas resume` asks only for the rest. Paid twice: at most the
    requests on the wire at the stop (max_concurrent_requests); before, every answered
    row of both batches (~30 here)."""
    import signal

    from tests.llm_server import LLMServer

    server = LLMServer(latency=0.1).start()
    try:
        run = Stopping.start(tmp_path, server, *(["--grace", "0.5"] if how == "grace_over" else []))
        t0 = time.monotonic()
        run.proc.send_signal(signal.SIGINT)
        if how == "ctrl_c_twice":
            time.sleep(0.1)
            run.proc.send_signal(signal.SIGINT)
        _, err = run.proc.communicate(timeout=60)
        assert run.proc.returncode == 130, err
        assert time.monotonic() - t0 < 5  # a batch of 40 left alone takes ~4 s more
        assert "keeping the answers that came for the batches in flight" in err
        assert server.requests < 80  # stopped mid-batch: two batches of 40 were not all asked
        answered = run.answered()  # the interrupted run keeps its journal
        assert len(answered) >= 20
        run.resume_equals_a_fresh_run(tmp_path)
        run.never_asked_twice(answered)
    finally:
        server.stop()


def test_kill_9_mid_llm_batches_then_resume_sends_no_answered_request_again(tmp_path):
    """kill -9 while two 40-row LLM batches are half answered: the answers that came are
    in the run's journal (castore.answers), so `cas resume` sends only the requests that
    were never answered; paid twice: at most those on the wire at the kill. The journal
    holds no API key, `cas status` counts it, and it goes once a run finished with its
    answers."""
    import os
    import signal

    from tests.conftest import run_cas
    from tests.llm_server import LLMServer

    server = LLMServer(latency=0.1).start()
    try:
        run = Stopping.start(tmp_path, server)
        os.kill(run.proc.pid, signal.SIGKILL)
        assert run.proc.wait() == -signal.SIGKILL
        assert server.requests < 80  # killed mid-batch
        journals = list((run.cache / "tmp").glob("answers-*"))
        assert len(journals) == 1 and b"sk-test-secret" not in journals[0].read_bytes()
        answered = run.answered()
        assert len(answered) >= 20
        status = run_cas("status", str(run.script), cache_dir=run.cache, env=run.env)
        assert status.returncode == 0, status
        n = len(answered)
        assert f"{n} LLM answers that a stopped run of this pipeline" in status.stderr
        run.resume_equals_a_fresh_run(tmp_path)
        assert f"{n} LLM answers a stopped run received were used" in run.resumed.stderr
        run.never_asked_twice(answered)
        assert not list((run.cache / "tmp").glob("answers-*"))
    finally:
        server.stop()


def test_a_long_run_keeps_only_the_answers_of_batches_not_stored(tmp_path):
    """The answers journal is cut into segments, and a segment whose batches are all
    stored goes while the run goes on: kill -9 late in a run of twelve 10-row batches
    leaves about the answers of the batches in flight, not the run's, and the resume
    still pays again for none but those on the wire at the kill."""
    import os
    import signal

    from tests.llm_server import LLMServer

    source = (
        "import castore.answers\n"
        "castore.answers.SEGMENT_BYTES = 2048  # ~5 answers a segment\n"
        + STOPPING_SCRIPT.replace("input_batch_size=40", "input_batch_size=10")
    )
    server = LLMServer(latency=0.05).start()
    try:
        run = Stopping.start(tmp_path, server, source=source, until=90)
        os.kill(run.proc.pid, signal.SIGKILL)
        assert run.proc.wait() == -signal.SIGKILL
        asked = [b["messages"][-1]["content"] for b in server.bodies]
        assert len(set(asked)) >= 90
        left = run.answered()
        # two 10-row batches in flight, and the segments they share with stored ones
        assert len(left) <= 40, len(left)
        assert len(list((run.cache / "tmp").glob("answers-*"))) >= 1
        run.resume_equals_a_fresh_run(tmp_path)
        resumed = [b["messages"][-1]["content"] for b in server.bodies][
            run.resumed_from : run.fresh_from
        ]
        assert len(resumed) == len(set(resumed))
        assert set(asked) | set(resumed) == {f"q {i}" for i in range(120)}
        assert not left & set(resumed)
        assert len(set(asked) & set(resumed)) <= 4  # on the wire at the kill
        assert not list((run.cache / "tmp").glob("answers-*"))
    finally:
        server.stop()


@pytest.mark.slow
def test_llm_answers_survive_several_kills_in_a_row(tmp_path):
    """kill -9, then a resume killed too, three times: each attempt takes the answers of
    every earlier one (journals of dead runs are kept until a run finishes), so what is
    paid twice stays at most the requests on the wire at each kill."""
    import os
    import signal

    from tests.conftest import start_cas
    from tests.llm_server import LLMServer

    server = LLMServer(latency=0.1).start()
    try:
        run = Stopping.start(tmp_path, server)
        for kill in range(3):
            if kill:  # a resume, killed once it sent 20 more requests
                before = server.requests
                run.proc = start_cas("resume", "stopping", cache_dir=run.cache, env=run.env)
                deadline = time.monotonic() + 60
                while server.requests < before + 20 and time.monotonic() < deadline:
                    assert run.proc.poll() is None
                    time.sleep(0.01)
            os.kill(run.proc.pid, signal.SIGKILL)
            assert run.proc.wait() == -signal.SIGKILL
        assert len(list((run.cache / "tmp").glob("answers-*"))) >= 2
        answered = run.answered()
        run.resume_equals_a_fresh_run(tmp_path)
        run.never_asked_twice(answered, on_the_wire=3 * 4)
        assert not list((run.cache / "tmp").glob("answers-*"))
    finally:
        server.stop()
