"""The planner alone: plain lists in, planned batches out. No store, no disk, no threads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from castore.errors import PipelineError
from castore.hashing import action_key, hash_json
from castore.pipeline.plan import Planner, StepPlan, Stream, route_choice
from castore.store.manifests import BatchRecord
from tests.conftest import REPO

FP = {n: f"{i:064x}" for i, n in enumerate(["gen", "a", "b", "c", "g"], start=1)}


def oid(n: int) -> str:
    return f"{n:064x}"


def done(plan: StepPlan, index: int, rows: int, n: int) -> None:
    """Batch `index` of `plan` produced `rows` rows as object `oid(n)`."""
    plan.add(index, BatchRecord(key=oid(10_000 + n), outputs=[oid(n)], rows=[rows], cached=False))


def chain(batch: int = 4, kind: str = "normal") -> tuple[Planner, dict[str, StepPlan]]:
    plans = {
        "gen": StepPlan("gen", FP["gen"], "generator", 1, []),
        "a": StepPlan("a", FP["a"], kind, batch, ["gen"]),  # type: ignore[arg-type]
    }
    return Planner(plans, ["gen", "a"]), plans


def test_stream_take_spans_segments():
    s = Stream()
    for n, rows in enumerate([3, 0, 5, 2], start=1):
        s.append(oid(n), rows)
    assert s.rows == 10
    assert s.take(0, 3) == [(oid(1), 0, 3)]
    assert s.take(2, 7) == [(oid(1), 2, 1), (oid(3), 0, 4)]
    assert s.take(7, 10) == [(oid(3), 4, 1), (oid(4), 0, 2)]
    assert s.take(10, 12) == []


def test_batches_are_planned_as_soon_as_the_done_prefix_covers_them():
    planner, plans = chain(batch=4)
    assert planner.next_batches() == []
    done(plans["gen"], 1, 3, 2)  # out of order: the prefix is still empty
    assert planner.next_batches() == []
    done(plans["gen"], 0, 3, 1)  # prefix now 6 rows: one batch of 4
    (b,) = planner.next_batches()
    assert (b.step, b.index) == ("a", 0)
    assert b.slices == (((oid(1), 0, 3), (oid(2), 0, 1)),)
    assert b.key == action_key(FP["a"], [[(oid(1), 0, 3), (oid(2), 0, 1)]])
    assert planner.next_batches() == []  # rows 4-5 wait for more input
    plans["gen"].total = 2
    (last,) = planner.next_batches()  # the generator is complete: the tail is planned
    assert last.index == 1 and last.slices == (((oid(2), 1, 2),),)
    assert plans["a"].total == 2
    assert not planner.complete
    done(plans["a"], 0, 4, 50)
    done(plans["a"], 1, 2, 51)
    assert planner.complete


def test_keys_name_content_not_batch_boundaries_of_the_producer():
    """The same rows from differently cut upstream objects give other keys (positional
    keys, as documented); the same objects give the same keys in any pipeline."""
    p1, a1 = chain(batch=4)
    p2, a2 = chain(batch=4)
    done(a1["gen"], 0, 4, 1)
    done(a2["gen"], 0, 4, 1)
    assert [b.key for b in p1.next_batches()] == [b.key for b in p2.next_batches()]


def test_global_step_waits_for_everything_and_plans_one_batch():
    planner, plans = chain(kind="global")
    done(plans["gen"], 0, 5, 1)
    assert planner.next_batches() == []
    plans["gen"].total = 1
    (b,) = planner.next_batches()
    assert b.slices == (((oid(1), 0, 5),),) and plans["a"].total == 1


def test_fan_in_is_aligned_and_unequal_lengths_are_an_error():
    plans = {
        "gen": StepPlan("gen", FP["gen"], "generator", 1, []),
        "a": StepPlan("a", FP["a"], "normal", 2, ["gen"]),
        "b": StepPlan("b", FP["b"], "normal", 3, ["gen"]),
        "c": StepPlan("c", FP["c"], "normal", 4, ["a", "b"]),
    }
    planner = Planner(plans, ["gen", "a", "b", "c"])
    done(plans["gen"], 0, 4, 1)
    plans["gen"].total = 1
    batches = planner.next_batches()
    assert [(b.step, b.index) for b in batches] == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    done(plans["a"], 0, 2, 2)
    done(plans["a"], 1, 2, 3)
    done(plans["b"], 0, 3, 4)
    done(plans["b"], 1, 1, 5)
    (c,) = planner.next_batches()
    assert c.slices == (
        ((oid(2), 0, 2), (oid(3), 0, 2)),
        ((oid(4), 0, 3), (oid(5), 0, 1)),
    )
    # Complete predecessors of unequal length cannot be aligned row by row.
    a, b = StepPlan("a", FP["a"], "normal", 2, []), StepPlan("b", FP["b"], "normal", 2, [])
    done(a, 0, 4, 6)
    done(b, 0, 3, 7)
    a.total = b.total = 1
    c2 = StepPlan("c", FP["c"], "normal", 4, ["a", "b"])
    with pytest.raises(PipelineError, match="differ in length"):
        Planner({"a": a, "b": b, "c": c2}, ["a", "b", "c"]).next_batches()


def test_routing_is_seeded_by_the_key():
    targets = ["x", "y", "z"]
    first = route_choice(oid(7), 1, targets)
    assert first == route_choice(oid(7), 1, list(reversed(targets)))
    assert len(route_choice(oid(7), 2, targets)) == 2
    keys = [hash_json(i) for i in range(40)]
    assert len({route_choice(k, 1, targets)[0] for k in keys}) == 3  # spread over all
    plan = StepPlan("a", FP["a"], "normal", 2, ["gen"], route=(1, ["x", "y"]))
    done(plan, 0, 2, 1)
    chosen = route_choice(oid(10_001), 1, ["x", "y"])[0]
    other = "y" if chosen == "x" else "x"
    assert plan.stream_for(chosen).rows == 2 and plan.stream_for(other).rows == 0


def test_the_planner_touches_no_disk_and_starts_no_thread(monkeypatch):
    import builtins
    import threading

    def refuse(*_a, **_k):
        raise AssertionError("the planner must not do I/O or start threads")

    monkeypatch.setattr(builtins, "open", refuse)
    monkeypatch.setattr(os, "stat", refuse)
    monkeypatch.setattr(threading.Thread, "start", refuse)
    planner, plans = chain(batch=3)
    done(plans["gen"], 0, 7, 1)
    plans["gen"].total = 1
    assert len(planner.next_batches()) == 3


HASH_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
from tests.test_pipeline import build
p = build()
sigs = p.signatures()
print(p.signature(sigs), *(sigs[n]["fp"] for n in sorted(sigs)))
"""


@pytest.mark.parametrize("seeds", [("0", "12345")])
def test_keys_are_the_same_in_interpreters_with_other_hash_seeds(seeds):
    outs = []
    for seed in seeds:
        env = {**os.environ, "PYTHONHASHSEED": seed}
        p = subprocess.run(
            [sys.executable, "-c", HASH_SCRIPT.format(repo=str(REPO))],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
        )
        assert p.returncode == 0, p.stderr
        outs.append(p.stdout)
    assert outs[0] == outs[1] and len(outs[0].split()) == 5


def test_keys_of_the_readme_pipeline_never_change():
    """The README pipeline's signatures, as castore computed them before the run driver
    was split (and before code versions followed helpers, which it has none of): no
    user's cache is invalidated by a refactor. Regenerate only for a deliberate change."""
    import json

    from castore.pipeline.pipeline import load_file_module, pipelines_in

    golden = json.loads((REPO / "tests" / "golden" / "clean_reviews_keys.json").read_text())
    ((_, p),) = list(pipelines_in(load_file_module(REPO / "examples" / "clean_reviews.py")))
    sigs = p.signatures()
    assert {"signature": p.signature(sigs), "steps": sigs} == golden
