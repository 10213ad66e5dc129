"""Running one planned batch: read its input slices, call `process`, store the output.

Order (DESIGN.md "Running" 3): the output object is written first, then the action
entry, so an action entry never names a missing object.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from castore import jobctx
from castore.errors import RowsFailed, StepFailed
from castore.hashing import hash_bytes
from castore.pipeline.calls import normalize_output, process_chunks, to_table
from castore.pipeline.rowinfo import row_info
from castore.pipeline.rows import (
    RowPlan,
    answered,
    compute_rows,
    mapping_clash,
    require_input,
    write_segment,
)
from castore.pipeline.step import (
    BatchIncomplete,
    _Step,
)
from castore.store.extend import Extension, assemble, concat, remember, split
from castore.store.models import ActionEntry, RowInfo
from castore.store.parquet import METADATA_COLUMN, as_read, encode_parquet

if TYPE_CHECKING:
    import pyarrow as pa

    from castore.store import Store

Slice = tuple[str, int, int]  # (object id, offset, length)


@dataclass(frozen=True)
class BatchResult:
    outputs: list[str]
    rows: list[int]
    seconds: float
    columns: list[tuple[str, str]]
    skipped_error: str | None = None
    tokens: int = 0
    entry_written: bool = True  # False from Ray workers: the driver writes the entry
    row_index: str | None = None  # row-wise steps: the batch's row-key segment
    # The objects the outputs extend (castore.store.extend): kept and moved with them.
    needs: list[str] = dataclasses.field(default_factory=list)
    rows_reused: int = 0  # rows taken from earlier results by row key
    tokens_reused: int = 0  # what those rows cost when they were made
    cost_usd: float = 0.0  # `tokens` at the step's LLM prices
    cost_usd_reused: float = 0.0
    seconds_reused: float = 0.0  # what computing those rows took when they were made
    row_info: RowInfo | None = None  # what its segment says besides the keys


class TableCache:
    """Input tables by object id, bounded by bytes: ones just read (a downstream batch often
    reads the same upstream object as its neighbour when batch sizes differ), and ones just
    written (`keep`: a step's output is read by its successor moments later, and decoding
    the Parquet again costs more than the step's own work at small batches)."""

    def __init__(self, budget: int = 4 << 20) -> None:
        self._items: OrderedDict[str, pa.Table] = OrderedDict()
        self._budget, self._bytes = budget, 0
        self._lock = threading.Lock()

    def get(self, store: Store, oid: str) -> pa.Table:
        with self._lock:
            if oid in self._items:
                self._items.move_to_end(oid)
                return self._items[oid]
        table = store.get_table(oid)
        self._add(oid, table)
        return table

    def keep(
        self, oid: str, table: pa.Table, buf: pa.Buffer, ext: tuple[Extension, pa.Table] | None
    ) -> None:
        """Hold a table just stored as `oid` (encoded as `buf`) as reading `oid` back
        gives it, when that is known (`as_read`). `ext`: `table` is the columns of an
        object that extends its input, with its footer and the input (as read)."""
        kept = as_read(table, buf, footer=ext is not None)
        if kept is not None and ext is not None:
            kept = assemble(oid, kept, ext[0], ext[1])
        if kept is not None:
            self._add(oid, kept)

    def _add(self, oid: str, table: pa.Table) -> None:
        size = table.get_total_buffer_size()
        if size > self._budget // 4:
            return  # a big table would flush everything else for one reader
        with self._lock:
            if oid in self._items:
                return
            self._items[oid] = table
            self._bytes += size
            while self._bytes > self._budget:
                self._bytes -= self._items.popitem(last=False)[1].get_total_buffer_size()


def read_input(store: Store, slices: list[list[Slice]], cache: TableCache, step: _Step) -> pa.Table:
    """The input rows of a batch of `step`: per predecessor its slices, then aligned row
    by row. A column the step groups (GroupColumns) becomes one list per row, a value
    per predecessor in predecessor order, instead of being merged by name. Each row comes
    `step.rows_per_input()` times in a row (several answers per row, each its own)."""
    import pyarrow as pa

    table = _read(store, slices, cache, step.grouped_columns())
    n = step.rows_per_input()
    if n == 1 or not table.num_rows:
        return table
    return table.take(pa.array([i for i in range(table.num_rows) for _ in range(n)]))


def _read(
    store: Store, slices: list[list[Slice]], cache: TableCache, grouped: Sequence[str]
) -> pa.Table:
    import pyarrow as pa

    per_pred = []
    # A predecessor with no slices gave nothing to this batch: a branch of a routing step
    # the batch was not sent to (aligned fan-in gives every predecessor the same rows).
    for pred_slices in [s for s in slices if s] or slices[:1]:
        per_pred.append(
            concat([cache.get(store, oid).slice(off, n) for oid, off, n in pred_slices])
        )
    lists = {}
    for name in grouped:
        lacking = [i for i, t in enumerate(per_pred, 1) if name not in t.column_names]
        if lacking and any(t.num_rows for t in per_pred):
            # A None in its place would be a value nobody produced.
            raise StepFailed(
                f"predecessor {lacking[0]} has no column {name!r} to group; every "
                "predecessor of GroupColumns writes each grouped column"
            )
        values = [t.column(name).to_pylist() if t.num_rows else [] for t in per_pred]
        lists[name] = pa.array([list(v) for v in zip(*values, strict=True)])
        per_pred = [t.drop_columns([name]) if name in t.column_names else t for t in per_pred]
    table = _merge_by_name(per_pred)
    for name, col in lists.items():
        table = table.append_column(name, col)
    return table


def _merge_by_name(per_pred: list[pa.Table]) -> pa.Table:
    table = per_pred[0]
    for i, other in enumerate(per_pred[1:], start=2):
        for name in other.column_names:
            col = other.column(name)
            if name not in table.column_names:
                table = table.append_column(name, col)
            elif name == METADATA_COLUMN:
                # Per-step entries: each branch adds its own steps' (as distilabel merges).
                at = table.column_names.index(name)
                table = table.set_column(at, name, _merge_metadata(table.column(name), col))
            elif not _same(table.column(name), col):
                # The build-time check (Pipeline.validate) names the steps; this catches
                # columns no step declared. One silently overwriting the other would be a
                # wrong dataset.
                raise StepFailed(
                    f"its predecessors disagree on column {name!r} (predecessor {i} differs "
                    "from an earlier one): rename it on one side (RenameColumns)"
                )
    return table


def _merge_metadata(a: Any, b: Any) -> Any:
    import pyarrow as pa

    rows = [
        {**(x or {}), **(y or {})} or None
        for x, y in zip(a.to_pylist(), b.to_pylist(), strict=True)
    ]
    return pa.array(rows)


def _same(a: Any, b: Any) -> bool:
    """Equal values (a column passed through both branches), whatever Arrow type each
    branch inferred."""
    return bool(a.equals(b)) or a.to_pylist() == b.to_pylist()


def map_input(step: _Step, table: pa.Table) -> pa.Table:
    """The input as `process` sees it: `input_mappings` applied (VALUE read as KEY), once
    it has every column the step requires (rows.require_input)."""
    names = table.column_names
    if names:  # a batch without columns has no rows to read them from
        require_input(step, names)
    if not step.input_mappings:
        return table
    for logical, actual in step.input_mappings.items():
        if names and actual not in names:
            raise StepFailed(
                f"step {step.name}: input_mappings reads column {actual!r} as {logical!r}, "
                f"but the input has no column {actual!r} (it has {names})"
            )
        if actual != logical and logical in names:
            raise StepFailed(
                f"step {step.name}: input_mappings reads column {actual!r} as {logical!r}, "
                f"but the input has a column {logical!r} too; rename one of them first"
            )
    back = {a: lo for lo, a in step.input_mappings.items()}
    return table.rename_columns([back.get(c, c) for c in names])


def map_output(step: _Step, table: pa.Table) -> pa.Table:
    """What `process` returned, renamed back: input columns to their names in the input,
    then `output_mappings` (KEY written as VALUE). A rename onto an existing column is an
    error: one would overwrite the other."""
    if not step.input_mappings and not step.output_mappings:
        return table
    absent = [c for c in step.output_mappings if c not in table.column_names]
    if table.num_columns and absent:
        raise StepFailed(
            f"step {step.name}: output_mappings renames column {absent[0]!r}, which its "
            f"output does not have (it has {table.column_names})"
        )
    mapping = {**step.input_mappings, **step.output_mappings}
    names = [mapping.get(c, c) for c in table.column_names]
    dup = next((c for c in names if names.count(c) > 1), None)
    if dup is not None:
        raise mapping_clash(step.name, dup)
    return table.rename_columns(names)


def chunk_rows(chunk: Any) -> Any:
    """What a generator yielded, without distilabel's `last_batch` flag: its generators
    yield `(rows, last_batch)`, and castore knows the end from the generator's end."""
    if isinstance(chunk, tuple) and len(chunk) == 2 and isinstance(chunk[1], bool):
        return chunk[0]
    return chunk


def generator_table(step: _Step, chunk: Any) -> pa.Table:
    """One chunk a generator yielded, as the table a run stores (mapped, checked)."""
    table = map_output(step, to_table([chunk_rows(chunk)]))
    check_outputs(step, table)
    return table


def check_outputs(step: _Step, table: pa.Table) -> None:
    if table.num_rows == 0:
        return
    missing = [c for c in step.output_columns_named() if c not in table.column_names]
    if missing:
        raise StepFailed(
            f"step {step.name}: its output lacks declared column {missing[0]!r} "
            f"(it returned {table.column_names})"
        )


def columns_of(table: pa.Table) -> list[tuple[str, str]]:
    return [(f.name, str(f.type)) for f in table.schema]


def store_batch(
    store: Store,
    step: _Step,
    key: str,
    table: pa.Table,
    seconds: float,
    *,
    cache: bool,
    rows: RowPlan | None = None,
    info: RowInfo | None = None,
    reused: Usage = (0, 0.0),
    tables: TableCache | None = None,
    base: tuple[list[Slice], pa.Table] | None = None,
) -> BatchResult:
    """The object, then (row-wise steps, given `rows` and their segment's `info`) its
    row-key segment, then (with
    `cache`) the action entry: an entry never names what is not yet stored. Tokens (and
    their cost) are those spent now: without the `reused` (tokens, USD) of rows taken by
    row key. `tables` keeps the table in memory for the step's successors, if any. `base`: the
    input's slices and rows, when the object may extend them (castore.store.extend)."""
    spent = usage_of(step, table)
    if step._leaf:
        # Nothing in the run reads a leaf's batches; kept, they would push out of the
        # budget the tables their successors are about to read (bench_overhead's anchor:
        # 243 of 800 reads went to disk).
        tables = None
    ext = None
    if base is not None:
        ext = split(store, table, base[1], base[0])
    if ext is None:
        buf = encode_parquet(table)
        oid = store.put_encoded(buf)
        needs: list[str] = []
        if tables is not None:
            tables.keep(oid, table, buf, None)
    else:
        own, footer = ext
        buf = encode_parquet(own, footer.encoded())
        oid = store.put_encoded(buf)
        needs = footer.needs
        if tables is not None:
            tables.keep(oid, own, buf, (footer, base[1]) if base else None)
    remember(oid, needs)
    segment = write_segment(store, rows, oid, info) if rows is not None else None
    res = BatchResult(
        [oid],
        [table.num_rows],
        seconds,
        columns_of(table),
        needs=needs,
        tokens=spent[0] - reused[0],
        row_index=segment,
        rows_reused=rows.reused if rows is not None else 0,
        tokens_reused=reused[0],
        cost_usd=max(spent[1] - reused[1], 0.0),
        cost_usd_reused=reused[1],
        seconds_reused=rows.seconds if rows is not None else 0.0,
        row_info=info if rows is not None else None,
    )
    if cache:
        store.put_action(key, entry_of(step.name, res), made_here=True)
    return res


def entry_cost(entry: ActionEntry) -> tuple[float, int, float]:
    """(seconds, tokens, USD) that computing an entry's batch took."""
    info = entry.info
    seconds, tokens, usd = info.get("seconds", 0.0), info.get("tokens", 0), info.get("cost_usd")
    return (
        float(seconds) if isinstance(seconds, (int, float)) else 0.0,
        int(tokens) if isinstance(tokens, int) else 0,
        float(usd) if isinstance(usd, (int, float)) else 0.0,
    )


def entry_of(step: str | None, res: BatchResult) -> ActionEntry:
    """The action entry of a computed batch (written by the worker that stored it, or by
    the driver for Ray workers)."""
    info: dict[str, Any] = {"step": step, "seconds": round(res.seconds, 6), "tokens": res.tokens}
    if res.cost_usd:
        info["cost_usd"] = round(res.cost_usd, 9)
    if res.row_index is not None:
        info["row_index"] = res.row_index
        if res.row_info is not None:
            info["row_info"] = res.row_info.model_dump(exclude_none=True)
    if res.needs:
        info["needs"] = res.needs
    return ActionEntry(
        schema_version=2 if res.needs else 1, outputs=res.outputs, rows=res.rows, info=info
    )


Usage = tuple[int, float]  # (tokens, USD at the step's prices)


def usage_of(step: _Step, table: pa.Table) -> Usage:
    """What a batch's rows cost: the usage in each row's metadata entry of this step (LLM
    steps write one per row, under their name; the entries of earlier steps a row carries
    are theirs, not this step's), and that usage at the step's prices."""
    if METADATA_COLUMN not in table.column_names or not step.name:
        return (0, 0.0)
    from castore.llms import usage_totals  # only steps after an LLM step get here

    name, prices = step.name, step.prices()
    entries = ((meta or {}).get(name) for meta in table.column(METADATA_COLUMN).to_pylist())
    total, prompt, completion = usage_totals(e.get("usage") for e in entries if isinstance(e, dict))
    return total, prices.cost(prompt, completion) if prices is not None else 0.0


def compute(step: _Step, table: pa.Table) -> tuple[pa.Table, str | None]:
    """Run `process` on a batch: (output table, error when some rows failed and the
    step keeps them with on_error="skip")."""
    out, skipped, _ = compute_detailed(step, table)
    return out, skipped


def compute_detailed(
    step: _Step, table: pa.Table, *, keep_rows: bool = False
) -> tuple[pa.Table, str | None, list[int]]:
    """`compute`, and the positions of the rows that failed (when the step says).
    `keep_rows`: with on_error="fail" too, the rows are returned when the step says
    which failed (the caller stores the others, then fails the batch)."""
    try:
        rows = map_input(step, table).to_pylist()
        out = map_output(step, to_table(process_chunks(step, rows)))
    except BatchIncomplete as e:
        if step.on_error != "skip" and not (keep_rows and e.failed is not None):
            raise
        # Keep the rows that succeeded (paid for), but the batch is not cached.
        out = map_output(step, to_table(normalize_output(e.rows)))
        return out, str(e), list(e.failed or [])
    check_outputs(step, out)
    return out, None, []


def execute_batch(
    store: Store,
    step: _Step,
    key: str,
    slices: list[list[Slice]],
    cache: TableCache,
    *,
    write_entry: bool = True,
    rows: RowPlan | None = None,
    computed: Callable[[], None] | None = None,
) -> BatchResult:
    """Compute a batch and store it: the object, then (row-wise steps, given `rows`) its
    row-key segment, then the action entry unless the driver writes it. `computed` is
    called between the two, once `process` has returned."""
    t0 = time.perf_counter()
    table = read_input(store, slices, cache, step)
    if rows is None:
        out, skipped = compute(step, table)
        reused = None
    else:
        keeping = functools.partial(compute_detailed, keep_rows=True)
        out, skipped, reused, failed = compute_rows(store, step, table, rows, keeping)
        if skipped is not None and failed is not None:
            # The rows that succeeded stay findable by row key; the failed ones do not.
            rows = rows.without(failed)
        elif skipped is not None:
            rows = None  # which rows failed is unknown: keep none as row results
    if computed is not None:
        computed()
    seconds = time.perf_counter() - t0
    res = store_batch(
        store,
        step,
        key,
        out,
        seconds,
        cache=write_entry and skipped is None,
        rows=rows,
        info=(
            row_info(step, answered(rows), seconds + rows.seconds, table, out)
            if rows is not None
            else None
        ),
        reused=usage_of(step, reused) if reused is not None else (0, 0.0),
        tables=cache,
        base=_base(step, slices, table),
    )
    # A stopping run's batch is not done, whatever on_error says: its rows given up are
    # asked by the next run (the executor reports it as stopped, not failed).
    if skipped is not None and (step.on_error != "skip" or jobctx.stopping()):
        msg = f"{skipped}; the rows answered are kept and not asked again"
        raise RowsFailed(msg, res.tokens, res.cost_usd, seconds)
    return dataclasses.replace(
        res, skipped_error=skipped, entry_written=write_entry or skipped is not None
    )


def _base(
    step: _Step, slices: list[list[Slice]], table: pa.Table
) -> tuple[list[Slice], pa.Table] | None:
    """The input a batch's object may extend: the rows of one predecessor as read, for a
    step that is not a leaf (the run folder's data/ files link a leaf's objects, so
    those stay whole)."""
    given = [s for s in slices if s]
    if step._leaf or len(given) != 1 or step.grouped_columns() or step.rows_per_input() != 1:
        return None
    return given[0], table


def skipped_batch(
    store: Store, step: _Step, slices: list[list[Slice]], error: str, cache: TableCache
) -> BatchResult:
    """on_error='skip': the input rows with None outputs and the error in metadata.
    No action entry is written, so the next run retries the batch."""
    import pyarrow as pa

    table = read_input(store, slices, cache, step)
    n = table.num_rows
    for col in step.output_columns_named():
        if col not in table.column_names:
            table = table.append_column(col, pa.nulls(n))
    meta = pa.array([{"error": error, "step": step.name}] * n)
    if METADATA_COLUMN in table.column_names:
        table = table.drop_columns([METADATA_COLUMN])
    table = table.append_column(METADATA_COLUMN, meta)
    oid = store.put_table(table)
    return BatchResult([oid], [n], 0.0, columns_of(table), skipped_error=error)


_process_store: dict[str, Store] = {}
_process_cache = TableCache()


def portable(e: Exception) -> Exception:
    """What a worker raises to the driver: RowsFailed as it is (the retry then finds the
    rows it stored), any other error as text, since exceptions from user code may not
    pickle."""
    return e if isinstance(e, RowsFailed) else RuntimeError(f"{type(e).__name__}: {e}")


def execute_in_process(
    root: str, step: _Step, key: str, slices: list[list[Slice]], rows: RowPlan | None = None
) -> Any:
    """Process-pool entry point: the same work as `execute_batch`, with a per-process
    Store; errors as `portable` makes them."""
    from castore.store import Store

    store = _process_store.get(root)
    if store is None:
        store = _process_store[root] = Store(root)
    try:
        return execute_batch(store, step, key, slices, _process_cache, rows=rows)
    except Exception as e:
        raise portable(e) from None


def execute_for_ray(
    root: str, step: _Step, key: str, slices: list[list[Slice]], rows: RowPlan | None = None
) -> Any:
    """Ray task: compute a batch and write its object; the driver writes the entry."""
    from castore.store import Store

    store = _process_store.get(root)
    if store is None:
        store = _process_store[root] = Store(root)
    try:
        return execute_batch(store, step, key, slices, _process_cache, write_entry=False, rows=rows)
    except Exception as e:
        raise portable(e) from None


def execute_for_ray_remote(
    remote_url: str, step: _Step, table: pa.Table, secrets: dict[str, str] | None = None
) -> Any:
    """Ray task for nodes that do not see the store: the driver sends the input rows,
    the worker writes the output object to the remote (verified by its digest) and the
    driver reads it through. `secrets` (the remote's credentials, castore.remote.
    worker_env) come as an argument, never through Ray's runtime environment, which Ray
    writes to its logs; they enter this worker's environment for its remote client."""
    from castore.remote import Remote
    from castore.store.parquet import encode_parquet

    t0 = time.perf_counter()
    try:
        out, skipped = compute(step, table)
    except Exception as e:
        raise portable(e) from None
    data = encode_parquet(out).to_pybytes()  # the bytes Store.put_table would store
    oid = hash_bytes(data)
    usage = usage_of(step, out)
    os.environ.update(secrets or {})
    remote = Remote(remote_url)
    if not remote.has(oid):
        remote.write(remote.layout.object_path(oid), data)
    return BatchResult(
        [oid],
        [out.num_rows],
        time.perf_counter() - t0,
        columns_of(out),
        skipped_error=skipped,
        tokens=usage[0],
        cost_usd=usage[1],
        entry_written=False,
    )
