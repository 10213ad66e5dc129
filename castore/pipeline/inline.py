"""Large inline params (LoadDataFromDicts' rows) kept as one store object, not in
pipeline.yaml.

A step names such fields in `inline_fields`. When a field's canonical JSON is larger than
INLINE_MAX_BYTES, the step's fingerprint hashes `{"rows": n, "blake3": <digest of the
canonical JSON>}` instead of the rows themselves, and pipeline.yaml records an InlineRef:
the store object holding the canonical JSON (zstd-compressed), its digest and sizes. Every
variant of a pipeline over the same rows then shares one small object instead of
carrying megabytes of YAML, and a run no longer dumps the rows to YAML.

Exactness: the digest is of the canonical JSON (castore/hashing.py), so two row lists
share it only when they are equal as JSON values with their types (1 vs 1.0, None vs
NaN refused); reading an object back checks that digest, not only the object id. A
pipeline.yaml that leaves the store (a Distiset's) has its rows written back in full
(`expand`), so it needs no store to run.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError

from castore.errors import CastoreError, ConfigError, UnknownObject
from castore.hashing import canonical_json, hash_bytes, plain_rows_json
from castore.store.models import Oid

if TYPE_CHECKING:
    from castore.store import Store

# Below this the rows stay in pipeline.yaml as written (readable, and the identity of
# small pipelines is what it always was).
INLINE_MAX_BYTES = 64 * 1024
_CODEC = "zstd"
# zstd's own default. Arrow's (1) left prose-like rows 11 % larger (8.2 MB of JSON: 2.84
# vs 2.53 MB) for 31 vs 45 ms; only the object's bytes change, not the identity (the
# fingerprint hashes the JSON).
_LEVEL = 3


class InlineRef(BaseModel):
    """What pipeline.yaml records for an inline field kept as an object."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    castore_inline: Oid  # the object: zstd of the canonical JSON
    blake3: Oid  # of the canonical JSON: what the fingerprint hashes
    bytes: int
    rows: int

    def identity(self) -> dict[str, Any]:
        return {"rows": self.rows, "blake3": self.blake3}

    def flow(self) -> str:
        """One line of JSON (valid YAML) that `expand` finds again."""
        return json.dumps(self.model_dump(), separators=(", ", ": "))


# The shape `flow` writes, found in pipeline.yaml text without parsing it.
_FLOW_RE = re.compile(
    r'\{"castore_inline": "[0-9a-f]{64}", "blake3": "[0-9a-f]{64}", '
    r'"bytes": \d+, "rows": \d+\}'
)


@dataclass(frozen=True)
class Inline:
    ref: InlineRef
    packed: bytes  # the object's bytes


def pack(value: list[Any], encoded: bytes) -> Inline:
    import pyarrow as pa  # not for a run whose rows stay in pipeline.yaml

    packed = pa.Codec(_CODEC, compression_level=_LEVEL).compress(encoded, asbytes=True)
    ref = InlineRef(
        castore_inline=hash_bytes(packed),
        blake3=hash_bytes(encoded),
        bytes=len(encoded),
        rows=len(value),
    )
    return Inline(ref, packed)


def resolve_params(
    fields: tuple[str, ...], params: dict[str, Any], store: Store | None, where: str
) -> None:
    """Replace the InlineRefs of a step's params read from pipeline.yaml by their rows."""
    for fname in fields:
        value = params.get(fname)
        if isinstance(value, dict) and "castore_inline" in value:
            params[fname] = resolve(value, store, where)


def resolve(value: Any, store: Store | None, where: str) -> list[Any]:
    """The rows an InlineRef in pipeline.yaml names, read from `store` and checked."""
    try:
        ref = InlineRef.model_validate(value)
    except ValidationError as e:
        msg = e.errors()[0]["msg"]
        raise ConfigError(f"{where}: malformed inline data reference: {msg}") from None
    if store is None:
        raise ConfigError(
            f"{where}: its rows are kept in store object {ref.castore_inline[:12]}; run it "
            "with the store that holds them (cas --cache-dir DIR), or use the pipeline.yaml "
            "of a Distiset, which has them written out"
        )
    return load(store, ref, where)


def load(store: Store, ref: InlineRef, where: str) -> list[Any]:
    try:
        packed = store.get_bytes(ref.castore_inline)
    except UnknownObject:
        raise ConfigError(
            f"{where}: its rows (object {ref.castore_inline[:12]}) are not in store "
            f"{store.root}; pull the run that holds them or use a Distiset's pipeline.yaml"
        ) from None
    except CastoreError as e:
        raise ConfigError(f"{where}: its rows cannot be read: {e}") from None
    import pyarrow as pa

    try:
        encoded = pa.Codec(_CODEC).decompress(packed, decompressed_size=ref.bytes, asbytes=True)
    except (pa.ArrowException, ValueError) as e:
        raise ConfigError(f"{where}: its rows object does not decompress: {e}") from None
    if hash_bytes(encoded) != ref.blake3:
        raise ConfigError(f"{where}: its rows object does not hold the rows named (digest)")
    rows = json.loads(encoded)
    if not isinstance(rows, list) or len(rows) != ref.rows:
        raise ConfigError(f"{where}: its rows object does not hold {ref.rows} rows")
    return rows


def expand(text: str, store: Store) -> str:
    """pipeline.yaml with each InlineRef replaced by the rows it names (JSON flow, valid
    YAML): a file that runs without the store it came from."""

    def rows(m: re.Match[str]) -> str:
        ref = InlineRef.model_validate_json(m.group(0))
        return json.dumps(load(store, ref, "pipeline.yaml"), ensure_ascii=False)

    return _FLOW_RE.sub(rows, text)


@dataclass
class Gathered:
    """What a fingerprint gathers from a step's inline fields: the ones kept as objects,
    and the canonical JSON of the others by the token standing for it in the identity
    (castore.hashing.hash_json_spliced: the rows are not encoded twice)."""

    objects: dict[str, Inline] = field(default_factory=dict)
    spliced: dict[str, bytes] = field(default_factory=dict)


def field_identity(step: BaseModel, fname: str, gathered: Gathered | None = None) -> Any:
    """What the fingerprint hashes for an inline field: the rows, or the digest of the
    object they are kept as (recorded in `gathered`, with a splice token in place of
    the rows). Flat rows of plain values are encoded as they are (the bytes their JSON
    dump would give, without copying 20,000 rows through pydantic); anything else as the
    field's JSON dump, as every other param. Raises NonCanonicalValue / TypeError for rows
    that cannot be hashed."""
    value = getattr(step, fname)
    encoded = plain_rows_json(value)
    if encoded is None:
        value = step.model_dump(mode="json", include={fname})[fname]
        encoded = canonical_json(value)
    if len(encoded) <= INLINE_MAX_BYTES:
        if gathered is None:
            return value
        token = f"castore-spliced:{secrets.token_hex(16)}:{fname}"
        gathered.spliced[token] = encoded
        return token
    inline = pack(value, encoded)
    if gathered is not None:
        gathered.objects[fname] = inline
    return inline.ref.identity()


__all__ = [
    "INLINE_MAX_BYTES",
    "Gathered",
    "Inline",
    "InlineRef",
    "expand",
    "field_identity",
    "load",
    "resolve",
    "resolve_params",
]
