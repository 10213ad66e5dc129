"""`distilabel.steps.tasks` on castore: TextGeneration and ChatGeneration with
distilabel's fields. Jinja2 templates as distilabel's (sandboxed, a missing variable is
an error); `add_raw_output` / `add_raw_input` write `raw_output_<step>` /
`raw_input_<step>` into the metadata column. What castore cannot do yet is an error."""

from __future__ import annotations

from typing import Any

from pydantic import model_validator

from castore.distilabel._compat import unknown
from castore.errors import PipelineError
from castore.steps.llm import ChatGeneration as _ChatGeneration
from castore.steps.llm import TextGeneration as _TextGeneration
from castore.steps.llm import _LLMTask
from castore.store.parquet import METADATA_COLUMN


class _Compat(_LLMTask):
    """Fields distilabel's tasks have; the values castore cannot honour are refused."""

    num_generations: int = 1
    group_generations: bool = False
    add_raw_output: bool = True
    add_raw_input: bool = True

    @model_validator(mode="after")
    def _supported(self) -> Any:
        if self.num_generations != 1 or self.group_generations:
            raise ValueError(
                "num_generations > 1 / group_generations are not supported yet: add one "
                "task per generation and combine them (CombineOutputs)"
            )
        return self

    def model_post_init(self, context: Any, /) -> None:
        super().model_post_init(context)
        if self.name is None:  # made outside a pipeline: named as distilabel names it
            self.name = f"{self.default_name()}_0"

    def load(self) -> None:
        """distilabel's lifecycle hook: castore's tasks hold no resources to load."""

    def unload(self) -> None:
        """See `load`."""

    def process(self, inputs: Any) -> Any:
        # A generator, as distilabel's: `next(task.process(rows))` works standalone.
        yield super().process(inputs)

    def _row(self, row: dict[str, Any], text: Any, res: Any, error: Any) -> dict[str, Any]:
        out = super()._row(row, text, res, error)
        meta = dict(out[METADATA_COLUMN])
        if self.add_raw_output:
            meta[f"raw_output_{self.name}"] = text
        if self.add_raw_input:
            meta[f"raw_input_{self.name}"] = self.conversation(row)
        return {**out, METADATA_COLUMN: meta}


class TextGeneration(_Compat, _TextGeneration):
    """distilabel's TextGeneration: `template` (Jinja2) over `columns` (default
    "instruction"), `system_prompt`. `columns` must be exactly the template's variables'
    superset: a template variable not in `columns` is an error, as in distilabel."""

    columns: str | list[str] = "instruction"
    use_system_prompt: bool = True

    @model_validator(mode="after")
    def _columns(self) -> TextGeneration:
        if not self.use_system_prompt:
            raise ValueError(
                "use_system_prompt=False: leave system_prompt unset instead (distilabel "
                "deprecated this field)"
            )
        return self

    def required_columns(self) -> list[str]:
        cols = [self.columns] if isinstance(self.columns, str) else list(self.columns)
        used = super().required_columns()
        extra = [c for c in used if c not in cols]
        if extra:
            raise PipelineError(
                f"step {self.name}: its template uses {extra[0]!r}, which is not in "
                f"columns={cols}: add it to columns"
            )
        return cols


class ChatGeneration(_Compat, _ChatGeneration):
    """distilabel's ChatGeneration: a `messages` column is the conversation."""


__all__ = ["ChatGeneration", "TextGeneration"]
__getattr__ = unknown(__name__)
