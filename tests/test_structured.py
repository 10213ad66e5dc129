"""Structured output: a JSON schema or a pydantic model sent as response_format, every
answer validated, a bad answer asked again, a row that never conforms failed like any
other; against the local OpenAI-compatible server."""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel, Field

from castore import Pipeline
from castore.distiset import Distiset
from castore.llms import OpenAILLM
from castore.steps import LoadDataFromDicts, TextGeneration
from tests.llm_server import LLMServer


class Character(BaseModel):
    name: str
    age: int = Field(ge=0)


def llm(server: LLMServer, **kw) -> OpenAILLM:
    return OpenAILLM(
        model="m", base_url=server.base_url, backoff=0.01, timeout=5.0, max_retries=2, **kw
    )


def character_reply(bad: dict[str, str]):
    """The server's answer: a character from the prompt; prompts in `bad` get that text."""

    def reply(req: dict) -> str:
        prompt = req["messages"][-1]["content"]
        if prompt in bad:
            return bad[prompt]
        return json.dumps({"name": prompt.upper(), "age": len(prompt)}, indent=2)

    return reply


def pipeline(server: LLMServer, names: list[str], **llm_kw) -> Pipeline:
    with Pipeline(name="chars") as p:
        LoadDataFromDicts(data=[{"instruction": n} for n in names]) >> TextGeneration(
            llm=llm(server, **llm_kw), input_batch_size=4, on_error="skip"
        )
    return p


def test_a_pydantic_model_is_sent_and_every_answer_validated(store, server):
    server.reply = character_reply({})
    ds = pipeline(server, ["ann", "bob"], structured_output=Character).run(
        cache_dir=store.root, quiet=True
    )
    rows = ds["text_generation"]["train"].to_list()
    # The generation is the object as compact JSON (the server's layout is in raw_response).
    assert [json.loads(r["generation"]) for r in rows] == [
        {"name": "ANN", "age": 3},
        {"name": "BOB", "age": 3},
    ]
    assert rows[0]["generation"] == '{"name": "ANN", "age": 3}'
    sent = server.bodies[0]["response_format"]
    assert sent["type"] == "json_schema" and sent["json_schema"]["name"] == "Character"
    assert sent["json_schema"]["schema"] == Character.model_json_schema()
    assert server.requests == 2
    # pipeline.yaml records the schema: run from it, the same step, every row cached.
    again = Pipeline.from_yaml(ds.pipeline_path).run(cache_dir=store.root, quiet=True)
    assert again["text_generation"]["train"].to_list() == rows and server.requests == 2


def test_an_answer_that_breaks_the_schema_is_asked_again_then_fails_its_row(store, server):
    # "carl" never conforms (age is text); "dora" is not JSON at all; both are asked
    # 1 + max_retries times, the other rows once; the run keeps going.
    bad = {"carl": '{"name": "C", "age": "old"}', "dora": "Sure! Here it is: {name: D}"}
    server.reply = character_reply(bad)
    names = ["ann", "carl", "dora", "bob"]
    ds = pipeline(server, names, structured_output=Character).run(cache_dir=store.root, quiet=True)
    assert server.by_prompt["carl"] == 3 and server.by_prompt["dora"] == 3
    assert server.by_prompt["ann"] == 1
    rows = Distiset.from_run("chars", store.root, enable_metadata=True)["text_generation"][
        "train"
    ].to_list()
    assert [r["generation"] is None for r in rows] == [False, True, True, False]
    errors = [r["castore_metadata"]["text_generation"]["error"] for r in rows]
    assert "breaks the schema at age" in errors[1] and "not JSON" in errors[2]
    assert ds.run.stats["text_generation"].batches_failed == 1
    # Once the model conforms, only the two failed rows are asked again.
    server.reply = character_reply({})
    before = server.requests
    again = pipeline(server, names, structured_output=Character).run(
        cache_dir=store.root, quiet=True
    )
    assert server.requests - before == 2
    assert json.loads(again["text_generation"]["train"][1]["generation"])["age"] == 4


def test_a_json_schema_dict_works_and_the_schema_is_part_of_the_cache_key(store, server):
    schema = {
        "type": "object",
        "properties": {"label": {"enum": ["pos", "neg"]}},
        "required": ["label"],
    }
    server.reply = lambda req: '{"label": "pos"}'
    ds = pipeline(server, ["a", "b"], structured_output=schema).run(
        cache_dir=store.root, quiet=True
    )
    assert ds["text_generation"]["train"]["generation"] == ['{"label": "pos"}'] * 2

    def fp(**kw) -> str:
        return pipeline(server, ["a"], **kw).signatures()["text_generation"]["fp"]

    plain = fp()
    assert fp(structured_output=schema) != plain
    assert fp(structured_output=Character) not in (plain, fp(structured_output=schema))
    # No structured output: the key is what it was before the field existed.
    assert "structured_output" not in llm(server).cache_identity()


def test_bad_schemas_are_refused_before_any_request(server):
    with pytest.raises(ValueError, match="not a valid JSON schema"):
        llm(server, structured_output={"type": "no-such-type"})
    with pytest.raises(ValueError, match=r"JSON schema \(dict\) or a pydantic model"):
        llm(server, structured_output="Character")
    assert server.requests == 0


def test_distilabel_spelling(store, server):
    from castore.distilabel.models import OpenAILLM as DLOpenAILLM

    server.reply = character_reply({})
    made = DLOpenAILLM(model="m", base_url=server.base_url, structured_output={"schema": Character})
    assert made.structured_output == Character.model_json_schema()
    with pytest.raises(ValueError, match="mode not supported"):
        DLOpenAILLM(model="m", structured_output={"schema": Character, "mode": "tools"})
    with pytest.raises(ValueError, match="format 'regex' not supported"):
        DLOpenAILLM(model="m", structured_output={"schema": "a+", "format": "regex"})


def test_named_servers_set_their_defaults_and_never_send_an_openai_key(store, server, monkeypatch):
    from castore.llms import LlamaCppServer, OllamaServer, TGIServer, VLLMServer

    assert VLLMServer(model="m").base_url == "http://localhost:8000/v1"
    assert LlamaCppServer(model="m").base_url == "http://localhost:8080/v1"
    assert TGIServer(model="tgi").base_url == "http://localhost:8080/v1"
    assert OllamaServer(model="m").base_url == "http://localhost:11434/v1"
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-not-for-local-servers")
    monkeypatch.setenv("VLLM_API_KEY", "vllm-key")
    with Pipeline(name="vllm") as p:
        LoadDataFromDicts(data=[{"instruction": "hi"}]) >> TextGeneration(
            llm=VLLMServer(model="m", base_url=server.base_url)
        )
    p.run(cache_dir=store.root, quiet=True)
    assert server.auth_headers == {"Bearer vllm-key"}
    # Same server, same model: the class is not part of the cache key.
    plain = OpenAILLM(model="m", base_url=server.base_url)
    assert VLLMServer(model="m", base_url=server.base_url).cache_identity() == (
        plain.cache_identity()
    )


def test_distilabel_server_classes(server):
    from castore.distilabel.models import ClientvLLM, OllamaLLM

    assert ClientvLLM(model="m", base_url=server.base_url).base_url == server.base_url
    assert ClientvLLM(model="m", tokenizer="m").base_url == "http://localhost:8000/v1"
    with pytest.raises(ValueError, match="drop tokenizer"):
        ClientvLLM(model="m", tokenizer="other/tokenizer")
    assert OllamaLLM(model="m", host="http://box:11434/").base_url == "http://box:11434/v1"
    assert OllamaLLM(model="m").base_url == "http://localhost:11434/v1"
