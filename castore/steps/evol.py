"""Evol-Instruct (Xu et al., 2023, "WizardLM: Empowering Large Language Models to Follow
Complex Instructions"): an LLM rewrites an instruction `num_evolutions` times, each time
by one mutation (add a constraint, deepen, concretize, more reasoning steps, a new
instruction in the same domain), optionally answering the results. The mutation
templates are castore's own wording.

Which mutation a row gets at each round is drawn from `seed`, the instruction and the
round, not from a process-wide random state: the same row evolves the same way in every
run, so its output can be reused by row key (distilabel draws afresh on every call). A
row whose request fails keeps None in its outputs and the batch is not cached; the rows
that succeeded are reused by row key on the retry.
"""

from __future__ import annotations

import random
from typing import Any

from pydantic import Field, field_validator

from castore.llms import Generation
from castore.pipeline.step import BatchIncomplete, StepInput
from castore.steps.llm import _LLMTask
from castore.store.parquet import METADATA_COLUMN

PLACEHOLDER = "<PROMPT>"
_ASK = (
    "Rewrite the instruction below into a harder version that a capable assistant can "
    "still answer and a person would understand. {how} Keep it natural; add no more than "
    "20 to 30 words. Reply with the rewritten instruction only.\n\nInstruction:\n" + PLACEHOLDER
)
MUTATIONS: dict[str, str] = {
    "constraints": _ASK.format(how="Add one more constraint or requirement to it."),
    "deepen": _ASK.format(how="Ask about the matter in more depth or breadth."),
    "concretizing": _ASK.format(how="Replace general concepts with more specific ones."),
    "increased_reasoning_steps": _ASK.format(
        how="Make it need several explicit steps of reasoning to answer."
    ),
    "breadth": (
        "Write a new instruction in the same domain as the one below, about a rarer topic, "
        "of similar length and difficulty. Reply with the new instruction only.\n\n"
        "Instruction:\n" + PLACEHOLDER
    ),
}


class EvolInstruct(_LLMTask):
    """Evolve `instruction` `num_evolutions` times: `evolved_instruction` (the last), or
    with `store_evolutions` `evolved_instructions` (each round's, the original first when
    `include_original_instruction`); with `generate_answers` also `answer` / `answers`
    (one request per instruction kept); and `model_name`."""

    inputs = ["instruction"]

    num_evolutions: int = Field(ge=1)
    store_evolutions: bool = False
    generate_answers: bool = False
    include_original_instruction: bool = False
    mutation_templates: dict[str, str] = Field(default_factory=lambda: dict(MUTATIONS))
    seed: int = 42

    @field_validator("mutation_templates")
    @classmethod
    def _templates(cls, v: dict[str, str]) -> dict[str, str]:
        if not v:
            raise ValueError("mutation_templates needs at least one template")
        bad = next((name for name, t in v.items() if PLACEHOLDER not in t), None)
        if bad is not None:
            raise ValueError(f"mutation template {bad!r} has no {PLACEHOLDER} for the instruction")
        return v

    @property
    def outputs(self) -> list[str]:  # type: ignore[override]
        names = ["evolved_instructions" if self.store_evolutions else "evolved_instruction"]
        if self.generate_answers:
            names.append("answers" if self.store_evolutions else "answer")
        return [*names, "model_name"]

    def mutation(self, instruction: str, text: str, round_: int) -> str:
        """The prompt of round `round_` for a row whose instruction is now `text`."""
        names = sorted(self.mutation_templates)
        pick = random.Random(f"{self.seed}\0{instruction}\0{round_}").choice(names)
        return self.mutation_templates[pick].replace(PLACEHOLDER, text)

    def conversation(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        """The first round's request (what `add_raw_input` shows)."""
        return [
            {"role": "user", "content": self.mutation(row["instruction"], row["instruction"], 0)}
        ]

    def process(self, inputs: StepInput) -> list[dict[str, Any]]:
        chains: list[list[str]] = [[row["instruction"]] for row in inputs]
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
            got = ask(
                {
                    i: [self.mutation(row["instruction"], chains[i][-1], r)]
                    for i, row in enumerate(inputs)
                }
            )
            for i, texts in got.items():
                chains[i] += texts
        kept = [c if self.include_original_instruction else c[1:] for c in chains]
        if not self.store_evolutions:
            kept = [c[-1:] for c in kept]
        answers = ask(dict(enumerate(kept))) if self.generate_answers else {}
        out = [
            self._evolved(row, kept[i], answers.get(i), calls[i], errors.get(i))
            for i, row in enumerate(inputs)
        ]
        if errors:
            raise BatchIncomplete(out, list(errors.values()), sorted(errors))
        return out

    def _evolved(
        self,
        row: dict[str, Any],
        kept: list[str],
        answers: list[str] | None,
        calls: list[Generation],
        error: str | None,
    ) -> dict[str, Any]:
        last = calls[-1] if calls and error is None else None
        out = self._row(row, last.text if last else None, last, error)
        usage: dict[str, int] = {}  # every round's tokens were paid
        for g in calls:
            for k, v in g.usage.items():
                if isinstance(v, int):
                    usage[k] = usage.get(k, 0) + v
        meta = dict(out[METADATA_COLUMN])
        meta[self.name or "llm"] = {
            **meta[self.name or "llm"],
            "raw_output": [g.text for g in calls],
            "usage": usage,
            "attempts": sum(g.attempts for g in calls),
        }
        out[METADATA_COLUMN] = meta
        ok = error is None
        if self.store_evolutions:
            out["evolved_instructions"] = kept if ok else None
        else:
            out["evolved_instruction"] = kept[-1] if ok and kept else None
        if self.generate_answers:
            done = answers if ok and answers is not None else None
            key = "answers" if self.store_evolutions else "answer"
            out[key] = done if self.store_evolutions or done is None else done[-1]
        return out

    def parse(self, row: dict[str, Any], text: str | None) -> dict[str, Any]:
        return {}  # the evolved columns are set from every round's answers (_evolved)
