"""What a remote's step manifests say, remembered by the local store, so that read-through
costs what changed on the remote since this store last looked, not what the remote holds.

Read-through cross-checks a remote entry against the step manifests of the remote's runs
(docs/remotes.md, "Security"). Those manifests are content-addressed: what one run
manifest leads to never changes. So the first time a store reads a run manifest (and its
step manifests) from a remote, it keeps a *digest* of them, `remotes/runs/<run id>.json`:
each batch's key, outputs and row counts, and each step's row-key segments. It is derived
from objects verified on the way in, and any remote holding that run manifest has the
same digest, so digests are shared by every remote the store reads. A later run reads
the digests of the runs it has seen and only the manifests of new ones.

The refs say which runs a remote has. A ref is a mutable file, so its target is read
again unless the listing proves the file unchanged: `remotes/refs/<blake3 of the URL>.json`
keeps, per ref, the version the listing gave (an S3 ETag, the MD5 of the 65 bytes) and
the run it named. Backends whose listings give no version (a folder) read every ref, which
is cheap there.

Both are caches: a damaged or missing file is rebuilt from the remote; gc removes the
ones no read-through used within the cache-ttl. Reads of new runs go 16 at a time.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from castore.errors import CastoreError
from castore.hashing import hash_bytes, validate_id
from castore.store import layout as L
from castore.store.manifests import RunManifest, StepManifest

if TYPE_CHECKING:
    from castore.remote import Remote
    from castore.store import Store

log = logging.getLogger(__name__)

Recorded = dict[str, tuple[list[str], list[int]]]  # action key -> (outputs, rows)
M = TypeVar("M", bound=BaseModel)


class RunDigest(BaseModel):
    """What one run manifest's step manifests record (failed batches left out)."""

    model_config = ConfigDict(extra="forbid")

    batches: Recorded
    segments: dict[str, list[str]]  # step fingerprint -> row-key segments


class RefVersions(BaseModel):
    """A remote's refs as last listed: ref path under refs/runs -> (version, run id)."""

    model_config = ConfigDict(extra="forbid")

    refs: dict[str, tuple[str, str]]


def digest_run(remote: Remote, run_oid: str) -> RunDigest:
    """The digest of a run manifest read from `remote` (its objects verified)."""
    run = remote.load_json(run_oid, RunManifest)
    batches: Recorded = {}
    segments: dict[str, list[str]] = {}
    for ref in run.steps:
        step = remote.load_json(ref.manifest, StepManifest)
        for b in step.batches:
            if not b.failed:
                batches[b.key] = (list(b.outputs), list(b.rows))
            if b.row_index:
                segments.setdefault(step.fingerprint, []).append(b.row_index)
    return RunDigest(batches=batches, segments=segments)


def _digest_path(store: Store, run_oid: str) -> str:
    return os.path.join(store.layout.dir(L.REMOTES), "runs", validate_id(run_oid) + ".json")


def _refs_path(store: Store, url: str) -> str:
    return os.path.join(store.layout.dir(L.REMOTES), "refs", hash_bytes(url.encode()) + ".json")


def _read_model(path: str, model: type[M]) -> M | None:
    try:
        with open(path, "rb") as f:
            got = model.model_validate_json(f.read())
    except (OSError, ValidationError):
        return None
    with contextlib.suppress(OSError):
        os.utime(path)  # used: gc keeps it for the cache-ttl
    return got


def _write_model(store: Store, path: str, model: BaseModel) -> None:
    if store.read_only:
        return
    with contextlib.suppress(OSError):  # a cache: failing to keep it costs a re-read
        os.makedirs(os.path.dirname(path), exist_ok=True)
        store.write_file(path, model.model_dump_json().encode())


def ref_versions(store: Store, url: str) -> dict[str, tuple[str, str]]:
    got = _read_model(_refs_path(store, url), RefVersions)
    return dict(got.refs) if got is not None else {}


def save_ref_versions(store: Store, url: str, refs: dict[str, tuple[str, str]]) -> None:
    _write_model(store, _refs_path(store, url), RefVersions(refs=refs))


def manifest_index(
    remote: Remote, store: Store | None, jobs: int = 16
) -> tuple[Recorded, dict[str, list[str]]]:
    """From the step manifests of every run the remote's refs name: action key ->
    (outputs, rows), and step fingerprint -> its row-key segments. With `store`, runs it
    has a digest of are not read again, nor refs the listing shows unchanged."""
    before = ref_versions(store, remote.url) if store is not None else None
    versions = dict(before) if before is not None else None
    refs = remote.list_refs(versions=versions, jobs=jobs)
    if store is not None and versions is not None and versions != before:
        save_ref_versions(store, remote.url, versions)
    runs = list(dict.fromkeys(oid for _name, _sig, oid in refs))
    digests: dict[str, RunDigest] = {}
    todo = []
    for oid in runs:
        got = _read_model(_digest_path(store, oid), RunDigest) if store is not None else None
        if got is not None:
            digests[oid] = got
        else:
            todo.append(oid)

    def read(oid: str) -> RunDigest | None:
        try:
            return digest_run(remote, oid)
        except (CastoreError, OSError) as e:
            log.warning("remote %s: skipping run %s: %s", remote.url, oid[:12], e)
            return None

    with ThreadPoolExecutor(jobs) as pool:
        for oid, digest in zip(todo, pool.map(read, todo), strict=True):
            if digest is not None:
                digests[oid] = digest
                if store is not None:
                    _write_model(store, _digest_path(store, oid), digest)
    index: Recorded = {}
    segments: dict[str, list[str]] = {}
    for oid in runs:  # in the refs' order, as before: a later run's record wins
        digest = digests.get(oid)
        if digest is None:
            continue
        index.update(digest.batches)
        for fp, segs in digest.segments.items():
            segments.setdefault(fp, []).extend(segs)
    return index, segments


def prune(store: Store, used_before: float) -> int:
    """gc: digests and ref versions no read-through used since `used_before`."""
    removed = 0
    base = store.layout.dir(L.REMOTES)
    for sub in ("runs", "refs"):
        folder = os.path.join(base, sub)
        for name in _names(folder):
            path = os.path.join(folder, name)
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_mtime < used_before:
                    os.unlink(path)
                    removed += 1
    return removed


def _names(folder: str) -> Iterable[str]:
    try:
        return sorted(os.listdir(folder))
    except FileNotFoundError:
        return []
