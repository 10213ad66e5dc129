from __future__ import annotations

import os
from typing import Any

import click
from castore.cli.common import SHORT_HELP, App, common_options, complete_runs, echo_json, err

from castore.errors import CastoreError, ConfigError, RunInterrupted, one_line
from castore.store.manifests import RunManifest, Target
from castore.yamlio import YamlSyntaxError, load_yaml


def parse_params(items: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """`step.field=value` pairs; values are YAML scalars/lists (`0.7`, `true`, `[a, b]`).
    A longer path sets a nested value: `gen.llm.generation_kwargs.temperature=0.2`."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        lhs, eq, raw = item.partition("=")
        path = lhs.split(".")
        if not eq or len(path) < 2 or not all(path):
            raise ConfigError(f"--param {item!r}: expected STEP.FIELD=VALUE")
        try:
            value = load_yaml(raw, f"--param {lhs}", max_bytes=1 << 20) if raw else ""
        except YamlSyntaxError:
            value = raw  # not YAML: the text as typed
        node = out.setdefault(path[0], {})
        for key in path[1:-1]:
            nxt = node.setdefault(key, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--param {item!r}: {key} is already set to a value")
            node = nxt
        node[path[-1]] = value
    return out


def summary(app: App, run_oid: str) -> dict[str, Any]:
    from castore.summary import RunSummary

    return RunSummary.load(app.store(), run_oid).model_dump()


def execute(
    app: App,
    target: Target,
    params: dict,
    *,
    use_cache: bool,
    executor: str,
    as_json: bool,
    grace: float,
    hint: str | None = None,
    remote: str | None = None,
    push: bool = False,
    manifest: RunManifest | None = None,
    ray_address: str | None = None,
    ray_storage: str = "store",
) -> None:
    """Load the target's pipeline, run it, print the summary (also when interrupted).
    A run started from Python (`api` target) is rebuilt from its stored pipeline.yaml."""
    from castore.pipeline.targets import load_target

    try:
        pipeline = load_target(target, app.store(), manifest)
    except CastoreError:
        raise
    except Exception as e:
        from pydantic import ValidationError

        if isinstance(e, ValidationError):  # a step built with a wrong parameter
            raise ConfigError(f"cannot load {target.path}: {e.title}: {one_line(e)}") from None
        raise ConfigError(f"cannot load {target.path}: {type(e).__name__}: {e}") from None
    try:
        run_oid = pipeline.execute(
            params,
            use_cache=use_cache,
            cache_dir=app.store().root,
            executor=executor,
            quiet=app.quiet or as_json,
            target=target,
            stop_grace=grace,
            remote=remote,
            push=push,
            ray_address=ray_address,
            ray_storage=ray_storage,
        )
    except RunInterrupted as e:
        if as_json and e.run_oid:
            echo_json(summary(app, e.run_oid))
        raise
    doc = summary(app, run_oid)
    if as_json:
        echo_json(doc)
        return
    err(
        f"run {doc['name']} {doc['status']} in {doc['seconds']:.1f}s; "
        f"rows: {', '.join(f'{k}={v}' for k, v in doc['rows'].items())}"
    )
    # on_error="skip": a finished run may hold rows with None outputs; never call it free.
    failed = {n: s["batches_failed"] for n, s in doc["steps"].items() if s["batches_failed"]}
    if failed:
        total = sum(failed.values())
        err(
            f"{total} batch{'es' if total != 1 else ''} failed ("
            + ", ".join(f"{n}: {k}" for n, k in failed.items())
            + "): their rows are kept with None outputs and are not cached; "
            f"`cas log {doc['name']}` has the errors"
        )
    err(f"data: {doc['data_dir']}")
    if hint:
        free = "retries the failed batches; the rest is cached" if failed else None
        err(f"run again ({free or 'free: every batch is cached'}): {hint}")


def rerun_hint(argv: list[str], command: str, target: Target, params: dict) -> str | None:
    """The `cas run` line that repeats this run for free: the user's own line for `cas
    run` (without --no-cache, which would not be free); for `cas resume`, a `cas run` of
    the recorded target with the recorded parameters (redacted secrets come from the
    environment again), after the same global options."""
    import shlex

    from castore.pipeline.step import REDACTED

    if command not in argv:
        return None
    at = argv.index(command)
    if command == "run":
        return shlex.join(["cas", *(a for a in argv if a != "--no-cache")])
    if not target.path:
        return None
    words = ["cas", *argv[:at], "run", target.path]
    for step_name, fields in sorted(params.items()):
        for fname, value in sorted(fields.items()):
            if value != REDACTED:
                words += ["--param", f"{step_name}.{fname}={dump_param(value)}"]
    return shlex.join(words)


def dump_param(value: Any) -> str:
    """A parameter value as --param reads it back: a string as typed when YAML reads it
    as that string, else JSON (which YAML reads)."""
    import json

    if isinstance(value, str):
        try:
            if load_yaml(value, "--param") == value:
                return value
        except YamlSyntaxError:
            return value  # --param keeps text that is not YAML as typed
    return json.dumps(value, ensure_ascii=False)


def run_options(f: Any) -> Any:
    f = click.option(
        "--push",
        is_flag=True,
        help="Write through: upload each new batch to the remote as it is made.",
    )(f)
    f = click.option(
        "--remote",
        "remote",
        metavar="NAME",
        help="Read-through cache: a local miss asks this remote (a configured "
        "name or a URL; default $CASTORE_REMOTE with --push).",
    )(f)
    f = click.option(
        "--quiet",
        "-q",
        "quiet",
        is_flag=True,
        help="No log lines or progress on the console (pipeline.log still gets them).",
    )(f)
    f = click.option(
        "--grace",
        type=click.FloatRange(min=0),
        default=30.0,
        show_default=True,
        help="Seconds to wait for in-flight batches after Ctrl+C.",
    )(f)
    f = click.option(
        "--ray-storage",
        type=click.Choice(["store", "remote"]),
        default="store",
        show_default=True,
        help="Where Ray workers write batches: the store (a filesystem all nodes see) or "
        "the --remote, which the driver reads through.",
    )(f)
    f = click.option(
        "--ray-address",
        metavar="ADDR",
        help="Ray cluster to use with --executor ray (default: a local one).",
    )(f)
    f = click.option(
        "--executor",
        type=click.Choice(["threads", "processes", "ray"]),
        default="threads",
        show_default=True,
        help="threads for I/O-bound steps (LLM calls), processes for CPU-bound.",
    )(f)
    return f


# `cas run` and `cas status` take the same target and parameters.
param_option = click.option(
    "--param",
    "params",
    multiple=True,
    metavar="STEP.FIELD=VALUE",
    help="Set a step parameter (repeatable); VALUE is parsed as YAML.",
)


@click.command("run", short_help=SHORT_HELP["run"])
@click.argument("target")
@param_option
@click.option("--no-cache", is_flag=True, help="Recompute every batch (results are still stored).")
@run_options
@common_options
@click.pass_obj
def run_command(
    app: App,
    target: str,
    params: tuple[str, ...],
    no_cache: bool,
    executor: str,
    grace: float,
    quiet: bool,
    remote: str | None,
    push: bool,
    ray_address: str | None,
    ray_storage: str,
    as_json: bool,
) -> None:
    """Run a pipeline; finished batches are reused, so this also resumes and re-runs.

    TARGET is a Python file (the Pipeline it defines, or FILE.py:NAME), a
    package.module:NAME, or a pipeline.yaml. Ctrl+C stops cleanly (exit 130);
    `cas resume` continues.
    """
    from castore.pipeline.targets import parse_target

    app.quiet = app.quiet or quiet
    app.creates = True
    execute(
        app,
        parse_target(target),
        parse_params(params),
        use_cache=not no_cache,
        executor=executor,
        as_json=as_json,
        grace=grace,
        hint=rerun_hint(app.argv, "run", Target(kind="api"), {}),
        remote=remote,
        push=push,
        ray_address=ray_address,
        ray_storage=ray_storage,
    )


@click.command("resume", short_help=SHORT_HELP["resume"])
@click.argument("name", required=False, shell_complete=complete_runs)
@run_options
@common_options
@click.pass_obj
def resume_command(
    app: App,
    name: str | None,
    executor: str,
    grace: float,
    quiet: bool,
    remote: str | None,
    push: bool,
    ray_address: str | None,
    ray_storage: str,
    as_json: bool,
) -> None:
    """Continue the latest interrupted, failed or waiting run (of NAME, or of any
    pipeline).

    Re-invokes the target recorded in the run, with the same parameters; every batch
    that finished before is reused, and batch jobs a waiting run submitted are polled
    and, once finished, collected (exit 75 while some still run).
    """
    from castore.errors import NothingToResume, StoreNotFound
    from castore.runs import latest_resumable

    app.quiet = app.quiet or quiet
    try:
        store = app.store()
    except StoreNotFound as e:
        raise NothingToResume(f"nothing to resume: {e}") from None
    info = latest_resumable(store, name)
    man = info.manifest
    target = man.target or Target(kind="api")
    if not as_json:
        err(
            f"resuming {info.name} ({info.sig[:12]}, {info.status}) from "
            f"{target.path or 'its stored pipeline.yaml'}"
        )
    if target.cwd and os.path.isdir(target.cwd):
        os.chdir(target.cwd)
    execute(
        app,
        target,
        man.parameters,
        use_cache=True,
        executor=executor,
        as_json=as_json,
        grace=grace,
        hint=rerun_hint(app.argv, "resume", target, man.parameters),
        remote=remote,
        push=push,
        manifest=man,
        ray_address=ray_address,
        ray_storage=ray_storage,
    )
