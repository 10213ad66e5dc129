"""A leaf of a run materialized from the store: one Arrow IPC object with all its
batches in plan order (memory-mapped by the Distiset), and the schema helpers that line
batches with different columns up."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from castore.hashing import leaf_arrow_key
from castore.store.exports import Placer, is_link_to
from castore.store.extend import schema_of
from castore.store.models import ActionEntry

if TYPE_CHECKING:
    import pyarrow as pa

    from castore.store import Store
    from castore.store.manifests import StepManifest


def leaf_arrow(store: Store, step: StepManifest, link_dir: Path) -> Path | None:
    """An Arrow IPC file with all batches of `step` in plan order, memory-mappable.

    It is an object keyed by the batch list, so a finished run is materialized once; the
    returned path is a hard link outside objects/, since `datasets` writes its own cache
    files next to the file it opened."""
    oids = [oid for b in step.batches for oid in b.outputs]
    if not oids:
        return None
    key = leaf_arrow_key(oids)
    entry = store.get_action(key)
    if entry is not None and not all(store.reuse(o) for o in entry.outputs):
        entry = None  # the Arrow object failed verification (quarantined): build it again
    if entry is None:
        arrow_oid = _write_leaf_arrow(store, oids)
        store.put_action(
            key,
            ActionEntry(
                outputs=[arrow_oid],
                rows=[step.rows],
                info={"kind": "leaf-arrow", "step": step.name},
            ),
        )
    else:
        arrow_oid = entry.outputs[0]
    link_dir.mkdir(parents=True, exist_ok=True)
    path = link_dir / f"{step.name}-{arrow_oid[:16]}.arrow"
    # A link left from before the object was quarantined and rebuilt has another inode.
    if not is_link_to(str(path), store.path_of(arrow_oid)):
        Placer().place(store.path_of(arrow_oid), str(path))
    return path


def _write_leaf_arrow(store: Store, oids: list[str]) -> str:
    import pyarrow as pa

    schemas = [schema_of(store, o) for o in oids]
    schema = unify(schemas)
    with store.atomic_writer() as w:
        sink = pa.PythonFile(w, mode="w")
        with pa.ipc.new_stream(sink, schema) as writer:
            for oid in oids:
                table = store.get_table(oid)
                if table.num_rows:
                    writer.write_table(conform(table, schema))
    assert w.oid is not None
    return w.oid


def unify(schemas: list[pa.Schema]) -> pa.Schema:
    import pyarrow as pa

    schemas = [s for s in schemas if len(s)] or schemas[:1]
    unified = pa.unify_schemas([s.remove_metadata() for s in schemas], promote_options="permissive")
    return unified


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with exactly `schema`'s columns, in order; missing ones null-filled."""
    import pyarrow as pa

    cols = []
    for field in schema:
        if field.name in table.column_names:
            col = table.column(field.name)
            cols.append(col if col.type == field.type else col.cast(field.type))
        else:
            cols.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(cols, schema=schema)
