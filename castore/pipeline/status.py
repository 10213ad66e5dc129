"""What a run would do, before paying for it (`cas status`, `Pipeline.plan()`).

The planner is driven over the store's action entries exactly as a run drives it, but a
hit is only looked up (entry present, its objects present), never verified, freshened or
repaired, and a miss is only counted: nothing runs and nothing is written. Downstream of
a batch that must be computed, keys depend on objects that do not exist yet, so those
steps are reported as waiting on it. For row-wise steps, the rows of each miss already
produced under the same fingerprint are found by row key (the index read, not packed).
Estimates of seconds and tokens come from the accounting of the pipeline's latest run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from castore.answers import kept_answers
from castore.hashing import generator_end_key, generator_key
from castore.pipeline.batch import TableCache, read_input
from castore.pipeline.calls import process_chunks
from castore.pipeline.plan import PlannedBatch, Planner
from castore.pipeline.rows import RowIndex
from castore.store.manifests import BatchRecord

if TYPE_CHECKING:
    import pyarrow as pa

    from castore.pipeline.pipeline import Pipeline
    from castore.remote import Remote
    from castore.store import Store


class StepStatus(BaseModel):
    name: str
    batches_cached: int = 0
    batches_to_compute: int = 0
    # None: unknown until the steps in `waits_on` have run (their outputs make the keys)
    batches_total: int | None = None
    rows_cached: int = 0
    batches_on_remote: int = 0  # of the cached ones, those only the remote has (fetched)
    rows_in_misses: int = 0  # input rows of the batches to compute
    rows_by_key: int = 0  # of those, rows already produced (row-wise steps)
    waits_on: list[str] = []
    seconds_estimate: float | None = None
    tokens_estimate: int | None = None
    cost_estimate_usd: float | None = None  # at the LLM's prices, when it has some

    @property
    def rows_to_compute(self) -> int:
        return self.rows_in_misses - self.rows_by_key


class PlanStatus(BaseModel):
    name: str
    signature: str
    steps: list[StepStatus]
    finished_run: str | None = None  # a finished run of this exact pipeline replays whole
    # LLM answers its stopped runs received for batches they did not store
    # (castore.answers): a run sends none of those requests again.
    answers_kept: int = 0

    @property
    def free(self) -> bool:
        return all(s.batches_to_compute == 0 and not s.waits_on for s in self.steps)


class _Pinned(TableCache):
    """Input tables for planning: batches a loader produced in memory (never stored),
    then what the store has."""

    def __init__(self) -> None:
        super().__init__()
        self.pinned: dict[str, pa.Table] = {}

    def get(self, store: Store, oid: str) -> pa.Table:
        table = self.pinned.get(oid)
        return table if table is not None else super().get(store, oid)


@dataclass
class _Walk:
    store: Store | None
    pipeline: Pipeline
    sigs: dict[str, dict[str, str]]
    planner: Planner
    out: dict[str, StepStatus]
    read_inputs: bool
    remote: Remote | None = None
    indexes: dict[str, RowIndex] = field(default_factory=dict)
    cache: _Pinned = field(default_factory=_Pinned)
    missed: set[str] = field(default_factory=set)
    on_remote: dict[str, Any] = field(default_factory=dict)  # key -> the remote's entry

    def entry(self, key: str) -> Any:
        return self.local(key) or self.on_remote.get(key)

    def local(self, key: str) -> Any:
        if self.store is None:
            return None
        entry = self.store.peek_action(key)  # get_action would drop a dangling entry
        if entry is None or not all(self.store.has(o) for o in (*entry.outputs, *entry.needs())):
            return None
        return entry

    def ask_remote(self, keys: list[str]) -> None:
        """The remote's entries for the keys not here, asked at once. An entry is enough
        to plan on (keys downstream name objects by id); a run fetches and verifies the
        objects, and computes the batch when it cannot."""
        from concurrent.futures import ThreadPoolExecutor

        from castore.remote_layout import require_store

        if self.remote is None:
            return
        todo = [k for k in keys if k not in self.on_remote and self.local(k) is None]
        if todo:  # as a run: the remote is asked only about what is not here
            require_store(self.remote)
        with ThreadPoolExecutor(16) as pool:
            for key, entry in zip(todo, pool.map(self.remote.get_action, todo), strict=True):
                if entry is not None:
                    self.on_remote[key] = entry

    def generators(self) -> None:
        for name, plan in self.planner.plans.items():
            if plan.kind != "generator":
                continue
            self.ask_remote([generator_end_key(plan.fp)])
            end = self.entry(generator_end_key(plan.fp))
            known = end.info.get("batches") if end is not None else None
            if known:
                self.ask_remote([generator_key(plan.fp, i) for i in range(known)])
            index = 0
            while (entry := self.entry(key := generator_key(plan.fp, index))) is not None:
                self.hit(name, index, key, entry)
                index += 1
                if known is not None and index >= known:
                    plan.total = index
                    break
            if plan.total is None and self.read_inputs:
                self.load(name, index)
            elif plan.total is None:  # it must produce the rest: how many is unknown
                self.missed.add(name)
                self.out[name].batches_to_compute = (known or index + 1) - index

    def load(self, name: str, start: int) -> None:
        """A loader's remaining batches, produced in memory and identified as a run
        would store them (the same Parquet bytes, so the same ids), so the steps after
        it can be planned. Nothing is written."""
        from castore.hashing import hash_bytes
        from castore.pipeline.batch import generator_table
        from castore.store.parquet import encode_parquet

        plan, step, st = self.planner.plans[name], self.pipeline.steps[name], self.out[name]
        offset = sum(sum(r.rows) for r in plan.records())
        index = start
        for chunk in process_chunks(step, offset):
            table = generator_table(step, chunk)
            oid = hash_bytes(memoryview(encode_parquet(table)))
            self.cache.pinned[oid] = table
            key = generator_key(plan.fp, index)
            record = BatchRecord(key=key, outputs=[oid], rows=[table.num_rows], cached=False)
            plan.add(index, record)
            if self.store is not None and self.store.has(oid):
                st.batches_cached += 1  # made again byte for byte: nothing new
                st.rows_cached += table.num_rows
            else:
                st.batches_to_compute += 1
                st.rows_in_misses += table.num_rows
            index += 1
        plan.total = index

    def hit(self, step: str, index: int, key: str, entry: Any) -> None:
        record = BatchRecord(key=key, outputs=entry.outputs, rows=entry.rows, cached=True)
        self.planner.plans[step].add(index, record)
        st = self.out[step]
        st.batches_cached += 1
        st.batches_on_remote += key in self.on_remote
        st.rows_cached += sum(entry.rows)
        segment = entry.row_segment()
        if segment is not None and step in self.indexes:
            self.indexes[step].hit(segment)

    def batches(self) -> None:
        while batches := self.planner.next_batches():
            self.ask_remote([b.key for b in batches])
            for b in batches:
                self.batch(b)

    def batch(self, b: PlannedBatch) -> None:
        step = self.pipeline.steps[b.step]
        if step.row_wise and b.step not in self.indexes and self.store is not None:
            self.indexes[b.step] = RowIndex(self.store, self.sigs[b.step]["fp"], writes=False)
        entry = self.entry(b.key)
        if entry is not None:
            self.hit(b.step, b.index, b.key, entry)
            return
        st = self.out[b.step]
        st.batches_to_compute += 1
        st.rows_in_misses += sum(n for _, _, n in b.slices[0])  # predecessors align
        self.missed.add(b.step)
        index = self.indexes.get(b.step)
        store, pinned = self.store, self.cache.pinned
        if (
            index is not None
            and store is not None
            and all(s[0] in pinned or store.has(s[0]) for p in b.slices for s in p)
        ):  # not when its input is still on the remote
            table = read_input(store, b.slice_lists(), self.cache, step)
            found = index.locate(index.keys(step, table))
            st.rows_by_key += sum(f is not None for f in found)


def plan_status(
    pipeline: Pipeline,
    store: Store | None,
    *,
    read_inputs: bool = False,
    remote: Remote | None = None,
) -> PlanStatus:
    """Per step: batches cached (here, or only on `remote`), to compute, or waiting on
    upstream work; rows found by row key; estimates from the latest run of this
    pipeline name. With `read_inputs`, loaders whose batches are not all stored are run
    in memory (nothing written), so the steps after them can be planned."""
    pipeline.validate()
    sigs = pipeline.signatures()
    order = pipeline.topological()
    planner = Planner.for_pipeline(pipeline, sigs, order)
    out = {n: StepStatus(name=n) for n in order}
    walk = _Walk(store, pipeline, sigs, planner, out, read_inputs, remote)
    walk.generators()
    walk.batches()
    for n in order:
        plan, st = planner.plans[n], out[n]
        if plan.total is not None:
            st.batches_total = plan.total
        waiting = [p for p in pipeline.predecessors(n) if p in walk.missed or out[p].waits_on]
        if not plan.complete and waiting:
            st.waits_on = sorted({w for p in waiting for w in (out[p].waits_on or [p])})
            st.batches_total = None
    _estimates(store, pipeline.name, out)
    sig = pipeline.signature()
    return PlanStatus(
        name=pipeline.name,
        signature=sig,
        steps=[out[n] for n in order],
        finished_run=_finished(store, pipeline.name, sig),
        answers_kept=kept_answers(store, sig) if store is not None else 0,
    )


def _finished(store: Store | None, name: str, sig: str) -> str | None:
    if store is None:
        return None
    from castore.errors import CastoreError
    from castore.store.manifests import RunManifest, load_model

    oid = store.get_ref(name, sig)
    if oid is None:
        return None
    try:
        return oid if load_model(store, oid, RunManifest).status == "finished" else None
    except CastoreError:
        return None


def _estimates(store: Store | None, name: str, out: dict[str, StepStatus]) -> None:
    """Seconds, tokens and dollars per computed row in the latest run of this pipeline
    name, times the rows to compute."""
    if store is None:
        return
    from castore.runs import list_runs

    latest = next((r for r in list_runs(store) if r.name == name), None)
    if latest is None:
        return
    for st in out.values():
        stats = latest.manifest.stats.get(st.name)
        if stats is None or not stats.rows_computed:
            continue
        rows = st.rows_to_compute
        st.seconds_estimate = round(stats.compute_seconds / stats.rows_computed * rows, 3)
        st.tokens_estimate = round(stats.tokens_spent / stats.rows_computed * rows)
        if stats.cost_spent_usd:
            st.cost_estimate_usd = round(stats.cost_spent_usd / stats.rows_computed * rows, 6)
