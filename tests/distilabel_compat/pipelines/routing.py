# distilabel 1.5's `sample_n_steps` docstring (distilabel/pipeline/routing_batch_function.py):
# each batch of the loader goes to two of three TextGenerations, and GroupColumns gathers
# the two answers per row. Only the import word and the LLM classes changed (MistralLLM /
# VertexAILLM -> OpenAILLM, served locally), the Hub dataset is inline rows, and
# "gemini-1.5-pro" is "gemini-1-5-pro": distilabel 1.5.3 itself refuses the step name
# the docstring builds from it (a "." is not allowed in step names).
from castore.distilabel.models import OpenAILLM
from castore.distilabel.pipeline import Pipeline, sample_n_steps
from castore.distilabel.steps import GroupColumns, LoadDataFromDicts
from castore.distilabel.steps.tasks import TextGeneration

random_routing_batch = sample_n_steps(2)


with Pipeline(name="routing-batch-function") as pipeline:
    load_data = LoadDataFromDicts(
        data=[{"instruction": f"Explain the number {i}."} for i in range(200)], batch_size=50
    )

    generations = []
    for llm in (
        OpenAILLM(model="gpt-4-0125-preview"),
        OpenAILLM(model="mistral-large-2402"),
        OpenAILLM(model="gemini-1-5-pro"),
    ):
        task = TextGeneration(name=f"text_generation_with_{llm.model_name}", llm=llm)
        generations.append(task)

    combine_columns = GroupColumns(columns=["generation", "model_name"])

    load_data >> random_routing_batch >> generations >> combine_columns
