"""Objects that extend their input (docs/store.md "Objects that extend their input").

Most steps add columns to the rows they are given: an LLM task adds its generation, a
scorer its score, and every input column passes through unchanged. Stored whole, each
such step's objects repeat every earlier column, so a pipeline of k column-adding steps
stores its prompts k times. A batch whose output has its input's rows, where some input
columns are unchanged (same field, equal values), is stored as the other columns alone,
and the object's Parquet footer names where the rest is: the input slices (the *base*,
objects of the predecessor), the output's column order, and every object reading this
one reads (`needs`, transitively: what gc, push, pull and fsck keep and move with it).

The object id covers the footer, so an id names the base too: reading an extension
verifies every object it reads, and a missing base is a missing object, never other rows.
A leaf step's objects stay whole: the run folder's data/ files are links to them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, ValidationError

from castore.errors import BadObject, StoreError
from castore.store.models import Oid
from castore.store.parquet import EXTENDS_KEY, without_footer

if TYPE_CHECKING:
    import pyarrow as pa

    from castore.store import Store

# An object reads at most this many others; a deeper chain is stored whole, so a read
# never opens more than a handful of files and a footer stays small.
MAX_NEEDS = 8
# A batch whose input holds less than this (Arrow bytes) is stored whole: the extension's
# footer (base slices, needs: ~250 B) would outweigh the compressed columns it saves.
# bench_overhead's 0-ms anchor (50 rows, ~4.6 kB inputs) passes it: its middle step
# stores 0.31 MB instead of 0.44 MB, at no measurable cost per batch (0.80-0.83 ms per
# batch and step, min of 5, either way; a 16 KiB threshold was kept when the check cost
# +5 %). LLM prompts pass it by far (50 rows of 400 characters are 20 kB).
MIN_BASE_BYTES = 2 << 10
_NEEDS_CACHE = 100_000

Slice = tuple[str, int, int]  # (object id, offset, length)


class Extension(BaseModel):
    """The footer of an object that extends its input."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base: list[tuple[Oid, int, int]]
    columns: list[str]
    needs: list[Oid]

    def encoded(self) -> dict[bytes, bytes]:
        return {EXTENDS_KEY: self.model_dump_json().encode()}


def extension_of(oid: str, table: pa.Table) -> Extension | None:
    """The extension footer of object `oid` (read as `table`), if it has one."""
    meta = table.schema.metadata
    raw = meta.get(EXTENDS_KEY) if meta else None
    return None if raw is None else _parse(oid, raw)


def _parse(oid: str, raw: bytes) -> Extension:
    """A footer as castore writes it, else BadObject: the object's bytes are intact (the
    id was verified, or comes from a trusted entry) but were not written by castore, so
    what it would read with them is not trusted either."""
    key = EXTENDS_KEY.decode()
    try:
        ext = Extension.model_validate_json(raw)
    except ValidationError as e:
        raise BadObject(oid, f"has a malformed {key} footer ({e.errors()[0]['msg']})") from None
    named = {b for b, _, _ in ext.base}
    if len(ext.needs) > MAX_NEEDS or not named <= set(ext.needs) or oid in ext.needs:
        raise BadObject(
            oid,
            f"has a {key} footer castore does not write (it names more than {MAX_NEEDS} "
            "objects, itself, or bases it does not list as needs)",
        )
    return ext


def split(
    store: Store, out: pa.Table, inp: pa.Table, base: list[Slice]
) -> tuple[pa.Table, Extension] | None:
    """(the columns to store, the footer) when `out`, computed from `inp` (the rows of
    `base`, in order), keeps some input columns unchanged; else None (stored whole)."""
    n = out.num_rows
    if not n or n != inp.num_rows or inp.nbytes < MIN_BASE_BYTES:
        return None
    if len(set(out.column_names)) != out.num_columns:
        return None
    # Same field (type, nullability, field metadata: reading takes a kept column's field
    # from the base), same values, nulls in the same places. Values are compared all at
    # once first: each Arrow call may release the GIL, and on a busy worker thread every
    # release can cost a switch interval before it runs again.
    fields = {f.name: f for f in inp.schema}
    if len(fields) != inp.num_columns:
        return None
    kept = [f.name for f in out.schema if f.name in fields and _same_field(f, fields[f.name])]
    if kept and not inp.select(kept).equals(out.select(kept)):
        kept = [c for c in kept if _same(inp.column(c), out.column(c))]
    if not kept or len(kept) == out.num_columns:
        return None  # nothing passes through, or nothing new (a copy: store it whole)
    # What the base objects themselves read: looked up only for a batch that extends.
    direct = {oid for oid, _, _ in base}
    needs = sorted(direct.union(*(needs_of(store, oid) for oid in direct)))
    if len(needs) > MAX_NEEDS:
        return None
    own = out.select([c for c in out.column_names if c not in kept])
    return own, Extension(base=list(base), columns=out.column_names, needs=needs)


def _same_field(a: pa.Field, b: pa.Field) -> bool:
    return a.equals(b, check_metadata=True)


def _same(a: pa.ChunkedArray, b: pa.ChunkedArray) -> bool:
    return a.type == b.type and a.equals(b)


def concat(parts: list[pa.Table]) -> pa.Table:
    """Slices of objects as one table (types widened where objects differ, e.g. a
    column all null in one batch); slices without columns (an empty batch) add nothing."""
    import pyarrow as pa

    parts = [p for p in parts if p.num_columns] or parts[:1]
    if not parts:
        return pa.table({})
    return parts[0] if len(parts) == 1 else pa.concat_tables(parts, promote_options="permissive")


def assemble(oid: str, own: pa.Table, ext: Extension, base: pa.Table) -> pa.Table:
    """The whole table of extension `oid`: its own columns and the base's, in the
    output's order, with the output's schema metadata (not the footer)."""
    import pyarrow as pa

    if base.num_rows != own.num_rows:
        raise StoreError(
            f"object {oid} extends {base.num_rows} rows but has {own.num_rows}: the store "
            "is damaged; run `cas fsck`"
        )
    cols = [own.column(c) if c in own.column_names else base.column(c) for c in ext.columns]
    fields = [
        own.schema.field(c) if c in own.column_names else base.schema.field(c) for c in ext.columns
    ]
    schema = pa.schema(fields, metadata=without_footer(own.schema.metadata))
    return pa.Table.from_arrays(cols, schema=schema)


def read_whole(store: Store, oid: str, table: pa.Table) -> pa.Table:
    """Object `oid` as read (`table`), whole: an extension with the rows it extends, each
    verified (a caller that verified `oid` itself has not verified what it extends)."""
    from castore.errors import UnknownObject

    ext = extension_of(oid, table)
    if ext is None:
        return table
    closed(store, oid, ext.needs)
    remember(oid, ext.needs)
    parts = []
    for base, offset, n in ext.base:
        try:
            parts.append(store.get_table(base).slice(offset, n))
        except UnknownObject:
            if store.has(base):
                raise  # what is missing is further down
            raise UnknownObject(
                f"object {oid} extends object {base}, which is not in the store {store.root}"
            ) from None
    return assemble(oid, table, ext, concat(parts))


def closed(store: Store, oid: str, needs: list[str]) -> None:
    """Raise BadObject unless `needs` holds what each object it names reads. castore writes
    it so; it is what bounds a chain: each base reads fewer objects than what extends it
    (never itself), so no read goes more than MAX_NEEDS deep, however the footer was made."""
    closed_over(oid, needs, lambda n: needs_of(store, n))


def closed_over(oid: str, needs: list[str], needs_of_: Callable[[str], list[str]]) -> None:
    """`closed`, with what each object reads told by `needs_of_` (a remote's fsck)."""
    have = set(needs)
    for n in needs:
        if not have.issuperset(needs_of_(n)):
            raise BadObject(
                oid, f"does not list in its footer what object {n}, which it reads, reads"
            )


def schema_of(store: Store, oid: str) -> pa.Schema:
    """The schema reading object `oid` gives, from its footer (an extension is read)."""
    import pyarrow.parquet as pq

    schema = pq.read_schema(store.path_of(oid))
    if schema.metadata and EXTENDS_KEY in schema.metadata:
        return store.get_table(oid).schema
    return schema


# What each object reads (transitively): known for the objects this process wrote or
# read, else read from the object's footer. Bounded: a long process forgets and re-reads.
_needs: dict[str, list[str]] = {}


def remember(oid: str, needs: list[str]) -> None:
    if len(_needs) >= _NEEDS_CACHE:
        _needs.clear()
    _needs[oid] = needs


def needs_of(store: Store, oid: str) -> list[str]:
    """The objects reading `oid` reads besides itself ([] for a whole object)."""
    known = _needs.get(oid)
    if known is not None:
        return known
    needs = needs_in(oid, store.path_of(oid))
    remember(oid, needs)
    return needs


def needs_in(oid: str, source: str | bytes) -> list[str]:
    """What object `oid` reads besides itself, from its file (a path) or its bytes; []
    for a whole object or one that is not Parquet (a manifest). BadObject for a footer
    castore does not write."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.read_schema(
            source if isinstance(source, str) else pa.BufferReader(source)
        ).metadata
    except (OSError, pa.ArrowInvalid):
        return []  # not a Parquet object (a manifest): it names nothing to read with it
    raw = meta.get(EXTENDS_KEY) if meta else None
    return [] if raw is None else _parse(oid, raw).needs
