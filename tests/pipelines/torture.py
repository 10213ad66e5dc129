"""Fan-out, fan-in and a global step, slow enough to kill at random moments (the torture
tests). Every computed batch of `square` and `cube` sleeps a little, like a paid call."""

from __future__ import annotations

import time

from castore import Pipeline, StepInput, StepOutput, step
from castore.steps import DeduplicateRows, KeepColumns, LoadDataFromDicts


@step(inputs=["i"], outputs=["sq"])
def Square(inputs: StepInput, delay: float = 0.04) -> StepOutput:
    time.sleep(delay)
    yield [{"i": r["i"], "sq": r["i"] * r["i"]} for r in inputs]


@step(inputs=["i"], outputs=["cube", "bucket"])
def Cube(inputs: StepInput, delay: float = 0.03) -> StepOutput:
    time.sleep(delay)
    yield [{"cube": r["i"] ** 3, "bucket": r["i"] % 37} for r in inputs]


@step(inputs=["sq", "cube"], outputs=["total"])
def Total(inputs: StepInput) -> StepOutput:
    yield [{**r, "total": r["sq"] + r["cube"]} for r in inputs]


with Pipeline(name="torture") as pipeline:
    load = LoadDataFromDicts(data=[{"i": i} for i in range(480)], batch_size=30)
    square = Square(input_batch_size=12, concurrency=2)
    cube = Cube(input_batch_size=16, concurrency=2)
    total = Total(input_batch_size=40)
    dedupe = DeduplicateRows(columns=["bucket"])
    keep = KeepColumns(columns=["i", "bucket", "total"])
    load >> [square, cube] >> total >> dedupe >> keep
