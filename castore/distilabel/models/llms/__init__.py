"""`distilabel.models.llms` on castore."""

from __future__ import annotations

from castore.distilabel._compat import unknown
from castore.distilabel.models import ClientvLLM, OllamaLLM, OpenAILLM

__all__ = ["ClientvLLM", "OllamaLLM", "OpenAILLM"]
__getattr__ = unknown(__name__)
