"""Run journals (castore/store/journal.py): a run alone appends its action entries to one
file instead of a file each, closes it before another run may read it, and folds it into
a pack (or loose files) at its end; a journal left by a killed run is read by the next
run and folded when that one ends. A torn last line is not an entry."""

from __future__ import annotations

import os
import signal

import pytest

from castore import Pipeline, StepInput, step
from castore.pipeline import neighbours
from castore.pipeline.neighbours import Neighbours
from castore.steps import LoadDataFromDicts
from castore.store import Store, actionpack
from castore.store.journal import JournalWriter, journal_dir
from castore.store.models import ActionEntry
from tests.conftest import run_cas
from tests.scenario import SLOW_BATCHES, start, wait_for

SEEN: dict[str, object] = {}


@step(inputs=["x"], outputs=["y"])
def Look(inputs: StepInput, cache: str = ""):
    """At x == 60, records what the store holds mid-run."""
    if inputs[0]["x"] == 60:
        folder = os.path.join(cache, "actions", "journal")
        SEEN["journals"] = os.listdir(folder) if os.path.isdir(folder) else []
        SEEN["loose"] = sum(
            len(os.listdir(os.path.join(cache, "actions", d)))
            for d in os.listdir(os.path.join(cache, "actions"))
            if len(d) == 2
        )
    return [{**r, "y": r["x"] * 3} for r in inputs]


def pipe(cache) -> Pipeline:
    with Pipeline(name="journal") as p:
        LoadDataFromDicts(data=[{"x": i} for i in range(100)], batch_size=10) >> Look(
            input_batch_size=5, cache=str(cache)
        )
    return p


def entry(store: Store) -> ActionEntry:
    oid = store.put_bytes(b"an output")
    return ActionEntry(outputs=[oid], rows=[1])


def test_a_lone_run_journals_its_entries_and_folds_them_at_its_end(tmp_path):
    cache = tmp_path / "c"
    SEEN.clear()
    ds = pipe(cache).run(cache_dir=cache, quiet=True)
    assert len(SEEN["journals"]) == 1 and SEEN["loose"] == 0  # mid-run: one journal
    assert os.listdir(cache / "actions" / "journal") == []  # folded at the end
    assert actionpack.markers(Store(cache))  # into a pack (30 entries)
    store = Store(cache)
    for name, sig, _ in store.list_refs():
        store.delete_ref(name, sig)  # no replay: every batch is looked up
    again = pipe(cache).run(cache_dir=cache, quiet=True)
    assert again.run.stats["look"].batches_computed == 0
    assert again["look"]["train"]["y"] == ds["look"]["train"]["y"]


def test_torn_tail_and_garbage_lines_are_not_entries(tmp_path):
    store = Store(tmp_path / "c")
    e = entry(store)
    good, torn = "a" * 64, "b" * 64
    folder = journal_dir(store)
    os.makedirs(folder)
    with open(os.path.join(folder, "dead-run"), "wb") as f:
        f.write(f"{good} {e.model_dump_json()}\n".encode())
        f.write(b"not a key {}\n")
        f.write(f"{torn} {e.model_dump_json()}".encode()[:-5])  # killed mid-append
    fresh = Store(store.root)
    assert fresh.get_action(good) == e
    assert fresh.read_action(torn) is None
    assert sorted(fresh.iter_actions()) == [good]
    actionpack.pack_run(fresh, None)  # the dead run's journal becomes loose files
    assert os.listdir(folder) == []
    assert Store(store.root).get_action(good) == e


def test_a_tombstone_shadows_a_journaled_entry_and_is_not_folded(tmp_path):
    store = Store(tmp_path / "c")
    store.journal = JournalWriter(store, "run-1")
    key = "c" * 64
    store.put_action(key, entry(store))
    assert not os.path.exists(store.layout.action_path(key))  # appended, not a file
    store.delete_action(key)
    assert store.read_action(key) is None
    actionpack.pack_run(store, "run-1")
    assert store.journal is None
    assert Store(store.root).read_action(key) is None


def test_a_newcomer_reads_the_journal_closed_before_shared(tmp_path, monkeypatch):
    monkeypatch.setattr(neighbours, "STAT_EVERY", 0.0)  # the next turn looks
    store = Store(tmp_path / "c")
    first = store.run_lock("first", {})
    first.acquire()
    alone = Neighbours(store, first)
    early, mid, late = "d" * 64, "e" * 64, "f" * 64
    store.put_action(early, entry(store))
    assert store.journal is not None and not os.path.exists(store.layout.action_path(early))

    theirs = Store(store.root)
    second = theirs.run_lock("second", {})
    second.acquire()
    newcomer = Neighbours(theirs, second)
    assert theirs.journal is None  # not alone: loose entries
    assert theirs.read_action(early) is not None  # its lookups so far read the journal
    assert not newcomer.may_compute()  # the first run may be computing unleased
    store.put_action(mid, entry(store))  # before the first run noticed
    # The first run's next turn: it closes its journal, then says "shared".
    assert alone.need_leases(lambda: None)
    assert store.journal is None
    store.put_action(late, entry(store))
    assert os.path.exists(store.layout.action_path(late))  # loose from now on
    assert newcomer.may_compute()  # and it reads the journals again
    assert all(theirs.read_action(k) is not None for k in (early, mid, late))
    second.release()
    first.release()


@pytest.mark.slow
def test_kill_9_leaves_a_journal_the_next_run_reads_and_folds(tmp_path):
    cache, calls = tmp_path / "cache", tmp_path / "calls.txt"
    proc = start(cache, calls)
    wait_for(cache, 12, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    journals = os.listdir(cache / "actions" / "journal")
    assert len(journals) == 1
    env = {"CASTORE_TEST_CALLS": str(calls)}
    r = run_cas("resume", "slow", "--json", cache_dir=cache, env=env)
    assert r.returncode == 0, r
    assert os.listdir(cache / "actions" / "journal") == []  # folded by the run that ended
    computed = len(calls.read_text().splitlines())
    assert SLOW_BATCHES <= computed <= SLOW_BATCHES + 2, computed
