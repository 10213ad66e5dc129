from __future__ import annotations

from dataclasses import asdict
from typing import Any

import click
from castore.cli.common import (
    SHORT_HELP,
    App,
    StatusLine,
    common_options,
    counted,
    echo_json,
    err,
)


@click.group("remote", short_help=SHORT_HELP["remote"])
def remote_group() -> None:
    """Named remotes: other stores reached through fsspec (a folder, s3://, gs://, …).

    Credentials come from the environment or fsspec's configuration, never from here.
    """


@remote_group.command("add")
@click.argument("name")
@click.argument("url")
@common_options
@click.pass_obj
def add(app: App, name: str, url: str, as_json: bool) -> None:
    """Add a remote NAME at URL (stored in the store's config.yaml)."""
    from castore.config import add_remote

    app.creates = True  # a remote can be named before the first run
    add_remote(app.store(), name, url)
    echo_json({"added": name, "url": url}) if as_json else err(f"added remote {name}: {url}")


@remote_group.command("list")
@common_options
@click.pass_obj
def list_(app: App, as_json: bool) -> None:
    """List remotes."""
    from castore.config import load_config

    remotes = load_config(app.store()).remotes
    if as_json:
        echo_json(remotes)
        return
    for name, url in sorted(remotes.items()):
        click.echo(f"{name}\t{url}")


@remote_group.command("remove")
@click.argument("name")
@common_options
@click.pass_obj
def remove(app: App, name: str, as_json: bool) -> None:
    """Remove a remote (nothing on it is touched)."""
    from castore.config import remove_remote

    remove_remote(app.store(), name)
    echo_json({"removed": name}) if as_json else err(f"removed remote {name}")


class _Progress(StatusLine):
    """objects, bytes and rate of a transfer."""

    def __init__(self, verb: str, enabled: bool) -> None:
        super().__init__(enabled)
        self.verb = verb

    def __call__(self, objects: int, nbytes: int) -> None:
        if self.due():
            rate = nbytes / max(self.last - self.t0, 1e-9) / 1e6
            self.show(f"{self.verb}: {objects} objects, {nbytes / 1e6:.1f} MB, {rate:.1f} MB/s")


def _resolve(app: App, args: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """(the remote's URL, the run specs) of `[REMOTE] [RUN]...`, found before a pull
    creates a store: a first argument that is neither a configured remote nor a URL is a
    run spec when there is a default remote, else the remote meant (an error naming it)."""
    from castore.config import _looks_like_url, is_remote_name, remote_url
    from castore.errors import ConfigError

    store = app.existing_store()  # none yet: a pull into a new folder, URLs only
    first = args[0] if args else None
    if first is not None and (
        _looks_like_url(first) or (store is not None and is_remote_name(store, first))
    ):
        return remote_url(store, first), args[1:]
    try:
        return remote_url(store, None), args
    except ConfigError:
        if first is None:
            raise
        return remote_url(store, first), args[1:]  # raises: no remote named so


def _transfer(
    app: App, verb: str, args: tuple[str, ...], jobs: int, as_json: bool, dry_run: bool
) -> None:
    from castore.remote import Remote
    from castore.transfer import pull, push

    url, runs = _resolve(app, args)
    remote = Remote(url)
    fn = push if verb == "push" else pull
    progress = _Progress(verb, not as_json and not app.quiet and not dry_run)
    result = fn(app.store(), remote, runs, jobs=jobs, progress=progress, dry_run=dry_run)
    progress.done()
    if dry_run:
        assert result.plan is not None
        _print_plan(result.plan.summary(), as_json)
        return
    doc: dict[str, Any] = {
        **{k: v for k, v in asdict(result).items() if k != "plan"},
        "remote": remote.url,
        "rate_mb_s": round(result.rate / 1e6, 2),
    }
    if as_json:
        echo_json(doc)
        return
    err(
        f"{verb}: {counted(result.objects, 'object')} ({result.bytes / 1e6:.1f} MB, "
        f"{result.rate / 1e6:.1f} MB/s), {counted(result.actions, 'action entry')}, "
        f"{counted(len(result.refs), 'run')}"
        + (f", {counted(result.jobs, 'batch job record')}" if result.jobs else "")
        + f"; {result.skipped} already there"
    )


def _print_plan(plan: dict[str, Any], as_json: bool) -> None:
    if as_json:
        echo_json({**plan, "dry_run": True})
        return
    verb = "upload" if plan["direction"] == "push" else "download"
    size = f" ({plan['bytes'] / 1e6:.1f} MB)" if plan["bytes"] is not None else ""
    for run in plan["runs"]:
        click.echo(f"would {plan['direction']} run {run}")
    err(
        f"{plan['direction']} --dry-run: would {verb} {counted(plan['objects'], 'object')}"
        f"{size}, {counted(plan['manifests'], 'manifest')} and "
        f"{counted(plan['action_entries'], 'action entry')} for "
        f"{counted(len(plan['runs']), 'run')}; {plan['already_there']:,} objects already "
        "there; "
        "nothing was transferred"
    )


jobs_option = click.option(
    "--jobs",
    "-j",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Parallel transfers.",
)


@click.command("push", short_help=SHORT_HELP["push"])
@click.argument("args", nargs=-1, metavar="[REMOTE] [RUN]...")
@jobs_option
@click.option("--dry-run", is_flag=True, help="Only say what would be uploaded.")
@common_options
@click.pass_obj
def push_command(app: App, args: tuple[str, ...], jobs: int, dry_run: bool, as_json: bool) -> None:
    """Upload runs (default: all) to a remote: the objects it lacks, then manifests,
    action entries and refs. Idempotent; an interrupted push resumes.

    REMOTE defaults to $CASTORE_REMOTE or the only configured remote.
    """
    _transfer(app, "push", args, jobs, as_json, dry_run)


@click.command("pull", short_help=SHORT_HELP["pull"])
@click.argument("args", nargs=-1, metavar="[REMOTE] [RUN]...")
@jobs_option
@click.option(
    "--dry-run", is_flag=True, help="Only say what would be downloaded (reads manifests)."
)
@common_options
@click.pass_obj
def pull_command(app: App, args: tuple[str, ...], jobs: int, dry_run: bool, as_json: bool) -> None:
    """Download runs (default: all) from a remote; every object is verified before it
    enters the store, and a mismatch names the object and stores nothing."""
    app.creates = not dry_run  # pulling into a new folder makes the store
    _transfer(app, "pull", args, jobs, as_json, dry_run)
