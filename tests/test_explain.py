from __future__ import annotations

import textwrap

import castore
from castore import Pipeline
from castore.llms import OpenAILLM
from castore.steps import (
    FilterRows,
    KeepColumns,
    LoadDataFromDicts,
    RenameColumns,
    TextGeneration,
)
from castore.store.manifests import StepManifest, load_model
from tests.conftest import cas_inproc
from tests.llm_server import LLMServer
from tests.test_pipeline import _load_variant, build, counts


def by_step(report):
    return {s.step: s for s in report.steps}


def test_middle_param_change_is_named_and_propagates(store):
    build(factor=2).run(cache_dir=store.root, quiet=True)
    build(factor=3).run(cache_dir=store.root, quiet=True)
    rep = by_step(castore.explain("p", cache_dir=store.root))
    assert rep["load_data_from_dicts"].status == "cached"
    assert rep["upper"].status == "cached" and rep["upper"].reasons == []
    assert rep["score"].status == "computed"
    assert rep["score"].changed_params == {"factor": [2, 3]}
    assert rep["score"].reasons == ["param factor: 2 → 3"]
    assert rep["keep_columns"].status == "computed"
    assert rep["keep_columns"].reasons == ["upstream step score's output changed"]
    r = cas_inproc("explain", "p", "--json", cache_dir=store.root)
    assert r.returncode == 0 and r.json()["steps"][2]["changed_params"] == {"factor": [2, 3]}
    text = cas_inproc("explain", "p", cache_dir=store.root).stdout
    assert "param factor: 2 → 3" in text


def test_root_cause_named_two_levels_down(store):
    def make(value):
        with Pipeline(name="chain") as p:
            load = LoadDataFromDicts(data=[{"k": i} for i in range(30)], batch_size=10)
            f = FilterRows(column="k", op=">=", value=value)
            k1 = RenameColumns(mapping={"k": "key"}, name="k1")
            k2 = KeepColumns(columns=["key"], name="k2")
            load >> f >> k1 >> k2
        return p

    make(5).run(cache_dir=store.root, quiet=True)
    make(10).run(cache_dir=store.root, quiet=True)
    rep = by_step(castore.explain("chain", cache_dir=store.root))
    assert rep["k2"].reasons == ["upstream step k1's output changed (because filter_rows changed)"]


def test_code_edit_is_named(store, tmp_path):
    from tests.test_pipeline import STEP_SRC

    _load_variant(tmp_path, 10, STEP_SRC).run(cache_dir=store.root, quiet=True)
    _load_variant(tmp_path, 11, STEP_SRC.replace('r["x"] * 2', 'r["x"] * 5')).run(
        cache_dir=store.root, quiet=True
    )
    rep = by_step(castore.explain("edit", cache_dir=store.root))
    assert rep["twice"].reasons == ["code of `process` changed"]
    assert rep["load_data_from_dicts"].status == "cached"


def test_missing_object_is_named(store):
    first = build().run(cache_dir=store.root, quiet=True)
    upper = load_model(store, first.run.step_manifest_id("upper"), StepManifest)
    store.delete_object(upper.batches[1].outputs[0])
    again = build().run(cache_dir=store.root, quiet=True)
    assert counts(again, "upper")[1] == 1
    rep = by_step(castore.explain("p", cache_dir=store.root))
    assert rep["upper"].status == "mixed"
    assert rep["upper"].reasons == [
        "an object it needed was missing or corrupt, so it was recomputed (1 batch)"
    ]


def test_no_cache_and_first_run(store):
    build().run(cache_dir=store.root, quiet=True)
    rep = by_step(castore.explain("p", cache_dir=store.root))
    assert rep["upper"].reasons == ["no earlier run of this pipeline to reuse"]
    build().run(cache_dir=store.root, quiet=True, use_cache=False)
    rep = by_step(castore.explain("p", cache_dir=store.root))
    assert rep["upper"].reasons[0].startswith("--no-cache")


def test_diff_reports_removed_rows_exactly(store):
    def make(value):
        with Pipeline(name=f"filter-{value}") as p:
            LoadDataFromDicts(
                data=[{"k": i, "t": f"r{i}"} for i in range(50)], batch_size=10
            ) >> FilterRows(column="k", op=">=", value=value)
        return p

    a = make(5).run(cache_dir=store.root, quiet=True)
    b = make(20).run(cache_dir=store.root, quiet=True)
    rep = castore.diff(a.run.signature[:10], b.run.signature[:10], cache_dir=store.root)
    assert rep.steps_changed == {"filter_rows": ["param value: 5 → 20"]}
    (leaf,) = rep.leaves
    assert not leaf.identical and leaf.rows_a == 45 and leaf.rows_b == 30
    assert leaf.rows_added == 0 and leaf.rows_removed == 15
    assert sorted(r["k"] for r in leaf.removed) == list(range(5, 20))
    same = castore.diff(a.run.signature[:10], a.run.signature[:10], cache_dir=store.root)
    assert same.leaves[0].identical and same.steps_changed == {}
    r = cas_inproc("diff", a.run.signature[:10], b.run.signature[:10], cache_dir=store.root)
    assert r.returncode == 0 and "45 → 30 rows (+0 / -15)" in r.stdout


def test_token_accounting_matches_the_server(store):
    server = LLMServer().start()
    try:

        def make():
            with Pipeline(name="tokens") as p:
                LoadDataFromDicts(
                    data=[{"instruction": f"say {i} words please"} for i in range(24)], batch_size=8
                ) >> TextGeneration(
                    llm=OpenAILLM(model="m", base_url=server.base_url), input_batch_size=8
                )
            return p

        first = make().run(cache_dir=store.root, quiet=True)
        served = 24 * (2 * 4 + 2)  # the server's usage: 4 prompt words, total 2w+2
        assert first.run.stats["text_generation"].tokens_spent == served
        again = make().run(cache_dir=store.root, quiet=True)
        st = again.run.stats["text_generation"]
        assert st.tokens_saved == served and st.tokens_spent == 0
        assert f"{served} tokens" in again.log
        show = cas_inproc("show", "tokens", "--json", cache_dir=store.root).json()
        assert show["saved"]["tokens"] == served and show["saved"]["batches"] >= 3
        du = cas_inproc("du", "--json", cache_dir=store.root).json()
        assert du["tokens_stored"] == served
    finally:
        server.stop()


def test_explain_unknown_step(store):
    build().run(cache_dir=store.root, quiet=True)
    r = cas_inproc("explain", "p", "nope", cache_dir=store.root)
    assert r.returncode != 0 and "has no step 'nope'" in r.stderr
    assert textwrap.dedent(r.stderr).count("Error") == 1


def test_after_a_stopped_run_explain_says_not_reached_not_changed(store, monkeypatch):
    """A run that failed half way, then the same pipeline again: the batches after the
    stop are new work, and nothing upstream changed (it used to say so)."""
    import os
    import time

    from castore import StepInput, step
    from castore.errors import StepFailed

    @step(inputs=["x"], outputs=["y"], ignore_env=["FLAKY_STOP"])
    def Flaky(inputs: StepInput):
        if os.environ.get("FLAKY_STOP") == "1" and inputs[0]["x"] >= 20:
            # keep_columns' batches of rows 0-19 are ready by now: let them finish before
            # the run fails, so the earlier run reached them (else which did is a race).
            time.sleep(0.5)
            raise RuntimeError("stopped here")
        return [{**r, "y": r["x"] * 2} for r in inputs]

    def make() -> Pipeline:
        with Pipeline(name="stopped") as p:
            load = LoadDataFromDicts(data=[{"x": i} for i in range(50)], batch_size=10)
            (
                load
                >> Flaky(name="flaky", input_batch_size=10)
                >> KeepColumns(columns=["y"], input_batch_size=10)
            )
        return p

    monkeypatch.setenv("FLAKY_STOP", "1")
    try:
        make().run(cache_dir=store.root, quiet=True)
    except StepFailed:
        pass
    monkeypatch.delenv("FLAKY_STOP")
    make().run(cache_dir=store.root, quiet=True)
    rep = by_step(castore.explain("stopped", cache_dir=store.root))
    for name in ("flaky", "keep_columns"):
        assert rep[name].status == "mixed", rep[name]
        assert len(rep[name].reasons) == 1
        assert (
            rep[name]
            .reasons[0]
            .startswith("not reached by the earlier run, which stopped (failed)")
        )
    assert not any("changed" in r for s in rep.values() for r in s.reasons)
