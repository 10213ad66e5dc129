"""Embeddings from any OpenAI-compatible `/v1/embeddings` endpoint (OpenAI, vLLM, TEI,
Ollama, llama.cpp's server): one request per batch, a vector per row. Row-wise: a text
embedded once is not paid for again, whatever the batch it comes in."""

from __future__ import annotations

from typing import Any, ClassVar

from castore.errors import LLMUnusable
from castore.llms import LLMError, OpenAILLM
from castore.pipeline.step import BatchIncomplete, Step, StepInput, runtime_field
from castore.steps.llm import require_text
from castore.store.parquet import METADATA_COLUMN


class GenerateEmbeddings(Step):
    """`embedding` (a list of floats) of each row's `text` by `llm` (an embedding model,
    e.g. OpenAILLM(model="text-embedding-3-small")), and `model_name`. A batch whose
    request fails after its retries keeps its rows with None and is not cached."""

    inputs: ClassVar[list[str]] = ["text"]
    outputs: ClassVar[list[str]] = ["embedding", "model_name"]
    row_wise: ClassVar[bool] = True

    llm: OpenAILLM
    input_batch_size: int = runtime_field(32, ge=1, description="Rows per input batch.")

    def process(self, inputs: StepInput) -> list[dict[str, Any]]:
        texts = [
            require_text(self.name, row["text"], f"row {i}'s text") for i, row in enumerate(inputs)
        ]
        try:
            got = self.llm.embed(texts)
        except LLMUnusable as e:  # nothing answers there: the run stops, as a chat step's
            raise type(e)(f"step {self.name}: the LLM server at {self.llm.base_url}: {e}") from None
        except LLMError as e:
            rows = [self._row(row, None, str(e), {}, 0) for row in inputs]
            raise BatchIncomplete(rows, [str(e)], list(range(len(rows)))) from None
        return [
            # The batch's usage goes on its first row, so a sum over rows is what was paid.
            self._row(row, vec, None, got.raw_usage if i == 0 else {}, got.attempts)
            for i, (row, vec) in enumerate(zip(inputs, got.vectors, strict=True))
        ]

    def _row(
        self,
        row: dict[str, Any],
        vector: list[float] | None,
        error: str | None,
        usage: dict[str, Any],
        attempts: int,
    ) -> dict[str, Any]:
        meta = dict(row.get(METADATA_COLUMN) or {})
        entry = {"usage": usage or None, "attempts": attempts, "error": error}  # None, not {}
        meta[self.name or "embeddings"] = entry
        return {**row, "embedding": vector, "model_name": self.llm.model, METADATA_COLUMN: meta}
