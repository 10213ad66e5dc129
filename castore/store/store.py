"""The local content-addressed store: objects, action entries, refs, locks.

Invariants (DESIGN.md "Writing"), which every method below follows:

- MUST: every file is staged in `tmp/` (same filesystem) and `os.replace`d into place, so a
  reader sees a whole file or none; on any exception (Ctrl+C included) the stage is removed.
- MUST: an object that already exists is never rewritten; objects are read-only (0444).
- MUST: an action entry is written only after all its output objects exist.
- MUST: reads verify the digest unless told not to; a mismatch quarantines the file and
  raises `CorruptObject`, so callers treat the object as missing and recompute it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import shutil
import time
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from castore.errors import (
    CorruptObject,
    DamagedRef,
    InvalidObjectId,
    LayoutVersionError,
    StoreError,
    StoreNotFound,
    StoreNotWritable,
    UnknownObject,
    one_line,
)
from castore.hashing import Hasher, entry_check, hash_bytes, hash_file, validate_id
from castore.store import actionpack
from castore.store import layout as L
from castore.store.extend import read_whole
from castore.store.files import Stage, default_root, replace_into_shard, translate_oserror
from castore.store.journal import Journals, JournalWriter
from castore.store.locks import FileLock, require_posix
from castore.store.models import ActionEntry, LayoutInfo
from castore.store.parquet import encode_parquet, read_parquet

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_STAGE_IDS = itertools.count()


class Store:
    """A store rooted at `cache_dir` (see `default_root`); created on first use."""

    def __init__(
        self,
        cache_dir: str | os.PathLike[str] | None = None,
        *,
        fsync: bool | None = None,
        read_only: bool = False,
        create: bool = True,
    ) -> None:
        require_posix()
        self.root = Path(cache_dir).expanduser() if cache_dir is not None else default_root()
        self.root = self.root.absolute()
        self.layout = L.Layout(str(self.root), os.path.join)
        self.fsync = fsync if fsync is not None else os.environ.get("CASTORE_FSYNC") == "1"
        self.read_only = read_only
        self._entry_packs: actionpack.Packs | None = None
        self._journals: Journals | None = None
        # Set while this process's run is alone on the store (castore.store.journal).
        self.journal: JournalWriter | None = None
        self._open(create and not read_only)

    # -- opening -------------------------------------------------------------------------

    def _open(self, create: bool) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"cache dir {self.root} is a file, not a folder")
        info_path = Path(self.layout.layout_file)
        if info_path.exists():
            self._check_layout(info_path)
            return
        if not create:
            raise StoreNotFound(
                f"no castore store at {self.root} (nothing has run with this cache dir; "
                "`cas run` creates it)"
            )
        # Another process may be creating the store right now: its names are fine here.
        if self.root.exists() and any(
            p.name not in L.STORE_NAMES and not p.name.startswith(".castore-layout")
            for p in self.root.iterdir()
        ):
            raise StoreError(
                f"{self.root} is not empty and is not a castore store (no {L.LAYOUT_FILE}); "
                "choose an empty or new folder"
            )
        try:
            self._create()
        except OSError as e:
            raise translate_oserror(e, self.root, self.root.parent) from None
        self._check_layout(info_path)

    def _create(self) -> None:
        """Create a new store; safe when several processes do it at the same moment."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._write_layout(replace=False)
        for d in self.layout.dirs():
            os.makedirs(d, exist_ok=True)

    def _write_layout(self, *, replace: bool) -> None:
        """castore-layout.json of this version, whole or not at all: a new store's (link()
        never replaces: of several creators exactly one wins) or an older one's, upgraded."""
        info = LayoutInfo(layout_version=L.LAYOUT_VERSION).model_dump_json(indent=2).encode()
        stage = self.root / f".castore-layout.{os.getpid()}.{next(_STAGE_IDS)}"
        try:
            stage.write_bytes(info)
            (os.replace if replace else os.link)(stage, self.layout.layout_file)
        except FileExistsError:
            pass
        finally:
            stage.unlink(missing_ok=True)

    def _check_layout(self, info_path: Path) -> None:
        try:
            info = LayoutInfo.model_validate_json(info_path.read_bytes())
        except ValidationError as e:
            why = f"{info_path} is damaged ({one_line(e)}): it is not castore's store marker"
            raise LayoutVersionError(f"{why}; restore it, or use a new --cache-dir") from None
        except (OSError, ValueError) as e:
            raise LayoutVersionError(f"cannot read {info_path}: {e}") from None
        if info.layout_version in L.UPGRADES_FROM:
            # A store this process may not write is left as it is: it gets no new objects.
            if not self.read_only:
                with contextlib.suppress(OSError):
                    self._write_layout(replace=True)
        elif info.layout_version != L.LAYOUT_VERSION:
            raise LayoutVersionError(
                f"store {self.root} has layout version {info.layout_version}; this castore "
                f"reads version {L.LAYOUT_VERSION}. Upgrade castore or use another --cache-dir"
            )
        for d in self.layout.dirs():
            if os.path.exists(d) and not os.path.isdir(d):
                raise StoreError(f"{d} is a file; the store expects a folder there")

    def _writable(self) -> None:
        if self.read_only:
            raise StoreNotWritable(f"store {self.root} was opened read-only")

    # -- the one helper that writes every file ------------------------------------------

    @contextlib.contextmanager
    def _staged(self, mode: int = 0o644) -> Iterator[Stage]:
        """A temp file in tmp/, created with its final `mode` (writing through the open
        descriptor works even for 0444, which saves a chmod per object)."""
        self._writable()
        tmp_dir = self.layout.dir(L.TMP)
        # pid + counter names are unique without mkstemp's random retries, which cost
        # ~0.3 ms per call here (bench_engine); O_EXCL still refuses any clash.
        path = os.path.join(tmp_dir, f"stage-{os.getpid()}-{next(_STAGE_IDS)}")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        except FileNotFoundError:
            try:
                os.makedirs(tmp_dir, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            except OSError as e:
                raise translate_oserror(e, tmp_dir, self.root) from None
        except OSError as e:
            raise translate_oserror(e, tmp_dir, self.root) from None
        stage = Stage(os.fdopen(fd, "wb"), path, Hasher())
        try:
            yield stage
        except OSError as e:
            needed = max(stage.needed, stage.hasher.size)
            raise translate_oserror(e, path, self.root, needed) from None
        finally:
            if not stage.file.closed:
                # Closing flushes; on a full disk that raises again, and the stage goes anyway.
                with contextlib.suppress(OSError):
                    stage.file.close()
            if not stage.placed:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(stage.path)

    def _commit(
        self, stage: Stage, final: str, *, oid: str | None = None, checked: bool = False
    ) -> bool:
        """Move a stage into place. An object (`oid` given) is never rewritten while
        intact: False when an intact copy is already there; a corrupt one is replaced.
        `checked`: the caller found it absent just before staging (a copy landing since
        is the same bytes, so replacing it is harmless and the second look is saved)."""
        try:
            stage.file.flush()
            if self.fsync:
                os.fsync(stage.file.fileno())
            stage.file.close()
            if oid is not None and not checked and self.reuse(oid):
                return False
            parent = os.path.dirname(final)
            replace_into_shard(stage.path, final)
            stage.placed = True
            if self.fsync:
                dfd = os.open(parent, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        except OSError as e:
            raise translate_oserror(e, final, self.root, stage.needed) from None
        return True

    def write_file(self, final: str, data: bytes) -> None:
        """A small file that is not an object (an entry, a ref, config.yaml), atomically."""
        with self._staged() as stage:
            stage.needed = len(data)
            stage.write(data)
            self._commit(stage, final)

    # -- objects -------------------------------------------------------------------------

    @contextlib.contextmanager
    def atomic_writer(self) -> Iterator[Stage]:
        """Stage an object; on clean exit it is stored under its digest (`w.oid`)."""
        with self._staged(0o444) as stage:
            yield stage
            oid = stage.hasher.hexdigest()
            self._commit(stage, self.layout.object_path(oid), oid=oid)
            stage.oid = oid

    def put_bytes(self, data: bytes) -> str:
        oid = hash_bytes(data)
        if self.reuse(oid):  # present and intact; a corrupt copy is replaced below
            return oid
        with self._staged(0o444) as stage:
            stage.needed = len(data)
            stage.write(data)
            self._commit(stage, self.layout.object_path(oid), oid=oid, checked=True)
        return oid

    def put_file(self, path: str | os.PathLike[str]) -> str:
        """Copy a file in, hashing while copying; returns its id."""
        with open(path, "rb") as src, self.atomic_writer() as w:
            shutil.copyfileobj(src, w, _CHUNK)
        assert w.oid is not None
        return w.oid

    def put_table(self, table: pa.Table) -> str:
        """Store a table as Parquet with fixed options: same table, same bytes, same id."""
        return self.put_encoded(encode_parquet(table))

    def put_encoded(self, buf: pa.Buffer) -> str:
        """Store a table's bytes as `encode_parquet` made them."""
        oid = hash_bytes(memoryview(buf))
        if self.reuse(oid):  # present and intact; a corrupt copy is replaced below
            return oid
        with self._staged(0o444) as stage:
            stage.needed = buf.size
            stage.file.write(memoryview(buf))
            self._commit(stage, self.layout.object_path(oid), oid=oid, checked=True)
        return oid

    def has(self, oid: str) -> bool:
        return os.path.isfile(self.layout.object_path(oid))

    def path_of(self, oid: str) -> str:
        return self.layout.object_path(oid)

    def size_of(self, oid: str) -> int:
        return os.stat(self.layout.object_path(oid)).st_size

    def _read_buffer(self, oid: str, verify: bool, *, mapped: bool = True) -> Any:
        """The object's bytes, memory-mapped as a pyarrow Buffer (for tables), or read
        plainly (manifests: no pyarrow import, ~0.1 s, for a command that reads JSON)."""
        path = self.layout.object_path(oid)
        try:
            if mapped:
                import pyarrow as pa

                buf = pa.memory_map(path, "r").read_buffer()
            else:
                with open(path, "rb") as f:
                    buf = f.read()
        except FileNotFoundError:
            raise UnknownObject(f"object {oid} is not in the store {self.root}") from None
        if verify and hash_bytes(memoryview(buf)) != oid:
            raise CorruptObject(oid, self.quarantine(oid))
        return buf

    def get_bytes(self, oid: str, *, verify: bool = True) -> bytes:
        data: bytes = self._read_buffer(oid, verify, mapped=False)
        return data

    def get_table(self, oid: str, *, verify: bool = True) -> pa.Table:
        """The table of object `oid`; an object that extends its input (castore.store.
        extend) is read with the objects it names, each verified (whatever `verify`)."""
        buf = self._read_buffer(oid, verify)
        try:
            table = read_parquet(buf)
        except Exception as e:  # pyarrow raises ArrowInvalid/OSError for non-Parquet bytes
            # Intact bytes that are not Parquet (a JSON manifest) are a caller error;
            # bytes that fail the digest are corruption.
            if verify or hash_bytes(memoryview(buf)) == oid:
                raise StoreError(f"object {oid} is not a Parquet table: {e}") from None
            raise CorruptObject(oid, self.quarantine(oid)) from None
        return read_whole(self, oid, table)

    def verify(self, oid: str) -> bool:
        """True when the object's bytes hash to `oid`."""
        return hash_file(self.layout.object_path(oid)) == oid

    def quarantine(self, oid: str) -> str | None:
        """Move a corrupt object out of objects/; returns where it went."""
        src = self.layout.object_path(oid)
        qdir = self.layout.dir(L.QUARANTINE)
        dst = os.path.join(qdir, f"{oid}.{time.time_ns()}")
        try:
            os.makedirs(qdir, exist_ok=True)
            os.replace(src, dst)
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("could not quarantine %s: %s", oid, e)
            return None
        log.warning("object %s failed verification; moved to %s", oid, dst)
        return dst

    def delete_object(self, oid: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.layout.object_path(oid))

    def iter_oids(self) -> Iterator[str]:
        yield from self._iter_sharded(L.OBJECTS)

    def _iter_sharded(self, kind: str) -> Iterator[str]:
        base = self.layout.dir(kind)
        try:
            shards = sorted(os.scandir(base), key=lambda e: e.name)
        except FileNotFoundError:
            return
        for shard in shards:
            if not shard.is_dir():
                log.debug("skipping stray %s", shard.path)
                continue
            for entry in os.scandir(shard.path):
                oid = L.path_to_oid(shard.name, entry.name)
                if oid is None:
                    log.debug("skipping stray %s", entry.path)
                    continue
                yield oid

    # -- action entries ------------------------------------------------------------------

    def put_action(self, key: str, entry: ActionEntry, *, made_here: bool = False) -> None:
        """Write an entry; `made_here`: this process computed it, so it gets its check
        (any other, e.g. from a remote, is written without one)."""
        validate_id(key)
        missing = [oid for oid in (*entry.outputs, *entry.needs()) if not self.has(oid)]
        if missing:
            raise StoreError(f"action {key}: object {missing[0]} is not in the store")
        check = entry_check(key, entry.outputs, entry.rows) if made_here else None
        if entry.check != check:
            entry = entry.model_copy(update={"check": check})
        raw = entry.model_dump_json().encode()
        if self.journal is not None and self.journal.append(key, raw):
            self.journals.add(key, raw)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.layout.action_path(key))  # a tombstone would shadow it
            return
        self.write_file(self.layout.action_path(key), raw)

    def read_action(self, key: str) -> bytes | None:
        """The entry's JSON as stored: the loose file, else the journaled, else the packed
        copy (a loose tombstone shadows an entry that was dropped); None when none."""
        try:
            with open(self.layout.action_path(key), "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            journaled = self.journals.get(key)
            if journaled is not None:
                return journaled
            packed = self.entry_packs.find(key)
            return packed.encode() if packed is not None else None
        return None if raw == actionpack.TOMBSTONE else raw

    def peek_action(self, key: str) -> ActionEntry | None:
        """The entry as stored, or None (missing or unreadable); unlike `get_action`, it
        drops nothing, so a reader that must write nothing (gc's plan, `cas status`) can
        use it."""
        try:
            raw = self.read_action(key)
            return ActionEntry.model_validate_json(raw) if raw is not None else None
        except (OSError, ValueError):
            return None

    def get_action(self, key: str, *, outputs_checked: bool = False) -> ActionEntry | None:
        """The entry for `key`, or None; an entry naming a missing object is dropped
        (`outputs_checked`: the caller verifies each output next, which finds it)."""
        raw = self.read_action(key)
        if raw is None:
            return None
        try:
            entry = ActionEntry.model_validate_json(raw)
        except ValueError:
            log.warning("action entry %s is unreadable; dropping it", key)
            self.delete_action(key)
            return None
        if not outputs_checked and not all(
            self.has(oid) for oid in (*entry.outputs, *entry.needs())
        ):
            log.info("action entry %s names a missing object; dropping it", key)
            self.delete_action(key)
            return None
        return entry

    def delete_action(self, key: str) -> None:
        """Drop an entry: its loose file goes; a packed copy is shadowed by a tombstone
        (gc's repack removes both)."""
        if self.read_only:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.layout.action_path(key))
        if self.journals.get(key) is not None or self.entry_packs.find(key) is not None:
            self.write_file(self.layout.action_path(key), actionpack.TOMBSTONE)

    def iter_actions(self) -> Iterator[str]:
        """Every entry's key, loose or packed (each once; dropped ones not)."""
        seen = set()
        for key in self._iter_sharded(L.ACTIONS):
            seen.add(key)
            if self.read_action(key) is not None:
                yield key
        for key in self.journals.keys():
            if key not in seen:
                seen.add(key)
                yield key
        for key in self.entry_packs.keys():
            if key not in seen:
                seen.add(key)
                yield key

    @property
    def entry_packs(self) -> actionpack.Packs:
        if self._entry_packs is None:
            self._entry_packs = actionpack.Packs(self)
        return self._entry_packs

    @property
    def journals(self) -> Journals:
        if self._journals is None:
            self._journals = Journals(self)
        return self._journals

    # -- row-key index segments -----------------------------------------------------------

    def add_row_segment(self, fingerprint: str, segment: str) -> None:
        """Announce a row-key segment object of a row-wise step (an empty marker file,
        written after the segment object exists)."""
        if not self.has(segment):
            raise StoreError(f"row segment {segment} is not in the store")
        self.write_file(self.layout.index_path(fingerprint, segment), b"")

    def row_segments(self, fingerprint: str, known: Collection[str] = ()) -> list[str]:
        """The segment ids announced for a step fingerprint, except the `known` ones
        (markers of vanished segments are skipped; gc and fsck --repair remove them)."""
        try:
            names = os.listdir(self.layout.index_dir(fingerprint))
        except FileNotFoundError:
            return []
        fresh = (n for n in names if n not in known)
        return sorted(n for n in fresh if L.path_to_oid(n[:2], n[2:]) and self.has(n))

    def drop_row_segment(self, fingerprint: str, segment: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.layout.index_path(fingerprint, segment))

    def iter_row_segments(self) -> Iterator[tuple[str, str]]:
        """(fingerprint, segment id) of every marker, for gc and fsck."""
        base = self.layout.dir(L.INDEX)
        with contextlib.suppress(FileNotFoundError):
            for fp in sorted(os.listdir(base)):
                if not L.path_to_oid(fp[:2], fp[2:]):
                    continue
                with contextlib.suppress(NotADirectoryError, FileNotFoundError):
                    for seg in sorted(os.listdir(os.path.join(base, fp))):
                        if L.path_to_oid(seg[:2], seg[2:]):
                            yield fp, seg

    # -- refs ----------------------------------------------------------------------------

    def set_ref(self, name: str, sig: str, oid: str) -> None:
        validate_id(oid)
        self.write_file(self.layout.ref_path(name, sig), (oid + "\n").encode())

    def get_ref(self, name: str, sig: str) -> str | None:
        """The run manifest id a ref names; None when there is no ref; DamagedRef when the
        file holds anything but one id (`cas fsck --repair` rewinds or removes it)."""
        path = self.layout.ref_path(name, sig)
        try:
            with open(path, "rb") as f:
                raw = f.read(200)
        except FileNotFoundError:
            return None
        except IsADirectoryError:
            raw = b""
        try:
            return validate_id(raw.decode("ascii").strip())
        except (UnicodeDecodeError, InvalidObjectId):
            shown = raw[:20].decode("ascii", "replace").strip() or "nothing"
            raise DamagedRef(
                f"ref {name}/{sig[:12]} is damaged (holds {shown!r}, not a run manifest id); "
                "run `cas fsck --repair`"
            ) from None

    def delete_ref(self, name: str, sig: str) -> bool:
        path = self.layout.ref_path(name, sig)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(path))  # only succeeds when empty
        return True

    def list_refs(self) -> list[tuple[str, str, str]]:
        """(name, sig, run manifest id) for every ref; unreadable refs are skipped."""
        out = []
        base = self.layout.ref_dir()
        try:
            names = sorted(os.listdir(base))
        except FileNotFoundError:
            return []
        for name in names:
            try:
                sigs = sorted(os.listdir(os.path.join(base, name)))
            except NotADirectoryError:
                continue
            for sig in sigs:
                try:
                    oid = self.get_ref(name, sig)
                except (OSError, ValueError, DamagedRef) as e:
                    log.warning("skipping ref %s/%s: %s", name, sig[:12], e)
                    continue
                if oid:
                    out.append((name, sig, oid))
        return out

    # -- locks ---------------------------------------------------------------------------

    def run_lock(self, run_id: str, detail: dict | None = None) -> FileLock:
        return FileLock(self.layout.run_lock_path(run_id), "run", detail)

    def lease(self, key: str, detail: dict | None = None) -> FileLock:
        """A short lease on an action key, taken while its batch is computed, so another
        run that needs the same key waits for the entry instead of paying again."""
        return FileLock(self.layout.lease_path(key), "lease", detail)

    def reuse(self, oid: str) -> bool:
        """An object about to be served again (a cache hit): True when it is present and
        its bytes still hash to `oid`, and then freshened for gc's grace period. A corrupt
        object is quarantined and False is returned, so the caller recomputes it: a cache
        hit never serves bytes that are not the object's. Costs one blake3 pass over the
        file (castore.hashing.hash_file; see benchmarks/bench_verify.py)."""
        return self.check_reuse(oid) is True

    def check_reuse(self, oid: str) -> bool | None:
        """`reuse`, telling why not: False when the object was corrupt (quarantined),
        None when it is missing."""
        path = self.layout.object_path(oid)
        try:
            digest = hash_file(path)
        except FileNotFoundError:
            return None
        if digest != oid:
            self.quarantine(oid)
            return False
        return True if _touch(path) else None

    def freshen(self, oid: str) -> bool:
        """Touch an object that is being reused, so gc's grace period protects it like a
        new one (git's "freshen"); False when it is gone."""
        return _touch(self.layout.object_path(oid))

    def gc_lock(self) -> FileLock:
        return FileLock(self.layout.lock_path("gc.lock"), "gc")


def _touch(path: str) -> bool:
    try:
        os.utime(path)
    except FileNotFoundError:
        return False
    except OSError:
        pass  # a read-only store cannot be collected either
    return True
