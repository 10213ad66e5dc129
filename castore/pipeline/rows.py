"""Row-level reuse for row-wise steps (DESIGN.md "Row keys").

A row-wise step's output row depends only on the values of its declared input columns
in its own input row, and is that input row plus its declared output columns. Its row
key is blake3(fingerprint, tagged input values), and for the n-th equal row of the
step's input also n (castore.hashing.row_keys): not the row's position, batch, pipeline
or other columns.

Every computed batch of a row-wise step writes, after its output object, a *segment*:
an immutable Parquet object with one 32-byte row key per output row, in row order, whose
schema metadata names the output object. A marker file index/<fingerprint>/<segment id>
announces it (castore.store.Store.add_row_segment). The batch record and the action entry
name the segment, so gc keeps it exactly while it keeps the batch, push and pull move
it, and fsck checks it. The in-memory index of a step is built from its segments on its
first batch: sorted arrays of the keys' first 128 bits and where each row is.

The driver computes every batch's row keys in stream order; on a batch miss it finds the
rows already
produced under the same fingerprint (any pipeline, batch size or run), verifies their
objects, and sends the worker a RowPlan; the worker calls `process` only on the missing
rows and assembles the batch in input order: the current input columns, plus the step's
output columns (and metadata) from the stored rows or the new ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

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
NO_KEY = bytes(32)  # a row with no result to reuse (it failed), in a segment

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

    def without(self, positions: list[int]) -> RowPlan:
        """The plan with the keys at `positions` blanked (failed rows: never found)."""
        gone = set(positions)
        keys = [NO_KEY if i in gone else k for i, k in enumerate(self.keys)]
        return RowPlan(self.fingerprint, keys, self.found)


class RowIndex:
    """row key -> (output object, row) for one step fingerprint.

    Loaded segments become three sorted numpy arrays (the key's first and second 64 bits,
    and where the row is), so a million keys load in well under a second and take ~24
    bytes each; lookups are a vectorized binary search per batch. Rows made during this
    run are not added: within a run every key is new (equal rows get their own keys)."""

    def __init__(self, store: Store, fingerprint: str) -> None:
        import numpy as np

        self.store = store
        self.fingerprint = fingerprint
        self.seen: dict[bytes, int] = {}  # values so far, in stream order (row_keys)
        self._oids: list[str] = []
        self._hi = np.zeros(0, np.uint64)
        self._lo = np.zeros(0, np.uint64)
        self._loc = np.zeros(0, np.int64)  # oid index << 32 | row
        # Read-through: brings a found row's object from the remote when it is not here.
        self.fetch: Callable[[str], bool] | None = None

    @classmethod
    def load(cls, store: Store, fingerprint: str) -> RowIndex:
        import numpy as np

        index = cls(store, fingerprint)
        his, los, locs = [], [], []
        for seg in store.row_segments(fingerprint):
            try:
                table = store.get_table(seg)  # verified: a corrupt segment is skipped
                out = (table.schema.metadata or {})[OUTPUT_META].decode()
                col = table.column("row_key").combine_chunks()
            except (CastoreError, KeyError):
                store.drop_row_segment(fingerprint, seg)
                continue
            words = np.frombuffer(col.buffers()[1], ">u8", count=len(col) * 4).reshape(-1, 4)
            index._oids.append(out)
            his.append(words[:, 0].astype(np.uint64))
            los.append(words[:, 1].astype(np.uint64))
            rows = np.arange(len(col), dtype=np.int64)
            locs.append(((len(index._oids) - 1) << 32) | rows)
        if his:
            hi, lo, loc = np.concatenate(his), np.concatenate(los), np.concatenate(locs)
            keep = (hi != 0) | (lo != 0)  # NO_KEY: a row that failed
            hi, lo, loc = hi[keep], lo[keep], loc[keep]
            order = np.lexsort((lo, hi))  # stable: the first segment's row wins a tie
            index._hi, index._lo, index._loc = hi[order], lo[order], loc[order]
        return index

    def __len__(self) -> int:
        return len(self._hi)

    def find(self, keys: list[bytes]) -> list[Found | None]:
        import numpy as np

        out: list[Found | None] = [None] * len(keys)
        n = len(self._hi)
        if n and keys:
            q = np.frombuffer(b"".join(keys), ">u8").reshape(-1, 4)
            qhi, qlo = q[:, 0].astype(np.uint64), q[:, 1].astype(np.uint64)
            at = np.minimum(np.searchsorted(self._hi, qhi), n - 1)
            same_hi = self._hi[at] == qhi
            hit = same_hi & (self._lo[at] == qlo)
            for i in np.flatnonzero(hit):
                loc = int(self._loc[at[i]])
                out[i] = (self._oids[loc >> 32], loc & 0xFFFFFFFF)
            for i in np.flatnonzero(same_hi & ~hit):  # 64-bit prefixes that collide: rare
                j = int(at[i]) + 1
                while j < n and self._hi[j] == qhi[i]:
                    if self._lo[j] == qlo[i]:
                        loc = int(self._loc[j])
                        out[i] = (self._oids[loc >> 32], loc & 0xFFFFFFFF)
                        break
                    j += 1
        return out

    def keys(self, step: _Step, table: pa.Table) -> RowPlan:
        """The row keys of `table`, a batch's input (batches must come in stream order:
        equal rows are counted across them), nothing found yet."""
        cols = step.row_key_columns()
        missing = [c for c in cols if c not in table.column_names]
        if missing:
            raise StepFailed(f"step {step.name}: its input lacks column {missing[0]!r}")
        keys = row_keys(self.fingerprint, [table.column(c).to_pylist() for c in cols], self.seen)
        return RowPlan(self.fingerprint, keys, [None] * len(keys))

    def found(self, plan: RowPlan) -> RowPlan:
        """`plan` with the earlier results of its rows, each object they are in read
        through (when there is a remote) and verified once; a corrupt one is quarantined
        and its rows are computed again."""
        found = self.find(plan.keys)
        oids = {f[0] for f in found if f is not None}
        if self.fetch is not None:
            for oid in oids:
                if not self.store.has(oid):
                    self.fetch(oid)
        bad = {oid for oid in oids if not self.store.reuse(oid)}
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
    compute: Callable[[_Step, pa.Table], tuple[pa.Table, str | None, list[int]]],
) -> tuple[pa.Table, str | None, pa.Table | None, list[int] | None]:
    """The batch output: `compute` (process) on the rows the plan did not find, the
    others taken from their earlier results; (output, skipped error, the reused rows'
    own columns, positions of the rows that failed when the step says which)."""
    import pyarrow as pa

    own = [*step.outputs, METADATA_COLUMN]
    missing = [i for i, f in enumerate(plan.found) if f is None]
    parts: list[pa.Table] = []
    skipped = None
    failed: list[int] | None = []
    if missing:
        sub = table.take(pa.array(missing, pa.int64())) if len(missing) < table.num_rows else table
        out, skipped, failed_sub = compute(step, sub)
        failed = [missing[j] for j in failed_sub] if failed_sub else None
        if out.num_rows != len(missing):
            raise StepFailed(
                f"step {step.name} is row-wise but returned {out.num_rows} rows for "
                f"{len(missing)}; a row-wise step returns one row per input row"
            )
        for col in step.row_key_columns():
            # Its outputs are placed by position: a reordered or rewritten input row would
            # give another row's answer.
            if col in out.column_names and out[col].to_pylist() != sub[col].to_pylist():
                raise StepFailed(
                    f"step {step.name} is row-wise but its output rows do not keep the order "
                    f"and values of input column {col!r}; return one row per input row, in "
                    "order, or drop row_wise"
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
    own_reused = reused.drop_columns([POS]) if reused is not None else None
    return result, skipped, own_reused, failed


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
