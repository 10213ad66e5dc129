"""`distilabel.steps.tasks.base` on castore: the base class of your own tasks."""

from __future__ import annotations

from castore.distilabel._compat import unknown
from castore.distilabel.steps.tasks.custom import Task

__all__ = ["Task"]
__getattr__ = unknown(__name__)
