"""Step classes importable by module path, for runs started from Python and resumed by
`cas resume` from their stored pipeline.yaml."""

from __future__ import annotations

from castore import Step, StepInput
from tests.pipelines import fail_if_env


class FailIfEnv(Step):
    inputs = ["x"]
    outputs = ["ok"]
    ignore_env = ["CASTORE_TEST_FAIL"]  # fails or not at all: the rows are the same

    def process(self, inputs: StepInput) -> list[dict]:
        return fail_if_env(inputs)
