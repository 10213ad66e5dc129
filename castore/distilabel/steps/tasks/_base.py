"""The fields distilabel's tasks share, on castore's LLM tasks."""

from __future__ import annotations

import builtins
from typing import Any, ClassVar

from pydantic import model_validator

from castore.errors import CastoreError, PipelineError
from castore.pipeline.step import BatchIncomplete
from castore.steps.llm import _LLMTask
from castore.store.parquet import METADATA_COLUMN


class _Compat(_LLMTask):
    """Fields distilabel's tasks have: num_generations (grouped into lists with
    group_generations), add_raw_output / add_raw_input, load() / unload()."""

    num_generations: int = 1
    group_generations: bool = False
    add_raw_output: bool = True
    add_raw_input: bool = True
    # Whether several generations per row may be made of any columns (a custom Task's
    # format_output), not only `generation`.
    any_answer_columns: ClassVar[bool] = False

    @model_validator(mode="after")
    def _supported(self) -> Any:
        if self.num_generations < 1:
            raise ValueError("num_generations must be at least 1")
        several = self.num_generations != 1
        if several and not self.any_answer_columns and self.answer_columns() != ["generation"]:
            raise ValueError(f"{type(self).__name__}(num_generations=...): one answer per row")
        return self

    def answer_columns(self) -> list[str]:
        """The columns made from each answer: with group_generations, one list each."""
        return [c for c in self.outputs if c != "model_name"]

    def rows_per_input(self) -> int:
        """Generations that are rows of their own (num_generations > 1 without
        group_generations): a run gives the step each row n times, and each answer is
        reused by its own row key (the task stays row-wise)."""
        return 1 if self.group_generations else self.num_generations

    def model_post_init(self, context: Any, /) -> None:
        super().model_post_init(context)
        if self.name is None:  # made outside a pipeline: named as distilabel names it
            self.name = f"{self.default_name()}_0"

    def print(self, sample_input: list[dict[str, Any]] | None = None) -> None:
        """distilabel's `task.print()`: the conversation a row sends, each input column
        shown as <PLACEHOLDER_NAME> (or `sample_input`, a conversation, as given)."""
        if sample_input is None:
            row = {c: f"<PLACEHOLDER_{c.upper()}>" for c in self.required_columns()}
            try:
                sample_input = self.conversation(row)
            except CastoreError as e:
                raise PipelineError(
                    f"{e}; {type(self).__name__}.print() needs sample_input=[...] here"
                ) from None
        if not isinstance(sample_input, list) or not all(isinstance(m, dict) for m in sample_input):
            raise PipelineError("print(sample_input=...) takes a conversation: a list of dicts")
        for message in sample_input:
            builtins.print(f"--- {message.get('role', '')} ---\n{message.get('content', '')}")

    def process(self, inputs: Any) -> Any:
        # A generator, as distilabel's: `next(task.process(rows))` works standalone.
        n = self.num_generations
        if n == 1 or (self._in_run and self.rows_per_input() == n):  # repeated by the run
            yield super().process(inputs)
            return
        # n requests per row (one per generation); grouped, each input row gets its n
        # generations as a list, in request order.
        expanded = [row for row in inputs for _ in range(n)]
        try:
            rows = super().process(expanded)
        except BatchIncomplete as e:
            failed = sorted({i // n for i in e.failed or []})
            raise BatchIncomplete(self._grouped(e.rows, n), e.errors, failed) from None
        yield self._grouped(rows, n)

    def _grouped(self, rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
        if not self.group_generations:
            return rows
        out = []
        for start in range(0, len(rows), n):
            part = rows[start : start + n]
            first = dict(part[0])
            for col in self.answer_columns():
                first[col] = [r[col] for r in part]
            meta = dict(first[METADATA_COLUMN])
            entries = [r[METADATA_COLUMN][self.name] for r in part]
            entry = dict(entries[0])
            for key in ("raw_output", "raw_response", "error"):
                entry[key] = [e.get(key) for e in entries]
            usage: dict[str, int] = {}  # summed: the tokens of all n requests were paid
            for e in entries:
                for k, v in (e.get("usage") or {}).items():
                    if isinstance(v, int):
                        usage[k] = usage.get(k, 0) + v
            entry["usage"] = usage or None  # not {}: Parquet stores no struct without fields
            meta[self.name] = entry
            if f"raw_output_{self.name}" in meta:
                meta[f"raw_output_{self.name}"] = entry["raw_output"]
            first[METADATA_COLUMN] = meta
            out.append(first)
        return out

    def _row(self, row: dict[str, Any], text: Any, res: Any, error: Any) -> dict[str, Any]:
        out = super()._row(row, text, res, error)
        meta = dict(out[METADATA_COLUMN])
        if self.add_raw_output:
            meta[f"raw_output_{self.name}"] = text
        if self.add_raw_input:
            meta[f"raw_input_{self.name}"] = self.conversation(row)
        return {**out, METADATA_COLUMN: meta}
