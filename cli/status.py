from __future__ import annotations

from typing import Any

import click
from castore.cli.common import SHORT_HELP, App, common_options, echo_json, err
from castore.cli.run import param_option, parse_params

from castore.errors import CastoreError, ConfigError


@click.command("status", short_help=SHORT_HELP["status"])
@click.argument("target")
@param_option
@click.option(
    "--read-inputs",
    is_flag=True,
    help="Run the loaders whose input changed, in memory (nothing is written), so the "
    "steps after them can be planned too.",
)
@click.option(
    "--remote",
    "remote",
    metavar="NAME",
    help="Also ask this remote (a name or URL) for the batches not here: they count as "
    "cached (a run fetches them), in the ON REMOTE column.",
)
@common_options
@click.pass_obj
def status_command(
    app: App,
    target: str,
    params: tuple[str, ...],
    read_inputs: bool,
    remote: str | None,
    as_json: bool,
) -> None:
    """What `cas run TARGET` would do, before paying for it: per step, the batches in
    the store (or, with --remote, on the remote), the batches to compute (and their rows
    found by row key, which cost nothing), and the steps that wait for those; estimates
    of seconds and tokens come from the pipeline's latest run. Runs no step and writes
    nothing.

    TARGET is what `cas run` takes: a Python file, package.module:NAME or pipeline.yaml.
    """

    from castore.errors import StoreNotFound
    from castore.pipeline.targets import load_target, parse_target

    try:
        store = app.store()  # a run's pipeline.yaml may name rows kept in it
    except StoreNotFound:
        store = None
    try:
        pipeline = load_target(parse_target(target), store)
    except CastoreError:
        raise
    except Exception as e:
        raise ConfigError(f"cannot load {target}: {type(e).__name__}: {e}") from None
    report = pipeline.plan(
        parse_params(params), cache_dir=app.cache_dir, read_inputs=read_inputs, remote=remote
    )
    if as_json:
        doc = report.model_dump()
        for st, out in zip(report.steps, doc["steps"], strict=True):
            out["rows_to_compute"] = st.rows_to_compute
        doc["free"] = report.free
        echo_json(doc)
        return
    _print(report, remote is not None)


def _print(report: Any, remote: bool) -> None:
    click.echo(f"pipeline {report.name}, signature {report.signature[:12]}")
    on_remote = f" {'ON REMOTE':>9}" if remote else ""
    w = max([4, *(len(s.name) for s in report.steps)])  # whole names: two may share a prefix
    click.echo(
        f"{'STEP':{w}} {'CACHED':>9}{on_remote} {'COMPUTE':>8} {'ROWS BY KEY':>11} "
        f"{'TO COMPUTE':>10}"
    )
    for s in report.steps:
        total = "?" if s.batches_total is None else str(s.batches_total)
        if s.waits_on:
            click.echo(f"{s.name:{w}} {'-':>9} {'-':>8} {'-':>11} after {', '.join(s.waits_on)}")
            continue
        rows = f"{s.rows_to_compute} rows" if s.batches_to_compute else "0"
        there = f" {s.batches_on_remote:>9}" if remote else ""
        click.echo(
            f"{s.name:{w}} {f'{s.batches_cached}/{total}':>9}{there} "
            f"{s.batches_to_compute:>8} {s.rows_by_key:>11} {rows:>10}"
        )
    if report.answers_kept:
        err(
            f"{report.answers_kept} LLM answers that a stopped run of this pipeline "
            "received are kept: a run takes them instead of asking again"
        )
    if report.free:
        err("nothing to compute: `cas run` reuses every batch")
        return
    loaders = [s.name for s in report.steps if s.batches_total is None and not s.waits_on]
    if loaders and any(s.waits_on for s in report.steps):
        err(
            f"{', '.join(loaders)} must produce its batches again (its input changed); "
            "`cas status --read-inputs` reads them in memory to plan the steps after it"
        )
    secs = [s.seconds_estimate for s in report.steps if s.seconds_estimate is not None]
    toks = [s.tokens_estimate for s in report.steps if s.tokens_estimate is not None]
    usd = [s.cost_estimate_usd for s in report.steps if s.cost_estimate_usd is not None]
    if secs or toks:
        cost = f" (~${sum(usd):.4f} at the LLMs' prices)" if usd else ""
        err(
            f"estimate from the latest run, for the steps that can be planned now: "
            f"~{sum(secs):.1f} s of compute, ~{sum(toks)} tokens{cost}"
        )
