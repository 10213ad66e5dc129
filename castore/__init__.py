"""castore: data pipelines over a content-addressed store."""

from castore._version import __version__
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
from castore.store import Store

__all__ = [
    "CastoreError",
    "Distiset",
    "GeneratorStep",
    "GlobalStep",
    "Pipeline",
    "Step",
    "StepInput",
    "StepOutput",
    "Store",
    "__version__",
    "runtime_field",
    "step",
]
