"""Leases only while another live run shares the store (castore/pipeline/neighbours.py):
a run alone takes none; a newcomer waits until the runs already there lease what they
compute; a run that finds a newcomer leases its batches in flight first."""

from __future__ import annotations

from castore import Pipeline, StepInput, step
from castore.pipeline import neighbours as nb
from castore.pipeline.neighbours import Neighbours
from castore.steps import LoadDataFromDicts
from castore.store import Store
from castore.store.locks import read_lock


@step(inputs=["x"], outputs=["y"])
def AddOne(inputs: StepInput):
    return [{**r, "y": r["x"] + 1} for r in inputs]


def pipe() -> Pipeline:
    with Pipeline(name="alone") as p:
        LoadDataFromDicts(data=[{"x": i} for i in range(40)], batch_size=10) >> AddOne(
            name="add", input_batch_size=5
        )
    return p


def test_a_run_alone_takes_no_lease(tmp_path, monkeypatch):
    taken = []
    real = Store.lease
    monkeypatch.setattr(
        Store, "lease", lambda self, *a, **k: taken.append(a) or real(self, *a, **k)
    )
    pipe().execute(cache_dir=tmp_path / "c", quiet=True)
    assert taken == []
    ds = pipe().run(cache_dir=tmp_path / "d", quiet=True)
    assert ds["add"]["train"]["y"] == [i + 1 for i in range(40)]


def _run_lock(store: Store, run_id: str, **detail):
    lock = store.run_lock(run_id, detail)
    lock.acquire()
    return lock


def test_a_newcomer_waits_until_the_others_lease(tmp_path):
    store = Store(tmp_path / "c")
    first = _run_lock(store, "first")
    Neighbours(store, first)  # alone when it looked
    assert read_lock(first.path).detail["leases"] == nb.ALONE
    second = _run_lock(store, "second")
    newcomer = Neighbours(store, second)
    assert newcomer.shared and read_lock(second.path).detail["leases"] == nb.SHARED
    assert not newcomer.may_compute()  # first is alone: it may be computing unleased
    first.update_detail(leases=nb.SHARED)
    assert newcomer.may_compute()
    first.release()
    second.release()


def test_done_and_older_castores_are_not_waited_for(tmp_path):
    store = Store(tmp_path / "c")
    finishing = _run_lock(store, "finishing", leases=nb.DONE)
    older = _run_lock(store, "older")  # no `leases`: a castore that always leases
    newcomer = Neighbours(store, _run_lock(store, "new"))
    assert newcomer.shared and newcomer.may_compute()
    finishing.release()
    older.release()


def test_a_lone_run_leases_its_batches_in_flight_when_one_arrives(tmp_path, monkeypatch):
    monkeypatch.setattr(nb, "STAT_EVERY", 0.0)  # every turn looks (the throttle: below)
    store = Store(tmp_path / "c")
    lone = _run_lock(store, "lone")
    n = Neighbours(store, lone)
    taken: list[str] = []
    assert n.need_leases(lambda: taken.append("x")) is False
    arrival = _run_lock(store, "arrival")
    # The folder changed, so the next turn looks (no need to wait RESCAN_EVERY).
    assert n.need_leases(lambda: taken.append("in flight")) is True
    assert taken == ["in flight"]
    assert read_lock(lone.path).detail["leases"] == nb.SHARED
    arrival.release()
    # Once shared, stays shared: a newcomer may have read "shared" already.
    assert n.need_leases(lambda: taken.append("again")) is True and taken == ["in flight"]
    lone.release()


def test_a_lone_run_looks_for_newcomers_at_most_every_stat_every(tmp_path, monkeypatch):
    """Not a syscall per batch submitted; a newcomer is noticed on the first turn after
    STAT_EVERY, and computes nothing before (it waits for this run's "shared")."""
    clock = [1000.0]
    monkeypatch.setattr(nb.time, "monotonic", lambda: clock[0])
    store = Store(tmp_path / "c")
    lone = _run_lock(store, "lone")
    n = Neighbours(store, lone)
    arrival = _run_lock(store, "arrival")
    newcomer = Neighbours(Store(store.root), arrival)
    taken: list[str] = []
    clock[0] += nb.STAT_EVERY / 2
    assert n.need_leases(lambda: taken.append("in flight")) is False and taken == []
    assert not newcomer.may_compute()
    clock[0] += nb.STAT_EVERY
    assert n.need_leases(lambda: taken.append("in flight")) is True
    assert taken == ["in flight"] and read_lock(lone.path).detail["leases"] == nb.SHARED
    assert newcomer.may_compute()
    arrival.release()
    lone.release()


def test_a_dead_runs_lock_file_is_not_a_neighbour(tmp_path):
    store = Store(tmp_path / "c")
    dead = _run_lock(store, "dead")
    path = dead.path
    # Released without unlinking: what a kill -9 leaves.
    import fcntl
    import os

    fcntl.flock(dead._fd, fcntl.LOCK_UN)
    os.close(dead._fd)
    dead._fd = None
    assert os.path.exists(path)
    n = Neighbours(store, _run_lock(store, "live"))
    assert not n.shared and n.may_compute()


def test_a_stopped_run_lets_go_of_what_its_queued_batches_hold(tmp_path):
    """A batch queued after it took its lease (and row claim) and never submitted, because
    the run stopped: both are released at the run's end, not when the process exits (a
    library run's process lives on, and another run would wait for them)."""
    from castore.pipeline.claims import RowClaims
    from castore.pipeline.queues import Pending, Queues
    from castore.pipeline.schedule import Scheduler
    from castore.store.locks import live_lock

    store = Store(tmp_path / "c")
    lease = store.lease("ab" * 32, {"run": "r"})
    assert lease.try_acquire()
    claim = RowClaims(store, "r").take("cd" * 32, [bytes(32 * [1])])
    assert not isinstance(claim, list)
    sched = Scheduler.__new__(Scheduler)  # only what stop_workers reads
    sched.queues = {"s": Queues()}
    sched.executor = sched.gen_threads = sched.rcache = sched.neighbours = sched.answers = None
    sched.steps = {}
    sched.queues["s"].pending.append(Pending(batch=None, lease=lease, claim=claim))  # type: ignore[arg-type]
    assert live_lock(lease.path) is not None and live_lock(claim.path) is not None
    sched.stop_workers()
    assert live_lock(lease.path) is None and live_lock(claim.path) is None
