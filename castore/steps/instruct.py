"""Self-Instruct (Wang et al., 2023, "Self-Instruct: Aligning Language Models with
Self-Generated Instructions"): from one input (a topic, a document, a seed text) an LLM
writes `num_instructions` queries a user of an application might ask. The prompt wording
is castore's own.

The answer is a numbered list; the instructions are its numbered lines, in order, at most
`num_instructions`. A line that is not numbered (a preamble, a closing remark) is not an
instruction, and an answer without a numbered line gives an empty list, with the raw
answer in the metadata column.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from pydantic import Field

from castore.steps.llm import _LLMTask


def parse_numbered(text: str | None, limit: int) -> list[str]:
    """The items of a numbered list ("1. ...", "2) ..."), in order, at most `limit`."""
    found = re.findall(r"^\s*\**\d+[.)]\**\s+(.+?)\s*$", text or "", re.M)
    return [item for item in found if item][:limit]


class SelfInstruct(_LLMTask):
    """Write `num_instructions` queries about `input` for `application_description`,
    following `criteria_for_query_generation`: outputs `instructions` (a list of str) and
    `model_name`."""

    inputs: ClassVar[list[str]] = ["input"]
    outputs: ClassVar[list[str]] = ["instructions", "model_name"]

    num_instructions: int = Field(5, ge=1)
    criteria_for_query_generation: str = Field(
        "Each query is self-contained, specific and answerable from the input; the queries "
        "differ from each other in wording, intent and difficulty.",
        description="What makes a good query.",
    )
    application_description: str = "AI assistant"

    def conversation(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        n = self.num_instructions
        user = (
            f"You write queries that users of this application might send: "
            f"{self.application_description}.\n"
            f"Criteria: {self.criteria_for_query_generation}\n\n"
            f"Write {n} queries about the input below, as a numbered list (1. to {n}.), "
            "one query per line, and nothing else.\n\n"
            f"Input:\n{row.get('input')}"
        )
        return [{"role": "user", "content": user}]

    def parse(self, row: dict[str, Any], text: str | None) -> dict[str, Any]:
        return {"instructions": parse_numbered(text, self.num_instructions)}
