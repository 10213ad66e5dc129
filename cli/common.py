"""What every `cas` command shares: the lazily opened store, --cache-dir/--json, output."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import click


@dataclass
class App:
    """Lazily opened state shared by every command."""

    cache_dir: str | None = None
    quiet: bool = False
    _store: Any = field(default=None, repr=False)

    def store(self) -> Any:
        if self._store is None:
            from castore.store import Store

            self._store = Store(self.cache_dir)
        return self._store


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
        help="Store root [env var: CASTORE_CACHE_DIR; default ~/.cache/castore].",
    )(f)
    return f


def echo_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, default=str))


def err(msg: str) -> None:
    click.echo(msg, err=True)
