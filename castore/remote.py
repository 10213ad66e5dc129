"""Remotes: another store with the same layout, reached through fsspec (DESIGN.md "Remotes").
Transfers are castore.transfer, remote fsck is in castore.fsck and remote gc in castore.gc.

Everything read from a remote is untrusted: ids and ref names are validated like user
input before they become paths, JSON is parsed into pydantic models, and every object's
blake3 digest is verified before it enters the local store.

Push order (MUST): batch objects → manifests → action entries → refs, so a remote never
holds an action entry or a ref that names a missing object. Pull is the reverse.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import logging
import os
import posixpath
import queue
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any

from castore.errors import (
    CastoreError,
    CorruptObject,
    RemoteError,
    RemoteUnavailable,
)
from castore.hashing import (
    hash_bytes,
    sign_entry,
    signing_key,
    validate_id,
)
from castore.remote_checks import check_url, explain_remote_error
from castore.store import Store
from castore.store import layout as L
from castore.store.models import ActionEntry

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (objects done, bytes done)
SIGNING_ENV = "CASTORE_SIGNING_KEY"
ASK_EACH_BELOW = 2000  # Remote.have: more ids than this are listed instead


class Remote:
    """A store reached through fsspec: a folder, s3://, gs://, hf://, memory://, …"""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        import fsspec

        check_url(url)
        self.url = url
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        except (ImportError, ValueError) as e:
            extra = " (pip install 'castore[s3]')" if url.startswith(("s3://", "s3a://")) else ""
            raise RemoteError(f"cannot use remote {url}: {e}{extra}") from None
        self.root = root.rstrip("/") or "/"
        self.layout = L.Layout(self.root, posixpath.join)
        self.local = type(self.fs).__name__ == "LocalFileSystem"
        self.layout_checked: str | None = None  # castore.remote_layout.require_store
        # s3fs asks an object's size (a HEAD, and a LIST when it is missing) before every
        # read unless told to read in one request: entries, refs and locks are small.
        s3 = type(self.fs).__name__ == "S3FileSystem"
        self._one_get: dict[str, Any] = {"max_concurrency": 1} if s3 else {}
        # The team key lives in the environment only: never in config.yaml, a log or a hash.
        material = os.environ.get(SIGNING_ENV)
        self.signing_key: bytes | None = signing_key(material) if material else None

    def __repr__(self) -> str:
        return f"Remote({self.url!r})"

    # -- objects ---------------------------------------------------------------------

    def list_oids(self) -> set[str]:
        """Every object id on the remote (strays and malformed names skipped)."""
        return {oid for p, *_ in self.scan(L.OBJECTS) if (oid := L.oid_from_path(p))}

    def pages(self, kind: str, size: int = 1000) -> Generator[list[Listed], None, None]:
        """`scan` as lists of (id, mtime, size, ETag), `size` files at a time; paths that
        name no id (pack markers, strays) are left out."""
        page: list[Listed] = []
        for path, mtime, nbytes, tag in self.scan(kind):
            oid = L.oid_from_path(path)
            if oid is not None:
                page.append((oid, mtime, nbytes, tag))
                if len(page) >= size:
                    yield page
                    page = []
        if page:
            yield page

    def scan(self, kind: str) -> Iterator[Listed]:
        """Every file under objects/, actions/ or index/ as (path, mtime, size, ETag or None), one
        at a time. Nothing of the listing is kept beyond what the caller keeps: S3's
        pages are read as they come (s3fs keeps ~1.2 kB per file in a whole listing), a
        folder is walked; other backends are listed whole, then iterated."""
        self.fs.invalidate_cache()  # listings must be fresh: others write here too
        base = self.layout.dir(kind)
        try:
            if self.local:
                yield from _walk(base)
            elif hasattr(self.fs, "_iterdir") and type(self.fs).__name__ == "S3FileSystem":
                yield from _s3_pages(self.fs, base)
            else:
                for p, info in self.fs.find(base, detail=True).items():
                    yield p, mtime_of(info), int(info.get("size") or 0), etag_of(info)
        except FileNotFoundError:
            return
        except OSError as e:
            raise RemoteUnavailable(f"cannot list {self.url}: {e}") from None

    def listing(self, base: str) -> list[tuple[str, float]]:
        """The files directly under `base` (fresh: others write here too) as (path,
        modification time); none when it does not exist."""
        self.fs.invalidate_cache(base)
        try:
            listed = self.fs.ls(base, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as e:
            raise RemoteUnavailable(f"cannot list {base} on {self.url}: {e}") from None
        return [(str(i["name"]), mtime_of(i)) for i in listed if i.get("type") != "directory"]

    def have(self, kind: str, ids: Iterable[str], jobs: int = 16) -> set[str]:
        """Which of `ids` (objects or action entries) the remote has. A few are asked
        one by one, in parallel, so a push costs what it sends, not what the remote
        holds; many are listed."""
        from concurrent.futures import ThreadPoolExecutor

        ids = list(ids)
        if len(ids) > ASK_EACH_BELOW:
            listed = self.list_oids() if kind == L.OBJECTS else self.list_actions()
            return listed & set(ids)
        path = self.layout.object_path if kind == L.OBJECTS else self.layout.action_path
        self.fs.invalidate_cache()
        with ThreadPoolExecutor(jobs) as pool:
            found = list(pool.map(lambda i: self._exists(path(i)), ids))
        return {i for i, yes in zip(ids, found, strict=True) if yes}

    def _exists(self, path: str) -> bool:
        """One request: s3fs's exists() follows a missing key with a listing."""
        try:
            self.fs.cat_file(path, start=0, end=1)
        except FileNotFoundError:
            return False
        except OSError:  # e.g. a range on an empty file
            return bool(self.fs.exists(path))
        return True

    def has(self, oid: str) -> bool:
        return bool(self.fs.exists(self.layout.object_path(oid)))

    def get_object(self, oid: str) -> bytes:
        """The verified bytes of `oid`; CorruptObject when they do not hash to it."""
        try:
            data = self.read(self.layout.object_path(oid))
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
        if not self.local:
            self.fs.pipe_file(path, data)
            return
        with self._local_write(path):
            tmp = self.layout.join(self.layout.dir(L.TMP), f"up-{uuid.uuid4().hex}")
            self.fs.makedirs(self.layout.dir(L.TMP), exist_ok=True)
            self.fs.pipe_file(tmp, data)
            self.fs.makedirs(parent, exist_ok=True)
            self.fs.mv(tmp, path)

    @contextlib.contextmanager
    def _local_write(self, path: str) -> Iterator[None]:
        """A remote folder under a file, or one this user may not write: the remote's
        problem (exit 6), in one line, not an unexpected error."""
        try:
            yield
        except (NotADirectoryError, PermissionError, IsADirectoryError) as e:
            why = "a file stands where a folder should be" if e.errno == errno.ENOTDIR else e
            raise RemoteUnavailable(f"cannot write to remote {self.url}: {why} ({path})") from None

    def read(self, path: str) -> bytes:
        """A small file in one request; FileNotFoundError when it is absent (also when a
        file stands where a folder of its path should be: nothing can be there)."""
        try:
            return bytes(self.fs.cat_file(path, **self._one_get))
        except NotADirectoryError as e:
            raise FileNotFoundError(e.errno, e.strerror, path) from None

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
            raw = self.read(self.layout.action_path(key))
        except FileNotFoundError:
            return None, ("missing", "is not on the remote")
        return self.trust(key, raw)

    def trust(
        self, key: str, raw: bytes | str
    ) -> tuple[ActionEntry | None, tuple[str, str] | None]:
        """An entry's JSON as read from the remote (its file or a pack), parsed and, with
        a team key, its signature checked."""
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
        self.write(self.layout.action_path(key), self.entry_bytes(key, entry))

    def entry_bytes(self, key: str, entry: ActionEntry) -> bytes:
        """An entry as this remote stores it: signed with the team key, else unsigned."""
        if self.signing_key is not None:
            sig = sign_entry(self.signing_key, key, list(entry.outputs), list(entry.rows))
            entry = entry.model_copy(update={"signature": sig})
        elif entry.signature is not None:
            entry = entry.model_copy(update={"signature": None})  # not ours to vouch for
        return entry.model_dump_json().encode()

    def manifest_index(
        self, store: Store | None = None
    ) -> tuple[dict[str, tuple[list[str], list[int]]], dict[str, list[str]]]:
        """From the step manifests of every run the remote's refs name: action key ->
        (outputs, rows), and step fingerprint -> its row-key segments. Manifests are
        content-addressed and verified on read, so an action entry that disagrees with
        them was not written by the run that made it. With `store`, what it remembers of
        runs it read before is not read again (castore/remote_index.py)."""
        from castore.remote_index import manifest_index

        return manifest_index(self, store)

    def list_actions(self) -> set[str]:
        return {key for p, *_ in self.scan(L.ACTIONS) if (key := L.oid_from_path(p))}

    def list_refs(
        self,
        problems: list[tuple[str, str]] | None = None,
        *,
        versions: dict[str, tuple[str, str]] | None = None,
        jobs: int = 16,
    ) -> list[tuple[str, str, str]]:
        """(name, sig, run manifest id); names, sigs and ids are validated, bad ones
        skipped with a warning (a remote cannot make us write outside the store) and
        added to `problems` as (ref, reason) when given. With `versions` (ref -> (version,
        run id) as last listed), a ref whose listed version (ETag) is unchanged is not
        read again, and `versions` is replaced by what this listing found. Refs are read
        `jobs` at a time; a ref that cannot be read for another reason than being bad
        raises RemoteUnavailable (skipping it would let gc sweep what it protects)."""
        from concurrent.futures import ThreadPoolExecutor

        listed = self._listed_refs(problems)
        known = versions if versions is not None else {}  # a folder lists no versions

        def target(item: tuple[str, str, str | None]) -> str | CastoreError:
            ref, path, version = item
            seen = known.get(ref)
            try:
                if version is not None and seen is not None and seen[0] == version:
                    return validate_id(seen[1])
                return validate_id(self.read(path).decode().strip())
            except (CastoreError, UnicodeDecodeError) as e:
                return CastoreError(str(e))
            except FileNotFoundError:
                return CastoreError("removed while it was listed")
            except OSError as e:
                raise RemoteUnavailable(f"cannot read refs of {self.url}: {e}") from None

        with ThreadPoolExecutor(jobs) as pool:  # a thread per ref at most (started on demand)
            targets = list(pool.map(target, listed))
        if versions is not None:
            versions.clear()
        out = []
        for (ref, _path, version), got in zip(listed, targets, strict=True):
            if isinstance(got, CastoreError):
                self._bad_ref(ref, got, problems)
                continue
            name, sig = ref.split("/")
            out.append((name, sig, got))
            if versions is not None and version is not None:
                versions[ref] = (version, got)
        return out

    def _listed_refs(
        self, problems: list[tuple[str, str]] | None
    ) -> list[tuple[str, str, str | None]]:
        """(name/sig, path, version from the listing) of each well-named ref, in order."""
        base = self.layout.ref_dir()
        self.fs.invalidate_cache()
        try:
            infos = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise RemoteUnavailable(f"cannot list refs of {self.url}: {e}") from None
        out = []
        for p in sorted(infos):
            rel = p[len(base.rstrip("/")) + 1 :] if p.startswith(base) else p
            parts = rel.split("/")
            if len(parts) != 2:
                continue
            try:
                L.validate_name(parts[0])
                validate_id(parts[1])
            except CastoreError as e:
                self._bad_ref(rel, e, problems)
                continue
            out.append((rel, p, etag_of(infos[p])))
        return out

    def _bad_ref(self, rel: str, error: Exception, problems: list[tuple[str, str]] | None) -> None:
        log.warning("remote %s: skipping ref %s: %s", self.url, rel, error)
        if problems is not None:
            problems.append((rel[:80], str(error)[:120]))

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

    # -- writer locks and leases (castore.remote_locks) ------------------------------

    def create(self, path: str, data: bytes) -> bool:
        """Write `path` only if it does not exist; False when it does. Atomic on a folder
        (hard link) and on S3 (If-None-Match); other backends check, then write."""
        if self.local:
            with self._local_write(path):
                tmp = self.layout.join(self.layout.dir(L.TMP), f"up-{uuid.uuid4().hex}")
                self.fs.makedirs(self.layout.dir(L.TMP), exist_ok=True)
                self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
                self.fs.pipe_file(tmp, data)
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    return False
                finally:
                    os.unlink(tmp)
            return True
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return True

    def writers(self) -> list[dict[str, Any]]:
        """Live writer locks (push, write-through, gc) on the remote: refreshed within the
        lock TTL."""
        from castore.remote_locks import is_stale, lock_ttl, locks

        ttl = lock_ttl()
        return [
            {**info, "path": p}
            for p, info in locks(self, self.layout.dir(L.LOCKS))
            if p.endswith(".json") and not is_stale(info, ttl)
        ]

    def writer_lock(self, kind: str, exclusive: bool) -> Any:
        """A context holding a WriterLock: gc (exclusive) waits for no other writer, a
        push or write-through run for no gc (castore.remote_locks)."""
        from castore.remote_locks import writer_lock

        return writer_lock(self, kind, exclusive=exclusive)


_WORKER_ENV = ("FSSPEC_", "AWS_", "GOOGLE_", "AZURE_", "HF_")
_SECRET_WORDS = ("KEY", "SECRET", "TOKEN", "PASSWORD", "CREDENTIAL")


def worker_env() -> tuple[dict[str, str], dict[str, str]]:
    """What a Ray worker on another node needs to reach the remote, from this process's
    environment: (settings, secrets). Settings (endpoints, region, profile name) may go
    into Ray's runtime environment; secrets (a name with KEY, SECRET, TOKEN, PASSWORD or
    CREDENTIAL) must not, since Ray writes runtime environments to its log files."""
    settings: dict[str, str] = {}
    secrets: dict[str, str] = {}
    for name, value in os.environ.items():
        if name.startswith(_WORKER_ENV) and name != SIGNING_ENV:
            (secrets if any(w in name for w in _SECRET_WORDS) else settings)[name] = value
    return settings, secrets


def fetch_object(store: Store, remote: Remote, oid: str) -> int:
    """Download, verify, store. A mismatch raises CorruptObject naming `oid` and stores
    nothing."""
    data = remote.get_object(oid)
    stored = store.put_bytes(data)
    if stored != oid:  # cannot happen after get_object's check; kept as the invariant
        raise CorruptObject(oid, None)
    return len(data)


__all__ = [
    "Remote",
    "RemoteError",
    "RemoteUnavailable",
    "check_url",
    "explain_remote_error",
    "fetch_object",
    "worker_env",
]


Listed = tuple[str, float, int, str | None]  # (path, mtime, size, ETag)


def mtime_of(info: dict[str, Any]) -> float:
    """Modification time from an fsspec info dict (local: mtime; s3: LastModified);
    unknown is now, so what it dates is never taken for old."""
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
    return time.time()


def etag_of(info: dict[str, Any]) -> str | None:
    tag = info.get("ETag") or info.get("etag")
    return str(tag).strip('"').lower() if tag else None


def _walk(base: str) -> Iterator[Listed]:
    """A folder remote's files, folder by folder (shards; index/<fp>/<bucket>/)."""
    with os.scandir(base) as found:
        for f in found:
            if f.is_dir(follow_symlinks=False):
                yield from _walk(f.path)
            elif f.is_file(follow_symlinks=False):
                st = f.stat(follow_symlinks=False)
                yield f.path, st.st_mtime, st.st_size, None


def _s3_pages(fs: Any, base: str) -> Iterator[Listed]:
    """An S3 listing consumed page by page on s3fs's event loop, handed over as compact
    tuples (the info dicts it builds per key are dropped at once)."""
    import asyncio

    bucket, key, _ = fs.split_path(base)
    # A few pages ahead at most: a reader slower than the listing must not end up
    # holding all of it. The producer waits on the loop (never blocks it), so a reader
    # that stops early can cancel it.
    pages: queue.Queue[list[Listed] | BaseException | None] = queue.Queue()
    ahead = 4

    async def produce() -> None:
        try:
            await fs.set_session()  # what _iterdir does first; then its parser is ours
            fast_timestamps(fs.session)
            page: list[Listed] = []
            prefix = key.rstrip("/") + "/"
            async for info in fs._iterdir(bucket, delimiter="", prefix=prefix):
                size = int(info.get("size") or 0)
                page.append((info["name"], mtime_of(info), size, etag_of(info)))
                if len(page) >= 1000:
                    while pages.qsize() >= ahead:
                        await asyncio.sleep(0.005)
                    pages.put(page)
                    page = []
            pages.put(page)
            pages.put(None)
        except BaseException as e:  # handed to the reader, raised there
            pages.put(e)

    running = asyncio.run_coroutine_threadsafe(produce(), fs.loop)
    try:
        for page in handed_over(pages):
            yield from page
    finally:
        running.cancel()


def fast_timestamps(session: Any) -> None:
    """Make a botocore session parse S3's ISO 8601 timestamps with the standard library:
    its default (dateutil) took 60 % of the client's CPU in a listing (a LastModified per
    key), which on a small machine is time the server does not get. Set through botocore's
    public parser defaults, for this session only; anything else is parsed as before."""
    with contextlib.suppress(AttributeError, KeyError, ValueError):
        session.get_component("response_parser_factory").set_parser_defaults(
            timestamp_parser=parse_timestamp
        )


def parse_timestamp(value: Any) -> Any:
    """A timestamp of a botocore response: S3's `2026-11-29T09:14:50.000Z` by
    datetime.fromisoformat (UTC, as botocore gives it), any other form by botocore."""
    import datetime as dt

    if isinstance(value, str) and len(value) >= 20 and value[10] == "T" and value[-1] == "Z":
        with contextlib.suppress(ValueError):
            parsed = dt.datetime.fromisoformat(value)
            if parsed.utcoffset() == dt.timedelta(0):
                return parsed
    from botocore.utils import parse_timestamp as slow

    return slow(value)


def handed_over(items: queue.Queue[Any]) -> Iterator[Any]:
    """What a producer puts in `items`, until it puts None; an exception it puts is
    raised here, in the reader."""
    while (got := items.get()) is not None:
        if isinstance(got, BaseException):
            raise got
        yield got
