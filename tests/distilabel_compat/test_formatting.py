"""distilabel's Format* steps and MergeColumns under `castore.distilabel.steps`: the DPO
dataset pipeline of distilabel's docs (two models, grouped, judged, formatted) end to
end, and each step's rows checked against values worked out by hand."""

from __future__ import annotations

import hashlib

import pytest

from castore.errors import StepFailed
from tests.distilabel_compat.test_compat import JUDGE, server  # noqa: F401 - the fixture


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def run_step(step_cls, rows, tmp_path, **kw):
    from castore.distilabel.pipeline import Pipeline
    from castore.distilabel.steps import LoadDataFromDicts

    with Pipeline(name="fmt") as p:
        LoadDataFromDicts(data=rows) >> step_cls(**kw)
    return p.run(cache_dir=str(tmp_path / "cache"))["default"]["train"].to_list()


def test_dpo_pipeline_two_models_judged_and_formatted(server):  # noqa: F811
    from castore.distilabel.models import OpenAILLM
    from castore.distilabel.pipeline import Pipeline
    from castore.distilabel.steps import (
        FormatTextGenerationDPO,
        GroupColumns,
        KeepColumns,
        LoadDataFromDicts,
    )
    from castore.distilabel.steps.tasks import TextGeneration, UltraFeedback

    def reply(req):
        if req["model"] != "judge":
            return f"answer from {req['model']}"
        if "number 1." in req["messages"][-1]["content"]:
            return (
                "Text 1 rating: 3\nText 1 rationale: fine\nText 2 rating: 3\nText 2 rationale: fine"
            )
        return JUDGE

    server.reply = reply
    data = [{"instruction": f"Write a haiku about the number {i}."} for i in range(3)]
    with Pipeline(name="dpo") as p:
        load = LoadDataFromDicts(data=data)
        gens = [TextGeneration(llm=OpenAILLM(model=m)) for m in ("m1", "m2")]
        group = GroupColumns(
            columns=["generation", "model_name"],
            output_columns=["generations", "generation_models"],
        )
        judge = UltraFeedback(llm=OpenAILLM(model="judge"), aspect="overall-rating")
        fmt = FormatTextGenerationDPO()
        keep = KeepColumns(
            columns=[
                *("prompt", "prompt_id", "chosen", "chosen_model", "chosen_rating"),
                *("rejected", "rejected_model", "rejected_rating"),
            ]
        )
        load >> gens >> group >> judge >> fmt >> keep
    rows = p.run()["default"]["train"].to_list()
    assert server.requests == 3 * 2 + 3
    first = rows[0]
    assert first["prompt"] == data[0]["instruction"] and first["prompt_id"] == sha(first["prompt"])
    assert first["chosen"] == [
        {"role": "user", "content": data[0]["instruction"]},
        {"role": "assistant", "content": "answer from m1"},
    ]
    assert first["rejected"][-1] == {"role": "assistant", "content": "answer from m2"}
    assert (first["chosen_model"], first["rejected_model"]) == ("m1", "m2")
    assert (first["chosen_rating"], first["rejected_rating"]) == (4, 2)
    # A tie is no preference: no pair is made up (distilabel would pair a text with itself).
    tie = rows[1]
    assert tie["chosen"] is None and tie["rejected"] is None and tie["chosen_rating"] is None
    assert tie["prompt_id"] == sha(data[1]["instruction"])
    p.run()
    assert server.requests == 9  # the re-run pays nothing


def test_format_text_generation_dpo_rows(tmp_path):
    from castore.distilabel.steps import FormatTextGenerationDPO

    rows = [
        {
            "system_prompt": "Be brief.",
            "instruction": "What's 2+2?",
            "generations": ["4", "5", "6"],
            "ratings": [1, 0, -1],
        },
        {  # an unrated generation is not compared; ties go to the first, as in distilabel
            "system_prompt": "",
            "instruction": "Name a colour.",
            "generations": ["red", "blue", "green", "grey"],
            "ratings": [2, None, 5, 5],
        },
    ]
    out = run_step(FormatTextGenerationDPO, rows, tmp_path)
    assert out[0]["chosen"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What's 2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    assert out[0]["rejected"][-1]["content"] == "6"
    assert (out[0]["chosen_rating"], out[0]["rejected_rating"]) == (1, -1)
    assert out[1]["chosen"] == [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "green"},
    ]
    assert out[1]["rejected"][-1]["content"] == "red"
    assert out[1]["prompt_id"] == sha("Name a colour.")
    assert "chosen_model" not in out[0]  # no generation_models in the input


def test_dpo_refuses_ratings_that_do_not_match_the_generations(tmp_path):
    from castore.distilabel.steps import FormatTextGenerationDPO

    rows = [{"instruction": "q", "generations": ["a", "b"], "ratings": [1]}]
    with pytest.raises(StepFailed, match="row 0 has 2 generations but 1 ratings"):
        run_step(FormatTextGenerationDPO, rows, tmp_path)


def test_format_chat_generation_dpo_and_the_sft_steps(tmp_path):
    from castore.distilabel.steps import (
        FormatChatGenerationDPO,
        FormatChatGenerationSFT,
        FormatTextGenerationSFT,
    )

    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi?"},
    ]
    chat = [{"messages": messages, "generations": ["a", "b"], "ratings": [0.5, 0.9]}]
    out = run_step(FormatChatGenerationDPO, chat, tmp_path / "a")[0]
    assert out["prompt"] == "Hi?" and out["prompt_id"] == sha("Hi?")
    assert out["chosen"] == [*messages, {"role": "assistant", "content": "b"}]
    assert out["rejected"] == [*messages, {"role": "assistant", "content": "a"}]

    sft = run_step(
        FormatChatGenerationSFT, [{"messages": messages, "generation": "Hello."}], tmp_path / "b"
    )[0]
    assert sft["messages"] == [*messages, {"role": "assistant", "content": "Hello."}]
    assert sft["prompt"] == "Hi?"

    text = run_step(
        FormatTextGenerationSFT,
        [{"instruction": "Say hi.", "generation": "Hi.", "system_prompt": "Be kind."}],
        tmp_path / "c",
    )[0]
    assert text["messages"] == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "Hi."},
    ]
    assert (text["prompt"], text["prompt_id"]) == ("Say hi.", sha("Say hi."))


def test_merge_columns(tmp_path):
    from castore.distilabel.steps import MergeColumns

    rows = [{"a": "x", "b": ["y", "z"], "keep": 1}, {"a": None, "b": [], "keep": 2}]
    out = run_step(MergeColumns, rows, tmp_path / "a", columns=["a", "b"])
    assert out == [
        {"keep": 1, "merged_column": ["x", "y", "z"]},
        {"keep": 2, "merged_column": [None]},
    ]
    named = run_step(MergeColumns, rows, tmp_path / "b", columns=["b", "a"], output_column="ab")
    assert named[0] == {"keep": 1, "ab": ["y", "z", "x"]}
