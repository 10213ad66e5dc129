"""Names distilabel has and castore does not: each gets an ImportError that says what to
use instead, instead of Python's bare "cannot import name"."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

OPENAI_SERVER = (
    "castore speaks the OpenAI-compatible API: use castore.llms.OpenAILLM(model=..., "
    "base_url=...) pointed at the server that serves it, or its named forms VLLMServer, "
    "LlamaCppServer, TGIServer, OllamaServer"
)
# distilabel name -> what to do instead (per module, looked up by the name alone).
INSTEAD: dict[str, str] = {
    "InferenceEndpointsLLM": OPENAI_SERVER
    + " (TGIServer(model=..., base_url=<endpoint URL>/v1): TGI and Inference Endpoints "
    "serve /v1/chat/completions)",
    "vLLM": OPENAI_SERVER + " (run `vllm serve MODEL`, then VLLMServer(model=MODEL) or "
    "ClientvLLM(model=MODEL, base_url=http://HOST:8000/v1))",
    "LlamaCppLLM": OPENAI_SERVER + " (run llama.cpp's `llama-server`, then LlamaCppServer)",
    "TransformersLLM": OPENAI_SERVER + " (e.g. vLLM or TGI serving the model)",
    "HuggingFaceHubLLM": OPENAI_SERVER,
    "AnthropicLLM": "castore speaks the OpenAI-compatible API: run LiteLLM's proxy "
    "(`litellm --model anthropic/...`) and point OpenAILLM(base_url=...) at it",
    "AzureOpenAILLM": "use OpenAILLM(base_url=<your deployment's /openai/v1 URL>)",
    "GroqLLM": OPENAI_SERVER + " (https://api.groq.com/openai/v1)",
    "MistralLLM": OPENAI_SERVER + " (https://api.mistral.ai/v1)",
    "TogetherLLM": OPENAI_SERVER + " (https://api.together.xyz/v1)",
    "AnyscaleLLM": OPENAI_SERVER,
    "LiteLLM": "run LiteLLM's proxy server (`litellm --model ...`), which speaks the "
    "OpenAI API, and point OpenAILLM(base_url=...) at it",
    "VertexAILLM": "castore speaks the OpenAI-compatible API: Vertex AI serves one "
    "(its /openapi endpoint), or run LiteLLM's proxy in front of it",
    "CohereLLM": "castore speaks the OpenAI-compatible API: Cohere's compatibility "
    "endpoint, or LiteLLM's proxy in front of it",
    "MlxLLM": OPENAI_SERVER,
    "EmbeddingGeneration": "use castore.distilabel.steps.tasks.GenerateEmbeddings(llm=OpenAILLM("
    "model=..., base_url=...)) against a server with /v1/embeddings (vLLM, TEI, Ollama)",
    "SentenceTransformerEmbeddings": "serve the model with /v1/embeddings (TEI, vLLM) and use "
    "GenerateEmbeddings(llm=OpenAILLM(model=..., base_url=...))",
    "RayPipeline": "use castore.distilabel.pipeline.Pipeline and run(executor='ray')",
}


def unknown(module: str) -> Callable[[str], Any]:
    """A module `__getattr__` for names distilabel has and this module lacks."""

    def getattr_(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        hint = INSTEAD.get(name)
        if hint is None:
            raise ImportError(
                f"{module}.{name}: distilabel's {name} is not provided by castore "
                "(docs/migrating.md lists what is)"
            )
        raise ImportError(f"{module}.{name}: {hint}")

    return getattr_
