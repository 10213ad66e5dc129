"""Row-level reuse for row-wise steps (DESIGN.md "Row keys").

A row-wise step's output row depends only on the values of its declared input columns
in its own input row, and is that input row plus its declared output columns. Its row
key is blake3(fingerprint, tagged input values) (castore.hashing.row_keys): not the
row's position, batch, pipeline or other columns.

Every computed batch of a row-wise step writes, after its output object, a *segment*:
an immutable Parquet object with one 32-byte row key per output row, in row order, whose
schema metadata names the output object. A marker file index/<fingerprint>/<segment id>
announces it (castore.store.Store.add_row_segment). The batch record and the action entry
name the segment, so gc keeps it exactly while it keeps the batch, push and pull move
it, and fsck checks it. The in-memory index of a step is built from its segments at run
start: a dict from the key's first 128 bits to (output object, row), O(1) per row.

On a batch miss, the driver computes the batch's row keys, finds the rows already
produced under the same fingerprint (any pipeline, batch size or run), verifies their
objects, and sends the worker a RowPlan; the worker calls `process` only on the missing
rows and assembles the batch in input order: the current input columns, plus the step's
output columns (and metadata) from the stored rows or the new ones.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from castore.errors import CastoreError, PipelineError, StepFailed
from castore.hashing import row_keys
from castore.store.parquet import METADATA_COLUMN

if TYPE_CHECKING:
    import pyarrow as pa

    from castore.pipeline.step import _Step
    from castore.store import Store

OUTPUT_META = b"castore_output"
FP_META = b"castore_fingerprint"
POS = "__castore_pos"

Found = tuple[str, int]  # (output object, row in it)


@dataclass(frozen=True)
class RowPlan:
    """What the driver found for one batch: per input row its key and, when an earlier
    result exists, where it is."""

    fingerprint: str
    keys: list[bytes]
    found: list[Found | None]

    @property
    def reused(self) -> int:
        return sum(f is not None for f in self.found)


@dataclass
class RowIndex:
    """row key (first 128 bits) -> (output object, row) for one step fingerprint."""

    store: Store
    fingerprint: str
    _map: dict[int, tuple[int, int]] = field(default_factory=dict)
    _oids: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    seen: dict[bytes, int] = field(default_factory=dict)  # values so far, in stream order

    @classmethod
    def load(cls, store: Store, fingerprint: str) -> RowIndex:
        index = cls(store, fingerprint)
        for seg in store.row_segments(fingerprint):
            try:
                table = store.get_table(seg)  # verified: a corrupt segment is skipped
                out = (table.schema.metadata or {})[OUTPUT_META].decode()
            except (CastoreError, KeyError):
                store.drop_row_segment(fingerprint, seg)
                continue
            index.add(table.column("row_key").to_pylist(), out)
        return index

    def __len__(self) -> int:
        return len(self._map)

    def add(self, keys: list[bytes], oid: str) -> None:
        with self._lock:
            self._oids.append(oid)
            n = len(self._oids) - 1
            for row, key in enumerate(keys):
                self._map.setdefault(int.from_bytes(key[:16], "big"), (n, row))

    def find(self, keys: list[bytes]) -> list[Found | None]:
        out: list[Found | None] = []
        for key in keys:
            hit = self._map.get(int.from_bytes(key[:16], "big"))
            out.append(None if hit is None else (self._oids[hit[0]], hit[1]))
        return out

    def plan(self, step: _Step, table: pa.Table, *, lookup: bool = True) -> RowPlan:
        """Row keys of `table` (a batch's input, batches given in stream order) and, with
        `lookup`, the earlier results found, every object they are in verified (a
        corrupt one is quarantined, its rows computed again)."""
        cols = step.row_key_columns()
        missing = [c for c in cols if c not in table.column_names]
        if missing:
            raise StepFailed(f"step {step.name}: its input lacks column {missing[0]!r}")
        keys = row_keys(self.fingerprint, [table.column(c).to_pylist() for c in cols], self.seen)
        plan = RowPlan(self.fingerprint, keys, [None] * len(keys))
        return self.verified(RowPlan(self.fingerprint, keys, self.find(keys))) if lookup else plan

    def verified(self, plan: RowPlan) -> RowPlan:
        """`plan` without the rows whose objects fail verification (quarantined)."""
        found = plan.found
        bad = {f[0] for f in found if f is not None and not self.store.reuse(f[0])}
        if bad:
            found = [None if f is not None and f[0] in bad else f for f in found]
        return RowPlan(plan.fingerprint, plan.keys, found)


def check_row_wise(step: _Step) -> None:
    if step.row_wise and step.kind != "normal":
        raise PipelineError(f"step {step.name}: only normal steps can be row-wise")
    if step.row_wise and not (step.row_key_columns() and step.outputs):
        raise PipelineError(
            f"step {step.name}: a row-wise step declares its input and output columns "
            "(inputs=[...], outputs=[...]); its row keys are made of the inputs"
        )


def compute_rows(
    store: Store,
    step: _Step,
    table: pa.Table,
    plan: RowPlan,
    compute: Callable[[_Step, pa.Table], tuple[pa.Table, str | None]],
) -> tuple[pa.Table, str | None, pa.Table | None]:
    """The batch output: `compute` (process) on the rows the plan did not find, the
    others taken from their earlier results; (output, skipped error, the reused rows'
    own columns)."""
    import pyarrow as pa

    own = [*step.outputs, METADATA_COLUMN]
    missing = [i for i, f in enumerate(plan.found) if f is None]
    parts: list[pa.Table] = []
    skipped = None
    if missing:
        sub = table.take(pa.array(missing, pa.int64())) if len(missing) < table.num_rows else table
        out, skipped = compute(step, sub)
        if out.num_rows != len(missing):
            raise StepFailed(
                f"step {step.name} is row-wise but returned {out.num_rows} rows for "
                f"{len(missing)}; a row-wise step returns one row per input row"
            )
        parts.append(_own_columns(out, own).append_column(POS, pa.array(missing, pa.int64())))
    reused = _reused_rows(store, plan, own)
    if reused is not None:
        parts.append(reused)
    combined = pa.concat_tables(parts, promote_options="permissive").sort_by(POS)
    result = table.drop_columns([c for c in own if c in table.column_names])
    for name in combined.column_names:
        if name != POS:
            result = result.append_column(name, combined.column(name))
    return result, skipped, (reused.drop_columns([POS]) if reused is not None else None)


def _own_columns(table: pa.Table, own: list[str]) -> pa.Table:
    return table.select([c for c in own if c in table.column_names])


def _reused_rows(store: Store, plan: RowPlan, own: list[str]) -> pa.Table | None:
    import pyarrow as pa

    by_oid: dict[str, tuple[list[int], list[int]]] = {}
    for pos, f in enumerate(plan.found):
        if f is not None:
            rows, positions = by_oid.setdefault(f[0], ([], []))
            rows.append(f[1])
            positions.append(pos)
    if not by_oid:
        return None
    parts = []
    for oid, (rows, positions) in by_oid.items():
        # The driver verified these objects when it made the plan (RowIndex.plan).
        taken = _own_columns(store.get_table(oid, verify=False), own).take(pa.array(rows))
        parts.append(taken.append_column(POS, pa.array(positions, pa.int64())))
    return pa.concat_tables(parts, promote_options="permissive")


def write_segment(store: Store, plan: RowPlan, output: str) -> str:
    """The segment of a batch whose output object is `output`, then its marker."""
    import pyarrow as pa

    table = pa.table({"row_key": pa.array(plan.keys, pa.binary(32))}).replace_schema_metadata(
        {OUTPUT_META: output.encode(), FP_META: plan.fingerprint.encode()}
    )
    seg = store.put_table(table)
    store.add_row_segment(plan.fingerprint, seg)
    return seg


def segment_of(entry_info: dict[str, Any]) -> str | None:
    seg = entry_info.get("row_index")
    return seg if isinstance(seg, str) and len(seg) == 64 else None
