"""Read-through remembers what it read of a remote's runs (castore/remote_index.py): a
later run reads only the manifests of runs it has not seen, and on S3 only the refs whose
ETag changed; the cross-check still holds, and gc lets the memory go."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from castore.gc import collect
from castore.remote import Remote
from castore.transfer import push
from tests.test_pipeline import build, counts
from tests.test_reliability import _tamper_entry
from tests.test_remote import remote_url, s3  # noqa: F401 - fixtures


class Reads:
    """Counts what a Remote reads: manifests (load_json) and ref files."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.manifests = 0
        self.refs = 0
        load_json, read = Remote.load_json, Remote.read

        def counting_load(remote, oid, model):
            self.manifests += 1
            return load_json(remote, oid, model)

        def counting_read(remote, path):
            if "/refs/" in path.replace(os.sep, "/"):
                self.refs += 1
            return read(remote, path)

        monkeypatch.setattr(Remote, "load_json", counting_load)
        monkeypatch.setattr(Remote, "read", counting_read)

    def reset(self) -> None:
        self.manifests = self.refs = 0


def test_second_look_reads_only_what_changed(make_store, remote_url, monkeypatch):  # noqa: F811
    a, c = make_store("a"), make_store("c")
    first = build().run(cache_dir=a.root, quiet=True)
    push(a, Remote(remote_url))
    reads = Reads(monkeypatch)
    index, _ = Remote(remote_url).manifest_index(c)
    steps = len(first.run.steps)
    assert reads.manifests == 1 + steps and reads.refs == 1
    keys = {b.key for s in first.run.steps for b in _batches(a, s.manifest)}
    assert keys <= set(index)
    assert (Path(c.root) / "remotes" / "runs" / f"{first.run_oid}.json").is_file()

    refs_files = list((Path(c.root) / "remotes" / "refs").glob("*.json"))
    written = {f: f.stat().st_ino for f in refs_files}
    reads.reset()
    again, _ = Remote(remote_url).manifest_index(c)
    assert again == index
    # Unchanged refs are not written again (a folder's listing has none to keep).
    assert len(refs_files) == (0 if remote_url.startswith("/") else 1)
    assert {f: f.stat().st_ino for f in refs_files} == written
    assert reads.manifests == 0  # the run's digest is remembered
    # A folder's listing has no version, so its refs are read (cheap); S3's has the ETag.
    assert reads.refs == (1 if remote_url.startswith("/") else 0)

    # A new ref, and the first ref moved to a new run of its pipeline (its ETag changes):
    # both read, and both runs' manifests.
    other = build(factor=3).run(cache_dir=a.root, quiet=True)
    rerun = build().run(cache_dir=a.root, quiet=True)
    assert rerun.run_oid != first.run_oid
    push(a, Remote(remote_url))
    reads.reset()
    newer, _ = Remote(remote_url).manifest_index(c)
    assert reads.refs == 2 and reads.manifests == 2 * (1 + steps)
    for ds in (other, rerun):
        assert {b.key for s in ds.run.steps for b in _batches(a, s.manifest)} <= set(newer)


def test_cross_check_holds_with_a_remembered_digest(make_store, tmp_path):
    a, c = make_store("a"), make_store("c")
    first = build().run(cache_dir=a.root, quiet=True)
    remote_root = tmp_path / "remote"
    push(a, Remote(str(remote_root)))
    Remote(str(remote_root)).manifest_index(c)  # remembered before the tampering
    _tamper_entry(remote_root, a, first)
    ds = build().run(cache_dir=c.root, quiet=True, remote=str(remote_root))
    assert counts(ds, "upper")[1] == 1  # the tampered batch computed here
    assert ds["keep_columns"]["train"].to_list() == first["keep_columns"]["train"].to_list()


def test_damaged_memory_is_rebuilt_and_gc_lets_it_go(make_store, tmp_path, monkeypatch):
    a, c = make_store("a"), make_store("c")
    first = build().run(cache_dir=a.root, quiet=True)
    remote = Remote(str(tmp_path / "remote"))
    push(a, remote)
    index, _ = remote.manifest_index(c)
    digest = Path(c.root) / "remotes" / "runs" / f"{first.run_oid}.json"
    digest.write_text("{not json")
    reads = Reads(monkeypatch)
    assert remote.manifest_index(c)[0] == index
    assert reads.manifests == 1 + len(first.run.steps)
    assert json.loads(digest.read_text())["batches"]
    kept = collect(c)  # used just now: within the cache-ttl
    assert digest.is_file() and not kept.dry_run
    collect(c, cache_ttl=0)
    assert not digest.exists()


def test_a_ref_that_cannot_be_read_stops_the_listing(make_store, tmp_path, monkeypatch, caplog):
    """Skipping it would let `gc --remote` sweep the objects that ref keeps."""
    from castore.errors import RemoteUnavailable

    a = make_store("a")
    build().run(cache_dir=a.root, quiet=True)
    remote = Remote(str(tmp_path / "remote"))
    push(a, remote)

    read = Remote.read

    def broken(self, path):
        if "/refs/" in path:
            raise ConnectionError("connection reset")
        return read(self, path)

    monkeypatch.setattr(Remote, "read", broken)
    with pytest.raises(RemoteUnavailable, match="cannot read refs"):
        remote.list_refs()
    # A run reading through is not failed by it: it goes on with its local store.
    c = make_store("c")
    caplog.set_level(logging.WARNING, logger="castore.run")
    ds = build().run(cache_dir=c.root, quiet=True, remote=remote.url)
    assert ds.run.status == "finished" and counts(ds, "upper")[1] > 0
    assert "unavailable" in caplog.text and "cannot read refs" in caplog.text


def _batches(store, step_oid):
    from castore.store.manifests import StepManifest, load_model

    return load_model(store, step_oid, StepManifest).batches
