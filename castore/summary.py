"""The one summary of a run (RunSummary), printed by the run log, `cas run` (and its
--json) and `cas show`. Apart from the engine, so `cas show` does not import it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel

from castore.store.manifests import RunManifest, StepStats

if TYPE_CHECKING:
    from castore.store import Store


class StepSummary(BaseModel):
    batches_cached: int
    batches_computed: int
    batches_failed: int
    rows: int
    rows_computed: int = 0
    rows_reused: int = 0  # rows of computed batches found by row key


class Saved(BaseModel):
    batches: int
    rows: int  # rows of cached batches plus rows found by row key
    tokens: int
    seconds: float
    rows_by_key: int = 0
    cost_usd: float = 0.0  # the saved tokens at the steps' LLM `prices`

    @classmethod
    def of(cls, stats: dict[str, StepStats]) -> Saved:
        return cls(
            batches=sum(s.batches_cached for s in stats.values()),
            rows=sum(s.rows_cached + s.rows_reused for s in stats.values()),
            rows_by_key=sum(s.rows_reused for s in stats.values()),
            tokens=sum(s.tokens_saved for s in stats.values()),
            seconds=round(sum(s.seconds_saved for s in stats.values()), 6),
            cost_usd=round(sum(s.cost_saved_usd for s in stats.values()), 9),
        )

    def line(self) -> str:
        by_key = f" ({self.rows_by_key} by row key)" if self.rows_by_key else ""
        usd = f" (~${self.cost_usd:.4f})" if self.cost_usd else ""
        return (
            f"saved: {self.batches} batches, {self.rows} rows{by_key}, {self.tokens} "
            f"tokens{usd}, {self.seconds:.1f} seconds of compute"
        )


class RunSummary(BaseModel):
    """A run as `cas run --json` prints it; the run log and `cas show` use it too."""

    run_id: str
    name: str
    signature: str
    status: str
    rows: dict[str, int]
    steps: dict[str, StepSummary]
    seconds: float
    data_dir: str
    saved: Saved
    tokens_spent: int
    cost_spent_usd: float = 0.0  # the spent tokens at the steps' LLM `prices`
    error: str | None = None

    @classmethod
    def of(cls, run: RunManifest, run_oid: str, data_dir: str) -> RunSummary:
        stats = run.stats
        return cls(
            run_id=run_oid,
            name=run.name,
            signature=run.signature,
            status=run.status,
            rows={leaf: stats[leaf].rows for leaf in run.leaves if leaf in stats},
            steps={
                n: StepSummary(
                    batches_cached=s.batches_cached,
                    batches_computed=s.batches_computed,
                    batches_failed=s.batches_failed,
                    rows=s.rows,
                    rows_computed=s.rows_computed,
                    rows_reused=s.rows_reused,
                )
                for n, s in stats.items()
            },
            seconds=round(((run.ended or run.updated) - run.started).total_seconds(), 3),
            data_dir=data_dir,
            saved=Saved.of(stats),
            tokens_spent=sum(s.tokens_spent for s in stats.values()),
            cost_spent_usd=round(sum(s.cost_spent_usd for s in stats.values()), 9),
            error=run.error,
        )

    @classmethod
    def load(cls, store: Store, run_oid: str) -> RunSummary:
        from castore.store.manifests import load_model
        from castore.store.runfolder import RunFolder

        run = load_model(store, run_oid, RunManifest)
        return cls.of(run, run_oid, str(RunFolder(store, run.name, run.signature).data))


def step_lines(stats: dict[str, StepStats]) -> list[str]:
    """One line per step, as the run log ends."""
    return [
        f"step {n}: {s.batches_cached + s.batches_computed + s.batches_failed} batches "
        f"({s.batches_cached} cached, {s.batches_computed} computed, {s.batches_failed} "
        f"failed), {s.rows} rows"
        + (f" ({s.rows_reused} reused by row key)" if s.rows_reused else "")
        + f", {s.compute_seconds:.2f}s compute"
        for n, s in stats.items()
    ]
