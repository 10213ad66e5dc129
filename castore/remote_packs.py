"""Entry packs on a remote: what lets `gc --remote` read 20,000 entries in a few requests.

A lookup of one key reads its loose entry file (`actions/ab/<key>`), which stays the
truth: an entry exists on a remote exactly when its loose file does. A push also writes
the entries of the runs it pushed as one pack (the local pack format, castore.store.
actionpack, as a content-addressed object) named by a marker `actions/packs/<oid>`
written after it. A reader that needs every entry (gc) lists the loose files and takes
each one's content from a pack when the listing proves the pack holds the same bytes
(the loose file's ETag is the MD5 of the packed bytes), else reads the file. Packs are
never trusted for existence, so a deleted entry is not brought back by a stale pack.
gc merges the packs after it sweeps (into packs of at most PACK_MAX entries).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from array import array
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from castore.errors import CastoreError, RemoteError
from castore.hashing import hash_bytes, validate_id
from castore.store import actionpack
from castore.store import layout as L

if TYPE_CHECKING:
    from castore.remote import Remote

log = logging.getLogger(__name__)


def packs_dir(remote: Remote) -> str:
    return remote.layout.join(remote.layout.dir(L.ACTIONS), actionpack.PACKS)


def markers(remote: Remote) -> set[str]:
    remote.fs.invalidate_cache()
    try:
        names = remote.fs.ls(packs_dir(remote), detail=False)
    except FileNotFoundError:
        return set()
    out = set()
    for name in names:
        with contextlib.suppress(CastoreError):
            out.add(validate_id(str(name).rstrip("/").rsplit("/", 1)[-1]))
    return out


def write(remote: Remote, entries: dict[str, bytes]) -> str | None:
    """A pack of `entries` (key -> the bytes of its loose file on this remote): the
    object, then its marker. None when there is nothing to pack."""
    if not entries:
        return None
    data = actionpack.encode_pack(entries)
    oid = hash_bytes(data)
    remote.write(remote.layout.object_path(oid), data)
    remote.write(remote.layout.join(packs_dir(remote), oid), b"")
    return oid


class Entry(NamedTuple):
    """One entry as gc sees it (what `Entries.entries` gives, for small uses and tests)."""

    created: float
    outputs: tuple[str, ...]  # and what they extend (castore.store.extend): gc keeps both
    pack: int  # the pack (Entries.packs) holding its bytes as the remote has them, or -1


class _Columns:
    """Entries as columns of compact arrays, ~90 bytes each (a dict of models would be
    ~1 kB): 32-byte key, creation time, valid flag, outputs (32 bytes each, flat, with
    cumulative ends), and where its bytes are (pack and row, or -1 and an index into
    the loose bytes read)."""

    def __init__(self) -> None:
        self.keys = bytearray()
        self.created = array("d")
        self.valid = bytearray()
        self.outs = bytearray()
        self.ends = array("i")  # C ints: 2^31 outputs is 64 GB of ids, far beyond a gc
        self.pack = array("i")
        self.row = array("i")
        self.md5 = bytearray()  # of the bytes, while the listing is matched against packs

    def key(self, i: int) -> bytes:
        """Entry `i`'s key (bytes, not numpy's scalars: they drop trailing zero bytes)."""
        return bytes(self.keys[i * 32 : i * 32 + 32])

    def add(self, remote: Remote, key: bytes, raw: bytes | str, pack: int, row: int) -> None:
        """None entries (malformed or, with a team key, not signed by it) are kept as
        invalid: gc drops them."""
        entry = remote.trust(key.hex(), raw)[0]
        self.keys += key
        self.valid.append(entry is not None)
        self.created.append(entry.created.timestamp() if entry is not None else 0.0)
        # What the outputs extend counts as named: gc keeps it with them.
        for oid in [*entry.outputs, *entry.needs()] if entry is not None else ():
            self.outs += bytes.fromhex(oid)
        self.ends.append(len(self.outs) // 32)
        self.pack.append(pack)
        self.row.append(row)


class Entries:
    """Every entry on a remote, as columns (castore.remote_packs._Columns) with a mask of
    the ones whose loose file the listing showed, the packs read (their bytes are not
    kept: `raw_items` reads them again) and their markers."""

    def __init__(
        self,
        cols: _Columns,
        live: bytearray,
        packs: list[str],
        markers: set[str],
        loose: list[bytes],
    ) -> None:
        self.cols, self.packs, self.markers = cols, packs, markers
        self.live = np.frombuffer(live, dtype=np.bool_)
        self.loose = loose  # bytes of the entries read by themselves (pack -1, row: index)

    # -- columns ---------------------------------------------------------------------------

    def created(self) -> np.ndarray:
        return np.frombuffer(self.cols.created, dtype=np.float64)

    def valid(self) -> np.ndarray:
        return np.frombuffer(self.cols.valid, dtype=np.bool_)

    def outs(self) -> np.ndarray:
        return np.frombuffer(self.cols.outs, dtype=ID)

    def counts(self) -> np.ndarray:
        ends = np.frombuffer(self.cols.ends, dtype=np.intc)
        return np.diff(ends, prepend=np.intc(0))  # 4 bytes an entry, not 8

    def hexes(self, mask: np.ndarray) -> list[str]:
        """The keys of the entries in `mask`, sorted."""
        return sorted(self.cols.key(i).hex() for i in np.flatnonzero(mask).tolist())

    @property
    def entries(self) -> dict[str, Entry | None]:
        """key -> Entry (None: malformed or unsigned) of every live entry."""
        out: dict[str, Entry | None] = {}
        ends, outs = self.cols.ends, self.cols.outs
        for i in np.flatnonzero(self.live).tolist():
            key = self.cols.key(i).hex()
            if not self.cols.valid[i]:
                out[key] = None
                continue
            start = ends[i - 1] if i else 0
            oids = tuple(outs[j * 32 : j * 32 + 32].hex() for j in range(start, ends[i]))
            out[key] = Entry(self.cols.created[i], oids, self.cols.pack[i])
        return out

    def raw_items(self, remote: Remote, drop: np.ndarray) -> Iterator[tuple[str, bytes]]:
        """(key, bytes) of every live, valid entry not in `drop` (a mask), the packed ones
        read again from their packs, one pack at a time."""
        keep = self.live & self.valid() & ~drop
        pack = np.frombuffer(self.cols.pack, dtype=np.int32)
        row = np.frombuffer(self.cols.row, dtype=np.int32)
        for i in np.flatnonzero(keep & (pack < 0)).tolist():
            yield self.cols.key(i).hex(), self.loose[row[i]]
        for p, oid in enumerate(self.packs):
            rows = row[keep & (pack == p)]
            if not len(rows):
                continue
            got = actionpack.decode_pack(oid, remote.get_object(oid))
            if got is None:
                raise RemoteError(f"remote {remote.url}: entry pack {oid[:12]} is gone bad")
            for r in rows:
                yield got.key(int(r)).hex(), got.entry(int(r)).encode()


ID = np.dtype("S32")


def _read(remote: Remote, key: str) -> bytes | None:
    """A loose entry's bytes; None when it went since it was listed."""
    try:
        return remote.read(remote.layout.action_path(key))
    except FileNotFoundError:
        return None


def _read_packs(remote: Remote, oids: list[str], cols: _Columns) -> list[tuple[str, int, int]]:
    """Every packed entry into `cols` (with the MD5 of its bytes); the packs read as
    (oid, first row, end row) in `cols`. Each pack's bytes are dropped once read."""
    spans: list[tuple[str, int, int]] = []
    for oid, fetched in _fetched(remote, oids):
        try:
            pack = actionpack.decode_pack(oid, fetched.result())
        except (CastoreError, OSError) as e:
            log.warning(
                "remote %s: entry pack %s unreadable (%s); reading entries", remote.url, oid[:12], e
            )
            continue
        if pack is None:
            continue
        start, p = len(cols.valid), len(spans)
        for i in range(len(pack.hi)):
            text = pack.entry(i).encode()
            cols.md5 += hashlib.md5(text, usedforsecurity=False).digest()
            cols.add(remote, pack.key(i), text, p, i)
        spans.append((oid, start, len(cols.valid)))
    return spans


# Packs fetched at once while the one before is decoded: a request's wait overlaps the
# decoding, and at most this many packs' bytes are held (a merged pack is ~5 MB).
_PACKS_AHEAD = 3


def _fetched(remote: Remote, oids: list[str]) -> Iterator[tuple[str, Future[bytes]]]:
    """(oid, the fetch of its verified bytes), in order, _PACKS_AHEAD fetches running."""
    with ThreadPoolExecutor(_PACKS_AHEAD) as pool:
        todo = iter(oids)
        window = deque((o, pool.submit(remote.get_object, o)) for o in islice(todo, _PACKS_AHEAD))
        while window:
            head = window.popleft()
            window.extend((o, pool.submit(remote.get_object, o)) for o in islice(todo, 1))
            yield head


def _match(
    cols: _Columns, spans: list[tuple[str, int, int]], page: list[tuple[bytes, bytes | None]]
) -> list[int | None]:
    """For each listed (key, MD5 of the loose file from its ETag): the row of a packed
    entry with those very bytes, or None (read the file)."""
    keys = np.frombuffer(cols.keys, dtype=ID)
    want = np.array([k for k, _ in page], dtype=ID)
    found: list[int | None] = [None] * len(page)
    md5 = cols.md5
    for _oid, start, end in spans:  # each pack's keys are sorted
        at = np.searchsorted(keys[start:end], want) + start
        for j, i in enumerate(at.tolist()):
            key, tag = page[j]
            if found[j] is None and tag is not None and i < end:
                if cols.key(i) == key and md5[i * 16 : i * 16 + 16] == tag:
                    found[j] = i
    return found


def read_entries(
    remote: Remote,
    jobs: int = 16,
    progress: Callable[[int], None] | None = None,
    packs_read: Callable[[], None] | None = None,
) -> Entries:
    """Every entry on the remote. The loose files are listed page by page; one whose bytes
    a pack holds (the ETag is their MD5) is taken from the pack, any other is read.
    `progress(n)`: n entries listed so far, after each page; `packs_read()`: called once
    the packs are read, before the listing."""
    found = markers(remote)
    cols = _Columns()
    # A folder's files are cheap to read: its packs are not used.
    spans = _read_packs(remote, sorted(found), cols) if not remote.local else []
    if packs_read is not None:
        packs_read()
    live = bytearray(len(cols.valid))
    todo: list[str] = []
    listed = 0
    for page in remote.pages(L.ACTIONS):
        listed += len(page)
        if progress is not None:
            progress(listed)
        want = [
            (bytes.fromhex(key), bytes.fromhex(tag) if tag is not None and len(tag) == 32 else None)
            for key, _mtime, _size, tag in page
        ]
        for (key, *_), row in zip(page, _match(cols, spans, want), strict=True):
            if row is None:
                todo.append(key)
            else:
                live[row] = 1
    del cols.md5[:]
    packs = [oid for oid, _, _ in spans]
    got_loose: list[bytes] = []
    with ThreadPoolExecutor(jobs) as pool:  # one request per entry: many at once
        for key, raw in zip(todo, pool.map(lambda k: _read(remote, k), todo), strict=True):
            if raw is not None:
                cols.add(remote, bytes.fromhex(key), raw, -1, len(got_loose))
                got_loose.append(raw)
                live.append(1)
    return Entries(cols, live, packs, found, got_loose)


# Entries per pack a gc writes: what it holds in memory while merging (~1 kB each).
PACK_MAX = 50_000


def merge(remote: Remote, got: Entries, drop: np.ndarray) -> None:
    """After a gc: the entries left (minus the `drop` mask) in packs of at most PACK_MAX
    entries (one for most remotes), then the old markers go (their objects are swept by
    a later gc). Old packs are read one at a time."""
    new: set[str | None] = set()
    chunk: dict[str, bytes] = {}
    for key, raw in got.raw_items(remote, drop):
        chunk[key] = raw
        if len(chunk) >= PACK_MAX:
            new.add(write(remote, chunk))
            chunk = {}
    new.add(write(remote, chunk))
    for oid in got.markers - new:
        with contextlib.suppress(OSError):
            remote.fs.rm_file(remote.layout.join(packs_dir(remote), oid))
