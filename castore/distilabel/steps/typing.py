"""`distilabel.steps.typing` on castore (distilabel's older path of `distilabel.typing`)."""

from __future__ import annotations

from castore.distilabel._compat import unknown
from castore.distilabel.typing import GeneratorStepOutput, StepColumns, StepOutput

__all__ = ["GeneratorStepOutput", "StepColumns", "StepOutput"]
__getattr__ = unknown(__name__)
