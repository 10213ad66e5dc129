"""Row-key segments announced on a remote by runs writing through (docs/remotes.md
"Several machines on one remote"), so machines running a row-wise step at once find each
other's rows by key before the runs' manifests are pushed.

A stored batch's marker is index/<fingerprint>/<bucket>/<segment id>, the bucket being
the writer's clock in 10-minute steps. A reader lists only the buckets since it last
looked (the first time: since the oldest live writer lock was taken), so what a claim
lists grows with the runs going on now, not with the step's history on the remote;
segments of finished runs are named by their pushed step manifests. With a team key
(CASTORE_SIGNING_KEY) a marker holds the key's MAC of the fingerprint and segment id."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from castore.hashing import sign_segment, validate_id
from castore.store import layout as L

if TYPE_CHECKING:
    from castore.remote import Remote

log = logging.getLogger(__name__)

BUCKET = 600.0  # seconds of the writer's clock per marker folder
SKEW = 60.0  # margin for the machines' clocks (they agree within the lock TTL / 4)


def marker_path(remote: Remote, fingerprint: str, segment: str, when: float) -> str:
    validate_id(segment)
    folder = remote.layout.join(remote.layout.index_dir(fingerprint), str(int(when // BUCKET)))
    return remote.layout.join(folder, segment)


def segment_of(path: str) -> str | None:
    """The segment id a marker's path names; None for strays (temp files, .DS_Store)."""
    name = path.rsplit("/", 1)[-1]
    return L.path_to_oid(name[:2], name[2:])


def markers(remote: Remote) -> Iterator[tuple[str, str, float]]:
    """Every marker on the remote as (path, segment id, modification time), for gc and
    fsck (a run lists only the folders it needs: `announced`)."""
    for path, mtime, _size, _tag in remote.scan(L.INDEX):
        if (seg := segment_of(path)) is not None:
            yield path, seg, mtime


def announce(remote: Remote, fingerprint: str, segment: str) -> None:
    """The marker of a segment already on the remote."""
    key = remote.signing_key
    mark = b"" if key is None else sign_segment(key, fingerprint, segment).encode()
    remote.write(marker_path(remote, fingerprint, segment, time.time()), mark)


def announced(remote: Remote, fingerprint: str, since: float, seen: set[str]) -> list[str]:
    """The segments announced for a step since `since` (this machine's clock), except
    those in `seen`; with a team key only those whose marker it signed (the others are
    added to `seen` with a warning, so it is said once)."""
    index = remote.layout.index_dir(fingerprint)
    first, last = int((since - SKEW) // BUCKET), int((time.time() + SKEW) // BUCKET)
    folders = [remote.layout.join(index, str(b)) for b in range(first, last + 1)]
    with ThreadPoolExecutor(min(8, len(folders))) as pool:
        listed = [p for got in pool.map(remote.listing, folders) for p, _mtime in got]
    found = []
    for path in listed:
        seg = segment_of(path)
        if seg is None or seg in seen:
            continue
        if remote.signing_key is not None and not _signed(remote, fingerprint, seg, path):
            seen.add(seg)
            log.warning(
                "remote %s: row segment %s is not announced with the team key; ignored",
                remote.url,
                seg[:12],
            )
            continue
        found.append(seg)
    return sorted(found)


def live_since(remote: Remote) -> float:
    """When the oldest live writer on the remote (a push or a run writing through) took
    its lock: the markers of runs going on now are all younger."""
    starts = []
    for w in remote.writers():
        try:
            starts.append(float(w.get("since", w.get("time", 0))))
        except (TypeError, ValueError):
            continue
    return min(starts, default=time.time())


def _signed(remote: Remote, fingerprint: str, segment: str, path: str) -> bool:
    assert remote.signing_key is not None
    try:
        mark = remote.read(path).decode("ascii", "replace")
    except FileNotFoundError:
        return False
    return hmac.compare_digest(mark, sign_segment(remote.signing_key, fingerprint, segment))
