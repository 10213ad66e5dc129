"""Parquet writer options, fixed in one place: byte-identical output makes dedupe free."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

PARQUET_MAGIC = b"PAR1"
# The column of a batch table where steps keep per-row facts (LLM raw output, usage,
# errors); Distisets drop it unless asked.
METADATA_COLUMN = "castore_metadata"

# Fixed options: the same table and pyarrow version give the same bytes. zstd level 1 is
# within a few % of snappy's write speed and smaller; statistics help predicate pushdown.
WRITE_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "compression_level": 1,
    "version": "2.6",
    "use_dictionary": True,
    "write_statistics": True,
    "data_page_size": 1 << 20,
    "store_schema": True,
}


def write_parquet(table: pa.Table, sink: Any) -> None:
    import pyarrow.parquet as pq

    pq.write_table(table, sink, **WRITE_OPTIONS)


def encode_parquet(table: pa.Table) -> pa.Buffer:
    """The bytes `table` is stored as; its object id is their blake3 (Store.put_table,
    and `cas status`, which names batches it does not store)."""
    import pyarrow as pa

    # Encoding into memory, then hashing the whole buffer, lets blake3 use its threads;
    # streaming through a Python write() per page measured 10-15 % slower (bench_store).
    sink = pa.BufferOutputStream()
    write_parquet(table, sink)
    return sink.getvalue()


_READ_SCHEMAS: dict[bytes, pa.Schema] = {}


def as_read(table: pa.Table, buf: pa.Buffer) -> pa.Table | None:
    """`table`, encoded as `buf`, with the types reading `buf` gives (a list's item
    field, for one, reads back named "element"): the same buffers, relabelled, so a
    table kept in memory is the one a later run reads from the store. None when that is
    not known: a type that may not read back with the same values (`round_trips`), no
    columns, or a sliced table (Arrow's cast and view mishandle sliced struct arrays);
    such a table is read back instead."""
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


def round_trips(schema: pa.Schema) -> bool:
    """Whether a table of this schema reads back from castore's Parquet with the same
    types and values (the schema is stored with it): the types rows become by
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
        pa.types.is_null(t)
        or pa.types.is_boolean(t)
        or pa.types.is_integer(t)
        or pa.types.is_float32(t)
        or pa.types.is_float64(t)
        or pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_timestamp(t)
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
