# distilabel 1.5's `@step` docstring examples: a normal step with a runtime parameter
# and a generator step yielding (rows, last_batch), as the docstring writes it (no
# `offset` parameter). Only the import word changed. distilabel 1.5.3 itself refuses this
# generator in a pipeline ("should have an `offset` parameter"); castore runs it.
from castore.distilabel.mixins.runtime_parameters import RuntimeParameter
from castore.distilabel.pipeline import Pipeline
from castore.distilabel.steps import GeneratorStepOutput, StepInput, StepOutput, step


@step(inputs=["instruction"], outputs=["generation"])
def GenerationStep(inputs: StepInput, dummy_generation: RuntimeParameter[str]) -> StepOutput:
    for input in inputs:
        input["generation"] = dummy_generation
    yield inputs


@step(outputs=["instruction"], step_type="generator")
def GeneratorStep(num_rows: RuntimeParameter[int] = 12) -> GeneratorStepOutput:
    instructions = [f"instruction {i}" for i in range(num_rows)]
    for start in range(0, num_rows, 5):
        batch = instructions[start : start + 5]
        yield [{"instruction": i} for i in batch], start + 5 >= num_rows


with Pipeline(name="decorated") as pipeline:
    GeneratorStep() >> GenerationStep()
