"""Real processes at the same time: gc during a run, two runs of one pipeline, two
pipelines sharing a step, kill -9 of gc mid-sweep, and locks of killed processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from castore.hashing import hash_bytes
from castore.store import Store
from tests.conftest import REPO, run_cas, start_cas
from tests.scenario import PIPELINE, SLOW_BATCHES, dataset, wait_for

SHARED = REPO / "tests" / "pipelines" / "shared.py"
EMBED_BATCHES = 40  # 400 rows / 10
pytestmark = pytest.mark.slow


def cas_popen(cache: Path, *args: str, calls: Path | None = None) -> subprocess.Popen:
    env = {"CASTORE_TEST_CALLS": str(calls)} if calls is not None else None
    return start_cas("--debug", *args, cache_dir=cache, env=env)


def test_gc_while_a_run_writes(tmp_path, reference):
    _, ref_rows = reference
    cache = tmp_path / "c"
    run = cas_popen(cache, "run", str(PIPELINE), "--json")
    wait_for(cache, 35, run)
    sweeps = 0
    while run.poll() is None:
        r = run_cas("gc", "--grace", "0", "--cache-ttl", "0", "--json", cache_dir=cache)
        assert r.returncode == 0, r
        sweeps += 1
    out, errtext = run.communicate()
    assert run.returncode == 0, errtext
    assert sweeps >= 1
    import json

    sig = json.loads(out)["signature"]
    assert dataset(cache, sig) == ref_rows
    assert run_cas("fsck", cache_dir=cache).returncode == 0
    # And what gc left is enough: a re-run does no step work.
    again = run_cas("run", str(PIPELINE), "--json", cache_dir=cache).json()
    assert all(s["batches_computed"] == 0 for s in again["steps"].values())


def test_two_runs_of_one_pipeline_share_the_work(tmp_path, reference):
    _, ref_rows = reference
    cache, calls = tmp_path / "c", tmp_path / "calls"
    a = cas_popen(cache, "run", str(PIPELINE), "--json", calls=calls)
    b = cas_popen(cache, "run", str(PIPELINE), "--json", calls=calls)
    for p in (a, b):
        _, errtext = p.communicate(timeout=120)
        assert p.returncode == 0, errtext
    import json

    sig = json.loads(run_cas("ls", "--json", cache_dir=cache).stdout)[0]["signature"]
    assert dataset(cache, sig) == ref_rows
    computed = len(calls.read_text().splitlines())
    assert computed == SLOW_BATCHES, f"{computed - SLOW_BATCHES} batches computed twice"
    assert run_cas("fsck", cache_dir=cache).returncode == 0


def test_a_run_that_starts_alone_leases_once_another_arrives(tmp_path, reference):
    """The first run takes no leases while alone; when the second arrives mid-run, the
    first leases its batches in flight and the second waits for that: still no batch is
    computed twice."""
    _, ref_rows = reference
    cache, calls = tmp_path / "c", tmp_path / "calls"
    # Slow enough that the first run still has batches to submit when the second has
    # started up, even on a loaded 2-core machine (0.3 s x 40 / 2 = 6 s).
    args = ("run", str(PIPELINE), "--json", "--param", "slow.delay=0.3")
    a = cas_popen(cache, *args, calls=calls)
    wait_for(cache, 12, a)
    assert not [p for p in (cache / "locks" / "leases").rglob("*") if p.is_file()]
    b = cas_popen(cache, *args, calls=calls)
    outs = []
    for p in (a, b):
        out, errtext = p.communicate(timeout=120)
        assert p.returncode == 0, errtext
        outs.append(json.loads(out))
    first_log = run_cas("log", outs[0]["run_id"], cache_dir=cache).stdout
    assert "another run shares this store" in first_log
    # Each run wrote its own log (one file shared by both once lost the first's lines).
    for o in outs:
        doc = json.loads(run_cas("log", o["run_id"], "--json", cache_dir=cache).stdout)
        text = doc["attempts"][-1]["log"]
        assert text.startswith("[") and text.count("INFO pipeline slow signature") == 1, text
        assert "run slow finished" in text
    computed = len(calls.read_text().splitlines())
    assert computed == SLOW_BATCHES, f"{computed - SLOW_BATCHES} batches computed twice"
    sig = json.loads(run_cas("ls", "--json", cache_dir=cache).stdout)[0]["signature"]
    assert dataset(cache, sig) == ref_rows


def test_two_pipelines_sharing_a_step_compute_each_batch_once(tmp_path):
    cache, calls = tmp_path / "c", tmp_path / "calls"
    a = cas_popen(cache, "run", f"{SHARED}:pipeline_a", "--json", calls=calls)
    b = cas_popen(cache, "run", f"{SHARED}:pipeline_b", "--json", calls=calls)
    docs = []
    for p in (a, b):
        out, errtext = p.communicate(timeout=120)
        assert p.returncode == 0, errtext
        import json

        docs.append(json.loads(out))
    lines = calls.read_text().splitlines()
    batches = [line.split()[1] for line in lines]
    twice = len(batches) - len(set(batches))
    assert twice == 0, f"{twice} shared batches computed twice"
    assert len(set(batches)) == EMBED_BATCHES
    assert {d["rows"]["label"] for d in docs} == {400}
    assert len({line.split()[0] for line in lines}) >= 1
    assert run_cas("fsck", cache_dir=cache).returncode == 0


def _fill_garbage(store: Store, n: int) -> list[str]:
    """n unreachable objects, written straight into objects/ (as put_bytes would, only
    faster): a sweep long enough to be killed in the middle."""
    oids = []
    for i in range(n):
        data = f"garbage {i}".encode()
        oid = hash_bytes(data)
        d = store.root / "objects" / oid[:2]
        d.mkdir(exist_ok=True)
        (d / oid[2:]).write_bytes(data)
        oids.append(oid)
    return oids


def test_kill_9_of_gc_mid_sweep_leaves_a_clean_store(tmp_path, reference):
    _, ref_rows = reference
    cache = tmp_path / "c"
    r = run_cas("run", str(PIPELINE), "--json", cache_dir=cache)
    assert r.returncode == 0, r
    store = Store(cache)
    # Make the run's batches unreachable too, so entries must be dropped before objects.
    run_cas("rm", "slow", cache_dir=cache)
    garbage = _fill_garbage(store, 20_000)
    gcp = cas_popen(cache, "gc", "--grace", "0", "--cache-ttl", "0")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and gcp.poll() is None:
        if sum(not os.path.exists(store.path_of(o)) for o in garbage[::500]) >= 3:
            break
        time.sleep(0.005)
    gcp.send_signal(signal.SIGKILL)
    gcp.communicate()
    remaining = sum(os.path.exists(store.path_of(o)) for o in garbage)
    assert 0 < remaining < len(garbage), "the kill did not land mid-sweep"
    r = run_cas("fsck", "--json", cache_dir=cache)
    assert r.returncode == 0, r
    r = run_cas("run", str(PIPELINE), "--json", cache_dir=cache)
    assert r.returncode == 0, r
    assert dataset(cache, r.json()["signature"]) == ref_rows
    # A second gc finishes the job despite the first one's lock file.
    assert run_cas("gc", "--grace", "0", "--cache-ttl", "0", cache_dir=cache).returncode == 0
    assert not any(os.path.exists(store.path_of(o)) for o in garbage)


def test_locks_of_killed_processes_block_nothing(tmp_path):
    cache, calls = tmp_path / "c", tmp_path / "calls"
    run = cas_popen(cache, "run", str(PIPELINE), calls=calls)
    wait_for(cache, 40, run)
    run.send_signal(signal.SIGKILL)
    run.communicate()
    locks = cache / "locks"
    stale = [p for p in locks.rglob("*") if p.is_file()]
    assert stale, "a killed run leaves its lock files behind"
    t0 = time.monotonic()
    r = run_cas("gc", "--json", cache_dir=cache)
    assert r.returncode == 0, r
    assert r.json()["live_runs"] == []
    r = run_cas("resume", "--json", cache_dir=cache, env={"CASTORE_TEST_CALLS": str(calls)})
    assert r.returncode == 0, r
    assert time.monotonic() - t0 < 60
    assert len(calls.read_text().splitlines()) <= SLOW_BATCHES + 2
    run_cas("gc", cache_dir=cache)
    assert not [p for p in (locks / "leases").rglob("*") if p.is_file()]


ROWWISE = REPO / "tests" / "pipelines" / "rowwise.py"


def test_runs_whose_batches_differ_compute_each_row_once(tmp_path):
    """Three runs at once of one row-wise step with three batch sizes: no batch key is
    shared, so only row claims (castore/pipeline/claims.py) keep a row from being paid
    for twice. Each row is computed exactly once, and each run's dataset is whole."""
    cache, calls, data = tmp_path / "c", tmp_path / "calls", tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"id": i, "text": f"row {i}"}) + "\n" for i in range(300)))
    env = {"CASTORE_TEST_DATA": str(data), "CASTORE_TEST_CALLS": str(calls)}
    procs = [
        start_cas(
            "run",
            str(ROWWISE),
            "--json",
            "--param",
            f"answer.input_batch_size={n}",
            cache_dir=cache,
            env=env,
        )
        for n in (15, 7, 10)
    ]
    for p in procs:
        out, errtext = p.communicate(timeout=120)
        assert p.returncode == 0, errtext
        assert json.loads(out)["rows"]["keep_columns"] == 300
    computed = [line.split(" ", 1)[1] for line in calls.read_text().splitlines()]
    twice = len(computed) - len(set(computed))
    assert twice == 0, f"{twice} rows computed twice"
    assert set(computed) == {f"row {i}" for i in range(300)}
    assert run_cas("fsck", cache_dir=cache).returncode == 0


CLAIM_HOLDER = """
import sys, time
from castore.pipeline.claims import RowClaims
from castore.store import Store
key = bytes(range(32))
claim = RowClaims(Store(sys.argv[1]), "holder").take("ab" * 32, [key])
print("claimed", flush=True)
time.sleep(60)
"""


def test_a_killed_runs_row_claim_blocks_nothing(tmp_path):
    """A claim is a flock: while its holder lives, a run asking for those rows is told to
    wait; once the holder is killed (-9) the rows are claimable, and gc removes the file."""
    import sys

    from castore.pipeline.claims import RowClaims

    store = Store(tmp_path / "c")
    holder = subprocess.Popen(
        [sys.executable, "-c", CLAIM_HOLDER, str(store.root)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "claimed"
        claims, key, other = RowClaims(store, "me"), bytes(range(32)), bytes(32 * [7])
        blockers = claims.take("ab" * 32, [key, other])
        assert isinstance(blockers, list) and len(blockers) == 1
        assert RowClaims.held(blockers) and RowClaims.holders(blockers) == ["holder"]
        free = claims.take("ab" * 32, [other])  # a row nobody holds
        assert not isinstance(free, list)
        free.release()
        elsewhere = claims.take("cd" * 32, [key])  # the same key of another step
        assert not isinstance(elsewhere, list)
        elsewhere.release()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert not RowClaims.held(blockers)
    assert run_cas("gc", cache_dir=store.root).returncode == 0
    assert os.listdir(store.layout.claims_dir()) == []  # gc removed the dead claim
    mine = RowClaims(store, "me").take("ab" * 32, [key])
    assert not isinstance(mine, list)
    assert os.listdir(store.layout.claims_dir()) == [os.path.basename(mine.path)]
    mine.release()


def test_a_run_killed_while_others_wait_for_its_rows(tmp_path):
    """Two runs of one row-wise step with other batch sizes; one is killed (-9) mid-run,
    claims held: the other goes on (the dead claims block nothing), its dataset is whole,
    and a run after them computes no row."""
    cache, calls, data = tmp_path / "c", tmp_path / "calls", tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"id": i, "text": f"row {i}"}) + "\n" for i in range(300)))
    env = {"CASTORE_TEST_DATA": str(data), "CASTORE_TEST_CALLS": str(calls)}

    def start(batch: int) -> subprocess.Popen:
        args = ("run", str(ROWWISE), "--json", "--param", f"answer.input_batch_size={batch}")
        return start_cas(*args, cache_dir=cache, env=env)

    victim, survivor = start(15), start(7)
    deadline = time.monotonic() + 60
    while not calls.exists() or len(calls.read_text().splitlines()) < 60:
        assert time.monotonic() < deadline and victim.poll() is None
        time.sleep(0.02)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    out, errtext = survivor.communicate(timeout=120)
    assert survivor.returncode == 0, errtext
    assert json.loads(out)["rows"]["keep_columns"] == 300
    computed = [line.split(" ", 1)[1] for line in calls.read_text().splitlines()]
    assert set(computed) == {f"row {i}" for i in range(300)}
    assert len(computed) <= 300 + 2 * 15  # again only what the killed run had in flight
    before = len(computed)
    r = run_cas("run", str(ROWWISE), "--json", cache_dir=cache, env=env)
    assert r.returncode == 0 and len(calls.read_text().splitlines()) == before
    assert run_cas("fsck", cache_dir=cache).returncode == 0


def test_llm_runs_at_once_send_each_request_once(tmp_path):
    """The paid case end to end: two runs of a TextGeneration pipeline started together on
    one store with other batch sizes send each of the 200 prompts once to the (local,
    OpenAI-compatible) server, and both datasets hold every answer."""
    from tests.llm_server import LLMServer

    generate = REPO / "tests" / "pipelines" / "generate.py"
    server = LLMServer(latency=0.2).start()
    try:
        env = {"CASTORE_TEST_LLM_URL": server.base_url}
        procs = [
            start_cas(
                *("run", str(generate), "--json"),
                *("--param", f"text_generation.input_batch_size={n}"),
                cache_dir=tmp_path / "c",
                env=env,
            )
            for n in (7, 10)
        ]
        for p in procs:
            out, errtext = p.communicate(timeout=120)
            assert p.returncode == 0, errtext
            assert json.loads(out)["rows"]["keep_columns"] == 200
        assert server.requests == 200, f"{server.requests - 200} requests sent twice"
        assert len(server.by_prompt) == 200 and set(server.by_prompt.values()) == {1}
    finally:
        server.stop()
