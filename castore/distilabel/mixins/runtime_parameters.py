"""`distilabel.mixins.runtime_parameters` on castore: `RuntimeParameter[T]` marks a
field set at run time (`run(parameters=...)`, `--param`). In castore every field can be
set that way; this alias keeps distilabel's annotations valid (the value is optional)."""

from __future__ import annotations

from typing import Any, TypeVar

from castore.distilabel._compat import unknown

T = TypeVar("T")


class _RuntimeParameter:
    def __class_getitem__(cls, item: Any) -> Any:
        return item | None


RuntimeParameter = _RuntimeParameter

__all__ = ["RuntimeParameter"]
__getattr__ = unknown(__name__)
