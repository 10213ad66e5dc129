# distilabel 1.5's README quickstart, with only `distilabel` -> `castore.distilabel` and
# the LLM class changed (InferenceEndpointsLLM -> OpenAILLM, served locally; the test
# sets OPENAI_BASE_URL). The Hub dataset is passed in by the test (no network).
from castore.distilabel.models import OpenAILLM
from castore.distilabel.pipeline import Pipeline
from castore.distilabel.steps.tasks import TextGeneration

with Pipeline() as pipeline:
    TextGeneration(
        llm=OpenAILLM(
            model="meta-llama/Meta-Llama-3.1-8B-Instruct",
            generation_kwargs={"temperature": 0.7, "max_new_tokens": 512},
        ),
    )
