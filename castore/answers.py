"""Answers of LLM requests that a run received, kept until their batch is stored: what a
run killed by `kill -9` (or a stop that could not wait) had been paid for and not yet
stored. The next run sends none of those requests again (docs/resume.md).

- A run's journal is `tmp/answers-<pipeline signature>-<run id>`, one line per answered
  request, appended by the LLM client as each answer arrives: `<64 hex key> <32 hex
  digest of the body> <response body as a JSON string>\\n`. The key is the blake3 of the
  request (URL and body: model, messages, generation parameters, response format), never
  of its headers (the API key stays out). A torn last line, or a line whose body does
  not hash to its digest (a damaged file), is not an answer. Durability is the page
  cache's, as for the entry journal (castore.store.journal): kill -9 loses nothing.
- Another run of the store reads the journals of other runs once, keys only (the bodies
  when one is asked for), and a request whose exact key is there is answered from it:
  the body is parsed as if the server had sent it again (attempts 0 in the row's
  metadata: no request was sent). Each answer is used once: equal requests
  (num_generations, equal rows) each get their own.
- An answer a step found unusable (a row that failed with it, to be asked again) is
  taken back: a line `<key> <its digest> !` cancels that answer, in whichever journal
  holds it.
- A run that finishes removes its own journal (every answer is in a stored batch), the
  journals of dead runs of the same pipeline (its batches are all stored now), and
  those of other dead runs whose answers it used; an interrupted or failed run keeps
  its own for the next. `cas gc` removes any after the grace period, as everything else
  in `tmp/`.
- Threads only (the default executor): a process or Ray worker's requests are not
  journaled.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import blake3

from castore.store import layout as L
from castore.store.locks import live_lock

if TYPE_CHECKING:
    from castore.store import Store

PREFIX = "answers-"
log = logging.getLogger("castore.run")


def request_key(url: str, body: dict[str, Any]) -> str | None:
    """The key of a request; None when its body is not plain JSON (not journaled)."""
    try:
        text = json.dumps([url, body], sort_keys=True, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):
        return None
    return blake3.blake3(text.encode("utf-8", "surrogatepass")).hexdigest()


def kept_answers(store: Store, signature: str) -> int:
    """How many answers the journals of a pipeline's dead runs hold (`cas status`)."""
    n = 0
    for path, run_id in _journals(store, f"{PREFIX}{signature}-"):
        if live_lock(store.layout.run_lock_path(run_id)) is None:
            n += sum(-1 if body is None else 1 for *_, body in _entries(path))
    return max(n, 0)


def _journals(store: Store, prefix: str = PREFIX) -> list[tuple[str, str]]:
    """(path, run id) of the journals whose names start with `prefix`."""
    folder = store.layout.dir(L.TMP)
    try:
        names = sorted(n for n in os.listdir(folder) if n.startswith(prefix))
    except FileNotFoundError:
        return []
    return [(os.path.join(folder, n), n[len(PREFIX) :].partition("-")[2]) for n in names]


# `<64 hex key> <32 hex digest> ` before a line's body, then "\n".
_HEAD = 64 + 1 + 32 + 1
_TAKEN_BACK = b"!"


def _entries(path: str) -> Iterator[tuple[str, str, int, int, bytes | None]]:
    """(key, digest, where its body starts, its length, None for a line taking an answer
    back else b"") of each whole line of a journal, read line by line (a journal can be
    as large as its run's answers); a torn last line or a malformed one is skipped."""
    try:
        f = open(path, "rb")
    except (FileNotFoundError, IsADirectoryError):
        return
    with f:
        at = 0
        for line in f:
            n = len(line)
            if n > _HEAD + 1 and line.endswith(b"\n") and line[64:65] == line[97:98] == b" ":
                key, digest = (
                    line[:64].decode("ascii", "replace"),
                    line[65:97].decode("ascii", "replace"),
                )
                body = line[_HEAD:-1]
                yield key, digest, at + _HEAD, n - _HEAD - 1, None if body == _TAKEN_BACK else b""
            at += n


def _digest(body: bytes) -> str:
    return blake3.blake3(body).hexdigest()[:32]


def _read(path: str, start: int, size: int) -> bytes | None:
    try:
        with open(path, "rb") as f:
            f.seek(start)
            return f.read(size)
    except OSError:
        return None


class Answers:
    """This run's journal of answers, and the answers other runs' journals hold."""

    def __init__(self, store: Store, run_id: str, signature: str) -> None:
        self.store, self.run_id = store, run_id
        self.folder = store.layout.dir(L.TMP)
        self.mine = f"{PREFIX}{signature}-"  # this pipeline's journals
        self.path = os.path.join(self.folder, self.mine + run_id)
        self._fd: int | None = None  # opened by the first answer
        self._lock = threading.Lock()
        # key -> where its answers are (path, digest, at, length), each used once: equal
        # requests (num_generations, equal rows) are samples of their own, not one answer
        # repeated.
        self._found: dict[str, list[tuple[str, str, int, int]]] | None = None
        self.used: set[str] = set()  # the other journals whose answers were used (paths)
        self.reused = 0
        self._told = False  # a failed write was logged

    def record(self, key: str, text: str) -> str:
        """An answer that came: appended whole (one write on an O_APPEND descriptor). A
        journal that cannot be written is not a reason to fail the request. Returns the
        answer's token, for `retract`."""
        body = json.dumps(text, ensure_ascii=False).encode("utf-8", "surrogatepass")
        digest = _digest(body)
        self._append(f"{key} {digest} ".encode() + body + b"\n")
        return f"{key}:{digest}"

    def _append(self, line: bytes) -> None:
        view = memoryview(line)
        with self._lock:
            try:
                if self._fd is None:
                    os.makedirs(self.folder, exist_ok=True)
                    self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                while view:
                    view = view[os.write(self._fd, view) :]
            except OSError as e:
                if not self._told:  # once: the requests go on, only the safety net is off
                    self._told = True
                    log.warning(
                        "cannot write the LLM answers journal %s (%s): a kill -9 of this run "
                        "would lose the answers of its batches in flight",
                        self.path,
                        e.strerror or e,
                    )

    def retract(self, token: str) -> None:
        """Take back the answer of `token` (the row it gave failed): the next run asks
        again instead of being given it."""
        key, _, digest = token.partition(":")
        self._append(f"{key} {digest} ".encode() + _TAKEN_BACK + b"\n")

    def recovered(self, key: str) -> tuple[str, str] | None:
        """An answer another run's journal holds for `key` and its token, or None."""
        with self._lock:
            if self._found is None:
                self._found = self._scan()
            places = self._found.get(key) or []
        while places:
            with self._lock:
                if not places:
                    return None
                path, digest, start, size = places.pop(0)
            body = _read(path, start, size)
            if body is None or _digest(body) != digest:
                continue  # damaged: not the answer it was
            try:
                text = json.loads(body)
            except ValueError:
                continue
            if isinstance(text, str):
                with self._lock:
                    self.used.add(path)
                    self.reused += 1
                return text, f"{key}:{digest}"
        return None

    def _scan(self) -> dict[str, list[tuple[str, str, int, int]]]:
        found: dict[str, list[tuple[str, str, int, int]]] = {}
        # Applied once every answer is read: any journal may hold the answer taken back.
        taken_back: list[tuple[str, str]] = []
        for path, _run in _journals(self.store):
            if path == self.path:
                continue
            for key, digest, at, size, body in _entries(path):
                if body is None:
                    taken_back.append((key, digest))
                else:
                    found.setdefault(key, []).append((path, digest, at, size))
        for key, digest in taken_back:
            places = found.get(key, [])
            for i, place in enumerate(places):
                if place[1] == digest:
                    del places[i]
                    break
        return found

    def close(self, *, finished: bool) -> None:
        """The run ends. Finished: every answer it used or received is in a stored batch,
        and so is every answer an earlier attempt of its pipeline received that it needs:
        those journals go (a live run's stays)."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            if not finished:
                return
            for path, run_id in _journals(self.store):
                if path != self.path and not (
                    os.path.basename(path).startswith(self.mine) or path in self.used
                ):
                    continue
                if path != self.path and live_lock(self.store.layout.run_lock_path(run_id)):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
