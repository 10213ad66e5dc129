"""The Ray executor on a local Ray instance (2 CPUs): same signature, action keys and
dataset as threads and processes; an interrupted run resumes on another executor."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from castore.distiset import Distiset
from castore.pipeline.pipeline import load_file_module
from castore.store import Store
from castore.store.manifests import StepManifest, load_model
from tests.conftest import REPO, run_cas, start_cas
from tests.scenario import _actions

CPU = REPO / "tests" / "pipelines" / "cpu.py"
BATCHES = 20  # 400 rows / 20
pytestmark = pytest.mark.slow


def keys(store: Store, ds: Distiset) -> dict[str, list[str]]:
    return {
        r.name: [b.key for b in load_model(store, r.manifest, StepManifest).batches]
        for r in ds.run.steps
    }


def test_threads_processes_ray_agree(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    # Ray's workers are not forked from this process: they see castore's own threshold
    # for objects that extend their input, not the one tests/conftest.py lowers.
    from castore.store import extend
    from tests.conftest import MIN_BASE_BYTES

    monkeypatch.setattr(extend, "MIN_BASE_BYTES", MIN_BASE_BYTES)
    pipeline = load_file_module(CPU, "castore_test_cpu").pipeline
    results = {}
    for executor in ("threads", "processes", "ray"):
        store = Store(tmp_path / executor)
        ds = pipeline.run(cache_dir=store.root, executor=executor, quiet=True)
        results[executor] = (
            ds.run.signature,
            keys(store, ds),
            ds["keep_columns"]["train"].to_list(),
        )
    assert results["threads"] == results["processes"] == results["ray"]


def _wait_entries(cache, n, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _actions(cache) >= n and (cache / "refs" / "runs" / "cpu").exists():
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended early: {proc.communicate()}")
        time.sleep(0.02)
    pytest.fail("moment never came")


@pytest.mark.parametrize(("first", "then"), [("threads", "ray"), ("ray", "threads")])
def test_interrupted_resumes_on_another_executor(tmp_path, first, then):
    pytest.importorskip("ray")
    ref = run_cas("run", str(CPU), "--json", cache_dir=tmp_path / "ref")
    assert ref.returncode == 0, ref
    expected = Distiset.from_run("cpu", tmp_path / "ref")["keep_columns"]["train"].to_list()
    cache = tmp_path / "c"
    proc = start_cas("run", str(CPU), "--executor", first, cache_dir=cache)
    _wait_entries(cache, 8 + 1 + 5, proc)  # generator batches and end entry, then some
    proc.send_signal(signal.SIGINT)
    _, errtext = proc.communicate(timeout=120)
    assert proc.returncode == 130, errtext
    assert "Traceback" not in errtext
    r = run_cas("resume", "cpu", "--executor", then, "--json", cache_dir=cache, timeout=300)
    assert r.returncode == 0, r
    doc = r.json()
    assert doc["signature"] == ref.json()["signature"]
    assert doc["steps"]["digest"]["batches_cached"] >= 5
    assert (
        doc["steps"]["digest"]["batches_cached"] + doc["steps"]["digest"]["batches_computed"]
        == BATCHES
    )
    got = Distiset.from_run("cpu", cache)["keep_columns"]["train"].to_list()
    assert got == expected


def test_ray_workers_write_to_a_remote_the_driver_reads_through(tmp_path):
    """For clusters whose nodes do not share the store: inputs go to the workers with the
    task, outputs come back through the remote, verified."""
    pytest.importorskip("ray")
    from castore.remote import Remote

    pipeline = load_file_module(CPU, "castore_test_cpu_remote").pipeline
    threads = pipeline.run(cache_dir=tmp_path / "threads", quiet=True)
    url = str(tmp_path / "remote")
    store = Store(tmp_path / "driver")
    ds = pipeline.run(
        cache_dir=store.root, executor="ray", remote=url, ray_storage="remote", quiet=True
    )
    assert ds["keep_columns"]["train"].to_list() == threads["keep_columns"]["train"].to_list()
    on_remote = Remote(url).list_oids()
    digest = load_model(store, ds.run.step_manifest_id("digest"), StepManifest)
    outputs = {o for b in digest.batches for o in b.outputs}
    assert outputs <= on_remote  # written by the workers…
    assert all(store.verify(o) for o in outputs)  # …read through, verified
    assert all(store.get_action(b.key) for b in digest.batches)  # entries by the driver
    assert (tmp_path / "remote" / "castore-layout.json").is_file()  # made by the run, a writer
    r = run_cas(
        "run",
        str(CPU),
        "--executor",
        "threads",
        "--ray-storage",
        "remote",
        cache_dir=tmp_path / "x",
    )
    assert r.returncode != 0 and "needs executor='ray' and a remote" in r.stderr


def test_ray_workers_reach_an_s3_remote_the_driver_was_given(tmp_path, monkeypatch):
    """Ray started before the remote's endpoint and credentials were in the driver's
    environment: its workers get the endpoint through Ray's runtime environment and the
    credentials with each task, and the secret is in none of Ray's files."""
    ray = pytest.importorskip("ray")
    from castore.remote import Remote
    from tests.remote_server import S3Server
    from tests.test_remote import use_server

    server = S3Server()
    server.start()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        session = Path(ray._private.worker._global_node.get_session_dir_path())
        use_server(server, monkeypatch)  # now, not in the workers' inherited environment
        url = server.new_bucket()
        pipeline = load_file_module(CPU, "castore_test_cpu_s3").pipeline
        store = Store(tmp_path / "driver")
        ds = pipeline.run(
            cache_dir=store.root, executor="ray", remote=url, ray_storage="remote", quiet=True
        )
        digest = load_model(store, ds.run.step_manifest_id("digest"), StepManifest)
        assert {o for b in digest.batches for o in b.outputs} <= Remote(url).list_oids()
        secret = server.env["AWS_SECRET_ACCESS_KEY"].encode()
        leaked = [p for p in session.rglob("*") if p.is_file() and secret in p.read_bytes()]
        assert leaked == []
    finally:
        ray.shutdown()
        server.stop()
