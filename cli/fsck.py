from __future__ import annotations

from dataclasses import asdict

import click
from castore.cli import App, common_options, echo_json

from castore import fsck


@click.command("fsck")
@click.option(
    "--repair",
    is_flag=True,
    help="Quarantine corrupt objects; drop dangling action entries and refs.",
)
@common_options
@click.pass_obj
def command(app: App, repair: bool, as_json: bool) -> None:
    """Verify every object digest, action entry and ref; exit 1 on any problem.

    With --repair the store is made consistent again: corrupt objects move to
    quarantine/ and whatever pointed at them is dropped, so the next run recomputes it.
    """
    report = fsck.check(app.store(), repair=repair)
    if as_json:
        echo_json({**asdict(report), "clean": report.clean})
    else:
        for p in report.problems:
            click.echo(p.line())
        click.echo(
            f"checked {report.objects_checked} objects, {report.actions_checked} action "
            f"entries, {report.refs_checked} refs: "
            + ("clean" if report.clean else f"{len(report.problems)} problem(s)"),
            err=True,
        )
    unrepaired = [p for p in report.problems if not p.repaired]
    if unrepaired or (report.problems and not repair):
        raise SystemExit(1)
