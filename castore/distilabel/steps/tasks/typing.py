"""`distilabel.steps.tasks.typing` on castore (distilabel's older path of
`distilabel.typing`)."""

from __future__ import annotations

from castore.distilabel._compat import unknown
from castore.distilabel.typing import ChatType, FormattedInput

__all__ = ["ChatType", "FormattedInput"]
__getattr__ = unknown(__name__)
