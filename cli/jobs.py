from __future__ import annotations

from typing import Any

import click
from castore.cli.common import SHORT_HELP, App, common_options, echo_json, err


@click.group("jobs", short_help=SHORT_HELP["jobs"], invoke_without_command=True)
@click.option("--refresh", is_flag=True, help="Ask the provider for each job's state now.")
@click.option(
    "--run",
    "run",
    metavar="RUN",
    help="Only the jobs of this run's pipeline (a pipeline name, signature or run id prefix).",
)
@common_options
@click.pass_context
def jobs_group(ctx: click.Context, refresh: bool, run: str | None, as_json: bool) -> None:
    """Batch jobs of offline LLM steps (OpenAILLM(offline_batch=True)), newest first: the
    provider's batch id, state, rows, counts, tokens, age, and the cost of a collected
    job (its usage at the LLM's `prices`, USD per 1M tokens; castore keeps no price
    list), or for one still running an estimate: its rows at the dollars per row its
    step cost in the latest run of its pipeline that priced it. The state is the one
    last seen by a run; --refresh asks the provider (with the key from the environment
    variable the job's LLM names). `cas resume` collects finished jobs."""
    if ctx.invoked_subcommand is not None:
        return

    app: App = ctx.obj
    store = app.store()
    name = None
    if run is not None:
        from castore.runs import resolve_run

        name = resolve_run(store, run).name
    out = _listed(store, name, refresh)
    if as_json:
        echo_json(out)
        return
    if not out:
        err(
            f"no batch jobs of pipeline {name} in this store"
            if name
            else "no batch jobs in this store"
        )
        return
    for j in out:
        counts = ", ".join(f"{k} {v}" for k, v in j["counts"].items()) or "no counts yet"
        shown = "" if j["cost_usd"] is None else f" ~${j['cost_usd']:.4f}"
        if j["cost_estimate_usd"] is not None:
            shown = f" (estimate ~${j['cost_estimate_usd']:.4f})"
        click.echo(
            f"{j['batch_id'] or '(not created)'}  {j['state']}  step {j['step']}, "
            f"{j['rows']} rows ({counts}), {j['tokens']} tokens{shown}, "
            f"{_age(j['age_seconds'])} old  [job {j['key'][:12]}]"
        )
    if any(j["cost_usd"] is None and j["state"].startswith("collected") for j in out):
        err(
            "no cost estimate for jobs whose LLM has no prices: set "
            "OpenAILLM(prices={'input': ..., 'output': ...}), USD per 1M tokens"
        )


@jobs_group.command("cancel")
@click.argument("job")
@common_options
@click.pass_obj
def cancel(app: App, job: str, as_json: bool) -> None:
    """Cancel a batch job: JOB is its batch id or a prefix of its job key. Rows it did
    not answer are asked again (in a new job) by the next run."""
    from castore import batchjobs

    store = app.store()
    found = [r for r in batchjobs.records(store) if job == r.batch_id or r.key.startswith(job)]
    rec = found[0] if len(found) == 1 else None
    if rec is None or rec.batch_id is None:
        raise click.UsageError(f"no single submitted job matches {job!r}; see `cas jobs`")
    state = batchjobs.cancel(store, rec, _llm(rec))
    if as_json:
        echo_json({"batch_id": rec.batch_id, "state": state})
    else:
        err(f"batch job {rec.batch_id}: {state}")


def _listed(store: Any, name: str | None, refresh: bool) -> list[dict[str, Any]]:
    """The records (of pipeline `name`) as `cas jobs --json` prints them."""
    from castore import batchjobs

    out: list[dict[str, Any]] = []
    runs = None
    for rec in batchjobs.records(store):
        if name is not None and name not in rec.pipelines:
            continue
        if refresh:
            rec = batchjobs.refresh(store, rec, _llm(rec))
        cost = rec.cost()
        estimate = None
        if cost is None and not rec.state.startswith("collected"):
            if runs is None:
                from castore.runs import list_runs

                runs = list_runs(store)
            estimate = _estimate(runs, rec)
        out.append(
            {
                **rec.model_dump(mode="json"),
                "age_seconds": round(batchjobs.age(rec), 1),
                "cost_usd": round(cost, 6) if cost is not None else None,
                "cost_estimate_usd": round(estimate, 6) if estimate is not None else None,
            }
        )
    return out


def _estimate(runs: list[Any], rec: Any) -> float | None:
    """A running job's cost: its rows at the dollars per computed row of its step in the
    latest run of its pipelines that priced some (None without one)."""
    for info in runs:  # newest first
        if info.name not in rec.pipelines:
            continue
        st = info.manifest.stats.get(rec.step)
        if st is not None and st.rows_computed and st.cost_spent_usd:
            return float(st.cost_spent_usd / st.rows_computed * rec.rows)
    return None


def _llm(rec: Any) -> Any:
    from castore.llms import OpenAILLM

    return OpenAILLM(model=rec.model, base_url=rec.base_url, api_key_env=rec.api_key_env)


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"
