"""gc --remote's plan over entries kept as arrays of 32-byte ids (castore.remote_packs,
castore.remote_gc._plan_remote): each rule checked on synthetic entries with awkward ids, on a
folder and on the S3 server, with entries taken from packs and from loose files."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from castore import remote_packs
from castore.hashing import hash_bytes
from castore.remote import Remote
from castore.remote_gc import collect_remote
from castore.remote_layout import require_store
from castore.store.models import ActionEntry
from tests.test_remote import remote_url, s3  # noqa: F401 - the folder / S3 fixtures


def key(last: str, n: int) -> str:
    """A key whose last byte is `last` (00: numpy's bytes scalars would drop it)."""
    return f"{n:062x}{last}"


def put_object(remote: Remote, text: str) -> str:
    data = text.encode()
    oid = hash_bytes(data)
    remote.write(remote.layout.object_path(oid), data)
    return oid


def put_entry(remote: Remote, k: str, outputs: list[str], age_days: float = 30) -> bytes:
    created = datetime.now(UTC) - timedelta(days=age_days)
    entry = ActionEntry(outputs=outputs, rows=[1] * len(outputs), created=created)
    raw = remote.entry_bytes(k, entry)
    remote.write(remote.layout.action_path(k), raw)
    return raw


def packed(remote: Remote) -> dict[str, bytes]:
    """Every entry the remote's packs hold, as bytes."""
    from castore.store import actionpack

    out: dict[str, bytes] = {}
    for pack in remote_packs.markers(remote):
        items = actionpack.decode_pack(pack, remote.get_object(pack)).items()
        out.update((k, v.encode()) for k, v in items)
    return out


def test_plan_rules_on_awkward_ids(remote_url):  # noqa: F811
    remote = Remote(remote_url)
    kept = put_object(remote, "named by a young entry")
    shared = put_object(remote, "named by two old entries")
    half = put_object(remote, "one of two outputs")
    missing = "ab" * 31 + "00"  # never written
    raw = {
        key("00", 1): put_entry(remote, key("00", 1), [missing]),  # names a missing object
        key("01", 2): put_entry(remote, key("01", 2), [half, missing]),  # one missing
        key("00", 3): put_entry(remote, key("00", 3), [shared]),
        key("02", 4): put_entry(remote, key("02", 4), [shared]),
        key("03", 5): put_entry(remote, key("03", 5), [kept], age_days=0),
        key("04", 6): put_entry(remote, key("04", 6), []),  # a generator's end
    }
    bad = key("05", 7)
    remote.write(remote.layout.action_path(bad), b"{not json")
    # Some entries packed, as a push leaves them; one loose file rewritten since.
    remote_packs.write(remote, {k: raw[k] for k in list(raw)[:4]})
    raw[key("00", 3)] = put_entry(remote, key("00", 3), [shared], age_days=31)

    got = remote_packs.read_entries(remote)
    assert set(got.entries) == {*raw, bad} and got.entries[bad] is None
    assert got.entries[key("01", 2)].outputs == (half, missing)
    plan = collect_remote(remote, grace=0, cache_ttl=86400, dry_run=True).plan
    # Old entries naming `shared` (no run, no young entry) let it go, and go with it.
    assert plan.objects_removed == sorted([shared, half])
    assert plan.actions_dropped == sorted(
        [key("00", 1), key("01", 2), key("00", 3), key("02", 4), bad]
    )
    assert all(len(k) == 64 for k in plan.actions_dropped)

    result = collect_remote(remote, grace=0, cache_ttl=86400)
    assert result.plan.actions_dropped == plan.actions_dropped
    left = remote_packs.read_entries(remote).entries
    assert set(left) == {key("03", 5), key("04", 6)}
    assert left[key("03", 5)].outputs == (kept,) and left[key("04", 6)].outputs == ()
    assert remote.fs.exists(remote.layout.object_path(kept))
    assert not remote.fs.exists(remote.layout.object_path(shared))
    # The merged pack holds exactly what is left, bytes as they were.
    if not remote.local:
        assert len(remote_packs.markers(remote)) == 1
        assert packed(remote) == {k: raw[k] for k in (key("03", 5), key("04", 6))}


@pytest.mark.parametrize("cache_ttl", [0, 86400])
def test_an_empty_remote_and_one_of_objects_only(tmp_path, cache_ttl):
    remote = Remote(str(tmp_path / "remote"))
    require_store(remote, "create")  # as a first push leaves it
    assert collect_remote(remote, grace=0, cache_ttl=cache_ttl, dry_run=True).plan.objects_kept == 0
    stray = put_object(remote, "no entry names me")
    plan = collect_remote(remote, grace=0, cache_ttl=cache_ttl, dry_run=True).plan
    assert plan.objects_removed == [stray] and plan.actions_dropped == []


def reference_plan(remote: Remote, cache_ttl: float) -> tuple[list[str], list[str]]:
    """(objects removed, entries dropped) by the rules of docs/gc.md, in plain sets."""
    import time

    now = time.time()
    entries = {}
    for k in remote.list_actions():
        raw = remote.read(remote.layout.action_path(k))
        entries[k] = remote.trust(k, raw)[0]
    marked = remote_packs.markers(remote)
    for e in entries.values():
        if e is not None and e.created.timestamp() > now - cache_ttl:
            marked.update(e.outputs)
    listed = remote.list_oids()
    going = {o for o in listed if o not in marked}  # grace 0: every object is old enough
    named = {o for e in entries.values() if e is not None for o in e.outputs}
    bad = going | (named - listed)
    dropped = [k for k, e in entries.items() if e is None or any(o in bad for o in e.outputs)]
    return sorted(going), sorted(dropped)


@pytest.mark.parametrize("seed", range(3))
def test_plan_matches_the_rules_on_random_remotes(remote_url, seed):  # noqa: F811
    import random

    rng = random.Random(seed)
    remote = Remote(remote_url)
    packed: dict[str, bytes] = {}
    objects = [put_object(remote, f"object {seed} {i}") for i in range(40)]
    objects += [f"{i:062x}00" for i in range(5)]  # named, never written
    for i in range(120):
        k = key(rng.choice(["00", "7f", "ff"]), i)
        if rng.random() < 0.05:
            remote.write(remote.layout.action_path(k), b"[]")  # malformed
            continue
        outs = rng.sample(objects, rng.choice([0, 1, 1, 1, 2, 3]))
        raw = put_entry(remote, k, outs, age_days=rng.choice([0, 30]))
        if rng.random() < 0.6:  # packed as a push leaves it (S3 reads it from the pack)
            packed[k] = raw
        if rng.random() < 0.1:  # rewritten after the pack: the loose file wins
            put_entry(remote, k, rng.sample(objects, 1), age_days=rng.choice([0, 30]))
        if i % 40 == 39:
            remote_packs.write(remote, packed)
            packed = {}
    from_packs = [
        e for e in remote_packs.read_entries(remote).entries.values() if e and e.pack >= 0
    ]
    assert bool(from_packs) == (not remote.local)  # S3: most entries come from the packs
    plan = collect_remote(remote, grace=0, cache_ttl=7 * 86400, dry_run=True).plan
    assert (plan.objects_removed, plan.actions_dropped) == reference_plan(remote, 7 * 86400)


def test_progress_counts_what_gc_lists_and_removes(tmp_path):
    remote = Remote(str(tmp_path / "remote"))
    objects = [put_object(remote, f"object {i}") for i in range(5)]
    for i, oid in enumerate(objects[:3]):
        put_entry(remote, key("00", i), [oid])
    seen: dict[str, list[int]] = {}
    result = collect_remote(
        remote, grace=0, cache_ttl=0, progress=lambda what, n: seen.setdefault(what, []).append(n)
    )
    assert seen["entries listed"][-1] == 3 and seen["objects listed"][-1] == 5
    assert seen["entries dropped"][-1] == len(result.plan.actions_dropped) == 3
    assert seen["objects removed"][-1] == len(result.plan.objects_removed) == 5
    assert all(v == sorted(v) for v in seen.values())  # counts only grow


def test_merge_writes_bounded_packs_holding_every_entry_left(s3, monkeypatch):  # noqa: F811
    from tests.test_remote import use_server

    use_server(s3, monkeypatch)
    remote = Remote(s3.new_bucket())
    oid = put_object(remote, "kept by young entries")
    raw = {key("00", i): put_entry(remote, key("00", i), [oid], age_days=0) for i in range(7)}
    remote_packs.write(remote, raw)
    monkeypatch.setattr(remote_packs, "PACK_MAX", 3)
    collect_remote(remote, grace=0, cache_ttl=86400)
    assert len(remote_packs.markers(remote)) == 3  # 3 + 3 + 1
    assert packed(remote) == raw
    got = remote_packs.read_entries(remote).entries
    assert set(got) == set(raw) and all(e.pack >= 0 for e in got.values())


@pytest.mark.parametrize("policy", [["--keep-last", "1"], ["--older-than", "30d"]])
def test_run_policies_are_refused_with_remote_not_ignored(tmp_path, policy):
    from tests.conftest import cas_inproc

    r = cas_inproc("gc", "--remote", str(tmp_path / "remote"), *policy, cache_dir=tmp_path / "c")
    assert r.returncode == 2 and "apply to the local store" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_objects_listed_ahead_in_small_pages_give_the_same_plan(tmp_path, monkeypatch):
    """objects/ is listed by a thread while entries are read (remote_gc._ObjectPages):
    with pages of 3 and at most 2 pages ahead, the thread waits for the plan and the plan
    is the rules' plan."""
    from castore import remote_gc

    remote = Remote(str(tmp_path / "remote"))
    objects = [put_object(remote, f"object {i}") for i in range(20)]
    for i, oid in enumerate(objects[:12]):
        put_entry(remote, key("00", i), [oid], age_days=0 if i % 3 else 30)
    pages = remote.pages
    monkeypatch.setattr(remote, "pages", lambda kind: pages(kind, size=3))
    monkeypatch.setattr(remote_gc._ObjectPages, "AHEAD", 2)
    plan = collect_remote(remote, grace=0, cache_ttl=86400, dry_run=True).plan
    assert (plan.objects_removed, plan.actions_dropped) == reference_plan(remote, 86400)
    assert len(plan.objects_removed) == 12 and plan.objects_kept == 8


def test_a_failed_listing_of_objects_stops_the_gc_and_its_thread(tmp_path, monkeypatch):
    import threading

    from castore.errors import RemoteUnavailable
    from castore.store import layout as L

    remote = Remote(str(tmp_path / "remote"))
    for i in range(7):
        put_entry(remote, key("00", i), [put_object(remote, f"object {i}")])
    pages = remote.pages

    def failing(kind: str):
        if kind != L.OBJECTS:
            yield from pages(kind)
            return
        yield from pages(kind, size=2)
        raise RemoteUnavailable("cannot list the test's remote: the link went down")

    monkeypatch.setattr(remote, "pages", failing)
    with pytest.raises(RemoteUnavailable, match="link went down"):
        collect_remote(remote, grace=0, cache_ttl=0)
    assert remote.list_oids() and remote.list_actions()  # nothing removed
    assert not [t for t in threading.enumerate() if t.name == "castore-gc-list"]


def test_a_failed_read_of_entries_stops_the_listing_thread(tmp_path, monkeypatch):
    import threading

    from castore.errors import RemoteUnavailable

    remote = Remote(str(tmp_path / "remote"))
    for i in range(30):
        put_object(remote, f"object {i}")
    pages = remote.pages
    monkeypatch.setattr(remote, "pages", lambda kind: pages(kind, size=1))

    def fail(*_a, **_k):
        raise RemoteUnavailable("cannot read entries: the link went down")

    monkeypatch.setattr(remote_packs, "read_entries", fail)
    with pytest.raises(RemoteUnavailable, match="link went down"):
        collect_remote(remote, grace=0, cache_ttl=0)
    assert not [t for t in threading.enumerate() if t.name == "castore-gc-list"]
    assert len(remote.list_oids()) == 30


def test_packs_are_read_in_order_and_a_damaged_one_is_read_around(s3, monkeypatch, caplog):  # noqa: F811
    """Packs are fetched a few at a time (remote_packs._fetched): every entry is found,
    each from its pack, except those of a damaged pack, which are read from their files."""
    from tests.test_remote import use_server

    use_server(s3, monkeypatch)
    remote = Remote(s3.new_bucket())
    oid = put_object(remote, "named by every entry")
    raw = {key("00", i): put_entry(remote, key("00", i), [oid]) for i in range(20)}
    keys = sorted(raw)
    packs = [
        remote_packs.write(remote, {k: raw[k] for k in keys[i : i + 4]}) for i in range(0, 20, 4)
    ]
    damaged = packs[2]
    remote.write(remote.layout.object_path(damaged), b"not the pack any more")
    got = remote_packs.read_entries(remote).entries
    assert set(got) == set(raw)
    from_files = {k for k, e in got.items() if e.pack < 0}
    assert from_files == set(keys[8:12])  # the damaged pack's entries
    assert damaged[:12] in caplog.text and "unreadable" in caplog.text


@pytest.mark.parametrize("n", [0, 1, 2, 7, 64, 1000])
def test_sorted_ids_find_what_a_sorted_copy_finds(n):
    """remote_gc._Sorted keeps 4-byte places instead of a sorted copy of the ids and searches
    them itself: the same places and hits as numpy's searchsorted over the sorted copy, with
    ids named twice, ids ending in zero bytes, ids sharing long prefixes, masked-out ids."""
    import random

    import numpy as np

    from castore.remote_gc import _Sorted

    rng = random.Random(n)
    pool = [
        bytes([rng.choice([0, 1, 255])] * 16 + [rng.randrange(256) for _ in range(14)])
        + bytes([rng.choice([0, 0, 7]), 0])
        for _ in range(max(n, 1))
    ]
    base = np.array([rng.choice(pool) for _ in range(n)], dtype=remote_packs.ID)
    mask = np.array([rng.random() < 0.7 for _ in range(n)], dtype=np.bool_)
    want = np.array(
        [*pool, *(bytes([rng.randrange(256) for _ in range(32)]) for _ in range(50))],
        dtype=remote_packs.ID,
    )
    for m in (None, mask):
        held = base if m is None else base[m]
        copy = np.sort(held)
        ids = _Sorted(base, m)
        assert len(ids) == len(held)
        at, hit = ids.find(want)
        expect_hit = np.isin(want, held)
        assert hit.tolist() == expect_hit.tolist()
        assert at.tolist() == np.searchsorted(copy, want[expect_hit]).tolist()
        # A place is where that id is in sorted order: its first place.
        assert [ids._at(np.array([a]))[0] for a in at.tolist()] == want[hit].tolist()


def test_gc_fixes_glibc_mmap_threshold_in_a_process_of_its_own(tmp_path):
    """collect_remote fixes glibc's mmap threshold (fewer bytes per entry kept by the heap);
    where the C library is glibc the call is accepted, elsewhere nothing changes, and a gc
    runs after it either way."""
    import platform
    import subprocess
    import sys

    code = (
        "import sys\nfrom castore.remote import Remote\n"
        "from castore.remote_gc import collect_remote, fix_mmap_threshold\n"
        "print(fix_mmap_threshold())\n"
        "r = collect_remote(Remote(sys.argv[1]), dry_run=True)\n"
        "print(len(r.plan.objects_removed))\n"
    )
    remote = Remote(str(tmp_path / "remote"))
    put_object(remote, "stray")
    out = subprocess.run(
        [sys.executable, "-c", code, remote.url], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[0] == str(platform.libc_ver()[0] == "glibc")
    assert out[1] == "0"  # the stray object is younger than the grace period
