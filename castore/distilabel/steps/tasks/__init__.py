"""`distilabel.steps.tasks` on castore: TextGeneration, ChatGeneration, UltraFeedback,
SelfInstruct, EvolInstruct, EvolQuality, ComplexityScorer, QualityScorer, PrometheusEval,
TextClassification, GenerateSentencePair,
GenerateEmbeddings, Magpie and MagpieGenerator with distilabel's fields, and `Task` /
`@task` for your own (castore/distilabel/steps/tasks/custom.py). Jinja2
templates as distilabel's (sandboxed, a missing variable is an error); `add_raw_output`
/ `add_raw_input` write `raw_output_<step>` / `raw_input_<step>` into the metadata
column. What castore cannot do yet is an error."""

from __future__ import annotations

from typing import Any

from pydantic import model_validator

from castore.distilabel._compat import unknown
from castore.distilabel.steps.tasks._base import _Compat
from castore.distilabel.steps.tasks.custom import Task, task
from castore.errors import PipelineError
from castore.steps.classify import TextClassification as _TextClassification
from castore.steps.embeddings import GenerateEmbeddings
from castore.steps.evol import EvolInstruct as _EvolInstruct
from castore.steps.evol import EvolQuality as _EvolQuality
from castore.steps.feedback import UltraFeedback as _UltraFeedback
from castore.steps.instruct import SelfInstruct as _SelfInstruct
from castore.steps.llm import ChatGeneration as _ChatGeneration
from castore.steps.llm import TextGeneration as _TextGeneration
from castore.steps.magpie import Magpie as _Magpie
from castore.steps.magpie import MagpieGenerator as _MagpieGenerator
from castore.steps.pairs import GenerateSentencePair as _GenerateSentencePair
from castore.steps.prometheus import PrometheusEval as _PrometheusEval
from castore.steps.scorers import ComplexityScorer as _ComplexityScorer
from castore.steps.scorers import QualityScorer as _QualityScorer


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


class TextClassification(_Compat, _TextClassification):
    """TextClassification with distilabel's fields (n, context, examples,
    available_labels, default_label, query_title) and outputs (`labels`, `model_name`);
    castore's prompt, and an answer read strictly (None unless it is the JSON asked for,
    with labels from available_labels)."""


class GenerateSentencePair(_Compat, _GenerateSentencePair):
    """GenerateSentencePair with distilabel's fields (action, triplet, hard_negative,
    context) and outputs (`positive`, with triplet `negative`, `model_name`); castore's
    prompt, and each section read by its header (None when missing)."""


class ChatGeneration(_Compat, _ChatGeneration):
    """distilabel's ChatGeneration: a `messages` column is the conversation."""


class UltraFeedback(_Compat, _UltraFeedback):
    """UltraFeedback with distilabel's task fields and columns per aspect; castore's
    prompt is its own (the paper's aspects, types and 1-5 scale)."""


class SelfInstruct(_Compat, _SelfInstruct):
    """SelfInstruct with distilabel's fields and outputs (`instructions`, `model_name`);
    castore's prompt, and only the numbered lines of the answer are instructions."""


class EvolInstruct(_Compat, _EvolInstruct):
    """EvolInstruct with distilabel's fields and outputs; castore's mutation templates,
    and each row's mutations drawn from `seed` and the row (the same in every run)."""


class EvolQuality(_Compat, _EvolQuality):
    """EvolQuality with distilabel's fields and outputs; castore's mutation templates
    (each must contain <PROMPT> and <RESPONSE>), drawn per row as EvolInstruct's."""


class PrometheusEval(_Compat, _PrometheusEval):
    """PrometheusEval with distilabel's fields (mode, rubric, rubrics, reference) and
    outputs (`feedback`, `result`, `model_name`); castore's prompt and rubric wording."""


class ComplexityScorer(_Compat, _ComplexityScorer):
    """ComplexityScorer with distilabel's fields and outputs (`scores`, `model_name`);
    castore's prompt, scores taken by item number."""


class QualityScorer(_Compat, _QualityScorer):
    """QualityScorer with distilabel's fields and outputs (`scores`, `model_name`);
    castore's prompt, scores taken by item number."""


def _template_from_llm(data: Any) -> Any:
    """distilabel sets Magpie's pre-query template on the LLM; castore's Magpie has it
    as its own field (part of its identity), taken from there."""
    if not isinstance(data, dict):
        return data
    if isinstance(data.get("system_prompt"), (list, dict)):
        raise ValueError(
            "Magpie(system_prompt=<list or dict>): castore does not draw a system prompt at "
            "random; give the prompts as a system_prompt column (one per row) instead"
        )
    if "pre_query_template" in data:
        return data
    template = getattr(data.get("llm"), "magpie_pre_query_template", None)
    if template is None:
        raise ValueError(
            "Magpie needs the model's chat template: set magpie_pre_query_template='llama3' "
            "or 'qwen2' (or the pre-query text) on the LLM"
        )
    return {**data, "pre_query_template": template}


class Magpie(_Magpie):
    """distilabel's Magpie: the pre-query template comes from the LLM's
    `magpie_pre_query_template`; `system_prompt` is one text (a list or dict to draw from
    is an error: give the prompts as a `system_prompt` column instead)."""

    @model_validator(mode="before")
    @classmethod
    def _from_llm(cls, data: Any) -> Any:
        return _template_from_llm(data)


class MagpieGenerator(_MagpieGenerator):
    """distilabel's MagpieGenerator(llm=..., num_rows=...), template from the LLM."""

    @model_validator(mode="before")
    @classmethod
    def _from_llm(cls, data: Any) -> Any:
        return _template_from_llm(data)


__all__ = [
    "ChatGeneration",
    "ComplexityScorer",
    "EvolInstruct",
    "EvolQuality",
    "GenerateEmbeddings",
    "GenerateSentencePair",
    "Magpie",
    "MagpieGenerator",
    "PrometheusEval",
    "QualityScorer",
    "SelfInstruct",
    "Task",
    "TextClassification",
    "TextGeneration",
    "UltraFeedback",
    "task",
]
__getattr__ = unknown(__name__)
