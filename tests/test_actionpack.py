"""Entry packs (castore/store/actionpack.py): a finished run's action entries move into
one object; lookups, drops, gc and fsck see them as before."""

from __future__ import annotations

import os

from castore import Pipeline, StepInput, step
from castore.steps import LoadDataFromDicts
from castore.store import Store, actionpack
from tests.conftest import cas_inproc

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
