"""push and pull: what the chosen runs reach is computed first as a TransferPlan (also
what `--dry-run` prints), then executed.

Push order (MUST): batch objects → manifests → action entries → refs, so a remote never
holds an action entry or a ref that names a missing object. Pull is the reverse, and
verifies every object before it enters the store; an action entry that disagrees with
the step manifests that reference it is refused.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from castore import batchjobs, remote_packs
from castore.errors import CastoreError, CorruptObject, RemoteError
from castore.hashing import generator_end_key, hash_file, validate_id
from castore.remote import Remote, fetch_object
from castore.remote_layout import require_store
from castore.runs import Ref, select_refs
from castore.store import Store
from castore.store import layout as L
from castore.store.files import replace_into_shard, translate_oserror
from castore.store.manifests import RunManifest, StepManifest, load_model

Progress = Callable[[int, int], None]  # (objects done, bytes done)


@dataclass
class TransferPlan:
    """What a push or pull will move; nothing is moved by planning."""

    direction: Literal["push", "pull"]
    remote: str
    refs: list[Ref]
    objects: list[str]  # batch objects (and pipeline.yaml / log objects)
    manifests: list[str]  # step manifests, then run manifests
    entries: list[str]  # action keys
    skipped: int  # objects already on the other side
    bytes: int | None  # known for a push (local sizes)
    # pull: what the step manifests say each key produced (the entries' cross-check)
    recorded: dict[str, tuple[list[str], list[int]]] = field(default_factory=dict, repr=False)
    # pull: (fingerprint, segment) of row-wise batches, announced once they arrived
    segments: list[tuple[str, str]] = field(default_factory=list, repr=False)
    # push: every action key of the chosen runs (packed for bulk readers, remote_packs)
    keys: set[str] = field(default_factory=set, repr=False)

    def summary(self) -> dict[str, Any]:
        return {
            "direction": self.direction,
            "remote": self.remote,
            "runs": [f"{n}/{s}" for n, s, _ in self.refs],
            "objects": len(self.objects),
            "manifests": len(self.manifests),
            "action_entries": len(self.entries),
            "already_there": self.skipped,
            "bytes": self.bytes,
        }


@dataclass
class TransferResult:
    objects: int = 0
    bytes: int = 0
    actions: int = 0
    refs: list[str] = field(default_factory=list)
    skipped: int = 0  # already there
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    plan: TransferPlan | None = None
    jobs: int = 0  # batch job records sent or taken (castore.batchjobs)

    @property
    def rate(self) -> float:
        return self.bytes / self.seconds if self.seconds else 0.0


@dataclass
class Closure:
    batches: set[str] = field(default_factory=set)
    manifests: list[str] = field(default_factory=list)  # step manifests, then run manifests
    keys: set[str] = field(default_factory=set)  # action keys of those batches


def local_closure(store: Store, refs: Iterable[tuple[str, str, str]]) -> Closure:
    from castore.store.manifests import load_model

    c = Closure()
    steps: list[str] = []
    runs: list[str] = []
    for _name, _sig, oid in refs:
        run = load_model(store, oid, RunManifest)
        runs.append(oid)
        c.batches.update(run.files())
        for ref in run.steps:
            steps.append(ref.manifest)
            step = load_model(store, ref.manifest, StepManifest)
            c.keys.add(generator_end_key(step.fingerprint))
            for b in step.batches:
                c.batches.update(b.outputs)
                if b.row_index:
                    c.batches.add(b.row_index)
                if not b.failed:
                    c.keys.add(b.key)
    c.manifests = list(dict.fromkeys(steps + runs))
    return c


def _parallel(
    fn: Callable[[str], int],
    items: list[str],
    jobs: int,
    progress: Progress | None,
    result: TransferResult,
) -> None:
    def one(oid: str) -> tuple[str, int | None, str | None]:
        try:
            return oid, fn(oid), None
        except Exception as e:  # report every failure; the caller decides the exit code
            return oid, None, f"{oid}: {type(e).__name__}: {e}"

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for _oid, size, err in pool.map(one, items):
            if err is not None:
                result.failed.append(err)
                continue
            result.objects += 1
            result.bytes += size or 0
            if progress:
                progress(result.objects, result.bytes)


def _parallel_count(fn: Callable[[str], object], items: list[str], jobs: int) -> int:
    """Small transfers (action entries) in parallel; returns how many were done."""
    if not items:
        return 0
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return sum(1 for _ in pool.map(fn, items))


def _updated(store: Store, oid: str) -> Any:
    return load_model(store, oid, RunManifest).updated


# -- push -------------------------------------------------------------------------------


def plan_push(store: Store, remote: Remote, runs: Iterable[str] = ()) -> TransferPlan:
    """What pushing the chosen runs (default: all refs) would upload."""
    chosen = select_refs(store.list_refs(), list(runs), lambda o: _updated(store, o))
    c = local_closure(store, chosen)
    present = remote.have(L.OBJECTS, [o for o in c.batches | set(c.manifests)])
    objects = sorted(o for o in c.batches - present if store.has(o))
    manifests = [o for o in c.manifests if o not in present]
    have = remote.have(L.ACTIONS, c.keys)
    todo = c.keys - have
    if remote.signing_key is not None:
        # Entries pushed before the team key was set (or by someone without it) are
        # ignored by signed readers: sign ours again.
        todo |= {k for k in c.keys & have if remote.check_action(k)[1] is not None}
    return TransferPlan(
        "push",
        remote.url,
        chosen,
        objects,
        manifests,
        sorted(todo),
        skipped=len(c.batches & present) + len(c.manifests) - len(manifests),
        bytes=sum(store.size_of(o) for o in objects + manifests),
        keys=c.keys,
    )


def push(
    store: Store,
    remote: Remote,
    runs: tuple[str, ...] | list[str] = (),
    *,
    jobs: int = 8,
    progress: Progress | None = None,
    dry_run: bool = False,
) -> TransferResult:
    """Upload what the chosen runs (default: all refs) reach and the remote lacks. The
    plan is made under the remote's writer lock, so a gc cannot remove what it counts on."""
    t0 = time.perf_counter()
    if dry_run:  # a first push's plan, to a URL that holds nothing yet, is fine
        require_store(remote, "ok")
        return TransferResult(plan=plan_push(store, remote, runs))
    require_store(remote, "create")
    with remote.writer_lock("push", exclusive=False) as lock:
        plan = plan_push(store, remote, runs)
        result = TransferResult(skipped=plan.skipped, plan=plan)
        upload(store, remote, plan.objects, jobs=jobs, progress=progress, result=result)
        if result.failed:
            raise RemoteError(
                f"push to {remote.url}: {len(result.failed)} object(s) failed, "
                f"e.g. {result.failed[0]}; run it again to resume"
            )
        # The plan skipped objects the remote had: only a lock held all along proves no
        # gc removed them since (castore.remote_locks).
        lock.check()
        for oid in plan.manifests:  # step manifests before run manifests
            result.bytes += remote.put_object(store, oid)
            result.objects += 1
        entries = {k: e for k in plan.entries if (e := store.get_action(k))}
        result.actions = _parallel_count(
            lambda k: remote.put_action(k, entries[k]), list(entries), jobs
        )
        if plan.objects or plan.manifests or plan.entries:
            # The runs' entries once more, as one pack: gc reads it instead of a request
            # per entry (castore.remote_packs).
            packed = {k: remote.entry_bytes(k, e) for k in plan.keys if (e := store.get_action(k))}
            remote_packs.write(remote, packed)
        lock.check()
        for name, sig, oid in plan.refs:
            remote.set_ref(name, sig, oid)
            result.refs.append(f"{name}/{sig}")
        result.jobs = batchjobs.push_records(store, remote)
    result.seconds = time.perf_counter() - t0
    return result


# -- pull -------------------------------------------------------------------------------


def plan_pull(store: Store, remote: Remote, runs: Iterable[str] = ()) -> TransferPlan:
    """What pulling the chosen remote runs would download (reads their manifests)."""
    chosen = select_refs(
        remote.list_refs(), list(runs), lambda o: remote.load_json(o, RunManifest).updated
    )
    wanted: set[str] = set()
    manifests: list[str] = []
    keys: list[str] = []
    recorded: dict[str, tuple[list[str], list[int]]] = {}
    segments: list[tuple[str, str]] = []
    for name, sig, run_oid in chosen:
        run = remote.load_json(run_oid, RunManifest)
        if run.name != name or run.signature != sig:
            raise RemoteError(
                f"remote ref {name}/{sig[:12]} names a manifest of {run.name}/{run.signature[:12]}"
            )
        wanted.update(run.files())
        for ref in run.steps:
            step = remote.load_json(ref.manifest, StepManifest)
            manifests.append(ref.manifest)
            keys.append(generator_end_key(step.fingerprint))
            for b in step.batches:
                wanted.update(b.outputs)
                if b.row_index:
                    wanted.add(b.row_index)
                    segments.append((step.fingerprint, b.row_index))
                if not b.failed:
                    keys.append(b.key)
                    recorded[b.key] = (list(b.outputs), list(b.rows))
        manifests.append(run_oid)
    missing = sorted(o for o in wanted if not store.has(o))
    remote_keys = remote.list_actions()
    entries = [k for k in dict.fromkeys(keys) if k in remote_keys and store.get_action(k) is None]
    return TransferPlan(
        "pull",
        remote.url,
        chosen,
        missing,
        list(dict.fromkeys(manifests)),
        entries,
        skipped=len(wanted) - len(missing),
        bytes=None,
        recorded=recorded,
        segments=segments,
    )


def pull(
    store: Store,
    remote: Remote,
    runs: tuple[str, ...] | list[str] = (),
    *,
    jobs: int = 8,
    progress: Progress | None = None,
    dry_run: bool = False,
) -> TransferResult:
    """Download what the chosen remote runs reach, verifying every object."""
    t0 = time.perf_counter()
    require_store(remote)
    plan = plan_pull(store, remote, runs)
    result = TransferResult(skipped=plan.skipped, plan=plan)
    if dry_run:
        return result
    download(store, remote, plan.objects, jobs=jobs, progress=progress, result=result)
    if result.failed:
        raise RemoteError(
            f"pull from {remote.url}: {len(result.failed)} object(s) failed verification or "
            f"transfer, e.g. {result.failed[0]}; nothing unverified was stored"
        )
    for oid in plan.manifests:  # step manifests, then the run manifest
        result.bytes += fetch_object(store, remote, oid)
    for fp, seg in plan.segments:
        store.add_row_segment(fp, seg)  # rows pulled are reusable by row key here
    rejected: list[str] = []

    def fetch_entry(key: str) -> None:
        entry = remote.get_action(key)
        if entry is None or not all(store.has(o) for o in (*entry.outputs, *entry.needs())):
            return
        if key in plan.recorded and (list(entry.outputs), list(entry.rows)) != plan.recorded[key]:
            rejected.append(key)
            return
        store.put_action(key, entry)

    result.actions = _parallel_count(fetch_entry, plan.entries, jobs) - len(rejected)
    for name, sig, run_oid in plan.refs:
        store.set_ref(name, sig, run_oid)
        result.refs.append(f"{name}/{sig}")
    result.jobs = batchjobs.pull_records(store, remote)
    result.seconds = time.perf_counter() - t0
    if rejected:
        raise RemoteError(
            f"pull from {remote.url}: {len(rejected)} action entr"
            f"{'y' if len(rejected) == 1 else 'ies'} disagree with the step manifests that "
            f"reference them (e.g. {rejected[0]}) and were not stored; everything else was "
            "pulled and verified; `cas fsck --remote` lists them"
        )
    return result


# -- moving bytes -----------------------------------------------------------------------


def upload(
    store: Store,
    remote: Remote,
    oids: list[str],
    *,
    jobs: int,
    progress: Progress | None,
    result: TransferResult,
) -> None:
    """Objects to the remote. Object stores take fsspec's batched put (async, atomic per
    object); a folder remote gets each object through tmp + rename, in threads."""
    if remote.local:
        _parallel(lambda o: remote.put_object(store, o), oids, jobs, progress, result)
        return
    for start in range(0, len(oids), 256):
        chunk = [o for o in oids[start : start + 256] if _verified(store, o, result)]
        try:
            remote.fs.put(
                [store.path_of(o) for o in chunk],
                [remote.layout.object_path(o) for o in chunk],
                batch_size=max(1, jobs),
            )
        except (OSError, ValueError) as e:
            result.failed.append(f"{chunk[0] if chunk else '?'}…: {type(e).__name__}: {e}")
            return
        result.objects += len(chunk)
        result.bytes += sum(store.size_of(o) for o in chunk)
        if progress:
            progress(result.objects, result.bytes)


def _verified(store: Store, oid: str, result: TransferResult) -> bool:
    """Never upload a local object that fails its digest."""
    if store.verify(oid):
        return True
    store.quarantine(oid)
    result.failed.append(f"{oid}: local object is corrupt (quarantined)")
    return False


def download(
    store: Store,
    remote: Remote,
    oids: list[str],
    *,
    jobs: int,
    progress: Progress | None,
    result: TransferResult,
) -> None:
    """Fetch objects straight into tmp/ with fsspec's batched get (async on object
    stores), then verify each and move it into objects/: no second copy."""
    for start in range(0, len(oids), 256):
        chunk = oids[start : start + 256]
        targets = [_staging_path(store, "pull") for _ in chunk]
        try:
            remote.fs.get(
                [remote.layout.object_path(o) for o in chunk], targets, batch_size=max(1, jobs)
            )
        except (OSError, ValueError) as e:
            for t in targets:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(t)
            result.failed.append(f"{chunk[0]}…: {type(e).__name__}: {e}")
            return
        for oid, tmp in zip(chunk, targets, strict=True):
            try:
                size = os.path.getsize(tmp)
                _adopt(store, tmp, oid)
            except (CastoreError, OSError) as e:
                result.failed.append(f"{oid}: {e}")
                continue
            result.objects += 1
            result.bytes += size
        if progress:
            progress(result.objects, result.bytes)


_STAGE_IDS = itertools.count()


def _staging_path(store: Store, label: str) -> str:
    """A fresh path in tmp/ for a download that `_adopt` will take in."""
    tmp = store.layout.dir(L.TMP)
    os.makedirs(tmp, exist_ok=True)
    return os.path.join(tmp, f"{label}-{os.getpid()}-{next(_STAGE_IDS)}")


def _adopt(store: Store, path: str, oid: str) -> None:
    """Move a download from tmp/ into objects/ as `oid`, after verifying its digest, so
    it lands without a second copy. A mismatch deletes the file and raises CorruptObject:
    nothing unverified enters the store."""
    validate_id(oid)
    try:
        if hash_file(path) != oid:
            raise CorruptObject(oid, None)
        os.chmod(path, 0o444)
        replace_into_shard(path, store.layout.object_path(oid))
    except OSError as e:
        raise translate_oserror(e, path, store.root) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
