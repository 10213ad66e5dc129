"""50 rows answered by one batch job (the Batch API) on the test server at
$CASTORE_TEST_LLM_URL, then a step after it."""

from __future__ import annotations

import os

from castore import Pipeline
from castore.llms import OpenAILLM
from castore.steps import KeepColumns, LoadDataFromDicts, TextGeneration

with Pipeline(name="offline") as pipeline:
    load = LoadDataFromDicts(data=[{"instruction": f"question {i}"} for i in range(50)])
    gen = TextGeneration(
        llm=OpenAILLM(
            model="test-model",
            base_url=os.environ["CASTORE_TEST_LLM_URL"],
            offline_batch=True,
            backoff=0.01,
            timeout=5.0,
        ),
        input_batch_size=50,
        on_error="skip",
    )
    keep = KeepColumns(columns=["instruction", "generation"])
    load >> gen >> keep
