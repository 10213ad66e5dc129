from __future__ import annotations

from dataclasses import asdict
from typing import Any

import click
from castore.cli.common import (
    SHORT_HELP,
    App,
    StatusLine,
    common_options,
    complete_runs,
    counted,
    echo_json,
    err,
)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@click.command("gc", short_help=SHORT_HELP["gc"])
@click.option("--dry-run", "-n", is_flag=True, help="Print what would go; change nothing.")
@click.option(
    "--keep-last", type=click.IntRange(min=0), help="Keep the N newest runs per pipeline name."
)
@click.option("--older-than", metavar="DURATION", help="Drop runs not used since, e.g. 30d.")
@click.option(
    "--grace",
    metavar="DURATION",
    default="1h",
    show_default=True,
    help="Never sweep anything younger than this.",
)
@click.option(
    "--cache-ttl",
    metavar="DURATION",
    default="7d",
    show_default=True,
    help="Keep batches no run references for this long after they were made "
    "(they let other pipelines reuse them).",
)
@click.option("--yes", "-y", is_flag=True, help="Do not ask before removing runs by policy.")
@click.option(
    "--remote",
    "remote",
    metavar="NAME",
    help="Collect on a remote (refused while another writer holds its lock).",
)
@common_options
@click.pass_obj
def gc_command(
    app: App,
    dry_run: bool,
    keep_last: int | None,
    older_than: str | None,
    grace: str,
    cache_ttl: str,
    yes: bool,
    remote: str | None,
    as_json: bool,
) -> None:
    """Remove what no run needs: unreachable objects, dangling action entries, tmp/
    leftovers and folders of removed runs.

    Roots are the refs (minus those --keep-last / --older-than drop) and runs in
    progress. Safe to run while pipelines run.
    """
    from castore import gc

    if remote is not None:
        if keep_last is not None or older_than:
            # Never ignored without a word: a remote's runs are all roots.
            raise click.UsageError(
                "--keep-last and --older-than apply to the local store; gc --remote keeps "
                "every run the remote's refs name"
            )
        _remote_gc(
            app, remote, dry_run, gc.parse_duration(grace), gc.parse_duration(cache_ttl), as_json
        )
        return
    store = app.store()
    kw: dict[str, Any] = {
        "keep_last": keep_last,
        "older_than": gc.parse_duration(older_than) if older_than else None,
        "grace": gc.parse_duration(grace),
        "cache_ttl": gc.parse_duration(cache_ttl),
    }
    confirmed = None
    if not dry_run and not yes and not as_json and (keep_last is not None or older_than):
        confirmed = gc.plan_gc(store, **kw)
        if confirmed.refs_removed:
            for name, sig in confirmed.refs_removed:
                err(f"would remove run {name}/{sig[:12]}")
            click.confirm(
                f"remove {counted(len(confirmed.refs_removed), 'run')}?", abort=True, err=True
            )
    # What was confirmed is what is swept (not a plan made again after the prompt).
    result = gc.collect(store, dry_run=dry_run, plan=confirmed, **kw)
    p = result.plan
    if as_json:
        echo_json(
            {
                **asdict(p),
                "dry_run": dry_run,
                "bytes_freed": result.bytes_freed,
                "seconds": round(result.seconds, 3),
            }
        )
        return
    verb = "would remove" if dry_run else "removed"
    for name, sig in p.refs_removed:
        click.echo(f"{verb} run {name}/{sig[:12]}")
    for oid in p.objects_removed if dry_run else []:
        click.echo(f"{verb} object {oid}")
    err(
        f"{verb} {counted(len(p.refs_removed), 'run')}, "
        f"{counted(len(p.objects_removed), 'object')}, "
        f"{counted(len(p.actions_dropped), 'action entry')}, "
        f"{counted(len(p.tmp_removed), 'tmp file')}, "
        f"{counted(len(p.run_dirs_removed), 'run folder')}: {_human(result.bytes_freed)} "
        f"({result.bytes_freed:,} bytes); kept {counted(p.objects_kept, 'object')}"
        + (f"; {counted(len(p.live_runs), 'run')} in progress protected" if p.live_runs else "")
    )
    if p.kept_by_cache_ttl or p.kept_by_grace:
        err(
            f"kept {p.kept_by_runs} objects that runs name, {p.kept_by_cache_ttl} that only "
            f"cached batches younger than --cache-ttl {cache_ttl} name (other pipelines can "
            f"reuse them) and {p.kept_by_grace} younger than --grace {grace}; to free those "
            "now: cas gc --cache-ttl 0 --grace 0"
        )


@click.command("rm", short_help=SHORT_HELP["rm"])
@click.argument("runs", nargs=-1, required=True, shell_complete=complete_runs)
@click.option("--all", "all_", is_flag=True, help="RUN names a pipeline: remove all its runs.")
@common_options
@click.pass_obj
def rm_command(app: App, runs: tuple[str, ...], all_: bool, as_json: bool) -> None:
    """Remove runs (their refs); `cas gc` then frees what nothing else uses.

    RUN is a pipeline name (its latest run), a signature prefix or a run id prefix.
    """
    from castore.errors import ConfigError
    from castore.runs import list_runs, resolve_run

    store = app.store()
    removed = []
    for spec in runs:
        targets = (
            [r for r in list_runs(store) if r.name == spec] if all_ else [resolve_run(store, spec)]
        )
        if not targets:
            raise ConfigError(f"no runs of pipeline {spec!r}")
        for r in targets:
            if store.delete_ref(r.name, r.sig):
                removed.append(f"{r.name}/{r.sig}")
    if as_json:
        echo_json({"removed": removed})
    else:
        for line in removed:
            click.echo(f"removed {line}")
        err("objects stay until `cas gc` (or later: they may be reused by other runs)")


@click.command("du", short_help=SHORT_HELP["du"])
@common_options
@click.pass_obj
def du_command(app: App, as_json: bool) -> None:
    """Bytes per pipeline name and run (logical and unique), physical bytes, and what
    dedupe saved."""
    from castore.du import usage

    rep = usage(app.store())
    doc = {
        "names": {k: asdict(v) for k, v in rep.names.items()},
        "runs": rep.runs,
        "physical": rep.physical,
        "physical_referenced": rep.physical_referenced,
        "logical_sum": rep.logical_sum,
        "saved_by_dedupe": rep.saved_by_dedupe,
        "tokens_stored": rep.tokens_stored,
    }
    if as_json:
        echo_json(doc)
        return
    click.echo(f"{'PIPELINE / RUN':40} {'LOGICAL':>12} {'UNIQUE':>12}")
    for name, u in rep.names.items():
        click.echo(f"{name:40} {_human(u.logical):>12} {_human(u.unique):>12}")
        for label, r in rep.runs.items():
            if r["name"] == name:
                click.echo(f"  {label:38} {_human(r['logical']):>12} {_human(r['unique']):>12}")
    click.echo(
        f"physical: {_human(rep.physical)} ({_human(rep.physical_referenced)} "
        f"referenced); saved by dedupe: {_human(rep.saved_by_dedupe)}; "
        f"tokens stored: {rep.tokens_stored:,}"
    )


def _remote_gc(
    app: App, name: str, dry_run: bool, grace: float, cache_ttl: float, as_json: bool
) -> None:
    from castore.remote import Remote
    from castore.remote_gc import collect_remote

    r = Remote(app.remote_url(name))
    tell = _RemoteProgress(r.url, not as_json and not app.quiet)
    res = collect_remote(r, grace=grace, cache_ttl=cache_ttl, dry_run=dry_run, progress=tell)
    tell.done()
    p = res.plan
    if as_json:
        echo_json(
            {**asdict(p), "dry_run": dry_run, "bytes_freed": res.bytes_freed, "remote": r.url}
        )
        return
    verb = "would remove" if dry_run else "removed"
    err(
        f"remote {r.url}: {verb} {counted(len(p.objects_removed), 'object')} "
        f"({_human(res.bytes_freed)}), {counted(len(p.actions_dropped), 'action entry')}; "
        f"kept {counted(p.objects_kept, 'object')}"
    )


class _RemoteProgress(StatusLine):
    """What a remote gc is at (listings of 10^5 files take minutes)."""

    def __init__(self, url: str, enabled: bool) -> None:
        super().__init__(enabled)
        self.url = url

    def __call__(self, what: str, count: int) -> None:
        if self.due():
            self.show(f"gc {self.url}: {what} {count:,}")
