# distilabel's several generations per row as rows of their own, for the kill -9 test:
# CASTORE_TEST_ROWS rows, three answers each, from the server at OPENAI_BASE_URL.
import os

from castore.distilabel.models import OpenAILLM
from castore.distilabel.pipeline import Pipeline
from castore.distilabel.steps import LoadDataFromDicts
from castore.distilabel.steps.tasks import TextGeneration

ROWS = int(os.environ.get("CASTORE_TEST_ROWS", "10"))

with Pipeline(name="generations") as pipeline:
    LoadDataFromDicts(data=[{"instruction": f"q{i}"} for i in range(ROWS)]) >> TextGeneration(
        llm=OpenAILLM(model="m", max_concurrent_requests=4), num_generations=3, input_batch_size=10
    )
