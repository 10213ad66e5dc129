# A custom Task and a @task as distilabel 1.5's docs define them (subclass Task with
# inputs / outputs properties, format_input and format_output; or a format_output
# function whose docstring holds the prompts), with only the import word changed.
import json
from typing import Any

from castore.distilabel.models import OpenAILLM
from castore.distilabel.pipeline import Pipeline
from castore.distilabel.steps import LoadDataFromDicts
from castore.distilabel.steps.tasks import Task, task
from castore.distilabel.typing import ChatType, StepColumns


class RateReview(Task):
    """Ask for a JSON verdict on a review and keep its two fields."""

    @property
    def inputs(self) -> StepColumns:
        return {"review": True, "product": True}

    def format_input(self, input: dict[str, Any]) -> ChatType:
        return [
            {"role": "system", "content": 'Reply with JSON: {"label": ..., "score": ...}'},
            {"role": "user", "content": f"Product: {input['product']}\nReview: {input['review']}"},
        ]

    @property
    def outputs(self) -> StepColumns:
        return ["label", "score"]

    def format_output(self, output: str | None, input: dict[str, Any]) -> dict[str, Any]:
        verdict = json.loads(output)
        return {"label": verdict["label"], "score": float(verdict["score"])}


@task(inputs=["review"], outputs=["summary"])
def Summarize(output: str | None, input: dict[str, Any] | None = None) -> dict[str, Any]:
    """Summarize a review in a few words.

    ---
    system_prompt: |
        You write summaries of at most five words.
    user_message_template: |
        Summarize this review: {review}
    ---
    """
    return {"summary": output.strip() if output else None}


def build(rows, on_error="fail"):
    with Pipeline(name="rate-reviews") as pipeline:
        load = LoadDataFromDicts(data=rows)
        rate = RateReview(llm=OpenAILLM(model="judge"), input_batch_size=3, on_error=on_error)
        summarize = Summarize(llm=OpenAILLM(model="writer"), input_batch_size=3)
        load >> rate >> summarize
    return pipeline
