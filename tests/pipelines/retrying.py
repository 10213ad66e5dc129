"""A slow pipeline whose middle step fails once on one batch and is retried: a warning is
logged while the progress bars are live ($CASTORE_TEST_FLAG: the file that marks the
failure as done)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from castore import Pipeline, StepInput, StepOutput, step
from castore.steps import LoadDataFromDicts

FLAG = Path(os.environ["CASTORE_TEST_FLAG"])


@step(inputs=["x"], outputs=["y"])
def FlakyOnce(inputs: StepInput) -> StepOutput:
    time.sleep(0.05)
    if inputs[0]["x"] == 50 and not FLAG.exists():
        FLAG.write_text("failed once")
        raise RuntimeError("a transient failure on purpose")
    yield [{**r, "y": r["x"] * 2} for r in inputs]


with Pipeline(name="retrying-with-a-rather-long-pipeline-name") as pipeline:
    load = LoadDataFromDicts(data=[{"x": i} for i in range(200)], batch_size=10)
    load >> FlakyOnce(
        name="a_step_with_a_name_longer_than_twenty_characters",
        input_batch_size=10,
        max_retries=2,
        retry_backoff=0.05,
    )
