"""Two pipelines that share their first two steps (`load`, `embed`), for dedupe and
concurrency tests. Every computed batch of `embed` appends a line to $CASTORE_TEST_CALLS."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from castore import Pipeline, StepInput, StepOutput, step
from castore.steps import LoadDataFromDicts

DELAY = float(os.environ.get("CASTORE_TEST_DELAY", "0.05"))

# `cas run` loads this file by path; the repo root makes the shared test helper importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.pipelines import record_call  # noqa: E402


@step(inputs=["i"], outputs=["emb"], ignore_env=["CASTORE_TEST_CALLS"])
def Embed(inputs: StepInput, delay: float = 0.05) -> StepOutput:
    time.sleep(delay)
    record_call(inputs[0]["i"])
    yield [{**r, "emb": [r["i"], r["i"] * 2]} for r in inputs]


@step(inputs=["emb"], outputs=["label"])
def Label(inputs: StepInput, prefix: str = "a") -> StepOutput:
    yield [{**r, "label": f"{prefix}{r['emb'][1]}"} for r in inputs]


def make(name: str, prefix: str) -> Pipeline:
    with Pipeline(name=name) as p:
        load = LoadDataFromDicts(data=[{"i": i} for i in range(400)], batch_size=40)
        embed = Embed(input_batch_size=10, concurrency=2, delay=DELAY)
        label = Label(prefix=prefix, input_batch_size=40)
        load >> embed >> label
    return p


pipeline_a = make("shared-a", "a")
pipeline_b = make("shared-b", "b")
