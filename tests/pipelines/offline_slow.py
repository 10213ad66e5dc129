"""An offline LLM step (one batch job on the test server at $CASTORE_TEST_LLM_URL) next
to a slow live step: the job is pending while the slow step still works."""

from __future__ import annotations

import os
import time

from castore import Pipeline, StepInput, step
from castore.llms import OpenAILLM
from castore.steps import LoadDataFromDicts, TextGeneration


@step(inputs=["instruction"], outputs=["slow"])
def Slow(inputs: StepInput):
    time.sleep(0.1)
    return [{**r, "slow": r["instruction"].upper()} for r in inputs]


with Pipeline(name="offline-slow") as pipeline:
    load = LoadDataFromDicts(data=[{"instruction": f"question {i}"} for i in range(40)])
    gen = TextGeneration(
        llm=OpenAILLM(
            model="test-model",
            base_url=os.environ["CASTORE_TEST_LLM_URL"],
            offline_batch=True,
            timeout=5.0,
        )
    )
    load >> [gen, Slow(name="slow", input_batch_size=1)]
