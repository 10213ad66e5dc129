from __future__ import annotations

from dataclasses import asdict

import click
from castore.cli.common import SHORT_HELP, App, common_options, echo_json


@click.command("info", short_help=SHORT_HELP["info"])
@common_options
@click.pass_obj
def command(app: App, as_json: bool) -> None:
    """Show the store root, layout version, counts and bytes on disk."""
    from castore.du import store_stats

    stats = store_stats(app.store())
    if as_json:
        echo_json(asdict(stats))
        return
    click.echo(f"root:            {stats.root}")
    click.echo(f"layout version:  {stats.layout_version}")
    click.echo(f"objects:         {stats.objects:,} ({stats.object_bytes:,} bytes)")
    click.echo(f"action entries:  {stats.actions:,}")
    click.echo(f"refs:            {stats.refs:,}")
    click.echo(f"bytes on disk:   {stats.bytes_on_disk:,}")
