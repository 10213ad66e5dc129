"""Steps, the DAG and its signatures, batch planning and the run driver."""

from castore.pipeline.pipeline import Pipeline
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
