from __future__ import annotations

import json
import sys

import click
from castore.cli.common import SHORT_HELP, App, common_options, echo_json

from castore.runs import resolve
from castore.store.parquet import PARQUET_MAGIC


@click.command("cat", short_help=SHORT_HELP["cat"])
@click.argument("object_id")
@click.option(
    "--limit", type=click.IntRange(min=0), default=None, help="At most N rows of a Parquet object."
)
@common_options
@click.pass_obj
def command(app: App, object_id: str, limit: int | None, as_json: bool) -> None:
    """Print an object: JSON as stored, a Parquet batch as JSON lines (with --json, one
    JSON document: the parsed manifest, or the list of rows). A batch that extends its
    input (it stores only the columns its step added) is printed whole.

    OBJECT_ID is a full id or a unique prefix of at least 8 hex characters.
    """
    store = app.store()
    oid = resolve(store, object_id)
    data = store.get_bytes(oid)
    if data[:4] != PARQUET_MAGIC:
        if as_json:
            try:
                echo_json(json.loads(data))
                return
            except ValueError:
                pass  # not JSON: the raw bytes below
        sys.stdout.buffer.write(data)
        if not data.endswith(b"\n"):
            sys.stdout.buffer.write(b"\n")
        return
    table = store.get_table(oid, verify=False)  # just verified by get_bytes
    if limit is not None:
        table = table.slice(0, limit)
    if as_json:
        echo_json(table.to_pylist())
        return
    for batch in table.to_batches(max_chunksize=1024):
        for row in batch.to_pylist():
            click.echo(json.dumps(row, default=str, ensure_ascii=False))
