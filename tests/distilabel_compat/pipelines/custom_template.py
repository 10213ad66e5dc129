# distilabel 1.5's TextGeneration docstring example "Use a custom template to generate
# text", with only the import word and the LLM class changed.
from castore.distilabel.models import OpenAILLM
from castore.distilabel.steps.tasks import TextGeneration

CUSTOM_TEMPLATE = """Document:
{{ document }}

Question: {{ question }}

Please provide a clear and concise answer to the question based on the information in the document and your general knowledge:
""".rstrip()

text_gen = TextGeneration(
    llm=OpenAILLM(model="meta-llama/Meta-Llama-3.1-70B-Instruct"),
    system_prompt="You are a helpful AI assistant. Your task is to answer the following question based on the provided document. If the answer is not explicitly stated in the document, use your knowledge to provide the most relevant and accurate answer possible. If you cannot answer the question based on the given information, state that clearly.",
    template=CUSTOM_TEMPLATE,
    columns=["document", "question"],
)

text_gen.load()
