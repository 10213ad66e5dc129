"""A row-wise paid step over a jsonl file ($CASTORE_TEST_DATA), slow enough to kill: every
row it computes appends a line to $CASTORE_TEST_CALLS. A batch takes 50 ms, or
$CASTORE_TEST_ROW_SECONDS per row it computes."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from castore import Pipeline, StepInput, StepOutput, step
from castore.steps import KeepColumns, LoadDataFromFileSystem

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.pipelines import record_call


@step(
    inputs=["text"],
    outputs=["answer"],
    row_wise=True,
    ignore_env=["CASTORE_TEST_ROW_SECONDS", "CASTORE_TEST_CALLS"],  # timing, counting
)
def Answer(inputs: StepInput) -> StepOutput:
    per_row = os.environ.get("CASTORE_TEST_ROW_SECONDS")  # else a batch costs 50 ms
    time.sleep(float(per_row) * len(inputs) if per_row else 0.05)
    for r in inputs:
        record_call(r["text"])
    yield [{**r, "answer": r["text"][::-1]} for r in inputs]


with Pipeline(name="rowwise") as pipeline:
    load = LoadDataFromFileSystem(data_files=os.environ["CASTORE_TEST_DATA"], batch_size=40)
    answer = Answer(input_batch_size=15, concurrency=2)
    load >> answer >> KeepColumns(columns=["id", "text", "answer"])
