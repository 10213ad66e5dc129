"""What every `cas` command shares: the lazily opened store, --cache-dir/--json, output."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import click

# --cache-dir, on the group and on every command.
CACHE_DIR_HELP = (
    "Store root [env var: CASTORE_CACHE_DIR; default $XDG_CACHE_HOME/castore, else "
    "~/.cache/castore]."
)

# The line `cas --help` shows for each command (the command uses it too): cas --help
# lists them without importing the commands.
SHORT_HELP = {
    "cat": "Print an object (JSON as stored, a Parquet batch as JSON lines).",
    "diff": "Two runs side by side: steps changed, rows added and removed.",
    "distiset": "Export the datasets of a run (or of a data folder).",
    "du": "Bytes per pipeline and run, and what dedupe saved.",
    "explain": "Why each step of a run was cached or computed.",
    "fsck": "Verify every object, action entry and ref (exit 1 on a problem).",
    "gc": "Remove what no run needs (dry run with --dry-run).",
    "info": "Show the store root, layout version, counts and bytes on disk.",
    "jobs": "Offline LLM batch jobs: state, rows, tokens, age; cancel.",
    "log": "Print a run's pipeline.log.",
    "ls": "List runs: name, signature, status, rows, started, duration.",
    "pull": "Download runs from a remote, every object verified.",
    "push": "Upload runs to a remote: what it lacks, then entries and refs.",
    "remote": "Named remotes: other stores reached through fsspec.",
    "report": "An HTML page about a run: its steps drawn, counts, reasons.",
    "resume": "Continue the latest interrupted, failed or waiting run.",
    "rm": "Remove runs (their refs); `cas gc` then frees their data.",
    "run": "Run a pipeline; finished batches are reused (resume, re-run).",
    "show": "Per step: batches done/total, cached/computed, rows, columns.",
    "status": "What `cas run` would compute and reuse, before running (writes nothing).",
}


@dataclass
class App:
    """Lazily opened state shared by every command."""

    cache_dir: str | None = None
    quiet: bool = False
    argv: list[str] = field(default_factory=list)  # as typed, after `cas`
    # Commands that write (run, pull, remote add) create a missing store; the others
    # never do, and say there is none.
    creates: bool = False
    _store: Any = field(default=None, repr=False)

    def store(self) -> Any:
        if self._store is None:
            from castore.store import Store

            self._store = Store(self.cache_dir, create=self.creates)
        return self._store

    def existing_store(self) -> Any:
        """The store if there is one, else None: never creates it (a remote is resolved
        before a pull may create the store, and fsck/gc of a URL need none)."""
        if self._store is None:
            from castore.errors import StoreNotFound
            from castore.store import Store

            try:
                self._store = Store(self.cache_dir, create=False)
            except StoreNotFound:
                return None
        return self._store

    def remote_url(self, name: str | None) -> str:
        """A remote's URL: a configured name, else a URL or path given directly (which
        needs no local store)."""
        from castore.config import remote_url

        return remote_url(self.existing_store(), name)


def common_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """`--cache-dir` and `--json` on every command (the group's --cache-dir also works)."""

    def set_cache_dir(ctx: click.Context, _p: click.Parameter, value: str | None) -> None:
        if value is not None:
            ctx.ensure_object(App).cache_dir = value

    f = click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")(
        f
    )
    f = click.option(
        "--cache-dir",
        type=click.Path(file_okay=False),
        expose_value=False,
        callback=set_cache_dir,
        help=CACHE_DIR_HELP,
    )(f)
    return f


def echo_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, default=str))


def err(msg: str) -> None:
    click.echo(msg, err=True)


def counted(n: int, noun: str) -> str:
    """`1 object`, `2 objects`, `1 action entry`, `3 action entries`."""
    if n == 1:
        return f"1 {noun}"
    return f"{n:,} " + (noun[:-1] + "ies" if noun.endswith("y") else noun + "s")


def complete_runs(ctx: click.Context, _param: click.Parameter, incomplete: str) -> list[Any]:
    """Shell completion of run names (and signature prefixes) from the store that
    --cache-dir or CASTORE_CACHE_DIR names; nothing when there is no store."""
    from click.shell_completion import CompletionItem

    from castore.errors import CastoreError
    from castore.store import Store

    root = ctx.find_root().params.get("cache_dir") or ctx.params.get("cache_dir")
    try:
        refs = Store(root, create=False).list_refs()
    except (CastoreError, OSError):
        return []
    names = sorted({name for name, _, _ in refs if name.startswith(incomplete)})
    sigs = sorted({sig[:12] for _, sig, _ in refs if sig.startswith(incomplete)})
    return [CompletionItem(n, help="pipeline") for n in names] + [
        CompletionItem(s, help="signature") for s in sigs if incomplete
    ]


class StatusLine:
    """One stderr line rewritten while long work runs (a transfer, a remote gc), at most
    every 0.5 s; silent when stderr is not a terminal."""

    def __init__(self, enabled: bool) -> None:
        import sys
        import time

        self.enabled = enabled and sys.stderr.isatty()
        self.t0 = self.last = time.monotonic()
        self.shown = False

    def due(self) -> bool:
        """True (and the clock restarted) when the line may be rewritten now."""
        import time

        now = time.monotonic()
        if not self.enabled or now - self.last < 0.5:
            return False
        self.last = now
        return True

    def show(self, text: str) -> None:
        click.echo(f"\r{text}\033[K", err=True, nl=False)
        self.shown = True

    def done(self) -> None:
        """End the line, so what follows starts on its own."""
        if self.shown:
            click.echo("", err=True)
