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
it, and fsck checks it. The in-memory index of a step is built on its first batch miss,
from its pack (castore.store.rowpack) and the segments the pack does not cover: sorted
arrays of the keys' first 128 bits and where each row is.

The driver keys each batch miss in stream order (a cached batch's keys are in its
segment, read only when a later miss needs them); it finds the rows already produced
under the same fingerprint (any pipeline, batch size or run), verifies their objects,
and sends the worker a RowPlan; the worker calls `process` only on the missing rows and
assembles the batch in input order: the current input columns, plus the step's output
columns (and metadata) from the stored rows or the new ones.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from castore.errors import CastoreError, CorruptObject, PipelineError, StepFailed, UnknownObject
from castore.hashing import base_row_keys, occurrence_key
from castore.pipeline.rowinfo import with_reused_metadata
from castore.store import rowpack
from castore.store.extend import needs_of
from castore.store.models import RowInfo
from castore.store.parquet import METADATA_COLUMN

if TYPE_CHECKING:
    import pyarrow as pa

    from castore.pipeline.step import _Step
    from castore.store import Store

OUTPUT_META = b"castore_output"
FP_META = b"castore_fingerprint"
INFO_META = b"castore_row_info"  # castore.store.models.RowInfo, JSON
POS = "__castore_pos"
NO_KEY = bytes(32)  # a row with no result to reuse (it failed), in a segment
# Segments outside the pack that make a load write a new pack (each costs ~0.6 ms to load
# on its own; a pack of a million keys loads in a few ms).
PACK_AFTER = 16

log = logging.getLogger(__name__)

Found = tuple[str, int]  # (output object, row in it)


@dataclass(frozen=True)
class RowPlan:
    """What the driver found for one batch: per input row its key and, when an earlier
    result exists, where it is."""

    fingerprint: str
    keys: list[bytes]
    found: list[Found | None]
    # What the segments of the found rows' objects say of them (by object id).
    infos: dict[str, RowInfo] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        """What computing the found rows took when they were made (their segments'
        seconds per row): the seconds a reuse saves."""
        per_row = {o: i.seconds_per_row or 0.0 for o, i in self.infos.items()}
        return sum(per_row.get(f[0], 0.0) for f in self.found if f is not None)

    @property
    def reused(self) -> int:
        return sum(f is not None for f in self.found)

    @property
    def missing(self) -> list[bytes]:
        """The keys of the rows with no earlier result: what the batch computes."""
        return [k for k, f in zip(self.keys, self.found, strict=True) if f is None]

    def without(self, positions: list[int]) -> RowPlan:
        """The plan with the keys at `positions` blanked (failed rows: never found)."""
        gone = set(positions)
        keys = [NO_KEY if i in gone else k for i, k in enumerate(self.keys)]
        return RowPlan(self.fingerprint, keys, self.found, self.infos)


class RowIndex:
    """row key -> (output object, row) for one step fingerprint, and the keys of the
    step's input stream so far in this run.

    Loaded segments become three sorted numpy arrays (the key's first and second 64 bits,
    and where the row is), so a million keys load in well under a second and take ~24
    bytes each; lookups are a vectorized binary search per batch. They are loaded on the
    step's first batch miss: a run whose batches all hit never reads them. Rows made
    during this run are not added: within a run every key is new (equal rows get their
    own keys)."""

    def __init__(
        self,
        store: Store,
        fingerprint: str,
        *,
        fetch_segments: Callable[[str], object] | None = None,
        fetch: Callable[[str], bool] | None = None,
        writes: bool = True,
    ) -> None:
        import numpy as np

        self.store = store
        self.fingerprint = fingerprint
        # Keys of the rows of the step's input stream so far: the n-th equal row's key is
        # the first occurrence_key not among them.
        self.prior: set[bytes] = set()
        # Segments of batch hits whose keys are not read yet (see keys()).
        self._deferred: list[str] = []
        self._loaded = False
        self._segments: set[str] = set()  # the segments in the arrays
        self._oids: list[str] = []
        self._infos: dict[str, RowInfo] = {}  # output object -> what its segment says
        # Rows of segments announced since the load (refresh): (key hi, key lo) -> where.
        self._since: dict[tuple[int, int], Found] = {}
        self._hi = np.zeros(0, np.uint64)
        self._lo = np.zeros(0, np.uint64)
        self._loc = np.zeros(0, np.int64)  # oid index << 32 | row
        # Read-through: the remote's segments of this step before loading, and a found
        # row's object when it is not here.
        self._fetch_segments = fetch_segments
        self.fetch = fetch
        self.writes = writes  # False: cas status (drops no segment, writes no pack)

    @classmethod
    def load(cls, store: Store, fingerprint: str) -> RowIndex:
        index = cls(store, fingerprint)
        index._load()
        return index

    def _load(self) -> None:
        """The step's pack (castore.store.rowpack), minus the rows of segments whose
        markers are gone, plus the segments it does not cover; a new pack is written when
        those are many (or the pack is mostly stale), so the next load reads one object."""
        import numpy as np

        if self._loaded:
            return
        self._loaded = True
        if self._fetch_segments is not None:
            self._fetch_segments(self.fingerprint)
        live = self.store.row_segments(self.fingerprint)
        alive = set(live)
        pack_id = rowpack.current(self.store, self.fingerprint)
        pack = rowpack.read(self.store, pack_id, self.writes) if pack_id is not None else None
        his, los, locs = [], [], []
        stale = 0
        if pack is not None:
            self._oids, segs = list(pack.outputs), list(pack.segments)
            self._infos.update((o, i) for o, i in zip(pack.outputs, pack.infos, strict=True) if i)
            keep = np.array([s in alive for s in segs], bool)[pack.loc >> 32]
            stale = int(len(keep) - keep.sum())
            if stale:
                his, los, locs = [pack.hi[keep]], [pack.lo[keep]], [pack.loc[keep]]
            else:  # the memory-mapped arrays themselves
                his, los, locs = [pack.hi], [pack.lo], [pack.loc]
        else:
            segs = []
        packed = set(segs)
        fresh = [seg for seg in live if seg not in packed]
        for seg in fresh:
            part = self._read_segment(seg)
            if part is None:
                continue
            out, hi, lo, rows = part
            segs.append(seg)
            self._oids.append(out)
            his.append(hi)
            los.append(lo)
            locs.append(((len(segs) - 1) << 32) | rows)
        self._segments = {s for s in segs if s in alive}
        if pack is not None and len(his) == 1:  # already sorted
            self._hi, self._lo, self._loc = his[0], los[0], locs[0]
        elif his:
            hi, lo, loc = np.concatenate(his), np.concatenate(los), np.concatenate(locs)
            # Stable: the pack's (older) row wins a tie. Sorted by the first 64 bits only
            # (find() scans equal ones); the pack is one sorted run, so this is a merge.
            order = np.argsort(hi, kind="stable")
            self._hi, self._lo, self._loc = hi[order], lo[order], loc[order]
        if self.writes and (len(fresh) >= PACK_AFTER or (stale and stale * 4 > len(self._hi))):
            self._write_pack(segs, alive)
        # A deferred hit's keys must be in the arrays (keys() relies on it): a segment
        # without a marker, or made since, is read now.
        self._read_deferred([s for s in self._deferred if s not in self._segments])

    def _read_segment(self, seg: str) -> tuple[str, Any, Any, Any] | None:
        """(output object, key words hi and lo, rows) of a segment's answered rows; None
        when it cannot be read (verified: a corrupt one is quarantined and its marker
        dropped, except in a preview, which writes nothing)."""
        import numpy as np

        try:
            table = self._segment(seg)
            meta = table.schema.metadata or {}
            out = meta[OUTPUT_META].decode()
            col = table.column("row_key").combine_chunks()
        except (CastoreError, KeyError):
            if self.writes:
                self.store.drop_row_segment(self.fingerprint, seg)
            return None
        info = RowInfo.parse(meta.get(INFO_META))
        if info is not None:
            self._infos.setdefault(out, info)
        words = np.frombuffer(col.buffers()[1], ">u8", count=len(col) * 4).reshape(-1, 4)
        hi, lo = words[:, 0].astype(np.uint64), words[:, 1].astype(np.uint64)
        keep = (hi != 0) | (lo != 0)  # NO_KEY: a row that failed
        return out, hi[keep], lo[keep], np.arange(len(col), dtype=np.int64)[keep]

    def _segment(self, seg: str) -> pa.Table:
        """A segment, verified: a corrupt one is quarantined, except in a preview (cas
        status), which only checks it and writes nothing."""
        if self.writes:
            return self.store.get_table(seg)
        try:
            intact = self.store.verify(seg)
        except FileNotFoundError:
            raise UnknownObject(f"object {seg} is not in the store") from None
        if not intact:
            raise CorruptObject(seg)
        return self.store.get_table(seg, verify=False)

    def _write_pack(self, segs: list[str], alive: set[str]) -> None:
        """A pack of what is loaded, without segments whose markers are gone."""
        import numpy as np

        kept = [i for i, s in enumerate(segs) if s in alive]
        renumber = np.full(max(len(segs), 1), -1, np.int64)
        renumber[kept] = np.arange(len(kept), dtype=np.int64)
        loc = (renumber[self._loc >> 32] << 32) | (self._loc & 0xFFFFFFFF)
        outs = [self._oids[i] for i in kept]
        pack = rowpack.Pack(
            [segs[i] for i in kept],
            outs,
            self._hi,
            self._lo,
            loc,
            [self._infos.get(o) for o in outs],
        )
        try:
            rowpack.write(self.store, self.fingerprint, pack)
        except (OSError, CastoreError) as e:  # a cache of the segments: runs go on without
            log.warning("row-key pack of %s not written: %s", self.fingerprint[:12], e)

    def refresh(self) -> None:
        """Take in the segments announced since the load: another run's, made while this
        one waited for its claim on those rows (castore.pipeline.claims)."""
        if not self._loaded:
            self._load()
            return
        for seg in self.store.row_segments(self.fingerprint, known=self._segments):
            self._segments.add(seg)
            part = self._read_segment(seg)
            if part is not None:
                out, hi, lo, rows = part
                for h, lw, r in zip(hi.tolist(), lo.tolist(), rows.tolist(), strict=True):
                    self._since.setdefault((h, lw), (out, r))

    def __len__(self) -> int:
        self._load()
        return len(self._hi) + len(self._since)

    def hit(self, segment: str) -> None:
        """A batch hit at this point of the stream: its rows' keys are those of its
        (verified) segment, read only if a later miss has a row that might equal one."""
        if self._loaded and segment not in self._segments:
            self._read_deferred([segment])
        else:
            self._deferred.append(segment)

    def _read_deferred(self, segments: list[str] | None = None) -> None:
        """Add the keys of `segments` (default: every deferred one) to the stream's."""
        todo = list(self._deferred) if segments is None else segments
        for seg in todo:
            try:
                col = self._segment(seg).column("row_key")
            except CastoreError as e:
                raise PipelineError(
                    f"the row-key segment {seg[:12]} of a cached batch went missing during "
                    f"the run ({e}); run again"
                ) from None
            self.prior.update(col.to_pylist())
        done = set(todo)
        self._deferred = [s for s in self._deferred if s not in done]

    def find(self, keys: list[bytes]) -> list[Found | None]:
        import numpy as np

        self._load()
        out: list[Found | None] = [None] * len(keys)
        if not keys:
            return out
        n = len(self._hi)
        q = np.frombuffer(b"".join(keys), ">u8").reshape(-1, 4)  # a key's four 64-bit words
        if n:
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
        if self._since:
            for pos, (h, lw) in enumerate(q[:, :2].tolist()):
                if out[pos] is None:
                    out[pos] = self._since.get((h, lw))
        return out

    def keys(self, step: _Step, table: pa.Table) -> RowPlan:
        """The row keys of `table`, a batch's input (batches must come in stream order:
        equal rows are counted across them), nothing found yet.

        Hits before it in the stream were not keyed: their keys are in their segments,
        which are read only when some row here has values already in the index or in
        this stream (an earlier equal row could be among them). An appended row, new
        everywhere, reads nothing."""
        names = table.column_names
        require_input(step, names)
        cols = [table.column(c) for c in step.row_key_columns()]
        cols += [table.column(c) if c in names else None for c in step.optional_columns()]
        base = base_row_keys(self.fingerprint, cols)
        prior = self.prior
        if self._deferred and (
            any(b in prior for b in base) or any(f is not None for f in self.find(base))
        ):
            self._read_deferred()
        keys = []
        for b in base:
            k, n = b, 0
            while k in prior:
                n += 1
                k = occurrence_key(b, n)
            prior.add(k)
            keys.append(k)
        return RowPlan(self.fingerprint, keys, [None] * len(keys))

    def locate(self, plan: RowPlan) -> list[Found | None]:
        """Where the plan's rows were produced, without verifying or fetching (a
        preview: `found` checks each object before a run uses it)."""
        return [f if f is not None and self.store.has(f[0]) else None for f in self.find(plan.keys)]

    def found(self, plan: RowPlan) -> RowPlan:
        """`plan` with the earlier results of its rows, each object they are in read
        through (when there is a remote) and verified once; a corrupt one is quarantined
        and its rows are computed again."""
        # Rows found before (at planning, or after a claim) were verified then: only the
        # rest are looked up, so a batch looked at again reads no object twice.
        todo = [i for i, f in enumerate(plan.found) if f is None]
        if not todo:
            return plan
        found = list(plan.found)
        new = self.find([plan.keys[i] for i in todo])
        oids = {f[0] for f in new if f is not None}
        if self.fetch is not None:
            for oid in oids:
                if not self.store.has(oid):
                    self.fetch(oid)
        # An object that extends its input is read with what it extends: all of it intact.
        bad = {
            oid
            for oid in oids
            if not self.store.reuse(oid)
            or not all(map(self.store.reuse, needs_of(self.store, oid)))
        }
        for i, f in zip(todo, new, strict=True):
            found[i] = None if f is not None and f[0] in bad else f
        infos = {f[0]: self._infos[f[0]] for f in found if f is not None and f[0] in self._infos}
        return RowPlan(plan.fingerprint, plan.keys, found, infos)


def check_row_wise(step: _Step) -> None:
    if step.row_wise and step.kind != "normal":
        raise PipelineError(f"step {step.name}: only normal steps can be row-wise")
    if step.row_wise and not (step.row_key_columns() and step.outputs):
        raise PipelineError(
            f"step {step.name}: a row-wise step declares its input and output columns "
            "(inputs=[...], outputs=[...]); its row keys are made of the inputs"
        )


def require_input(step: _Step, names: list[str]) -> None:
    """Fail the batch when its input (columns `names`) lacks a column the step requires:
    where the columns before it are not known at build (a file's), a typo would otherwise
    read as None, or key rows by a column that is not there."""
    missing = [c for c in step.input_columns() if c not in names]
    if missing:
        raise StepFailed(
            f"step {step.name}: its input has no column {missing[0]!r} (it has {names}); "
            "check the column's name, or map it with input_mappings"
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

    own = [*step.output_columns_named(), METADATA_COLUMN]
    missing = [i for i, f in enumerate(plan.found) if f is None]
    parts: list[pa.Table] = []
    skipped = None
    failed: list[int] | None = []
    if missing:
        sub = table.take(pa.array(missing, pa.int64())) if len(missing) < table.num_rows else table
        out, skipped, failed_sub = _compute_declared(step, sub, compute)
        failed = [missing[j] for j in failed_sub] if failed_sub else None
        if out.num_rows != len(missing):
            raise StepFailed(
                f"step {step.name} is row-wise but returned {out.num_rows} rows for "
                f"{len(missing)}; a row-wise step returns one row per input row"
            )
        given = {*step.row_key_columns(), *step.optional_columns(), *own}
        extra = [c for c in out.column_names if c not in given]
        if extra:  # only the declared outputs are kept per row key: it would be lost
            raise StepFailed(
                f"step {step.name} is row-wise but returned column {extra[0]!r}, which is not "
                f"among its outputs {step.output_columns_named()}; declare it in "
                "outputs=[...] or drop row_wise"
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
    own_reused = None
    if reused is not None:
        combined = with_reused_metadata(step, table, combined, plan.found, plan.infos)
        at = [i for i, f in enumerate(plan.found) if f is not None]
        own_reused = combined.take(pa.array(at, pa.int64())).drop_columns([POS])
    result = table.drop_columns([c for c in own if c in table.column_names])
    for name in combined.column_names:
        if name != POS:
            result = result.append_column(name, combined.column(name))
    return result, skipped, own_reused, failed


def _compute_declared(
    step: _Step,
    table: pa.Table,
    compute: Callable[[_Step, pa.Table], tuple[pa.Table, str | None, list[int]]],
) -> tuple[pa.Table, str | None, list[int]]:
    """`compute` on the columns the row keys are made of (and the metadata column, which
    the step extends): a row found by key is reused for any row with the same values of
    them, so a computed row must not depend on any other column. The other columns come
    back from the input when the batch is assembled."""
    declared = [*step.row_key_columns(), *step.optional_columns()]
    seen = [c for c in (*declared, METADATA_COLUMN) if c in table.column_names]
    for target in step.output_mappings.values():
        if target in table.column_names and target not in seen:
            raise mapping_clash(step.name, target)  # unseen by the step: map_output cannot tell
    try:
        return compute(step, table.select(seen))
    except KeyError as e:
        col = e.args[0] if e.args else None
        logical = set(declared) | set(step.input_mappings)
        if isinstance(col, str) and col in table.column_names and col not in logical:
            raise StepFailed(
                f"step {step.name} is row-wise and reads column {col!r}, which is not among "
                f"its inputs {declared}: rows are reused by the values of their inputs "
                f"alone; declare {col!r} in inputs=[...] or drop row_wise"
            ) from None
        raise


def mapping_clash(step: str | None, column: str) -> StepFailed:
    return StepFailed(
        f"step {step}: output_mappings writes column {column!r}, which its output already "
        "has; one would overwrite the other: map it to another name"
    )


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
        # The driver verified these objects when it made the plan (RowIndex.found).
        taken = _own_columns(store.get_table(oid, verify=False), own).take(pa.array(rows))
        parts.append(taken.append_column(POS, pa.array(positions, pa.int64())))
    return pa.concat_tables(parts, promote_options="permissive")


def answered(plan: RowPlan) -> int:
    """The rows with a key (a failed row has none: NO_KEY)."""
    return sum(k != NO_KEY for k in plan.keys)


def write_segment(store: Store, plan: RowPlan, output: str, info: RowInfo | None = None) -> str:
    """The segment of a batch whose output object is `output`, then its marker. `info`
    (castore.pipeline.rowinfo) goes in its metadata; the batch's entry records it too, so
    a segment written again from the keys has the same bytes."""
    import pyarrow as pa

    meta = {OUTPUT_META: output.encode(), FP_META: plan.fingerprint.encode()}
    if info is not None:
        meta[INFO_META] = info.encoded()
    table = pa.table({"row_key": pa.array(plan.keys, pa.binary(32))}).replace_schema_metadata(meta)
    seg = store.put_table(table)
    store.add_row_segment(plan.fingerprint, seg)
    return seg
