from __future__ import annotations

from dataclasses import asdict

import click
from castore.cli.common import SHORT_HELP, App, common_options, counted, echo_json

from castore import fsck
from castore.errors import ProblemsFound


@click.command("fsck", short_help=SHORT_HELP["fsck"])
@click.option(
    "--remote",
    "remote",
    metavar="NAME",
    help="Check a remote instead: download and verify every object.",
)
@click.option(
    "--repair",
    is_flag=True,
    help="Quarantine corrupt objects; drop dangling action entries and refs.",
)
@common_options
@click.pass_obj
def command(app: App, repair: bool, remote: str | None, as_json: bool) -> None:
    """Verify every object digest, action entry and ref; exit 1 on any problem.

    With --repair the store is made consistent again: corrupt objects move to
    quarantine/ and whatever pointed at them is dropped, so the next run recomputes it.
    """
    if remote is not None:
        _remote(app, remote, as_json)
        return
    report = fsck.check(app.store(), repair=repair)
    if as_json:
        echo_json({**asdict(report), "clean": report.clean})
    else:
        for p in report.problems:
            click.echo(p.line())
        click.echo(
            f"checked {counted(report.objects_checked, 'object')}, "
            f"{counted(report.actions_checked, 'action entry')}, "
            f"{counted(report.refs_checked, 'ref')}: "
            + ("clean" if report.clean else counted(len(report.problems), "problem")),
            err=True,
        )
    unrepaired = [p for p in report.problems if not p.repaired]
    if unrepaired or (report.problems and not repair):
        raise ProblemsFound(
            f"{counted(len(unrepaired), 'problem')} left"
            + ("; `cas fsck --repair` fixes what it can" if not repair else "")
        )


def _remote(app: App, name: str, as_json: bool) -> None:
    from castore.remote import Remote

    r = Remote(app.remote_url(name))
    report = fsck.check_remote(r)
    if as_json:
        echo_json({**asdict(report), "remote": r.url, "clean": report.clean})
    else:
        for p in report.problems:
            click.echo(p.line())
        click.echo(
            f"remote {r.url}: "
            + ("clean" if report.clean else counted(len(report.problems), "problem")),
            err=True,
        )
    if not report.clean:
        raise ProblemsFound(f"{counted(len(report.problems), 'problem')} on remote {r.url}")
