"""castore: data pipelines over a content-addressed store.

The public names are imported on first use (PEP 562), so `import castore`, and every
`cas` command, loads only the modules it needs: a finished re-run or `cas ls` does not
pay for pydantic step models, pyarrow or the Distiset's `datasets`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from castore._version import __version__

if TYPE_CHECKING:
    from castore.changes import DiffReport, ExplainReport
    from castore.distiset import Distiset
    from castore.errors import CastoreError
    from castore.pipeline.pipeline import Pipeline
    from castore.pipeline.step import (
        GeneratorStep,
        GlobalStep,
        Step,
        StepInput,
        StepOutput,
        runtime_field,
        step,
    )
    from castore.store import Store
    from castore.summary import RunSummary

_LAZY = {
    "CastoreError": "castore.errors",
    "DiffReport": "castore.changes",
    "Distiset": "castore.distiset",
    "ExplainReport": "castore.changes",
    "GeneratorStep": "castore.pipeline",
    "GlobalStep": "castore.pipeline",
    "Pipeline": "castore.pipeline.pipeline",
    "RunSummary": "castore.summary",
    "Step": "castore.pipeline",
    "StepInput": "castore.pipeline",
    "StepOutput": "castore.pipeline",
    "Store": "castore.store",
    "runtime_field": "castore.pipeline",
    "step": "castore.pipeline",
}


def lazy_module(
    module: str,
    table: dict[str, str],
    namespace: dict[str, Any],
    missing: Callable[[str], Any] | None = None,
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for a package whose public names (`table`: name ->
    the module defining it) are imported on first use (PEP 562); other names go to
    `missing` (default: AttributeError)."""

    def getattr_(name: str) -> Any:
        where = table.get(name)
        if where is None:
            if missing is not None:
                return missing(name)
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where), name)
        namespace[name] = value
        return value

    def dir_() -> list[str]:
        return sorted([*namespace, *table])

    return getattr_, dir_


__getattr__, __dir__ = lazy_module(__name__, _LAZY, globals())


def explain(
    run: str, step: str | None = None, *, against: str | None = None, cache_dir: str | None = None
) -> ExplainReport:
    """Why each step of a run was cached or computed (see castore.changes.explain)."""
    from castore import changes
    from castore.store import Store

    return changes.explain(Store(cache_dir), run, step, against)


def diff(a: str, b: str, *, cache_dir: str | None = None) -> DiffReport:
    """What changed between two runs (see castore.changes.diff)."""
    from castore import changes
    from castore.store import Store

    return changes.diff(Store(cache_dir), a, b)


__all__ = [
    "CastoreError",
    "DiffReport",
    "Distiset",
    "ExplainReport",
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
