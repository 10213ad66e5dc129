from __future__ import annotations

import os
import time

import pytest

from castore import gc
from castore.du import usage
from castore.errors import ConfigError, StoreLocked
from castore.runs import list_runs
from castore.store.manifests import run_closure
from tests.conftest import REPO, cas_inproc
from tests.pipelines.shared import make
from tests.test_pipeline import build, counts

SHARED = REPO / "tests" / "pipelines" / "shared.py"


def closure_of_refs(store) -> set[str]:
    out: set[str] = set()
    for _, _, oid in store.list_refs():
        out |= run_closure(store, oid)[1]
    return out


def populate(store):
    """Three pipelines: a and b share their first steps; p is separate."""
    for p in (make("shared-a", "a"), make("shared-b", "b"), build()):
        p.run(cache_dir=store.root, quiet=True)


def test_gc_keeps_exactly_the_reachable(store):
    populate(store)
    b = next(r for r in list_runs(store) if r.name == "shared-b")
    store.delete_ref(b.name, b.sig)
    stray = store.put_bytes(b"nobody references me")
    (store.root / "tmp" / "stage-leftover").write_bytes(b"half an object")
    expected = closure_of_refs(store)
    result = gc.collect(store, grace=0, cache_ttl=0)
    # And the entry pack holding the entries that stay (entries are a cache of the runs).
    from castore.store import actionpack

    packs = actionpack.markers(store)
    assert len(packs) <= 1
    assert set(store.iter_oids()) == expected | packs
    assert stray in result.plan.objects_removed
    for key in store.iter_actions():  # every surviving entry is whole
        assert all(store.has(o) for o in store.get_action(key).outputs)
    assert os.listdir(store.root / "tmp") == []
    assert not (store.root / "runs" / "shared-b").exists()
    assert cas_inproc("fsck", cache_dir=store.root).returncode == 0


def test_grace_and_cache_ttl_protect(store):
    populate(store)
    for name, sig, _ in store.list_refs():
        store.delete_ref(name, sig)
    before = set(store.iter_oids())
    from castore.store import actionpack

    packs_before = actionpack.markers(store)
    assert gc.collect(store).plan.objects_removed == []  # all younger than 1 h
    kept = gc.collect(store, grace=0).plan  # entries younger than 7 d keep their objects
    entry_objects = {o for k in store.iter_actions() for o in store.get_action(k).outputs}
    assert entry_objects and entry_objects <= set(store.iter_oids())
    # Entry packs are the entries' container: kept with them (the first gc merged the
    # runs' packs into one and deleted those it replaced).
    packs = packs_before | actionpack.markers(store)
    assert set(kept.objects_removed) == before - entry_objects - packs


def test_rerun_after_gc(store):
    populate(store)
    b = next(r for r in list_runs(store) if r.name == "shared-b")
    p = next(r for r in list_runs(store) if r.name == "p")
    store.delete_ref(b.name, b.sig)
    store.delete_ref(p.name, p.sig)
    gc.collect(store, grace=0, cache_ttl=0)
    kept = make("shared-a", "a").run(cache_dir=store.root, quiet=True)
    assert all(counts(kept, s)[1] == 0 for s in kept.run.stats)
    # shared-b's first two steps are shared with the kept shared-a: only label is redone.
    again = make("shared-b", "b").run(cache_dir=store.root, quiet=True)
    assert counts(again, "embed")[1] == 0 and counts(again, "load_data_from_dicts")[1] == 0
    assert counts(again, "label")[0] == 0 and counts(again, "label")[1] > 0
    redo = build().run(cache_dir=store.root, quiet=True)
    assert all(counts(redo, s)[0] == 0 for s in redo.run.stats)


def test_keep_last_and_older_than(store):
    for prefix in ("x", "y", "z"):
        make("many", prefix).run(cache_dir=store.root, quiet=True)
        time.sleep(0.01)
    newest = list_runs(store)[0]
    plan = gc.plan_gc(store, keep_last=1)
    assert len(plan.refs_removed) == 2 and (newest.name, newest.sig) not in plan.refs_removed
    assert gc.plan_gc(store, older_than=3600).refs_removed == []
    future = time.time() + 7200
    assert len(gc.plan_gc(store, older_than=3600, now=future).refs_removed) == 3
    r = cas_inproc(
        "gc", "--keep-last", "1", "--yes", "--grace", "0", "--json", cache_dir=store.root
    )
    assert r.returncode == 0, r
    assert len(r.json()["refs_removed"]) == 2
    assert [x.sig for x in list_runs(store)] == [newest.sig]
    # The dropped runs' folders went with them (they were left for the next gc).
    assert sorted(os.listdir(store.root / "runs" / "many")) == [newest.sig]
    assert len(r.json()["run_dirs_removed"]) == 2
    r = cas_inproc("gc", "--older-than", "0s", "--json", cache_dir=store.root)
    assert r.returncode == 0 and len(r.json()["refs_removed"]) == 1
    assert list_runs(store) == []


def test_dry_run_changes_nothing_and_reports_bytes(store):
    populate(store)
    for name, sig, _ in store.list_refs():
        store.delete_ref(name, sig)
    before = sorted(store.iter_oids())
    r = cas_inproc(
        "gc", "--dry-run", "--grace", "0", "--cache-ttl", "0", "--json", cache_dir=store.root
    )
    assert r.returncode == 0, r
    doc = r.json()
    assert sorted(store.iter_oids()) == before
    assert set(doc["objects_removed"]) == set(before)
    assert doc["bytes_freed"] == sum(store.size_of(o) for o in before)
    r = cas_inproc("gc", "--grace", "0", "--cache-ttl", "0", cache_dir=store.root)
    assert r.returncode == 0 and "removed" in r.stderr
    assert list(store.iter_oids()) == []


def test_rm_and_rm_all(store):
    for prefix in ("x", "y"):
        make("many", prefix).run(cache_dir=store.root, quiet=True)
    build().run(cache_dir=store.root, quiet=True)
    r = cas_inproc("rm", "p", "--json", cache_dir=store.root)
    assert r.returncode == 0 and len(r.json()["removed"]) == 1
    r = cas_inproc("rm", "many", "--all", cache_dir=store.root)
    assert r.returncode == 0 and r.stdout.count("removed") == 2
    assert store.list_refs() == []
    r = cas_inproc("rm", "ghost", cache_dir=store.root)
    assert r.returncode != 0 and "no run named" in r.stderr


def test_du_matches_a_recount(store):
    populate(store)
    rep = usage(store)
    sizes = {o: os.path.getsize(store.path_of(o)) for o in store.iter_oids()}
    assert rep.physical == sum(sizes.values())
    closures = {}
    for name, sig, oid in store.list_refs():
        closures[f"{name}/{sig[:12]}"] = run_closure(store, oid)[1]
    for label, objs in closures.items():
        assert rep.runs[label]["logical"] == sum(sizes[o] for o in objs)
        others = set().union(*(c for k, c in closures.items() if k != label))
        assert rep.runs[label]["unique"] == sum(sizes[o] for o in objs - others)
    logical = sum(sum(sizes[o] for o in c) for c in closures.values())
    referenced = sum(sizes[o] for o in set().union(*closures.values()))
    assert rep.saved_by_dedupe == logical - referenced > 0  # a and b share batches
    r = cas_inproc("du", "--json", cache_dir=store.root)
    assert r.returncode == 0 and r.json()["saved_by_dedupe"] == rep.saved_by_dedupe


def test_gc_refuses_while_another_gc_holds_the_lock(store):
    lock = store.gc_lock()
    lock.acquire()
    try:
        with pytest.raises(StoreLocked, match="held by pid"):
            gc.collect(store)
        r = cas_inproc("gc", cache_dir=store.root)
        assert r.returncode == 11 and "gc lock" in r.stderr
    finally:
        lock.release()


def test_parse_duration():
    assert gc.parse_duration("90s") == 90 and gc.parse_duration("2h") == 7200
    assert gc.parse_duration("30d") == 30 * 86400 and gc.parse_duration("0") == 0
    with pytest.raises(ConfigError, match="give a number and a unit"):
        gc.parse_duration("3")  # seconds or days? never guessed
    with pytest.raises(ConfigError):
        gc.parse_duration("soon")


def test_object_freshened_after_the_plan_is_not_swept(store):
    populate(store)
    for name, sig, _ in store.list_refs():
        store.delete_ref(name, sig)
    old = time.time() - 7200
    for oid in store.iter_oids():
        os.utime(store.path_of(oid), (old, old))
    plan = gc.plan_gc(store, grace=3600, cache_ttl=0)
    reused = plan.objects_removed[0]
    assert store.freshen(reused)  # a run hits the cache between plan and sweep
    gc._sweep(store, plan, None)
    assert store.has(reused)
    assert not store.has(plan.objects_removed[1])


def test_collect_sweeps_the_confirmed_plan_and_spares_a_moved_ref(store):
    """`cas gc --keep-last` asks, then sweeps what was confirmed: a run made after the
    question is not dropped, and a ref that a newer run moved meanwhile stays."""
    for prefix in ("x", "y"):
        make("many", prefix).run(cache_dir=store.root, quiet=True)
        time.sleep(0.01)
    plan = gc.plan_gc(store, keep_last=1)
    ((name, sig),) = plan.refs_removed
    old = next(r for r in list_runs(store) if r.sig == sig)
    # After the prompt: the dropped pipeline runs again (its ref moves to a new manifest)
    # and a third run appears; a fresh plan would now drop other runs.
    again = make("many", "x")
    assert again.signature() == sig  # the older run, which the plan drops
    again.run(cache_dir=store.root, quiet=True)
    make("many", "z").run(cache_dir=store.root, quiet=True)
    moved = store.get_ref(name, sig)
    assert moved != old.oid
    result = gc.collect(store, plan=plan, grace=0)
    assert result.plan is plan
    assert store.get_ref(name, sig) == moved  # the moved ref was not removed
    assert len(list_runs(store)) == 3
    assert f"{name}/{sig}" in plan.run_dirs_removed  # planned with its ref, and kept with it
    assert (store.root / "runs" / name / sig / "data").is_dir()


def test_sweep_spares_the_folder_of_a_run_started_since_the_plan(store):
    """A folder planned to go with its dropped ref stays when a run of that pipeline holds
    its lock by the sweep (it started after `cas gc --keep-last` asked)."""
    for prefix in ("x", "y"):
        make("many", prefix).run(cache_dir=store.root, quiet=True)
        time.sleep(0.01)
    plan = gc.plan_gc(store, keep_last=1)
    ((name, sig),) = plan.refs_removed
    assert plan.run_dirs_removed == [f"{name}/{sig}"]
    lock = store.run_lock("started-since", {"name": name, "sig": sig})
    lock.acquire()
    try:
        gc.collect(store, plan=plan, grace=0)
    finally:
        lock.release()
    assert store.get_ref(name, sig) is None  # the ref went, as planned
    assert (store.root / "runs" / name / sig).is_dir()  # the live run's folder stayed


def test_gc_says_what_it_kept_and_why(store):
    """A removed run whose objects are young frees nothing: gc says why and how to free
    them now, and the counts add up."""
    populate(store)
    for name, sig, _ in store.list_refs():
        store.delete_ref(name, sig)
    total = len(list(store.iter_oids()))
    from castore.store import actionpack

    data = set(store.iter_oids()) - actionpack.markers(store)
    r = cas_inproc("gc", "--dry-run", "--json", cache_dir=store.root)
    doc = r.json()
    assert doc["objects_removed"] == [] and doc["kept_by_runs"] == 0
    assert doc["kept_by_cache_ttl"] + doc["kept_by_grace"] == doc["objects_kept"] == total
    assert doc["kept_by_cache_ttl"] > 0 and doc["kept_by_grace"] > 0
    r = cas_inproc("gc", cache_dir=store.root)
    assert "younger than --cache-ttl 7d" in r.stderr and "younger than --grace 1h" in r.stderr
    assert "cas gc --cache-ttl 0 --grace 0" in r.stderr
    # Nothing freed but the runs' entry packs, merged into one.
    assert set(store.iter_oids()) - actionpack.markers(store) == data
    populate(store)  # a kept run: its objects are named by runs
    doc = cas_inproc("gc", "--dry-run", "--json", cache_dir=store.root).json()
    assert doc["kept_by_runs"] > 0
