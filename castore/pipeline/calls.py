"""Calling a step's code: `load()` once per process, `process` (driven to completion when
it is async), and what it returns as chunks and as one table, every part of it watched for
the files it reads (castore/filereads.py)."""

from __future__ import annotations

import inspect
import threading
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from castore.errors import NonCanonicalValue
from castore.filereads import watching

if TYPE_CHECKING:
    import pyarrow as pa

    from castore.pipeline.step import _Step


_LOAD_LOCK = threading.Lock()


def ensure_loaded(step: _Step) -> None:
    """`step.load()` once in this process (a process-pool worker gets its own copy)."""
    if step._loaded:
        return
    with _LOAD_LOCK:
        if not step._loaded:
            step.load()
            step._loaded = True


def call_process(step: _Step, arg: Any) -> Any:
    """Call `process` (after `load`, once), driving it to completion when it is async."""
    ensure_loaded(step)
    if not step._in_run:
        step._in_run = True
    result = step.process(arg)  # type: ignore[attr-defined]
    if not (inspect.isawaitable(result) or inspect.isasyncgen(result)):
        return result
    import asyncio  # only async steps pay its import

    if inspect.isawaitable(result):
        return asyncio.run(_await(result))
    return asyncio.run(_collect(result))


def normalize_output(result: Any) -> Iterable[Any]:
    """What `process` returned, as an iterable of chunks (row lists or Tables)."""
    if result is None:
        return []
    if isinstance(result, list) or _is_table(result):
        return [result]
    return result


def _is_table(obj: Any) -> bool:
    return type(obj).__name__ == "Table" and type(obj).__module__.startswith("pyarrow")


def to_table(chunks: Iterable[Any]) -> pa.Table:
    import pyarrow as pa

    from castore.arrowpandas import spare_pandas_import

    spare_pandas_import()  # in a worker process (the driver's scheduler did its own)
    tables = []
    for chunk in chunks:
        if _is_table(chunk):
            tables.append(chunk)
        elif chunk:
            tables.append(rows_table(list(chunk)))
    if not tables:
        return pa.table({})
    if len(tables) == 1:
        return tables[0]
    return pa.concat_tables(tables, promote_options="permissive")


def rows_table(rows: list[Any]) -> pa.Table:
    """Rows as a table; a column whose values Arrow cannot hold as one type is named,
    with the rows where its types differ (Arrow's own message names neither)."""
    import pyarrow as pa

    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        names = dict.fromkeys(k for r in rows if isinstance(r, dict) for k in r)
        for name in names:
            values = [r.get(name) if isinstance(r, dict) else None for r in rows]
            try:
                pa.array(values)
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                first = next(i for i, v in enumerate(values) if v is not None)
                kind = type(values[first])
                other = next(
                    (i for i, v in enumerate(values) if v is not None and type(v) is not kind),
                    None,
                )
                seen = f"{kind.__name__} in row {first}"
                if other is not None:
                    seen += f", {type(values[other]).__name__} in row {other}"
                raise NonCanonicalValue(
                    f"column {name!r} holds values Arrow cannot store as one type ({seen}): "
                    f"{e}; give the column one type (None for a missing value)"
                ) from None
        raise


def process_chunks(step: _Step, arg: Any) -> Iterator[Any]:
    """What `process` returns for `arg`, chunk by chunk (`load()` first, once), each part
    of the step's code it runs watched for files it reads (castore/filereads.py)."""
    watch = watching(step)
    with watch:
        result = normalize_output(call_process(step, arg))
    if isinstance(result, list):  # what process returned: no more of its code runs
        yield from result
        return
    chunks = iter(result)
    try:
        while True:
            with watch:
                chunk = next(chunks, _END)
            if chunk is _END:
                return
            yield chunk
    finally:
        close = getattr(chunks, "close", None)  # a generator stopped early (a preview)
        if close is not None:
            close()


_END = object()


async def _await(aw: Any) -> Any:
    return await aw


async def _collect(agen: Any) -> list[Any]:
    return [chunk async for chunk in agen]
