"""Remotes: another store with the same layout, reached through fsspec (DESIGN.md "Remotes").

Everything read from a remote is untrusted: ids and ref names are validated like user
input before they become paths, JSON is parsed into pydantic models, and every object's
blake3 digest is verified before it enters the local store.

Push order (MUST): batch objects → manifests → action entries → refs, so a remote never
holds an action entry or a ref that names a missing object. Pull is the reverse.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import posixpath
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from castore.errors import (
    CastoreError,
    ConfigError,
    CorruptObject,
    RemoteError,
    RemoteUnavailable,
)
from castore.hashing import (
    generator_end_key,
    hash_bytes,
    sign_entry,
    signing_key,
    validate_id,
)
from castore.runs import select_refs
from castore.store import Store
from castore.store import layout as L
from castore.store.manifests import RunManifest, StepManifest, manifest_closure
from castore.store.models import ActionEntry

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (objects done, bytes done)
SIGNING_ENV = "CASTORE_SIGNING_KEY"


@dataclass
class TransferResult:
    objects: int = 0
    bytes: int = 0
    actions: int = 0
    refs: list[str] = field(default_factory=list)
    skipped: int = 0  # already there
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.bytes / self.seconds if self.seconds else 0.0


class Remote:
    """A store reached through fsspec: a folder, s3://, gs://, hf://, memory://, …"""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        import fsspec

        check_url(url)
        self.url = url
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        except (ImportError, ValueError) as e:
            raise RemoteError(f"cannot use remote {url}: {e}") from None
        self.root = root.rstrip("/") or "/"
        self.layout = L.Layout(self.root, posixpath.join)
        self.local = type(self.fs).__name__ == "LocalFileSystem"
        # The team key lives in the environment only: never in config.yaml, a log or a hash.
        material = os.environ.get(SIGNING_ENV)
        self.signing_key: bytes | None = signing_key(material) if material else None

    def __repr__(self) -> str:
        return f"Remote({self.url!r})"

    # -- objects ---------------------------------------------------------------------

    def list_oids(self) -> set[str]:
        """Every object id on the remote (strays and malformed names skipped)."""
        base = self.layout.dir(L.OBJECTS)
        self.fs.invalidate_cache()  # listings must be fresh: others write here too
        try:
            paths = self.fs.find(base)
        except FileNotFoundError:
            return set()
        except OSError as e:
            raise RemoteUnavailable(f"cannot list {self.url}: {e}") from None
        out = set()
        for p in paths:
            parts = p.rstrip("/").split("/")
            if len(parts) >= 2:
                oid = L.path_to_oid(parts[-2], parts[-1])
                if oid:
                    out.add(oid)
        return out

    def has(self, oid: str) -> bool:
        return bool(self.fs.exists(self.layout.object_path(oid)))

    def get_object(self, oid: str) -> bytes:
        """The verified bytes of `oid`; CorruptObject when they do not hash to it."""
        try:
            data = self.fs.cat_file(self.layout.object_path(oid))
        except FileNotFoundError:
            raise RemoteError(f"object {oid} is not on remote {self.url}") from None
        if hash_bytes(data) != oid:
            raise CorruptObject(oid, None)
        return data

    def put_object(self, store: Store, oid: str) -> int:
        """Upload a local object (verified first); returns its size."""
        data = store.get_bytes(oid)
        self.write(self.layout.object_path(oid), data)
        return len(data)

    def write(self, path: str, data: bytes) -> None:
        """Whole-or-nothing: object stores put atomically; a folder gets tmp + rename."""
        parent = posixpath.dirname(path)
        if self.local:
            tmp = self.layout.join(self.layout.dir(L.TMP), f"up-{uuid.uuid4().hex}")
            self.fs.makedirs(self.layout.dir(L.TMP), exist_ok=True)
            self.fs.pipe_file(tmp, data)
            self.fs.makedirs(parent, exist_ok=True)
            self.fs.mv(tmp, path)
        else:
            self.fs.pipe_file(path, data)

    def delete_object(self, oid: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.layout.object_path(oid))

    # -- action entries and refs -----------------------------------------------------

    def get_action(self, key: str) -> ActionEntry | None:
        """The entry for `key`, or None when it is absent, malformed or (with a team key)
        not signed by it; a rejected entry is logged once."""
        entry, problem = self.check_action(key)
        if problem is not None and problem[0] != "missing":
            log.warning("remote %s: action entry %s %s; ignored", self.url, key[:12], problem[1])
        return entry

    def check_action(self, key: str) -> tuple[ActionEntry | None, tuple[str, str] | None]:
        """(entry, None) when it can be trusted, else (None, (kind, reason))."""
        try:
            raw = self.fs.cat_file(self.layout.action_path(key))
        except FileNotFoundError:
            return None, ("missing", "is not on the remote")
        try:
            entry = ActionEntry.model_validate_json(raw)
        except ValueError:
            return None, ("bad-action", "is malformed")
        if self.signing_key is not None:
            expected = sign_entry(self.signing_key, key, list(entry.outputs), list(entry.rows))
            if entry.signature is None:
                return None, ("unsigned-action", f"is not signed ({SIGNING_ENV} is set)")
            if not hmac.compare_digest(entry.signature, expected):
                return None, ("bad-signature", "has a signature the team key did not make")
        return entry, None

    def put_action(self, key: str, entry: ActionEntry) -> None:
        if self.signing_key is not None:
            sig = sign_entry(self.signing_key, key, list(entry.outputs), list(entry.rows))
            entry = entry.model_copy(update={"signature": sig})
        elif entry.signature is not None:
            entry = entry.model_copy(update={"signature": None})  # not ours to vouch for
        self.write(self.layout.action_path(key), entry.model_dump_json().encode())

    def manifest_index(self) -> dict[str, tuple[list[str], list[int]]]:
        """Action key -> (outputs, rows) as the remote's step manifests record them, over
        every run its refs name. Manifests are content-addressed and verified on read, so
        an action entry that disagrees with them was not written by the run that made it."""
        index: dict[str, tuple[list[str], list[int]]] = {}
        for _name, _sig, run_oid in self.list_refs():
            try:
                run = self.load_json(run_oid, RunManifest)
                for ref in run.steps:
                    step = self.load_json(ref.manifest, StepManifest)
                    for b in step.batches:
                        if not b.failed:
                            index[b.key] = (list(b.outputs), list(b.rows))
            except (CastoreError, OSError) as e:
                log.warning("remote %s: skipping run %s: %s", self.url, run_oid[:12], e)
        return index

    def list_actions(self) -> set[str]:
        self.fs.invalidate_cache()
        try:
            paths = self.fs.find(self.layout.dir(L.ACTIONS))
        except FileNotFoundError:
            return set()
        out = set()
        for p in paths:
            parts = p.rstrip("/").split("/")
            key = L.path_to_oid(parts[-2], parts[-1]) if len(parts) >= 2 else None
            if key:
                out.add(key)
        return out

    def list_refs(self, problems: list[str] | None = None) -> list[tuple[str, str, str]]:
        """(name, sig, run manifest id); names, sigs and ids are validated, bad ones
        skipped with a warning (a remote cannot make us write outside the store) and
        added to `problems` when given."""
        base = self.layout.ref_dir()
        self.fs.invalidate_cache()
        try:
            paths = self.fs.find(base)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise RemoteUnavailable(f"cannot list refs of {self.url}: {e}") from None
        out = []
        for p in sorted(paths):
            rel = p[len(base.rstrip("/")) + 1 :] if p.startswith(base) else p
            parts = rel.split("/")
            if len(parts) != 2:
                continue
            name, sig = parts
            try:
                L.validate_name(name)
                validate_id(sig)
                oid = validate_id(self.fs.cat_file(p).decode().strip())
            except (CastoreError, UnicodeDecodeError, OSError) as e:
                log.warning("remote %s: skipping ref %s: %s", self.url, rel, e)
                if problems is not None:
                    problems.append(f"bad-ref {rel[:80]}: {str(e)[:120]}")
                continue
            out.append((name, sig, oid))
        return out

    def set_ref(self, name: str, sig: str, oid: str) -> None:
        self.write(self.layout.ref_path(name, sig), (validate_id(oid) + "\n").encode())

    def delete_ref(self, name: str, sig: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.layout.ref_path(name, sig))

    def load_json(self, oid: str, model: type[Any]) -> Any:
        data = self.get_object(oid)
        try:
            return model.model_validate_json(data)
        except ValueError as e:
            raise RemoteError(f"remote object {oid} is not a valid {model.__name__}") from e

    # -- writer lock -----------------------------------------------------------------

    LOCK_TTL = 600.0  # a writer lock older than this is stale (the writer died)

    def writers(self) -> list[dict[str, Any]]:
        """Live writer locks (push, gc) on the remote."""
        import json

        base = self.layout.dir(L.LOCKS)
        out = []
        with contextlib.suppress(FileNotFoundError):
            for p in self.fs.ls(base, detail=False):
                try:
                    info = json.loads(self.fs.cat_file(p))
                except (OSError, ValueError):
                    continue
                if time.time() - float(info.get("time", 0)) < self.LOCK_TTL:
                    out.append({**info, "path": p})
        return out

    @contextlib.contextmanager
    def writer_lock(self, kind: str, exclusive: bool) -> Any:
        """A lock object under locks/ while pushing or collecting. gc (exclusive) refuses
        when any other writer is live; a push refuses while a gc runs."""
        import json
        import socket

        from castore.errors import StoreLocked

        others = self.writers()
        blocking = others if exclusive else [w for w in others if w.get("kind") == "gc"]
        if blocking:
            w = blocking[0]
            raise StoreLocked(
                f"remote {self.url} is locked by {w.get('kind')} (pid {w.get('pid')} on "
                f"{w.get('host')}); try again later"
            )
        path = self.layout.join(self.layout.dir(L.LOCKS), f"{kind}-{uuid.uuid4().hex}.json")
        info = {"kind": kind, "pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
        self.fs.makedirs(self.layout.dir(L.LOCKS), exist_ok=True)
        self.fs.pipe_file(path, json.dumps(info).encode())
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                self.fs.rm_file(path)


def check_url(url: str) -> str:
    """Refuse URLs that carry credentials: they would end up in config.yaml and logs."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password or (parts.username and parts.scheme not in ("", "file")):
        raise ConfigError(
            f"remote URL {parts.scheme}://…@{parts.hostname} carries credentials; give "
            "them through the environment or fsspec's configuration instead"
        )
    return url


# -- what a set of runs reaches -----------------------------------------------------------


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
        c.batches.update(o for o in (run.pipeline_yaml, run.log) if o)
        for ref in run.steps:
            steps.append(ref.manifest)
            step = load_model(store, ref.manifest, StepManifest)
            c.keys.add(generator_end_key(step.fingerprint))
            for b in step.batches:
                c.batches.update(b.outputs)
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


# -- push and pull ----------------------------------------------------------------------


def push(
    store: Store,
    remote: Remote,
    runs: tuple[str, ...] | list[str] = (),
    *,
    jobs: int = 8,
    progress: Progress | None = None,
) -> TransferResult:
    """Upload what the chosen runs (default: all refs) reach and the remote lacks."""
    t0 = time.perf_counter()
    result = TransferResult()
    chosen = select_refs(store.list_refs(), runs, lambda o: _updated(store, o))
    c = local_closure(store, chosen)
    with remote.writer_lock("push", exclusive=False):
        present = remote.list_oids()
        batches = sorted(o for o in c.batches - present if store.has(o))
        manifests = [o for o in c.manifests if o not in present]
        result.skipped = len(c.batches & present) + len(c.manifests) - len(manifests)
        upload(store, remote, batches, jobs=jobs, progress=progress, result=result)
        if result.failed:
            raise RemoteError(
                f"push to {remote.url}: {len(result.failed)} object(s) failed, "
                f"e.g. {result.failed[0]}; run it again to resume"
            )
        # Step manifests before run manifests (their order in the closure).
        for oid in manifests:
            result.bytes += remote.put_object(store, oid)
            result.objects += 1
        have = remote.list_actions()
        todo = c.keys - have
        if remote.signing_key is not None:
            # Entries pushed before the team key was set (or by someone without it) are
            # ignored by signed readers: sign ours again.
            todo |= {k for k in c.keys & have if remote.check_action(k)[1] is not None}
        entries = {k: e for k in sorted(todo) if (e := store.get_action(k))}
        result.actions = _parallel_count(
            lambda k: remote.put_action(k, entries[k]), list(entries), jobs
        )
        for name, sig, oid in chosen:
            remote.set_ref(name, sig, oid)
            result.refs.append(f"{name}/{sig}")
    result.seconds = time.perf_counter() - t0
    return result


def _updated(store: Store, oid: str) -> Any:
    from castore.store.manifests import load_model

    return load_model(store, oid, RunManifest).updated


def fetch_object(store: Store, remote: Remote, oid: str) -> int:
    """Download, verify, store. A mismatch raises CorruptObject naming `oid` and stores
    nothing."""
    data = remote.get_object(oid)
    stored = store.put_bytes(data)
    if stored != oid:  # cannot happen after get_object's check; kept as the invariant
        raise CorruptObject(oid, None)
    return len(data)


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
        targets = [store.staging_path("pull") for _ in chunk]
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
                store.adopt(tmp, oid)
            except (CastoreError, OSError) as e:
                result.failed.append(f"{oid}: {e}")
                continue
            result.objects += 1
            result.bytes += size
        if progress:
            progress(result.objects, result.bytes)


def pull(
    store: Store,
    remote: Remote,
    runs: tuple[str, ...] | list[str] = (),
    *,
    jobs: int = 8,
    progress: Progress | None = None,
) -> TransferResult:
    """Download what the chosen remote runs reach, verifying every object."""
    t0 = time.perf_counter()
    result = TransferResult()
    rejected: list[str] = []
    chosen = select_refs(
        remote.list_refs(), runs, lambda o: remote.load_json(o, RunManifest).updated
    )
    for name, sig, run_oid in chosen:
        run = remote.load_json(run_oid, RunManifest)
        if run.name != name or run.signature != sig:
            raise RemoteError(
                f"remote ref {name}/{sig[:12]} names a manifest of {run.name}/{run.signature[:12]}"
            )
        steps = [(ref.manifest, remote.load_json(ref.manifest, StepManifest)) for ref in run.steps]
        wanted = {o for o in (run.pipeline_yaml, run.log) if o}
        for _, step in steps:
            for b in step.batches:
                wanted.update(b.outputs)
        missing = sorted(o for o in wanted if not store.has(o))
        result.skipped += len(wanted) - len(missing)
        download(store, remote, missing, jobs=jobs, progress=progress, result=result)
        if result.failed:
            raise RemoteError(
                f"pull from {remote.url}: {len(result.failed)} object(s) "
                f"failed verification or transfer, e.g. {result.failed[0]}; "
                "nothing unverified was stored"
            )
        for oid, _step in steps:
            result.bytes += fetch_object(store, remote, oid)
        remote_keys = remote.list_actions()
        keys = [b.key for _, step in steps for b in step.batches if not b.failed]
        keys += [generator_end_key(step.fingerprint) for _, step in steps]
        wanted_keys = [
            k for k in dict.fromkeys(keys) if k in remote_keys and store.get_action(k) is None
        ]

        recorded = {
            b.key: (list(b.outputs), list(b.rows))
            for _, step in steps
            for b in step.batches
            if not b.failed
        }

        def fetch_entry(key: str, recorded: dict[str, Any] = recorded) -> None:
            entry = remote.get_action(key)
            if entry is None or not all(store.has(o) for o in entry.outputs):
                return
            if key in recorded and (list(entry.outputs), list(entry.rows)) != recorded[key]:
                rejected.append(key)
                return
            store.put_action(key, entry)

        result.actions += _parallel_count(fetch_entry, wanted_keys, jobs)
        result.bytes += fetch_object(store, remote, run_oid)
        store.set_ref(name, sig, run_oid)
        result.refs.append(f"{name}/{sig}")
    result.seconds = time.perf_counter() - t0
    if rejected:
        raise RemoteError(
            f"pull from {remote.url}: {len(rejected)} action entr"
            f"{'y' if len(rejected) == 1 else 'ies'} disagree with the step manifests that "
            f"reference them (e.g. {rejected[0]}) and were not stored; everything else was "
            "pulled and verified; `cas fsck --remote` lists them"
        )
    return result


def fsck_remote(remote: Remote, *, jobs: int = 8) -> list[str]:
    """Problems on a remote: corrupt objects, entries or refs naming missing objects."""
    problems: list[str] = []
    oids = remote.list_oids()

    def check(oid: str) -> int:
        remote.get_object(oid)
        return 0

    res = TransferResult()
    _parallel(check, sorted(oids), jobs, None, res)
    problems += [f"corrupt-object {f}" for f in res.failed]
    entries: dict[str, ActionEntry] = {}
    for key in sorted(remote.list_actions()):
        entry, problem = remote.check_action(key)
        if entry is None:
            problems.append(f"{problem[0] if problem else 'bad-action'} {key}")
        elif any(o not in oids for o in entry.outputs):
            problems.append(f"dangling-action {key}")
        else:
            entries[key] = entry
    for name, sig, oid in remote.list_refs(problems):
        if oid not in oids:
            problems.append(f"dangling-ref {name}/{sig[:12]}")
            continue
        try:
            problems += _fsck_remote_run(remote, name, sig, oid, oids=oids, entries=entries)
        except CastoreError as e:
            problems.append(f"bad-manifest {name}/{sig[:12]}: {e}")
    return problems


__all__ = [
    "Remote",
    "RemoteError",
    "RemoteUnavailable",
    "TransferResult",
    "collect_remote",
    "fsck_remote",
    "pull",
    "push",
]


def _fsck_remote_run(
    remote: Remote,
    name: str,
    sig: str,
    oid: str,
    *,
    oids: set[str],
    entries: dict[str, ActionEntry],
) -> list[str]:
    """Problems of one remote run: a ref naming another pipeline's run, missing objects,
    action entries that disagree with the step manifests."""
    ref = f"{name}/{sig[:12]}"
    run = remote.load_json(oid, RunManifest)
    if run.name != name or run.signature != sig:
        return [f"bad-ref {ref}: names a run of {run.name}/{run.signature[:12]}"]
    problems = []
    for step_ref in run.steps:
        if step_ref.manifest not in oids:
            problems.append(f"missing-object {ref}: {step_ref.manifest}")
            continue
        step = remote.load_json(step_ref.manifest, StepManifest)
        gone = [o for b in step.batches for o in b.outputs if o not in oids]
        if gone:
            problems.append(f"missing-object {ref}: {gone[0]}")
        for b in step.batches:
            e = entries.get(b.key)
            if e is not None and not b.failed and (e.outputs, e.rows) != (b.outputs, b.rows):
                problems.append(
                    f"mismatched-action {b.key}: differs from step {step.name} of {ref}"
                )
    return problems


def _mtime(info: dict[str, Any]) -> float:
    """Modification time from an fsspec info dict (local: mtime; s3: LastModified)."""
    import datetime as dt

    for k in ("mtime", "LastModified", "last_modified", "updated", "created"):
        v = info.get(k)
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, dt.datetime):
            return v.timestamp()
        if isinstance(v, str):
            with contextlib.suppress(ValueError):
                return dt.datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
    return time.time()  # unknown: treat as new, so it is never swept by mistake


@dataclass
class RemoteGcResult:
    objects_removed: list[str] = field(default_factory=list)
    bytes_freed: int = 0
    actions_dropped: list[str] = field(default_factory=list)
    objects_kept: int = 0
    dry_run: bool = False


def collect_remote(
    remote: Remote, *, grace: float = 3600.0, cache_ttl: float = 7 * 86400.0, dry_run: bool = False
) -> RemoteGcResult:
    """gc on a remote with the same roots logic as the local one; refuses while another
    writer (a push, another gc) holds the remote's lock."""
    now = time.time()
    result = RemoteGcResult(dry_run=dry_run)
    with remote.writer_lock("gc", exclusive=True):
        entries = {key: remote.get_action(key) for key in remote.list_actions()}
        marked = _remote_marked(remote, entries, now - cache_ttl)
        try:
            infos = remote.fs.find(remote.layout.dir(L.OBJECTS), detail=True)
        except FileNotFoundError:
            infos = {}
        going: dict[str, int] = {}
        for path, info in infos.items():
            parts = path.rstrip("/").split("/")
            oid = L.path_to_oid(parts[-2], parts[-1]) if len(parts) >= 2 else None
            if oid is None:
                continue
            if oid in marked or now - _mtime(info) < grace:
                result.objects_kept += 1
            else:
                going[oid] = int(info.get("size") or 0)
        present = infos_oids(infos)
        result.actions_dropped = sorted(
            k
            for k, e in entries.items()
            if e is None or any(o in going or o not in present for o in e.outputs)
        )
        result.objects_removed = sorted(going)
        result.bytes_freed = sum(going.values())
        if not dry_run:
            # Entries before objects: a gc killed in between leaves only garbage.
            for key in result.actions_dropped:
                with contextlib.suppress(FileNotFoundError):
                    remote.fs.rm_file(remote.layout.action_path(key))
            for oid in result.objects_removed:
                remote.delete_object(oid)
    return result


def _remote_marked(
    remote: Remote, entries: dict[str, ActionEntry | None], entries_since: float
) -> set[str]:
    """What the remote's refs reach, and the objects of entries newer than the ttl."""
    marked: set[str] = set()
    for _name, _sig, oid in remote.list_refs():
        marked |= manifest_closure(remote.load_json, oid)[1]
    for entry in entries.values():
        if entry is not None and entry.created.timestamp() > entries_since:
            marked.update(entry.outputs)
    return marked


def infos_oids(infos: dict[str, Any]) -> set[str]:
    out = set()
    for path in infos:
        parts = path.rstrip("/").split("/")
        oid = L.path_to_oid(parts[-2], parts[-1]) if len(parts) >= 2 else None
        if oid:
            out.add(oid)
    return out
