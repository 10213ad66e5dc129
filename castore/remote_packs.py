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
from typing import TYPE_CHECKING, Any

from castore.errors import CastoreError
from castore.hashing import hash_bytes, validate_id
from castore.store import actionpack
from castore.store import layout as L
from castore.store.models import ActionEntry

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


def _etag(info: dict[str, Any]) -> str | None:
    tag = info.get("ETag") or info.get("etag")
    return str(tag).strip('"').lower() if tag else None


def read_entries(remote: Remote, jobs: int = 16) -> tuple[dict[str, ActionEntry | None], set[str]]:
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
    out: dict[str, ActionEntry | None] = {}
    todo = []
    for key, info in loose.items():
        raw = packed.get(key)
        tag = _etag(info)
        if (
            raw is not None
            and tag is not None
            and hashlib.md5(raw.encode(), usedforsecurity=False).hexdigest() == tag
        ):
            out[key] = remote.trust(key, raw)[0]
        else:
            todo.append(key)
    with ThreadPoolExecutor(jobs) as pool:  # one request per entry: many at once
        out.update(zip(todo, pool.map(remote.get_action, todo), strict=True))
    return out, packs


def merge(remote: Remote, entries: dict[str, ActionEntry | None], old: set[str]) -> None:
    """After a gc: one pack of the entries left, then the old markers go (their objects
    are swept by a later gc)."""
    keep = {k: e.model_dump_json().encode() for k, e in entries.items() if e is not None}
    new = write(remote, keep)
    for oid in old - {new}:
        with contextlib.suppress(OSError):
            remote.fs.rm_file(remote.layout.join(packs_dir(remote), oid))
