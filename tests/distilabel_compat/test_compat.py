"""distilabel pipelines from distilabel's own docs, with only `distilabel` ->
`castore.distilabel` (and the LLM pointed at the local OpenAI-compatible test server):
they build, run, render their Jinja prompts exactly, and keep distilabel's names."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import datasets
import pytest

from castore.errors import CastoreError
from tests.llm_server import LLMServer, kill_after_requests

HERE = Path(__file__).resolve().parent / "pipelines"


@pytest.fixture
def server(monkeypatch, tmp_path):
    s = LLMServer().start()
    monkeypatch.setenv("OPENAI_BASE_URL", s.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("CASTORE_CACHE_DIR", str(tmp_path / "cache"))
    yield s
    s.stop()


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"compat_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


INSTRUCTIONS = [{"instruction": f"Write a haiku about the number {i}."} for i in range(7)]


def test_quickstart_runs_a_dataset_with_distilabels_names(server):
    m = load("quickstart")
    distiset = m.pipeline.run(dataset=datasets.Dataset.from_list(INSTRUCTIONS))
    train = distiset["default"]["train"]  # the single leaf, as distilabel names it
    assert list(distiset) == ["text_generation_0"]  # distilabel's default step name
    assert train["instruction"] == [r["instruction"] for r in INSTRUCTIONS]
    assert train["model_name"] == ["meta-llama/Meta-Llama-3.1-8B-Instruct"] * 7
    assert all(g.startswith("answer(") for g in train["generation"])
    assert server.requests == 7
    # max_new_tokens is sent as the API's max_tokens.
    assert {b.get("max_tokens") for b in server.bodies} == {512}
    assert not any("max_new_tokens" in b for b in server.bodies)
    # A re-run pays nothing.
    m.pipeline.run(dataset=datasets.Dataset.from_list(INSTRUCTIONS))
    assert server.requests == 7


def test_custom_template_renders_exactly_and_process_is_a_generator(server):
    m = load("custom_template")
    row = {"document": "The Eiffel Tower is in Paris.", "question": "Where is it?"}
    result = next(m.text_gen.process([row]))
    assert result[0]["generation"].startswith("answer(")
    body = server.bodies[-1]
    assert body["messages"][0] == {"role": "system", "content": m.text_gen.system_prompt}
    expected = m.CUSTOM_TEMPLATE.replace("{{ document }}", row["document"]).replace(
        "{{ question }}", row["question"]
    )
    assert body["messages"][1] == {"role": "user", "content": expected}
    meta = result[0]["castore_metadata"]
    assert meta[f"raw_input_{m.text_gen.name}"] == body["messages"]
    assert meta[f"raw_output_{m.text_gen.name}"] == result[0]["generation"]


def test_several_llms_with_output_mappings_and_nested_runtime_parameters(server, tmp_path):
    folder = tmp_path / "instruction-dataset-mini"
    folder.mkdir()
    prompts = [{"prompt": f"Explain topic {i}."} for i in range(9)]
    datasets.Dataset.from_list(prompts).to_json(folder / "test.jsonl")
    m = load("several_llms")
    gen_kwargs = {"llm": {"generation_kwargs": {"temperature": 0.7, "max_new_tokens": 64}}}
    names = [
        "text_generation_with_gpt-4-0125-preview",
        "text_generation_with_mistral-large-2402",
        "text_generation_with_gemini-pro",
    ]
    distiset = m.pipeline.run(
        parameters={
            "load_dataset": {"repo_id": str(folder), "split": "test"},
            **{n: gen_kwargs for n in names},
        },
    )
    assert sorted(distiset) == sorted(names)
    models = ("gpt-4-0125-preview", "mistral-large-2402", "gemini-pro")
    for n, model in zip(names, models, strict=True):
        train = distiset[n]["train"]
        assert train["instruction"] == [p["prompt"] for p in prompts]  # output_mappings
        assert "prompt" not in train.column_names
        assert set(train["model_name"]) == {model}
    assert server.requests == 27
    assert {(b["temperature"], b["max_tokens"]) for b in server.bodies} == {(0.7, 64)}
    # The same parameters from the CLI spelling, nested by dots.
    from castore.cli.run import parse_params

    assert parse_params(("g.llm.generation_kwargs.temperature=0.2",)) == {
        "g": {"llm": {"generation_kwargs": {"temperature": 0.2}}}
    }


def test_step_decorator_examples_generator_tuples_and_runtime_parameters(server):
    m = load("step_decorator")
    distiset = m.pipeline.run(
        parameters={
            "generation_step_0": {"dummy_generation": "hello"},
            "generator_step_0": {"num_rows": 12},
        }
    )
    train = distiset["default"]["train"]
    assert train["instruction"] == [f"instruction {i}" for i in range(12)]
    assert train["generation"] == ["hello"] * 12


def test_enable_metadata_keeps_distilabel_metadata(server):
    from castore.distilabel.models import OpenAILLM
    from castore.distilabel.pipeline import Pipeline
    from castore.distilabel.steps import LoadDataFromDicts
    from castore.distilabel.steps.tasks import TextGeneration

    with Pipeline(name="with-metadata", enable_metadata=True) as p:
        LoadDataFromDicts(data=INSTRUCTIONS[:3]) >> TextGeneration(llm=OpenAILLM(model="m"))
    train = p.run()["default"]["train"]
    assert "distilabel_metadata" in train.column_names
    assert "castore_metadata" not in train.column_names
    assert "raw_output_text_generation_0" in train["distilabel_metadata"][0]


def test_what_castore_does_not_do_is_an_error_not_a_silent_default(server):
    with pytest.raises(ImportError, match="base_url"):
        from castore.distilabel.models import InferenceEndpointsLLM  # noqa: F401
    with pytest.raises(ImportError, match="not provided by castore"):
        from castore.distilabel.steps.tasks import Genstruct  # noqa: F401
    with pytest.raises(ImportError, match="not provided by castore"):
        from castore.distilabel.steps import NoSuchStep  # noqa: F401
    from castore.distilabel.models import OpenAILLM
    from castore.distilabel.pipeline import Pipeline
    from castore.distilabel.steps import LoadDataFromDicts
    from castore.distilabel.steps.tasks import TextGeneration

    with pytest.raises(ValueError, match="num_generations"):
        TextGeneration(llm=OpenAILLM(model="m"), num_generations=0)
    with pytest.raises(ValueError, match="max_retries not supported"):
        OpenAILLM(model="m", structured_output={"schema": {}, "max_retries": 2})
    with Pipeline(requirements=["castore-no-such-package>=1"]) as p:
        LoadDataFromDicts(data=INSTRUCTIONS[:2]) >> TextGeneration(llm=OpenAILLM(model="m"))
    with pytest.raises(CastoreError, match="requirements are not met"):
        p.run()
    with pytest.raises(CastoreError, match="storage_parameters"):
        p.run(storage_parameters={"path": "x"})
    # A template variable outside `columns` fails at build time, naming it.
    with Pipeline(name="cols") as p2:
        LoadDataFromDicts(data=[{"a": 1, "b": 2}]) >> TextGeneration(
            llm=OpenAILLM(model="m"), template="{{ a }} {{ b }}", columns=["a"]
        )
    with pytest.raises(CastoreError, match="'b'"):
        p2.run()
    assert server.requests == 0


def test_loader_repo_id_set_at_run_time_or_a_clear_error(server):
    from castore.distilabel.pipeline import Pipeline
    from castore.distilabel.steps import LoadDataFromHub

    with Pipeline(name="no-repo") as p:
        LoadDataFromHub(name="load")
    with pytest.raises(CastoreError, match="repo_id is not set"):
        p.run()


@pytest.mark.slow
def test_kill_9_of_a_distilabel_script_then_running_it_again(tmp_path):
    """`python script.py`, killed with SIGKILL mid-generation, then run again: the saved
    dataset equals an uninterrupted run's, and no row is requested twice beyond the batches
    in flight."""
    import os
    import subprocess

    import datasets as hf

    script = HERE / "resumable.py"
    server = LLMServer(latency=0.03).start()
    try:

        def env(cache: Path) -> dict[str, str]:
            return {
                **os.environ,
                "OPENAI_BASE_URL": server.base_url,
                "CASTORE_CACHE_DIR": str(cache),
            }

        def run(cache: Path, out: Path) -> subprocess.CompletedProcess:
            return subprocess.run(
                [sys.executable, str(script), str(out)],
                env=env(cache),
                capture_output=True,
                text=True,
                timeout=120,
            )

        r = run(tmp_path / "ref", tmp_path / "ref-out")
        assert r.returncode == 0, r.stderr
        assert server.requests == 200
        ref = hf.load_from_disk(str(tmp_path / "ref-out" / "keep_columns_0"))["train"].to_list()
        server.requests = 0
        proc = subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "out")],
            env=env(tmp_path / "c"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        first = kill_after_requests(server, 80, proc)
        assert 0 < first < 200, first
        r = run(tmp_path / "c", tmp_path / "out")
        assert r.returncode == 0, r.stderr
        # In flight at the kill: the batch being computed and, since a batch is stored
        # outside its concurrency slot, the one before it being stored (10 rows each).
        assert server.requests <= 200 + 2 * 10, server.requests
        got = hf.load_from_disk(str(tmp_path / "out" / "keep_columns_0"))["train"].to_list()
        assert got == ref
    finally:
        server.stop()


def test_a_distilabel_pipeline_yaml_says_what_it_is(tmp_path):
    """A pipeline.yaml written by distilabel 1.5.3 (`Pipeline.save`, kept in
    tests/golden) given to `cas run`: one line naming it and what to run instead."""
    from tests.conftest import REPO, cas_inproc

    path = REPO / "tests" / "golden" / "distilabel_1_5_3_pipeline.yaml"
    r = cas_inproc("run", str(path), cache_dir=tmp_path / "c")
    assert r.returncode != 0
    assert "distilabel pipeline.yaml (distilabel 1.5.3)" in r.stderr, r.stderr
    assert "castore.distilabel" in r.stderr and "Traceback" not in r.stderr


def test_pipeline_keyword_and_connect_build_without_a_with_block(server):
    """distilabel's other way to build: `Step(pipeline=p)` and `a.connect(b)`."""
    from castore.distilabel.pipeline import Pipeline
    from castore.distilabel.steps import KeepColumns, LoadDataFromDicts

    p = Pipeline(name="no-with")
    load = LoadDataFromDicts(data=[{"a": 1, "b": 2}], pipeline=p)
    keep = KeepColumns(columns=["a"], pipeline=p)
    load.connect(keep)
    assert p.edges == [("load_data_from_dicts_0", "keep_columns_0")]
    assert p.run()["default"]["train"].to_list() == [{"a": 1}]


def test_num_generations_grouped_and_as_rows(server):
    """num_generations=3: three requests per row; grouped, one row with a list of three;
    not grouped, three rows per input (as distilabel). Both row-wise: another batch size
    re-sends nothing, an appended row sends its own three, and a repeated row gets three
    answers of its own (the n-th equal row's keys)."""
    from castore.distilabel.models import OpenAILLM
    from castore.distilabel.pipeline import Pipeline
    from castore.distilabel.steps import LoadDataFromDicts
    from castore.distilabel.steps.tasks import TextGeneration

    def build(group: bool, batch: int, rows: list[dict] = INSTRUCTIONS[:4]) -> Pipeline:
        with Pipeline(name=f"gens-{group}", enable_metadata=True) as p:
            LoadDataFromDicts(data=rows) >> TextGeneration(
                llm=OpenAILLM(model="m"),
                num_generations=3,
                group_generations=group,
                input_batch_size=batch,
            )
        return p

    train = build(True, 2).run()["default"]["train"]
    assert server.requests == 12
    assert [len(g) for g in train["generation"]] == [3, 3, 3, 3]
    assert train["instruction"] == [r["instruction"] for r in INSTRUCTIONS[:4]]
    meta = train["distilabel_metadata"][0]["text_generation_0"]
    assert meta["usage"]["total_tokens"] > 0 and len(meta["raw_output"]) == 3
    build(True, 3).run()
    assert server.requests == 12  # found by row key under another batch size
    train = build(False, 2).run()["default"]["train"]
    assert server.requests == 24
    assert len(train) == 12
    assert train["instruction"][:3] == [INSTRUCTIONS[0]["instruction"]] * 3
    again = build(False, 3).run()["default"]["train"]
    assert server.requests == 24  # as rows too: found by row key under another batch size
    assert again.to_list() == train.to_list()
    more = [*INSTRUCTIONS[:4], INSTRUCTIONS[0], INSTRUCTIONS[5]]  # a repeat, a new one
    train = build(False, 4, more).run()["default"]["train"]
    assert server.requests == 30 and len(train) == 18
    assert (
        train["instruction"][12:]
        == [INSTRUCTIONS[0]["instruction"]] * 3 + [INSTRUCTIONS[5]["instruction"]] * 3
    )
    # By hand (distilabel's `next(task.process(rows))`), before and after a run: n rows.
    alone = TextGeneration(llm=OpenAILLM(model="m"), num_generations=2)
    alone.load()
    assert len(next(alone.process(INSTRUCTIONS[:1]))) == 2
    with Pipeline(name="by-hand") as p:
        gen = TextGeneration(llm=OpenAILLM(model="m"), num_generations=2)
        LoadDataFromDicts(data=INSTRUCTIONS[:1]) >> gen
    assert len(p.run()["default"]["train"]) == 2
    gen.load()
    assert len(next(gen.process(INSTRUCTIONS[:1]))) == 2


def test_group_columns_after_several_llms(server):
    """distilabel's LLM-pool shape without routing: one loader, three TextGenerations,
    GroupColumns gathering each model's generation and name per row."""
    from castore.distilabel.models import OpenAILLM
    from castore.distilabel.pipeline import Pipeline
    from castore.distilabel.steps import GroupColumns, LoadDataFromDicts
    from castore.distilabel.steps.tasks import TextGeneration

    with Pipeline(name="pool") as p:
        load = LoadDataFromDicts(data=INSTRUCTIONS[:5], batch_size=2)
        gens = [TextGeneration(llm=OpenAILLM(model=m), input_batch_size=3) for m in "abc"]
        group = GroupColumns(
            columns=["generation", "model_name"], output_columns=["generations", "model_names"]
        )
        load >> gens >> group
    train = p.run()["default"]["train"]
    assert train["model_names"] == [["a", "b", "c"]] * 5
    assert [len(g) for g in train["generations"]] == [3] * 5
    assert train["generations"][0][1].startswith("answer(b)")
    assert train["instruction"] == [r["instruction"] for r in INSTRUCTIONS[:5]]
    assert server.requests == 15


JUDGE = """Text 1 rating: 4
Text 1 rationale: Accurate and clear.
Text 2 rating: 2
Text 2 rationale: Misses the question."""


def test_ultrafeedback_after_group_columns_parses_and_keeps_unparseable_rows(server):
    """The UltraFeedback paper pipeline's shape: generations from two models, grouped,
    rated by a judge. Parsed answers give ratings and rationales; an answer that cannot be
    parsed keeps its row with None (never invented values) and the raw answer in metadata;
    a re-run sends nothing."""
    from castore.distilabel.models import OpenAILLM
    from castore.distilabel.pipeline import Pipeline
    from castore.distilabel.steps import GroupColumns, LoadDataFromDicts
    from castore.distilabel.steps.tasks import TextGeneration, UltraFeedback

    def reply(req):
        if req["model"] != "judge":
            return f"answer from {req['model']}"
        if "number 2." in req["messages"][-1]["content"]:
            return "I think both are fine."  # not the format: nothing to parse
        if "number 3." in req["messages"][-1]["content"]:
            return "Text 1 rating: 9\nText 1 rationale: ok\nText 2 rating: N/A"
        return JUDGE

    server.reply = reply

    def build() -> Pipeline:
        with Pipeline(name="ultrafeedback", enable_metadata=True) as p:
            load = LoadDataFromDicts(data=INSTRUCTIONS[:4])
            gens = [TextGeneration(llm=OpenAILLM(model=m)) for m in ("m1", "m2")]
            group = GroupColumns(
                columns=["generation", "model_name"],
                output_columns=["generations", "generation_models"],
            )
            judge = UltraFeedback(llm=OpenAILLM(model="judge"), aspect="honesty")
            load >> gens >> group >> judge
        return p

    train = build().run()["default"]["train"]
    assert server.requests == 4 * 2 + 4
    assert train["ratings"] == [[4, 2], [4, 2], [None, None], [None, None]]
    assert train["rationales"][0] == ["Accurate and clear.", "Misses the question."]
    assert train["rationales"][3] == ["ok", None]
    assert train["generations"][0] == ["answer from m1", "answer from m2"]
    assert set(train["model_name"]) == {"judge"}
    raw = train["distilabel_metadata"][2]["raw_output_ultra_feedback_0"]
    assert raw == "I think both are fine."
    judged = next(b for b in server.bodies if b["model"] == "judge")["messages"][-1]["content"]
    assert "answer from m1" in judged and "Text 2 rating: <1-5>" in judged
    build().run()
    assert server.requests == 12


def test_ultrafeedback_parser_on_realistic_and_malformed_answers():
    from castore.steps.feedback import parse_ratings

    assert parse_ratings(JUDGE, 2) == ([4, 2], ["Accurate and clear.", "Misses the question."])
    assert parse_ratings("**Text 1 rating:** 5\n**Text 1 rationale:** Great.", 1) == (
        [5],
        ["Great."],
    )
    assert parse_ratings("Text 1 rating: 0\nText 2 rating: 6", 2) == ([None, None], [None, None])
    assert parse_ratings(None, 3) == ([None] * 3, [None] * 3)
    assert parse_ratings("Text 2 rating: 3", 2) == ([None, 3], [None, None])


EVENTS: list[str] = []


def test_a_custom_step_with_load_and_unload_as_distilabel_writes_it(server):
    """distilabel's custom steps override load() (calling super().load()) to set up what
    process() uses: castore calls it once per process before the first batch (threads
    share one load), and unload() at the end of the run."""
    from typing import Any

    from pydantic import PrivateAttr

    from castore.distilabel.pipeline import Pipeline
    from castore.distilabel.steps import LoadDataFromDicts, Step, StepInput

    class Tagger(Step):
        prefix: str = "tag"
        _resource: Any = PrivateAttr(None)

        @property
        def inputs(self) -> dict[str, bool]:
            # distilabel's {column: required}: the optional one is absent, and not checked.
            return {"instruction": True, "system_prompt": False}

        @property
        def outputs(self) -> list[str]:
            return ["tag"]

        def load(self) -> None:
            super().load()
            EVENTS.append("load")
            self._resource = f"{self.prefix}:"

        def unload(self) -> None:
            EVENTS.append("unload")

        def process(self, inputs: StepInput):
            yield [{**r, "tag": self._resource + r["instruction"][:5]} for r in inputs]

    with Pipeline(name="lifecycle") as p:
        LoadDataFromDicts(data=INSTRUCTIONS, batch_size=2) >> Tagger(
            input_batch_size=2, concurrency=3
        )
    train = p.run()["default"]["train"]
    assert train["tag"] == [f"tag:{r['instruction'][:5]}" for r in INSTRUCTIONS]
    assert EVENTS == ["load", "unload"]


def test_load_data_from_disk_datasets_and_saved_distisets(server, tmp_path):
    """LoadDataFromDisk as distilabel pipelines chain: a saved Dataset, a Distiset saved by
    distilabel 1.5.3 (tests/golden), one saved by castore; num_examples; clear errors."""
    from castore.distilabel.pipeline import Pipeline
    from castore.distilabel.steps import KeepColumns, LoadDataFromDicts, LoadDataFromDisk
    from tests.conftest import REPO

    def rows_of(**kw) -> list[dict]:
        with Pipeline(name="from-disk") as p:
            LoadDataFromDisk(**kw) >> KeepColumns(columns=["instruction"])
        return p.run()["default"]["train"].to_list()

    datasets.Dataset.from_list(INSTRUCTIONS).save_to_disk(str(tmp_path / "plain"))
    assert rows_of(dataset_path=str(tmp_path / "plain"), num_examples=3) == INSTRUCTIONS[:3]
    theirs = REPO / "tests" / "golden" / "distilabel_1_5_3_distiset"
    got = rows_of(dataset_path=str(theirs), is_distiset=True)
    assert got == [{"instruction": f"q{i}"} for i in range(6)]
    with Pipeline(name="first") as first:
        LoadDataFromDicts(data=INSTRUCTIONS) >> KeepColumns(columns=["instruction"])
    first.run().save_to_disk(tmp_path / "ours")
    assert rows_of(dataset_path=str(tmp_path / "ours"), is_distiset=True) == INSTRUCTIONS
    with pytest.raises(CastoreError, match="no saved dataset folder"):
        rows_of(dataset_path=str(tmp_path / "missing"))
    with pytest.raises(CastoreError, match="without splits"):
        rows_of(dataset_path=str(tmp_path / "plain"), split="test")
    with pytest.raises(CastoreError, match="is_distiset=True"):
        rows_of(dataset_path=str(tmp_path / "plain"), config="default")


def test_group_columns_refuses_a_predecessor_without_the_column(server):
    from castore.distilabel.pipeline import Pipeline
    from castore.distilabel.steps import GroupColumns, LoadDataFromDicts, RenameColumns

    with Pipeline(name="lacking") as p:
        load = LoadDataFromDicts(data=[{"a": 1, "x": 2}])
        keep = RenameColumns(mapping={"x": "y"})
        other = RenameColumns(mapping={"a": "b"})
        load >> [keep, other] >> GroupColumns(columns=["x"])
    with pytest.raises(CastoreError, match="has no column 'x' to group"):
        p.run()


def test_dry_run_sends_one_row_and_the_full_run_does_not_ask_it_again(server):
    from castore.distilabel.models import OpenAILLM
    from castore.distilabel.pipeline import Pipeline
    from castore.distilabel.steps import LoadDataFromDicts
    from castore.distilabel.steps.tasks import TextGeneration

    with Pipeline(name="haiku") as p:
        LoadDataFromDicts(data=INSTRUCTIONS, batch_size=3) >> TextGeneration(
            llm=OpenAILLM(model="m")
        )
    dry = p.dry_run()
    assert dry["default"]["train"]["instruction"] == [INSTRUCTIONS[0]["instruction"]]
    assert server.requests == 1
    assert dry.run.name == "haiku-dry-run"
    two = p.dry_run(batch_size=2)
    assert len(two["default"]["train"]) == 2 and server.requests == 2
    full = p.run()
    assert len(full["default"]["train"]) == 7
    assert server.requests == 7  # the rows the dry runs answered are not asked again
    assert full.run.name == "haiku"
    with pytest.raises(CastoreError, match="batch_size=0"):
        p.dry_run(batch_size=0)


def test_sample_n_steps_then_group_columns_joins_the_branches_each_batch_went_to(server):
    """distilabel's routing example: each loader batch goes to 2 of 3 models; every row
    gets exactly the two answers given to it, from two different models, in the order
    the steps were connected; a re-run sends nothing."""
    m = load("routing")
    train = m.pipeline.run()["default"]["train"]
    models = ["gpt-4-0125-preview", "mistral-large-2402", "gemini-1-5-pro"]
    assert len(train) == 200 and server.requests == 400
    assert train["instruction"] == [f"Explain the number {i}." for i in range(200)]
    for row in train.to_list():
        names = row["grouped_model_name"]
        assert len(names) == 2 and names == sorted(names, key=models.index)
        assert [g.split(":")[0] for g in row["grouped_generation"]] == [
            f"answer({n})" for n in names
        ]
        # Each answer is to this row's own prompt.
        assert all(row["instruction"][::-1] in g for g in row["grouped_generation"])
    # Four loader batches of 50 rows, each sent to a pair: more than one pair is used.
    assert len({tuple(n) for n in train["grouped_model_name"]}) > 1
    m.pipeline.run()
    assert server.requests == 400


@pytest.mark.slow
def test_generations_as_rows_kill_9_then_resume_asks_each_once(tmp_path, monkeypatch):
    """num_generations=3 as rows: 300 rows answered, 300 appended, kill -9 mid-run, resume:
    the old rows are never asked again, the new ones three times each beyond only the
    batches in flight, and the dataset equals a --no-cache run's."""
    import os
    import signal
    import time

    from castore.distiset import Distiset
    from tests.conftest import run_cas, start_cas

    server = LLMServer(latency=0.005).start()
    try:
        env = {"OPENAI_BASE_URL": server.base_url, "OPENAI_API_KEY": "sk-test"}
        script, cache = str(HERE / "generations.py"), tmp_path / "c"
        r = run_cas("run", script, cache_dir=cache, env={**env, "CASTORE_TEST_ROWS": "300"})
        assert r.returncode == 0 and server.requests == 900, r
        env["CASTORE_TEST_ROWS"] = "600"
        proc = start_cas("run", script, cache_dir=cache, env=env)
        deadline = time.monotonic() + 60
        while server.requests < 900 + 180 and time.monotonic() < deadline:
            assert proc.poll() is None
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL  # killed mid-run, not finished
        r = run_cas("resume", "generations", cache_dir=cache, env=env)
        assert r.returncode == 0, r
        asked = [b["messages"][-1]["content"] for b in server.bodies[900:]]
        assert set(asked) == {f"q{i}" for i in range(300, 600)}  # never an old row
        assert len(asked) <= 900 + 2 * 10 * 3  # repeats only from the batches in flight
        fresh = tmp_path / "fresh"
        f = run_cas("run", script, "--no-cache", cache_dir=fresh, env=env)
        assert f.returncode == 0, f
        got = Distiset.from_run("generations", cache)["default"]["train"].to_list()
        want = Distiset.from_run("generations", fresh)["default"]["train"].to_list()
        assert len(got) == 1800 and got == want
    finally:
        server.stop()
