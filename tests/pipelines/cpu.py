"""A CPU-bound pipeline with no imports beyond castore, for the executor tests: Ray
workers receive its step classes by value."""

from __future__ import annotations

import hashlib
import os
import time

from castore import Pipeline, StepInput, StepOutput, step
from castore.steps import KeepColumns, LoadDataFromDicts

ROWS = int(os.environ.get("CASTORE_TEST_ROWS", "400"))


@step(inputs=["text"], outputs=["digest"])
def Digest(inputs: StepInput, rounds: int = 200, delay: float = 0.05) -> StepOutput:
    time.sleep(delay)
    out = []
    for row in inputs:
        h = row["text"].encode()
        for _ in range(rounds):
            h = hashlib.sha256(h).digest()
        out.append({**row, "digest": h.hex()})
    yield out


with Pipeline(name="cpu") as pipeline:
    load = LoadDataFromDicts(
        data=[{"i": i, "text": f"row {i}"} for i in range(ROWS)], batch_size=50
    )
    digest = Digest(input_batch_size=20, concurrency=2)
    keep = KeepColumns(columns=["i", "digest"])
    load >> digest >> keep
