"""`distilabel.distiset` on castore."""

from __future__ import annotations

from castore.distilabel._compat import unknown
from castore.distiset import Distiset, create_distiset

__all__ = ["Distiset", "create_distiset"]
__getattr__ = unknown(__name__)
