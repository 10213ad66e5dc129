"""Ids, canonical JSON and fingerprints: every hash castore computes goes through here.

Ids are blake3 digests as 64 lowercase hex chars. Structured data is hashed as canonical
JSON (sorted keys, compact separators, UTF-8, no NaN) so the same value gives the same id
on every machine and Python version.
"""

from __future__ import annotations

import ast
import functools
import inspect
import json
import math
import os
import re
import textwrap
import types
from collections.abc import Callable, Iterable, Sequence
from itertools import chain
from typing import TYPE_CHECKING, Any

import blake3

from castore.errors import InvalidObjectId, NonCanonicalValue

if TYPE_CHECKING:
    import pyarrow as pa

ID_LEN = 64
_ID_RE = re.compile(r"[0-9a-f]{64}")
_PREFIX_RE = re.compile(r"[0-9a-f]{1,64}")


def validate_id(value: object) -> str:
    """Return `value` if it is exactly 64 lowercase hex chars, else raise InvalidObjectId."""
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        shown = repr(value) if len(repr(value)) < 80 else repr(value)[:77] + "..."
        raise InvalidObjectId(f"invalid object id {shown}: expected 64 lowercase hex characters")
    return value


def validate_prefix(value: str, min_len: int = 8) -> str:
    """A user-typed id prefix: lowercase hex, at least `min_len` chars."""
    if not _PREFIX_RE.fullmatch(value) or len(value) < min_len:
        raise InvalidObjectId(
            f"invalid id prefix {value!r}: expected {min_len} to 64 lowercase hex characters"
        )
    return value


def _check(value: Any, path: str) -> None:
    if value is None or isinstance(value, (bool, int)):
        return
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise NonCanonicalValue(
                f"{path}: a string with a lone surrogate is not UTF-8"
            ) from None
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise NonCanonicalValue(
                f"{path}: {value!r} has no canonical JSON form (NaN and Inf would hash like "
                "None); use None for a missing value"
            )
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise NonCanonicalValue(f"{path}: key {k!r} is not a string")
            _check(v, f"{path}.{k}")
        return
    if isinstance(value, list):
        for i, v in enumerate(value):
            _check(v, f"{path}[{i}]")
        return
    if isinstance(value, tuple):
        # A tuple would encode like the list with the same items: two values, one hash.
        raise NonCanonicalValue(f"{path}: a tuple is not a JSON type (use a list)")
    raise NonCanonicalValue(
        f"{path}: {type(value).__name__} is not a JSON type (use str, int, float, bool, "
        "None, list or dict)"
    )


def _refuse(obj: Any) -> Any:
    raise TypeError(type(obj).__name__)


def canonical_json(value: Any) -> bytes:
    """Canonical JSON bytes of `value`; raises NonCanonicalValue for NaN, Inf, tuples, bytes,
    sets, non-str keys and every other value whose encoding could collide with another's.

    Distinct values never share an encoding: ints and floats keep their JSON forms (`1` vs
    `1.0`, `-0.0`), bools are `true`/`false`, and every type JSON cannot tell apart from
    another (tuple vs list, bytes vs str, NaN vs None) is refused rather than coerced."""
    try:
        text = json.dumps(
            value,
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
            allow_nan=False,
            default=_refuse,
        )
    except (TypeError, ValueError) as e:
        _check(value, "$")  # finds and names the offending value
        raise NonCanonicalValue(f"$: {e}") from None
    # json.dumps turns int/bool/None keys into strings silently; a round trip that does
    # not compare equal (rare: also tuples) gets the full walk, which names the problem.
    if json.loads(text) != value:
        _check(value, "$")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        _check(value, "$")
        raise


_PLAIN = frozenset((str, int, float, bool, type(None)))


def plain_rows_json(rows: Any) -> bytes | None:
    """canonical_json(rows) for a list of flat dicts whose keys are str and values str,
    int, float, bool or None (exact types), without its round-trip check: such rows
    cannot collide (json.dumps keeps those types apart, and NaN/Inf raise). None for
    anything else, which the caller encodes with canonical_json."""
    # Sets of the types seen, built in C: a third of the cost of a loop over the values.
    if type(rows) is not list or set(map(type, rows)) != {dict}:
        return None
    if not set(map(type, chain.from_iterable(rows))) <= {str}:
        return None
    if not set(map(type, chain.from_iterable(map(dict.values, rows)))) <= _PLAIN:
        return None
    try:
        text = json.dumps(
            rows, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
        return text.encode("utf-8")
    except (ValueError, UnicodeEncodeError):  # NaN/Inf, a lone surrogate: the full walk names it
        return None


def hash_bytes(data: bytes | bytearray | memoryview) -> str:
    # blake3's own threads pay off only above a few MiB (measured in benchmarks/bench_store.py).
    threads = blake3.blake3.AUTO if len(data) > 1 << 22 else 1
    return blake3.blake3(data, max_threads=threads).hexdigest()


_SMALL_FILE = 1 << 20


def hash_file(path: str | os.PathLike[str]) -> str:
    """blake3 of a file's bytes: a small file read at once (a batch object: half the
    time of mapping it), a larger one memory-mapped (no copy through Python), with
    blake3's threads above a few MiB. Raises FileNotFoundError when it is gone."""
    return hash_file_tail(path, 0)[0]


@functools.lru_cache(maxsize=256)
def _stamped_digest(path: str, _stamp: tuple[int, ...]) -> str:
    return hash_file(path)


def local_digest(path: str) -> str:
    """blake3 of a local file, hashed once per process while its stat (size, mtime,
    ctime, inode: what any write changes) is the same: a run asks for a loader's file
    for its signature and for pipeline.yaml, and the loader again before it reads."""
    return _stamped_digest(os.path.abspath(path), local_stamp(path))


def stamped_digest(path: str, stamp: tuple[int, ...]) -> str:
    """local_digest of `path` whose local_stamp was just taken."""
    return _stamped_digest(os.path.abspath(path), stamp)


def local_stamp(path: str) -> tuple[int, ...]:
    """What any write to a local file changes: size, mtime, ctime, inode."""
    st = os.stat(path)
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def hash_file_tail(path: str | os.PathLike[str], tail: int) -> tuple[str, bytes]:
    """hash_file(path) and the file's last `tail` bytes, read in the same pass (fsck
    checks each object's Parquet footer without opening it again)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size <= _SMALL_FILE:
            data = os.read(fd, size + 1)  # a short read of a regular file is its end
            while len(data) > size:  # it grew since fstat: hash all of it
                more = os.read(fd, _SMALL_FILE)
                if not more:
                    break
                data += more
            return blake3.blake3(data).hexdigest(), data[-tail:] if tail else b""
        end = os.pread(fd, tail, max(0, size - tail)) if tail else b""
    finally:
        os.close(fd)
    h = blake3.blake3(max_threads=blake3.blake3.AUTO if size > 1 << 22 else 1)
    h.update_mmap(path)
    return h.hexdigest(), end


def hash_json(value: Any) -> str:
    return blake3.blake3(canonical_json(value)).hexdigest()


def hash_json_spliced(value: Any, parts: dict[str, bytes]) -> str:
    """hash_json of `value` in which each string `token` of `parts` stands for a value
    whose canonical JSON is `parts[token]`: the same digest, without encoding that value
    again and decoding it for canonical_json's round-trip check (rows a fingerprint has
    encoded already: 2,000 rows cost ~1 ms a run, and the decode's 2,000 dicts can set off
    a full garbage collection). A token must occur once, as a whole string."""
    text = canonical_json(value)
    for token, encoded in parts.items():
        quoted = canonical_json(token)
        if text.count(quoted) != 1:
            raise ValueError(f"splice token {token!r} is not in the document once")
        text = text.replace(quoted, encoded, 1)
    return blake3.blake3(text).hexdigest()


def tagged(value: Any, *, any_type: bool = False) -> Any:  # noqa: PLR0911 - one per type
    """`value` as canonical-JSON-able data that keeps types apart: floats by their hex
    form (NaN and Inf included, never confused with None or an int), bytes, tuples, sets
    and dicts with any keys tagged. Other types raise TypeError, unless `any_type`: then
    they are tagged with their type and repr (dates, decimals in row values)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return {"float": value.hex()}
    if isinstance(value, bytes):
        return {"bytes": value.hex()}
    if isinstance(value, (list, tuple)):
        return {type(value).__name__: [tagged(v, any_type=any_type) for v in value]}
    if isinstance(value, (set, frozenset)):
        items = [tagged(v, any_type=any_type) for v in value]
        return {"set": sorted(items, key=canonical_json)}
    if isinstance(value, dict):
        pairs = [
            [tagged(k, any_type=any_type), tagged(v, any_type=any_type)] for k, v in value.items()
        ]
        return {"dict": sorted(pairs, key=canonical_json)}
    if any_type:
        return {"repr": f"{type(value).__module__}.{type(value).__qualname__}:{value!r}"}
    raise TypeError(type(value).__name__)


# -- key recipes: every action key castore computes is one of these ----------------------


def row_keys(
    fingerprint: str, columns: Sequence[Sequence[Any]], seen: dict[bytes, int]
) -> list[bytes]:
    """Row keys of a row-wise step, by definition: per input row, blake3 of the step's
    fingerprint and the tagged values of its declared input columns (in declared order),
    and, for the n-th row with the same values in the step's input stream (n > 0), that
    n: identical prompts sampled twice are two requests, not one answer copied. Not the
    row's position, batch, pipeline or other columns. `seen` counts values across batches,
    in stream order; `columns` are the input columns' values. The engine computes the
    same keys in bulk from Arrow columns (base_row_keys, occurrence_key)."""
    prefix = canonical_json(fingerprint)
    out = []
    for values in zip(*columns, strict=True):
        h = blake3.blake3(prefix)
        h.update(canonical_json([tagged(v, any_type=True) for v in values]))
        base = h.digest()
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.append(occurrence_key(base, n))
    return out


def occurrence_key(base: bytes, n: int) -> bytes:
    """The key of the n-th row (from 0) of a stream whose values have base key `base`."""
    return base if n == 0 else blake3.blake3(base + n.to_bytes(8, "big")).digest()


def base_row_keys(
    fingerprint: str, columns: Sequence[pa.Array | pa.ChunkedArray | None]
) -> list[bytes]:
    """The keys row_keys gives rows seen for the first time, from Arrow columns in bulk:
    each value's canonical JSON text is made per column (strings, integers, booleans and
    floats without a Python call per value), then one blake3 per row. None stands for an
    optional column the input does not have: a text no JSON value has, so a row without
    it never shares a key with a row that has it (as None, or as another column's value)."""
    n = next(len(c) for c in columns if c is not None)
    texts = [_value_texts(col) if col is not None else ["absent"] * n for col in columns]
    prefix = canonical_json(fingerprint)
    b3 = blake3.blake3
    if len(texts) == 1:
        rows: Iterable[str] = texts[0]
        return [b3(prefix + f"[{t}]".encode()).digest() for t in rows]
    joined = (",".join(parts) for parts in zip(*texts, strict=True))
    return [b3(prefix + f"[{t}]".encode()).digest() for t in joined]


def _value_texts(col: pa.Array | pa.ChunkedArray) -> list[str]:
    """canonical_json(tagged(v, any_type=True)) of each value, as text."""
    import pyarrow as pa
    import pyarrow.types as pat

    t = col.type
    values = col.to_pylist()
    has_null = col.null_count > 0
    if pat.is_string(t) or pat.is_large_string(t):
        # Arrow strings are valid UTF-8, so the escaping is json's own (ensure_ascii off).
        enc = json.encoder.encode_basestring
        if not has_null:
            return list(map(enc, values))
        return ["null" if v is None else enc(v) for v in values]
    if pat.is_integer(t):
        return (
            ["null" if v is None else str(v) for v in values]
            if has_null
            else list(map(str, values))
        )
    if pat.is_boolean(t):
        return ["null" if v is None else ("true" if v else "false") for v in values]
    if pat.is_floating(t) and t != pa.float16():
        return ["null" if v is None else f'{{"float":"{v.hex()}"}}' for v in values]
    return [canonical_json(tagged(v, any_type=True)).decode() for v in values]


def action_key(fingerprint: str, slices: Sequence[Sequence[Sequence[Any]]]) -> str:
    """A normal or global step's batch: its fingerprint and, per predecessor, the
    (object id, offset, length) slices it reads."""
    text = _key_json(fingerprint, slices)
    if text is not None:
        return blake3.blake3(text.encode()).hexdigest()
    desc = [[list(s) for s in pred] for pred in slices]
    return hash_json({"fp": fingerprint, "in": desc})


# Keys and entry checks are hashed for every batch a run plans or writes (twice per cache
# hit), and json.dumps plus canonical_json's round-trip check took ~25 us of a hit's
# ~100 us (bench_overhead's every-batch-hit run). Their shapes are fixed: ids (64 hex
# chars, nothing to escape) and exact ints (json writes int.__repr__), so the canonical
# text is written directly; anything else takes the general path. tests/test_hashing.py
# holds both equal on random input.
def _ids(values: Iterable[Any]) -> bool:
    return all(type(v) is str and _ID_RE.fullmatch(v) for v in values)


def _ints(values: Iterable[Any]) -> bool:
    return all(type(v) is int for v in values)


def _key_json(fingerprint: Any, slices: Sequence[Sequence[Sequence[Any]]]) -> str | None:
    if not _ids((fingerprint,)):
        return None
    preds = []
    for pred in slices:
        parts = []
        for s in pred:
            if len(s) != 3 or not _ids(s[:1]) or not _ints(s[1:]):
                return None
            parts.append(f'["{s[0]}",{s[1]},{s[2]}]')
        preds.append("[" + ",".join(parts) + "]")
    return f'{{"fp":"{fingerprint}","in":[{",".join(preds)}]}}'


def generator_key(fingerprint: str, index: int) -> str:
    """Batch `index` of a generator step."""
    if _ids((fingerprint,)) and _ints((index,)):
        return blake3.blake3(f'{{"batch":{index},"fp":"{fingerprint}"}}'.encode()).hexdigest()
    return hash_json({"fp": fingerprint, "batch": index})


def generator_end_key(fingerprint: str) -> str:
    """The entry saying how many batches a generator made (its info["batches"])."""
    return hash_json({"fp": fingerprint, "generator_end": True})


def leaf_arrow_key(oids: Sequence[str]) -> str:
    """The memory-mappable Arrow object of a leaf made of these batch objects."""
    return hash_json({"leaf_arrow": list(oids)})


SIGNING_CONTEXT = "castore 2026 remote action entry signing v1"


def signing_key(material: str) -> bytes:
    """A 32-byte blake3 key derived from a team secret of any length."""
    return blake3.blake3(material.encode("utf-8"), derive_key_context=SIGNING_CONTEXT).digest()


def sign_entry(key: bytes, action_key: str, outputs: list[str], rows: list[int]) -> str:
    """Keyed blake3 (a MAC) over what an entry claims: only a holder of the team key can
    make a remote entry that signed readers accept."""
    return blake3.blake3(_entry_claims(action_key, outputs, rows), key=key).hexdigest()


def sign_segment(key: bytes, fingerprint: str, segment: str) -> str:
    """Keyed blake3 over a remote's announcement of a row-key segment (its marker under
    index/): only a holder of the team key can make signed readers take its rows."""
    return blake3.blake3(f"segment {fingerprint} {segment}".encode(), key=key).hexdigest()


def entry_check(action_key: str, outputs: list[str], rows: list[int]) -> str:
    """Plain blake3 over what an entry claims, written with the entries a run makes: an
    entry damaged since (a row count changed) no longer matches, which a cache hit checks
    instead of reading every output's Parquet footer. Anyone can compute it, so it is
    never taken from a remote (Store.put_action drops it there)."""
    return blake3.blake3(_entry_claims(action_key, outputs, rows)).hexdigest()


def _entry_claims(action_key: str, outputs: list[str], rows: list[int]) -> bytes:
    lists = type(outputs) is list and type(rows) is list  # a tuple is refused below
    if lists and _ids((action_key, *outputs)) and _ints(rows):
        quoted = ",".join(f'"{o}"' for o in outputs)
        counts = ",".join(map(str, rows))
        return f'{{"key":"{action_key}","outputs":[{quoted}],"rows":[{counts}]}}'.encode()
    return canonical_json({"key": action_key, "outputs": outputs, "rows": rows})


class Hasher:
    """Incremental blake3 for streams: `update()` chunks, then `hexdigest()`."""

    __slots__ = ("_h", "size")

    def __init__(self) -> None:
        self._h = blake3.blake3()
        self.size = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._h.update(data)
        self.size += len(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


class _StripDocstrings(ast.NodeTransformer):
    def __init__(self, *, keep_decorators: bool = False) -> None:
        self.keep_decorators = keep_decorators

    def _strip(self, node: Any) -> Any:
        self.generic_visit(node)
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            if isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
        if hasattr(node, "decorator_list") and not self.keep_decorators:
            # A step's decorator arguments are params and are hashed as such.
            node.decorator_list = []
        return node

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = visit_Module = _strip


def code_digest(func: Callable[..., Any]) -> str:
    """blake3 of `func`'s normalized AST: comments, docstrings and formatting do not count.

    Raises OSError when the source is not available (e.g. defined in a REPL); callers
    then require an explicit `cache_version`.
    """
    func = inspect.unwrap(func)
    if getattr(func, "__name__", "") == "<lambda>":
        # getsource returns the whole line, which may hold several lambdas: use the
        # compiled code instead (stable for one Python version, which is what runs).
        return blake3.blake3(_code_repr(func.__code__).encode()).hexdigest()
    return source_digest(inspect.getsource(func))


def source_digest(source: str, *, keep_decorators: bool = False) -> str:
    """blake3 of the normalized AST of `source` (docstrings, comments and formatting do
    not count; decorators only with `keep_decorators`, as for a helper class)."""
    tree = _StripDocstrings(keep_decorators=keep_decorators).visit(
        ast.parse(textwrap.dedent(source))
    )
    dumped = ast.dump(tree, annotate_fields=True, include_attributes=False)
    return blake3.blake3(dumped.encode("utf-8")).hexdigest()


def _code_repr(code: types.CodeType) -> str:
    consts = [_code_repr(c) if isinstance(c, types.CodeType) else repr(c) for c in code.co_consts]
    return repr((code.co_code, consts, code.co_names, code.co_varnames))
