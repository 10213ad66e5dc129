"""GenerateSentencePair: for each `anchor`, a `positive` sentence (a paraphrase, a
semantically similar sentence, a query it answers, or an answer to it) and, with
`triplet`, a `negative` one: rows for training embedding models. The prompt wording is
castore's own; the answer's "## Positive" / "## Negative" sections are read by their
headers, and a section that is missing or empty gives None (the raw answer stays in the
metadata column)."""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import model_validator

from castore.steps.llm import _LLMTask, require_text

Action = Literal["paraphrase", "semantically-similar", "query", "answer"]

_WHAT: dict[str, str] = {
    "paraphrase": "says the same as the anchor in other words",
    "semantically-similar": "means nearly the same as the anchor",
    "query": "is a search query that the anchor would answer",
    "answer": "is an answer to the anchor",
}


def parse_sections(text: str | None, names: list[str]) -> dict[str, str | None]:
    """The text after each "## Name" header of `text` (on its line or below, up to the
    next header), or None where the header is missing or its section empty."""
    out: dict[str, str | None] = dict.fromkeys(names)
    if not text:
        return out
    for name in names:
        m = re.search(
            rf"^[ \t]*##[ \t]*{name}\b[ \t]*:?(.*?)(?=^[ \t]*##|\Z)", text, re.I | re.M | re.S
        )
        body = m.group(1).strip() if m else ""
        out[name] = body or None
    return out


class GenerateSentencePair(_LLMTask):
    """From `anchor`: `positive` (and with `triplet=True`, `negative`) and `model_name`.
    `action` says what the positive is (paraphrase, semantically-similar, query,
    answer); `hard_negative` asks for a negative that looks like the anchor but is not
    related to it; `context` describes the domain."""

    inputs: ClassVar[list[str]] = ["anchor"]

    action: Action
    triplet: bool = False
    hard_negative: bool = False
    context: str = ""

    @model_validator(mode="after")
    def _negative(self) -> GenerateSentencePair:
        if self.hard_negative and not self.triplet:
            raise ValueError("hard_negative=True needs triplet=True (a negative to make hard)")
        return self

    @property
    def outputs(self) -> list[str]:  # type: ignore[override]
        return ["positive", *(["negative"] if self.triplet else []), "model_name"]

    def conversation(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        anchor = require_text(self.name, row.get("anchor"), "'anchor'")
        ask = [f"Write one sentence that {_WHAT[self.action]} (the positive)."]
        sections = ["## Positive"]
        if self.triplet:
            if self.hard_negative:
                ask.append(
                    "Then write one sentence that shares the anchor's words and shape but is "
                    "about something else, so that it is hard to tell apart (the negative)."
                )
            else:
                ask.append(
                    "Then write one sentence that may use some of the anchor's words but is "
                    "not related to it (the negative)."
                )
            sections.append("## Negative")
        if self.context:
            ask.append(f"Keep to this context: {self.context}")
        ask.append(
            "Answer with the sections "
            + " and ".join(f"`{s}`" for s in sections)
            + ", each header on its own line followed by the sentence, and nothing else."
        )
        return [
            {"role": "system", "content": " ".join(ask)},
            {"role": "user", "content": f"Anchor:\n{anchor}"},
        ]

    def parse(self, row: dict[str, Any], text: str | None) -> dict[str, Any]:
        names = ["Positive", "Negative"] if self.triplet else ["Positive"]
        got = parse_sections(text, names)
        return {name.lower(): value for name, value in got.items()}
