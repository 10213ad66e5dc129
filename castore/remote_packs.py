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
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

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
    raw: bytes  # its bytes on the remote: the merged pack holds them as they are


def _entry(remote: Remote, key: str, raw: bytes) -> Entry | None:
    """None when malformed or (with a team key) not signed by it."""
    entry = remote.trust(key, raw)[0]
    if entry is None:
        return None
    return Entry(entry.created.timestamp(), tuple(entry.outputs), raw)


def _read(remote: Remote, key: str) -> Entry | Literal[False] | None:
    """A loose entry read by itself; False when it went since it was listed."""
    try:
        return _entry(remote, key, remote.read(remote.layout.action_path(key)))
    except FileNotFoundError:
        return False


def etag(info: dict[str, Any]) -> str | None:
    tag = info.get("ETag") or info.get("etag")
    return str(tag).strip('"').lower() if tag else None


def read_entries(remote: Remote, jobs: int = 16) -> tuple[dict[str, Entry | None], set[str]]:
    """Every entry on the remote (None: malformed or, with a team key, not signed by it)
    and the packs read. Loose files whose bytes a pack holds (by ETag) are not read."""
    loose = {key: info for p, info in remote.find(L.ACTIONS).items() if (key := L.oid_from_path(p))}
    packed: dict[str, str] = {}
    packs = markers(remote)
    for oid in packs if not remote.local else ():  # a folder's files are cheap to read
        try:
            pack = actionpack.decode_pack(oid, remote.get_object(oid))
        except (CastoreError, OSError) as e:
            log.warning(
                "remote %s: entry pack %s unreadable (%s); reading entries", remote.url, oid[:12], e
            )
            continue
        if pack is not None:
            packed.update(pack.items())
    out: dict[str, Entry | None] = {}
    todo = []
    for key, info in loose.items():
        text = packed.pop(key, None)
        raw = text.encode() if text is not None else None
        tag = etag(info)
        if raw is not None and tag == hashlib.md5(raw, usedforsecurity=False).hexdigest():
            out[key] = _entry(remote, key, raw)
        else:
            todo.append(key)
    del packed, loose  # before the requests: gc's memory peaks here
    with ThreadPoolExecutor(jobs) as pool:  # one request per entry: many at once
        for key, got in zip(todo, pool.map(lambda k: _read(remote, k), todo), strict=True):
            if got is not False:
                out[key] = got
    return out, packs


def merge(remote: Remote, entries: dict[str, Entry | None], old: set[str]) -> None:
    """After a gc: one pack of the entries left, then the old markers go (their objects
    are swept by a later gc)."""
    keep = {k: e.raw for k, e in entries.items() if e is not None}
    new = write(remote, keep)
    for oid in old - {new}:
        with contextlib.suppress(OSError):
            remote.fs.rm_file(remote.layout.join(packs_dir(remote), oid))
