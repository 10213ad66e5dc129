"""`distilabel.typing` on castore: the type names pipelines annotate with."""

from __future__ import annotations

from typing import Any

from castore.distilabel._compat import unknown
from castore.pipeline.step import StepInput, StepOutput

StepColumns = list[str] | dict[str, bool]
GeneratorStepOutput = Any  # yields (rows, last_batch) or rows
ChatType = list[dict[str, Any]]
FormattedInput = ChatType

__all__ = [
    "ChatType",
    "FormattedInput",
    "GeneratorStepOutput",
    "StepColumns",
    "StepInput",
    "StepOutput",
]
__getattr__ = unknown(__name__)
