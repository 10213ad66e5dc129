"""The `cas` command. Each command lives in its own module and is a thin wrapper over the
library; exceptions become exit codes in exactly one place, `main()`."""

from __future__ import annotations

import errno
import importlib
import logging
import os
import sys
from typing import Any

import click
from castore.cli.common import CACHE_DIR_HELP, SHORT_HELP, App, err

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


# name: (module under castore.cli, attribute). Commands are imported when used, so
# `cas --help` and `cas ls` do not import every command's library code; the listing in
# `cas --help` comes from cli/common.py's SHORT_HELP, which each command also uses.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("run", "run_command"),
    "resume": ("run", "resume_command"),
    "status": ("status", "status_command"),
    "ls": ("runs", "ls_command"),
    "show": ("runs", "show_command"),
    "log": ("runs", "log_command"),
    "explain": ("explain", "explain_command"),
    "report": ("report", "report_command"),
    "jobs": ("jobs", "jobs_group"),
    "diff": ("explain", "diff_command"),
    "distiset": ("distiset", "command"),
    "cat": ("cat", "command"),
    "info": ("info", "command"),
    "du": ("gc", "du_command"),
    "gc": ("gc", "gc_command"),
    "rm": ("gc", "rm_command"),
    "fsck": ("fsck", "command"),
    "remote": ("remote", "remote_group"),
    "push": ("remote", "push_command"),
    "pull": ("remote", "pull_command"),
}


class LazyGroup(click.Group):
    """A group whose commands are imported on first use (click's documented pattern)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        spec = COMMANDS.get(cmd_name)
        if spec is None:
            return None
        command: click.Command = getattr(importlib.import_module(f"castore.cli.{spec[0]}"), spec[1])
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(n, SHORT_HELP[n]) for n in self.list_commands(ctx)])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="castore")
@click.option(
    "--cache-dir",
    envvar="CASTORE_CACHE_DIR",
    type=click.Path(file_okay=False),
    help=CACHE_DIR_HELP,
)
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option(
    "-q", "--quiet", is_flag=True, help="No log lines or progress: errors and results only."
)
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
    from castore.remote_checks import explain_remote_error

    mapped = explain_remote_error(e) or (_store_oserror(e) if isinstance(e, OSError) else None)
    if mapped is not None:
        return _failed(mapped)
    if _state["debug"]:
        raise e
    err(f"Error: unexpected {type(e).__name__}: {e} (rerun with --debug for a traceback)")
    return 70


def main(argv: list[str] | None = None) -> None:
    """Entry point of `cas`: runs the group and maps exceptions to exit codes."""
    try:
        args = list(sys.argv[1:] if argv is None else argv)
        code = cas.main(args=args, prog_name="cas", standalone_mode=False, obj=App(argv=args))
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
    # The interpreter's final garbage collection walks every object the command made
    # (pydantic models, Arrow tables): ~25-30 ms of a 0.25 s no-op run. Frozen objects
    # are skipped; atexit handlers and stream flushes still run.
    import gc

    gc.freeze()
    sys.exit(code if isinstance(code, int) else 0)
