"""Built-in steps."""

from castore.steps.columns import (
    CombineOutputs,
    DeduplicateRows,
    ExpandColumns,
    FilterRows,
    KeepColumns,
    RenameColumns,
)
from castore.steps.loaders import LoadDataFromDicts, LoadDataFromFileSystem, LoadDataFromHub

__all__ = [
    "CombineOutputs",
    "DeduplicateRows",
    "ExpandColumns",
    "FilterRows",
    "KeepColumns",
    "LoadDataFromDicts",
    "LoadDataFromFileSystem",
    "LoadDataFromHub",
    "RenameColumns",
]
