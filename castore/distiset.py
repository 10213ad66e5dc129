"""Distiset: the datasets a run produced, one `datasets.DatasetDict` per leaf step,
materialized by walking the leaf step manifests (DESIGN.md "Distiset")."""

from __future__ import annotations

from typing import TYPE_CHECKING

from castore.pipeline.step import METADATA_COLUMN
from castore.store.manifests import RunManifest, StepManifest, load_model

if TYPE_CHECKING:
    import pyarrow as pa

    from castore.store import Store


class Distiset(dict):
    """leaf step name -> DatasetDict({"train": Dataset}); `.partial` when the run did not
    finish; `.pipeline_yaml` / `.log` hold the recipe and the log text."""

    partial: bool = False
    pipeline_yaml: str | None = None
    log: str | None = None
    run: RunManifest | None = None
    run_oid: str | None = None

    def __repr__(self) -> str:
        inner = ",\n".join(f"    {name}: " + _indent(repr(dd), 4) for name, dd in self.items())
        return "Distiset({\n" + inner + "\n})"

    @classmethod
    def from_manifest(
        cls, store: Store, run_oid: str, *, enable_metadata: bool = False
    ) -> Distiset:
        import datasets

        run = load_model(store, run_oid, RunManifest)
        out = cls()
        for leaf in run.leaves:
            step = load_model(store, run.step_manifest_id(leaf), StepManifest)
            table = leaf_table(store, step)
            if not enable_metadata and METADATA_COLUMN in table.column_names:
                table = table.drop_columns([METADATA_COLUMN])
            out[leaf] = datasets.DatasetDict({"train": datasets.Dataset(table)})
        out.partial = run.status != "finished"
        out.run = run
        out.run_oid = run_oid
        out.pipeline_yaml = (
            store.get_bytes(run.pipeline_yaml).decode() if run.pipeline_yaml else None
        )
        out.log = store.get_bytes(run.log).decode(errors="replace") if run.log else None
        return out


def leaf_table(store: Store, step: StepManifest) -> pa.Table:
    """All batches of a step manifest, in plan order, as one Arrow table."""
    import pyarrow as pa

    tables = [store.get_table(oid) for b in step.batches for oid in b.outputs]
    tables = [t for t in tables if t.num_columns]
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables, promote_options="permissive")


def _indent(text: str, n: int) -> str:
    pad = " " * n
    return text.replace("\n", "\n" + pad)
