"""UltraFeedback-style rating (Cui et al., 2023, "UltraFeedback: Boosting Language Models
with High-quality Feedback"): an LLM judge rates each of several responses to one
instruction on one aspect, 1 to 5, with a short rationale. The prompt wording is
castore's own; the aspects and the 1-5 scale are the paper's.

An answer is parsed per response ("Text k rating:" / "Text k rationale:" lines); a
response whose lines are missing or malformed gets None, never a guessed value, and the
raw answer stays in the metadata column, so the row is kept and can be inspected.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from castore.errors import PipelineError
from castore.steps.llm import _LLMTask

Aspect = Literal[
    "helpfulness", "honesty", "instruction-following", "truthfulness", "overall-rating"
]

# What the judge looks at, per aspect (castore's wording of the paper's criteria).
ASPECTS: dict[str, str] = {
    "helpfulness": (
        "how useful and informative each text is for the task: correct, relevant, clear, "
        "complete without padding"
    ),
    "honesty": (
        "whether each text is honest about what it knows: it states uncertainty where the "
        "answer is uncertain and does not assert made-up facts with confidence"
    ),
    "instruction-following": (
        "how closely each text does what the instruction asks, in content, form and any "
        "stated restrictions"
    ),
    "truthfulness": (
        "whether each text is free of hallucination: no facts that are false, no details "
        "that contradict the instruction or the text itself"
    ),
    "overall-rating": (
        "overall quality: helpfulness, honesty, instruction following and truthfulness together"
    ),
}

# The aspects whose judge also names the kinds of what it saw in each text (the paper's
# informativeness and hallucination types; castore's wording), 1-3.
TYPES: dict[str, str] = {
    "helpfulness": (
        "the kinds of informativeness each text shows: 1 = clear and relevant to the task, "
        "2 = useful and comprehensive information, 3 = concise (not lengthy, no repetition)"
    ),
    "truthfulness": (
        "the kinds of hallucination in each text: 1 = contradicts what is known about the "
        "world (a factual error), 2 = contradicts the instruction or its input, 3 = "
        "contradicts itself (a logical error)"
    ),
}

SYSTEM = (
    "You are a careful, impartial judge of AI assistants' answers. You rate each answer "
    "on its own merits, 1 (poor) to 5 (excellent), and explain each rating briefly."
)


class UltraFeedback(_LLMTask):
    """Rate `generations` (a list of responses) to `instruction` on `aspect`: outputs
    `ratings` (list of 1-5 or None per response) and `rationales` (list of str or None),
    plus `model_name` of the judge. For "helpfulness" and "truthfulness" (as distilabel):
    `types` (per response the first kind named, 1-3, or None when it names none),
    `rationales` (why those kinds), `ratings` and `rationales-for-ratings`. Row-wise: a
    row judged once is not paid again."""

    inputs: ClassVar[list[str]] = ["instruction", "generations"]

    aspect: Aspect = "overall-rating"

    @property
    def outputs(self) -> list[str]:  # type: ignore[override]
        if self.aspect in TYPES:
            return ["types", "rationales", "ratings", "rationales-for-ratings", "model_name"]
        return ["ratings", "rationales", "model_name"]

    def conversation(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        generations = row.get("generations")
        if not isinstance(generations, list) or not generations:
            raise PipelineError(
                f"step {self.name}: 'generations' must be a non-empty list of responses "
                "(e.g. GroupColumns(columns=['generation'], output_columns=['generations']))"
            )
        n = len(generations)
        texts = "\n\n".join(f"<text {k}>\n{g}\n</text {k}>" for k, g in enumerate(generations, 1))
        typed = self.aspect in TYPES
        lines = "\n".join(
            (
                f"Text {k} type: <the numbers that apply, separated by commas, or None>\n"
                f"Text {k} type rationale: <one sentence>\n"
                if typed
                else ""
            )
            + f"Text {k} rating: <1-5>\nText {k} rationale: <one or two sentences>"
            for k in range(1, n + 1)
        )
        kinds = f" First name {TYPES[self.aspect]}." if typed else ""
        user = (
            f"Judge {n} response(s) to the instruction below on {ASPECTS[self.aspect]}."
            f"{kinds}\n\n"
            f"<instruction>\n{row.get('instruction')}\n</instruction>\n\n{texts}\n\n"
            f"Answer with exactly these lines and nothing else:\n{lines}"
        )
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]

    def parse(self, row: dict[str, Any], text: str | None) -> dict[str, Any]:
        n = len(row.get("generations") or [])
        ratings, rationales = parse_ratings(text, n)
        if self.aspect not in TYPES:
            return {"ratings": ratings, "rationales": rationales}
        types, why = parse_types(text, n)
        return {
            "types": types,
            "rationales": why,
            "ratings": ratings,
            "rationales-for-ratings": rationales,
        }


def parse_types(text: str | None, n: int) -> tuple[list[int | None], list[str | None]]:
    """Per response k: "Text k type: 1, 3" (the first of the kinds named, as distilabel
    keeps it; "None" or anything outside 1-3 gives None) and "Text k type rationale"."""
    types: list[int | None] = [None] * n
    why: list[str | None] = [None] * n
    for k in range(1, n + 1):
        m = re.search(rf"^\W*text {k} type\W*:\W*([0-9]+)\b", text or "", re.I | re.M)
        if m and 1 <= int(m.group(1)) <= 3:
            types[k - 1] = int(m.group(1))
        why[k - 1] = _line(text, rf"text {k} type rationale")
    return types, why


def _line(text: str | None, label: str) -> str | None:
    """The text after "<label>:" on its line (markdown emphasis around either stripped)."""
    m = re.search(rf"^\W*{label}\W*:[\s*_]*(.+?)[\s*_]*$", text or "", re.I | re.M)
    return m.group(1).strip() if m and m.group(1).strip() else None


def parse_ratings(text: str | None, n: int) -> tuple[list[int | None], list[str | None]]:
    """Per response k: "Text k rating: R" (R an integer 1-5) and "Text k rationale: ...".
    Anything else for a response (missing, out of range, "N/A") gives None there."""
    ratings: list[int | None] = [None] * n
    rationales: list[str | None] = [None] * n
    if not text:
        return ratings, rationales
    for k in range(1, n + 1):
        m = re.search(rf"^\W*text {k} rating\W*:\W*([0-9]+)\b", text, re.I | re.M)
        if m and 1 <= int(m.group(1)) <= 5:
            ratings[k - 1] = int(m.group(1))
        # Markdown emphasis around the label or the text ("**Text 1 rationale:** ...").
        rationales[k - 1] = _line(text, rf"text {k} rationale")
    return ratings, rationales
