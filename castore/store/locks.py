"""Small JSON lock files held with flock(2).

The kernel releases a flock when its holder dies (kill -9 included), so a lock left by a
killed process never blocks anything: the next `acquire` simply gets it. The JSON inside
(pid, host, time, kind) is for people and for error messages only.
"""

from __future__ import annotations

import contextlib
import errno

try:
    import fcntl
except ImportError:  # Windows: Store() refuses first, in one line (store.require_posix)
    fcntl = None  # type: ignore[assignment]
import os
import socket
import time

from castore.errors import StoreError, StoreLocked
from castore.store.models import LockInfo

# Descriptors of the locks this process holds. A forked child (a process-pool worker)
# inherits them, and a flock lives as long as any copy of its descriptor: a worker that
# outlives a kill -9'ed driver would keep the run "running". Children close their copies
# (closing, unlike LOCK_UN, leaves the parent's lock in place).
_HELD: set[int] = set()


def _close_inherited() -> None:
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_inherited)


class FileLock:
    """An exclusive lock on `path`; `acquire()` is non-blocking unless `timeout` is given."""

    def __init__(self, path: str, kind: str, detail: dict | None = None) -> None:
        self.path = path
        self.kind = kind
        self.detail = detail or {}
        self._fd: int | None = None
        self._info: LockInfo | None = None

    def acquire(self, timeout: float = 0.0, poll: float = 0.1) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._try():
                return
            if time.monotonic() >= deadline:
                holder = read_lock(self.path)
                who = (
                    f"pid {holder.pid} on {holder.host} since {holder.created:%Y-%m-%d %H:%M:%S}"
                    if holder
                    else "another process"
                )
                raise StoreLocked(f"{self.kind} lock {self.path} is held by {who}")
            time.sleep(poll)

    def try_acquire(self) -> bool:
        """Take the lock if it is free (or its holder died); never waits."""
        return self._fd is not None or self._try()

    def _try(self) -> bool:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        # The previous holder may have unlinked the file between our open and flock;
        # a lock on an unlinked inode protects nothing, so start over.
        try:
            same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            return self._try()
        self._fd = fd
        _HELD.add(fd)
        self._info = LockInfo(
            kind=self.kind, pid=os.getpid(), host=socket.gethostname(), detail=self.detail
        )
        self._write()
        return True

    def _write(self) -> None:
        assert self._fd is not None and self._info is not None
        info = self._info.model_copy(update={"detail": self.detail})
        # In place: the flock is on this inode, so the file cannot be replaced. A reader
        # between the two calls sees no valid JSON and asks again (read_lock gives None).
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, info.model_dump_json().encode(), 0)

    def update_detail(self, **detail: object) -> None:
        """Say more about a held lock (a run's lease mode): rewrites its JSON."""
        self.detail = {**self.detail, **detail}
        if self._fd is not None:
            self._write()

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        _HELD.discard(self._fd)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def read_lock(path: str) -> LockInfo | None:
    """The info of a lock file, or None when it is missing or unreadable."""
    try:
        with open(path, "rb") as f:
            return LockInfo.model_validate_json(f.read())
    except (OSError, ValueError):
        return None


def live_lock(path: str) -> LockInfo | None:
    """The info of `path` if a live process holds it; None when free or stale."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return read_lock(path) or LockInfo(kind="unknown", pid=0, host="?")
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    return None


def require_posix() -> None:
    """A store needs flock(2); on Windows say so at the first store operation, in one
    line, instead of failing at import."""
    if fcntl is None:
        raise StoreError(
            "castore's store needs Linux or macOS (its locks are POSIX flock(2) locks); "
            "on Windows, use WSL"
        )
