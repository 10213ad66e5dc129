"""What a row-wise batch's segment says of its rows besides their keys (RowInfo), and
the metadata column of rows taken by row key.

A row-wise step's rows are reused wherever its declared input values recur, under other
upstream steps, in other pipelines, under another step name. Its declared output columns
depend only on those values, but the metadata column (`castore_metadata`: one entry per
step that wrote one, e.g. an LLM task's raw output and usage) also carries the entries of
the steps before it. A reused row takes the entries the step itself wrote from its
earlier result, and every other entry from the current input: copying the earlier row's
column whole gave an upstream step's entry from the run that computed the row (its old
raw output beside its new generation), or dropped the current upstream entries when the
row was first computed without any. An entry filed under the step's own name (or ending
in `_<name>`, as distilabel's `raw_output_<name>`) is filed under its current name (LLM
tasks write under their name, and count their usage by it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from castore.store.models import RowInfo
from castore.store.parquet import METADATA_COLUMN

if TYPE_CHECKING:
    import pyarrow as pa

    from castore.pipeline.step import _Step


def row_info(
    step: _Step, answered: int, seconds: float, given: pa.Table, output: pa.Table
) -> RowInfo:
    """The segment's info of a batch whose `answered` rows (those with a key) cost
    `seconds` (computing the missing ones now, plus what the reused ones took when they
    were made), for input `given` and `output`."""
    per_row = round(seconds / answered, 6) if answered else None
    return RowInfo(seconds_per_row=per_row, step=step.name, metadata_keys=own_keys(given, output))


def own_keys(given: pa.Table, output: pa.Table) -> list[str] | None:
    """The metadata entries the step wrote: those its output rows have and their input
    rows have not, or have otherwise. None when the output has no metadata column."""
    if METADATA_COLUMN not in output.column_names:
        return None
    before = _column(given, output.num_rows)
    keys: set[str] = set()
    for a, b in zip(before, output.column(METADATA_COLUMN).to_pylist(), strict=True):
        a = a or {}
        keys.update(k for k, v in (b or {}).items() if v is not None and a.get(k) != v)
    return sorted(keys)


def with_reused_metadata(
    step: _Step,
    given: pa.Table,
    combined: pa.Table,
    found: list[tuple[str, int] | None],
    infos: dict[str, RowInfo],
) -> pa.Table:
    """`combined` (the batch's own columns in input order) with the metadata of the rows
    `found` by key (their segments' `infos`) made of the current input's entries and the
    step's own."""
    import pyarrow as pa

    if METADATA_COLUMN not in given.column_names and METADATA_COLUMN not in combined.column_names:
        return combined
    current = _column(given, combined.num_rows)
    values = _column(combined, combined.num_rows)
    for pos, f in enumerate(found):
        if f is not None:
            values[pos] = _merged(current[pos], values[pos], infos.get(f[0]), step.name)
    if METADATA_COLUMN in combined.column_names:
        combined = combined.drop_columns([METADATA_COLUMN])
    if all(v is None for v in values):
        return combined
    return combined.append_column(METADATA_COLUMN, pa.array(values))


def _column(table: pa.Table, n: int) -> list[Any]:
    if METADATA_COLUMN in table.column_names:
        return table.column(METADATA_COLUMN).to_pylist()
    return [None] * n


def _merged(
    current: dict[str, Any] | None,
    stored: dict[str, Any] | None,
    info: RowInfo | None,
    name: str | None,
) -> dict[str, Any] | None:
    out = dict(current or {})
    stored = stored or {}
    if info is not None and info.metadata_keys is not None:
        own = info.metadata_keys
    else:  # a segment from before RowInfo: entries the current input does not have
        own = [k for k, v in stored.items() if v is not None and out.get(k) is None]
    old = info.step if info is not None else None
    for k in own:
        if stored.get(k) is not None:
            out[_renamed(k, old, name)] = stored[k]
    return out or None


def _renamed(key: str, old: str | None, new: str | None) -> str:
    """An entry the step filed under its name (`judge`, or `raw_output_judge` as
    distilabel's tasks do), filed under the name it has now."""
    if not old or not new or old == new:
        return key
    if key == old:
        return new
    if key.endswith(f"_{old}"):
        return key[: -len(old)] + new
    return key
