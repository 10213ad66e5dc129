"""SelfInstruct, ComplexityScorer and QualityScorer under distilabel's names, against the
local OpenAI-compatible server: what they send, what they parse (by item number, never by
line position), what an answer they cannot parse gives (None or nothing, the raw answer
kept), and that answered rows are not paid for again."""

from __future__ import annotations

import pytest

from castore.steps.instruct import parse_numbered
from castore.steps.scorers import parse_scores
from tests.distilabel_compat.test_compat import server  # noqa: F401 - the fixture


def test_self_instruct_then_expand_and_a_row_appended(server):  # noqa: F811
    from castore.distilabel.models import OpenAILLM
    from castore.distilabel.pipeline import Pipeline
    from castore.distilabel.steps import ExpandColumns, LoadDataFromDicts
    from castore.distilabel.steps.tasks import SelfInstruct

    def reply(req):
        topic = req["messages"][-1]["content"].rsplit("\n", 1)[-1]
        if topic == "nothing":
            return "I cannot think of any."
        return f"Here you go:\n1. What is {topic}?\n2) Why {topic}?\n3. How {topic}?\nEnjoy!"

    server.reply = reply

    def build(topics):
        with Pipeline(name="self-instruct") as p:
            load = LoadDataFromDicts(data=[{"input": t} for t in topics])
            gen = SelfInstruct(
                llm=OpenAILLM(model="m"), num_instructions=2, application_description="a quiz"
            )
            load >> gen >> ExpandColumns(columns=["instructions"])
        return p

    train = build(["tides", "nothing"]).run()["default"]["train"]
    # Two instructions from the numbered lines (no preamble, at most num_instructions);
    # an answer without a numbered line gives no instruction, so no expanded row.
    assert train["instructions"] == ["What is tides?", "Why tides?"]
    sent = server.bodies[0]["messages"][-1]["content"]
    assert "a quiz" in sent and "Write 2 queries" in sent
    assert server.requests == 2
    build(["tides", "nothing", "comets"]).run()
    assert server.requests == 3  # only the appended row was asked


def test_complexity_and_quality_scores_by_item_number(server):  # noqa: F811
    from castore.distilabel.models import OpenAILLM
    from castore.distilabel.pipeline import Pipeline
    from castore.distilabel.steps import LoadDataFromDicts
    from castore.distilabel.steps.tasks import ComplexityScorer, QualityScorer

    def reply(req):
        text = req["messages"][-1]["content"]
        if "[1] easy" in text:
            return "Sure, here are the scores:\n[2] Score: 5\n[1] Score: 2"
        if "Instruction: q1" in text:
            return "[1] Score: 4\n[2] Score: none\n[3] Score: 1.5"
        return "no idea"

    server.reply = reply
    with Pipeline(name="scorers", enable_metadata=True) as p:
        load = LoadDataFromDicts(
            data=[
                {
                    "instructions": ["easy", "hard"],
                    "instruction": "q1",
                    "responses": ["a", "b", "c"],
                },
                {"instructions": ["x"], "instruction": "q2", "responses": ["d"]},
            ]
        )
        (
            load
            >> ComplexityScorer(llm=OpenAILLM(model="m"))
            >> QualityScorer(llm=OpenAILLM(model="m"), output_mappings={"scores": "quality"})
        )
    train = p.run()["default"]["train"]
    assert train["scores"] == [[2.0, 5.0], [None]]  # by number: a preamble shifts nothing
    assert train["quality"] == [[4.0, None, 1.5], [None]]
    meta = train["distilabel_metadata"][1]
    assert meta["raw_output_complexity_scorer_0"] == "no idea"
    assert server.requests == 4
    p.run()
    assert server.requests == 4


def test_tasks_with_one_answer_per_row_refuse_num_generations():
    from castore.distilabel.models import OpenAILLM
    from castore.distilabel.steps.tasks import ComplexityScorer, SelfInstruct

    for cls in (ComplexityScorer, SelfInstruct):
        with pytest.raises(ValueError, match="one answer per row"):
            cls(llm=OpenAILLM(model="m"), num_generations=2)


def test_parsers():
    assert parse_scores("[1] Score: 3\n**[2] Score:** 5\n[3] score: x\n[9] Score: 1", 3) == [
        3.0,
        5.0,
        None,
    ]
    assert parse_scores(None, 2) == [None, None]
    assert parse_scores("[1] Score: 2\n[1] Score: 6", 1) == [2.0]  # the first line counts
    assert parse_numbered("Intro:\n1. a\n2) b\n**3.** c\nBye", 5) == ["a", "b", "c"]
    assert parse_numbered("1. a\n2. b\n3. c", 2) == ["a", "b"]
    assert parse_numbered("just text", 3) == []


def test_evol_instruct_rounds_answers_and_a_failed_row(server):  # noqa: F811
    from castore.distilabel.models import OpenAILLM
    from castore.distilabel.pipeline import Pipeline
    from castore.distilabel.steps import LoadDataFromDicts
    from castore.distilabel.steps.tasks import EvolInstruct

    def reply(req):
        text = req["messages"][-1]["content"]
        if "Instruction:\n" in text:  # a mutation round: the instruction is last
            return "  harder: " + text.rsplit("Instruction:\n", 1)[1] + "\n"
        return f"answer to {text}"

    server.reply = reply
    server.always_fail = "poison"
    data = [{"instruction": "q1"}, {"instruction": "poison"}, {"instruction": "q3"}]

    def build():
        with Pipeline(name="evol") as p:
            LoadDataFromDicts(data=data) >> EvolInstruct(
                llm=OpenAILLM(model="m", max_retries=0),
                num_evolutions=2,
                store_evolutions=True,
                generate_answers=True,
                on_error="skip",
            )
        return p

    rows = build().run()["default"]["train"].to_list()
    assert rows[0]["evolved_instructions"] == ["harder: q1", "harder: harder: q1"]
    assert rows[0]["answers"] == ["answer to harder: q1", "answer to harder: harder: q1"]
    assert rows[1]["evolved_instructions"] is None and rows[1]["answers"] is None
    paid = server.requests  # 2 rounds + 2 answers for each good row, 1 failed request
    assert paid == 2 * 4 + 1
    server.always_fail = "\x00never"
    rows = build().run()["default"]["train"].to_list()
    assert rows[1]["evolved_instructions"] == ["harder: poison", "harder: harder: poison"]
    assert server.requests == paid + 4  # only the failed row is asked again


def test_evol_instruct_mutations_are_drawn_per_row_and_round_not_per_call():
    from castore.distilabel.models import OpenAILLM
    from castore.distilabel.steps.tasks import EvolInstruct

    def picks(task):
        return [
            task.mutation({"instruction": f"q{i}"}, f"q{i}", r) for i in range(30) for r in range(3)
        ]

    a = EvolInstruct(llm=OpenAILLM(model="m"), num_evolutions=3)
    b = EvolInstruct(llm=OpenAILLM(model="m"), num_evolutions=3)
    assert picks(a) == picks(b)
    assert len(set(picks(a))) > 1  # not one template for everything
    assert picks(a) != picks(EvolInstruct(llm=OpenAILLM(model="m"), num_evolutions=3, seed=7))
    with pytest.raises(ValueError, match="has no <PROMPT>"):
        EvolInstruct(llm=OpenAILLM(model="m"), num_evolutions=1, mutation_templates={"x": "hi"})


def test_evol_quality_improves_responses_round_by_round(server):  # noqa: F811
    from castore.distilabel.models import OpenAILLM
    from castore.distilabel.pipeline import Pipeline
    from castore.distilabel.steps import LoadDataFromDicts
    from castore.distilabel.steps.tasks import EvolQuality

    def reply(req):
        text = req["messages"][-1]["content"]
        question = text.split("Instruction:\n", 1)[1].split("\n\nResponse:\n", 1)[0]
        return f"better ({question}): " + text.rsplit("Response:\n", 1)[1]

    server.reply = reply
    data = [
        {"instruction": "q1", "response": "r1 <PROMPT>"},
        {"instruction": "q2", "response": "r2"},
    ]
    with Pipeline(name="evol-quality") as p:
        LoadDataFromDicts(data=data) >> EvolQuality(
            llm=OpenAILLM(model="m"),
            num_evolutions=2,
            store_evolutions=True,
            include_original_response=True,
        )
    rows = p.run()["default"]["train"].to_list()
    # The response's own "<PROMPT>" is kept as written, never filled in.
    assert rows[0]["evolved_responses"] == [
        "r1 <PROMPT>",
        "better (q1): r1 <PROMPT>",
        "better (q1): better (q1): r1 <PROMPT>",
    ]
    assert rows[1]["evolved_responses"][-1] == "better (q2): better (q2): r2"
    assert server.requests == 4
    p.run()
    assert server.requests == 4
    with pytest.raises(ValueError, match="has no <RESPONSE>"):
        EvolQuality(
            llm=OpenAILLM(model="m"), num_evolutions=1, mutation_templates={"x": "<PROMPT>"}
        )


def test_generate_embeddings_one_request_per_batch_and_rows_reused(server):  # noqa: F811
    from castore.distilabel.models import OpenAILLM
    from castore.distilabel.pipeline import Pipeline
    from castore.distilabel.steps import LoadDataFromDicts
    from castore.distilabel.steps.tasks import GenerateEmbeddings
    from tests.llm_server import vector

    def build(texts, batch):
        with Pipeline(name="embed") as p:
            LoadDataFromDicts(data=[{"text": t} for t in texts]) >> GenerateEmbeddings(
                llm=OpenAILLM(model="emb", generation_kwargs={"dimensions": 3}),
                input_batch_size=batch,
            )
        return p

    texts = [f"text number {i}" for i in range(10)]
    train = build(texts, 4).run()["default"]["train"]
    assert train["embedding"] == [vector(t) for t in texts]  # in row order
    assert set(train["model_name"]) == {"emb"}
    assert server.requests == 3  # batches of 4, 4, 2
    assert server.bodies[0]["dimensions"] == 3 and server.bodies[0]["input"] == texts[:4]
    # Another batch size and one appended text: only that text is embedded.
    build([*texts, "one more"], 5).run()
    assert server.requests == 4 and server.bodies[-1]["input"] == ["one more"]


def test_generate_embeddings_failed_batch_keeps_rows_and_is_retried(server):  # noqa: F811
    from castore.distilabel.models import OpenAILLM
    from castore.distilabel.pipeline import Pipeline
    from castore.distilabel.steps import LoadDataFromDicts
    from castore.distilabel.steps.tasks import GenerateEmbeddings

    server.always_fail = "poison"
    with Pipeline(name="embed-fail") as p:
        LoadDataFromDicts(data=[{"text": "fine"}, {"text": "poison"}]) >> GenerateEmbeddings(
            llm=OpenAILLM(model="emb", max_retries=0), input_batch_size=1, on_error="skip"
        )
    train = p.run()["default"]["train"]
    assert train["embedding"][0] is not None and train["embedding"][1] is None
    server.always_fail = "\x00never"
    assert p.run()["default"]["train"]["embedding"][1] == [6.0, 1.0, float(ord("p"))]
    assert server.requests == 3  # fine once, poison twice


def test_prometheus_absolute_and_relative_with_a_reference(server):  # noqa: F811
    from castore.distilabel.models import OpenAILLM
    from castore.distilabel.pipeline import Pipeline
    from castore.distilabel.steps import LoadDataFromDicts
    from castore.distilabel.steps.tasks import PrometheusEval

    def reply(req):
        text = req["messages"][-1]["content"]
        if "q-bad" in text:
            return "Feedback: unclear.\n[RESULT] 7"  # out of range: no result
        if "Response A:" in text:
            return "Feedback: B is more complete.\n[RESULT] B"
        return "Feedback: Accurate, matches the reference.\n[RESULT] 4"

    server.reply = reply
    rows = [
        {"instruction": "q1", "generation": "g1", "generations": ["a", "b"], "reference": "r"},
        {"instruction": "q-bad", "generation": "g2", "generations": ["c", "d"], "reference": "r"},
    ]
    with Pipeline(name="prometheus") as p:
        load = LoadDataFromDicts(data=rows)
        absolute = PrometheusEval(
            llm=OpenAILLM(model="judge"),
            rubric="factual-validity",
            reference=True,
            output_mappings={
                "feedback": "abs_feedback",
                "result": "abs_result",
                "model_name": "m1",
            },
        )
        relative = PrometheusEval(llm=OpenAILLM(model="judge"), mode="relative")
        load >> absolute >> relative
    train = p.run()["default"]["train"]
    assert train["abs_result"] == [4, None]
    assert train["abs_feedback"][0] == "Accurate, matches the reference."
    assert train["result"] == ["B", None]
    sent = server.bodies[0]["messages"][-1]["content"]
    assert "Reference answer" in sent and "facts" in sent  # the rubric asked for
    assert server.requests == 4
    p.run()
    assert server.requests == 4


def test_prometheus_refuses_an_unknown_rubric_and_parses_strictly():
    from castore.distilabel.models import OpenAILLM
    from castore.distilabel.steps.tasks import PrometheusEval
    from castore.steps.prometheus import parse_result

    with pytest.raises(ValueError, match="rubric 'kindness' is not in rubrics"):
        PrometheusEval(llm=OpenAILLM(model="m"), rubric="kindness")
    assert parse_result("Feedback: ok\n[RESULT] 5", "absolute") == ("ok", 5)
    assert parse_result("Feedback: ok\n[RESULT] 0", "absolute") == ("ok", None)
    assert parse_result("no result here", "absolute") == ("no result here", None)
    assert parse_result("Feedback: a\n[RESULT] a", "relative") == ("a", "A")
    assert parse_result("Feedback: x\n[RESULT] C", "relative") == ("x", None)
    assert parse_result(None, "relative") == (None, None)


def test_a_missing_text_fails_the_batch_instead_of_sending_none(server):  # noqa: F811
    """A generation that failed upstream (None) is not graded, evolved, scored or
    embedded as the text "None": the batch fails naming the column, and nothing is sent."""
    from castore.distilabel.models import OpenAILLM
    from castore.distilabel.pipeline import Pipeline
    from castore.distilabel.steps import LoadDataFromDicts
    from castore.distilabel.steps.tasks import (
        EvolInstruct,
        GenerateEmbeddings,
        PrometheusEval,
        QualityScorer,
    )
    from castore.errors import StepFailed

    llm = OpenAILLM(model="m", max_retries=0)
    cases = [
        (lambda: PrometheusEval(llm=llm), {"instruction": "q", "generation": None}, "generation"),
        (lambda: EvolInstruct(llm=llm, num_evolutions=1), {"instruction": None}, "instruction"),
        (lambda: QualityScorer(llm=llm), {"instruction": "q", "responses": ["a", None]}, "item 2"),
        (lambda: GenerateEmbeddings(llm=llm), {"text": None}, "row 0's text"),
    ]
    for i, (task, row, what) in enumerate(cases):
        with Pipeline(name=f"none-{i}") as p:
            LoadDataFromDicts(data=[row]) >> task()
        with pytest.raises(StepFailed, match=f"{what}.* is None, not text"):
            p.run()
    assert server.requests == 0


def test_ultrafeedback_typed_aspects_give_distilabels_columns(server):  # noqa: F811
    """helpfulness and truthfulness also name the kinds of what the judge saw (types) and
    why, and keep the rating's rationale as rationales-for-ratings, as distilabel's
    columns; a kind outside 1-3 or "None" is None, never a guessed one."""
    from castore.distilabel.models import OpenAILLM
    from castore.distilabel.pipeline import Pipeline
    from castore.distilabel.steps import LoadDataFromDicts
    from castore.distilabel.steps.tasks import UltraFeedback
    from castore.steps.feedback import parse_types

    answer = (
        "Text 1 type: 2, 3\nText 1 type rationale: Thorough and brief.\n"
        "Text 1 rating: 4\nText 1 rationale: Useful.\n"
        "**Text 2 type:** None\nText 2 type rationale: Nothing of note.\n"
        "Text 2 rating: 2\nText 2 rationale: Vague."
    )
    server.reply = lambda req: answer
    row = {"instruction": "Why is the sky blue?", "generations": ["Rayleigh.", "It is."]}
    for aspect in ("helpfulness", "truthfulness"):
        with Pipeline(name=f"uf-{aspect}") as p:
            LoadDataFromDicts(data=[row]) >> UltraFeedback(
                llm=OpenAILLM(model="judge"), aspect=aspect
            )
        got = p.run()["default"]["train"].to_list()[0]
        assert got["types"] == [2, None]
        assert got["rationales"] == ["Thorough and brief.", "Nothing of note."]
        assert got["ratings"] == [4, 2]
        assert got["rationales-for-ratings"] == ["Useful.", "Vague."]
        prompt = server.bodies[-1]["messages"][-1]["content"]
        assert "Text 2 type rationale:" in prompt and "1 = " in prompt
    with Pipeline(name="uf-honesty") as p:
        LoadDataFromDicts(data=[row]) >> UltraFeedback(llm=OpenAILLM(model="j"), aspect="honesty")
    plain = p.run()["default"]["train"]
    assert "types" not in plain.column_names and plain["ratings"] == [[4, 2]]
    assert parse_types("Text 1 type: 7\nText 1 type rationale:", 1) == ([None], [None])


def test_generate_embeddings_with_no_server_stops_the_run(tmp_path):
    """As a chat step's: a server nothing answers at is not a failed row per batch."""
    from castore.distilabel.models import OpenAILLM
    from castore.distilabel.pipeline import Pipeline
    from castore.distilabel.steps import LoadDataFromDicts
    from castore.distilabel.steps.tasks import GenerateEmbeddings
    from castore.errors import StepFailed
    from tests.remote_server import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"
    with Pipeline(name="embed-none") as p:
        LoadDataFromDicts(data=[{"text": f"t{i}"} for i in range(6)]) >> GenerateEmbeddings(
            llm=OpenAILLM(model="emb", base_url=url, max_retries=1, backoff=0.01),
            input_batch_size=2,
            on_error="skip",
        )
    with pytest.raises(StepFailed, match=rf"the LLM server at {url}: .*ClientConnectorError"):
        p.run(cache_dir=tmp_path / "c")


def test_text_classification_reads_only_the_labels_asked_for(server):  # noqa: F811
    from castore.distilabel.models import OpenAILLM
    from castore.distilabel.pipeline import Pipeline
    from castore.distilabel.steps import LoadDataFromDicts
    from castore.distilabel.steps.tasks import TextClassification

    answers = {
        "loved it": '{"labels": "positive"}',
        "hated it": 'Sure:\n```json\n{"labels": "negative"}\n```',
        "so-so": '{"labels": "mixed"}',  # not one of the labels
        "what": "positive",  # not the JSON asked for
        "nothing": '{"labels": "Unclassified"}',  # the default label is allowed
    }

    def reply(req):
        text = req["messages"][-1]["content"].split("```\n")[1].split("\n```")[0].strip()
        return answers[text]

    server.reply = reply

    def build(texts):
        with Pipeline(name="classify") as p:
            LoadDataFromDicts(data=[{"text": t} for t in texts]) >> TextClassification(
                llm=OpenAILLM(model="m"),
                available_labels={"positive": "likes it", "negative": "does not"},
                query_title="Movie Review",
            )
        return p

    train = build(list(answers)).run()["default"]["train"]
    assert train["labels"] == ["positive", "negative", None, None, "Unclassified"]
    sent = server.bodies[0]["messages"][-1]["content"]
    assert "- positive: likes it" in sent and "Movie Review:" in sent
    assert server.requests == 5
    build([*answers, "loved it"]).run()
    assert server.requests == 6  # only the appended row


def test_parse_labels():
    from castore.steps.classify import parse_labels

    assert parse_labels('{"labels": ["a", "b"]}', 2, None) == ["a", "b"]
    assert parse_labels('{"labels": ["a"]}', 2, None) is None  # not n of them
    assert parse_labels('{"labels": ["a"]}', 1, None) == "a"
    assert parse_labels('{"labels": ["a", "z"]}', 2, {"a", "b"}) is None
    assert parse_labels('{"labels": ""}', 1, None) is None
    assert parse_labels('{"label": "a"}', 1, None) is None
    assert parse_labels(None, 1, None) is None
    # The default label, as the model is told to answer it, also for n > 1.
    assert parse_labels('{"labels": "Unclassified"}', 3, None, "Unclassified") == ["Unclassified"]
    assert parse_labels('{"labels": ["Unclassified"]}', 1, {"a"}, "Unclassified") == "Unclassified"
    assert parse_labels('{"labels": "Other"}', 3, None, "Unclassified") is None


def test_generate_sentence_pair_triplets_by_section_header(server):  # noqa: F811
    from castore.distilabel.models import OpenAILLM
    from castore.distilabel.pipeline import Pipeline
    from castore.distilabel.steps import LoadDataFromDicts
    from castore.distilabel.steps.tasks import GenerateSentencePair

    answers = {
        "How do tides work?": "## Positive\nWhat causes tides?\n\n## Negative\nHow do tires work?",
        "Best pizza in Rome": "Sure!\n## positive:\nWhere to eat pizza in Rome\n",  # no negative
        "Why is the sky blue?": "The sky is blue because of scattering.",  # no section
    }

    def reply(req):
        return answers[req["messages"][-1]["content"].removeprefix("Anchor:\n")]

    server.reply = reply

    def build(anchors, **kw):
        with Pipeline(name="pairs") as p:
            LoadDataFromDicts(data=[{"anchor": a} for a in anchors]) >> GenerateSentencePair(
                llm=OpenAILLM(model="m"), action="paraphrase", triplet=True, **kw
            )
        return p

    train = build(list(answers), hard_negative=True).run()["default"]["train"]
    assert train["positive"] == ["What causes tides?", "Where to eat pizza in Rome", None]
    assert train["negative"] == ["How do tires work?", None, None]
    assert "hard to tell apart" in server.bodies[0]["messages"][0]["content"]
    assert server.requests == 3
    build(list(answers), hard_negative=True).run()
    assert server.requests == 3  # every answer reused
    with pytest.raises(ValueError, match="hard_negative=True needs triplet=True"):
        GenerateSentencePair(llm=OpenAILLM(model="m"), action="query", hard_negative=True)
    pair = GenerateSentencePair(llm=OpenAILLM(model="m"), action="query")
    assert pair.outputs == ["positive", "model_name"]


def test_parse_sections():
    from castore.steps.pairs import parse_sections

    text = "## Positive\n  a\nb\n## Negative\n\n## Other\nc"
    assert parse_sections(text, ["Positive", "Negative"]) == {"Positive": "a\nb", "Negative": None}
    assert parse_sections(None, ["Positive"]) == {"Positive": None}
    assert parse_sections("Positive: x", ["Positive"]) == {"Positive": None}
    assert parse_sections("## Positive: x y\n## Negative: z", ["Positive", "Negative"]) == {
        "Positive": "x y",
        "Negative": "z",
    }
    assert parse_sections("## Positives\nx", ["Positive"]) == {"Positive": None}
