from __future__ import annotations

import click
from castore.cli.common import SHORT_HELP, App, common_options, complete_runs, echo_json


@click.command("explain", short_help=SHORT_HELP["explain"])
@click.argument("run", shell_complete=complete_runs)
@click.argument("step", required=False)
@click.option(
    "--against",
    metavar="RUN",
    help="Compare with this run instead of the previous run of the pipeline.",
)
@common_options
@click.pass_obj
def explain_command(
    app: App, run: str, step: str | None, against: str | None, as_json: bool
) -> None:
    """Why each step of RUN was cached or computed: a param that changed (old → new),
    its code, an upstream step, an input file, --no-cache, a missing object, a retry.

    RUN is a pipeline name (its latest run), a signature prefix or a run id prefix.
    """
    from castore.changes import explain

    report = explain(app.store(), run, step, against)
    if as_json:
        echo_json(report.model_dump())
        return
    click.echo(f"{report.run}" + (f" vs {report.against}" if report.against else ""))
    for s in report.steps:
        click.echo(
            f"  {s.step}: {s.status} ({s.batches_cached} cached, "
            f"{s.batches_computed} computed, {s.batches_failed} failed"
            + (
                f"; rows: {s.rows_computed} computed, {s.rows_reused} reused by row key"
                if s.rows_reused
                else ""
            )
            + ")"
        )
        for r in s.reasons:
            click.echo(f"    - {r}")


@click.command("diff", short_help=SHORT_HELP["diff"])
@click.argument("run_a", shell_complete=complete_runs)
@click.argument("run_b", shell_complete=complete_runs)
@common_options
@click.pass_obj
def diff_command(app: App, run_a: str, run_b: str, as_json: bool) -> None:
    """Two runs side by side: steps added, removed and changed, and per leaf step the
    rows added and removed (equal batch ids are equal data: only differing batches are
    read)."""
    from castore.changes import diff

    rep = diff(app.store(), run_a, run_b)
    if as_json:
        echo_json(rep.model_dump())
        return
    click.echo(f"a: {rep.a}\nb: {rep.b}")
    for s in rep.steps_added:
        click.echo(f"  + step {s}")
    for s in rep.steps_removed:
        click.echo(f"  - step {s}")
    for s, reasons in rep.steps_changed.items():
        click.echo(f"  ~ step {s}: " + "; ".join(reasons))
    for leaf in rep.leaves:
        if leaf.identical:
            click.echo(f"  {leaf.leaf}: identical ({leaf.rows_b} rows)")
        else:
            click.echo(
                f"  {leaf.leaf}: {leaf.rows_a} → {leaf.rows_b} rows "
                f"(+{leaf.rows_added} / -{leaf.rows_removed})"
            )
