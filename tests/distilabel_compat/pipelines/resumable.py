# A distilabel-style script (the shape of distilabel's examples: build, then run under
# __main__ and save the Distiset), with only the import word changed. Used to kill -9 a
# compat pipeline mid-generation and run the script again.
import sys

from castore.distilabel.models import OpenAILLM
from castore.distilabel.pipeline import Pipeline
from castore.distilabel.steps import KeepColumns, LoadDataFromDicts
from castore.distilabel.steps.tasks import TextGeneration

with Pipeline(name="resumable-generation") as pipeline:
    load = LoadDataFromDicts(
        data=[{"instruction": f"question number {i}"} for i in range(200)], batch_size=50
    )
    generate = TextGeneration(
        llm=OpenAILLM(model="test-model", generation_kwargs={"max_new_tokens": 64}),
        system_prompt="Answer briefly.",
        input_batch_size=10,
    )
    keep = KeepColumns(columns=["instruction", "generation", "model_name"])
    load >> generate >> keep

if __name__ == "__main__":
    distiset = pipeline.run(use_cache=True)
    distiset.save_to_disk(sys.argv[1])
