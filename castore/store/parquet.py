"""Parquet writer options, fixed in one place: byte-identical output makes dedupe free."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from castore.errors import NonCanonicalValue

if TYPE_CHECKING:
    import pyarrow as pa

PARQUET_MAGIC = b"PAR1"
# The column of a batch table where steps keep per-row facts (LLM raw output, usage,
# errors); Distisets drop it unless asked.
METADATA_COLUMN = "castore_metadata"
# The footer key of an object that extends its input (castore.store.extend).
EXTENDS_KEY = b"castore_extends"

# Fixed options: the same table and pyarrow version give the same bytes. Batch objects
# are small (a 50-row batch is ~1 kB of data), so what every file carries dominates
# (bench_overhead, 20,000 rows in 1,200 objects): statistics (full min/max of each string
# column, twice) and dictionary pages cost 2.3 kB -> 1.0 kB per anchor batch, and each
# dictionary page is one more zstd call (a zstd context per call is most of the encode
# time at this size). zstd of plain-encoded pages still folds repeated values: a
# 5,000-row table with a 5-value label column came out 10 % smaller without dictionaries.
# Nothing reads the statistics (castore reads whole objects; datasets does not need them).
WRITE_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "compression_level": 1,
    "version": "2.6",
    "use_dictionary": False,
    "write_statistics": False,
    "data_page_size": 1 << 20,
}


def write_parquet(table: pa.Table, sink: Any, footer: dict[bytes, bytes] | None = None) -> None:
    """`footer`: key-value pairs for the Parquet footer (castore.store.extend), written
    without making the file carry Arrow's schema too (~400 B a batch)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if not footer:
            pq.write_table(table, sink, store_schema=needs_schema(table.schema), **WRITE_OPTIONS)
            return
        with pq.ParquetWriter(
            sink, table.schema, store_schema=needs_schema(table.schema), **WRITE_OPTIONS
        ) as w:
            w.write_table(table)
            w.add_key_value_metadata(footer)
    except pa.ArrowNotImplementedError:
        where = next(filter(None, (_empty_struct(f.type, f.name) for f in table.schema)), None)
        if where is None:
            raise
        # Arrow's own message names neither the column nor what to do.
        raise NonCanonicalValue(
            f"column {where!r} holds only empty dicts, which Parquet cannot store (a struct "
            "without fields); use None for an empty value"
        ) from None


def _empty_struct(t: pa.DataType, path: str) -> str | None:
    """The path of a struct without fields inside type `t`, if any."""
    import pyarrow as pa

    if pa.types.is_struct(t):
        if t.num_fields == 0:
            return path
        inner = (
            _empty_struct(t.field(i).type, f"{path}.{t.field(i).name}") for i in range(t.num_fields)
        )
        return next(filter(None, inner), None)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _empty_struct(t.value_type, f"{path}[]")
    if pa.types.is_map(t):
        return _empty_struct(t.item_type, f"{path}{{}}")
    return None


def needs_schema(schema: pa.Schema) -> bool:
    """Whether reading the Parquet file needs Arrow's schema stored in it (base64 in the
    footer, ~400 B a batch) to give back `schema`: metadata, and types Parquet does not
    spell the same way (large_string reads back as string, dictionary as its values, a
    time zone other than UTC as UTC, duration as int64, ...). The types below read back
    identical without it (tests/test_store.py checks each against a stored schema)."""
    if schema.metadata:
        return True
    return not all(_schema_free(f) for f in schema)


def _schema_free(field: pa.Field) -> bool:
    import pyarrow as pa

    t = field.type
    if field.metadata:
        return False
    if pa.types.is_struct(t):
        return all(_schema_free(t.field(i)) for i in range(t.num_fields))
    if pa.types.is_list(t):
        return _schema_free(t.value_field)
    if pa.types.is_timestamp(t):
        return t.tz is None or t.tz == "UTC"
    return _scalar(t)


def encode_parquet(table: pa.Table, footer: dict[bytes, bytes] | None = None) -> pa.Buffer:
    """The bytes `table` is stored as; its object id is their blake3 (Store.put_table,
    and `cas status`, which names batches it does not store)."""
    import pyarrow as pa

    # Encoding into memory, then hashing the whole buffer, lets blake3 use its threads;
    # streaming through a Python write() per page measured 10-15 % slower (bench_store).
    sink = pa.BufferOutputStream()
    write_parquet(table, sink, footer)
    return sink.getvalue()


_READ_SCHEMAS: dict[bytes, pa.Schema] = {}


def as_read(table: pa.Table, buf: pa.Buffer, *, footer: bool = False) -> pa.Table | None:
    """`table`, encoded as `buf`, with the types reading `buf` gives (a list's item
    field, for one, reads back named "element"): the same buffers, relabelled, so a
    table kept in memory is the one a later run reads from the store. None when that is
    not known: a type that may not read back with the same values (`round_trips`), no
    columns, or a sliced table (Arrow's cast and view mishandle sliced struct arrays);
    such a table is read back instead. `footer`: `buf` was written with a footer
    (`encode_parquet`) that `table` does not carry; the types are compared without it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not table.num_columns or not round_trips(table.schema):
        return None

    # The footer says it; reading it costs about a third of decoding a small batch, so
    # each schema is read once per process (the schema alone decides the read types).
    key = _spelled(table.schema)
    schema = _READ_SCHEMAS.get(key)
    if schema is None:
        schema = pq.read_schema(pa.BufferReader(buf))
        if footer:
            meta = without_footer(schema.metadata)
            schema = schema.with_metadata(meta) if meta else schema.remove_metadata()
        if len(_READ_SCHEMAS) >= 256:
            _READ_SCHEMAS.clear()
        _READ_SCHEMAS[key] = schema
    if _spelled(schema) == key:
        return table
    if not all(_unsliced(ch) for col in table.columns for ch in col.chunks):
        return None
    try:
        columns = [
            pa.chunked_array([ch.view(f.type) for ch in col.chunks], type=f.type)
            for col, f in zip(table.columns, schema, strict=True)
        ]
        return pa.Table.from_arrays(columns, schema=schema)  # validates lengths
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
        return None


def without_footer(meta: dict[bytes, bytes] | None) -> dict[bytes, bytes] | None:
    """Schema metadata as the step returned it: without an extension's footer key."""
    kept = {k: v for k, v in (meta or {}).items() if k != EXTENDS_KEY}
    return kept or None


def round_trips(schema: pa.Schema) -> bool:
    """Whether a table of this schema reads back from castore's Parquet with the same
    types and values: the types rows become by
    `Table.from_pylist`, and no others (dictionary, extension, decimal, float16... are
    read back from the store instead)."""
    return all(_plain(f.type) for f in schema)


def _plain(t: pa.DataType) -> bool:
    import pyarrow as pa

    if pa.types.is_struct(t):
        return t.num_fields > 0 and all(_plain(t.field(i).type) for i in range(t.num_fields))
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return _plain(t.value_type)
    return (
        _scalar(t)
        or pa.types.is_large_string(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_timestamp(t)
    )


def _scalar(t: pa.DataType) -> bool:
    """The leaf types rows become (Table.from_pylist), short of timestamps."""
    import pyarrow as pa

    return (
        pa.types.is_null(t)
        or pa.types.is_boolean(t)
        or pa.types.is_integer(t)
        or pa.types.is_float32(t)
        or pa.types.is_float64(t)
        or pa.types.is_string(t)
        or pa.types.is_binary(t)
        or pa.types.is_date32(t)
    )


def _spelled(schema: pa.Schema) -> bytes:
    """Every name (a list's item field's too), type and metadata value of a schema: its
    IPC form (str() truncates metadata, and == ignores a list's item field name)."""
    return bytes(schema.serialize().to_pybytes())


def _unsliced(arr: pa.Array) -> bool:
    """No offset in the array or any nested child (what from_pylist builds)."""
    import pyarrow as pa

    if arr.offset:
        return False
    t = arr.type
    if pa.types.is_struct(t):
        return all(_unsliced(arr.field(i)) for i in range(t.num_fields))
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return _unsliced(arr.values)
    return True


def read_parquet(buf: Any) -> pa.Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # ParquetFile.read skips the datasets layer of read_table: 2.5x faster on small
    # batch objects (0.25 vs 0.62 ms for 50 rows, bench_engine).
    return pq.ParquetFile(pa.BufferReader(buf)).read()


def rows_match(paths: list[str], rows: list[int]) -> bool:
    """An entry's row counts against its (verified) Parquet objects' footers: a damaged
    count would shift every downstream slice."""
    import pyarrow.parquet as pq

    if len(paths) != len(rows):
        return False
    for path, n in zip(paths, rows, strict=True):
        try:
            if pq.read_metadata(path).num_rows != n:
                return False
        except (OSError, ValueError):
            return False
    return True
