"""`distilabel.models` (and `distilabel.models.llms`, `distilabel.llms`) on castore: the
OpenAI-compatible client. Other providers' classes raise ImportError saying how to reach
them through an OpenAI-compatible server."""

from __future__ import annotations

import os
from typing import Any

from pydantic import Field, model_validator

from castore.distilabel._compat import unknown
from castore.llms import OpenAILLM as _OpenAILLM

_UNSUPPORTED = {
    "structured_output": "structured output is not supported yet",
    "default_headers": "custom headers are not supported yet",
}


class OpenAILLM(_OpenAILLM):
    """distilabel's OpenAILLM: `base_url` defaults to $OPENAI_BASE_URL as there, and
    `generation_kwargs` takes `max_new_tokens` (sent as `max_tokens`)."""

    base_url: str = Field(
        default_factory=lambda: os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1")
    )

    @property
    def model_name(self) -> str:
        """distilabel's name for `model`."""
        return self.model

    def load(self) -> None:
        """distilabel's lifecycle hook: the client opens its connections on first use."""

    @model_validator(mode="before")
    @classmethod
    def _refuse(cls, data: Any) -> Any:
        """distilabel's fields castore cannot honour: an error when set, dropped when
        None (their default there)."""
        if not isinstance(data, dict):
            return data
        for name, why in _UNSUPPORTED.items():
            if data.get(name) is not None:
                raise ValueError(f"OpenAILLM({name}=...): {why}")
        return {k: v for k, v in data.items() if k not in _UNSUPPORTED}


__all__ = ["OpenAILLM"]
__getattr__ = unknown(__name__)
