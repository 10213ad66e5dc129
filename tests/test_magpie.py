"""Magpie against the local OpenAI-compatible server: the pre-query text sent to
/v1/completions (Llama 3 and ChatML), instructions cut at the end of the turn, answers
from chat completions, multi-turn conversations, failures kept as failures."""

from __future__ import annotations

import pytest

from castore import Pipeline
from castore.errors import CastoreError
from castore.llms import OpenAILLM
from castore.steps import LoadDataFromDicts, Magpie, MagpieGenerator
from castore.steps.magpie import clean_instruction, pre_query
from tests.llm_server import LLMServer

LLAMA_USER = "<|start_header_id|>user<|end_header_id|>\n\n"


def llm(server: LLMServer) -> OpenAILLM:
    return OpenAILLM(model="m", base_url=server.base_url, backoff=0.01, max_retries=1)


def test_one_turn_from_a_system_prompt_column(store, server):
    rows = [{"system_prompt": "You teach maths."}, {"system_prompt": "You teach maths."}]
    with Pipeline(name="mag") as p:
        LoadDataFromDicts(data=rows) >> Magpie(llm=llm(server))
    out = p.run(cache_dir=store.root, quiet=True)["magpie"]["train"].to_list()
    # Each row its own sample (identical rows are not one answer reused).
    # (requests run concurrently: either row may have been asked first)
    assert sorted(r["instruction"] for r in out) == ["Question 1?", "Question 2?"]
    for r in out:  # each answer is to its own row's instruction
        assert r["response"] == f"answer(m): {r['instruction'][::-1]}"
    prompts = [b["prompt"] for b in server.bodies if "prompt" in b]
    assert (
        prompts
        == [
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou teach maths."
            "<|eot_id|>" + LLAMA_USER
        ]
        * 2
    )
    chats = [b["messages"] for b in server.bodies if "messages" in b]
    assert chats[0][0] == {"role": "system", "content": "You teach maths."}
    assert server.requests == 4
    p.run(cache_dir=store.root, quiet=True)
    assert server.requests == 4  # cached: a re-run asks nothing


def test_multi_turn_conversation_in_chatml_ending_with_the_user(store, server):
    with Pipeline(name="mag3") as p:
        LoadDataFromDicts(data=[{"i": 0}]) >> Magpie(
            llm=llm(server),
            pre_query_template="qwen2",
            n_turns=2,
            end_with_user=True,
            system_prompt="Be kind.",
            include_system_prompt=True,
        )
    conv = p.run(cache_dir=store.root, quiet=True)["magpie"]["train"][0]["conversation"]
    assert [m["role"] for m in conv] == ["system", "user", "assistant", "user"]
    second = [b["prompt"] for b in server.bodies if "prompt" in b][1]
    assert second == (
        "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nQuestion 1?<|im_end|>\n"
        f"<|im_start|>assistant\n{conv[2]['content']}<|im_end|>\n<|im_start|>user\n"
    )


def test_a_sample_without_an_instruction_fails_its_row_and_is_asked_again(store, server):
    server.complete = lambda prompt: "<|eot_id|>"  # the model ended its turn at once
    with Pipeline(name="mag-fail") as p:
        LoadDataFromDicts(data=[{"i": 0}, {"i": 1}]) >> Magpie(llm=llm(server), on_error="skip")
    ds = p.run(cache_dir=store.root, quiet=True)
    assert ds["magpie"]["train"]["instruction"] == [None, None]
    assert ds.run.stats["magpie"].batches_failed == 1
    server.complete = None
    again = p.run(cache_dir=store.root, quiet=True)
    assert sorted(again["magpie"]["train"]["instruction"]) == ["Question 3?", "Question 4?"]


def test_generator_makes_num_rows_and_resumes_by_batch(store, server):
    with Pipeline(name="mag-gen") as p:
        MagpieGenerator(llm=llm(server), num_rows=5, batch_size=2, only_instruction=True)
    out = p.run(cache_dir=store.root, quiet=True)["magpie_generator"]["train"]
    assert out.column_names[:2] == ["instruction", "model_name"]
    assert len(out) == 5 and len(set(out["instruction"])) == 5
    assert server.requests == 5


def test_templates_and_refusals():
    assert pre_query("llama3", []) == "<|begin_of_text|>" + LLAMA_USER
    assert pre_query("<s>[INST] ", []) == "<s>[INST] "
    assert clean_instruction(" Why?<|im_end|>\n<|im_start|>assistant") == "Why?"
    assert clean_instruction("  ") is None
    with pytest.raises(ValueError, match="custom pre_query_template"):
        Magpie(llm=OpenAILLM(model="m"), pre_query_template="<s>[INST] ", n_turns=2)
    with pytest.raises((ValueError, CastoreError)):
        Magpie(llm=OpenAILLM(model="m"), n_turns=0)
    for typo in ("llama-3", "Qwen2", " "):  # never sent as the prompt itself
        with pytest.raises(ValueError, match="unknown pre_query_template"):
            Magpie(llm=OpenAILLM(model="m"), pre_query_template=typo)
    # The generator is checked when it is made too, not when it first runs.
    with pytest.raises(ValueError, match="custom pre_query_template"):
        MagpieGenerator(llm=OpenAILLM(model="m"), num_rows=2, pre_query_template="<s>", n_turns=2)
    with pytest.raises(ValueError, match="Extra inputs"):
        Magpie(llm=OpenAILLM(model="m"), n_turn=2)


def test_a_system_prompt_that_is_not_text_fails_the_batch(store, server):
    with Pipeline(name="mag-bad") as p:
        LoadDataFromDicts(data=[{"system_prompt": 7}]) >> Magpie(llm=llm(server))
    with pytest.raises(CastoreError, match="system_prompt is 7, not text"):
        p.run(cache_dir=store.root, quiet=True)
    assert server.requests == 0


def test_distilabel_spelling_takes_the_template_from_the_llm(store, server):
    from castore.distilabel.models import ClientvLLM
    from castore.distilabel.pipeline import Pipeline as DLPipeline
    from castore.distilabel.steps.tasks import Magpie as DLMagpie
    from castore.distilabel.steps.tasks import MagpieGenerator as DLMagpieGenerator

    vllm = ClientvLLM(model="m", base_url=server.base_url, magpie_pre_query_template="qwen2")
    with DLPipeline(name="dl-magpie") as p:
        DLMagpieGenerator(llm=vllm, num_rows=3, n_turns=1)
    out = p.run(cache_dir=store.root, quiet=True)["default"]["train"]
    assert len(out) == 3 and all(out["response"])
    assert server.bodies[0]["prompt"] == "<|im_start|>user\n"
    with pytest.raises(ValueError, match="set magpie_pre_query_template"):
        DLMagpie(llm=ClientvLLM(model="m"))
    with pytest.raises(ValueError, match="as a system_prompt column"):
        DLMagpie(llm=vllm, system_prompt=["a", "b"])
    with pytest.raises(ValueError, match="Magpie task only"):
        ClientvLLM(model="m", use_magpie_template=True)
