"""A remote's castore-layout.json: a URL that never held a remote is an error, not an empty
remote; a remote of a newer layout is refused; remotes from before the file still work."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from castore.remote import Remote
from castore.store.layout import LAYOUT_FILE, LAYOUT_VERSION
from castore.transfer import pull, push
from tests.conftest import cas_inproc
from tests.test_pipeline import build, counts
from tests.test_remote import remote_problems, remote_url, s3  # noqa: F401 - the fixtures


def _layout(remote: Remote) -> dict:
    return json.loads(remote.read(remote.layout.layout_file))


def test_a_url_that_holds_no_remote_is_an_error_and_stays_untouched(tmp_path, make_store):
    build().run(cache_dir=make_store("c").root, quiet=True)
    typo = tmp_path / "remtoe"
    for args in (
        ("pull", str(typo)),
        ("pull", str(typo), "--dry-run"),
        ("fsck", "--remote", str(typo)),
        ("gc", "--remote", str(typo), "--dry-run"),
        ("gc", "--remote", str(typo), "-y"),
    ):
        r = cas_inproc(*args, cache_dir=tmp_path / "c")
        assert r.returncode == 6, (args, r.stderr)
        assert r.stderr.startswith(f"Error: no castore remote at {typo}:"), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "--debug" not in r.stderr
        assert not typo.exists(), args  # nothing was made there
    # A push's dry run plans a first push: fine, and still writes nothing.
    r = cas_inproc("push", str(typo), "--dry-run", cache_dir=tmp_path / "c")
    assert r.returncode == 0 and not typo.exists(), r.stderr


def test_the_first_write_creates_the_file_and_gc_never_removes_it(make_store, remote_url):  # noqa: F811
    a = make_store("a")
    build().run(cache_dir=a.root, quiet=True, remote=remote_url, push=True)
    remote = Remote(remote_url)
    info = _layout(remote)
    assert info["layout_version"] == LAYOUT_VERSION and info["castore_version"]
    for name, sig, _ in remote.list_refs():
        remote.delete_ref(name, sig)
    from castore.remote_gc import collect_remote

    gone = collect_remote(Remote(remote_url), grace=0, cache_ttl=0)
    assert gone.plan.objects_removed and not Remote(remote_url).list_refs()
    again = Remote(remote_url)
    assert _layout(again) == info  # an emptied remote is still a remote
    assert remote_problems(again) == []
    assert pull(make_store("b"), again).objects == 0


def test_a_remote_from_before_the_file_is_read_and_gets_it_on_its_next_push(tmp_path, make_store):
    a = make_store("a")
    build().run(cache_dir=a.root, quiet=True)
    url = str(tmp_path / "remote")
    push(a, Remote(url))
    (tmp_path / "remote" / LAYOUT_FILE).unlink()  # as castore wrote remotes before it
    old = Remote(url)
    assert remote_problems(old) == [] and pull(make_store("b"), old).refs
    ds = build().run(cache_dir=make_store("c").root, quiet=True, remote=url)
    assert all(counts(ds, s)[1] == 0 for s in ds.run.stats)  # read through, nothing computed
    assert not (tmp_path / "remote" / LAYOUT_FILE).exists()  # reading writes nothing
    push(a, old)  # the Remote that was read from: its push still writes the file
    assert _layout(Remote(url))["layout_version"] == LAYOUT_VERSION


def test_a_newer_layout_is_refused_and_a_run_goes_on_without_it(tmp_path, make_store, caplog):
    a = make_store("a")
    build().run(cache_dir=a.root, quiet=True)
    url = str(tmp_path / "remote")
    push(a, Remote(url))
    newer = {**_layout(Remote(url)), "layout_version": LAYOUT_VERSION + 1}
    (tmp_path / "remote" / LAYOUT_FILE).write_text(json.dumps(newer))
    for args in (("pull", url), ("push", url), ("fsck", "--remote", url)):
        r = cas_inproc(*args, cache_dir=a.root)
        assert r.returncode == 5, (args, r.stderr)
        assert f"has layout version {LAYOUT_VERSION + 1}" in r.stderr and "Upgrade" in r.stderr
    caplog.set_level(logging.WARNING, logger="castore")
    ds = build().run(cache_dir=make_store("c").root, quiet=True, remote=url)
    assert all(counts(ds, s)[0] == 0 for s in ds.run.stats)  # computed here, not read
    warned = [r.getMessage() for r in caplog.records if "layout version" in r.getMessage()]
    assert len(warned) == 1 and url in warned[0] and "local store only" in warned[0]


def test_a_read_through_run_on_a_mistyped_url_warns_once_and_computes(tmp_path, make_store, caplog):
    caplog.set_level(logging.WARNING, logger="castore")
    typo = tmp_path / "remtoe"
    ds = build().run(cache_dir=make_store("c").root, quiet=True, remote=str(typo))
    assert ds.run.stats and all(counts(ds, s)[1] > 0 for s in ds.run.stats)
    warned = [r.getMessage() for r in caplog.records if "no castore remote" in r.getMessage()]
    assert len(warned) == 1 and str(typo) in warned[0]
    assert not typo.exists()


def test_a_file_that_is_not_castores_is_an_error(tmp_path, make_store):
    a = make_store("a")
    url = tmp_path / "remote"
    url.mkdir()
    (url / LAYOUT_FILE).write_text("{not json")
    r = cas_inproc("pull", str(url), cache_dir=a.root)
    assert r.returncode == 6 and "is not castore's" in r.stderr, r.stderr
    assert (url / LAYOUT_FILE).read_text() == "{not json"  # left for the user to look at
    shutil.rmtree(url)


def test_writers_that_race_agree_on_one_file(remote_url):  # noqa: F811
    from concurrent.futures import ThreadPoolExecutor

    from castore.remote_layout import require_store

    def create(_: int) -> str:
        r = Remote(remote_url)
        require_store(r, "create")
        return r.read(r.layout.layout_file).decode()

    with ThreadPoolExecutor(8) as pool:
        seen = set(pool.map(create, range(8)))
    assert len(seen) == 1  # one writer won; the others read its file
    assert json.loads(seen.pop())["layout_version"] == LAYOUT_VERSION
    require_store(Remote(remote_url))  # and readers now find a remote


def test_status_with_a_mistyped_remote_is_an_error(tmp_path):
    from castore.errors import RemoteError
    from tests.test_rows import base_rows, write_rows
    from tests.test_rows import build as build_rows

    data = tmp_path / "d.jsonl"
    write_rows(data, base_rows())
    typo = tmp_path / "remtoe"
    with pytest.raises(RemoteError, match="no castore remote at"):
        build_rows(data).plan(cache_dir=tmp_path / "c", remote=str(typo))
    assert not typo.exists()


def test_a_push_to_a_bucket_that_does_not_exist_is_one_line(tmp_path, make_store, s3, monkeypatch):  # noqa: F811
    from tests.test_remote import use_server

    use_server(s3, monkeypatch)
    a = make_store("a")
    build().run(cache_dir=a.root, quiet=True)
    r = cas_inproc("push", "s3://castore-no-such-bucket/cache", cache_dir=a.root)
    assert r.returncode == 6, r.stderr
    assert "the bucket must exist" in r.stderr and len(r.stderr.strip().splitlines()) == 1
