"""Entry packs on a remote: what lets `gc --remote` read 20,000 entries in a few requests.

A lookup of one key reads its loose entry file (`actions/ab/<key>`), which stays the
truth: an entry exists on a remote exactly when its loose file does. A push also writes
the entries of the runs it pushed as one pack (the local pack format, castore.store.
actionpack, as a content-addressed object) named by a marker `actions/packs/<oid>`
written after it. A reader that needs every entry (gc) lists the loose files and takes
each one's content from a pack when the listing proves the pack holds the same bytes
(the loose file's ETag is the MD5 of the packed bytes), else reads the file. Packs are
never trusted for existence, so a deleted entry is not brought back by a stale pack.
gc merges the packs into one after it sweeps.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, NamedTuple

from castore.errors import CastoreError
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
    """What gc keeps of an entry: a few hundred bytes instead of a pydantic model's ~1.6 kB."""

    created: float
    outputs: tuple[str, ...]
    pack: int  # the pack (Entries.packs) holding its bytes as the remote has them, or -1


class Entries:
    """Every entry on a remote (None: malformed or, with a team key, not signed by it),
    the packs read and their markers. An entry's bytes stay where they were read (in its
    pack, or `read` for loose files read by themselves), not copied per entry."""

    def __init__(self, packs: list[actionpack._Pack], markers: set[str]) -> None:
        self.entries: dict[str, Entry | None] = {}
        self.packs = packs
        self.markers = markers
        self.read: dict[str, bytes] = {}

    def raw(self, key: str) -> bytes:
        entry = self.entries[key]
        if entry is None or entry.pack < 0:
            return self.read[key]
        text = self.packs[entry.pack].find(bytes.fromhex(key))
        assert text is not None
        return text.encode()


def _entry(remote: Remote, key: str, raw: bytes | str, pack: int) -> Entry | None:
    """None when malformed or (with a team key) not signed by it."""
    entry = remote.trust(key, raw)[0]
    if entry is None:
        return None
    return Entry(entry.created.timestamp(), tuple(entry.outputs), pack)


def _read(remote: Remote, key: str) -> bytes | None:
    """A loose entry's bytes; None when it went since it was listed."""
    try:
        return remote.read(remote.layout.action_path(key))
    except FileNotFoundError:
        return None


def _packed(packs: list[actionpack._Pack], key: str, tag: str | None) -> tuple[int, str] | None:
    """(pack, text) of a pack holding the bytes whose MD5 the listing gave (the loose
    file's ETag); None when none does (rewritten since, or no MD5 ETag)."""
    if tag is None:
        return None
    want = bytes.fromhex(key)
    for i, pack in enumerate(packs):
        text = pack.find(want)
        if (
            text is not None
            and tag == hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()
        ):
            return i, text
    return None


def read_entries(remote: Remote, jobs: int = 16) -> Entries:
    """Every entry on the remote. The loose files are listed page by page; one whose bytes
    a pack holds (by ETag) is not read."""
    found = markers(remote)
    packs = []
    for oid in sorted(found) if not remote.local else ():  # a folder's files are cheap to read
        try:
            pack = actionpack.decode_pack(oid, remote.get_object(oid))
        except (CastoreError, OSError) as e:
            log.warning(
                "remote %s: entry pack %s unreadable (%s); reading entries", remote.url, oid[:12], e
            )
            continue
        if pack is not None:
            packs.append(pack)
    got = Entries(packs, found)
    todo = []
    for path, _mtime, _size, tag in remote.scan(L.ACTIONS):
        key = L.oid_from_path(path)
        if key is None:
            continue
        hit = _packed(packs, key, tag)
        if hit is not None:
            got.entries[key] = _entry(remote, key, hit[1], hit[0])
        else:
            todo.append(key)
    with ThreadPoolExecutor(jobs) as pool:  # one request per entry: many at once
        for key, raw in zip(todo, pool.map(lambda k: _read(remote, k), todo), strict=True):
            if raw is not None:
                got.entries[key] = entry = _entry(remote, key, raw, -1)
                if entry is not None:
                    got.read[key] = raw
    return got


def merge(remote: Remote, got: Entries, drop: set[str]) -> None:
    """After a gc: one pack of the entries left (minus `drop`), then the old markers go
    (their objects are swept by a later gc)."""
    keep = {k: got.raw(k) for k, e in got.entries.items() if e is not None and k not in drop}
    new = write(remote, keep)
    for oid in got.markers - {new}:
        with contextlib.suppress(OSError):
            remote.fs.rm_file(remote.layout.join(packs_dir(remote), oid))
