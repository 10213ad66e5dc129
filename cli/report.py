from __future__ import annotations

import os
from pathlib import Path

import click
from castore.cli.common import SHORT_HELP, App, common_options, complete_runs, echo_json


@click.command("report", short_help=SHORT_HELP["report"])
@click.argument("run", shell_complete=complete_runs)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, writable=True),
    help="The HTML file to write [default: <name>-<signature prefix>.html here].",
)
@common_options
@click.pass_obj
def report_command(app: App, run: str, output: str | None, as_json: bool) -> None:
    """Write one self-contained HTML page about RUN (no network needed to view it): the
    steps as a graph with cached / computed / failed batches, rows, seconds and tokens
    spent and saved; why each step was cached or computed; the first rows of each leaf.

    RUN is a pipeline name (its latest run), a signature prefix or a run id prefix.
    """
    from castore.report import build, render

    store = app.store()
    rep = build(store, run)
    path = Path(output or f"{rep.name}-{rep.signature[:12]}.html")
    if not path.parent.is_dir():
        raise click.UsageError(f"--output {path}: no folder {path.parent}; create it first")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(render(rep), encoding="utf-8")
        os.replace(tmp, path)  # a reader never sees half a page
    finally:
        tmp.unlink(missing_ok=True)
    if as_json:
        echo_json({"path": str(path), "run_id": rep.run_id, "name": rep.name})
        return
    click.echo(f"report of {rep.name} (run {rep.run_id[:12]}) written to {path}")
