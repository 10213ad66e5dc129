# distilabel 1.5's "Pipeline" how-to (docs/sections/how_to_guides/basic/pipeline): one
# loader with output_mappings, a TextGeneration per LLM named after its model, runtime
# parameters nested down to the LLM's generation_kwargs. Only the import word and the
# LLM classes changed (MistralLLM / VertexAILLM -> OpenAILLM, served locally), and the
# Hub dataset is a local folder (the test passes its path as repo_id).
from castore.distilabel.models import OpenAILLM
from castore.distilabel.pipeline import Pipeline
from castore.distilabel.steps import LoadDataFromHub
from castore.distilabel.steps.tasks import TextGeneration

with Pipeline("pipe-name", description="My first pipe") as pipeline:
    load_dataset = LoadDataFromHub(
        name="load_dataset",
        output_mappings={"prompt": "instruction"},
    )

    for llm in (
        OpenAILLM(model="gpt-4-0125-preview"),
        OpenAILLM(model="mistral-large-2402"),
        OpenAILLM(model="gemini-pro"),
    ):
        task = TextGeneration(
            name=f"text_generation_with_{llm.model_name}",
            llm=llm,
            input_batch_size=5,
        )
        load_dataset >> task
