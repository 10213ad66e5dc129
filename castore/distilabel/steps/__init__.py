"""`distilabel.steps` on castore: the step base classes, `@step`, the loaders and the
column steps. Unnamed steps get distilabel's names (`keep_columns_0`) in a
castore.distilabel Pipeline."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any

from pydantic import BaseModel, Field

from castore import lazy_module
from castore.distilabel._compat import unknown
from castore.distilabel.typing import GeneratorStepOutput, StepColumns
from castore.pipeline.batch import chunk_rows
from castore.pipeline.step import GeneratorStep, GlobalStep, Step, StepInput, StepOutput, _Step
from castore.pipeline.step import step as _step
from castore.steps import _COLUMNS, _FORMAT, _LAZY, _LOADERS

# castore's column, formatting and loader steps, under distilabel's path (its LLM tasks
# are in .tasks, with distilabel's fields): one table, castore.steps', imported on first use.
_HERE = {name: where for name, where in _LAZY.items() if where in (_COLUMNS, _FORMAT, _LOADERS)}


class StepResources(BaseModel):
    """distilabel's StepResources. `replicas` becomes the step's `concurrency` (calls of
    `process` at once; threads share one `load()`); `cpus`, `gpus`, `memory` (bytes) and
    custom `resources` are reserved per batch on Ray, and any other executor refuses them
    rather than run without them."""

    replicas: int = Field(1, ge=1)
    cpus: float | None = None
    gpus: float | None = None
    memory: int | None = None
    resources: dict[str, float] | None = None

    def as_step_fields(self) -> dict[str, Any]:
        ray = {
            k: v
            for k, v in (("num_cpus", self.cpus), ("num_gpus", self.gpus), ("memory", self.memory))
            if v is not None
        }
        ray.update(self.resources or {})
        fields: dict[str, Any] = {"resources": ray or None}
        if self.replicas != 1:
            fields["concurrency"] = self.replicas
        return fields


def _names(columns: StepColumns | None) -> list[str]:
    """distilabel's columns: a list, or {column: required?} (optional ones not checked)."""
    if isinstance(columns, dict):
        return [c for c, required in columns.items() if required]
    return list(columns or [])


def step(
    inputs: StepColumns | None = None,
    outputs: StepColumns | None = None,
    step_type: str = "normal",
) -> Callable[[Callable[..., Any]], type[_Step]]:
    """distilabel's `@step`. Its generator functions take only their parameters (no
    offset) and may yield `(rows, last_batch)`: castore resumes a generator at a row
    offset, so the rows before it are skipped here."""
    make = _step(_names(inputs), _names(outputs), step_type)  # type: ignore[arg-type]

    def decorate(func: Callable[..., Any]) -> type[_Step]:
        sig = inspect.signature(func)
        if step_type != "generator" or next(iter(sig.parameters), None) == "offset":
            return make(func)

        def generate(offset: int = 0, **params: Any) -> Iterator[list[dict[str, Any]]]:
            seen = 0
            for chunk in func(**params):
                rows = list(chunk_rows(chunk))
                start, seen = max(0, offset - seen), seen + len(rows)
                if rows[start:]:
                    yield rows[start:]

        offset = inspect.Parameter("offset", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=0)
        generate.__signature__ = sig.replace(  # type: ignore[attr-defined]
            parameters=[offset, *sig.parameters.values()]
        )
        for attr in ("__name__", "__qualname__", "__module__", "__doc__"):
            setattr(generate, attr, getattr(func, attr))
        cls = make(generate)
        cls._code_target = lambda self: func  # type: ignore[method-assign]  # its code version
        return cls

    return decorate


__all__ = [
    "GeneratorStep",
    "GeneratorStepOutput",
    "GlobalStep",
    "Step",
    "StepInput",
    "StepOutput",
    "StepResources",
    "step",
]
__all__ += sorted(_HERE)
__getattr__, __dir__ = lazy_module(__name__, _HERE, globals(), unknown(__name__))
