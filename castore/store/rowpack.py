"""Packs: a row-wise step's row-key segments merged into one object (DESIGN.md "Row keys").

A step's segments are many small Parquet objects (one per computed batch); loading them
one by one costs ~0.6 ms each. A pack is one Arrow IPC object holding, for the segments
it covers, the keys' first 128 bits sorted and where each row is; `index/<fp>.pack`
names the newest. A pack is derived data, never the source of truth: segments and their
markers stay, a pack's rows count only for segments whose markers are still there, a
pointer to a missing pack is ignored, and any run may write a new one (last writer wins;
every pack is correct for what it covers). gc keeps a pack while every segment it covers
is kept; otherwise it ages out like any unnamed object and the next load writes another.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from castore.errors import CastoreError
from castore.hashing import validate_id
from castore.store import layout as L
from castore.store.models import RowInfo

if TYPE_CHECKING:
    import numpy as np

    from castore.store import Store

PACK_META = b"castore_row_pack"
_SUFFIX = ".pack"


@dataclass
class Pack:
    """Sorted by `hi`; `loc` is segment index << 32 | row in that segment's output."""

    segments: list[str]
    outputs: list[str]  # per segment: the output object its rows are in
    hi: np.ndarray
    lo: np.ndarray
    loc: np.ndarray
    # per segment: what it says of its rows besides their keys (None: not recorded)
    infos: list[RowInfo | None] = field(default_factory=list)


def pointer_path(store: Store, fingerprint: str) -> str:
    validate_id(fingerprint)
    return os.path.join(store.layout.dir(L.INDEX), fingerprint + _SUFFIX)


def current(store: Store, fingerprint: str) -> str | None:
    """The pack the pointer names, when the pointer is well formed (not checked: that
    the object is there)."""
    try:
        with open(pointer_path(store, fingerprint), encoding="ascii") as f:
            return validate_id(f.read().strip())
    except (OSError, UnicodeDecodeError, CastoreError):
        return None


def write(store: Store, fingerprint: str, pack: Pack) -> str:
    """Store `pack` as an object, then point to it."""
    import pyarrow as pa

    infos = [i.model_dump(exclude_none=True) if i is not None else None for i in pack.infos]
    meta = {"segments": pack.segments, "outputs": pack.outputs, "infos": infos}
    table = pa.table({"hi": pack.hi, "lo": pack.lo, "loc": pack.loc}).replace_schema_metadata(
        {PACK_META: json.dumps(meta, separators=(",", ":")).encode()}
    )
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    oid = store.put_bytes(sink.getvalue().to_pybytes())
    store.write_file(pointer_path(store, fingerprint), oid.encode())
    return oid


def read(store: Store, oid: str, verify: bool = True) -> Pack | None:
    """The pack `oid`, verified and freshened (unless not `verify`: a preview that must
    write nothing); None when it is missing or damaged."""
    import numpy as np
    import pyarrow as pa

    if not (store.reuse(oid) if verify else store.has(oid)):
        return None
    try:
        # Memory-mapped, zero-copy: objects are never rewritten (an unlinked file stays
        # mapped), and reuse() just hashed it.
        table = pa.ipc.open_file(pa.memory_map(store.path_of(oid))).read_all()
        meta = json.loads((table.schema.metadata or {})[PACK_META])
        segments, outputs = list(meta["segments"]), list(meta["outputs"])
        infos = [RowInfo.parse(x) for x in meta.get("infos") or [None] * len(segments)]

        def col(name: str, dtype: type) -> np.ndarray:
            # From the buffer itself: to_numpy() would import pandas (~0.3 s).
            arr = table.column(name).combine_chunks()
            if arr.null_count:
                raise ValueError(f"nulls in {name}")
            return np.frombuffer(arr.buffers()[1], dtype, count=len(arr), offset=arr.offset * 8)

        hi, lo, loc = col("hi", np.uint64), col("lo", np.uint64), col("loc", np.int64)
        pack = Pack(segments, outputs, hi, lo, loc, infos)
    except (OSError, KeyError, ValueError, TypeError, pa.ArrowException):
        return None
    if not len(segments) == len(outputs) == len(infos) or not (
        len(pack.hi) == len(pack.lo) == len(pack.loc)
    ):
        return None
    return pack


def covered(store: Store, oid: str) -> list[str] | None:
    """The segments pack `oid` covers (its schema only), for gc; None when unreadable."""
    import pyarrow as pa

    try:
        with open(store.path_of(oid), "rb") as f:
            schema = pa.ipc.open_file(f).schema
        return list(json.loads((schema.metadata or {})[PACK_META])["segments"])
    except (OSError, KeyError, ValueError, TypeError, pa.ArrowException):
        return None


def drop(store: Store, fingerprint: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(pointer_path(store, fingerprint))


def iter_pointers(store: Store) -> Iterator[tuple[str, str | None]]:
    """(fingerprint, pack id or None when the pointer is malformed) of every pointer."""
    base = store.layout.dir(L.INDEX)
    with contextlib.suppress(FileNotFoundError):
        for name in sorted(os.listdir(base)):
            fp = name[: -len(_SUFFIX)]
            if name.endswith(_SUFFIX) and L.path_to_oid(fp[:2], fp[2:]):
                yield fp, current(store, fp)
