"""A pipeline slow enough to interrupt at chosen moments. Every computed batch of `slow`
appends a line to $CASTORE_TEST_CALLS, so tests can count paid work."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from castore import Pipeline, StepInput, StepOutput, step
from castore.steps import KeepColumns, LoadDataFromDicts

# `cas run` loads this file by path; the repo root makes the shared test helper importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.pipelines import record_call


@step(inputs=["i"], outputs=["slow"], ignore_env=["CASTORE_TEST_CALLS"])
def Slow(inputs: StepInput, delay: float = 0.1) -> StepOutput:
    time.sleep(delay)
    record_call(inputs[0]["i"])
    yield [{**r, "slow": r["i"] * 3} for r in inputs]


@step(inputs=["slow"], outputs=["enriched"])
def Enrich(inputs: StepInput) -> StepOutput:
    time.sleep(0.02)
    yield [{**r, "enriched": f"{r['text']}:{r['slow']}"} for r in inputs]


with Pipeline(name="slow") as pipeline:
    # `pad` makes each batch's input big enough that slow's and enrich's objects extend
    # their input (castore/store/extend.py, MIN_BASE_BYTES): kills are tested on those too.
    rows = [{"i": i, "text": f"t{i}", "pad": f"{i:04d}" * 300} for i in range(600)]
    load = LoadDataFromDicts(data=rows, batch_size=20)
    slow = Slow(input_batch_size=15, concurrency=2)
    enrich = Enrich(input_batch_size=25)
    keep = KeepColumns(columns=["i", "slow", "enriched"])
    load >> slow >> enrich >> keep
