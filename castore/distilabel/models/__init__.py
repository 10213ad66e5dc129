"""`distilabel.models` (and `distilabel.models.llms`, `distilabel.llms`) on castore: the
OpenAI-compatible client. Other providers' classes raise ImportError saying how to reach
them through an OpenAI-compatible server."""

from __future__ import annotations

import os
from typing import Any

from pydantic import Field, model_validator

from castore.distilabel._compat import unknown
from castore.llms import OllamaServer, VLLMServer
from castore.llms import OpenAILLM as _OpenAILLM

_UNSUPPORTED = {
    "default_headers": "custom headers are not supported yet",
}


class _DistilabelLLM(_OpenAILLM):
    """What every distilabel LLM has: `model_name`, `load()`, and the Magpie pre-query
    template (read by the Magpie task, whose identity it becomes)."""

    magpie_pre_query_template: str | None = Field(
        None, description="'llama3', 'qwen2' or the pre-query text, for Magpie."
    )
    use_magpie_template: bool = False

    @property
    def model_name(self) -> str:
        """distilabel's name for `model`."""
        return self.model

    def load(self) -> None:
        """distilabel's lifecycle hook: the client opens its connections on first use."""

    @model_validator(mode="after")
    def _magpie_only_in_magpie(self) -> Any:
        if self.use_magpie_template:
            raise ValueError(
                "use_magpie_template=True: castore makes Magpie samples with the Magpie "
                "task only (castore.distilabel.steps.tasks.Magpie); drop it here"
            )
        return self


class OpenAILLM(_DistilabelLLM):
    """distilabel's OpenAILLM: `base_url` defaults to $OPENAI_BASE_URL as there, and
    `generation_kwargs` takes `max_new_tokens` (sent as `max_tokens`)."""

    base_url: str = Field(
        default_factory=lambda: os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1")
    )

    @model_validator(mode="before")
    @classmethod
    def _refuse(cls, data: Any) -> Any:
        """distilabel's fields castore cannot honour: an error when set, dropped when
        None (their default there). distilabel's `structured_output={"schema": X}` is
        castore's `structured_output=X`."""
        if not isinstance(data, dict):
            return data
        for name, why in _UNSUPPORTED.items():
            if data.get(name) is not None:
                raise ValueError(f"OpenAILLM({name}=...): {why}")
        out = {k: v for k, v in data.items() if k not in _UNSUPPORTED}
        if out.pop("offline_batch_generation_block_until_done", None) is not None:
            raise ValueError(
                "OpenAILLM(offline_batch_generation_block_until_done=...): castore never "
                "blocks on a batch job; the run ends `waiting` and `cas resume` collects it"
            )
        if "use_offline_batch_generation" in out:  # distilabel's name for it
            out["offline_batch"] = bool(out.pop("use_offline_batch_generation"))
        if isinstance(out.get("structured_output"), dict) and "schema" in out["structured_output"]:
            out["structured_output"] = _instructor_schema(out["structured_output"])
        return out


def _instructor_schema(spec: dict[str, Any]) -> Any:
    """The schema of distilabel's {"schema": ..., "format": "json", "mode": ...,
    "max_retries": ...}; what castore would not honour is refused, not dropped."""
    extra = set(spec) - {"schema", "format"}
    if extra:
        raise ValueError(
            f"OpenAILLM(structured_output=...): {', '.join(sorted(extra))} not supported; "
            "castore always asks with response_format json_schema, validates every answer "
            "and asks again up to OpenAILLM(max_retries=...)"
        )
    if spec.get("format", "json") != "json":
        raise ValueError(
            f"OpenAILLM(structured_output=...): format {spec['format']!r} not supported; "
            "only 'json' (a JSON schema or a pydantic model)"
        )
    return spec["schema"]


# The server class first: a field's default comes from the first base that has it.
class ClientvLLM(VLLMServer, _DistilabelLLM):
    """distilabel's ClientvLLM: a vLLM server's OpenAI-compatible API at `base_url`. The
    server applies the model's chat template, so `tokenizer` is not taken."""

    @model_validator(mode="before")
    @classmethod
    def _refuse_tokenizer(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("tokenizer") not in (None, data.get("model")):
            raise ValueError(
                "ClientvLLM(tokenizer=...): castore sends chat messages and the vLLM server "
                "applies the served model's chat template; drop tokenizer"
            )
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k not in ("tokenizer", "tokenizer_revision")}
        return data


class OllamaLLM(OllamaServer, _DistilabelLLM):
    """distilabel's OllamaLLM: `host` (default http://localhost:11434) is Ollama's
    server, reached through its OpenAI-compatible /v1 API."""

    @model_validator(mode="before")
    @classmethod
    def _host(cls, data: Any) -> Any:
        if isinstance(data, dict) and "host" in data:
            data = dict(data)
            host = data.pop("host")
            if host is not None:
                data["base_url"] = str(host).rstrip("/") + "/v1"
        return data


__all__ = ["ClientvLLM", "OllamaLLM", "OpenAILLM"]
__getattr__ = unknown(__name__)
