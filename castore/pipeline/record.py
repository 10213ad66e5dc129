"""What a run records: batch records, typed per-step tallies, step and run manifests and
the ref. `Recorder` is the only code that writes manifests and moves the ref during a run
(write order, MUST: objects and entries first, then step manifests, then the run
manifest, then the ref). The summary of a run is castore.summary.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from castore.errors import CastoreError
from castore.pipeline.plan import StepPlan
from castore.store.extend import schema_of
from castore.store.manifests import (
    BatchRecord,
    RunManifest,
    RunStatus,
    StepManifest,
    StepRef,
    StepStats,
    Target,
    load_model,
)

log = logging.getLogger("castore.run")

if TYPE_CHECKING:
    from castore.pipeline.batch import BatchResult
    from castore.pipeline.step import _Step
    from castore.store import Store


@dataclass
class StepTally:
    """Counts of one step in one run."""

    cached: int = 0
    computed: int = 0
    failed: int = 0
    rows_cached: int = 0
    rows_computed: int = 0
    seconds: float = 0.0  # compute spent in this run
    seconds_saved: float = 0.0
    tokens_spent: int = 0
    tokens_saved: int = 0
    rows_reused: int = 0  # rows of computed batches found by row key
    usd_spent: float = 0.0
    usd_saved: float = 0.0

    def add(
        self,
        rows: int,
        *,
        cached: bool,
        failed: bool,
        seconds: float,
        tokens: int,
        usd: float = 0.0,
        reused: int = 0,
        tokens_reused: int = 0,
        usd_reused: float = 0.0,
        seconds_reused: float = 0.0,
    ) -> None:
        """One batch: `reused` of its `rows` (computed batches of row-wise steps) were
        taken by row key, and `tokens_reused` (`usd_reused`, `seconds_reused`) is what
        they cost when they were made."""
        if cached:
            self.cached += 1
            self.rows_cached += rows
            self.seconds_saved += seconds
            self.tokens_saved += tokens
            self.usd_saved += usd
        else:
            if failed:
                self.failed += 1
            else:
                self.computed += 1
            self.rows_computed += rows - reused
            self.rows_reused += reused
            self.seconds += seconds
            self.tokens_spent += tokens
            self.tokens_saved += tokens_reused
            self.usd_spent += usd
            self.usd_saved += usd_reused
            self.seconds_saved += seconds_reused

    def spend(self, tokens: int, usd: float, seconds: float) -> None:
        """What an attempt that failed spent (its answered rows were kept)."""
        self.tokens_spent += tokens
        self.usd_spent += usd
        self.seconds += seconds

    def stats(self, plan: StepPlan) -> StepStats:
        return StepStats(
            batches_total=plan.total,
            batches_cached=self.cached,
            batches_computed=self.computed,
            batches_failed=self.failed,
            rows=plan.rows_done,
            rows_cached=self.rows_cached,
            rows_computed=self.rows_computed,
            compute_seconds=round(self.seconds, 6),
            seconds_saved=round(self.seconds_saved, 6),
            tokens_spent=self.tokens_spent,
            tokens_saved=self.tokens_saved,
            rows_reused=self.rows_reused,
            cost_spent_usd=round(self.usd_spent, 9),
            cost_saved_usd=round(self.usd_saved, 9),
        )


@dataclass(frozen=True)
class RunFacts:
    """The facts of a run that do not change while it runs."""

    name: str
    signature: str
    run_id: str
    started: datetime
    edges: list[tuple[str, str]]
    leaves: list[str]
    parameters: dict[str, dict[str, Any]]
    target: Target
    use_cache: bool
    previous: str | None


class Recorder:
    def __init__(
        self,
        store: Store,
        info: RunFacts,
        plans: dict[str, StepPlan],
        steps: dict[str, _Step],
        signatures: dict[str, dict[str, str]],
    ) -> None:
        self.store = store
        self.info = info
        self.plans = plans
        self.steps = steps
        self.signatures = signatures
        self.tallies = {name: StepTally() for name in plans}
        self.columns: dict[str, list[tuple[str, str]]] = {name: [] for name in plans}
        # A replay's step manifests are the run's it replayed: the same batches, and a
        # copy differing only in `cached` would be ~100 kB per step per re-run. That this
        # run computed nothing is in its run manifest's stats.
        self.replayed: dict[str, str] = {}
        self.pipeline_yaml: str | None = None
        self.inline: list[str] = []
        self.error: str | None = None
        # Called after each recorded batch: (step, key, outputs, cached, failed).
        self.on_record: Callable[[str, str, list[str], bool, bool], None] | None = None

    def record(
        self,
        step: str,
        index: int,
        key: str,
        outputs: list[str],
        rows: list[int],
        *,
        cached: bool,
        result: BatchResult | None = None,
        cost: tuple[float, int, float] = (0.0, 0, 0.0),
        row_index: str | None = None,
        extends: bool = False,
    ) -> None:
        """A batch is done: `result` when computed now; for a hit, `cost` is (seconds,
        tokens, USD) that computing it took once, i.e. what the cache saved, and
        `row_index` its row-key segment (row-wise steps)."""
        failed = result is not None and result.skipped_error is not None
        seconds, tokens, usd = (result.seconds, result.tokens, result.cost_usd) if result else cost
        reused = result.rows_reused if result else 0
        if result is not None:
            row_index, extends = result.row_index, bool(result.needs)
        rec = BatchRecord(
            key=key,
            outputs=outputs,
            rows=rows,
            cached=cached,
            seconds=round(seconds, 6),
            tokens=tokens,
            cost_usd=round(usd, 9),
            failed=failed,
            row_index=row_index,
            rows_reused=reused,
            extends=extends,
        )
        reused_cost = (
            (result.tokens_reused, result.cost_usd_reused, result.seconds_reused)
            if result
            else None
        )
        self._add(step, index, rec, reused_cost)
        if not self.columns[step] and outputs:
            self.columns[step] = result.columns if result is not None else self._columns(outputs)

    def _add(
        self,
        step: str,
        index: int,
        rec: BatchRecord,
        reused: tuple[int, float, float] | None = None,
    ) -> None:
        """Into the step's plan (its streams grow) and tallies; then `on_record`.
        `reused`: (tokens, USD, seconds) of the rows taken by row key."""
        self.plans[step].add(index, rec)
        self._tally(step, rec, rec.cached, reused)

    def _tally(
        self,
        step: str,
        rec: BatchRecord,
        cached: bool,
        reused: tuple[int, float, float] | None = None,
    ) -> None:
        tokens_reused, usd_reused, seconds_reused = reused or (0, 0.0, 0.0)
        self.tallies[step].add(
            sum(rec.rows),
            cached=cached,
            failed=rec.failed,
            seconds=rec.seconds,
            tokens=rec.tokens,
            usd=rec.cost_usd,
            reused=rec.rows_reused,
            tokens_reused=tokens_reused,
            usd_reused=usd_reused,
            seconds_reused=seconds_reused,
        )
        if self.on_record is not None:
            self.on_record(step, rec.key, rec.outputs, cached, rec.failed)

    def set_columns(self, step: str, columns: list[tuple[str, str]]) -> None:
        self.columns[step] = columns

    def _columns(self, outputs: list[str]) -> list[tuple[str, str]]:
        try:
            schema = schema_of(self.store, outputs[0])
        except (OSError, ValueError, CastoreError):
            return []
        return [(f.name, str(f.type)) for f in schema]

    def done_batches(self) -> int:
        return sum(len(p.done) for p in self.plans.values())

    def _step_manifest(self, name: str) -> str:
        if name in self.replayed:
            return self.replayed[name]
        plan, step = self.plans[name], self.steps[name]
        man = StepManifest(
            name=name,
            step_class=f"{type(step).__module__}:{type(step).__qualname__}",
            fingerprint=plan.fp,
            signature=self.signatures[name]["sig"],
            complete=plan.complete,
            batches=plan.records(),
            columns=self.columns[name],
        )
        return self.store.put_bytes(man.model_dump_json().encode())

    def seal(self, status: RunStatus, log_oid: str | None = None) -> str:
        """Step manifests, then the run manifest, then the ref: returns the run manifest."""
        info = self.info
        run = RunManifest(
            run_id=info.run_id,
            name=info.name,
            signature=info.signature,
            status=status,
            started=info.started,
            ended=None if status == "running" else datetime.now(UTC),
            steps=[StepRef(name=n, manifest=self._step_manifest(n)) for n in self.plans],
            edges=info.edges,
            leaves=info.leaves,
            parameters=info.parameters,
            target=info.target,
            use_cache=info.use_cache,
            pipeline_yaml=self.pipeline_yaml,
            inline=self.inline,
            log=log_oid,
            stats={n: self.tallies[n].stats(p) for n, p in self.plans.items()},
            error=self.error,
            previous=info.previous,
        )
        oid = self.store.put_bytes(run.model_dump_json().encode())
        self.store.set_ref(info.name, info.signature, oid)
        return oid

    def replay(self, prev_oid: str | None) -> bool:
        """A finished earlier run of this exact pipeline whose objects are all present
        and intact is reused whole: no planning and no lookups."""
        if prev_oid is None:
            return False
        try:
            run = load_model(self.store, prev_oid, RunManifest)
            if run.status != "finished":
                return False
            mans = {r.name: load_model(self.store, r.manifest, StepManifest) for r in run.steps}
        except CastoreError:
            return False
        sigs = self.signatures
        if set(mans) != set(self.plans) or not all(
            m.complete
            and m.signature == sigs[n]["sig"]
            and all(_intact(self.store, b) for b in m.batches)
            for n, m in mans.items()
        ):
            return False
        for name, man in mans.items():
            self.set_columns(name, man.columns)
            self.plans[name].replayed(man.batches)
            for b in man.batches:  # each counted as a hit; the stored records are kept
                self._tally(name, b, cached=True)
        self.replayed = {r.name: r.manifest for r in run.steps}
        log.info("every batch of this pipeline is in the store: no step work to do")
        return True


def _intact(store: Store, b: BatchRecord) -> bool:
    """A batch a replay may serve: not failed, outputs (and row-key segment) verified.
    What the outputs extend is the outputs of the run's earlier steps, each checked as
    their batches are."""
    return (
        not b.failed
        and all(map(store.reuse, b.outputs))
        and (b.row_index is None or store.reuse(b.row_index))
    )
