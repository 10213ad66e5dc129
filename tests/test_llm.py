"""LLM steps against a real OpenAI-compatible HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from pydantic import SecretStr

from castore import Pipeline
from castore.distiset import Distiset
from castore.errors import StepFailed
from castore.llms import LLMError, OpenAILLM
from castore.steps import ChatGeneration, LoadDataFromDicts, TextGeneration
from tests.conftest import REPO, run_cas, start_cas
from tests.llm_server import LLMServer, kill_after_requests

GENERATE = REPO / "tests" / "pipelines" / "generate.py"
SECRET = "sk-test-NEVER-WRITE-ME-4242"


def llm(server: LLMServer, **kw) -> OpenAILLM:
    base = dict(
        model="test-model",
        base_url=server.base_url,
        backoff=0.01,
        timeout=5.0,
        max_concurrent_requests=8,
    )
    return OpenAILLM(**{**base, **kw})


def gen_pipeline(server, n=40, name="gen", **task_kw) -> Pipeline:
    with Pipeline(name=name) as p:
        LoadDataFromDicts(
            data=[{"instruction": f"q {i}"} for i in range(n)], batch_size=20
        ) >> TextGeneration(llm=llm(server), input_batch_size=10, **task_kw)
    return p


def test_generation_rows_metadata_and_zero_requests_on_rerun(store, server):
    ds = gen_pipeline(server, system_prompt="Be brief.").run(cache_dir=store.root, quiet=True)
    assert server.requests == 40
    rows = ds["text_generation"]["train"].to_list()
    assert rows[3]["generation"] == "answer(test-model): 3 q"
    assert rows[3]["model_name"] == "test-model"
    meta = Distiset.from_run("gen", store.root, enable_metadata=True)
    m = meta["text_generation"]["train"][3]["castore_metadata"]["text_generation"]
    assert m["usage"]["total_tokens"] == 6 and m["error"] is None
    raw = json.loads(m["raw_response"])
    assert raw["choices"][0]["message"]["content"] == rows[3]["generation"]
    again = gen_pipeline(server, system_prompt="Be brief.").run(cache_dir=store.root, quiet=True)
    assert server.requests == 40  # not one more request
    assert again["text_generation"]["train"].to_list() == rows


def test_fingerprint_has_model_kwargs_prompt_not_key(server, monkeypatch):
    def sig(**kw):
        with Pipeline(name="fp") as p:
            LoadDataFromDicts(data=[{"instruction": "x"}]) >> TextGeneration(
                llm=llm(server, **kw.pop("llm", {})), **kw
            )
        return p.signatures()["text_generation"]["fp"]

    base = sig()
    assert sig(llm={"api_key": SecretStr("sk-1")}) == sig(llm={"api_key": SecretStr("sk-2")})
    assert sig(llm={"timeout": 99.0, "max_concurrent_requests": 1}) == base
    assert sig(llm={"model": "other"}) != base
    assert sig(llm={"generation_kwargs": {"temperature": 0.9}}) != base
    assert sig(system_prompt="hi") != base
    assert sig(template="Q: {{ instruction }}") != base
    assert sig(llm={"base_url": "http://127.0.0.1:1/v1"}) != base


def test_retries_429_with_retry_after_and_500(store, server):
    server.fail_429 = 3
    server.fail_500 = 3
    server.malformed = 2
    ds = gen_pipeline(server, n=20).run(cache_dir=store.root, quiet=True)
    assert all(r["generation"] for r in ds["text_generation"]["train"].to_list())
    assert server.requests == 20 + 3 + 3 + 2


def test_timeouts_are_retried(store, server):
    server.slow = 2
    server.slow_seconds = 1.0
    with Pipeline(name="slowllm") as p:
        LoadDataFromDicts(data=[{"instruction": f"q {i}"} for i in range(6)]) >> TextGeneration(
            llm=llm(server, timeout=0.3)
        )
    ds = p.run(cache_dir=store.root, quiet=True)
    assert all(r["generation"] for r in ds["text_generation"]["train"].to_list())


def test_failing_row_is_none_and_only_it_is_requested_again(store, server):
    server.always_fail = "q 13"
    with Pipeline(name="gen") as p:
        LoadDataFromDicts(
            data=[{"instruction": f"q {i}"} for i in range(40)], batch_size=20
        ) >> TextGeneration(llm=llm(server, max_retries=2), input_batch_size=10, on_error="skip")
    ds = p.run(cache_dir=store.root, quiet=True)
    rows = Distiset.from_run("gen", store.root, enable_metadata=True)["text_generation"][
        "train"
    ].to_list()
    bad = rows[13]
    assert bad["generation"] is None
    assert "3 attempts failed" in bad["castore_metadata"]["text_generation"]["error"]
    assert rows[12]["generation"] and rows[14]["generation"]
    assert ds.run.stats["text_generation"].batches_failed == 1
    before = server.requests
    server.always_fail = "\x00never"
    again = gen_pipeline(server).run(cache_dir=store.root, quiet=True)
    # Only the failed row: its batch is retried, and its answered rows are row results.
    assert server.requests - before == 1
    assert again["text_generation"]["train"][13]["generation"] == "answer(test-model): 31 q"


def test_a_batch_whose_every_request_failed_keeps_the_reason(store, server):
    """Every row failed: each metadata entry had `usage: {}`, a struct without fields that
    Parquet cannot store, so the batch failed with Arrow's message instead of the reason."""
    server.always_fail = "q "
    with Pipeline(name="down") as p:
        LoadDataFromDicts(data=[{"instruction": f"q {i}"} for i in range(6)]) >> TextGeneration(
            llm=llm(server, max_retries=0), input_batch_size=3, on_error="skip"
        )
    p.run(cache_dir=store.root, quiet=True)
    rows = Distiset.from_run("down", store.root, enable_metadata=True)["text_generation"][
        "train"
    ].to_list()
    assert [r["generation"] for r in rows] == [None] * 6
    errors = [r["castore_metadata"]["text_generation"]["error"] for r in rows]
    assert all("attempts failed" in e or "HTTP 500" in e for e in errors), errors[0]


def test_a_server_nobody_answers_at_stops_the_run_after_one_batch(store, monkeypatch):
    """Connection refused for every request of a batch, after retries: the run stops with
    one line naming the step and the URL, instead of retrying every batch to come and
    finishing with None answers (on_error="skip" is for rows a server refuses)."""
    import time

    from tests.remote_server import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    with Pipeline(name="nobody") as p:
        LoadDataFromDicts(data=[{"instruction": f"q {i}"} for i in range(30)]) >> TextGeneration(
            llm=OpenAILLM(model="m", base_url=url, max_retries=1, backoff=0.01),
            input_batch_size=5,
            on_error="skip",
        )
    t0 = time.monotonic()
    with pytest.raises(StepFailed, match=r"step text_generation: cannot reach the LLM server at "):
        p.run(cache_dir=store.root, quiet=True)
    assert time.monotonic() - t0 < 30
    r = cas_inproc_run(p, store)
    assert r.returncode == 1 and url in r.stderr and "running again continues" in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 2, r.stderr  # the log line and the error


def cas_inproc_run(p: Pipeline, store) -> object:
    """The same pipeline through `cas run` (in process) on its pipeline.yaml."""
    from tests.conftest import cas_inproc

    yaml_path = store.root / "nobody.yaml"
    yaml_path.write_text(p.to_yaml())
    return cas_inproc("run", str(yaml_path), "-q", cache_dir=store.root)


def test_a_server_that_reports_no_usage(store, server):
    server.usage = False
    ds = gen_pipeline(server, n=10).run(cache_dir=store.root, quiet=True)
    assert ds.run.stats["text_generation"].batches_failed == 0
    assert all(r["generation"] for r in ds["text_generation"]["train"].to_list())
    assert ds.run.stats["text_generation"].tokens_spent == 0  # none reported, none counted


def test_an_empty_dict_a_step_returns_is_named_with_what_to_do(store):
    from castore import step

    @step(inputs=["instruction"], outputs=["extra"])
    def Empty(inputs):
        return [{**r, "extra": {}} for r in inputs]

    with Pipeline(name="empty") as p:
        LoadDataFromDicts(data=[{"instruction": "a"}]) >> Empty()
    with pytest.raises(StepFailed, match=r"column 'extra' holds only empty dicts.*use None"):
        p.run(cache_dir=store.root, quiet=True)


def test_on_error_fail_fails_the_run(store, server):
    server.always_fail = "q 3"
    with Pipeline(name="failing") as p:
        LoadDataFromDicts(data=[{"instruction": f"q {i}"} for i in range(10)]) >> TextGeneration(
            llm=llm(server, max_retries=1)
        )
    with pytest.raises(StepFailed, match="attempts failed"):
        p.run(cache_dir=store.root, quiet=True)


def test_client_errors_are_not_retried(server):
    with pytest.raises(LLMError, match="HTTP 404"):
        res = OpenAILLM(model="m", base_url=server.base_url + "/nowhere").generate(
            [[{"role": "user", "content": "x"}]]
        )
        raise res[0]


def test_a_server_that_refuses_every_request_stops_the_run(store, server):
    """HTTP 404 (a wrong path or model), 401 or 403 for each request of a batch is what
    every request to come would get: the run stops naming it, it does not finish with
    None answers (the requests are not retried: one per row)."""
    before = server.not_found
    with Pipeline(name="refused") as p:
        LoadDataFromDicts(data=[{"instruction": f"q {i}"} for i in range(30)]) >> TextGeneration(
            llm=OpenAILLM(model="m", base_url=server.base_url + "/nowhere"),
            input_batch_size=5,
            on_error="skip",
        )
    with pytest.raises(StepFailed, match=r"step text_generation: the LLM server at .* refused"):
        p.run(cache_dir=store.root, quiet=True)
    assert 5 <= server.not_found - before < 30  # the batches in flight, not all six


def test_chat_generation(store, server):
    data = [
        {
            "messages": [
                {"role": "system", "content": "s"},
                {"role": "user", "content": f"hello {i}"},
            ]
        }
        for i in range(5)
    ]
    with Pipeline(name="chat") as p:
        LoadDataFromDicts(data=data) >> ChatGeneration(llm=llm(server))
    ds = p.run(cache_dir=store.root, quiet=True)
    assert ds["chat_generation"]["train"][2]["generation"] == "answer(test-model): 2 olleh"


def test_api_key_never_written(tmp_path, server):
    cache = tmp_path / "c"
    env = {"CASTORE_TEST_LLM_URL": server.base_url, "OPENAI_API_KEY": SECRET}
    r = run_cas("-vv", "run", str(GENERATE), cache_dir=cache, env=env)
    assert r.returncode == 0, r
    assert server.auth_headers == {f"Bearer {SECRET}"}  # it was used…
    assert SECRET not in r.stdout + r.stderr  # …but never logged…
    for path in cache.rglob("*"):  # …nor written anywhere in the store
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_kill_9_mid_generation_then_resume(tmp_path):
    server = LLMServer(latency=0.03).start()
    try:
        ref_cache, cache = tmp_path / "ref", tmp_path / "c"
        env = {**os.environ, "CASTORE_TEST_LLM_URL": server.base_url}
        r = run_cas("run", str(GENERATE), "--json", cache_dir=ref_cache, env=env)
        assert r.returncode == 0, r
        ref_rows = Distiset.from_run("generate", ref_cache)["keep_columns"]["train"].to_list()
        assert server.requests == 200
        r = run_cas("run", str(GENERATE), "--json", cache_dir=ref_cache, env=env)
        assert r.returncode == 0 and server.requests == 200  # a finished re-run: 0 requests
        server.requests = 0
        proc = start_cas("run", str(GENERATE), cache_dir=cache, env=env)
        first = kill_after_requests(server, 80, proc)
        assert 0 < first < 200
        r = run_cas("resume", "--json", cache_dir=cache, env=env)
        assert r.returncode == 0, r
        in_flight_rows = 2 * 10  # concurrency 2 x input_batch_size 10
        assert server.requests <= 200 + in_flight_rows, server.requests
        got = Distiset.from_run("generate", cache)["keep_columns"]["train"].to_list()
        assert got == ref_rows
        assert json.loads(r.stdout)["status"] == "finished"
    finally:
        server.stop()


def test_example_generate_with_openai(tmp_path, server):
    env = {"CASTORE_LLM_BASE_URL": server.base_url, "CASTORE_LLM_MODEL": "m"}
    r = run_cas(
        "run",
        str(REPO / "examples" / "generate_with_openai.py"),
        "--json",
        cache_dir=tmp_path / "c",
        env=env,
    )
    assert r.returncode == 0, r
    assert r.json()["rows"] == {"keep_columns": 40} and server.requests == 40
    p = subprocess.run(
        [
            sys.executable,
            str(REPO / "examples" / "generate_with_openai.py"),
            "--base-url",
            server.base_url,
            "--model",
            "m",
            "--rows",
            "8",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "CASTORE_CACHE_DIR": str(tmp_path / "c2")},
    )
    assert p.returncode == 0, p.stderr
    assert "num_rows: 8" in p.stdout


def test_template_columns_checked_before_any_request(store, server):
    with Pipeline(name="tmpl") as p:
        LoadDataFromDicts(data=[{"topic": "x"}]) >> TextGeneration(
            llm=llm(server), template="Explain {{ topic }} to {{ audience }}"
        )
    from castore.errors import PipelineError

    with pytest.raises(PipelineError, match="'audience'"):
        p.run(cache_dir=store.root, quiet=True)
    assert server.requests == 0


def test_tokens_and_their_cost_are_counted_once_spent_then_saved(store, server):
    """A step's tokens are its own (a later step that carries the metadata column does
    not count them again), priced at the LLM's prices; a re-run saves them, and rows
    reused by row key save theirs."""
    from castore import StepInput, step
    from castore.summary import RunSummary
    from tests.conftest import cas_inproc

    @step(inputs=["generation"], outputs=["n"])
    def Count(inputs: StepInput):
        return [{**r, "n": len(r["generation"])} for r in inputs]

    prices = {"input": 3.0, "output": 15.0}  # USD per 1M tokens

    def build(n: int) -> Pipeline:
        with Pipeline(name="priced") as p:
            (
                LoadDataFromDicts(data=[{"instruction": f"q {i}"} for i in range(n)])
                >> TextGeneration(llm=llm(server, prices=prices), input_batch_size=10)
                >> Count(name="count")
            )
        return p

    # The server counts a prompt's words as its tokens and answers with two more.
    def cost(n: int) -> tuple[int, float]:
        words = sum(len(f"q {i}".split()) for i in range(n))
        return 2 * words + 2 * n, (words * 3.0 + (words + 2 * n) * 15.0) / 1e6

    first = build(20).run(cache_dir=store.root, quiet=True).run.stats
    tokens, usd = cost(20)
    assert first["text_generation"].tokens_spent == tokens and first["count"].tokens_spent == 0
    assert first["text_generation"].cost_spent_usd == pytest.approx(usd)
    again = build(20).run(cache_dir=store.root, quiet=True).run.stats
    assert again["text_generation"].cost_saved_usd == pytest.approx(usd)
    assert again["text_generation"].cost_spent_usd == 0 and server.requests == 20
    grown = build(25).run(cache_dir=store.root, quiet=True)
    st = grown.run.stats["text_generation"]
    assert server.requests == 25 and st.rows_reused + st.rows_cached == 20
    assert st.cost_spent_usd == pytest.approx(cost(25)[1] - usd)
    assert st.cost_saved_usd == pytest.approx(usd)
    summary = RunSummary.load(store, grown.run_oid)
    assert summary.saved.cost_usd == pytest.approx(usd)
    shown = cas_inproc("show", "priced", cache_dir=store.root).stdout
    # `cas status` / plan(): what the rows still to compute should cost, from the latest
    # run's dollars per computed row (5 rows, 0.0x of a cent each here).
    report = build(30).plan(cache_dir=store.root, read_inputs=True)
    est = next(s for s in report.steps if s.name == "text_generation")
    per_row = st.cost_spent_usd / st.rows_computed
    assert est.rows_to_compute == 5
    assert est.cost_estimate_usd == pytest.approx(per_row * 5, rel=1e-3)
    spent = cost(25)[1] - usd
    assert f"(~${spent:.4f} spent, ${usd:.4f} saved)" in shown  # the step's line
    assert f"tokens (~${usd:.4f})" in shown  # the run's saved line
