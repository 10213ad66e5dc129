"""Shaping generated rows into fine-tuning formats: SFT (`messages`) and DPO (`chosen` /
`rejected` by rating), with the column names of distilabel's Format* steps and of the
alignment-handbook / axolotl datasets (`prompt`, `prompt_id` = SHA-256 of the prompt).

Where distilabel would emit a pair that is not one (every rating equal, so chosen and
rejected are the same generation) or crash (a rating of None, counts that disagree),
castore writes None into the pair's columns or fails the batch naming the row: a pair
nobody chose is never written as if someone had.
"""

from __future__ import annotations

import hashlib
from typing import Any, ClassVar

from castore.errors import StepFailed
from castore.pipeline.step import Step, StepInput

Message = dict[str, str]


def prompt_id(prompt: str | None) -> str | None:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest() if prompt is not None else None


def first_user_turn(messages: list[Message] | None) -> str | None:
    return next((m["content"] for m in messages or [] if m.get("role") == "user"), None)


def instruction_turns(row: dict[str, Any]) -> list[Message]:
    """The conversation that led to the generations: the system prompt (when the row has
    a non-empty one) and the instruction."""
    turns = [{"role": "user", "content": row["instruction"]}]
    system = row.get("system_prompt")
    if isinstance(system, str) and system:
        turns.insert(0, {"role": "system", "content": system})
    return turns


class _FormatDPO(Step):
    inputs: ClassVar[list[str]] = ["generations", "ratings"]
    outputs: ClassVar[list[str]] = [
        "prompt",
        "prompt_id",
        "chosen",
        "chosen_rating",
        "rejected",
        "rejected_rating",
    ]

    def _context(self, row: dict[str, Any]) -> tuple[str | None, list[Message]]:
        raise NotImplementedError

    def columns_after(self, available: set[str] | None) -> set[str] | None:
        """Its outputs, and `chosen_model` / `rejected_model` when the input has
        `generation_models`."""
        if available is None:
            return None
        models = {"chosen_model", "rejected_model"} if "generation_models" in available else set()
        return available | set(self.outputs) | models

    def process(self, inputs: StepInput) -> list[dict[str, Any]]:
        out = []
        for i, row in enumerate(inputs):
            prompt, turns = self._context(row)
            new = {**row, "prompt": prompt, "prompt_id": prompt_id(prompt)}
            pair = _pair(str(self.name), i, row)
            models = row.get("generation_models")
            for side, at in zip(("chosen", "rejected"), pair or (None, None), strict=True):
                if at is None:
                    new[side] = new[f"{side}_rating"] = None
                else:
                    answer = {"role": "assistant", "content": row["generations"][at]}
                    new[side] = [*turns, answer]
                    new[f"{side}_rating"] = row["ratings"][at]
                if "generation_models" in row:
                    new[f"{side}_model"] = models[at] if at is not None and models else None
            out.append(new)
        return out


def _pair(step: str, i: int, row: dict[str, Any]) -> tuple[int, int] | None:
    """(chosen, rejected) positions: the first highest and the first lowest rating among
    those given; None when fewer than two generations have distinct ratings."""
    gens, ratings = row["generations"] or [], row["ratings"] or []
    if len(gens) != len(ratings):
        raise StepFailed(
            f"step {step}: row {i} has {len(gens)} generations but {len(ratings)} ratings; "
            "each generation needs its rating"
        )
    rated = [(r, k) for k, r in enumerate(ratings) if r is not None]
    if len({r for r, _ in rated}) < 2:
        return None
    best = max(rated, key=lambda x: (x[0], -x[1]))[1]
    worst = min(rated, key=lambda x: (x[0], x[1]))[1]
    return best, worst


class FormatTextGenerationDPO(_FormatDPO):
    """DPO pairs from `instruction` + `generations` + `ratings` (e.g. UltraFeedback's):
    `chosen` / `rejected` are the conversation (system prompt when present, the
    instruction, then the highest / lowest rated generation), with their ratings, and
    `chosen_model` / `rejected_model` when the rows have `generation_models`."""

    inputs: ClassVar[list[str]] = ["instruction", "generations", "ratings"]

    def _context(self, row: dict[str, Any]) -> tuple[str | None, list[Message]]:
        return row["instruction"], instruction_turns(row)


class FormatChatGenerationDPO(_FormatDPO):
    """DPO pairs from `messages` + `generations` + `ratings`: `prompt` is the first user
    turn, `chosen` / `rejected` the messages followed by the highest / lowest rated
    generation."""

    inputs: ClassVar[list[str]] = ["messages", "generations", "ratings"]

    def _context(self, row: dict[str, Any]) -> tuple[str | None, list[Message]]:
        return first_user_turn(row["messages"]), list(row["messages"] or [])


class FormatTextGenerationSFT(Step):
    """SFT rows from `instruction` + `generation`: `messages` is the conversation (system
    prompt when present, the instruction, the generation)."""

    inputs: ClassVar[list[str]] = ["instruction", "generation"]
    outputs: ClassVar[list[str]] = ["prompt", "prompt_id", "messages"]

    def process(self, inputs: StepInput) -> list[dict[str, Any]]:
        return [
            {
                **row,
                "prompt": row["instruction"],
                "prompt_id": prompt_id(row["instruction"]),
                "messages": [
                    *instruction_turns(row),
                    {"role": "assistant", "content": row["generation"]},
                ],
            }
            for row in inputs
        ]


class FormatChatGenerationSFT(Step):
    """SFT rows from `messages` + `generation`: `messages` gets the generation as the
    assistant's turn; `prompt` is the first user turn."""

    inputs: ClassVar[list[str]] = ["messages", "generation"]
    outputs: ClassVar[list[str]] = ["prompt", "prompt_id", "messages"]

    def process(self, inputs: StepInput) -> list[dict[str, Any]]:
        out = []
        for row in inputs:
            prompt = first_user_turn(row["messages"])
            turns = [*(row["messages"] or []), {"role": "assistant", "content": row["generation"]}]
            out.append({**row, "prompt": prompt, "prompt_id": prompt_id(prompt), "messages": turns})
        return out
