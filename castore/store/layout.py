"""The one owner of the on-disk layout (DESIGN.md "On disk").

Pure path arithmetic: no I/O. The joiner is passed in, so the local store and an fsspec
remote (which joins with "/") share the same layout code.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from castore.errors import InvalidObjectId, InvalidRefName
from castore.hashing import validate_id

# 2: objects may extend their input (castore.store.extend); a castore that reads only
# version 1 would read such an object as its own columns alone, so it must refuse the
# store. A version-1 store is upgraded when opened: everything in it reads the same.
LAYOUT_VERSION = 2
UPGRADES_FROM = (1,)
LAYOUT_FILE = "castore-layout.json"

OBJECTS = "objects"
ACTIONS = "actions"
REFS = "refs"
RUNS = "runs"
TMP = "tmp"
QUARANTINE = "quarantine"
LOCKS = "locks"
CONFIG = "config.yaml"
INDEX = "index"  # index/<fingerprint>/<segment id>: the row-key segments of a row-wise step
LEASES = "leases"
CLAIMS = "claims"  # locks/claims/<fingerprint>-<run id>-<n>: rows a run computes now
RUN_LOCKS = "runs"
JOBS = "jobs"  # jobs/<job key>.json: a provider's batch job for rows of an LLM step
# appends/<key>.json: where a loader's batches of a jsonl file end (castore/pipeline/appends.py)
APPENDS = "appends"
# remotes/: what this store remembers of remotes it read through (castore/remote_index.py)
REMOTES = "remotes"
# What a run folder holds: the run's pipeline.yaml and log, its leaf batches (data/, with
# the stamp file data/.castore-batches.json), the Distiset's memory-mapped leaves, and
# logs/<run id>.log: each attempt's log while it runs (two runs of one pipeline at once
# must not write one file), placed as pipeline.log when the attempt ends.
RUN_FILES = ("pipeline.yaml", "pipeline.log", "data", ".arrow", "logs")
DATA_STAMP = ".castore-batches.json"

_BAD_NAME = re.compile(r"[\x00-\x1f\x7f/\\]")
_SHARD_RE = re.compile(r"[0-9a-f]{2}")
_REST_RE = re.compile(r"[0-9a-f]{62}")


def validate_name(name: object, what: str = "name") -> str:
    """A pipeline/ref name safe to use as one path component."""
    if not isinstance(name, str) or not name:
        raise InvalidRefName(f"invalid {what} {name!r}: must be a non-empty string")
    if name in (".", "..") or ".." in name or _BAD_NAME.search(name) or name.startswith("."):
        raise InvalidRefName(
            f"invalid {what} {name!r}: no '/', '\\', '..', leading '.', NUL or control characters"
        )
    if len(name.encode("utf-8")) > 200:
        raise InvalidRefName(f"invalid {what} {name[:40]!r}...: longer than 200 bytes")
    return name


def path_to_oid(shard: str, rest: str) -> str | None:
    """Inverse of `Layout.object_path` for listing; None for strays (temp files, .DS_Store)."""
    if _SHARD_RE.fullmatch(shard) and _REST_RE.fullmatch(rest):
        return shard + rest
    return None


def oid_from_path(path: str) -> str | None:
    """The id a sharded path (".../ab/cdef...", any separator "/") names, or None."""
    parts = path.rstrip("/").rsplit("/", 2)
    return path_to_oid(parts[-2], parts[-1]) if len(parts) >= 2 else None


# Every name a store has at its root (a folder holding anything else is not a store).
STORE_NAMES = frozenset(
    {OBJECTS, ACTIONS, TMP, REFS, RUNS, LOCKS, QUARANTINE, LAYOUT_FILE, CONFIG, INDEX}
    | {APPENDS, REMOTES}
)


@dataclass(frozen=True)
class Layout:
    root: str
    join: Callable[..., str] = posixpath.join
    # "<root>/<kind>/" per sharded kind: a cache hit builds ~6 of these paths, and a
    # join call each was ~10 us of a hit's ~100 us.
    _dirs: dict[str, str] = field(init=False, repr=False, compare=False)
    _sep: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        sep = self.join("a", "b")[1:-1]
        dirs = {k: self.join(self.root, k) + sep for k in (OBJECTS, ACTIONS)}
        object.__setattr__(self, "_dirs", dirs)
        object.__setattr__(self, "_sep", sep)

    def _sharded(self, kind: str, oid: str) -> str:
        validate_id(oid)
        return self._dirs[kind] + oid[:2] + self._sep + oid[2:]

    def object_path(self, oid: str) -> str:
        return self._sharded(OBJECTS, oid)

    def action_path(self, key: str) -> str:
        return self._sharded(ACTIONS, key)

    def ref_dir(self, name: str | None = None) -> str:
        if name is None:
            return self.join(self.root, REFS, RUNS)
        return self.join(self.root, REFS, RUNS, validate_name(name))

    def ref_path(self, name: str, sig: str) -> str:
        try:
            validate_id(sig)
        except InvalidObjectId as e:
            raise InvalidRefName(f"invalid run signature {sig!r}: {e}") from None
        return self.join(self.ref_dir(name), sig)

    def run_dir(self, name: str, sig: str) -> str:
        validate_id(sig)
        return self.join(self.root, RUNS, validate_name(name), sig)

    def run_file(self, name: str, sig: str, what: str) -> str:
        """A path in a run folder: one of RUN_FILES."""
        if what not in RUN_FILES:
            raise ValueError(f"not a run folder entry: {what!r}")
        return self.join(self.run_dir(name, sig), what)

    def dir(self, kind: str) -> str:
        return self.join(self.root, kind)

    def lock_path(self, lock_name: str) -> str:
        return self.join(self.root, LOCKS, validate_name(lock_name, "lock name"))

    def job_path(self, key: str) -> str:
        return self.join(self.root, JOBS, validate_id(key) + ".json")

    def lease_path(self, key: str) -> str:
        validate_id(key)
        return self.join(self.root, LOCKS, LEASES, key)

    def run_lock_path(self, run_id: str) -> str:
        return self.join(self.root, LOCKS, RUN_LOCKS, validate_name(run_id, "run id"))

    def dirs(self) -> list[str]:
        """Every top-level folder a store creates (quarantine/ appears when needed)."""
        return [self.dir(k) for k in (OBJECTS, ACTIONS, TMP, REFS, RUNS, LOCKS)]

    def append_record_path(self, key: str) -> str:
        validate_id(key)
        return self.join(self.root, APPENDS, key + ".json")

    def index_dir(self, fingerprint: str) -> str:
        validate_id(fingerprint)
        return self.join(self.root, INDEX, fingerprint)

    def index_path(self, fingerprint: str, segment: str) -> str:
        validate_id(segment)
        return self.join(self.index_dir(fingerprint), segment)

    def run_locks_dir(self) -> str:
        return self.join(self.root, LOCKS, RUN_LOCKS)

    def leases_dir(self) -> str:
        return self.join(self.root, LOCKS, LEASES)

    def claims_dir(self) -> str:
        return self.join(self.root, LOCKS, CLAIMS)

    @property
    def layout_file(self) -> str:
        return self.join(self.root, LAYOUT_FILE)

    @property
    def config_file(self) -> str:
        return self.join(self.root, CONFIG)
