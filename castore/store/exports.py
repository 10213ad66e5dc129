"""Objects placed outside objects/ (the run folder's data/ files, the Distiset's .arrow
files) without copying their bytes where the filesystem allows it.

Order of preference: a reflink (copy-on-write clone: no bytes copied, and a later edit of
the placed file cannot reach the object), else a hard link (no bytes copied; the object
is 0444, and every cache hit verifies its digest, so an edit through the link is caught,
quarantined and recomputed), else a plain copy (another filesystem).

A placed file is recognized as intact by its stamp, (inode, size, mtime_ns): a hard link
whose object was quarantined and recomputed has another inode than the object now has, and
an edited clone or copy has another mtime, so either is placed again.
"""

from __future__ import annotations

import contextlib
import errno

try:
    import fcntl
except ImportError:  # Windows: Store() refuses first, in one line (store.require_posix)
    fcntl = None  # type: ignore[assignment]
import os
import shutil

_FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)
_NO_CLONE = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS}

Stamp = tuple[int, int, int]


class Placer:
    """Places objects; remembers per filesystem pair that reflinks are unsupported, so
    a run folder of thousands of files does not try (and fail) thousands of times."""

    def __init__(self) -> None:
        self.reflink = hasattr(fcntl, "ioctl")
        self.methods: dict[str, int] = {"reflink": 0, "link": 0, "copy": 0}

    def place(self, src: str, dst: str) -> None:
        """`src` (an object path) at `dst`, atomically (a temp name, then rename)."""
        tmp = f"{dst}.tmp-{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        self.place_new(src, tmp)
        os.replace(tmp, dst)
        # rename(2) does nothing when both names are links to one inode (dst already
        # placed by link from this object, e.g. a re-run's pipeline.yaml): the temp
        # name would stay behind in the user's folder.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)

    def place_new(self, src: str, dst: str) -> str:
        """`src` at `dst`, a name nothing has (e.g. in a folder built beside its final
        place, which a rename then publishes whole): no temp name, one link(2) where a
        reflink is unsupported (a run folder places a file per leaf batch, on the run's
        critical path). Returns how: "reflink", "link" or "copy"."""
        method = self._clone(src, dst) or self._link(src, dst) or self._copy(src, dst)
        self.methods[method] += 1
        return method

    def _clone(self, src: str, tmp: str) -> str | None:
        if not self.reflink:
            return None
        sfd = os.open(src, os.O_RDONLY)
        try:
            dfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
            try:
                fcntl.ioctl(dfd, _FICLONE, sfd)
                return "reflink"
            except OSError as e:
                if e.errno not in _NO_CLONE:
                    raise
                self.reflink = False
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)
        os.unlink(tmp)
        return None

    @staticmethod
    def _link(src: str, tmp: str) -> str | None:
        try:
            os.link(src, tmp)
        except OSError:
            return None
        return "link"

    @staticmethod
    def _copy(src: str, tmp: str) -> str:
        shutil.copyfile(src, tmp)
        return "copy"


def stamp(path: str) -> Stamp:
    st = os.stat(path)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def is_link_to(path: str, src: str) -> bool:
    """`path` is a hard link to `src` (same inode on the same device)."""
    try:
        a, b = os.stat(path), os.stat(src)
    except FileNotFoundError:
        return False
    return (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev)
