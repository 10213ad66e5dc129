"""Remotes against a local folder and a real S3-compatible server on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from castore.distiset import Distiset
from castore.errors import ConfigError
from castore.fsck import check_remote
from castore.remote import Remote
from castore.remote_gc import collect_remote
from castore.transfer import pull, push
from tests.conftest import cas_inproc, start_cas
from tests.remote_server import S3Server
from tests.test_pipeline import build, counts, rows


@pytest.fixture(scope="module")
def s3():
    try:
        import moto.server  # noqa: F401
        import s3fs  # noqa: F401
    except ImportError:
        pytest.fail("moto[server] and s3fs are part of the test extra")
    server = S3Server()
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["folder", "s3"])
def remote_url(request, tmp_path, monkeypatch):
    if request.param == "folder":
        return str(tmp_path / "remote")
    server = request.getfixturevalue("s3")
    use_server(server, monkeypatch)
    return server.new_bucket()


def use_server(server: S3Server, monkeypatch) -> None:
    """Point s3:// at the local server: the environment for `cas` subprocesses, fsspec's
    config for this process (it read the environment when it was imported)."""
    import fsspec.config

    for k, v in server.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": server.endpoint})


def as_rows(ds):
    return {leaf: dd["train"].to_list() for leaf, dd in ds.items()}


def test_second_machine(make_store, remote_url):
    a, b, c = make_store("a"), make_store("b"), make_store("c")
    first = build().run(cache_dir=a.root, quiet=True)
    remote = Remote(remote_url)
    res = push(a, remote)
    assert res.objects > 0 and not res.failed and len(res.refs) == 1
    assert remote_problems(remote) == []
    again = push(a, remote)
    assert again.objects == 0 and again.skipped > 0  # idempotent

    got = pull(b, remote)
    assert got.objects > 0 and got.refs == res.refs
    ds_b = build().run(cache_dir=b.root, quiet=True)
    assert all(counts(ds_b, s)[1] == 0 for s in ds_b.run.stats)
    assert as_rows(ds_b) == as_rows(first)

    ds_c = build().run(cache_dir=c.root, quiet=True, remote=remote_url)
    assert all(counts(ds_c, s)[1] == 0 for s in ds_c.run.stats)
    assert as_rows(ds_c) == as_rows(first)
    # Read-through fetched the batches it needed, not the other run's manifests.
    batch_objects = {o for s in first.run.steps for o in _outputs(a, s.manifest)}
    assert batch_objects <= set(c.iter_oids())
    assert first.run_oid not in set(c.iter_oids())


def _outputs(store, step_oid):
    from castore.store.manifests import StepManifest, load_model

    return [o for b in load_model(store, step_oid, StepManifest).batches for o in b.outputs]


def test_write_through(make_store, remote_url):
    a, b = make_store("a"), make_store("b")
    first = build().run(cache_dir=a.root, quiet=True, remote=remote_url, push=True)
    remote = Remote(remote_url)
    assert [r[1] for r in remote.list_refs()] == [first.run.signature]
    assert remote_problems(remote) == []
    pull(b, remote)
    ds = build().run(cache_dir=b.root, quiet=True)
    assert all(counts(ds, s)[1] == 0 for s in ds.run.stats)


def _tamper(remote: Remote, oid: str) -> None:
    path = remote.layout.object_path(oid)
    data = bytearray(remote.fs.cat_file(path))
    data[len(data) // 2] ^= 0xFF
    if remote.local:
        os.chmod(path, 0o644)
    remote.fs.pipe_file(path, bytes(data))


def test_tampered_object_rejected_by_pull_and_read_through(make_store, remote_url):
    a, b, c = make_store("a"), make_store("b"), make_store("c")
    first = build().run(cache_dir=a.root, quiet=True)
    remote = Remote(remote_url)
    push(a, remote)
    victim = _outputs(a, first.run.step_manifest_id("upper"))[1]
    _tamper(remote, victim)
    assert any(victim in p for p in remote_problems(remote))
    r = cas_inproc("pull", remote_url, cache_dir=b.root)
    assert r.returncode != 0 and victim in r.stderr and "Traceback" not in r.stderr
    assert not b.has(victim)
    assert all(b.verify(o) for o in b.iter_oids())
    ds = build().run(cache_dir=c.root, quiet=True, remote=remote_url)
    assert counts(ds, "upper")[1] == 1  # that batch was recomputed here
    assert as_rows(ds) == as_rows(first)
    assert c.verify(victim)


def test_partial_push_then_push_completes(make_store, tmp_path):
    """kill -9 of `cas push` mid-way; a second push sends only the rest."""
    a = make_store("a")
    from castore import Pipeline
    from castore.steps import LoadDataFromDicts

    with Pipeline(name="many") as p:
        LoadDataFromDicts(data=[{"x": "y" * 2000, "i": i} for i in range(6000)], batch_size=3)
    p.run(cache_dir=a.root, quiet=True)
    url = str(tmp_path / "remote")
    proc = start_cas("push", url, "--jobs", "2", cache_dir=a.root)
    objects = Path(url) / "objects"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        n = (
            sum(len(os.listdir(objects / d)) for d in os.listdir(objects))
            if objects.exists()
            else 0
        )
        if n >= 200:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    remote = Remote(url)
    arrived = len(remote.list_oids())
    assert 0 < arrived < 2000, "the kill did not land mid-push"
    assert remote.list_refs() == []  # no ref before all its objects
    r = cas_inproc("push", url, "--json", cache_dir=a.root)
    assert r.returncode == 0, r
    assert r.json()["skipped"] >= arrived - 1
    assert cas_inproc("fsck", "--remote", url, cache_dir=a.root).returncode == 0


def test_remote_stopped_mid_run_degrades_to_local(make_store, tmp_path, monkeypatch):
    server = S3Server()
    server.start()
    use_server(server, monkeypatch)
    url = server.new_bucket()
    a = make_store("a")
    pipeline = Path(__file__).parent / "pipelines" / "slow.py"
    proc = start_cas("run", str(pipeline), "--remote", url, "--push", "--json", cache_dir=a.root)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (a.root / "refs" / "runs" / "slow").exists():
        time.sleep(0.02)
    time.sleep(0.5)
    server.stop()
    out, errtext = proc.communicate(timeout=180)
    assert proc.returncode == 0, errtext
    assert "unavailable" in errtext or "write-through failed" in errtext
    import json

    assert json.loads(out)["status"] == "finished"


def test_remote_config_cli(tmp_path):
    cache = tmp_path / "c"
    url = str(tmp_path / "remote")
    assert cas_inproc("remote", "add", "team", url, cache_dir=cache).returncode == 0
    r = cas_inproc("remote", "list", "--json", cache_dir=cache)
    assert r.json() == {"team": url}
    r = cas_inproc("remote", "add", "leak", "s3://AKIA:secret@bucket/x", cache_dir=cache)
    assert r.returncode != 0 and "credentials" in r.stderr
    assert "secret" not in (cache / "config.yaml").read_text()
    r = cas_inproc("push", "--json", cache_dir=cache)  # the only remote is the default
    assert r.returncode == 0, r
    assert cas_inproc("remote", "remove", "team", cache_dir=cache).returncode == 0
    r = cas_inproc("push", cache_dir=cache)
    assert r.returncode != 0 and "no remote given" in r.stderr
    # A name that is no remote, with no default to pull from: the error names it (it was
    # taken for a run and answered "no remote given"), and a pull creates no store first.
    for verb, store in (("push", cache), ("pull", cache), ("pull", tmp_path / "new")):
        r = cas_inproc(verb, "tema", cache_dir=store)
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and lines == ["Error: no remote named 'tema' (configured: none)"]
    assert not (tmp_path / "new").exists()
    # fsck and gc of a remote need no local store when given a URL, and name a remote that
    # is not configured instead of answering that there is no store.
    none = tmp_path / "none"
    assert cas_inproc("fsck", "--remote", url, cache_dir=none).returncode == 0
    assert cas_inproc("gc", "--remote", url, "--dry-run", cache_dir=none).returncode == 0
    for cmd in (("fsck", "--remote", "tema"), ("gc", "--remote", "tema")):
        r = cas_inproc(*cmd, cache_dir=none)
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and lines == ["Error: no remote named 'tema' (configured: none)"]
    assert not none.exists()


def test_untrusted_refs_and_ids_are_skipped(make_store, tmp_path):
    a, b = make_store("a"), make_store("b")
    build().run(cache_dir=a.root, quiet=True)
    url = tmp_path / "remote"
    remote = Remote(str(url))
    push(a, remote)
    refs = url / "refs" / "runs"
    (refs / "..evil").mkdir()
    (refs / "..evil" / ("0" * 64)).write_text("0" * 64)
    (refs / "p" / "not-a-sig").write_text("../../../../etc/passwd")
    (refs / "p" / ("1" * 64)).write_text("../../etc/passwd\n")
    assert [r[0] for r in remote.list_refs()] == ["p"]
    got = pull(b, remote)
    assert len(got.refs) == 1
    assert not (tmp_path / "etc").exists()


def test_gc_remote_and_writer_lock(make_store, tmp_path):
    a = make_store("a")
    build().run(cache_dir=a.root, quiet=True)
    build(factor=9).run(cache_dir=a.root, quiet=True)
    url = str(tmp_path / "remote")
    remote = Remote(url)
    push(a, remote)
    name, sig, _ = remote.list_refs()[0]
    remote.delete_ref(name, sig)
    with remote.writer_lock("push", exclusive=False):
        r = cas_inproc("gc", "--remote", url, cache_dir=a.root)
        assert r.returncode == 11 and "locked" in r.stderr
    res = collect_remote(remote, grace=0, cache_ttl=0)
    assert res.plan.objects_removed and remote_problems(remote) == []
    b = make_store("b")
    pull(b, remote)
    ds = Distiset.from_run("p", b.root)
    assert rows(ds, "keep_columns")


def test_bad_remote_url(tmp_path):
    with pytest.raises(ConfigError, match="credentials"):
        Remote("https://user:pw@example.invalid/store")
    r = cas_inproc("pull", "nope", cache_dir=tmp_path / "c")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    for url in ("s3://", "gs:///prefix", "s3a:///x"):  # no bucket: no key is valid there
        with pytest.raises(ConfigError, match="names no bucket"):
            Remote(url)
        r = cas_inproc("remote", "add", "nobucket", url, cache_dir=tmp_path / "c")
        assert r.returncode == 2 and "names no bucket" in r.stderr, r.stderr


def test_a_local_remote_that_cannot_be_written_is_one_line(make_store, tmp_path):
    """A remote path that runs through a file: push says so in one line (exit 6), pull
    finds no remote there, and a write-through run goes on locally, saying why."""
    from tests.conftest import cas_inproc

    store = make_store("a")
    build().run(cache_dir=store.root, quiet=True)
    (tmp_path / "file").write_text("a file, not a folder")
    url = str(tmp_path / "file" / "remote")
    r = cas_inproc("push", url, cache_dir=store.root)
    assert r.returncode == 6, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"Error: cannot write to remote {url}: a file stands where a folder should be "
        f"({url}/castore-layout.json)"
    ]
    r = cas_inproc("pull", url, cache_dir=store.root)
    assert r.returncode == 6 and f"no castore remote at {url}" in r.stderr


def remote_problems(remote) -> list[str]:
    return [p.line() for p in check_remote(remote).problems]


def test_push_and_pull_dry_run_transfer_nothing(make_store, tmp_path):
    from tests.conftest import cas_inproc

    a, b = make_store("a"), make_store("b")
    build().run(cache_dir=a.root, quiet=True)
    remote_root = tmp_path / "remote"
    r = cas_inproc("push", str(remote_root), "--dry-run", "--json", cache_dir=a.root)
    assert r.returncode == 0, r
    plan = r.json()
    assert plan["dry_run"] and plan["objects"] > 0 and plan["action_entries"] > 0
    assert not remote_root.exists() or not any(remote_root.rglob("objects/*/*"))
    r = cas_inproc("push", str(remote_root), "--json", cache_dir=a.root)
    assert r.returncode == 0 and r.json()["objects"] == plan["objects"] + plan["manifests"]
    r = cas_inproc("push", str(remote_root), "--dry-run", cache_dir=a.root)
    assert "would upload 0 objects" in r.stderr, r
    r = cas_inproc("pull", str(remote_root), "--dry-run", "--json", cache_dir=b.root)
    pulled = r.json()
    assert r.returncode == 0 and pulled["objects"] == plan["objects"]
    assert sum(1 for _ in b.iter_oids()) == 0  # nothing arrived


def test_scan_lists_what_find_lists(make_store, remote_url):
    """`Remote.scan` (S3 read page by page, a folder walked) gives every file find() does,
    with the same size, mtime and ETag."""
    from castore.remote import etag_of, mtime_of
    from castore.store import layout as L

    a = make_store("a")
    build().run(cache_dir=a.root, quiet=True)
    remote = Remote(remote_url)
    push(a, remote)
    for kind in (L.OBJECTS, L.ACTIONS):
        listed = remote.fs.find(remote.layout.dir(kind), detail=True)
        want = {
            L.oid_from_path(p): (int(i["size"]), round(mtime_of(i)), etag_of(i))
            for p, i in listed.items()
            if L.oid_from_path(p)
        }
        got = {
            L.oid_from_path(p): (size, round(mtime), tag)
            for p, mtime, size, tag in remote.scan(kind)
            if L.oid_from_path(p)
        }
        assert got == want and len(got) > 3
        if remote_url.startswith("s3://"):  # the exact mtimes, as boto3 itself parses them
            import boto3

            bucket, prefix = remote.layout.dir(kind).split("/", 1)
            client = boto3.client("s3", endpoint_url=os.environ["FSSPEC_S3_ENDPOINT_URL"])
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            theirs = {
                L.oid_from_path(o["Key"]): o["LastModified"].timestamp()
                for page in pages
                for o in page["Contents"]
            }
            mine = {L.oid_from_path(p): mtime for p, mtime, _, _ in remote.scan(kind)}
            assert {k: v for k, v in theirs.items() if k} == {k: v for k, v in mine.items() if k}
    assert list(Remote(remote_url + "-nothing-here").scan(L.OBJECTS)) == []


def test_listing_timestamps_parse_as_botocore_does():
    """S3's ISO 8601 timestamps are parsed by the standard library (botocore's dateutil
    parse was 60 % of a listing's CPU); every form gives botocore's own datetime."""
    from botocore.utils import parse_timestamp as botocore_parse

    from castore.remote import parse_timestamp

    for text in [
        "2026-11-29T09:14:50.000Z",
        "2026-11-29T09:14:50Z",
        "2026-11-29T09:14:50.123456Z",
        "1999-01-01T23:59:59.5Z",
        "2026-11-29T09:14:50+02:00",  # not S3's form: botocore's parse
        "Sun, 29 Nov 2026 09:14:50 GMT",  # a Last-Modified header
        "1700000000",
        1700000000,
    ]:
        mine, theirs = parse_timestamp(text), botocore_parse(text)
        assert mine == theirs and mine.timestamp() == theirs.timestamp(), text
        assert mine.utcoffset() == theirs.utcoffset(), text


def test_transfer_jobs_below_one_is_refused(make_store, tmp_path):
    """`--jobs 0` was run as 1 without a word: an ignored argument."""
    from tests.conftest import cas_inproc

    a = make_store("a")
    for cmd in ("push", "pull"):
        r = cas_inproc(cmd, str(tmp_path / "remote"), "--jobs", "0", cache_dir=a.root)
        assert r.returncode == 2 and "--jobs" in r.stderr and "Traceback" not in r.stderr, r
    assert not (tmp_path / "remote").exists()
