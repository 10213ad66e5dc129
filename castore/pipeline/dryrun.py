"""`Pipeline.dry_run`: the first rows of every generator through every step, before
paying for the whole dataset.

The dry run is a pipeline of its own, named "<name>-dry-run", in the same store: each
generator is replaced by its first `batch_size` rows given inline, and every other step
is the same step object. So what the dry run pays for (an LLM step's answers) is cached
like any run's work, and a row-wise step reuses those rows by key in the full run; and
the full pipeline's own runs, refs and generator batches are untouched by it.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from castore.errors import ConfigError
from castore.pipeline.batch import generator_table
from castore.pipeline.calls import process_chunks
from castore.pipeline.step import CURRENT_PIPELINE, GeneratorStep

if TYPE_CHECKING:
    from castore.pipeline.pipeline import Pipeline

SUFFIX = "-dry-run"


def first_rows(step: GeneratorStep, n: int) -> list[dict[str, Any]]:
    """The generator's first `n` rows as a run would store them (output mappings
    applied), reading no further than it must."""
    rows: list[dict[str, Any]] = []
    chunks = process_chunks(step, 0)
    try:
        for chunk in chunks:
            rows.extend(generator_table(step, chunk).to_pylist())
            if len(rows) >= n:
                break
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    return rows[:n]


def dry_pipeline(pipeline: Pipeline, batch_size: int) -> Pipeline:
    """A copy of `pipeline` whose generators are their first `batch_size` rows."""
    from castore.steps import LoadDataFromDicts

    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"dry_run(batch_size={batch_size!r}): must be a whole number >= 1")
    dry = copy.copy(pipeline)
    dry.name = pipeline.name + SUFFIX
    dry.steps = dict(pipeline.steps)
    token = CURRENT_PIPELINE.set(None)  # the stand-ins join no pipeline on creation
    try:
        for name, step in pipeline.steps.items():
            if isinstance(step, GeneratorStep):
                rows = first_rows(step, batch_size)
                dry.steps[name] = LoadDataFromDicts(  # type: ignore[call-arg]
                    name=name, data=rows, batch_size=batch_size
                )
    finally:
        CURRENT_PIPELINE.reset(token)
    return dry
