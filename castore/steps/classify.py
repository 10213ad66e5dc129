"""TextClassification: label each row's `text`, from a closed set of labels or freely, one
label or `n` of them. The prompt wording is castore's own; the answer is asked for as
JSON `{"labels": ...}` and read strictly: an answer that is not that JSON, a label
outside `available_labels`, or a number of labels other than `n` gives None (the raw
answer stays in the metadata column), never a label the model did not give."""

from __future__ import annotations

import json
import re
from typing import Any, ClassVar

from pydantic import Field, model_validator

from castore.steps.llm import _LLMTask, require_text

_FENCED = re.compile(r"```(?:json)?\s*(\{.*\})\s*```", re.S)


def _labels_of(text: str | None) -> Any:
    """The `labels` of an answer `{"labels": ...}` (also in a fenced block), or None."""
    if text is None:
        return None
    fenced = _FENCED.search(text)
    try:
        got = json.loads(fenced.group(1) if fenced else text.strip())
    except ValueError:
        return None
    return got.get("labels") if isinstance(got, dict) else None


def parse_labels(
    text: str | None,
    n: int,
    allowed: set[str] | None,
    default: str | list[str] | None = None,
) -> str | list[str] | None:
    """The labels of an answer `{"labels": ...}`: a string for n == 1, a list of n
    strings otherwise, each in `allowed` when given; the `default` label the model is
    told to answer when it cannot classify is taken as it is (a list for n > 1). None
    for any other answer."""
    labels = _labels_of(text)
    as_list = [default] if isinstance(default, str) else default
    if as_list is not None and labels in (default, as_list):
        return as_list if n > 1 else as_list[0]
    if n == 1 and isinstance(labels, list) and len(labels) == 1:
        labels = labels[0]
    wanted = [labels] if n == 1 else labels
    ok = (
        isinstance(wanted, list)
        and len(wanted) == n
        and all(isinstance(x, str) and x.strip() for x in wanted)
        and (allowed is None or set(wanted) <= allowed)
    )
    if not ok:
        return None
    return labels if n == 1 else list(wanted)


class TextClassification(_LLMTask):
    """Classify `text`: outputs `labels` (a str, or with `n` > 1 a list of n str) and
    `model_name`. `available_labels` (a list, or {label: description}) closes the set;
    `default_label` is what the model is told to answer for a text it cannot classify
    (a str, or a list of n); `context` and `examples` (few-shot texts) guide it;
    `query_title` names the text in the prompt."""

    inputs: ClassVar[list[str]] = ["text"]
    outputs: ClassVar[list[str]] = ["labels", "model_name"]

    system_prompt: str | None = (
        "You label texts. Answer with the labels asked for, as JSON, and nothing else."
    )
    n: int = Field(1, ge=1)
    context: str | None = (
        "Choose short labels that name what the text is mainly about: its topic, theme or category."
    )
    examples: list[str] | None = None
    available_labels: list[str] | dict[str, str] | None = None
    default_label: str | list[str] | None = "Unclassified"
    query_title: str = "User Query"

    @model_validator(mode="after")
    def _labels(self) -> TextClassification:
        if isinstance(self.default_label, list) and len(self.default_label) != self.n:
            raise ValueError(f"default_label: a list of n={self.n} labels, or one label")
        if self.available_labels is not None and not self.available_labels:
            raise ValueError("available_labels is empty: give the labels, or leave it unset")
        return self

    def allowed(self) -> set[str] | None:
        if self.available_labels is None:
            return None
        defaults = self.default_label if isinstance(self.default_label, list) else []
        single = [self.default_label] if isinstance(self.default_label, str) else []
        return {*self.available_labels, *defaults, *single}

    def conversation(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        text = require_text(self.name, row.get("text"), "'text'")
        title = self.query_title
        parts = [
            f"Classify the {title.lower()} below."
            + (
                " Give the one label that fits it best."
                if self.n == 1
                else f" Give the {self.n} labels that fit it best, best first."
            )
        ]
        if self.default_label is not None:
            parts.append(
                "If it cannot be classified (too short, ambiguous, off topic), answer "
                f"{json.dumps(self.default_label, ensure_ascii=False)}."
            )
        if self.context:
            parts.append(self.context)
        if isinstance(self.available_labels, dict):
            listed = "\n".join(f"- {k}: {v}" for k, v in self.available_labels.items())
            parts.append(f"Use only these labels (each with what it means):\n{listed}")
        elif self.available_labels is not None:
            listed = "\n".join(f"- {k}" for k in self.available_labels)
            parts.append(f"Use only these labels:\n{listed}")
        if self.examples:
            shown = "\n\n".join(f"Example {i}:\n{e}" for i, e in enumerate(self.examples, 1))
            parts.append(f"Examples of such texts:\n{shown}")
        many = [f"label {i}" for i in range(1, self.n + 1)]
        shape = '"label"' if self.n == 1 else json.dumps(many)
        parts.append(f"{title}:\n```\n{text}\n```")
        parts.append(f'Answer with this JSON only: {{"labels": {shape}}}')
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*messages, {"role": "user", "content": "\n\n".join(parts)}]

    def parse(self, row: dict[str, Any], text: str | None) -> dict[str, Any]:
        return {"labels": parse_labels(text, self.n, self.allowed(), self.default_label)}
