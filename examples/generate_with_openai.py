"""Generate answers with any OpenAI-compatible server (OpenAI, vLLM, llama.cpp, Ollama, TGI).

    OPENAI_API_KEY=... python examples/generate_with_openai.py \
        --base-url http://127.0.0.1:8000/v1 --model Qwen/Qwen2.5-0.5B-Instruct

or, through the CLI (same cache, same resume):

    CASTORE_LLM_BASE_URL=http://127.0.0.1:8000/v1 CASTORE_LLM_MODEL=my-model \
        cas run examples/generate_with_openai.py

Every row is one request; every finished batch is cached, so Ctrl+C and running again
(or `cas resume generate-with-openai`) never pays for a row twice.
"""

from __future__ import annotations

import argparse
import os

from castore import Pipeline
from castore.llms import OpenAILLM
from castore.steps import KeepColumns, LoadDataFromDicts, TextGeneration

TOPICS = [
    "photosynthesis",
    "the Roman Empire",
    "black holes",
    "compound interest",
    "the water cycle",
    "machine learning",
    "plate tectonics",
    "the immune system",
]


def build(base_url: str, model: str, rows: int = 40) -> Pipeline:
    with Pipeline(name="generate-with-openai") as pipeline:
        load = LoadDataFromDicts(
            data=[
                {"topic": TOPICS[i % len(TOPICS)], "level": ["a child", "a student"][i % 2]}
                for i in range(rows)
            ],
            batch_size=20,
        )
        generate = TextGeneration(
            llm=OpenAILLM(
                model=model,
                base_url=base_url,
                generation_kwargs={"temperature": 0.7, "max_tokens": 256, "seed": 0},
                max_concurrent_requests=16,
            ),
            system_prompt="You are a patient teacher.",
            template="Explain {{ topic }} to {{ level }} in three sentences.",
            input_batch_size=8,
            on_error="skip",
        )
        keep = KeepColumns(columns=["topic", "level", "generation", "model_name"])
        load >> generate >> keep
    return pipeline


pipeline = build(
    os.environ.get("CASTORE_LLM_BASE_URL", "http://127.0.0.1:8000/v1"),
    os.environ.get("CASTORE_LLM_MODEL", "local-model"),
)

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--base-url", default=os.environ.get("CASTORE_LLM_BASE_URL", "https://api.openai.com/v1")
    )
    ap.add_argument("--model", default=os.environ.get("CASTORE_LLM_MODEL", "gpt-4o-mini"))
    ap.add_argument("--rows", type=int, default=40)
    args = ap.parse_args()
    distiset = build(args.base_url, args.model, args.rows).run()
    print(distiset)
