"""The file-level pieces under Store: where the store lives by default, staged files,
moving a file into a shard folder, and one-line errors for the OSErrors of writing."""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from castore.errors import StoreError, StoreFull, StoreNotWritable
from castore.hashing import Hasher

SHARD_RETRIES = 50
FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}


def default_root() -> Path:
    """`$CASTORE_CACHE_DIR`, else `$XDG_CACHE_HOME/castore`, else `~/.cache/castore`."""
    env = os.environ.get("CASTORE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "castore"


def translate_oserror(
    e: OSError, path: str | os.PathLike[str], root: Path, needed: int | None = None
) -> StoreError:
    """A one-line, actionable StoreError for an OSError met while writing `path`;
    `needed` is the size of what was being written, when known."""
    if e.errno in FULL:
        need = f"; needs {needed:,} bytes" if needed else ""
        try:
            free = shutil.disk_usage(root).free
            space = f"; {free:,} bytes free on that filesystem"
        except OSError:
            space = ""
        return StoreFull(
            f"no space left writing {path} ({os.strerror(e.errno)}){need}{space}; free some "
            "space (`cas gc`) or pass --cache-dir"
        )
    if e.errno in DENIED:
        return StoreNotWritable(
            f"cannot write {path}: {os.strerror(e.errno)}; check the permissions of the cache "
            "dir or pass --cache-dir"
        )
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        return StoreError(f"cannot write {path}: a file stands where a folder should be")
    return StoreError(f"cannot write {path}: {e.strerror or e}")


def replace_into_shard(src: str, final: str) -> None:
    """os.replace into a shard folder that may not exist yet, or that gc's sweep of empty
    shards may remove between our mkdir and our rename: retry until it lands (bounded;
    gc removes a shard only while it is empty, so a retry after mkdir wins in practice)."""
    for _ in range(SHARD_RETRIES):
        try:
            os.replace(src, final)
            return
        except FileNotFoundError:
            if not os.path.exists(src):
                raise
            os.makedirs(os.path.dirname(final), exist_ok=True)
    os.replace(src, final)


@dataclass
class Stage:
    """An open temp file in tmp/ that hashes what passes through `write`."""

    file: IO[bytes]
    path: str
    hasher: Hasher
    oid: str | None = None  # set once the stage is committed as an object
    needed: int = 0  # bytes the caller is about to write, for a full-disk message
    placed: bool = False  # moved into place: nothing left in tmp/ to remove

    def write(self, data: Any) -> int:
        mv = memoryview(data)
        self.hasher.update(mv)
        return self.file.write(mv)

    # pyarrow and shutil treat anything with these as a writable file.
    def flush(self) -> None:
        self.file.flush()

    @property
    def closed(self) -> bool:
        return self.file.closed

    def tell(self) -> int:
        return self.hasher.size
