from __future__ import annotations

from typing import Any

import click
from castore.cli.common import SHORT_HELP, App, common_options, complete_runs, echo_json


def _duration(info) -> float:
    m = info.manifest
    return ((m.ended or m.updated) - m.started).total_seconds()


@click.command("ls", short_help=SHORT_HELP["ls"])
@common_options
@click.pass_obj
def ls_command(app: App, as_json: bool) -> None:
    """List runs: name, short signature, status, rows, started, duration."""
    from castore.errors import StoreNotFound
    from castore.runs import list_runs

    try:
        runs = list_runs(app.store())
    except StoreNotFound as e:
        runs = []  # no store yet: no runs, and nothing created
        if not as_json:
            click.echo(f"no runs: {e}", err=True)
            return
    rows: list[dict[str, Any]] = [
        {
            "name": r.name,
            "signature": r.sig,
            "run_id": r.oid,
            "status": r.status,
            "rows": sum(
                r.manifest.stats[leaf].rows
                for leaf in r.manifest.leaves
                if leaf in r.manifest.stats
            ),
            "started": r.manifest.started.isoformat(timespec="seconds"),
            "seconds": round(_duration(r), 3),
        }
        for r in runs
    ]
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("no runs", err=True)
        return
    w = max([24, *(len(r["name"]) for r in rows)])  # whole names: `cas show NAME` takes them
    click.echo(f"{'NAME':{w}} {'SIGNATURE':12} {'STATUS':11} {'ROWS':>9} {'STARTED':20} SECONDS")
    for r in rows:
        click.echo(
            f"{r['name']:{w}} {r['signature'][:12]} {r['status']:11} "
            f"{r['rows']:>9} {r['started'][:19]:20} {r['seconds']:.1f}"
        )


@click.command("show", short_help=SHORT_HELP["show"])
@click.argument("run", shell_complete=complete_runs)
@click.option("--dag", is_flag=True, help="Draw the steps as a graph, with their counts.")
@common_options
@click.pass_obj
def show_command(app: App, run: str, dag: bool, as_json: bool) -> None:
    """Per step: batches done/total, cached/computed, rows, columns.

    RUN is a pipeline name (its latest run), a signature prefix or a run id prefix.
    """
    from castore.runs import resolve_run, step_table
    from castore.summary import RunSummary

    store = app.store()
    info = resolve_run(store, run)
    steps = step_table(store, info)
    summary = RunSummary.load(store, info.oid)  # the totals every command prints
    doc = {
        "name": info.name,
        "signature": info.sig,
        "run_id": info.oid,
        "status": info.status,
        "steps": steps,
        "saved": summary.saved.model_dump(),
        "tokens_spent": summary.tokens_spent,
        "cost_spent_usd": summary.cost_spent_usd,
        "error": info.manifest.error,
        "edges": [list(e) for e in info.manifest.edges],
    }
    if as_json:
        echo_json(doc)
        return
    click.echo(f"{info.name} {info.sig[:12]} {info.status} (run {info.oid[:12]})")
    if info.manifest.error:
        click.echo(f"error: {info.manifest.error}")
    if dag:
        for line in dag_lines(steps, info.manifest.edges):
            click.echo(line)
        click.echo(summary.saved.line())
        return
    for s in steps:
        total = s["batches_total"] if s["batches_total"] is not None else "?"
        click.echo(
            f"  {s['name']}: {s['batches_done']}/{total} batches "
            f"({s['batches_cached']} cached, {s['batches_computed']} computed, "
            f"{s['batches_failed']} failed), {s['rows']} rows"
            + (f" ({s['rows_reused']} reused by row key)" if s["rows_reused"] else "")
            + "; "
            f"columns: {', '.join(s['columns'])}"
            + (
                f"; tokens {s['tokens_spent']} spent, {s['tokens_saved']} saved"
                if s["tokens_spent"] or s["tokens_saved"]
                else ""
            )
            + (
                f" (~${s['cost_spent_usd']:.4f} spent, ${s['cost_saved_usd']:.4f} saved)"
                if s["cost_spent_usd"] or s["cost_saved_usd"]
                else ""
            )
        )
    click.echo(summary.saved.line())


def dag_lines(steps: list[dict[str, Any]], edges: list[tuple[str, str]]) -> list[str]:
    """The steps in run order, each indented by its depth under the steps it reads
    from; a step that reads from another than the line above (a fan-in, a branch) names
    them with "<-"."""
    preds: dict[str, list[str]] = {}
    for a, b in edges:
        preds.setdefault(b, []).append(a)
    depth: dict[str, int] = {}
    out: list[str] = []
    above = None
    for s in steps:
        name, ps = s["name"], preds.get(s["name"], [])
        depth[name] = 1 + max((depth.get(p, 0) for p in ps), default=-1)
        counts = f"{s['batches_cached']} cached, {s['batches_computed']} computed"
        if s["batches_failed"]:
            counts += f", {s['batches_failed']} failed"
        reused = f", {s['rows_reused']} by row key" if s["rows_reused"] else ""
        head = "  " * depth[name] + ("└─ " if ps else "● ")
        via = f"  <- {', '.join(ps)}" if ps and ps != [above] else ""
        out.append(f"{head}{name}  [{counts}; {s['rows']} rows{reused}]{via}")
        above = name
    return out


@click.command("log", short_help=SHORT_HELP["log"])
@click.argument("run", shell_complete=complete_runs)
@common_options
@click.pass_obj
def log_command(app: App, run: str, as_json: bool) -> None:
    """Print a run's pipeline.log: every attempt of it (a run stopped by Ctrl+C, a kill
    or a failure, then resumed), oldest first, each under a header. RUN may also be the
    id of one earlier attempt (as `cas explain` prints it)."""
    from castore.runs import attempts, resolve_run
    from castore.store.runfolder import RunFolder

    store = app.store()
    info = resolve_run(store, run)
    shown = attempts(store, info)
    logs = []
    for a in shown:
        if a.manifest.log:
            text = store.get_bytes(a.manifest.log).decode(errors="replace")
        else:  # running, or killed before its final seal: its live log in the run folder
            text = RunFolder(store, info.name, info.sig).read_log(a.manifest.run_id)
        logs.append(text)
    if as_json:
        echo_json(
            {
                "run_id": info.oid,
                "log": logs[-1],
                "attempts": [
                    {"run_id": a.oid, "status": a.status, "log": t}
                    for a, t in zip(shown, logs, strict=True)
                ],
            }
        )
        return
    for i, (a, text) in enumerate(zip(shown, logs, strict=True), start=1):
        if len(shown) > 1:
            started = a.manifest.started.isoformat(timespec="seconds")
            click.echo(f"== attempt {i} of {len(shown)}: run {a.oid[:12]}, {a.status}, {started}")
        click.echo(text or "(no log stored)\n", nl=False)
