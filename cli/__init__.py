"""The `cas` command. Each command lives in its own module and is a thin wrapper over the
library; exceptions become exit codes in exactly one place, `main()`."""

from __future__ import annotations

import errno
import logging
import os
import sys
from typing import Any

import click
from castore.cli.common import App, err

from castore._version import __version__
from castore.errors import CastoreError, RunInterrupted

_state: dict[str, Any] = {"debug": False, "cache_dir": None}
_MAPPED_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EFBIG,
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="castore")
@click.option(
    "--cache-dir",
    envvar="CASTORE_CACHE_DIR",
    type=click.Path(file_okay=False),
    help="Store root [env var: CASTORE_CACHE_DIR; default ~/.cache/castore].",
)
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors.")
@click.option("--debug", is_flag=True, help="Show tracebacks for unexpected errors.")
@click.pass_context
def cas(ctx: click.Context, cache_dir: str | None, verbose: int, quiet: bool, debug: bool) -> None:
    """castore: data pipelines whose every batch is kept in a content-addressed store.

    Runs resume exactly after Ctrl+C or kill -9, finished pipelines re-run for free, and
    work shared between pipelines is done once.
    """
    _state["debug"] = debug
    level = (
        logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    )
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if verbose < 2:
        # aiohttp (under s3fs) reports a dropped connection as an unretrieved task error;
        # castore already says the remote is unavailable, in one line.
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    app = ctx.ensure_object(App)
    app.cache_dir = app.cache_dir or cache_dir
    app.quiet = quiet
    _state["cache_dir"] = app.cache_dir


def _register() -> None:
    from castore.cli import cat, distiset, explain, fsck, gc, info, remote, run, runs

    for mod in (info, fsck, cat, distiset):
        cas.add_command(mod.command)
    for command in (
        explain.explain_command,
        explain.diff_command,
        remote.remote_group,
        remote.push_command,
        remote.pull_command,
        gc.gc_command,
        gc.rm_command,
        gc.du_command,
        run.run_command,
        run.resume_command,
        runs.ls_command,
        runs.show_command,
        runs.log_command,
    ):
        cas.add_command(command)


_register()


def _store_oserror(e: OSError) -> CastoreError | None:
    """A full disk or an unwritable folder met outside the store's own writers (a log file,
    a run folder, a lock) gets the same exit code and message as inside them."""
    from pathlib import Path

    from castore.store.files import default_root, translate_oserror

    if e.errno not in _MAPPED_ERRNOS:
        return None
    root = Path(_state.get("cache_dir") or default_root())
    return translate_oserror(e, e.filename or "the store", root)


def _failed(e: CastoreError) -> int:
    if _state["debug"]:
        # The whole story: the traceback and what the one line summarized (pydantic's full
        # validation report is the chained cause).
        import traceback

        traceback.print_exception(e)
    err(f"Error: {e}")
    return e.exit_code


def _unexpected(e: Exception) -> int:
    """A full disk or an unwritable folder keeps its documented code; anything else is 70."""
    mapped = _store_oserror(e) if isinstance(e, OSError) else None
    if mapped is not None:
        return _failed(mapped)
    if _state["debug"]:
        raise e
    err(f"Error: unexpected {type(e).__name__}: {e} (rerun with --debug for a traceback)")
    return 70


def main(argv: list[str] | None = None) -> None:
    """Entry point of `cas`: runs the group and maps exceptions to exit codes."""
    try:
        code = cas.main(args=argv, prog_name="cas", standalone_mode=False)
    except RunInterrupted as e:
        err(str(e))  # not an error: the user asked, and `cas resume` continues
        code = e.exit_code
    except CastoreError as e:
        code = _failed(e)
    except click.exceptions.Abort:
        err("Aborted.")
        code = 1
    except click.ClickException as e:
        e.show()
        code = e.exit_code
    except KeyboardInterrupt:
        err("interrupted")
        code = 130
    except BrokenPipeError:
        # Python would print a traceback when flushing stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = 141
    except Exception as e:
        code = _unexpected(e)
    sys.exit(code if isinstance(code, int) else 0)
