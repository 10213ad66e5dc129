from __future__ import annotations

from typing import Any

import click
from castore.cli.common import SHORT_HELP, App, common_options, complete_runs, echo_json, err


@click.command("distiset", short_help=SHORT_HELP["distiset"])
@click.argument("run", required=False, shell_complete=complete_runs)
@click.option(
    "--from-dir",
    "from_dir",
    type=click.Path(),
    help="Build from a data/ folder (a castore run folder, <sig>/data/<leaf>/*.parquet "
    "or a distilabel 1.5 cache folder) instead of a run.",
)
@click.option(
    "--output",
    "-o",
    required=True,
    type=click.Path(),
    help="New folder to write the datasets into.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["parquet", "jsonl", "arrow"]),
    default="parquet",
    show_default=True,
)
@click.option(
    "--metadata/--no-metadata",
    default=False,
    show_default=True,
    help="Keep the castore_metadata / distilabel_metadata column.",
)
@common_options
@click.pass_obj
def command(
    app: App,
    run: str | None,
    from_dir: str | None,
    output: str,
    fmt: str,
    metadata: bool,
    as_json: bool,
) -> None:
    """Export the datasets of a run (or of a data folder), one folder per leaf step.

    RUN is a pipeline name (its latest run), a signature prefix or a run id prefix.
    Writes <OUTPUT>/<leaf>/train.<format>, pipeline.yaml, pipeline.log and a README.md
    dataset card; a failure leaves nothing at OUTPUT.
    """
    import datasets

    from castore.distiset import Distiset, create_distiset
    from castore.errors import ConfigError

    datasets.disable_progress_bars()  # its per-file bars would clutter the command's output

    if (run is None) == (from_dir is None):
        raise ConfigError("give either RUN or --from-dir DATA_DIR")
    if from_dir is not None:
        ds = create_distiset(from_dir, enable_metadata=metadata)
    else:
        assert run is not None
        ds = Distiset.from_run(run, app.store().root, enable_metadata=metadata)
    path = ds.export(output, fmt)
    doc: dict[str, Any] = {
        "output": str(path),
        "format": fmt,
        "partial": ds.partial,
        "leaves": {leaf: dd["train"].num_rows for leaf, dd in ds.items()},
    }
    if as_json:
        echo_json(doc)
    else:
        rows = ", ".join(f"{k}={v}" for k, v in doc["leaves"].items())
        err(f"wrote {rows} to {path}" + (" (partial run)" if ds.partial else ""))
