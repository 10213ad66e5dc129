"""LLM scorers after Deita (Liu et al., 2023, "What Makes Good Data for Alignment?"):
`ComplexityScorer` scores how complex each of several instructions is, `QualityScorer`
how good each of several responses to one instruction is. The prompt wording is
castore's own.

The judge answers one "[k] Score: N" line per item. A score is taken by its item number
`k`, never by line position (a preamble line would shift every score); an item without
a well-formed line gets None, and the raw answer stays in the metadata column.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from castore.errors import PipelineError
from castore.steps.llm import _LLMTask, require_text


def parse_scores(text: str | None, n: int) -> list[float | None]:
    """Per item k (1-based): the number N of a line "[k] Score: N"; None when missing."""
    scores: list[float | None] = [None] * n
    for m in re.finditer(
        r"^\W*\[(\d+)\]\W*score\W*:\W*([0-9]+(?:\.[0-9]+)?)", text or "", re.I | re.M
    ):
        k = int(m.group(1))
        if 1 <= k <= n and scores[k - 1] is None:
            scores[k - 1] = float(m.group(2))
    return scores


class _Scorer(_LLMTask):
    outputs: ClassVar[list[str]] = ["scores", "model_name"]
    column: ClassVar[str] = ""  # the list column scored

    def ask(self, row: dict[str, Any], n: int) -> str:
        """What the judge is asked, before the numbered items."""
        raise NotImplementedError

    def conversation(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        items = row.get(self.column)
        if not isinstance(items, list) or not items:
            raise PipelineError(f"step {self.name}: {self.column!r} must be a non-empty list")
        n = len(items)
        for k, item in enumerate(items, 1):
            require_text(self.name, item, f"{self.column!r} item {k}")
        numbered = "\n".join(f"[{k}] {item}" for k, item in enumerate(items, 1))
        lines = "\n".join(f"[{k}] Score: <score>" for k in range(1, n + 1))
        user = (
            f"{self.ask(row, n)}\n\n{numbered}\n\n"
            f"Answer with exactly these lines and nothing else:\n{lines}"
        )
        return [{"role": "user", "content": user}]

    def parse(self, row: dict[str, Any], text: str | None) -> dict[str, Any]:
        return {"scores": parse_scores(text, len(row.get(self.column) or []))}


class ComplexityScorer(_Scorer):
    """Score each of `instructions` (a list) by complexity, 1 (simplest) to 6 and up:
    outputs `scores` (a float or None per instruction) and `model_name`."""

    inputs: ClassVar[list[str]] = ["instructions"]
    column: ClassVar[str] = "instructions"

    def ask(self, row: dict[str, Any], n: int) -> str:
        return (
            f"Rate how complex each of the {n} instructions below is to carry out well: "
            "1 for a trivial request, higher for ones that need more steps, knowledge, "
            "constraints or reasoning. Compare them with each other: a more demanding "
            "instruction gets a higher score."
        )


class QualityScorer(_Scorer):
    """Score each of `responses` (a list) to `instruction` by quality, 1 (poor) to 6 and
    up: outputs `scores` (a float or None per response) and `model_name`."""

    inputs: ClassVar[list[str]] = ["instruction", "responses"]
    column: ClassVar[str] = "responses"

    def ask(self, row: dict[str, Any], n: int) -> str:
        return (
            f"Rate the quality of each of the {n} responses below to the instruction: how "
            "helpful, correct, relevant, clear and detailed it is. A better response gets "
            "a higher score, starting at 1 for a useless one.\n\n"
            f"Instruction: {row.get('instruction')}"
        )
