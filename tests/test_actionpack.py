"""Entry packs (castore/store/actionpack.py): a finished run's action entries move into
one object; lookups, drops, gc and fsck see them as before."""

from __future__ import annotations

import os
import secrets
import time

from castore import Pipeline, StepInput, step
from castore.steps import LoadDataFromDicts
from castore.store import Store, actionpack
from tests.conftest import cas_inproc, store_calls

CALLS: list[int] = []


@step(inputs=["x"], outputs=["y"])
def Double(inputs: StepInput):
    CALLS.append(len(inputs))
    return [{**r, "y": 2 * r["x"]} for r in inputs]


def pipe(name: str = "packed", n: int = 200) -> Pipeline:
    with Pipeline(name=name) as p:
        LoadDataFromDicts(data=[{"x": i} for i in range(n)], batch_size=10) >> Double(
            name="double", input_batch_size=10
        )
    return p


def loose(store: Store) -> list[str]:
    return [k for k in store._iter_sharded("actions")]


def test_a_finished_run_packs_its_entries_and_a_rerun_finds_them(tmp_path):
    cache = tmp_path / "c"
    pipe().execute(cache_dir=cache, quiet=True)
    store = Store(cache)
    (pack,) = actionpack.markers(store)
    # 20 loader + 20 step batches, and the loader's end marker.
    assert len(actionpack.pack_keys(store, pack)) == 41
    assert loose(store) == []  # every loose entry file went into the pack
    keys = list(store.iter_actions())
    assert len(keys) == 41 and all(store.get_action(k) is not None for k in keys)
    CALLS.clear()
    # Another pipeline name, so no replay: every batch is looked up, found in the pack.
    pipe("other-name").execute(cache_dir=cache, quiet=True)
    assert CALLS == []
    assert cas_inproc("fsck", cache_dir=cache).returncode == 0


def test_a_new_pack_is_found_by_a_store_that_looked_before(tmp_path):
    """A concurrent run's lookups: the loose file is gone once packed, the pack is found
    because its marker is written first and a miss looks at the markers again."""
    cache = tmp_path / "c"
    reader = Store(cache)
    assert reader.get_action("ab" * 32) is None  # packs loaded (none yet)
    pipe().execute(cache_dir=cache, quiet=True)
    key = next(iter(actionpack.pack_keys(Store(cache), next(iter(actionpack.markers(reader))))))
    assert reader.get_action(key) is not None


def test_dropping_a_packed_entry_and_gc_repack(tmp_path):
    cache = tmp_path / "c"
    pipe().execute(cache_dir=cache, quiet=True)
    store = Store(cache)
    (pack,) = actionpack.markers(store)
    victim = sorted(actionpack.pack_keys(store, pack))[0]
    store.delete_action(victim)  # e.g. its output failed verification
    assert store.get_action(victim) is None
    assert victim not in set(store.iter_actions())
    assert loose(store) == [victim]  # the tombstone
    r = cas_inproc("gc", cache_dir=cache)
    assert r.returncode == 0, r
    (new,) = actionpack.markers(store)
    assert new != pack and not store.has(pack)  # replaced, and the old one deleted
    assert victim not in actionpack.pack_keys(store, new)
    assert loose(store) == []  # the tombstone went with the packed entry
    assert len(list(store.iter_actions())) == 40
    assert cas_inproc("fsck", cache_dir=cache).returncode == 0


def test_a_corrupt_pack_costs_recomputation_never_wrong_rows(tmp_path):
    cache = tmp_path / "c"
    first = pipe().run(cache_dir=cache, quiet=True)["double"]["train"].to_list()
    store = Store(cache)
    (pack,) = actionpack.markers(store)
    path = store.path_of(pack)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff\xff\xff")
    CALLS.clear()
    again = pipe("other-name").run(cache_dir=cache, quiet=True)["double"]["train"].to_list()
    assert again == first
    assert sum(CALLS) == 200  # every entry unreadable: recomputed, not guessed
    assert not store.has(pack)  # quarantined


def test_small_runs_leave_their_entries_loose(tmp_path):
    cache = tmp_path / "c"
    pipe(n=40).execute(cache_dir=cache, quiet=True)  # 8 computed batches < PACK_AFTER
    store = Store(cache)
    assert actionpack.markers(store) == set() and len(loose(store)) == 9  # and the end


def _runs(cache, sizes) -> list[list[dict]]:
    return [pipe(n=n).run(cache_dir=cache, quiet=True)["double"]["train"].to_list() for n in sizes]


def test_a_miss_costs_no_listing_once_the_packs_folder_is_settled(tmp_path, monkeypatch):
    """A miss used to list the markers' folder and search every pack in turn (540 us per
    miss with 300 packs); now a stat shows nothing changed, and a pack written later is
    still found."""
    cache = tmp_path / "c"
    _runs(cache, (200, 210, 220))
    before = actionpack.markers(Store(cache))
    assert len(before) == 3
    # The folder's last change is older than the window a same-tick change could hide in.
    monkeypatch.setattr(actionpack, "_now_ns", lambda: time.time_ns() + 10**10)
    listed: list[str] = []
    real = actionpack._names
    monkeypatch.setattr(actionpack, "_names", lambda d: listed.append(d) or real(d))
    reader = Store(cache)
    assert all(reader.get_action(secrets.token_hex(32)) is None for _ in range(50))
    assert len(listed) == 1
    # Every packed entry is found through the one sorted list of keys.
    for oid in before:
        for key in actionpack.pack_keys(reader, oid):
            assert reader.get_action(key) is not None
    _runs(cache, (230,))  # another run's pack, after the reader looked
    (new,) = actionpack.markers(Store(cache)) - before
    key = next(iter(actionpack.pack_keys(Store(cache), new)))
    assert reader.get_action(key) is not None


def test_a_runs_end_merges_many_packs_into_one(tmp_path, monkeypatch):
    monkeypatch.setattr(actionpack, "MERGE_AT", 2)
    cache = tmp_path / "c"
    first = _runs(cache, (200, 210))
    store = Store(cache)
    two = actionpack.markers(store)
    assert len(two) == 2
    old = set().union(*(actionpack.pack_keys(store, oid) for oid in two))
    first += _runs(cache, (220,))  # three packs: merged at this run's end
    (merged,) = actionpack.markers(store)
    assert merged not in two
    keys = actionpack.pack_keys(store, merged)
    # The third run computed 22 loader batches, its end marker and one batch of double
    # (its first 21 batches hit: the loader's first 21 batches are the same objects).
    assert old < keys and len(keys - old) == 24
    # Another pipeline name: no replay, every batch looked up (in the merged pack).
    CALLS.clear()
    again = [
        pipe(f"again-{n}", n=n).run(cache_dir=cache, quiet=True)["double"]["train"].to_list()
        for n in (200, 210, 220)
    ]
    assert again == first and sum(CALLS) == 0
    assert cas_inproc("fsck", cache_dir=cache).returncode == 0
    assert cas_inproc("gc", "--grace", "0s", cache_dir=cache).returncode == 0
    assert not any(store.has(oid) for oid in two)  # no marker names them: collected
    CALLS.clear()
    after = pipe("after-gc", n=210).run(cache_dir=cache, quiet=True)["double"]["train"]
    assert after.to_list() == first[1]
    assert sum(CALLS) == 0


def test_a_merge_that_fails_leaves_the_packs_and_the_run_finished(tmp_path, monkeypatch, caplog):
    """Merging is an optimization: a full disk while merging warns, and the run, its
    own pack and every lookup are as without it."""
    monkeypatch.setattr(actionpack, "MERGE_AT", 1)
    real = actionpack.merge

    def full(store):
        raise OSError(28, "No space left on device")

    cache = tmp_path / "c"
    first = _runs(cache, (200,))
    monkeypatch.setattr(actionpack, "merge", full)
    first += _runs(cache, (210,))
    assert "entry packs not merged: [Errno 28] No space left on device" in caplog.text
    store = Store(cache)
    assert len(actionpack.markers(store)) == 2
    monkeypatch.setattr(actionpack, "merge", real)
    CALLS.clear()
    again = [
        pipe(f"again-{n}", n=n).run(cache_dir=cache, quiet=True)["double"]["train"]
        for n in (200, 210)
    ]
    assert [t.to_list() for t in again] == first and sum(CALLS) == 0
    assert len(actionpack.markers(store)) == 1  # merged at the next run's end


def test_an_entry_dropped_before_a_merge_stays_dropped(tmp_path):
    """A merge takes tombstoned entries as they are; their tombstones still shadow them,
    and gc's repack then removes both."""
    cache = tmp_path / "c"
    _runs(cache, (200, 210))
    store = Store(cache)
    victim = sorted(actionpack.pack_keys(store, min(actionpack.markers(store))))[0]
    store.delete_action(victim)  # e.g. its output failed verification
    assert len(actionpack.merge(store)) == 2
    (merged,) = actionpack.markers(store)
    assert victim in actionpack.pack_keys(store, merged)
    assert Store(cache).get_action(victim) is None and victim in loose(store)  # its tombstone
    assert cas_inproc("gc", cache_dir=cache).returncode == 0
    (repacked,) = actionpack.markers(store)
    assert victim not in actionpack.pack_keys(store, repacked) and victim not in loose(store)


def test_a_pack_is_read_once_per_process_while_its_file_is_unchanged(tmp_path, monkeypatch):
    """Run after run in one process (a notebook) reads and verifies each pack once; a
    pack changed on disk since (here: damaged) is read and verified again: quarantined,
    its entries misses."""
    cache = tmp_path / "c"
    _runs(cache, (200,))
    (pack,) = actionpack.markers(Store(cache))
    key = sorted(actionpack.pack_keys(Store(cache), pack))[0]
    reads = store_calls(monkeypatch, "get_bytes")
    assert all(Store(cache).get_action(key) is not None for _ in range(3))
    assert reads.count(pack) == 0  # pack_keys above read and verified it
    path = Store(cache).path_of(pack)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff\xff\xff")
    assert Store(cache).get_action(key) is None
    assert reads.count(pack) == 1 and not Store(cache).has(pack)  # quarantined
