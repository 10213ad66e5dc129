"""Built-in steps, each module imported on first use: a pipeline that loads a file does
not import the LLM client (asyncio, aiohttp)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from castore import lazy_module

if TYPE_CHECKING:
    from castore.steps.classify import TextClassification
    from castore.steps.columns import (
        CombineOutputs,
        DeduplicateRows,
        ExpandColumns,
        FilterRows,
        GroupColumns,
        KeepColumns,
        MergeColumns,
        RenameColumns,
    )
    from castore.steps.embeddings import GenerateEmbeddings
    from castore.steps.evol import EvolInstruct, EvolQuality
    from castore.steps.feedback import UltraFeedback
    from castore.steps.formatting import (
        FormatChatGenerationDPO,
        FormatChatGenerationSFT,
        FormatTextGenerationDPO,
        FormatTextGenerationSFT,
    )
    from castore.steps.instruct import SelfInstruct
    from castore.steps.llm import ChatGeneration, TextGeneration
    from castore.steps.loaders import (
        LoadDataFromDicts,
        LoadDataFromDisk,
        LoadDataFromFileSystem,
        LoadDataFromHub,
    )
    from castore.steps.magpie import Magpie, MagpieGenerator
    from castore.steps.pairs import GenerateSentencePair
    from castore.steps.prometheus import PrometheusEval
    from castore.steps.scorers import ComplexityScorer, QualityScorer

_COLUMNS, _LLM, _LOADERS = "castore.steps.columns", "castore.steps.llm", "castore.steps.loaders"
_FORMAT = "castore.steps.formatting"
_LAZY = {
    "ChatGeneration": _LLM,
    "CombineOutputs": _COLUMNS,
    "ComplexityScorer": "castore.steps.scorers",
    "DeduplicateRows": _COLUMNS,
    "EvolInstruct": "castore.steps.evol",
    "EvolQuality": "castore.steps.evol",
    "ExpandColumns": _COLUMNS,
    "FilterRows": _COLUMNS,
    "FormatChatGenerationDPO": _FORMAT,
    "FormatChatGenerationSFT": _FORMAT,
    "FormatTextGenerationDPO": _FORMAT,
    "FormatTextGenerationSFT": _FORMAT,
    "GenerateEmbeddings": "castore.steps.embeddings",
    "GenerateSentencePair": "castore.steps.pairs",
    "GroupColumns": _COLUMNS,
    "KeepColumns": _COLUMNS,
    "LoadDataFromDicts": _LOADERS,
    "LoadDataFromDisk": _LOADERS,
    "LoadDataFromFileSystem": _LOADERS,
    "LoadDataFromHub": _LOADERS,
    "Magpie": "castore.steps.magpie",
    "MagpieGenerator": "castore.steps.magpie",
    "MergeColumns": _COLUMNS,
    "PrometheusEval": "castore.steps.prometheus",
    "QualityScorer": "castore.steps.scorers",
    "RenameColumns": _COLUMNS,
    "SelfInstruct": "castore.steps.instruct",
    "TextClassification": "castore.steps.classify",
    "TextGeneration": _LLM,
    "UltraFeedback": "castore.steps.feedback",
}


__getattr__, __dir__ = lazy_module(__name__, _LAZY, globals())

__all__ = [
    "ChatGeneration",
    "CombineOutputs",
    "ComplexityScorer",
    "DeduplicateRows",
    "EvolInstruct",
    "EvolQuality",
    "ExpandColumns",
    "FilterRows",
    "FormatChatGenerationDPO",
    "FormatChatGenerationSFT",
    "FormatTextGenerationDPO",
    "FormatTextGenerationSFT",
    "GenerateEmbeddings",
    "GenerateSentencePair",
    "GroupColumns",
    "KeepColumns",
    "LoadDataFromDicts",
    "LoadDataFromDisk",
    "LoadDataFromFileSystem",
    "LoadDataFromHub",
    "Magpie",
    "MagpieGenerator",
    "MergeColumns",
    "PrometheusEval",
    "QualityScorer",
    "RenameColumns",
    "SelfInstruct",
    "TextClassification",
    "TextGeneration",
    "UltraFeedback",
]
