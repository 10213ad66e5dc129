"""Action entries packed into objects, as git packs loose objects.

A run writes one small entry file per computed batch (`actions/ab/<key>`): that is what
makes a batch visible to a concurrent run the moment it is stored. A file per batch costs
a 4 KiB block for ~300 bytes of JSON and one path per batch and step; so a finished run
moves its entries into one pack: an Arrow IPC object (keys sorted, entries as JSON), named
by an empty marker `actions/packs/<oid>`, written after the object. Only then are the
loose files it holds removed, each only if it still holds the packed bytes (a concurrent
run may have rewritten it).

Lookups try the loose file first, then the packs: every loaded pack's keys in one sorted
list (a binary search on their first 64 bits), so a lookup costs the same with one pack
or hundreds. A miss looks for packs written since with one stat of the markers' folder
(`Packs.refresh`). A run's end merges the packs into one when there are more than
MERGE_AT, so loading them stays cheap in a store that is never collected. An entry
dropped while packed (gc, fsck --repair, a failed verification) is shadowed by a
tombstone: a loose file holding `null`. gc rewrites the packs without their dropped
entries, then removes the tombstones and the old markers; it keeps a marker's pack object
as long as the marker is there.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from castore.errors import CastoreError
from castore.hashing import local_stamp, validate_id
from castore.store import journal
from castore.store import layout as L

if TYPE_CHECKING:
    import numpy as np

    from castore.store import Store

log = logging.getLogger("castore.store")

PACKS = "packs"
TOMBSTONE = b"null"
PACK_META = b"castore_action_pack"
PACK_AFTER = 16  # a finished run with fewer computed batches leaves its entries loose
# A run's end merges the store's packs into one when there are more than this: each
# pack costs every later run a load (~0.6 ms per pack), and without gc a store that runs
# pipeline after pipeline would gather one per run.
MERGE_AT = 32


def packs_dir(store: Store) -> str:
    return os.path.join(store.layout.dir(L.ACTIONS), PACKS)


def markers(store: Store) -> set[str]:
    """The packs named by markers (ids validated; strays ignored)."""
    return _valid(_names(packs_dir(store)))


def _names(folder: str) -> list[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        return []


def _valid(names: list[str]) -> set[str]:
    out = set()
    for name in names:
        with contextlib.suppress(CastoreError):
            out.add(validate_id(name))
    return out


@dataclass
class _Pack:
    oid: str
    hi: np.ndarray  # the keys' first 8 bytes as big-endian integers (uint64), sorted
    keys: memoryview  # 32 bytes per key, in the same order
    entries: Any  # the JSON column (a pyarrow StringArray)

    def key(self, i: int) -> bytes:
        return bytes(self.keys[i * 32 : (i + 1) * 32])

    def entry(self, i: int) -> str:
        """The entry JSON of row `i`."""
        return str(self.entries[i].as_py())

    def items(self) -> Iterator[tuple[str, str]]:
        """(key, entry JSON) of every row."""
        for i in range(len(self.hi)):
            yield self.key(i).hex(), self.entry(i)


# Packs decoded in this process, by object path, with the file's stamp when it was read
# and verified: a process that runs pipeline after pipeline (a notebook) reads each pack
# once while its file is unchanged (any write changes the stamp: ctime, inode), as
# castore.hashing.local_digest hashes a file once. A pack no marker names is forgotten.
_DECODED: dict[str, tuple[tuple[int, ...], _Pack]] = {}
_DECODED_MAX = 64
_DECODED_LOCK = threading.Lock()


def _load(store: Store, oid: str) -> _Pack | None:
    path = store.path_of(oid)
    try:
        stamp = local_stamp(path)
    except FileNotFoundError:
        return None
    known = _DECODED.get(path)
    if known is not None and known[0] == stamp:
        return known[1]
    try:
        data = store.get_bytes(oid)
    except (CastoreError, OSError):
        return None  # missing or damaged (quarantined): its entries are misses
    pack = decode_pack(oid, data)
    if pack is not None:
        with _DECODED_LOCK:
            _DECODED[path] = (stamp, pack)
            while len(_DECODED) > _DECODED_MAX:
                _DECODED.pop(next(iter(_DECODED)), None)
    return pack


def decode_pack(oid: str, data: bytes) -> _Pack | None:
    """A pack's (verified) bytes; None when they are not a pack."""
    import numpy as np
    import pyarrow as pa

    try:
        table = pa.ipc.open_file(pa.BufferReader(data)).read_all()
    except (OSError, pa.ArrowInvalid):
        return None
    if (table.schema.metadata or {}).get(PACK_META) is None:
        return None
    col = table.column("key").combine_chunks()
    raw = col.buffers()[1]
    keys = memoryview(raw)[col.offset * 32 : (col.offset + len(col)) * 32]
    hi = np.frombuffer(keys, dtype=">u8").reshape(-1, 4)[:, 0].astype(np.uint64)
    return _Pack(oid, hi, keys, table.column("entry").combine_chunks())


def pack_keys(store: Store, oid: str) -> set[str] | None:
    """The keys a pack holds; None when it cannot be read."""
    pack = _load(store, oid)
    if pack is None:
        return None
    return {pack.key(i).hex() for i in range(len(pack.hi))}


# Every loaded pack's keys, sorted by their first 8 bytes: (packs, those bytes as ints,
# the pack of each in `packs`, its row in that pack).
_Index = tuple[list["_Pack"], list[int], list[int], list[int]]


class Packs:
    """The store's entry packs, loaded on first use and again when the markers change.

    A miss looks for packs written since (a concurrent run's end, gc's repack): a stat of
    the markers' folder, listed again only when its stamp changed, so a miss costs the
    same whether the store holds one pack or a thousand. The packs' keys are searched as
    one sorted list, not pack by pack."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._packs: dict[str, _Pack | None] = {}
        self._seen: set[str] | None = None
        self._dir = packs_dir(store)
        self._marker_dir = self._dir + os.sep  # checked on every packed hit
        self._stamp: tuple[int, ...] | None = None  # the folder's, when listed and settled
        self._names: list[str] | None = None  # as last listed
        # The driver and generator threads look up at once: a refresh and a sort are
        # made one at a time, and a lookup reads one consistent `_index`.
        self._lock = threading.RLock()
        self._sorted = True
        self._index: _Index = ([], [], [], [])

    def refresh(self, *, force: bool = False) -> bool:
        """Load new packs, forget removed ones; True when something changed. `force`:
        list the markers whatever the folder's stamp (a loaded pack's marker is gone)."""
        with self._lock:
            if force:
                self._stamp = self._names = None
            stamp = folder_stamp(self._dir)
            if stamp is not None and stamp == self._stamp:
                return False
            self._stamp = stamp
            names = _names(self._dir)
            if names == self._names:  # listed again within a change's tick: the same
                return False
            self._names = names
            now = _valid(names)
            if now == self._seen:
                return False
            for oid in now - set(self._packs):
                self._packs[oid] = _load(self.store, oid)
            for oid in set(self._packs) - now:
                del self._packs[oid]
                with _DECODED_LOCK:
                    _DECODED.pop(self.store.path_of(oid), None)
            self._seen = now
            self._sorted = False
            return True

    def loaded(self) -> list[_Pack]:
        """The packs the markers name now, by id (unreadable ones left out)."""
        with self._lock:
            self.refresh()
            return [p for _, p in sorted(self._packs.items()) if p is not None]

    def _sort(self) -> None:
        """Every loaded pack's keys as one sorted list (on the first lookup after a
        change: a run's end that merges the packs refreshes without looking anything up)."""
        import numpy as np

        with self._lock:
            packs = [p for p in self._packs.values() if p is not None and len(p.hi)]
            if not packs:
                self._index = ([], [], [], [])
            else:
                hi = np.concatenate([p.hi for p in packs])
                order = np.argsort(hi, kind="stable")
                owner = np.repeat(np.arange(len(packs)), [len(p.hi) for p in packs])[order]
                row = np.concatenate([np.arange(len(p.hi)) for p in packs])[order]
                # Lists of ints: bisect and indexing on them are ~10x faster per lookup
                # than numpy's scalar path.
                self._index = (packs, hi[order].tolist(), owner.tolist(), row.tolist())
            self._sorted = True

    def find(self, key: str) -> str | None:
        """The packed JSON of `key`, or None."""
        if self._seen is None:
            self.refresh()
        found = self._find(key)
        if found is None and self.refresh():  # a pack written since we looked
            found = self._find(key)
        return found

    def _find(self, key: str) -> str | None:
        if not self._sorted:
            self._sort()
        packs, his, owners, rows = self._index
        want = bytes.fromhex(key)
        hi = int.from_bytes(want[:8], "big")
        i = bisect.bisect_left(his, hi)
        while i < len(his) and his[i] == hi:
            pack, row = packs[owners[i]], rows[i]
            i += 1
            if pack.key(row) != want:
                continue
            if not os.path.exists(self._marker_dir + pack.oid):
                # gc replaced this pack (maybe without this entry): look again.
                self.refresh(force=True)
                return self._find(key)
            return pack.entry(row)
        return None

    def keys(self) -> Iterator[str]:
        for pack in self.loaded():
            for i in range(len(pack.hi)):
                yield pack.key(i).hex()

    def items(self) -> Iterator[tuple[str, str]]:
        """(key, entry JSON) of every packed entry; a key in several packs comes once."""
        seen: set[str] = set()
        for pack in self.loaded():
            for key, raw in pack.items():
                if key not in seen:
                    seen.add(key)
                    yield key, raw


# A folder's stamp is trusted only once its last change is this much older than the stat:
# two changes inside one tick of the filesystem's clock leave it the same mtime (git's
# "racy" index entries), so a stamp taken in that tick could hide the second change.
_SETTLED_NS = 3_000_000_000
_now_ns = time.time_ns


def folder_stamp(path: str) -> tuple[int, ...] | None:
    """What any entry added to or removed from folder `path` changes (local_stamp: size,
    mtime, ctime, inode; `()` when there is no folder), or None while a change is so
    recent that another in the same clock tick would not show (then list the folder)."""
    try:
        stamp = local_stamp(path)
    except FileNotFoundError:
        return ()
    if _now_ns() - max(stamp[1], stamp[2]) < _SETTLED_NS:
        return None
    return stamp


def write_pack(store: Store, entries: dict[str, bytes]) -> str | None:
    """Pack `entries` (key -> entry JSON): the object, then its marker. None when empty."""
    return _put(store, encode_pack(entries)) if entries else None


def _put(store: Store, data: bytes) -> str:
    """A pack's bytes as an object, then its marker."""
    oid = store.put_bytes(data)
    store.write_file(os.path.join(packs_dir(store), oid), b"")
    return oid


def _unmark(store: Store, oids: set[str]) -> None:
    """The markers of replaced packs go (their objects age out as unnamed ones)."""
    for oid in oids:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(packs_dir(store), oid))


def encode_pack(entries: dict[str, bytes]) -> bytes:
    """The pack object's bytes: Arrow IPC, keys sorted, entries as JSON (zstd)."""
    import pyarrow as pa

    keys = sorted(entries)
    return _encode(
        pa.array([bytes.fromhex(k) for k in keys], pa.binary(32)),
        pa.array([entries[k].decode() for k in keys], pa.string()),
    )


def _encode(keys: Any, entries: Any) -> bytes:
    """A pack of sorted 32-byte `keys` (a pyarrow array) and their entries' JSON."""
    import pyarrow as pa

    table = pa.table({"key": keys, "entry": entries}).replace_schema_metadata({PACK_META: b"1"})
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    with pa.ipc.new_file(sink, table.schema, options=options) as w:
        w.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def merge(store: Store) -> set[str]:
    """A run's end: the store's packs as one, then the old markers go; returns the packs
    replaced. Entries are taken as they are (one copy of a key several packs hold, a
    tombstoned one too: its tombstone still shadows it; gc's repack drops both), in
    Arrow, without a Python object per entry."""
    import numpy as np
    import pyarrow as pa

    loaded = store.entry_packs.loaded()
    if len(loaded) < 2:
        return set()
    keys = np.concatenate([np.frombuffer(p.keys, dtype="S32") for p in loaded])
    unique, first = np.unique(keys, return_index=True)
    entries = pa.concat_arrays([p.entries for p in loaded]).take(pa.array(first))
    key_col = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(32), len(unique), [None, pa.py_buffer(unique.tobytes())]
    )
    replaced = {p.oid for p in loaded} - {_put(store, _encode(key_col, entries))}
    _unmark(store, replaced)
    return replaced


def repack(store: Store, drop: set[str]) -> set[str]:
    """One pack of every packed entry not in `drop` and not shadowed by a loose file,
    then the old markers go, then the tombstones that only shadowed packed entries.
    Returns the packs replaced (for gc to delete). A reader that finds an entry in a
    replaced pack sees its marker gone and looks again."""
    old = markers(store)
    if not old:
        return set()
    keep: dict[str, bytes] = {}
    shadowed: list[str] = []
    for key, raw in Packs(store).items():
        if os.path.exists(store.layout.action_path(key)):
            shadowed.append(key)
        elif key not in drop:
            keep[key] = raw.encode()
    new = write_pack(store, keep)
    replaced = old - ({new} if new else set())
    _unmark(store, replaced)
    for key in shadowed:
        _remove_if_holds(store.layout.action_path(key), TOMBSTONE)
    return replaced


def pack_run(store: Store, own: str | None, loose: list[str] | tuple[str, ...] = ()) -> None:
    """A run's end: the entries it wrote (the `loose` files, and its journal, closed
    first) and the journals of runs that died go into one entry pack, or, fewer than
    PACK_AFTER, stay loose (journaled ones written as loose files); then the journals go.
    A journaled entry whose loose file stands (a newer entry, or a tombstone) is not
    taken; a loose file goes only if it still holds the packed bytes (a concurrent run
    may have rewritten it)."""
    if store.journal is not None:
        store.journal.close()
        store.journal = None
    folded = journal.journals_to_fold(store, own)
    journaled = {
        key: raw
        for run_id in folded
        for key, raw in journal.journal_entries(store, run_id).items()
        if not os.path.lexists(store.layout.action_path(key))
    }
    files: dict[str, bytes] = {}
    for key in dict.fromkeys(loose):
        if key in journaled:
            continue  # no loose file: lexists just said so (a run alone journals them all)
        with contextlib.suppress(FileNotFoundError):
            raw = _read(store.layout.action_path(key))
            if raw != TOMBSTONE:
                files[key] = raw
    if len(journaled) + len(files) >= PACK_AFTER:
        write_pack(store, {**files, **journaled})
        for key, raw in files.items():
            _remove_if_holds(store.layout.action_path(key), raw)
    else:
        for key, raw in journaled.items():
            store.write_file(store.layout.action_path(key), raw)
    for run_id in folded:
        journal.remove(store, run_id)
    if len(markers(store)) > MERGE_AT:
        try:
            merge(store)
        except (OSError, CastoreError) as e:  # the packs stay as they are: still correct
            log.warning("entry packs not merged: %s", e)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _remove_if_holds(path: str, data: bytes) -> None:
    """Remove a loose file only if it still holds `data` (else it is newer: it stays)."""
    with contextlib.suppress(FileNotFoundError):
        if _read(path) == data:
            os.unlink(path)
