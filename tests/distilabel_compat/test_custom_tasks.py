"""distilabel's custom tasks (a `Task` subclass, a function under `@task`) under
`castore.distilabel`, against the local OpenAI-compatible server: what they send, what
they keep, that an answer `format_output` cannot read fails its row (kept, asked again)
instead of caching None, and that answered rows are not paid for again."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from castore.errors import CastoreError, PipelineError
from castore.pipeline.step import BatchIncomplete
from tests.distilabel_compat.test_compat import (
    load,
    server,  # noqa: F401 - the fixture
)

ROWS = [
    {"review": "good phone", "product": "p1"},
    {"review": "bad case", "product": "p2"},
    {"review": "broken answer", "product": "p3"},
    {"review": "good cable", "product": "p4"},
]


def reply(req):
    user = req["messages"][-1]["content"]
    if req["model"] == "writer":
        return "  short summary "
    if "broken" in user:
        return "I would rather not answer in JSON."
    if "keyless" in user:
        return json.dumps({"label": "pos"})  # no "score": format_output's lookup fails
    return json.dumps({"label": "pos" if "good" in user else "neg", "score": 4})


def asked(srv, model):
    return [b for b in srv.bodies if b["model"] == model]


def test_custom_task_and_task_decorator_send_their_prompts_and_keep_their_columns(server):  # noqa: F811
    server.reply = reply
    m = load("custom_task")
    with pytest.raises(
        CastoreError, match=r"format_output raised JSONDecodeError.*on_error='skip'"
    ):
        m.build(ROWS).run()
    # The rows answered before the failure are kept as row results: only the row whose
    # answer was unreadable (and any row never asked) is asked again.
    train = m.build(ROWS, on_error="skip").run()["default"]["train"]
    judged = [json.loads(json.dumps(b["messages"])) for b in asked(server, "judge")]
    assert len(judged) == 5  # four rows, and the unreadable one twice
    assert m.RateReview(llm=m.OpenAILLM(model="judge")).format_input(ROWS[0]) in judged
    assert train["label"] == ["pos", "neg", None, "pos"]
    assert train["score"] == [4.0, 4.0, None, 4.0]
    assert train["summary"] == ["short summary"] * 4
    assert [
        {"role": "system", "content": "You write summaries of at most five words."},
        {"role": "user", "content": "Summarize this review: good phone"},
    ] in [b["messages"] for b in asked(server, "writer")]
    assert len(asked(server, "writer")) == 4
    # Again, one row appended: the new row and the still unreadable one are asked, the
    # summaries of the four earlier rows are reused by row key.
    more = [*ROWS, {"review": "good charger", "product": "p5"}]
    train = m.build(more, on_error="skip").run()["default"]["train"]
    assert len(asked(server, "judge")) == 7
    assert len(asked(server, "writer")) == 5
    assert train["label"] == ["pos", "neg", None, "pos", "pos"]


def test_an_unreadable_answer_is_kept_in_the_metadata(server):  # noqa: F811
    from castore.distilabel.models import OpenAILLM

    server.reply = reply
    m = load("custom_task")
    rate = m.RateReview(llm=OpenAILLM(model="judge"), name="rate")
    rate.load()
    with pytest.raises(BatchIncomplete, match=r"1 row\(s\) failed") as err:
        next(rate.process([ROWS[2], ROWS[0]]))
    rows = err.value.rows
    assert rows[0]["label"] is None and rows[1]["label"] == "pos"
    meta = rows[0]["castore_metadata"]
    assert meta["raw_output_rate"] == "I would rather not answer in JSON."
    assert meta["rate"]["error"].startswith("format_output raised JSONDecodeError")
    assert meta["rate"]["usage"]  # the answer was paid for: its tokens are counted
    assert err.value.failed == [0]
    assert rows[1]["model_name"] == "judge"
    # A key the answer lacks (a KeyError in format_output) fails that row too, not the
    # batch: it is told apart from a column the task did not declare.
    with pytest.raises(BatchIncomplete) as err:
        next(rate.process([ROWS[0], {"review": "keyless", "product": "p9"}]))
    assert err.value.failed == [1]
    assert err.value.rows[1]["castore_metadata"]["rate"]["error"].startswith(
        "format_output raised KeyError: 'score'"
    )


def test_task_columns_prompts_and_fingerprint():
    from castore.distilabel.models import OpenAILLM
    from castore.distilabel.steps.tasks import Task, task

    m = load("custom_task")
    llm = OpenAILLM(model="judge")
    rate = m.RateReview(llm=llm)
    assert rate.inputs == {"review": True, "product": True}  # as declared
    assert rate.required_columns() == ["review", "product"]
    assert rate.outputs == ["label", "score", "model_name"]  # model_name added, as distilabel
    summarize = m.Summarize(llm=llm)
    params = summarize.identity()["params"]
    assert params["system_prompt"] == "You write summaries of at most five words."
    assert params["user_message_template"] == "Summarize this review: {review}"
    # The prompts are fields: an edited docstring (or a prompt set here) asks again.
    assert summarize.fingerprint() != m.Summarize(llm=llm, system_prompt="Be brief.").fingerprint()
    # Several generations per row, grouped, are lists of every output column.
    assert m.RateReview(llm=llm, num_generations=2, group_generations=True).row_wise

    with pytest.raises(PipelineError, match=r"uses \{topic\}, which is not one of its inputs"):

        @task(inputs=["review"], outputs=["x"])
        def Bad(output, input=None):
            """---
            system_prompt: Talk about {topic}.
            user_message_template: "{review}"
            ---"""

    with pytest.raises(PipelineError, match="has 'temperature', which @task does not read"):

        @task(inputs=["review"], outputs=["x"])
        def Extra(output, input=None):
            """---
            system_prompt: Be short.
            user_message_template: "{review}"
            temperature: 0.2
            ---"""

    with pytest.raises(PipelineError, match="docstring must hold YAML between two '---'"):

        @task(inputs=["review"], outputs=["x"])
        def NoPrompts(output, input=None):
            """Only words."""

    class Half(Task):
        @property
        def inputs(self):
            return ["review"]

        def format_input(self, input):
            return [{"role": "user", "content": input["review"]}]

    with pytest.raises(ValueError, match="missing: format_output"):
        Half(llm=llm)

    class Loose(Half):
        @property
        def inputs(self):
            return {"review": "yes"}

        def format_output(self, output, input):
            return {"x": output}

    with pytest.raises(PipelineError, match=r"Loose.inputs must map column names to True / False"):
        Loose(llm=llm).required_columns()
    with pytest.raises(ValueError, match="structured_output"):
        m.RateReview(llm=llm, use_default_structured_output=True)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("not_chat", "format_input must return a list of \\{'role', 'content'\\} dicts"),
        ("not_dict", "format_output must return a dict of its output columns \\['a'\\], not str"),
        ("extra", "returned column 'b', which is not among its outputs"),
        ("undeclared", "reads column 'id', which is not among its inputs \\['q'\\]"),
    ],
)
def test_a_task_that_breaks_its_contract_fails_saying_how(server, kind, message):  # noqa: F811
    from castore.distilabel.models import OpenAILLM
    from castore.distilabel.pipeline import Pipeline
    from castore.distilabel.steps import LoadDataFromDicts
    from castore.distilabel.steps.tasks import Task

    class Broken(Task):
        @property
        def inputs(self):
            return ["q"]

        @property
        def outputs(self):
            return ["a"]

        def format_input(self, input):
            if kind == "not_chat":
                return input["q"]
            return [{"role": "user", "content": input["q"]}]

        def format_output(self, output, input):
            if kind == "not_dict":
                return output
            if kind == "extra":
                return {"a": output, "b": 1}
            if kind == "undeclared":
                return {"a": input["id"]}
            return {"a": output}

    with Pipeline(name=f"broken-{kind}") as p:
        LoadDataFromDicts(data=[{"id": 1, "q": "x"}]) >> Broken(llm=OpenAILLM(model="m"))
    with pytest.raises(CastoreError, match=message):
        p.run()


# pytest resets warning filters per test; the subprocess below checks castore's own.
@pytest.mark.filterwarnings("ignore:Field name .* shadows an attribute")
def test_columns_declared_in_the_class_body_or_set_in_model_post_init(server):  # noqa: F811
    """distilabel's own tasks and steps (ArenaHard, ArenaHardResults) declare columns as
    `inputs: StepColumns = [...]` in the class body, or set `self.inputs` from a field in
    model_post_init; both work, from distilabel's older import paths too, silently."""
    from typing import Any

    from castore.distilabel.models import OpenAILLM
    from castore.distilabel.pipeline import Pipeline
    from castore.distilabel.steps import GlobalStep, LoadDataFromDicts, StepInput
    from castore.distilabel.steps.tasks.base import Task
    from castore.distilabel.steps.tasks.typing import ChatType
    from castore.distilabel.steps.typing import StepColumns

    class Judge(Task):
        inputs: StepColumns = ["instruction", "generations"]
        outputs: StepColumns = ["verdict"]  # model_name added, as distilabel adds it

        def format_input(self, input: dict[str, Any]) -> ChatType:
            a, b = input["generations"]
            return [{"role": "user", "content": f"{input['instruction']}: {a} or {b}"}]

        def format_output(self, output, input=None):
            return {"verdict": output}

    class Results(GlobalStep):
        extra: str | None = None

        def model_post_init(self, context: Any) -> None:
            super().model_post_init(context)
            self.inputs = ["verdict"] + ([self.extra] if self.extra else [])

        def process(self, inputs: StepInput):
            yield [{**r, "n": len(inputs)} for r in inputs]

    def build(extra=None):
        with Pipeline(name="judge") as p:
            load = LoadDataFromDicts(data=[{"instruction": "q", "generations": ["a", "b"]}])
            load >> Judge(llm=OpenAILLM(model="m")) >> Results(extra=extra)
        return p

    train = build().run()["default"]["train"]
    assert train["verdict"] == ["answer(m): b ro a :q"] and train["n"] == [1]
    assert train["model_name"] == ["m"]
    assert server.bodies[-1]["messages"][-1]["content"] == "q: a or b"
    # pydantic warns of a field over the base's attribute; castore.distilabel does not.
    script = (
        "from castore.distilabel.steps.tasks import Task\n"
        "class T(Task):\n    inputs: list = ['a']\n    outputs: list = ['b']\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == ""
    assert Results(extra="judge_model").inputs == ["verdict", "judge_model"]
    with pytest.raises(PipelineError, match="needs input column 'judge_model'"):
        build(extra="judge_model").run()


def test_print_shows_the_conversation_a_row_sends(capsys):
    from castore.distilabel.models import OpenAILLM
    from castore.distilabel.steps.tasks import QualityScorer

    m = load("custom_task")
    m.Summarize(llm=OpenAILLM(model="m")).print()
    assert capsys.readouterr().out == (
        "--- system ---\nYou write summaries of at most five words.\n"
        "--- user ---\nSummarize this review: <PLACEHOLDER_REVIEW>\n"
    )
    with pytest.raises(PipelineError, match=r"needs sample_input=\[\.\.\.\]"):
        QualityScorer(llm=OpenAILLM(model="m")).print()  # its input is a list
    QualityScorer(llm=OpenAILLM(model="m")).print([{"role": "user", "content": "hi"}])
    assert capsys.readouterr().out == "--- user ---\nhi\n"
    with pytest.raises(PipelineError, match="takes a conversation: a list of dicts"):
        QualityScorer(llm=OpenAILLM(model="m")).print("hi")  # type: ignore[arg-type]


def test_an_optional_input_is_read_when_there_and_keys_tell_whether_it_was(server):  # noqa: F811
    """distilabel's {column: False}: the task runs without the column (no build error),
    sees it when the input has it, and a row without it never reuses an answer made with
    it (nor one made with it None)."""
    from castore.distilabel.models import OpenAILLM
    from castore.distilabel.pipeline import Pipeline
    from castore.distilabel.steps import LoadDataFromDicts
    from castore.distilabel.steps.tasks import Task

    class Ask(Task):
        @property
        def inputs(self):
            return {"q": True, "system": False}

        @property
        def outputs(self):
            return ["a"]

        def format_input(self, input):
            system = [{"role": "system", "content": input["system"]}] if input.get("system") else []
            return [*system, {"role": "user", "content": input["q"]}]

        def format_output(self, output, input):
            return {"a": output}

    def run(rows):
        with Pipeline(name="optional") as p:
            LoadDataFromDicts(data=rows) >> Ask(llm=OpenAILLM(model="m"))
        before = server.requests
        train = p.run()["default"]["train"]
        return server.requests - before, train

    bare = [{"q": "x"}, {"q": "y"}]
    assert run(bare)[0] == 2
    with_system = [{"q": "x", "system": "S"}, {"q": "y", "system": "S"}]
    asked, train = run(with_system)
    assert asked == 2 and server.bodies[-1]["messages"][0] == {"role": "system", "content": "S"}
    assert train["system"] == ["S", "S"] and all(train["a"])
    assert run([{"q": "x", "system": None}, {"q": "y", "system": None}])[0] == 2
    assert run(bare)[0] == run(with_system)[0] == 0
