"""Steps, the DAG and its signatures, batch planning and the run driver. `Pipeline` is
imported on first use, so `cas show` (which needs castore.pipeline.record) does not load
the engine.

The step names are bound here eagerly: `step` is both a function and the submodule
castore.pipeline.step, and importing the submodule would set the package attribute to
the module, which a lazy name would then never replace."""

from __future__ import annotations

from typing import TYPE_CHECKING

from castore import lazy_module
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


__getattr__, __dir__ = lazy_module(__name__, _LAZY, globals())

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
