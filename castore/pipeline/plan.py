"""Batch planning, pure: no store, no disk, no threads (DESIGN.md "Running" 2).

Batch k of a step is rows [k*B, (k+1)*B) of the concatenation of its predecessors'
outputs in batch order, whatever order work finished in. A batch is planned as soon as
the contiguous prefix of its predecessors' done batches covers it, so downstream work
starts early while memory holds only in-flight batches. Every planned batch carries its
action key (castore.hashing.action_key), so the same input content gives the same key in
any pipeline and on any machine.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, field
from typing import Any, Literal

from castore.errors import PipelineError
from castore.hashing import action_key
from castore.store.manifests import BatchRecord

Slice = tuple[str, int, int]  # (object id, offset, length)
Kind = Literal["normal", "global", "generator"]


class Stream:
    """The rows a step has produced, as (object, rows) segments of its done prefix."""

    def __init__(self) -> None:
        self.segs: list[tuple[str, int]] = []
        self.starts: list[int] = []  # first row of each segment
        self.rows = 0

    def append(self, oid: str, n: int) -> None:
        self.starts.append(self.rows)
        self.segs.append((oid, n))
        self.rows += n

    def take(self, start: int, end: int) -> list[Slice]:
        """Slices covering rows [start, end)."""
        out: list[Slice] = []
        i = max(bisect.bisect_right(self.starts, start) - 1, 0)
        while start < end and i < len(self.segs):
            oid, n = self.segs[i]
            off = start - self.starts[i]
            if 0 <= off < n:
                length = min(n - off, end - start)
                out.append((oid, off, length))
                start += length
            i += 1
        return out


def route_choice(key: str, n: int, targets: list[str]) -> list[str]:
    """The successors a batch goes to: seeded from its action key, so deterministic."""
    rng = random.Random(int(key[:16], 16))
    return rng.sample(sorted(targets), min(n, len(targets)))


@dataclass(frozen=True)
class PlannedBatch:
    """One batch to look up or compute: which rows of which objects it reads, and its key."""

    step: str
    index: int
    key: str
    slices: tuple[tuple[Slice, ...], ...]

    def slice_lists(self) -> list[list[Slice]]:
        return [list(pred) for pred in self.slices]


@dataclass
class StepPlan:
    """What planning knows of one step: its done batches and the streams they form."""

    name: str
    fp: str
    kind: Kind
    batch_size: int  # input rows per batch (normal steps)
    preds: list[str]
    route: tuple[int, list[str]] | None = None  # (n, targets) when its batches are routed
    done: dict[int, BatchRecord] = field(default_factory=dict)
    planned: int = 0
    total: int | None = None  # batches, once known
    prefix: int = 0  # contiguous done batches from 0
    rows_done: int = 0
    out: Stream = field(default_factory=Stream)
    routed: dict[str, Stream] = field(default_factory=dict)
    # A routing step's done batches in order: (rows, the successors each went to).
    sent: list[tuple[int, list[str]]] = field(default_factory=list)
    # A step whose predecessors are the branches of one routing step (load >>
    # sample_n_steps(2) >> [a, b, c] >> GroupColumns): that step's name, and where
    # planning stands: the routed batch, the row in it, each branch's rows consumed.
    joins: str | None = None
    cursor: tuple[int, int] = (0, 0)
    taken: dict[str, int] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.total is not None and self.prefix >= self.total

    def stream_for(self, successor: str) -> Stream:
        if self.route is None:
            return self.out
        return self.routed.setdefault(successor, Stream())

    def add(self, index: int, record: BatchRecord) -> None:
        """Batch `index` is done; the done prefix (and so the streams) may grow."""
        self.done[index] = record
        self.rows_done += sum(record.rows)
        while self.prefix in self.done:
            rec = self.done[self.prefix]
            chosen = route_choice(rec.key, *self.route) if self.route else []
            if self.route:
                self.sent.append((sum(rec.rows), chosen))
            for oid, n in zip(rec.outputs, rec.rows, strict=True):
                self.out.append(oid, n)
                for target in chosen:
                    self.stream_for(target).append(oid, n)
            self.prefix += 1

    def replayed(self, records: list[BatchRecord]) -> None:
        """Every batch is `records` (a finished run's, replayed whole). No streams are
        built: nothing is planned after a replay, only its records are read."""
        self.done = dict(enumerate(records))
        self.rows_done = sum(sum(r.rows) for r in records)
        self.total = self.prefix = len(records)

    def records(self) -> list[BatchRecord]:
        """Done batches in plan order."""
        return [self.done[k] for k in sorted(self.done)]


class Planner:
    """Plans every step of a pipeline from the done batches of its predecessors."""

    def __init__(self, plans: dict[str, StepPlan], order: list[str]) -> None:
        self.plans = plans
        self.order = order

    @classmethod
    def for_pipeline(
        cls, pipeline: Any, signatures: dict[str, dict[str, str]], order: list[str]
    ) -> Planner:
        """A planner for a Pipeline's steps (read, not kept: planning stays pure)."""
        plans = {}
        for n in order:
            step = pipeline.steps[n]
            plans[n] = StepPlan(
                n,
                signatures[n]["fp"],
                step.kind,
                step.input_batch_size,
                pipeline.predecessors(n),
                route=pipeline.routes.get(n),
                joins=joined_route(pipeline, n),
            )
        return cls(plans, order)

    @property
    def complete(self) -> bool:
        return all(p.complete for p in self.plans.values())

    def next_batches(self) -> list[PlannedBatch]:
        """Every batch whose input the done prefixes now cover, in step order. Call again
        after recording hits: each can make more batches plannable."""
        out: list[PlannedBatch] = []
        for name in self.order:
            st = self.plans[name]
            if st.kind == "generator" or st.total is not None:
                continue
            out.extend(self._plan_step(st))
        return out

    def _plan_step(self, st: StepPlan) -> list[PlannedBatch]:
        if st.joins is not None:
            return self._plan_join(st, self.plans[st.joins])
        preds = [self.plans[p] for p in st.preds]
        streams = [p.stream_for(st.name) for p in preds]
        ready = all(p.complete for p in preds)
        out: list[PlannedBatch] = []
        if st.kind == "global":
            if ready:
                total = aligned_total(st.name, preds, streams)
                out.append(_planned(st, 0, [s.take(0, total) for s in streams]))
                st.total = 1
            return out
        b = st.batch_size
        while True:
            start = st.planned * b
            if ready:
                total = aligned_total(st.name, preds, streams)
                if start >= total:
                    st.total = st.planned
                    return out
                end = min(start + b, total)
            elif min(s.rows for s in streams) >= start + b:
                end = start + b
            else:
                return out
            out.append(_planned(st, st.planned, [s.take(start, end) for s in streams]))

    def _plan_join(self, st: StepPlan, router: StepPlan) -> list[PlannedBatch]:
        """The batches of a step joining routed branches. Each routed batch went to some
        branches; its rows, as each of those branches answered them, are aligned one to
        one (the other branches give no slices), in batches of at most `batch_size` that
        never span two routed batches. Branches must keep their rows (one output row per
        input row, in order), as LLM tasks do."""
        preds = {p: self.plans[p] for p in st.preds}
        out: list[PlannedBatch] = []
        k, start = st.cursor
        while k < len(router.sent):
            rows, chosen = router.sent[k]
            here = [p for p in st.preds if p in chosen]
            if any(preds[p].out.rows < st.taken.get(p, 0) + rows for p in here):
                for p in here:
                    _check_kept_rows(st.name, preds[p], router.stream_for(p).rows)
                break  # a branch has not answered this batch's rows yet
            while start < rows:
                end = min(start + st.batch_size, rows)
                slices = [
                    preds[p].out.take(st.taken.get(p, 0) + start, st.taken.get(p, 0) + end)
                    if p in here
                    else []
                    for p in st.preds
                ]
                out.append(_planned(st, st.planned, slices))
                start = end
            for p in here:
                st.taken[p] = st.taken.get(p, 0) + rows
            k, start = k + 1, 0
        st.cursor = (k, start)
        if router.complete and k == len(router.sent):
            for p in st.preds:
                _check_kept_rows(st.name, preds[p], router.stream_for(p).rows)
            st.total = st.planned
        return out


def _check_kept_rows(name: str, branch: StepPlan, given: int) -> None:
    if branch.complete and branch.out.rows != given:
        raise PipelineError(
            f"step {name}: branch {branch.name} made {branch.out.rows} rows from {given}; "
            "a step joining routed branches needs one output row per input row in each"
        )


def joined_route(pipeline: Any, name: str) -> str | None:
    """The routing step whose branches `name` joins, if its predecessors are two or more
    branches of one `sample_n_steps` and nothing else."""
    preds = pipeline.predecessors(name)
    sources = {tuple(pipeline.predecessors(p)) for p in preds}
    if len(preds) < 2 or len(sources) != 1:
        return None
    (source,) = sources
    if len(source) != 1 or source[0] not in pipeline.routes:
        return None
    if pipeline.steps[name].kind == "global":
        raise PipelineError(
            f"step {name}: a global step cannot join routed branches; join them with a "
            "normal step first (e.g. GroupColumns)"
        )
    return str(source[0])


def aligned_total(name: str, preds: list[StepPlan], streams: list[Stream]) -> int:
    """Rows every predecessor produced; they must agree (rows are aligned one to one)."""
    totals = {p.name: s.rows for p, s in zip(preds, streams, strict=True)}
    if len(set(totals.values())) > 1:
        shown = ", ".join(f"{k} ({v} rows)" for k, v in totals.items())
        raise PipelineError(
            f"step {name}: its predecessors differ in length: {shown}; rows are aligned one to one"
        )
    return next(iter(totals.values()))


def _planned(st: StepPlan, index: int, slices: list[list[Slice]]) -> PlannedBatch:
    st.planned = index + 1
    return PlannedBatch(st.name, index, action_key(st.fp, slices), tuple(map(tuple, slices)))
