"""A remote's castore-layout.json: what tells a castore remote from a mistyped URL, and
which layout its files have (docs/remotes.md "What makes a URL a remote").

A remote is a store with the local store's layout, so it carries the same file at its
root. The first write of any kind creates it (a push, a write-through run, a Ray run
whose workers write there), only when absent (S3 `If-None-Match`, a hard link on a
folder), and nothing removes it: a remote that gc emptied is still a remote, while a URL
that never held one (a typo, the wrong bucket) is an error instead of an empty remote
that pulls nothing and checks clean. Remotes written before castore wrote the file are
recognised by their folders; their next push or write-through run writes it.
"""

from __future__ import annotations

import posixpath
from typing import TYPE_CHECKING, Literal

from castore.errors import LayoutVersionError, RemoteError
from castore.store import layout as L
from castore.store.models import LayoutInfo

if TYPE_CHECKING:
    from castore.remote import Remote

# What a remote written by castore before it wrote castore-layout.json holds at its root.
_FOLDERS = frozenset({L.OBJECTS, L.ACTIONS, L.REFS, L.INDEX, L.LOCKS, L.JOBS})

Missing = Literal["error", "create", "ok"]


def require_store(remote: Remote, missing: Missing = "error") -> None:
    """Refuse a remote whose layout this castore does not read (exit 5), and one that holds
    no castore store (exit 6) unless `missing` says to create one (a write is about to
    follow) or that none is fine (a push's dry run). Asked once per Remote (again to
    create the file on a remote from before it)."""
    if remote.layout_checked == "file" or (remote.layout_checked and missing != "create"):
        return
    path = remote.layout.layout_file
    try:
        info: LayoutInfo | None = _parse(remote, remote.read(path))
    except FileNotFoundError:
        info = None
    if info is None:
        if missing == "error" and not _older_remote(remote):
            raise RemoteError(
                f"no castore remote at {remote.url}: it holds no {L.LAYOUT_FILE} and none "
                "of objects/, actions/, refs/; check the URL (a first `cas push` creates one)"
            )
        if missing == "create":
            if _create(remote, path):
                remote.layout_checked = "file"
                return
            info = _parse(remote, remote.read(path))  # made by another writer just now
    if info is None:
        if missing == "error":
            remote.layout_checked = "folders"  # a remote from before the file
        return
    if info.layout_version in L.UPGRADES_FROM and missing == "create":
        remote.write(path, _current())  # everything in it reads the same
    elif info.layout_version not in (L.LAYOUT_VERSION, *L.UPGRADES_FROM):
        raise LayoutVersionError(
            f"remote {remote.url} has layout version {info.layout_version}; this castore "
            f"reads version {L.LAYOUT_VERSION}. Upgrade castore to use it"
        )
    remote.layout_checked = "file"


def _parse(remote: Remote, data: bytes) -> LayoutInfo:
    try:
        return LayoutInfo.model_validate_json(data)
    except ValueError:
        raise RemoteError(
            f"remote {remote.url}: {L.LAYOUT_FILE} is not castore's (unreadable); check the "
            "URL, or remove that file if castore's own was damaged"
        ) from None


def _create(remote: Remote, path: str) -> bool:
    try:
        return remote.create(path, _current())
    except FileNotFoundError as e:  # S3: no such bucket (a folder's parents are made)
        raise RemoteError(
            f"cannot create a remote at {remote.url}: {e}; check the URL (the bucket must exist)"
        ) from None


def _current() -> bytes:
    return LayoutInfo(layout_version=L.LAYOUT_VERSION).model_dump_json(indent=2).encode()


def _older_remote(remote: Remote) -> bool:
    """The root holds one of castore's folders (a remote from before the layout file)."""
    remote.fs.invalidate_cache(remote.root)
    try:
        names = remote.fs.ls(remote.root, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return False
    return any(posixpath.basename(str(n).rstrip("/")) in _FOLDERS for n in names)
