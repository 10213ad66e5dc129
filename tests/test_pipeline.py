from __future__ import annotations

import asyncio
import json
import re
import textwrap
from typing import ClassVar

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import SecretStr

from castore import GlobalStep, Pipeline, Step, StepInput, StepOutput, step
from castore.distiset import Distiset
from castore.errors import ConfigError, PipelineError, StepFailed
from castore.pipeline.pipeline import load_file_module
from castore.steps import (
    CombineOutputs,
    DeduplicateRows,
    ExpandColumns,
    FilterRows,
    KeepColumns,
    LoadDataFromDicts,
    LoadDataFromFileSystem,
    LoadDataFromHub,
    RenameColumns,
)

ROWS = [{"instruction": f"q{i}", "n": i} for i in range(230)]


@step(inputs=["instruction"], outputs=["response"])
def Upper(inputs: StepInput) -> StepOutput:
    yield [{**row, "response": row["instruction"].upper()} for row in inputs]


@step(inputs=["n"], outputs=["score"])
def Score(inputs: StepInput, factor: int = 2) -> StepOutput:
    yield [{**row, "score": row["n"] * factor} for row in inputs]


def rows(ds: Distiset, leaf: str) -> list[dict]:
    return ds[leaf]["train"].to_list()


def counts(ds: Distiset, name: str) -> tuple[int, int]:
    s = ds.run.stats[name]
    return s.batches_cached, s.batches_computed


def build(name="p", factor=2, batch=40, data=ROWS, concurrency=1) -> Pipeline:
    with Pipeline(name=name) as p:
        load = LoadDataFromDicts(data=data, batch_size=25)
        up = Upper(input_batch_size=batch, concurrency=concurrency)
        score = Score(factor=factor, input_batch_size=30)
        keep = KeepColumns(columns=["instruction", "response", "score"])
        load >> up >> score >> keep
    return p


def test_run_returns_distiset_and_rerun_is_all_cached(store):
    ds = build().run(cache_dir=store.root)
    expected = [
        {"instruction": r["instruction"], "response": r["instruction"].upper(), "score": r["n"] * 2}
        for r in ROWS
    ]
    assert rows(ds, "keep_columns") == expected
    assert not ds.partial and ds.run.status == "finished"
    assert "Distiset({" in repr(ds) and "num_rows: 230" in repr(ds)
    again = build().run(cache_dir=store.root)
    for s in ("load_data_from_dicts", "upper", "score", "keep_columns"):
        assert counts(again, s)[1] == 0, s
    assert rows(again, "keep_columns") == expected


def test_a_replayed_rerun_writes_no_new_step_manifests(store):
    """A re-run of a finished pipeline names the step manifests of the run it replays
    (the same batches); that it computed nothing is in its stats, and `cas explain`
    says so."""
    from castore.store.manifests import RunManifest, load_model
    from tests.conftest import cas_inproc

    first = build().run(cache_dir=store.root, quiet=True)
    objects = set(store.iter_oids())
    again = build().run(cache_dir=store.root, quiet=True)
    a = load_model(store, first.run_oid, RunManifest)
    b = load_model(store, again.run_oid, RunManifest)
    assert [s.manifest for s in a.steps] == [s.manifest for s in b.steps]
    assert set(store.iter_oids()) - objects == {again.run_oid, b.log}  # and its attempt's log
    assert all(st.batches_computed == 0 and st.batches_cached for st in b.stats.values())
    r = cas_inproc("explain", "p", "--json", cache_dir=store.root)
    assert r.returncode == 0 and {s["status"] for s in r.json()["steps"]} == {"cached"}


def test_downstream_param_change_recomputes_only_descendants(store):
    first = build(factor=2).run(cache_dir=store.root)
    second = build(factor=3).run(cache_dir=store.root)
    n_up = first.run.stats["upper"].batches_computed
    assert counts(second, "load_data_from_dicts") == (10, 0)
    assert counts(second, "upper") == (n_up, 0)
    assert counts(second, "score")[0] == 0 and counts(second, "score")[1] > 0
    assert counts(second, "keep_columns")[0] == 0
    assert rows(second, "keep_columns")[5]["score"] == 15


def test_concurrency_does_not_change_keys_or_data(store):
    a = build(concurrency=1).run(cache_dir=store.root)
    b = build(concurrency=8).run(cache_dir=store.root)
    assert b.run.signature == a.run.signature
    assert all(counts(b, s)[1] == 0 for s in b.run.stats)
    assert rows(a, "keep_columns") == rows(b, "keep_columns")


def test_use_cache_false_recomputes(store):
    build().run(cache_dir=store.root)
    ds = build().run(cache_dir=store.root, use_cache=False)
    assert all(counts(ds, s)[0] == 0 for s in ds.run.stats)


def test_shared_first_step_is_deduped_across_pipelines(store):
    build(name="first").run(cache_dir=store.root)
    other = build(name="second", factor=5).run(cache_dir=store.root)
    assert counts(other, "load_data_from_dicts")[1] == 0
    assert counts(other, "upper")[1] == 0
    assert counts(other, "score")[0] == 0


STEP_SRC = textwrap.dedent(
    """
    from castore import Pipeline, StepInput, StepOutput, step
    from castore.steps import LoadDataFromDicts

    @step(inputs=["x"], outputs=["y"])
    def Twice(inputs: StepInput) -> StepOutput:
        # BODY
        yield [{**r, "y": r["x"] * 2} for r in inputs]

    with Pipeline(name="edit") as pipeline:
        LoadDataFromDicts(data=[{"x": i} for i in range(20)], batch_size=5) >> Twice()
    """
)


def _load_variant(tmp_path, n: int, src: str):
    path = tmp_path / f"variant{n}.py"
    path.write_text(src)
    return load_file_module(path, f"edit_variant_{n}").pipeline


def test_code_edit_invalidates_comment_edit_does_not(store, tmp_path):
    base = _load_variant(tmp_path, 0, STEP_SRC).run(cache_dir=store.root)
    comment = STEP_SRC.replace("# BODY", "# a new comment\n        # and another")
    ds = _load_variant(tmp_path, 1, comment).run(cache_dir=store.root)
    assert counts(ds, "twice") == (1, 0)
    edited = STEP_SRC.replace('r["x"] * 2', 'r["x"] * 3')
    ds = _load_variant(tmp_path, 2, edited).run(cache_dir=store.root)
    assert counts(ds, "twice") == (0, 1)
    assert counts(ds, "load_data_from_dicts") == (4, 0)
    assert rows(ds, "twice")[3]["y"] == 9 and rows(base, "twice")[3]["y"] == 6


def test_cache_version_pins_code(store):
    @step(outputs=["y"])
    def Pinned(inputs: StepInput) -> StepOutput:
        yield [{**r, "y": 1} for r in inputs]

    with Pipeline(name="pin") as p:
        LoadDataFromDicts(data=[{"x": 1}]) >> Pinned(cache_version="1")
    fp1 = p.signatures()["pinned"]["fp"]
    p.steps["pinned"].cache_version = "2"
    assert p.signatures()["pinned"]["fp"] != fp1


def test_multi_predecessor_aligned_and_combined(store):
    with Pipeline(name="multi") as p:
        a = LoadDataFromDicts(data=[{"a": i} for i in range(50)], batch_size=7, name="a")
        b = LoadDataFromDicts(data=[{"b": -i} for i in range(50)], batch_size=11, name="b")
        c = CombineOutputs(input_batch_size=9)
        [a, b] >> c
    ds = p.run(cache_dir=store.root)
    assert rows(ds, "combine_outputs") == [{"a": i, "b": -i} for i in range(50)]


def test_multi_predecessor_length_mismatch_is_clear(store):
    with Pipeline(name="mismatch") as p:
        a = LoadDataFromDicts(data=[{"a": i} for i in range(10)], name="a")
        b = LoadDataFromDicts(data=[{"b": i} for i in range(12)], name="b")
        [a, b] >> CombineOutputs()
    with pytest.raises(PipelineError, match=r"a \(10 rows\), b \(12 rows\)"):
        p.run(cache_dir=store.root)


def test_global_filter_dedupe_rename(store):
    data = [{"t": f"x{i % 7}", "k": i} for i in range(40)]
    with Pipeline(name="curate") as p:
        load = LoadDataFromDicts(data=data, batch_size=6)
        f = FilterRows(column="k", op=">=", value=5, input_batch_size=4)
        d = DeduplicateRows(columns=["t"])
        r = RenameColumns(mapping={"t": "text"})
        load >> f >> d >> r
    ds = p.run(cache_dir=store.root)
    got = rows(ds, "rename_columns")
    assert got == [{"text": f"x{i % 7}", "k": i} for i in range(5, 12)]
    assert ds.run.stats["deduplicate_rows"].batches_computed == 1


def test_filter_predicate_code_enters_fingerprint(store):
    def fp_of(pred):
        with Pipeline(name="pred") as p:
            LoadDataFromDicts(data=[{"k": 1}]) >> FilterRows(predicate=pred)
        return p.signatures()["filter_rows"]["fp"]

    assert fp_of(lambda r: r["k"] > 0) != fp_of(lambda r: r["k"] > 1)


@pytest.mark.parametrize(
    ("kw", "says"),
    [
        ({"op": "min_length", "value": "twelve"}, "a length (an integer >= 0)"),
        ({"op": "max_length", "value": True}, "a length"),
        ({"op": "in", "value": "abc"}, "a list of the values"),
        ({"op": "not_null", "value": 3}, "takes no value"),
        ({"op": "contains"}, "what the column should contain"),
        ({"predicate": lambda r: True, "op": ">", "column": None}, "not used with a predicate"),
    ],
)
def test_filter_values_that_cannot_work_fail_at_build(kw, says):
    with pytest.raises(PipelineError, match=re.escape(says)):
        FilterRows(**{"column": "k", **kw})
    ok = FilterRows(column="k", op="min_length", value=0)
    assert [r["k"] for r in ok.process([{"k": "a"}, {"k": None}])] == ["a"]


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda: DeduplicateRows(columns=["bb"]), "needs input column 'bb'"),
        (lambda: FilterRows(column="bb", op="==", value=1), "needs input column 'bb'"),
        (lambda: RenameColumns(mapping={"bb": "c"}), "needs input column 'bb'"),
        (lambda: ExpandColumns(columns=["bb"]), "needs input column 'bb'"),
        (lambda: RenameColumns(mapping={"a": "b"}), "renaming 'a' to 'b' would overwrite"),
        (lambda: RenameColumns(mapping={"a": "c", "b": "c"}), "two columns to 'c'"),
    ],
)
def test_column_steps_check_the_columns_they_name_at_build(make, says):
    with pytest.raises(PipelineError, match=re.escape(says)):
        with Pipeline(name="cols") as p:
            LoadDataFromDicts(data=[{"a": 1, "b": [2]}]) >> make()
        p.validate()
    swapped = RenameColumns(mapping={"a": "b", "b": "a"})  # both renamed: nothing is lost
    assert swapped.process([{"a": 1, "b": 2}]) == [{"b": 1, "a": 2}]


def test_a_column_missing_from_a_files_batches_fails_the_batch(store, tmp_path):
    """A file's columns are known only once read: each batch is checked instead."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"a": i, "b": i % 3}) + "\n" for i in range(10)))

    @step(inputs=["zz"], outputs=["y"])
    def Reads(inputs: StepInput) -> StepOutput:
        yield [{**r, "y": 1} for r in inputs]

    for make, says in (
        (Reads, "step reads: its input has no column 'zz' (it has ['a', 'b'])"),
        (lambda: DeduplicateRows(columns=["bb"]), "its input has no column 'bb'"),
        (lambda: RenameColumns(mapping={"a": "b"}), "renaming 'a' to 'b' would overwrite"),
    ):
        with Pipeline(name="file-cols") as p:
            LoadDataFromFileSystem(data_files=str(data)) >> make()
        with pytest.raises((StepFailed, PipelineError), match=re.escape(says)):
            p.run(cache_dir=store.root, quiet=True)


def test_a_column_of_mixed_types_is_named_with_its_rows(store):
    @step(inputs=["k"], outputs=["v"])
    def Mixed(inputs: StepInput) -> StepOutput:
        yield [{**r, "v": "text" if r["k"] == 0 else [1, 2]} for r in inputs]

    with Pipeline(name="mixed") as p:
        LoadDataFromDicts(data=[{"k": 0}, {"k": 1}]) >> Mixed()
    with pytest.raises(
        StepFailed,
        match=re.escape(
            "column 'v' holds values Arrow cannot store as one type (str in row 0, list in row 1)"
        ),
    ):
        p.run(cache_dir=store.root, quiet=True)


class Flaky(Step):
    inputs = ["n"]
    outputs = ["ok"]
    fail_times: int = 0
    calls: ClassVar[dict] = {}

    def process(self, inputs: StepInput):
        key = inputs[0]["n"]
        seen = Flaky.calls.get(key, 0)
        Flaky.calls[key] = seen + 1
        if seen < self.fail_times:
            raise RuntimeError(f"flaky {key}")
        return [{**r, "ok": True} for r in inputs]


def test_retries_then_success(store):
    Flaky.calls.clear()
    with Pipeline(name="retry") as p:
        LoadDataFromDicts(data=[{"n": i} for i in range(6)], batch_size=2) >> Flaky(
            fail_times=2, max_retries=2, retry_backoff=0.01, input_batch_size=2
        )
    ds = p.run(cache_dir=store.root)
    assert all(r["ok"] for r in rows(ds, "flaky"))
    assert Flaky.calls == {0: 3, 2: 3, 4: 3}


def test_fail_fails_the_run_and_is_recorded(store):
    Flaky.calls.clear()
    with Pipeline(name="fail") as p:
        LoadDataFromDicts(data=[{"n": i} for i in range(4)], batch_size=2) >> Flaky(
            fail_times=5, input_batch_size=2
        )
    with pytest.raises(StepFailed, match="flaky"):
        p.run(cache_dir=store.root)
    from castore.runs import resolve_run

    info = resolve_run(store, "fail")
    assert info.status == "failed" and "flaky" in info.manifest.error


def test_skip_batches_are_not_cached_and_retried(store):
    Flaky.calls.clear()

    def make(fail_times):
        with Pipeline(name="skip") as p:
            LoadDataFromDicts(data=[{"n": i} for i in range(6)], batch_size=2) >> Flaky(
                fail_times=fail_times, on_error="skip", input_batch_size=2
            )
        return p

    ds = make(1).run(cache_dir=store.root, quiet=True)
    got = ds.__class__.from_manifest(store, ds.run_oid, enable_metadata=True)
    first = rows(got, "flaky")
    assert [r["ok"] for r in first] == [None] * 6
    assert "flaky 0" in first[0]["castore_metadata"]["error"]
    assert ds.run.stats["flaky"].batches_failed == 3
    # Same fingerprint (fail_times=1 again): the skipped batches were not cached.
    again = make(1).run(cache_dir=store.root)
    assert counts(again, "flaky") == (0, 3)
    assert all(r["ok"] for r in rows(again, "flaky"))
    assert "castore_metadata" not in again["flaky"]["train"].column_names


def test_missing_declared_output_column(store):
    @step(outputs=["answer"])
    def Forgets(inputs: StepInput) -> StepOutput:
        yield [{**r, "nope": 1} for r in inputs]

    with Pipeline(name="forget") as p:
        LoadDataFromDicts(data=[{"x": 1}]) >> Forgets()
    with pytest.raises(StepFailed, match="lacks declared column 'answer'"):
        p.run(cache_dir=store.root)


def test_build_time_column_check(store):
    with Pipeline(name="cols") as p:
        LoadDataFromDicts(data=[{"prompt": "x"}]) >> Upper()
    with pytest.raises(PipelineError, match="step upper needs input column 'instruction'"):
        p.run(cache_dir=store.root)


def test_cycle_is_refused():
    with Pipeline(name="cyc") as p:
        a = Upper(name="a")
        b = Upper(name="b")
        a >> b >> a
    with pytest.raises(PipelineError, match="cycle"):
        p.validate()


def test_async_and_table_returning_steps(store):
    @step(outputs=["z"])
    async def AsyncStep(inputs: StepInput):
        await asyncio.sleep(0.001)
        return [{**r, "z": r["x"] + 1} for r in inputs]

    class TableStep(GlobalStep):
        outputs = ["w"]

        def process(self, inputs):
            return pa.table({"x": [r["x"] for r in inputs], "w": [r["z"] * 10 for r in inputs]})

    with Pipeline(name="async") as p:
        (
            LoadDataFromDicts(data=[{"x": i} for i in range(9)], batch_size=4)
            >> AsyncStep(input_batch_size=3)
            >> TableStep()
        )
    ds = p.run(cache_dir=store.root)
    assert rows(ds, "table_step") == [{"x": i, "w": (i + 1) * 10} for i in range(9)]


class WithSecret(Step):
    outputs = ["y"]
    api_key: SecretStr | None = None
    model: str = "m"

    def process(self, inputs):
        assert self.api_key.get_secret_value() == "sk-very-secret-123"
        return [{**r, "y": 1} for r in inputs]


def test_secrets_never_hashed_or_written(store):
    def make(key):
        with Pipeline(name="secret") as p:
            LoadDataFromDicts(data=[{"x": 1}]) >> WithSecret(api_key=key)
        return p

    p = make("sk-very-secret-123")
    assert p.signature() == make("sk-other").signature()
    p.run(cache_dir=store.root)
    for path in store.root.rglob("*"):
        if path.is_file():
            assert b"sk-very-secret-123" not in path.read_bytes(), path


def test_yaml_round_trip_same_signature(store, tmp_path):
    p = build(factor=7)
    text = p.to_yaml()
    again = Pipeline.from_yaml(text)
    assert again.signature() == p.signature()
    (tmp_path / "pipeline.yaml").write_text(text)
    assert Pipeline.from_yaml(tmp_path / "pipeline.yaml").signature() == p.signature()


def test_run_folder_layout(store):
    ds = build().run(cache_dir=store.root)
    run_dir = store.root / "runs" / "p" / ds.run.signature
    files = sorted((run_dir / "data" / "keep_columns").iterdir())
    assert [f.name for f in files][:2] == ["00001.parquet", "00002.parquet"]
    table = pa.concat_tables([pq.read_table(f) for f in files])
    assert table.to_pylist() == rows(ds, "keep_columns")
    assert (run_dir / "pipeline.yaml").exists() and (run_dir / "pipeline.log").exists()
    log = (run_dir / "pipeline.log").read_text()
    assert "signature" in log and "step upper" in log


def test_file_loader_invalidates_on_edit(store, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"i{i}"}) + "\n" for i in range(30)))

    def make():
        with Pipeline(name="files") as p:
            LoadDataFromFileSystem(data_files=str(data), batch_size=10) >> Upper()
        return p

    first = make().run(cache_dir=store.root)
    same = make().run(cache_dir=store.root)
    assert counts(same, "load_data_from_file_system") == (3, 0)
    data.write_text(data.read_text().replace("i29", "changed"))
    edited = make().run(cache_dir=store.root)
    # The batches before the edited line are the same bytes: kept (tests/test_appends.py).
    assert counts(edited, "load_data_from_file_system") == (2, 1)
    assert rows(edited, "upper")[-1]["response"] == "CHANGED"
    assert rows(first, "upper")[-1]["response"] == "I29"


@pytest.mark.parametrize("fmt", ["csv", "parquet", "json"])
def test_file_loader_formats(store, tmp_path, fmt):
    table = pa.table({"instruction": [f"i{i}" for i in range(12)]})
    path = tmp_path / f"d.{fmt}"
    if fmt == "csv":
        path.write_text("instruction\n" + "\n".join(f"i{i}" for i in range(12)) + "\n")
    elif fmt == "parquet":
        pq.write_table(table, path)
    else:
        path.write_text(json.dumps(table.to_pylist()))
    with Pipeline(name=f"fmt-{fmt}") as p:
        LoadDataFromFileSystem(data_files=str(path), batch_size=5) >> Upper()
    ds = p.run(cache_dir=store.root)
    assert [r["response"] for r in rows(ds, "upper")] == [f"I{i}" for i in range(12)]


def test_hub_loader_offline_on_local_folder(store, tmp_path):
    folder = tmp_path / "local_ds"
    folder.mkdir()
    pq.write_table(pa.table({"instruction": [f"h{i}" for i in range(8)]}), folder / "train.parquet")
    with Pipeline(name="hub") as p:
        LoadDataFromHub(repo_id=str(folder), batch_size=3) >> Upper()
    ds = p.run(cache_dir=store.root)
    assert sorted(r["response"] for r in rows(ds, "upper")) == sorted(f"H{i}" for i in range(8))


def test_parameters_apply_and_unknowns_are_clear(store):
    ds = build().run({"score": {"factor": 10}}, cache_dir=store.root)
    assert rows(ds, "keep_columns")[2]["score"] == 20
    with pytest.raises(ConfigError, match="unknown step 'nope'"):
        build().run({"nope": {"x": 1}}, cache_dir=store.root)
    with pytest.raises(ConfigError, match="has no parameter 'bogus'"):
        build().run({"score": {"bogus": 1}}, cache_dir=store.root)
    assert ds.run.parameters == {"score": {"factor": 10}}


def test_routing_is_deterministic_and_partitions_batches(store):
    from castore.pipeline import sample_n_steps

    def make(name="route"):
        with Pipeline(name=name) as p:
            load = LoadDataFromDicts(data=[{"n": i} for i in range(100)], batch_size=10)
            b = Score(name="b", input_batch_size=7)
            c = Score(name="c", factor=3, input_batch_size=7)
            load >> sample_n_steps(1) >> [b, c]
        return p

    ds = make().run(cache_dir=store.root)
    got_b = [r["n"] for r in rows(ds, "b")]
    got_c = [r["n"] for r in rows(ds, "c")]
    assert sorted(got_b + got_c) == list(range(100))  # each batch went to exactly one
    assert got_b and got_c  # 10 batches, both sides chosen at least once (fixed seeds)
    again = make().run(cache_dir=store.root)
    assert [r["n"] for r in rows(again, "b")] == got_b
    assert counts(again, "b")[1] == 0 and counts(again, "c")[1] == 0
    assert Pipeline.from_yaml(make().to_yaml()).signature() == make().signature()


@step(inputs=["n"], outputs=["score"])
def KeepOdd(inputs: StepInput) -> StepOutput:
    yield [{**r, "score": r["n"]} for r in inputs if r["n"] % 2]


def test_a_step_joining_routed_branches_gets_each_row_from_the_branches_it_went_to(store):
    from castore.pipeline import sample_n_steps
    from castore.steps import GroupColumns

    def make(join_batch: int = 3, branch=Score):
        with Pipeline(name="join") as p:
            load = LoadDataFromDicts(data=[{"n": i} for i in range(40)], batch_size=10)
            branches = [Score(name="a", factor=2), Score(name="b", factor=3)]
            branches.append(branch(name="c", **({"factor": 5} if branch is Score else {})))
            group = GroupColumns(columns=["score"], input_batch_size=join_batch)
            load >> sample_n_steps(2) >> branches >> group
        return p

    ds = make().run(cache_dir=store.root)
    got = rows(ds, "group_columns")
    assert [r["n"] for r in got] == list(range(40))
    pairs = [(2, 3), (2, 5), (3, 5)]  # the branches' factors, in connection order
    for r in got:  # two scores per row: the two branches' answers for this very row
        assert any(r["grouped_score"] == [r["n"] * f, r["n"] * g] for f, g in pairs), r
    assert len({tuple(s // max(r["n"], 1) for s in r["grouped_score"]) for r in got[1:]}) > 1
    # Batches never span two routed batches: 4 routed batches of 10 rows, in 3 + 3 + 3 + 1.
    assert counts(ds, "group_columns") == (0, 16)
    again = make().run(cache_dir=store.root)
    assert rows(again, "group_columns") == got and counts(again, "group_columns")[1] == 0
    with pytest.raises(PipelineError, match=r"branch c made .* rows from .*one output row"):
        make(branch=KeepOdd).run(cache_dir=store.root)


def test_processes_executor_same_keys_and_data(store, tmp_path):
    threads = build(name="exec").run(cache_dir=tmp_path / "threads")
    procs = build(name="exec").run(cache_dir=store.root, executor="processes")
    assert procs.run.signature == threads.run.signature
    assert rows(procs, "keep_columns") == rows(threads, "keep_columns")
    assert counts(procs, "upper")[1] > 0
    # Switching executor reuses every batch.
    again = build(name="exec").run(cache_dir=store.root, executor="threads")
    assert all(counts(again, s)[1] == 0 for s in again.run.stats)


def test_unknown_executor(store):
    with pytest.raises(PipelineError, match="unknown executor"):
        build().run(cache_dir=store.root, executor="gpu")


def test_rerun_after_a_lost_object_recomputes_only_that_batch(store):
    first = build().run(cache_dir=store.root)
    from castore.store.manifests import StepManifest, load_model

    upper = load_model(store, first.run.step_manifest_id("upper"), StepManifest)
    store.delete_object(upper.batches[2].outputs[0])
    again = build().run(cache_dir=store.root)
    assert counts(again, "upper") == (len(upper.batches) - 1, 1)
    # Same content, same object id: everything downstream is still a hit.
    assert counts(again, "score")[1] == 0 and counts(again, "keep_columns")[1] == 0
    assert rows(again, "keep_columns") == rows(first, "keep_columns")


def test_finished_rerun_logs_no_step_work(store):
    build().run(cache_dir=store.root)
    ds = build().run(cache_dir=store.root)
    assert "no step work to do" in ds.log
    assert all(counts(ds, s)[1] == 0 for s in ds.run.stats)


def test_file_loader_reads_fsspec_urls(store):
    import fsspec

    fs = fsspec.filesystem("memory")
    with fs.open("/castore-test/in.jsonl", "w") as f:
        f.write("".join(json.dumps({"instruction": f"m{i}"}) + "\n" for i in range(7)))
    with Pipeline(name="fsspec") as p:
        LoadDataFromFileSystem(data_files="memory://castore-test/in.jsonl", batch_size=3) >> Upper()
    ds = p.run(cache_dir=store.root)
    assert [r["response"] for r in rows(ds, "upper")] == [f"M{i}" for i in range(7)]


def test_input_and_output_mappings_rename_at_the_step_and_never_overwrite(tmp_path):
    """distilabel's mappings, on every castore step: the input column `body` is read as
    the step's `text`, its output `n` written as `length`; a mapping onto a column the
    output already has is an error, not an overwrite. Row-wise reuse follows the mapped
    column (a re-run under another loader batch size computes nothing)."""
    from castore import Pipeline, step
    from castore.errors import CastoreError
    from castore.steps import LoadDataFromDicts

    calls = []

    @step(inputs=["text"], outputs=["n"], row_wise=True)
    def Count(inputs: StepInput):
        calls.append(len(inputs))
        return [{**r, "n": len(r["text"])} for r in inputs]

    rows = [{"body": "x" * i, "text_id": i} for i in range(10)]

    def build(batch: int, out: str = "length") -> Pipeline:
        with Pipeline(name="mapped") as p:
            LoadDataFromDicts(data=rows, batch_size=batch) >> Count(
                name="count", input_mappings={"text": "body"}, output_mappings={"n": out}
            )
        return p

    train = build(4).run(cache_dir=tmp_path / "c", quiet=True)["default"]["train"]
    assert train.column_names[:3] == ["body", "text_id", "length"]
    assert train["length"] == list(range(10))
    assert sum(calls) == 10
    build(3).run(cache_dir=tmp_path / "c", quiet=True)
    assert sum(calls) == 10  # found by row key through the mapping
    with pytest.raises(CastoreError, match="already has"):
        build(4, out="text_id").run(cache_dir=tmp_path / "c", quiet=True)
    # Unmapped steps keep the keys they had before mappings existed.
    plain = Count(name="plain")
    assert "input_mappings" not in plain.cache_params()
    # A mapping that names nothing is an error, never a no-op.
    with Pipeline(name="typo") as p:
        LoadDataFromDicts(data=rows) >> Count(
            name="count", input_mappings={"text": "body"}, output_mappings={"m": "length"}
        )
    with pytest.raises(CastoreError, match="output_mappings renames column 'm'"):
        p.run(cache_dir=tmp_path / "c", quiet=True)
    with pytest.raises(ValueError, match="as both"):
        Count(name="twice", input_mappings={"text": "body", "other": "body"})

    @step(outputs=["n"])
    def Undeclared(inputs: StepInput):
        return [{**r, "n": 1} for r in inputs]

    with Pipeline(name="absent") as p:
        LoadDataFromDicts(data=rows) >> Undeclared(name="u", input_mappings={"x": "nope"})
    with pytest.raises(CastoreError, match="has no column 'nope'"):
        p.run(cache_dir=tmp_path / "c", quiet=True)


def test_dry_run_is_a_run_of_its_own_whose_rows_the_full_run_reuses(store, tmp_path):
    from castore.runs import list_runs
    from castore.steps import LoadDataFromFileSystem

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"x": i}) + "\n" for i in range(10)))
    computed: list[int] = []

    @step(inputs=["v"], outputs=["y"], row_wise=True)
    def Double(inputs: StepInput):
        computed.extend(r["v"] for r in inputs)
        return [{**r, "y": r["v"] * 2} for r in inputs]

    with Pipeline(name="dbl") as p:
        LoadDataFromFileSystem(
            data_files=str(data), batch_size=4, output_mappings={"x": "v"}
        ) >> Double(input_batch_size=3)
    dry = p.dry_run(batch_size=2, cache_dir=store.root, quiet=True)
    assert dry["double"]["train"].to_list() == [{"v": 0, "y": 0}, {"v": 1, "y": 2}]
    assert computed == [0, 1]
    full = p.run(cache_dir=store.root, quiet=True)
    assert full["double"]["train"]["y"] == [2 * i for i in range(10)]
    # Rows 0 and 1 were not computed again (batches in flight may finish in any order).
    assert sorted(computed) == list(range(10))
    assert sorted(r.name for r in list_runs(store)) == ["dbl", "dbl-dry-run"]
