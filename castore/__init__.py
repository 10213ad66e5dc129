"""castore: data pipelines over a content-addressed store."""

from castore import changes as _changes
from castore._version import __version__
from castore.changes import DiffReport, ExplainReport
from castore.distiset import Distiset
from castore.errors import CastoreError
from castore.pipeline import (
    GeneratorStep,
    GlobalStep,
    Pipeline,
    Step,
    StepInput,
    StepOutput,
    runtime_field,
    step,
)
from castore.pipeline.record import RunSummary
from castore.store import Store


def explain(
    run: str, step: str | None = None, *, against: str | None = None, cache_dir: str | None = None
) -> ExplainReport:
    """Why each step of a run was cached or computed (see castore.changes.explain)."""
    return _changes.explain(Store(cache_dir), run, step, against)


def diff(a: str, b: str, *, cache_dir: str | None = None) -> DiffReport:
    """What changed between two runs (see castore.changes.diff)."""
    return _changes.diff(Store(cache_dir), a, b)


__all__ = [
    "CastoreError",
    "Distiset",
    "GeneratorStep",
    "GlobalStep",
    "Pipeline",
    "RunSummary",
    "Step",
    "StepInput",
    "StepOutput",
    "Store",
    "__version__",
    "diff",
    "explain",
    "runtime_field",
    "step",
]
