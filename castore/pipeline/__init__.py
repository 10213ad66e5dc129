"""Steps, the DAG and its signatures, batch planning and the run driver. `Pipeline` is
imported on first use, so `cas show` (which needs castore.pipeline.record) does not load
the engine.

The step names are bound here eagerly: `step` is both a function and the submodule
castore.pipeline.step, and importing the submodule would set the package attribute to
the module, which a lazy name would then never replace."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from castore import lazy_attribute
from castore.pipeline.step import (
    GeneratorStep,
    GlobalStep,
    Step,
    StepInput,
    StepOutput,
    runtime_field,
    sample_n_steps,
    step,
)

if TYPE_CHECKING:
    from castore.pipeline.pipeline import Pipeline

_LAZY = {"Pipeline": "castore.pipeline.pipeline"}


def __getattr__(name: str) -> Any:
    value = lazy_attribute(__name__, _LAZY, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "GeneratorStep",
    "GlobalStep",
    "Pipeline",
    "Step",
    "StepInput",
    "StepOutput",
    "runtime_field",
    "sample_n_steps",
    "step",
]
