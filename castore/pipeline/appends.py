"""A loader's batches over a jsonl file that grew: the batches of an earlier version of
the file are reused where this version starts with the same bytes, and only the rest is
parsed (issue 14: appending 1 % of rows to a large input must not cost a parse of all).

After a run reads a file (`GeneratorStep.append_source`), it leaves a *base record*
(appends/<key>.json), keyed by the step's identity without the file's digest and by the blake3 of
the file's first line (what a grown file shares with the one it grew from). It names
the run's generator fingerprint, the file's schema as pyarrow inferred it, and
checkpoints: (batches, byte offset where the next batch starts, blake3 of the bytes up to
there), at most 1,024 of them, evenly spaced, the last full batch always one. A later
version of the file takes the last checkpoint whose prefix hash its own bytes reproduce,
reuses the batches before it (the generator entries of the recorded fingerprint,
verified like any hit), and parses the bytes after it.

When is that the whole file's result? pyarrow infers a column's type as the join of the
types of its values (null < int64 < double; timestamp < string; structs field-wise), in
order of first appearance. The reused prefix P was part of the recorded file, so its
types are at most the recorded schema S. The rest R is accepted only when its own
inferred schema is S exactly (same fields, order, types, nested alike): then the whole
file's schema is join(P, S) = S, and the rows of P parse to the values they had. Else,
and whenever a line is blank (pyarrow skips those, so lines would not be rows), the file
is parsed whole, as without a record. A record is a hint: nothing is reused that the
prefix hash and the entries' own checks do not vouch for.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import blake3
from pydantic import BaseModel, ConfigDict, ValidationError

from castore.errors import CastoreError, ConfigError
from castore.hashing import generator_key, hash_bytes, hash_json
from castore.store.layout import APPENDS
from castore.store.models import ActionEntry

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

    from castore.pipeline.step import GeneratorStep
    from castore.store import Store

log = logging.getLogger("castore.run")

HEAD = 4096
MAX_CHECKPOINTS = 1024


class Base(BaseModel):
    """A base record (appends/<key>.json): where a loader's batches of one version of a
    jsonl file end. Rewritten by each run that reads a version; a hint, never trusted."""

    model_config = ConfigDict(extra="forbid")

    step: str  # for a reader of the file
    fp: str  # the generator fingerprint its batches were stored under
    schema_ipc: str  # base64 of the Arrow IPC schema pyarrow inferred for the whole file
    checkpoints: list[tuple[int, int, str]]  # (batches, end offset, blake3 of [0, end))


@dataclass(frozen=True)
class Reused:
    """A batch taken from the base: already stored, verified."""

    oid: str
    rows: int


class FileBatches:
    """The batches of `step` over its append source: `Reused` ones, then tables (raw,
    before the step's output mappings), each `batch_size` rows. `record` leaves the base
    record for the next version once the run has stored them all."""

    def __init__(
        self,
        store: Store,
        step: GeneratorStep,
        fp: str,
        find: Callable[[str], ActionEntry | None],
    ) -> None:
        path = step.append_source()
        assert path is not None
        self.store, self.step, self.fp, self.path = store, step, fp, path
        self.size = step.batch_size
        with open(path, "rb") as f:
            self.data = f.read()
        ident = step.identity(check=False)
        ident.pop("extra", None)  # the file's digest: what differs between versions
        self.key = hash_json({"append_base": ident, "head": hash_bytes(_head(self.data))})
        self.reused: list[Reused] = []
        self.schema: pa.Schema | None = None
        self._rest: pa.Table | None = None
        # Line ends from where the parse starts (the reused prefix's end, else 0; set
        # below): the rest's lines must be its rows, its full batches the new checkpoints.
        self.ends: np.ndarray
        base = self._base()
        # One pass over the file: the prefix hashes at the record's checkpoints, the
        # hasher's state at each one this file reproduces, and the whole file's digest.
        h = _hasher(len(self.data))
        view, pos = memoryview(self.data), 0
        matched: list[tuple[int, int, str, Any]] = []
        for n, e, digest in base.checkpoints if base is not None else []:
            if e > len(self.data) or e < pos:
                break
            h.update(view[pos:e])
            pos = e
            if h.copy().hexdigest() == digest:
                matched.append((n, e, digest, h.copy()))
        h.update(view[pos:])
        # The bytes read must be the ones the run's fingerprint names (the file's digest is
        # its extra identity): a file written to since would be stored under the wrong key.
        if hash_json({**ident, "extra": {"files": [h.hexdigest()]}}) != fp:
            raise ConfigError(f"step {step.name}: {path} changed while the run read it; run again")
        kept: list[tuple[int, int, str]] = []
        state, since = _hasher(len(self.data)), (0, 0)
        if base is not None and matched and self._take(base, matched[-1][:2], find):
            kept = [(n, e, d) for n, e, d, _ in matched]
            state, since = matched[-1][3], matched[-1][:2]
        else:
            self.ends = _line_ends(self.data, 0)
        self.checkpoints = _thin(kept + self._new_points(state, since))

    def _base(self) -> Base | None:
        try:
            with open(self.store.layout.append_record_path(self.key), "rb") as f:
                return Base.model_validate_json(f.read())
        except (OSError, ValidationError):
            return None

    def _take(
        self, base: Base, point: tuple[int, int], find: Callable[[str], ActionEntry | None]
    ) -> bool:
        """Reuse the `point` (batches, end offset) prefix: when the rest parses to the
        recorded schema, one row a line, and the prefix's batches are found and verified."""
        import pyarrow as pa

        count, end = point
        rest = _parse(self.data, end)
        ends = _line_ends(self.data, end)
        if rest is None or rest.num_rows != len(ends):
            return False
        schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(base.schema_ipc)))
        if not rest.schema.equals(schema):
            log.info(
                "step %s: the rows after the unchanged part change the schema; reading it all",
                self.step.name,
            )
            return False
        taken = []
        for i in range(count):
            entry = find(generator_key(base.fp, i))
            if entry is None or entry.rows != [self.size]:
                return False
            taken.append(Reused(entry.outputs[0], self.size))
        self.reused, self.schema, self._rest, self.ends = taken, schema, rest, ends
        return True

    def _new_points(self, h: Any, since: tuple[int, int]) -> list[tuple[int, int, str]]:
        """Checkpoints after `since` (batches, end offset), where `self.ends` start: each
        full batch of the lines there, with its prefix hash (`h`: the hasher's state at
        `since`)."""
        count, start = since
        ends = self.ends
        view, pos, out = memoryview(self.data), start, []
        for j in range(self.size - 1, len(ends), self.size):
            e = int(ends[j])
            h.update(view[pos:e])
            pos = e
            out.append((count + (j + 1) // self.size, e, h.copy().hexdigest()))
        return out

    def __iter__(self) -> Iterator[Reused | pa.Table]:
        import pyarrow as pa

        yield from self.reused
        table = self._rest
        if table is None:
            try:
                table = _parse(self.data, 0, strict=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise ConfigError(f"step {self.step.name}: cannot read {self.path}: {e}") from None
            self.schema = table.schema
            if table.num_rows != len(self.ends):
                self.checkpoints = []  # lines pyarrow skips (blank ones): lines are not rows
        for start in range(0, table.num_rows, self.size):
            yield table.slice(start, self.size)

    def record(self) -> None:
        """The base record for the next version of the file, once every batch is stored
        (when there is a full batch and lines are rows)."""
        if not self.checkpoints or self.schema is None:
            return
        base = Base(
            step=self.step.name or "",
            fp=self.fp,
            schema_ipc=base64.b64encode(self.schema.serialize().to_pybytes()).decode(),
            checkpoints=self.checkpoints,
        )
        path = self.store.layout.append_record_path(self.key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.store.write_file(path, base.model_dump_json().encode())


def drop_stale(store: Store) -> int:
    """Remove the records whose first batch's entry is gone (gc: its batches went)."""
    root = store.layout.dir(APPENDS)
    dropped = 0
    try:
        with os.scandir(root) as found:  # a stray folder is not a record: left alone
            paths = sorted(e.path for e in found if e.is_file(follow_symlinks=False))
    except FileNotFoundError:
        paths = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                fp = Base.model_validate_json(f.read()).fp
            keep = store.peek_action(generator_key(fp, 0)) is not None
        except (OSError, ValidationError, CastoreError):
            keep = False
        if not keep:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            dropped += 1
    return dropped


def _thin(points: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """At most MAX_CHECKPOINTS, evenly spaced, the last (the longest reusable prefix of a
    file that only grows) always kept."""
    if len(points) <= MAX_CHECKPOINTS:
        return points
    stride = -(-len(points) // MAX_CHECKPOINTS)
    kept = points[stride - 1 :: stride]
    return kept if kept[-1] == points[-1] else [*kept[: MAX_CHECKPOINTS - 1], points[-1]]


def _head(data: bytes) -> bytes:
    """The first line (at most HEAD bytes): what a grown or edited file shares with the
    version it came from, unless that line changed, and then no batch is reusable."""
    nl = data.find(b"\n", 0, HEAD)
    return data[: nl + 1] if nl >= 0 else data[:HEAD]


def _hasher(size: int) -> Any:
    return blake3.blake3(max_threads=blake3.blake3.AUTO if size > 1 << 22 else 1)


def _line_ends(data: bytes, start: int) -> np.ndarray:
    """Byte offset after each line from `start` (its newline, or the end of the file)."""
    import numpy as np

    ends = np.flatnonzero(np.frombuffer(data, np.uint8, offset=start) == 10) + (start + 1)
    if len(data) > start and data[-1:] != b"\n":
        ends = np.append(ends, len(data))
    return ends


def _parse(data: bytes, start: int, *, strict: bool = False) -> Any:
    import pyarrow as pa
    import pyarrow.json as pj

    try:
        return pj.read_json(pa.BufferReader(memoryview(data)[start:]))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        if strict:
            raise
        return None
