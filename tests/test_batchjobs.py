"""Offline batch generation against the test server's Batch API (tests/batch_api.py):
one job for a step's missing rows, the run ends `waiting` (exit 75), the next run polls
and collects, a crash around the create never pays twice, an expired job is asked
again only for its missing rows, and no secret reaches the store."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from castore import batchjobs
from castore.distiset import Distiset
from castore.errors import RunWaiting
from castore.store import Store
from tests.conftest import REPO, cas_inproc, start_cas
from tests.llm_server import LLMServer

OFFLINE = REPO / "tests" / "pipelines" / "offline.py"
SECRET = "sk-offline-NEVER-WRITE-ME-77"


@pytest.fixture
def server(monkeypatch):
    s = LLMServer().start()
    monkeypatch.setenv("CASTORE_TEST_LLM_URL", s.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    yield s
    s.stop()


def _ageless(job: dict) -> dict:
    assert isinstance(job.pop("age_seconds"), float)
    return job


def test_one_job_then_waiting_then_collected_then_free(tmp_path, server):
    cache = tmp_path / "c"
    first = cas_inproc("run", str(OFFLINE), "--json", cache_dir=cache)
    assert first.returncode == 75, first
    assert first.json()["status"] == "waiting"
    assert "waiting for batch jobs" in first.stderr and "cas resume offline" in first.stderr
    api = server.batch_api
    assert api.creates == 1 and api.uploads == 1 and server.requests == 0
    (job,) = api.jobs()
    assert job["request_counts"]["total"] == 50
    # Polled again while the job runs: still waiting, nothing submitted again.
    again = cas_inproc("run", str(OFFLINE), cache_dir=cache)
    assert again.returncode == 75 and api.creates == 1
    listed = cas_inproc("jobs", "--json", cache_dir=cache).json()
    assert [j["batch_id"] for j in listed] == [job["id"]] and listed[0]["rows"] == 50
    assert listed[0]["pipelines"] == ["offline"]
    # age_seconds is measured at each listing, so it may tick between the two.
    by_run = cas_inproc("jobs", "--run", "offline", "--json", cache_dir=cache).json()
    assert [_ageless(j) for j in by_run] == [_ageless(j) for j in listed]
    unknown = cas_inproc("jobs", "--run", "nope", cache_dir=cache)
    assert unknown.returncode != 0 and "nope" in unknown.stderr
    api.release()
    done = cas_inproc("resume", "offline", "--json", cache_dir=cache)
    assert done.returncode == 0, done
    assert done.json()["status"] == "finished"
    assert api.creates == 1 and api.answered == 50 and server.requests == 0
    rows = Distiset.from_run("offline", cache)["keep_columns"]["train"].to_list()
    assert [r["generation"] for r in rows] == [
        f"answer(test-model): {f'question {i}'[::-1]}" for i in range(50)
    ]
    store = Store(cache)
    (rec,) = batchjobs.records(store)
    assert rec.state == "collected (completed)" and rec.tokens > 0 and rec.cost() is None
    listed = cas_inproc("jobs", cache_dir=cache)
    assert "no cost estimate" in listed.stderr and "prices=" in listed.stderr
    # A re-run pays nothing: no job, no request.
    free = cas_inproc("run", str(OFFLINE), "--json", cache_dir=cache)
    assert free.returncode == 0 and api.creates == 1 and api.answered == 50
    assert free.json()["steps"]["text_generation"]["batches_cached"] == 1
    # The store loses the rows (rm + gc): the finished job's output is read again from
    # the provider, not paid again.
    assert cas_inproc("rm", "offline", cache_dir=cache).returncode == 0
    gc = cas_inproc("gc", "--grace", "0", "--cache-ttl", "0", cache_dir=cache)
    assert gc.returncode == 0, gc
    again = cas_inproc("run", str(OFFLINE), "--json", cache_dir=cache)
    assert again.returncode == 0 and again.json()["steps"]["text_generation"]["batches_cached"] == 0
    assert api.creates == 1 and api.answered == 50
    # The key is in no file of the store.
    for path in cache.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_the_answers_are_the_live_answers(tmp_path, server):
    from castore import Pipeline
    from castore.llms import OpenAILLM
    from castore.steps import LoadDataFromDicts, TextGeneration

    def build(offline: bool) -> Pipeline:
        with Pipeline(name="same") as p:
            LoadDataFromDicts(data=[{"instruction": f"q {i}"} for i in range(5)]) >> (
                TextGeneration(
                    llm=OpenAILLM(model="m", base_url=server.base_url, offline_batch=offline),
                    input_batch_size=5,
                )
            )
        return p

    live = build(False).run(cache_dir=tmp_path / "live", quiet=True)
    server.batch_api.release()
    with pytest.raises(RunWaiting):  # the first look finds it validating
        build(True).run(cache_dir=tmp_path / "off", quiet=True)
    off = build(True).run(cache_dir=tmp_path / "off", quiet=True)
    assert off["text_generation"]["train"].to_list() == live["text_generation"]["train"].to_list()
    # Offline or not, the same rows are the same work: the live store reuses them all.
    before = server.requests
    build(True).run(cache_dir=tmp_path / "live", quiet=True)
    assert server.requests == before and server.batch_api.creates == 1


def test_a_step_left_at_its_default_batch_size_sends_one_job(tmp_path, server):
    """120 rows arriving in loader batches of 25, an offline step without an
    input_batch_size: one job for all of them, not one per batch."""
    from castore import Pipeline
    from castore.llms import OpenAILLM
    from castore.steps import LoadDataFromDicts, TextGeneration
    from castore.steps.llm import OFFLINE_BATCH_ROWS

    def build(n: int = 120) -> Pipeline:
        with Pipeline(name="default-size") as p:
            LoadDataFromDicts(
                data=[{"instruction": f"q {i}"} for i in range(n)], batch_size=25
            ) >> TextGeneration(
                llm=OpenAILLM(
                    model="m",
                    base_url=server.base_url,
                    offline_batch=True,
                    prices={"input": 0.5, "output": 2.0},  # USD per 1M tokens
                )
            )
        return p

    assert build().steps["text_generation"].input_batch_size == OFFLINE_BATCH_ROWS
    with pytest.raises(RunWaiting):
        build().run(cache_dir=tmp_path / "c", quiet=True)
    (job,) = server.batch_api.jobs()
    assert job["request_counts"]["total"] == 120 and server.batch_api.creates == 1
    server.batch_api.release()
    rows = build().run(cache_dir=tmp_path / "c", quiet=True)["text_generation"]["train"]
    assert len(rows) == 120 and server.batch_api.creates == 1 and server.requests == 0
    # Its cost, estimated from the job's usage (the server counts a prompt's words as its
    # tokens and answers with two more) at the given prices; prices are not in the key.
    prompt = sum(len(f"q {i}".split()) for i in range(120))
    expected = (prompt * 0.5 + (prompt + 2 * 120) * 2.0) / 1e6
    (listed,) = cas_inproc("jobs", "--json", cache_dir=tmp_path / "c").json()
    assert listed["prompt_tokens"] == prompt and listed["cost_usd"] == pytest.approx(expected)
    assert f"~${expected:.4f}" in cas_inproc("jobs", cache_dir=tmp_path / "c").stdout
    # 30 rows more: their job runs; its estimate is 30 rows at the last run's dollars per
    # row (that run computed the 120).
    with pytest.raises(RunWaiting):
        build(150).run(cache_dir=tmp_path / "c", quiet=True)
    pending = cas_inproc("jobs", "--json", cache_dir=tmp_path / "c").json()[0]
    assert pending["rows"] == 30 and pending["cost_usd"] is None
    assert pending["cost_estimate_usd"] == pytest.approx(expected / 120 * 30, rel=1e-4)
    shown = cas_inproc("jobs", cache_dir=tmp_path / "c").stdout
    assert f"(estimate ~${expected / 120 * 30:.4f})" in shown
    # A batch size chosen by the user is kept: 120 rows in batches of 50 are 3 jobs.
    with Pipeline(name="chosen") as p:
        LoadDataFromDicts(data=[{"instruction": f"r {i}"} for i in range(120)]) >> TextGeneration(
            llm=OpenAILLM(model="m", base_url=server.base_url, offline_batch=True),
            input_batch_size=50,
        )
    with pytest.raises(RunWaiting):
        p.run(cache_dir=tmp_path / "c", quiet=True)
    assert server.batch_api.creates == 5


def test_ctrl_c_with_a_job_pending_ends_waiting_and_the_resume_collects(tmp_path, server):
    """SIGINT while the job is pending and a slow step still works: the run ends
    `waiting` (exit 75, naming the job and saying the rest stopped too); the resume
    polls the same job and finishes, one job paid."""
    cache = tmp_path / "c"
    env = {"CASTORE_TEST_LLM_URL": server.base_url, "OPENAI_API_KEY": SECRET}
    proc = start_cas(
        "run", str(REPO / "tests" / "pipelines" / "offline_slow.py"), cache_dir=cache, env=env
    )
    deadline = time.monotonic() + 30
    while server.batch_api.creates == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.batch_api.creates == 1
    time.sleep(0.5)  # the step has parked its batch; the slow step is still at work
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 75, stderr
    assert "waiting for batch jobs" in stderr and "other batches stopped too" in stderr
    show = cas_inproc("show", "offline-slow", "--json", cache_dir=cache).json()
    assert show["status"] == "waiting" and show["steps"]
    slow = next(s for s in show["steps"] if s["name"] == "slow")
    assert slow["batches_done"] < 40, slow  # it was stopped, not finished
    server.batch_api.release()
    done = cas_inproc("resume", "offline-slow", "--json", cache_dir=cache)
    assert done.returncode == 0, done
    assert server.batch_api.creates == 1 and server.batch_api.answered == 40
    assert server.requests == 0


def test_rows_added_while_a_job_runs_go_alone_to_a_second_job(tmp_path, server):
    """50 rows are in a pending job; 10 rows are added (one of them a second sample of a
    prompt already asked) and the pipeline runs again: only those 11 requests go to a new
    job, the 50 wait for the first one and take its answers. Nothing is paid twice."""
    from castore import Pipeline
    from castore.llms import OpenAILLM
    from castore.steps import LoadDataFromDicts, TextGeneration

    def build(rows: list[str]) -> Pipeline:
        with Pipeline(name="growing") as p:
            LoadDataFromDicts(data=[{"instruction": r} for r in rows]) >> TextGeneration(
                llm=OpenAILLM(model="m", base_url=server.base_url, offline_batch=True)
            )
        return p

    first = [f"question {i}" for i in range(50)]
    more = [*first, *[f"new {i}" for i in range(10)], "question 3"]
    api = server.batch_api
    with pytest.raises(RunWaiting):
        build(first).run(cache_dir=tmp_path / "c", quiet=True)
    with pytest.raises(RunWaiting) as waiting:
        build(more).run(cache_dir=tmp_path / "c", quiet=True)
    assert api.creates == 2
    assert sorted(j["request_counts"]["total"] for j in api.jobs()) == [11, 50]
    assert "some of them these" in str(waiting.value)
    # Still running: polled, nothing more submitted.
    with pytest.raises(RunWaiting):
        build(more).run(cache_dir=tmp_path / "c", quiet=True)
    assert api.creates == 2
    api.release()
    rows = build(more).run(cache_dir=tmp_path / "c", quiet=True)["text_generation"]["train"]
    assert api.creates == 2 and api.answered == 61 and server.requests == 0
    out = rows.to_list()
    assert [r["generation"] for r in out] == [f"answer(m): {q[::-1]}" for q in more]
    # The first pipeline, resumed, finds its rows by row key: no job, no request.
    build(first).run(cache_dir=tmp_path / "c", quiet=True)
    assert api.creates == 2 and server.requests == 0
    (second,) = [r for r in batchjobs.records(Store(tmp_path / "c")) if r.rows == 11]
    assert second.unanswered == [] and len(second.requests) == 11


def test_two_runs_at_once_share_one_job(tmp_path, server):
    """Two `cas run` processes of one pipeline on one store, started together while the
    provider is slow to create the job: one submits, the other finds its record and
    polls the same job; both end waiting, one job paid."""
    cache = tmp_path / "c"
    env = {"CASTORE_TEST_LLM_URL": server.base_url, "OPENAI_API_KEY": SECRET}
    server.batch_api.on_create = lambda phase: time.sleep(1.0) if phase == "before" else None
    procs = [start_cas("run", str(OFFLINE), cache_dir=cache, env=env) for _ in range(2)]
    for proc in procs:
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 75, stderr
    server.batch_api.on_create = None
    assert server.batch_api.creates == 1 and server.batch_api.uploads == 1
    assert len(batchjobs.records(Store(cache))) == 1


@pytest.mark.parametrize("phase", ["upload", "before", "after"])
def test_kill_9_around_the_create_never_submits_twice(tmp_path, server, phase):
    """SIGKILL inside the upload (the record is written, no file id yet), inside the
    create call before the job exists, or after it exists but before its id reached the
    client (so the record has none). The resume uploads and creates (upload, before) or
    finds the job by its metadata and adopts it (after): one job in every case."""
    cache = tmp_path / "c"
    env = {"CASTORE_TEST_LLM_URL": server.base_url, "OPENAI_API_KEY": SECRET}
    proc = start_cas("run", str(OFFLINE), cache_dir=cache, env=env)

    def kill(at: str) -> None:
        if at == phase:
            os.kill(proc.pid, signal.SIGKILL)
            time.sleep(0.2)  # the client is gone before the server answers

    server.batch_api.on_create = kill
    server.batch_api.on_upload = lambda: kill("upload")
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    server.batch_api.on_create = server.batch_api.on_upload = None
    assert server.batch_api.creates == (1 if phase == "after" else 0)
    (rec,) = batchjobs.records(Store(cache))
    assert rec.batch_id is None and (rec.input_file_id is None) == (phase == "upload")
    resumed = cas_inproc("run", str(OFFLINE), cache_dir=cache)
    assert resumed.returncode == 75, resumed
    assert server.batch_api.creates == 1  # adopted, or created once
    (rec,) = batchjobs.records(Store(cache))
    assert rec.batch_id == server.batch_api.jobs()[0]["id"]
    server.batch_api.release()
    assert cas_inproc("run", str(OFFLINE), cache_dir=cache).returncode == 0
    assert server.batch_api.creates == 1 and server.batch_api.answered == 50


def test_an_expired_job_is_asked_again_only_for_its_missing_rows(tmp_path, server):
    cache = tmp_path / "c"
    api = server.batch_api
    api.expire_after = 30  # the job answers 30 of 50, then expires
    assert cas_inproc("run", str(OFFLINE), cache_dir=cache).returncode == 75
    api.release()
    partial = cas_inproc("run", str(OFFLINE), "--json", cache_dir=cache)
    # 20 rows without an answer: the batch is kept with them as None, not cached, and
    # the rows answered are row results; the retry sends a new job of 20 rows.
    assert partial.returncode == 0, partial
    assert partial.json()["steps"]["text_generation"]["batches_failed"] == 1
    api.expire_after, api.hold = None, True
    assert cas_inproc("run", str(OFFLINE), cache_dir=cache).returncode == 75
    assert api.creates == 2 and api.jobs()[-1]["request_counts"]["total"] == 20
    api.release()
    final = cas_inproc("run", str(OFFLINE), "--json", cache_dir=cache)
    assert final.returncode == 0 and final.json()["steps"]["text_generation"]["batches_failed"] == 0
    assert api.answered == 50 and server.requests == 0


def test_distilabel_spelling(server):
    from castore.distilabel.models import OpenAILLM

    assert OpenAILLM(model="m", use_offline_batch_generation=True).offline_batch is True
    with pytest.raises(ValueError, match="never blocks"):
        OpenAILLM(model="m", offline_batch_generation_block_until_done=60)


@pytest.mark.slow
def test_two_runs_at_once_submit_one_job(tmp_path, server):
    cache = tmp_path / "c"
    env = {"CASTORE_TEST_LLM_URL": server.base_url, "OPENAI_API_KEY": SECRET}
    procs = [start_cas("run", str(OFFLINE), cache_dir=cache, env=env) for _ in range(2)]
    for p in procs:
        _, errtext = p.communicate(timeout=120)
        assert p.returncode == 75, errtext
    assert server.batch_api.creates == 1 and server.batch_api.uploads == 1
    server.batch_api.release()
    assert cas_inproc("run", str(OFFLINE), cache_dir=cache).returncode == 0
    assert server.batch_api.answered == 50


def test_jobs_cancel_then_the_rows_go_to_a_new_job(tmp_path, server):
    cache = tmp_path / "c"
    assert cas_inproc("run", str(OFFLINE), cache_dir=cache).returncode == 75
    (job,) = server.batch_api.jobs()
    r = cas_inproc("jobs", "cancel", job["id"], cache_dir=cache)
    assert r.returncode == 0 and "cancelled" in r.stderr, r
    assert server.batch_api.jobs()[0]["status"] == "cancelled"
    # The cancelled job answered nothing: the batch fails its 50 rows (on_error="skip").
    after = cas_inproc("run", str(OFFLINE), "--json", cache_dir=cache)
    assert after.json()["steps"]["text_generation"]["batches_failed"] == 1
    # The next run asks for them again, in a new job.
    assert cas_inproc("run", str(OFFLINE), cache_dir=cache).returncode == 75
    assert server.batch_api.creates == 2
    bad = cas_inproc("jobs", "cancel", "nope", cache_dir=cache)
    assert bad.returncode == 2 and "no single submitted job matches" in bad.stderr
    listed = cas_inproc("jobs", cache_dir=cache)
    assert listed.returncode == 0 and "collected (cancelled)" in listed.stdout


def test_a_pushed_store_lets_another_machine_poll_the_same_job(tmp_path, server):
    """Machine A submits and pushes; machine B pulls and runs: it polls A's job (no
    second job) and collects it. A record that names another job is refused."""
    remote, a, b = tmp_path / "remote", tmp_path / "a", tmp_path / "b"
    assert cas_inproc("run", str(OFFLINE), cache_dir=a).returncode == 75
    pushed = cas_inproc("push", str(remote), "--json", cache_dir=a)
    assert pushed.returncode == 0 and pushed.json()["jobs"] == 1, pushed
    pulled = cas_inproc("pull", str(remote), "--json", cache_dir=b)
    assert pulled.returncode == 0 and pulled.json()["jobs"] == 1, pulled
    assert cas_inproc("run", str(OFFLINE), cache_dir=b).returncode == 75
    assert server.batch_api.creates == 1
    server.batch_api.release()
    done = cas_inproc("run", str(OFFLINE), "--json", cache_dir=b)
    assert done.returncode == 0 and server.batch_api.creates == 1
    assert server.batch_api.answered == 50
    # A tampered record (another job's id) on a third machine: refused, not collected.
    (path,) = (remote / "jobs").glob("*.json")
    doc = json.loads(path.read_text())
    server.batch_api.files["file-other"] = b'{"custom_id": "row-0", "body": {}}\n'
    other = server.batch_api.post(
        "/v1/batches", "application/json", json.dumps({"input_file_id": "file-other"}).encode()
    )
    doc["batch_id"] = json.loads(other[1])["id"]
    doc["input_file_id"] = None
    path.write_text(json.dumps(doc))
    c = tmp_path / "c"
    assert cas_inproc("pull", str(remote), cache_dir=c).returncode == 0
    bad = cas_inproc("run", str(OFFLINE), cache_dir=c)
    assert bad.returncode != 0 and "does not hold these rows' requests" in bad.stderr, bad


def test_rows_a_job_left_unanswered_can_be_asked_live_at_once(tmp_path, server):
    from castore import Pipeline
    from castore.llms import OpenAILLM
    from castore.steps import LoadDataFromDicts, TextGeneration

    with Pipeline(name="live-rest") as p:
        LoadDataFromDicts(data=[{"instruction": f"q {i}"} for i in range(10)]) >> (
            TextGeneration(
                llm=OpenAILLM(
                    model="m", base_url=server.base_url, offline_batch=True, offline_failed="live"
                ),
                input_batch_size=10,
            )
        )
    server.batch_api.expire_after = 6
    with pytest.raises(RunWaiting):
        p.run(cache_dir=tmp_path / "c", quiet=True)
    server.batch_api.release()
    ds = p.run(cache_dir=tmp_path / "c", quiet=True)
    assert all(ds["text_generation"]["train"]["generation"])
    assert server.batch_api.answered == 6 and server.requests == 4  # the other 4 live
    assert server.batch_api.creates == 1


def test_jobs_refresh_asks_the_provider(tmp_path, server):
    cache = tmp_path / "c"
    assert cas_inproc("run", str(OFFLINE), cache_dir=cache).returncode == 75
    seen = cas_inproc("jobs", "--json", cache_dir=cache).json()
    assert seen[0]["state"] == "in_progress"  # as the run last saw it
    server.batch_api.release()
    assert cas_inproc("jobs", "--json", cache_dir=cache).json()[0]["state"] == "in_progress"
    fresh = cas_inproc("jobs", "--refresh", "--json", cache_dir=cache).json()
    assert fresh[0]["state"] == "completed" and fresh[0]["counts"]["completed"] == 50
    Store(tmp_path / "empty")
    assert "no batch jobs" in cas_inproc("jobs", cache_dir=tmp_path / "empty").stderr
    # fsck reads every job record: clean, then a damaged one is reported and kept.
    assert cas_inproc("fsck", cache_dir=cache).returncode == 0
    (path,) = (cache / "jobs").glob("*.json")
    path.write_text("{not json")
    bad = cas_inproc("fsck", cache_dir=cache)
    assert bad.returncode == 1 and "bad-job-record" in bad.stdout + bad.stderr, bad
    assert cas_inproc("fsck", "--repair", cache_dir=cache).returncode == 1 and path.exists()


def test_machines_sharing_a_remote_poll_the_same_job(tmp_path, server):
    """A runs with --remote --push: its job record is on the remote as soon as the job
    exists. B runs with --remote only (read-through): it finds the record there and
    polls A's job instead of submitting its own, then collects it."""
    remote = tmp_path / "remote"
    a = cas_inproc("run", str(OFFLINE), "--remote", str(remote), "--push", cache_dir=tmp_path / "a")
    assert a.returncode == 75, a
    assert len(list((remote / "jobs").glob("*.json"))) == 1
    b = cas_inproc("run", str(OFFLINE), "--remote", str(remote), cache_dir=tmp_path / "b")
    assert b.returncode == 75 and server.batch_api.creates == 1, b
    server.batch_api.release()
    done = cas_inproc("run", str(OFFLINE), "--remote", str(remote), cache_dir=tmp_path / "b")
    assert done.returncode == 0 and server.batch_api.creates == 1
    assert server.batch_api.answered == 50 and server.requests == 0


@pytest.mark.slow
def test_two_machines_writing_through_at_once_submit_one_job(tmp_path, server):
    """Two stores, one remote, both `--remote --push`, started together while the
    upload is slow: the batch's remote lease lets one machine submit while the other
    waits; it then finds the job record on the remote and polls the same job."""
    remote = tmp_path / "remote"
    env = {"CASTORE_TEST_LLM_URL": server.base_url, "OPENAI_API_KEY": SECRET}
    server.batch_api.on_upload = lambda: time.sleep(1.0)
    args = ("run", str(OFFLINE), "--remote", str(remote), "--push")
    procs = [start_cas(*args, cache_dir=tmp_path / m, env=env) for m in ("a", "b")]
    for p in procs:
        _, errtext = p.communicate(timeout=120)
        assert p.returncode == 75, errtext
    assert server.batch_api.creates == 1 and server.batch_api.uploads == 1
    server.batch_api.release()
    for m in ("a", "b"):
        r = cas_inproc(*args, cache_dir=tmp_path / m)
        assert r.returncode == 0, r
    assert server.batch_api.creates == 1 and server.batch_api.answered == 50


def test_a_request_file_is_checked_line_by_line_against_the_listed_hashes():
    """A claimed job's input file must hold request `row-i` at line i with the body whose
    hash the record lists at i: answers come back by custom_id, so a file with the same
    bodies under swapped ids would hand rows each other's answers."""
    from castore.batchapi import request_file

    bodies = [{"model": "m", "messages": [{"role": "user", "content": f"q {i}"}]} for i in range(3)]
    text = request_file(bodies).decode()
    assert batchjobs._listed_hashes(text) == [batchjobs.request_hash(b) for b in bodies]
    lines = text.splitlines()
    swapped = [lines[0].replace('"row-0"', '"row-1"'), lines[1].replace('"row-1"', '"row-0"')]
    assert batchjobs._listed_hashes("\n".join([*swapped, lines[2]])) is None
    assert batchjobs._listed_hashes(text.replace("/v1/chat/completions", "/v1/embeddings")) is None
    assert batchjobs._listed_hashes("not json") is None
