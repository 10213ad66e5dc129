"""LLM tasks: every row is one chat-completion request, and every cached batch is money
not spent again."""

from __future__ import annotations

import json
from typing import Any, ClassVar

from pydantic import model_validator

from castore import jobctx
from castore.errors import LLMUnusable, PipelineError, StepFailed
from castore.llms import Generation, OpenAILLM, Prices
from castore.pipeline.step import BatchIncomplete, Step, StepInput, runtime_field
from castore.store.parquet import METADATA_COLUMN
from castore.templates import render, template_columns


def require_text(step: str | None, value: Any, what: str) -> str:
    """`value` when it is text; else the batch fails, saying so: a prompt with "None" in
    it would be paid for and answer nothing that was asked."""
    if not isinstance(value, str):
        raise StepFailed(
            f"step {step}: {what} is {value!r}, not text; drop such rows first, e.g. "
            "FilterRows(column=..., op='not_null')"
        )
    return value


class AnswerUnusable(Exception):
    """Raised by a task's `parse` when an answer cannot be made into the step's columns
    (a distilabel Task's `format_output` raised): the row fails, as a failed request
    does, so its None columns are never cached as its answer; the answer stays in the
    metadata column, and a retry or the next run asks again for that row alone."""


# OpenAI's Batch API takes at most 50,000 requests per job.
OFFLINE_BATCH_ROWS = 50_000


class _LLMTask(Step):
    """Shared by the tasks: send one conversation per row, write the generation, the
    model name and per-row metadata (raw response, usage, error)."""

    outputs: ClassVar[list[str]] = ["generation", "model_name"]
    row_wise: ClassVar[bool] = True  # one request per row: a row answered once is never paid again

    llm: OpenAILLM
    # Runtime-only like every step's batch size (the signature already has it): a batch
    # size in the fingerprint would change every row key of the step with it.
    input_batch_size: int = runtime_field(32, ge=1, description="Rows per input batch.")

    @model_validator(mode="after")
    def _one_job(self) -> _LLMTask:
        """An offline step's batch is one provider job: unless the batch size was chosen,
        the provider's limit of requests per job, so a run's missing rows are one job."""
        if self.llm.offline_batch and "input_batch_size" not in self.model_fields_set:
            # Not an assignment: that would validate again and mark the field as chosen.
            object.__setattr__(self, "input_batch_size", OFFLINE_BATCH_ROWS)
        return self

    def prices(self) -> Prices | None:
        return self.llm.prices

    def conversation(self, row: dict[str, Any]) -> list[dict[str, Any]]:  # pragma: no cover
        raise NotImplementedError

    def process(self, inputs: StepInput) -> list[dict[str, Any]]:
        conversations = [self.conversation(row) for row in inputs]
        if self.llm.offline_batch:  # one provider batch job for these rows (batchjobs.py)
            from castore import batchjobs

            results = batchjobs.generate(self.llm, self.name or "llm", conversations)
        else:
            try:
                results = self.llm.generate(conversations)
            except LLMUnusable as e:  # the run stops: name the step
                raise type(e)(f"step {self.name}: {e}") from None
        out, errors, failed = [], [], []
        for i, (row, res) in enumerate(zip(inputs, results, strict=True)):
            if isinstance(res, Generation):
                try:
                    out.append(self._row(row, res.text, res, None))
                    continue
                except AnswerUnusable as e:  # paid for: kept in the metadata, row failed
                    answers = jobctx.ANSWERS.get()
                    if answers is not None and res.answer_token is not None:
                        answers.retract(res.answer_token)  # the next run asks again
                    errors.append(
                        f"{e} (the answer is kept in {METADATA_COLUMN}; on_error='skip' goes "
                        "on with None for such rows, and the next run asks for them again)"
                    )
                    out.append(self._row(row, res.text, res, errors[-1]))
            else:
                errors.append(f"{type(res).__name__}: {res}")
                out.append(self._row(row, None, None, errors[-1]))
            failed.append(i)
        if errors:
            raise BatchIncomplete(out, errors, failed)
        return out

    def _row(
        self, row: dict[str, Any], text: str | None, res: Generation | None, error: str | None
    ) -> dict[str, Any]:
        """The output row, with this step's entry in the metadata column; with an
        `error`, the step's columns are those of no answer (the raw `text` is kept)."""
        meta = dict(row.get(METADATA_COLUMN) or {})
        meta[self.name or "llm"] = {
            "raw_output": text,
            # The whole response as JSON text: its shape varies between servers, and a
            # string keeps the column's Arrow type stable.
            "raw_response": json.dumps(res.raw, ensure_ascii=False) if res else None,
            # None, not {}: Parquet cannot store a struct without fields (a server that
            # reports no usage, a failed request)
            "usage": (res.usage or None) if res else None,
            "attempts": res.attempts if res else 0,
            "error": error,
        }
        parsed = self.parse(row, None if error else text)
        return {**row, **parsed, "model_name": self.llm.model, METADATA_COLUMN: meta}

    def parse(self, row: dict[str, Any], text: str | None) -> dict[str, Any]:
        """The output columns made from the answer (None when the request failed)."""
        return {"generation": text}


class TextGeneration(_LLMTask):
    """`template` (Jinja2 over the row's columns, as distilabel's; default
    "{{ instruction }}") as the user message, with an optional `system_prompt`."""

    inputs: ClassVar[list[str]] = ["instruction"]

    system_prompt: str | None = None
    template: str = "{{ instruction }}"

    def required_columns(self) -> list[str]:
        """The columns the template reads (checked at build time, and the row keys)."""
        try:
            return template_columns(self.template)
        except PipelineError as e:
            raise PipelineError(f"step {self.name}: {e}") from None

    def conversation(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        try:
            content = render(self.template, row)
        except PipelineError as e:
            raise PipelineError(f"step {self.name}: {e}") from None
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*messages, {"role": "user", "content": content}]


class ChatGeneration(_LLMTask):
    """A `messages` column (a list of {role, content}) is the conversation."""

    inputs: ClassVar[list[str]] = ["messages"]

    def conversation(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        messages = row.get("messages")
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in messages
        ):
            raise PipelineError(
                f"step {self.name}: 'messages' must be a list of {{role, content}} dicts"
            )
        return [{"role": m["role"], "content": m["content"]} for m in messages]
