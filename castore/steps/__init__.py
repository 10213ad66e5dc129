"""Built-in steps."""

from castore.steps.columns import (
    CombineOutputs,
    DeduplicateRows,
    ExpandColumns,
    FilterRows,
    KeepColumns,
    RenameColumns,
)
from castore.steps.llm import ChatGeneration, TextGeneration
from castore.steps.loaders import LoadDataFromDicts, LoadDataFromFileSystem, LoadDataFromHub

__all__ = [
    "ChatGeneration",
    "CombineOutputs",
    "DeduplicateRows",
    "ExpandColumns",
    "FilterRows",
    "KeepColumns",
    "LoadDataFromDicts",
    "LoadDataFromFileSystem",
    "LoadDataFromHub",
    "RenameColumns",
    "TextGeneration",
]
