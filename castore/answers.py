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
- A journal is written in segments (`…-<run id>`, then `…-<run id>.1`, `.2`, …) of about
  SEGMENT_BYTES each. A batch stored whole (its action entry written) needs none of its
  answers any more: a segment every batch of which is stored so is removed while the
  run goes on, so `tmp/` holds about the answers of the batches in flight (and of
  batches that failed), not the whole run's, and a resume after kill -9 reads only those.
- A run that finishes removes its own journal (every answer is in a stored batch), the
  journals of dead runs of the same pipeline (its batches are all stored now), and
  those of other dead runs whose answers it used; an interrupted or failed run keeps
  what is left of its own for the next. `cas gc` removes the journals of runs no longer
  alive after the grace period, as everything else in `tmp/`.
- Threads only (the default executor): a process or Ray worker's requests are not
  journaled.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import blake3

from castore.store import layout as L
from castore.store.locks import live_lock

if TYPE_CHECKING:
    from castore.store import Store

PREFIX = "answers-"
# About this many bytes per segment of a journal (~400 chat answers of 2 kB with their
# JSON envelope): tmp/ then holds the segments of the batches in flight and the one being
# written. benchmarks/bench_answers.py: 10,000 answers, 4 batches of 50 in flight, peak
# 1.3 MB with 1 MiB segments, 8.6 MB with 8 MiB, 23.9 MB (all of them) without segments,
# at the same speed. A new file every ~400 answers costs nothing measurable.
SEGMENT_BYTES = 1 << 20
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
        if not _alive(store, run_id):
            n += sum(-1 if body is None else 1 for *_, body in _entries(path))
    return max(n, 0)


def live_journals(store: Store) -> set[str]:
    """File names (in tmp/) of the journal segments of runs alive now: gc leaves them,
    however old (a segment kept for a failed batch ages while its run goes on)."""
    alive: dict[str, bool] = {}
    return {
        os.path.basename(path)
        for path, run_id in _journals(store)
        if alive.setdefault(run_id, _alive(store, run_id))
    }


def _alive(store: Store, run_id: str) -> bool:
    return live_lock(store.layout.run_lock_path(run_id)) is not None


def _journals(store: Store, prefix: str = PREFIX) -> list[tuple[str, str]]:
    """(path, run id) of the journal segments whose names start with `prefix`."""
    folder = store.layout.dir(L.TMP)
    try:
        names = sorted(n for n in os.listdir(folder) if n.startswith(prefix))
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        run = _run_of(n)
        if run is not None:  # else a stray file, not a journal castore wrote
            out.append((os.path.join(folder, n), run))
    return out


_RUN_ID = re.compile(r"[0-9a-f]{32}")


def _run_of(name: str) -> str | None:
    """The run id in a journal segment's file name (`answers-<sig>-<run id>[.<n>]`), or
    None for a name castore does not give a journal."""
    run = name[len(PREFIX) :].partition("-")[2].partition(".")[0]
    return run if _RUN_ID.fullmatch(run) else None


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
        self.path = os.path.join(self.folder, self.mine + run_id)  # its first segment
        self._fd: int | None = None  # opened by the segment's first answer
        self._segment = 0  # the segment written now
        self._written = 0  # bytes in it
        # segment -> batches that wrote into it and are not stored yet; a segment a batch
        # wrote into and did not store whole is kept (the next run may need its answers).
        self._pinned: dict[int, int] = {}
        self._kept: set[int] = set()
        self._lock = threading.Lock()
        # key -> where its answers are (path, digest, at, length), each used once: equal
        # requests (num_generations, equal rows) are samples of their own, not one answer
        # repeated.
        self._found: dict[str, list[tuple[str, str, int, int]]] | None = None
        self.used: set[str] = set()  # the other journals whose answers were used (paths)
        self.reused = 0
        self._told = False  # a failed write was logged

    def segment_path(self, n: int) -> str:
        return self.path if n == 0 else f"{self.path}.{n}"

    def batch(self) -> BatchAnswers:
        """The journal as one batch uses it (jobctx.ANSWERS): `done()` says whether the
        batch was stored whole, which frees the segments holding its answers."""
        return BatchAnswers(self)

    def record(self, key: str, text: str, batch: BatchAnswers | None = None) -> str:
        """An answer that came: appended whole (one write on an O_APPEND descriptor). A
        journal that cannot be written is not a reason to fail the request. Returns the
        answer's token, for `retract`."""
        body = json.dumps(text, ensure_ascii=False).encode("utf-8", "surrogatepass")
        digest = _digest(body)
        self._append(f"{key} {digest} ".encode() + body + b"\n", batch)
        return f"{key}:{digest}"

    def _append(self, line: bytes, batch: BatchAnswers | None) -> None:
        view = memoryview(line)
        with self._lock:
            n = self._segment
            if batch is not None and n not in batch.segments:
                batch.segments.add(n)
                self._pinned[n] = self._pinned.get(n, 0) + 1
            elif batch is None:
                self._kept.add(n)  # no batch says when its answers are stored
            try:
                if self._fd is None:
                    os.makedirs(self.folder, exist_ok=True)
                    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
                    self._fd = os.open(self.segment_path(n), flags, 0o600)
                while view:
                    view = view[os.write(self._fd, view) :]
            except OSError as e:
                if not self._told:  # once: the requests go on, only the safety net is off
                    self._told = True
                    log.warning(
                        "cannot write the LLM answers journal %s (%s): a kill -9 of this run "
                        "would lose the answers of its batches in flight",
                        self.segment_path(n),
                        e.strerror or e,
                    )
                return
            self._written += len(line)
            if self._written >= SEGMENT_BYTES:  # the next answer starts a new segment
                os.close(self._fd)
                self._fd, self._segment, self._written = None, n + 1, 0
                self._drop_if_done(n)

    def _drop_if_done(self, n: int) -> None:
        """Remove segment `n` if it is written and every batch that wrote into it is
        stored whole (under the lock)."""
        if n != self._segment and not self._pinned.get(n) and n not in self._kept:
            self._pinned.pop(n, None)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.segment_path(n))

    def done(self, batch: BatchAnswers, *, stored: bool) -> None:
        """`batch` ended; `stored`: whole, its action entry written, so none of its
        answers is needed again."""
        with self._lock:
            for n in batch.segments:
                self._pinned[n] -= 1
                if not stored:
                    self._kept.add(n)
                self._drop_if_done(n)
            batch.segments.clear()

    def retract(self, token: str, batch: BatchAnswers | None = None) -> None:
        """Take back the answer of `token` (the row it gave failed): the next run asks
        again instead of being given it."""
        key, _, digest = token.partition(":")
        self._append(f"{key} {digest} ".encode() + _TAKEN_BACK + b"\n", batch)

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
                continue  # damaged, or its run removed it: not the answer it was
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
        for path, run in _journals(self.store):
            if run == self.run_id:
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
                if run_id != self.run_id and not (
                    os.path.basename(path).startswith(self.mine) or path in self.used
                ):
                    continue
                if run_id != self.run_id and _alive(self.store, run_id):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)


class BatchAnswers:
    """The run's journal as one batch computed on a thread uses it (jobctx.ANSWERS): the
    segments its answers went to stay until it is stored whole."""

    def __init__(self, answers: Answers) -> None:
        self.answers = answers
        self.segments: set[int] = set()

    def record(self, key: str, text: str) -> str:
        return self.answers.record(key, text, self)

    def retract(self, token: str) -> None:
        self.answers.retract(token, self)

    def recovered(self, key: str) -> tuple[str, str] | None:
        return self.answers.recovered(key)

    def done(self, *, stored: bool) -> None:
        self.answers.done(self, stored=stored)
