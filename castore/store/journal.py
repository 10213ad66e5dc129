"""Action entries of a run that is alone on its store, appended to one file per run
(`actions/journal/<run id>`) instead of a file each: a small file costs a create and a
rename in two folders, an append one write (benchmarks/bench_overhead.py).

- Format: one line per entry, `<64 hex key> <entry JSON>\\n`, appended whole with one
  `write` on an O_APPEND descriptor under a lock. Only its run appends to a journal.
- A crash (kill -9) can leave a last line without its newline: it is not an entry, like
  a line that does not parse. Durability is a loose entry's: the page cache, and with
  CASTORE_FSYNC=1 an fsync after each append.
- Order: an entry is appended only after its objects are stored, as a loose one is
  written (Store.put_action).
- A run appends only while alone (castore.pipeline.neighbours): the moment another run
  appears it closes its journal (every append done) before saying "shared", and writes
  loose entries from then on; the newcomer reads the journals again once every other
  run has said so. So a journal never grows while another run reads it for lookups.
- Readers (`Journals`) load every journal once per process. A run folds its journal at
  its end into an entry pack (castore.store.actionpack; loose files when small), and the
  journal of a run that died into the next run that ends; then the journal goes.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from castore.errors import CastoreError
from castore.hashing import validate_id
from castore.store import layout as L
from castore.store.files import translate_oserror
from castore.store.locks import live_lock

if TYPE_CHECKING:
    from castore.store import Store

JOURNAL = "journal"


def journal_dir(store: Store) -> str:
    return os.path.join(store.layout.dir(L.ACTIONS), JOURNAL)


class JournalWriter:
    """This run's journal, open for appends until `close()`."""

    def __init__(self, store: Store, run_id: str) -> None:
        self.store = store
        self.path = os.path.join(journal_dir(store), run_id)
        self._fd: int | None = None  # opened by the first append: a replay writes nothing
        self._closed = False
        self._lock = threading.Lock()

    def append(self, key: str, raw: bytes) -> bool:
        """Append one entry; False once closed (the caller writes it loose instead)."""
        line = memoryview(key.encode() + b" " + raw + b"\n")
        with self._lock:
            if self._closed:
                return False
            try:
                if self._fd is None:
                    os.makedirs(os.path.dirname(self.path), exist_ok=True)
                    self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                while line:
                    line = line[os.write(self._fd, line) :]
                if self.store.fsync:
                    os.fsync(self._fd)
            except OSError as e:
                raise translate_oserror(e, self.path, self.store.root) from None
            return True

    def close(self) -> None:
        """No more appends: every append before this returned is in the file."""
        with self._lock:
            self._closed = True
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


class Journals:
    """Every journal's entries, read once per process (`refresh` reads what was appended
    since); a run's own appends are added as it makes them."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._entries: dict[str, bytes] = {}
        self._offsets: dict[str, int] = {}
        self._loaded = False

    def refresh(self) -> None:
        self._loaded = True
        folder = journal_dir(self.store)
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return
        for name in names:
            self._read(os.path.join(folder, name), name)

    def _read(self, path: str, name: str) -> None:
        start = self._offsets.get(name, 0)
        try:
            with open(path, "rb") as f:
                f.seek(start)
                data = f.read()
        except (FileNotFoundError, IsADirectoryError):
            return
        end = data.rfind(b"\n") + 1  # a torn last line is not an entry (yet)
        for line in data[:end].splitlines():
            key, _, raw = line.partition(b" ")
            with contextlib.suppress(CastoreError, UnicodeDecodeError):
                self._entries[validate_id(key.decode())] = raw
        self._offsets[name] = start + end

    def add(self, key: str, raw: bytes) -> None:
        self._entries[key] = raw

    def get(self, key: str) -> bytes | None:
        if not self._loaded:
            self.refresh()
        return self._entries.get(key)

    def keys(self) -> Iterator[str]:
        if not self._loaded:
            self.refresh()
        yield from list(self._entries)


def journals_to_fold(store: Store, own: str | None) -> list[str]:
    """Run ids of the journals to fold now: this run's, and those of runs that died (a
    stray folder there is not a journal: folding would fail to remove it)."""
    try:
        with os.scandir(journal_dir(store)) as found:
            names = [e.name for e in found if e.is_file(follow_symlinks=False)]
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        if name == own:
            out.append(name)
            continue
        with contextlib.suppress(CastoreError):
            if live_lock(store.layout.run_lock_path(name)) is None:
                out.append(name)
    return out


def journal_entries(store: Store, run_id: str) -> dict[str, bytes]:
    """One journal file's entries (a fresh read, not the process's index)."""
    reader = Journals(store)
    reader._read(os.path.join(journal_dir(store), run_id), run_id)
    return reader._entries


def remove(store: Store, run_id: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(journal_dir(store), run_id))
