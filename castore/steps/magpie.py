"""Magpie (Xu et al., 2024, "Magpie: Alignment Data Synthesis from Scratch by Prompting
Aligned LLMs with Nothing"): an aligned model, given only its chat template up to the
start of a user turn, writes a user instruction; asked as a chat, it answers it.

The instruction comes from a raw completion (`/v1/completions`, so the server applies no
chat template of its own) of the *pre-query* text: the chat template's opening, the
system turn when there is one, the turns so far, then the header of a user turn. The
answer comes from an ordinary chat completion. Templates are named ("llama3": Llama 3's
header tokens; "qwen2": ChatML) or given as the pre-query text itself (one turn, no
system prompt: castore cannot render turns into an unknown template).

Not row-wise: the rows a Magpie step sees are often all alike (or empty), and each must
get its own sample, so batches are keyed by position as any batch-keyed step's.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, Field, model_validator

from castore.errors import PipelineError
from castore.llms import Generation, OpenAILLM
from castore.pipeline.step import (
    CURRENT_PIPELINE,
    BatchIncomplete,
    GeneratorStep,
    Step,
    StepInput,
    runtime_field,
)
from castore.steps.llm import require_text
from castore.store.parquet import METADATA_COLUMN

# (chat opening, a turn's text with {role} and {content}, the opening of a user turn)
TEMPLATES: dict[str, tuple[str, str, str]] = {
    "llama3": (
        "<|begin_of_text|>",
        "<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",
        "<|start_header_id|>user<|end_header_id|>\n\n",
    ),
    "qwen2": ("", "<|im_start|>{role}\n{content}<|im_end|>\n", "<|im_start|>user\n"),
}
_NAME_LIKE = re.compile(r"[A-Za-z0-9_.\-]+")  # a template name, not a template's text
# A model that goes on past its turn writes these; the instruction ends before them.
END_MARKERS = ("<|eot_id|>", "<|im_end|>", "<|start_header_id|>", "<|im_start|>")


def pre_query(template: str, conversation: list[dict[str, str]]) -> str:
    """The text a model continues with a user instruction: `conversation` (system and
    earlier turns) in `template`, then the opening of a user turn."""
    if template not in TEMPLATES:
        if conversation:
            raise PipelineError(
                "a custom pre_query_template cannot hold a system prompt or earlier turns; "
                "use 'llama3' or 'qwen2'"
            )
        return template
    start, turn, user = TEMPLATES[template]
    return start + "".join(turn.format(**m) for m in conversation) + user


def clean_instruction(text: str | None) -> str | None:
    """The instruction the model wrote: up to any end-of-turn marker, trimmed; None when
    nothing is left (a failed sample, never an empty instruction)."""
    if text is None:
        return None
    for marker in END_MARKERS:
        text = text.split(marker, 1)[0]
    return text.strip() or None


class _MagpieFields(BaseModel):
    """What Magpie and MagpieGenerator share: the model, the template and the shape of
    the conversation, checked when the step is made."""

    llm: OpenAILLM
    pre_query_template: str = Field(
        "llama3", description="'llama3', 'qwen2', or the pre-query text itself."
    )
    n_turns: int = Field(1, ge=1, description="User/assistant turns per conversation.")
    end_with_user: bool = Field(False, description="End with the last user turn, unanswered.")
    include_system_prompt: bool = Field(False, description="Keep the system turn in output.")
    only_instruction: bool = Field(False, description="Only the first user instruction.")
    system_prompt: str | None = None

    @model_validator(mode="after")
    def _check(self) -> Any:
        template = self.pre_query_template
        if template not in TEMPLATES and (not template.strip() or _NAME_LIKE.fullmatch(template)):
            # A mistyped name ("llama-3") would otherwise be sent as the prompt itself.
            raise ValueError(
                f"unknown pre_query_template {template!r}: use "
                f"{' or '.join(map(repr, TEMPLATES))}, or give the pre-query text itself "
                "(the chat template's opening up to a user turn)"
            )
        if self.pre_query_template not in TEMPLATES and (
            self.n_turns > 1 or self.system_prompt is not None
        ):
            raise ValueError(
                "a custom pre_query_template gives one turn without a system prompt; "
                "use 'llama3' or 'qwen2' for more"
            )
        return self

    @property
    def outputs(self) -> list[str]:
        if self.only_instruction:
            return ["instruction", "model_name"]
        if self.n_turns == 1:
            return ["instruction", "response", "model_name"]
        return ["conversation", "model_name"]


class Magpie(_MagpieFields, Step):  # type: ignore[override]  # outputs is a property
    """Per input row, a conversation of `n_turns` user/assistant turns written by `llm`
    from nothing but its chat template (`pre_query_template`). Outputs `instruction`
    (only_instruction), `instruction` and `response` (one turn), or `conversation` (a list
    of {role, content}); and `model_name`. A `system_prompt` column, else the field,
    steers the topic."""

    input_batch_size: int = runtime_field(32, ge=1, description="Rows per input batch.")

    def process(self, inputs: StepInput) -> list[dict[str, Any]]:
        rows = [dict(r) for r in inputs]
        system = [r.get("system_prompt", self.system_prompt) for r in rows]
        for s in system:  # a number or a list sent as the system turn would be paid for
            if s is not None:
                require_text(self.name, s, "system_prompt")
        convs: list[list[dict[str, str]]] = [
            [{"role": "system", "content": s}] if s else [] for s in system
        ]
        errors: dict[int, str] = {}
        usage: list[dict[str, int]] = [{} for _ in rows]
        turns = 1 if self.only_instruction else self.n_turns
        for turn in range(turns):
            live = [i for i in range(len(rows)) if i not in errors]
            asked = self.llm.complete([pre_query(self.pre_query_template, convs[i]) for i in live])
            for i, res in zip(live, asked, strict=True):
                text = clean_instruction(res.text) if isinstance(res, Generation) else None
                if text is None or not isinstance(res, Generation):
                    errors[i] = _error(res, "the model wrote no instruction")
                    continue
                _add_usage(usage[i], res)
                convs[i].append({"role": "user", "content": text})
            last = turn == turns - 1
            if self.only_instruction or (last and self.end_with_user):
                break
            live = [i for i in range(len(rows)) if i not in errors]
            answers = self.llm.generate([convs[i] for i in live])
            for i, res in zip(live, answers, strict=True):
                if not isinstance(res, Generation) or res.text is None:
                    errors[i] = _error(res, "no answer")
                    continue
                _add_usage(usage[i], res)
                convs[i].append({"role": "assistant", "content": res.text})
        out = [
            self._row(row, convs[i], usage[i], errors.get(i), bool(system[i]))
            for i, row in enumerate(rows)
        ]
        if errors:
            raise BatchIncomplete(out, list(errors.values()), sorted(errors))
        return out

    def _row(
        self,
        row: dict[str, Any],
        conv: list[dict[str, str]],
        usage: dict[str, int],
        error: str | None,
        has_system: bool,
    ) -> dict[str, Any]:
        turns = conv[1:] if has_system else conv
        meta = dict(row.get(METADATA_COLUMN) or {})
        meta[self.name or "magpie"] = {"usage": usage or None, "error": error}  # None, not {}
        failed = error is not None
        out: dict[str, Any] = dict(row)
        if "conversation" in self.outputs:
            out["conversation"] = (
                None if failed else (conv if self.include_system_prompt else turns)
            )
        else:
            out["instruction"] = None if failed else turns[0]["content"]
            if "response" in self.outputs:
                out["response"] = None if failed else turns[1]["content"]
        return {**out, "model_name": self.llm.model, METADATA_COLUMN: meta}


class MagpieGenerator(_MagpieFields, GeneratorStep):  # type: ignore[override]
    """`num_rows` Magpie samples from nothing, `batch_size` per batch: as a loader of
    `num_rows` empty rows followed by Magpie (its fields are Magpie's). `num_rows` is
    part of the step's identity: another count is another dataset."""

    num_rows: int = Field(ge=1, description="Rows to generate.")

    def _magpie(self) -> Magpie:
        fields = {k: getattr(self, k) for k in _MagpieFields.model_fields}
        token = CURRENT_PIPELINE.set(None)  # a helper, not a step of the pipeline
        try:
            return Magpie(name=self.name, **fields)
        finally:
            CURRENT_PIPELINE.reset(token)

    def process(self, offset: int = 0) -> Any:
        magpie = self._magpie()
        for start in range(offset, self.num_rows, self.batch_size):
            n = min(self.batch_size, self.num_rows - start)
            # A failed sample fails the generator's batch: the run stops there and a
            # resume asks again from this batch (generator batches cannot be partial).
            yield magpie.process([{} for _ in range(n)])


def _error(res: Any, what: str) -> str:
    if isinstance(res, BaseException):
        return f"{type(res).__name__}: {res}"
    return what


def _add_usage(into: dict[str, int], res: Generation) -> None:
    for k, v in (res.usage or {}).items():
        if isinstance(v, int):
            into[k] = into.get(k, 0) + v


__all__ = ["Magpie", "MagpieGenerator", "pre_query"]
