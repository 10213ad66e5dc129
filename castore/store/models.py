"""Every JSON document the store writes is one of these frozen pydantic models."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from castore._version import __version__

# Checked by pydantic-core's regex engine: ~5x faster than a Python validator when a
# manifest names tens of thousands of objects (bench_gc).
Oid = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
OID_RE = re.compile(r"[0-9a-f]{64}")


def now_utc() -> datetime:
    return datetime.now(UTC)


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LayoutInfo(_Model):
    schema_version: Literal[1] = 1
    layout_version: int
    created: datetime = Field(default_factory=now_utc)
    castore_version: str = __version__


class ActionEntry(_Model):
    """What one action key produced: output objects (in order) and their row counts."""

    # 2: its outputs extend other objects (`needs`): a castore that reads only version 1
    # refuses the entry (a miss) instead of reading an output as its own columns alone.
    schema_version: Literal[1, 2] = 1
    outputs: list[Oid]
    rows: list[int]
    created: datetime = Field(default_factory=now_utc)
    castore_version: str = __version__
    # Free-form facts about the computation (seconds, step name, tokens): not part of identity.
    info: dict[str, Any] = Field(default_factory=dict)
    # On a remote with a team key (CASTORE_SIGNING_KEY): keyed blake3 over the action key,
    # outputs and rows (castore.hashing.sign_entry). Local entries carry none.
    signature: str | None = None
    # Entries this store's runs made: castore.hashing.entry_check (None on others).
    check: str | None = None

    def row_segment(self) -> str | None:
        """A row-wise step's batch: the id of its row-key segment (kept in `info`)."""
        seg = self.info.get("row_index")
        return seg if isinstance(seg, str) and len(seg) == 64 else None

    def row_info(self) -> RowInfo | None:
        """What its segment says of its rows besides their keys (kept in `info`, so a
        segment written again from the keys has the same bytes); None when not recorded."""
        return RowInfo.parse(self.info.get("row_info"))

    def needs(self) -> list[str]:
        """The objects its outputs extend (castore.store.extend; kept in `info`). Only
        well-formed ids: reading an output checks its own footer's list anyway."""
        got = self.info.get("needs")
        if not isinstance(got, list):
            return []
        return [o for o in got if isinstance(o, str) and OID_RE.fullmatch(o)]


class LockInfo(_Model):
    schema_version: Literal[1] = 1
    kind: str
    pid: int
    host: str
    created: datetime = Field(default_factory=now_utc)
    detail: dict[str, Any] = Field(default_factory=dict)


class RowInfo(BaseModel):
    """What a row-wise batch's row-key segment says of its rows besides their keys
    (castore.pipeline.rowinfo), in the segment's schema metadata and its action entry."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    # What computing the rows took per row (now, or when the rows it reused were made):
    # what a later reuse saves.
    seconds_per_row: float | None = Field(None, ge=0, allow_inf_nan=False)
    # The step's name in the run that made them, and the entries of the metadata column
    # the step wrote: a reused row gets those from here and every other entry from the
    # current input.
    step: str | None = None
    metadata_keys: list[str] | None = None

    def encoded(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()

    @classmethod
    def parse(cls, raw: object) -> RowInfo | None:
        """From JSON bytes or a dict; None when absent or malformed (segments written
        before it, or damaged: it only refines accounting and metadata)."""
        if raw is None:
            return None
        try:
            if isinstance(raw, (bytes, str)):
                return cls.model_validate_json(raw)
            return cls.model_validate(raw)
        except ValueError:
            return None
