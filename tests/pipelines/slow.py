"""A pipeline slow enough to interrupt at chosen moments. Every computed batch of `slow`
appends a line to $CASTORE_TEST_CALLS, so tests can count paid work."""

from __future__ import annotations

import os
import time

from castore import Pipeline, StepInput, StepOutput, step
from castore.steps import KeepColumns, LoadDataFromDicts


@step(inputs=["i"], outputs=["slow"])
def Slow(inputs: StepInput, delay: float = 0.1) -> StepOutput:
    time.sleep(delay)
    calls = os.environ.get("CASTORE_TEST_CALLS")
    if calls:
        with open(calls, "a") as f:
            f.write(f"{inputs[0]['i']}\n")
    yield [{**r, "slow": r["i"] * 3} for r in inputs]


@step(inputs=["slow"], outputs=["enriched"])
def Enrich(inputs: StepInput) -> StepOutput:
    time.sleep(0.02)
    yield [{**r, "enriched": f"{r['text']}:{r['slow']}"} for r in inputs]


with Pipeline(name="slow") as pipeline:
    load = LoadDataFromDicts(data=[{"i": i, "text": f"t{i}"} for i in range(600)], batch_size=20)
    slow = Slow(input_batch_size=15, concurrency=2)
    enrich = Enrich(input_batch_size=25)
    keep = KeepColumns(columns=["i", "slow", "enriched"])
    load >> slow >> enrich >> keep
