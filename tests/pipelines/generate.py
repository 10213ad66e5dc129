"""A 200-row generation pipeline against the test server at $CASTORE_TEST_LLM_URL."""

from __future__ import annotations

import os

from castore import Pipeline
from castore.llms import OpenAILLM
from castore.steps import KeepColumns, LoadDataFromDicts, TextGeneration

with Pipeline(name="generate") as pipeline:
    load = LoadDataFromDicts(
        data=[{"instruction": f"question number {i}"} for i in range(200)], batch_size=50
    )
    gen = TextGeneration(
        llm=OpenAILLM(
            model="test-model",
            base_url=os.environ["CASTORE_TEST_LLM_URL"],
            generation_kwargs={"temperature": 0.0, "max_tokens": 64},
            max_concurrent_requests=4,
            backoff=0.01,
            timeout=5.0,
        ),
        system_prompt="Answer briefly.",
        input_batch_size=10,
        concurrency=2,
        on_error="skip",
    )
    keep = KeepColumns(columns=["instruction", "generation", "model_name"])
    load >> gen >> keep
