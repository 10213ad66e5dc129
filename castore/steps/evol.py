"""Evol-Instruct (Xu et al., 2023, "WizardLM: Empowering Large Language Models to Follow
Complex Instructions") and Evol-Quality (Liu et al., 2023, Deita): an LLM rewrites an
instruction (or a response to one) `num_evolutions` times, each time by one mutation
(add a constraint, deepen, concretize, ...), optionally answering the evolved
instructions. The mutation templates are castore's own wording.

Which mutation a row gets at each round is drawn from `seed`, the row's input and the
round, not from a process-wide random state: the same row evolves the same way in every
run, so its output can be reused by row key (distilabel draws afresh on every call). A
row whose request fails keeps None in its outputs and the batch is not cached; the rows
that succeeded are reused by row key on the retry.
"""

from __future__ import annotations

import random
from typing import Any, ClassVar

from pydantic import Field, model_validator

from castore.llms import Generation
from castore.pipeline.step import BatchIncomplete, StepInput
from castore.steps.llm import _LLMTask, require_text
from castore.store.parquet import METADATA_COLUMN

PROMPT, RESPONSE = "<PROMPT>", "<RESPONSE>"
_HARDER = (
    "Rewrite the instruction below into a harder version that a capable assistant can "
    "still answer and a person would understand. {how} Keep it natural; add no more than "
    "20 to 30 words. Reply with the rewritten instruction only.\n\nInstruction:\n" + PROMPT
)
MUTATIONS: dict[str, str] = {
    "constraints": _HARDER.format(how="Add one more constraint or requirement to it."),
    "deepen": _HARDER.format(how="Ask about the matter in more depth or breadth."),
    "concretizing": _HARDER.format(how="Replace general concepts with more specific ones."),
    "increased_reasoning_steps": _HARDER.format(
        how="Make it need several explicit steps of reasoning to answer."
    ),
    "breadth": (
        "Write a new instruction in the same domain as the one below, about a rarer topic, "
        "of similar length and difficulty. Reply with the new instruction only.\n\n"
        "Instruction:\n" + PROMPT
    ),
}
_BETTER = (
    "Improve the response below to the instruction. {how} Keep what is right in it and "
    "do not pad it. Reply with the improved response only.\n\nInstruction:\n"
    + PROMPT
    + "\n\nResponse:\n"
    + RESPONSE
)
QUALITY_MUTATIONS: dict[str, str] = {
    "helpfulness": _BETTER.format(how="Make it more helpful to the person who asked."),
    "relevance": _BETTER.format(how="Make it more relevant: answer exactly what is asked."),
    "deepen": _BETTER.format(how="Make it go deeper into the subject."),
    "creativity": _BETTER.format(how="Make it more creative and engaging."),
    "details": _BETTER.format(how="Add the details that make it more useful."),
}


class _Evolve(_LLMTask):
    """Rounds of rewrites of one column, a mutation drawn per row and round."""

    evolved: ClassVar[str]  # the column evolved (its first value is the row's)
    placeholders: ClassVar[tuple[str, ...]] = (PROMPT,)

    num_evolutions: int = Field(ge=1)
    store_evolutions: bool = False
    mutation_templates: dict[str, str]
    seed: int = 42

    @model_validator(mode="after")
    def _templates(self) -> _Evolve:
        if not self.mutation_templates:
            raise ValueError("mutation_templates needs at least one template")
        for name, text in self.mutation_templates.items():
            missing = [p for p in self.placeholders if p not in text]
            if missing:
                raise ValueError(f"mutation template {name!r} has no {missing[0]}")
        return self

    def mutation(self, row: dict[str, Any], text: str, round_: int) -> str:
        """The prompt of round `round_` for a row whose evolved column is now `text`."""
        names = sorted(self.mutation_templates)
        pick = random.Random(f"{self.seed}\0{row[self.evolved]}\0{round_}").choice(names)
        return self.fill(self.mutation_templates[pick], row, text)

    def fill(self, template: str, row: dict[str, Any], text: str) -> str:
        return template.replace(PROMPT, text)

    def conversation(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        """The first round's request (what `add_raw_input` shows)."""
        return [{"role": "user", "content": self.mutation(row, row[self.evolved], 0)}]

    @property
    def keeps_original(self) -> bool:
        return False

    def kept(self, chain: list[str]) -> list[str]:
        """The texts written out of a row's chain (its first element is the input)."""
        texts = chain if self.keeps_original else chain[1:]
        return texts if self.store_evolutions else texts[-1:]

    def answers_for(self, kept: list[str]) -> list[str] | None:
        """Prompts to answer after the rounds (EvolInstruct's generate_answers)."""
        return None

    def columns(self, kept: list[str] | None, answers: list[str] | None) -> dict[str, Any]:
        """`evolved_<column>s` (every kept text) or `evolved_<column>` (the last)."""
        if self.store_evolutions:
            return {f"evolved_{self.evolved}s": kept}
        return {f"evolved_{self.evolved}": kept[-1] if kept else None}

    def process(self, inputs: StepInput) -> list[dict[str, Any]]:
        chains = [[require_text(self.name, row[self.evolved], self.evolved)] for row in inputs]
        calls: list[list[Generation]] = [[] for _ in inputs]
        errors: dict[int, str] = {}

        def ask(asks: dict[int, list[str]]) -> dict[int, list[str]]:
            """One request per prompt, for every row still alive: the texts by row."""
            order = [(i, p) for i, prompts in asks.items() if i not in errors for p in prompts]
            convs = [[{"role": "user", "content": p}] for _, p in order]
            got: dict[int, list[str]] = {i: [] for i, _ in order}
            for (i, _), res in zip(order, self.llm.generate(convs), strict=True):
                if not isinstance(res, Generation) or res.text is None:
                    errors.setdefault(i, f"{type(res).__name__}: {res}")
                    continue
                calls[i].append(res)
                got[i].append(res.text.strip())
            return got

        for r in range(self.num_evolutions):
            prompts = {i: [self.mutation(row, chains[i][-1], r)] for i, row in enumerate(inputs)}
            for i, texts in ask(prompts).items():
                chains[i] += texts
        kept = [self.kept(c) for c in chains]
        wanted = {i: a for i, k in enumerate(kept) if (a := self.answers_for(k)) is not None}
        answers = ask(wanted) if wanted else {}
        out = []
        for i, row in enumerate(inputs):
            ok = i not in errors
            res = calls[i][-1] if calls[i] and ok else None
            new = self._row(row, res.text if res else None, res, errors.get(i))
            self._sum_calls(new, calls[i])
            new.update(self.columns(kept[i] if ok else None, answers.get(i) if ok else None))
            out.append(new)
        if errors:
            raise BatchIncomplete(out, list(errors.values()), sorted(errors))
        return out

    def _sum_calls(self, out: dict[str, Any], calls: list[Generation]) -> None:
        """The row's metadata entry covers every request it made (each was paid)."""
        usage: dict[str, int] = {}
        for g in calls:
            for k, v in g.usage.items():
                if isinstance(v, int):
                    usage[k] = usage.get(k, 0) + v
        meta = dict(out[METADATA_COLUMN])
        name = self.name or "llm"
        meta[name] = {
            **meta[name],
            "raw_output": [g.text for g in calls],
            "usage": usage or None,  # not {}: Parquet stores no struct without fields
            "attempts": sum(g.attempts for g in calls),
        }
        out[METADATA_COLUMN] = meta

    def parse(self, row: dict[str, Any], text: str | None) -> dict[str, Any]:
        return {}  # the columns come from every round's answers (`columns`)


class EvolInstruct(_Evolve):
    """Evolve `instruction` `num_evolutions` times: `evolved_instruction` (the last), or
    with `store_evolutions` `evolved_instructions` (each round's, the original first when
    `include_original_instruction`); with `generate_answers` also `answer` / `answers`
    (one request per instruction kept); and `model_name`."""

    inputs: ClassVar[list[str]] = ["instruction"]
    evolved: ClassVar[str] = "instruction"

    generate_answers: bool = False
    include_original_instruction: bool = False
    mutation_templates: dict[str, str] = Field(default_factory=lambda: dict(MUTATIONS))

    @property
    def outputs(self) -> list[str]:  # type: ignore[override]
        names = ["evolved_instructions" if self.store_evolutions else "evolved_instruction"]
        if self.generate_answers:
            names.append("answers" if self.store_evolutions else "answer")
        return [*names, "model_name"]

    @property
    def keeps_original(self) -> bool:
        return self.include_original_instruction

    def answers_for(self, kept: list[str]) -> list[str] | None:
        return kept if self.generate_answers else None

    def columns(self, kept: list[str] | None, answers: list[str] | None) -> dict[str, Any]:
        out = super().columns(kept, answers)
        if self.generate_answers:
            if self.store_evolutions:
                out["answers"] = answers
            else:
                out["answer"] = answers[-1] if answers else None
        return out


class EvolQuality(_Evolve):
    """Improve `response` to `instruction` `num_evolutions` times: `evolved_response` (the
    last), or with `store_evolutions` `evolved_responses` (each round's, the original
    first when `include_original_response`); and `model_name`."""

    inputs: ClassVar[list[str]] = ["instruction", "response"]
    evolved: ClassVar[str] = "response"
    placeholders: ClassVar[tuple[str, ...]] = (PROMPT, RESPONSE)

    include_original_response: bool = False
    mutation_templates: dict[str, str] = Field(default_factory=lambda: dict(QUALITY_MUTATIONS))

    @property
    def outputs(self) -> list[str]:  # type: ignore[override]
        return ["evolved_responses" if self.store_evolutions else "evolved_response", "model_name"]

    def fill(self, template: str, row: dict[str, Any], text: str) -> str:
        # The response last: a response that happens to contain "<PROMPT>" stays as it is.
        return template.replace(PROMPT, row["instruction"]).replace(RESPONSE, text)

    @property
    def keeps_original(self) -> bool:
        return self.include_original_response
