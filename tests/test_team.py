"""Several machines on one remote (a real S3-compatible server on 127.0.0.1): each batch
paid once, a remote gc that cannot strand a push, per-object degradation, clear errors.
A "machine" is a `cas` process with a store of its own."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from castore.errors import RemoteError, StoreLocked
from castore.remote import Remote
from castore.remote_locks import Heartbeat, Leases, WriterLock
from castore.transfer import push
from tests.conftest import cas_inproc, start_cas
from tests.test_remote import remote_problems, use_server
from tests.test_remote import s3 as s3

SLOW = Path(__file__).parent / "pipelines" / "slow.py"
SLOW_BATCHES = 40  # 600 rows / input_batch_size 15


@pytest.fixture
def s3_url(s3, monkeypatch):
    use_server(s3, monkeypatch)
    return s3.new_bucket()


def calls(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def run_rows(store_root: Path) -> list[dict]:
    from castore.distiset import Distiset

    return Distiset.from_run("slow", store_root)["keep_columns"]["train"].to_list()


def test_two_machines_at_once_pay_each_batch_once(tmp_path, s3_url):
    counted = tmp_path / "calls"
    env = {"CASTORE_TEST_CALLS": str(counted)}
    args = ("run", str(SLOW), "--remote", s3_url, "--push", "--json")
    procs = [start_cas(*args, cache_dir=tmp_path / m, env=env) for m in ("a", "b")]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert json.loads(out)["status"] == "finished"
    paid = calls(counted)
    assert len(paid) <= SLOW_BATCHES * 1.1, len(paid)
    assert len({line.split()[1] for line in paid}) == SLOW_BATCHES  # every batch was made
    assert run_rows(tmp_path / "a") == run_rows(tmp_path / "b")
    remote = Remote(s3_url)
    assert remote_problems(remote) == []
    assert not remote.fs.find(remote.layout.leases_dir())  # every lease let go


def test_a_missing_remote_object_costs_its_batch_only(tmp_path, make_store, caplog):
    a = make_store("a")
    url = str(tmp_path / "remote")
    counted = tmp_path / "calls"
    env = {"CASTORE_TEST_CALLS": str(counted)}
    r = cas_inproc("run", str(SLOW), "--remote", url, "--push", cache_dir=a.root, env=env)
    assert r.returncode == 0, r.stderr
    assert len(calls(counted)) == SLOW_BATCHES
    remote = Remote(url)
    # One batch of `slow` loses its output on the remote.
    entries = [e for k in sorted(remote.list_actions()) if (e := remote.get_action(k))]
    gone = next(e for e in entries if e.info.get("step") == "slow").outputs[0]
    remote.delete_object(gone)
    r = cas_inproc("run", str(SLOW), "--remote", url, "--json", cache_dir=tmp_path / "b", env=env)
    assert r.returncode == 0, r.stderr
    assert len(calls(counted)) == SLOW_BATCHES + 1  # that batch, not every one after it
    assert gone[:12] in r.stderr and "unavailable" not in r.stderr
    assert run_rows(tmp_path / "b") == run_rows(a.root)


def test_writer_locks_exclude_each_other(tmp_path):
    remote = Remote(str(tmp_path / "remote"))
    beat = Heartbeat(remote, 60)
    push_a = WriterLock(remote, "push", exclusive=False, heartbeat=beat).acquire()
    push_b = WriterLock(remote, "push", exclusive=False, heartbeat=beat).acquire(wait=0)
    with pytest.raises(StoreLocked, match="locked by push"):
        WriterLock(remote, "gc", exclusive=True, heartbeat=beat).acquire(wait=0.3)
    assert not any(w["kind"] == "gc" for w in remote.writers())  # it backed off
    push_a.release()
    push_b.release()
    gc = WriterLock(remote, "gc", exclusive=True, heartbeat=beat).acquire(wait=0)
    with pytest.raises(StoreLocked, match="locked by gc"):
        WriterLock(remote, "push", exclusive=False, heartbeat=beat).acquire(wait=0.3)
    gc.release()
    beat.close()


def test_a_dead_holders_lock_expires_and_a_lost_lock_stops_its_writer(tmp_path, monkeypatch):
    monkeypatch.setenv("CASTORE_REMOTE_LOCK_TTL", "2")
    remote = Remote(str(tmp_path / "remote"))
    dead = Heartbeat(remote, 2)
    lock = WriterLock(remote, "push", exclusive=False, heartbeat=dead).acquire()
    dead.close()  # its holder stops refreshing it, as a killed process would
    with pytest.raises(StoreLocked, match="expires in"):
        WriterLock(remote, "gc", exclusive=True, heartbeat=Heartbeat(remote, 2)).acquire(wait=0)
    time.sleep(2.2)
    with pytest.raises(RemoteError, match="lost the push lock"):
        lock.check()  # the paused writer must not go on to name objects
    beat = Heartbeat(remote, 2)
    gc = WriterLock(remote, "gc", exclusive=True, heartbeat=beat).acquire(wait=0)
    time.sleep(1.5)  # longer than 3/4 TTL: the heartbeat kept it alive
    gc.check()
    gc.release()
    beat.close()


def test_leases_go_to_one_holder_and_free_after_expiry(tmp_path):
    remote = Remote(str(tmp_path / "remote"))
    key = "ab" * 32
    one, two = (Leases(remote, Heartbeat(remote, 2), poll=0) for _ in range(2))
    assert one.try_acquire(key) and not two.try_acquire(key)
    one.release(key)
    assert two.try_acquire(key) and not one.try_acquire(key)
    two.heartbeat.close()  # its holder dies
    time.sleep(2.2)
    assert one.try_acquire(key)
    one.release_all()
    assert not remote.fs.exists(remote.layout.lease_path(key))


@pytest.mark.slow
def test_gc_and_pushes_in_a_loop_never_strand_a_ref(tmp_path, make_store, s3_url):
    """A push that skipped objects the remote had, a gc that would sweep those same
    objects (no ref names them, cache-ttl 0): run together, over and over, the remote
    stays whole."""
    from tests.test_pipeline import build

    a = make_store("a")
    for factor in (1, 2, 3):
        build(factor=factor).run(cache_dir=a.root, quiet=True)
    remote = Remote(s3_url)
    push(a, remote)
    gc_args = ("gc", "--remote", s3_url, "--grace", "0", "--cache-ttl", "0", "-y")
    for _ in range(4):
        for name, sig, _oid in remote.list_refs():
            remote.delete_ref(name, sig)
        procs = [
            start_cas("push", s3_url, cache_dir=a.root),
            start_cas(*gc_args, cache_dir=a.root),
            start_cas("push", s3_url, cache_dir=a.root),
        ]
        codes = [p.wait(timeout=300) for p in procs]
        assert all(c in (0, 11) for c in codes), [p.stderr.read() for p in procs]  # type: ignore[union-attr]
        assert remote_problems(remote) == []
        if codes[0] and codes[2]:  # both refused while the gc held the remote: push now
            assert cas_inproc("push", s3_url, cache_dir=a.root).returncode == 0
        assert remote_problems(remote) == []


@pytest.mark.slow
def test_gc_waits_for_a_write_through_run(tmp_path, s3_url):
    args = ("run", str(SLOW), "--remote", s3_url, "--push", "--param", "slow.delay=0.4")
    proc = start_cas(*args, cache_dir=tmp_path / "a")  # 8 s: longer than gc waits (5 s)
    gc_args = ("gc", "--remote", s3_url, "--grace", "0", "--cache-ttl", "0", "-y")
    refused = 0
    created = False  # until the run's first write, the URL holds no remote: gc refuses it
    while proc.poll() is None:
        r = cas_inproc(*gc_args, cache_dir=tmp_path / "b")
        refused += r.returncode == 11
        if r.returncode == 6 and not created:
            assert "no castore remote at" in r.stderr, r.stderr
        else:
            created = True
            assert r.returncode in (0, 11), r.stderr
        time.sleep(0.3)
    assert proc.returncode == 0, proc.stderr.read()  # type: ignore[union-attr]
    assert refused >= 1, proc.stderr.read()  # type: ignore[union-attr]
    remote = Remote(s3_url)
    assert remote_problems(remote) == [] and remote.list_refs()


def _no_aws_env(tmp_path: Path) -> dict[str, str]:
    """No credentials anywhere botocore looks (no file, no instance metadata)."""
    return {
        "AWS_ACCESS_KEY_ID": "",
        "AWS_SECRET_ACCESS_KEY": "",
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_MAX_ATTEMPTS": "1",
    }


def test_remote_errors_are_one_line_with_exit_6(tmp_path, make_store):
    import os
    import subprocess
    import sys

    from tests.conftest import run_cas
    from tests.remote_server import free_port

    make_store("a")  # a store to push from
    cache = tmp_path / "a"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FSSPEC_S3"))}
    down = f"http://127.0.0.1:{free_port()}"
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "x", "AWS_MAX_ATTEMPTS": "1"}
    cases = {
        "cannot reach the remote": {**creds, "FSSPEC_S3_ENDPOINT_URL": down},
        "no credentials": {**_no_aws_env(tmp_path), "FSSPEC_S3_ENDPOINT_URL": down},
        "profile (nope) could not be found": {
            "AWS_PROFILE": "nope",
            "FSSPEC_S3_ENDPOINT_URL": down,
        },
    }
    # A server that checks signatures: keys it does not know are refused (HTTP 403).
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**base, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        import socket

        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        cases["denied access"] = {**creds, "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
        for expected, env in cases.items():
            for args in (("push", "s3://team-bucket/cache"), ("gc", "--remote", "s3://b/c")):
                full = {**base, "AWS_DEFAULT_REGION": "us-east-1", **env}
                r = run_cas(*args, cache_dir=cache, env=full)
                assert r.returncode == 6, (expected, r.stderr)
                lines = r.stderr.strip().splitlines()
                assert len(lines) == 1 and expected in lines[0], (expected, r.stderr)
    finally:
        server.terminate()
        server.wait(10)


def test_cheap_steps_are_not_leased(tmp_path, make_store):
    from castore.pipeline.record import StepTally
    from castore.pipeline.remote_cache import RemoteCache

    remote = Remote(str(tmp_path / "remote"))
    rc = RemoteCache(make_store("a"), remote, push=True)
    cheap, slow = "ab" * 32, "cd" * 32
    assert rc.lease(cheap, StepTally(computed=3, seconds=0.03))
    assert rc.lease(slow, StepTally(computed=3, seconds=3.0))
    assert not remote.fs.exists(remote.layout.lease_path(cheap))
    assert remote.fs.exists(remote.layout.lease_path(slow))
    rc.finish("0" * 64)
    assert not remote.fs.exists(remote.layout.lease_path(slow))
    assert remote.writers() == []  # its push lock is gone too


def test_entry_packs_serve_gc_and_never_overrule_the_loose_files(make_store, s3_url):
    from castore import remote_packs
    from castore.remote_gc import collect_remote
    from tests.test_pipeline import build

    a = make_store("a")
    build().run(cache_dir=a.root, quiet=True)
    remote = Remote(s3_url)
    push(a, remote)
    packs = remote_packs.markers(remote)
    keys = sorted(remote.list_actions())
    assert len(packs) == 1 and keys
    direct = {k: remote.get_action(k) for k in keys}

    def outputs(got: dict) -> dict:
        return {k: e.outputs if e is not None else None for k, e in got.items()}

    def named(e) -> tuple:  # gc counts what the outputs extend as named (store/extend.py)
        return (*e.outputs, *e.needs())

    assert outputs(remote_packs.read_entries(remote).entries) == {
        k: named(e) for k, e in direct.items() if e is not None
    }
    # A loose file rewritten after the pack (another machine's result) wins over the
    # pack; a deleted one is not brought back by it.
    changed, gone = keys[0], keys[1]
    other = direct[keys[2]]
    assert other is not None
    remote.put_action(changed, other)
    remote.fs.rm_file(remote.layout.action_path(gone))
    got = remote_packs.read_entries(remote).entries
    assert got[changed].outputs == named(other) and gone not in got
    build(factor=5).run(cache_dir=a.root, quiet=True)
    push(a, remote)
    assert len(remote_packs.markers(remote)) == 2
    collect_remote(remote, grace=0, cache_ttl=0)
    assert len(remote_packs.markers(remote)) == 1  # merged
    assert outputs(remote_packs.read_entries(remote).entries) == {
        k: named(e) for k in remote.list_actions() if (e := remote.get_action(k))
    }
    # fsck names the entry we rewrote (it disagrees with its run's step manifest), only it
    assert {p.split()[1].rstrip(":") for p in remote_problems(remote)} == {changed}


@pytest.mark.slow
def test_a_machine_killed_mid_run_leaves_its_batches_to_the_others(tmp_path, s3_url):
    """kill -9 of a machine holding leases: the other waits for them only until they
    expire (TTL 3 s here), then computes them; nothing is paid twice beyond the batches
    the dead one had in flight, and the dataset is the one a lone machine makes."""
    import signal

    counted = tmp_path / "calls"
    env = {"CASTORE_TEST_CALLS": str(counted), "CASTORE_REMOTE_LOCK_TTL": "3"}
    args = ("run", str(SLOW), "--remote", s3_url, "--push", "--json")
    a = start_cas(*args, cache_dir=tmp_path / "a", env=env)
    remote = Remote(s3_url)
    deadline = time.monotonic() + 60
    while len(calls(counted)) < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    b = start_cas(*args, cache_dir=tmp_path / "b", env=env)
    time.sleep(1.0)  # b is waiting on a's leases
    held = len(remote.fs.find(remote.layout.leases_dir()))
    a.send_signal(signal.SIGKILL)
    a.communicate(timeout=30)
    out, err = b.communicate(timeout=300)
    assert b.returncode == 0, err
    assert json.loads(out)["status"] == "finished"
    paid = calls(counted)
    assert len({line.split()[1] for line in paid}) == SLOW_BATCHES
    assert len(paid) <= SLOW_BATCHES + max(held, 4), (len(paid), held)
    r = cas_inproc("run", str(SLOW), "--json", cache_dir=tmp_path / "alone")
    assert r.returncode == 0
    assert run_rows(tmp_path / "b") == run_rows(tmp_path / "alone")


def test_a_wrong_lock_ttl_is_an_error_not_a_default(tmp_path, monkeypatch):
    from castore.remote_layout import require_store

    require_store(Remote(str(tmp_path / "remote")), "create")  # as a first push leaves it
    for bad in ("soon", "0", "nan", "-5"):
        monkeypatch.setenv("CASTORE_REMOTE_LOCK_TTL", bad)
        r = cas_inproc("gc", "--remote", str(tmp_path / "remote"), "-y", cache_dir=tmp_path / "c")
        assert r.returncode == 2 and "CASTORE_REMOTE_LOCK_TTL" in r.stderr, (bad, r.stderr)
