"""No silent wrong data from prompts or fan-in: Jinja2 templates rendered exactly (the
local server records each prompt it received), every way a template could send text
with a variable left in it refused in one line, and predecessors that would overwrite
each other's columns refused."""

from __future__ import annotations

import json

import pytest

from castore import Pipeline, StepInput, step
from castore.errors import PipelineError, StepFailed
from castore.llms import OpenAILLM
from castore.steps import (
    CombineOutputs,
    LoadDataFromDicts,
    LoadDataFromFileSystem,
    RenameColumns,
    TextGeneration,
)
from tests.conftest import cas_inproc
from tests.llm_server import LLMServer


def llm(server: LLMServer, model: str = "test-model") -> OpenAILLM:
    return OpenAILLM(model=model, base_url=server.base_url, backoff=0.01, timeout=5.0)


ROWS = [
    {"instruction": "Name a prime", "level": "kids", "tags": ["math", "fun"]},
    {"instruction": "Define entropy", "level": "experts", "tags": []},
]


def test_jinja_templates_are_rendered_exactly(tmp_path, server):
    """distilabel's templates work as written: variables, conditionals, loops, filters."""
    template = (
        "{{ instruction }} (for {{ level | upper }})"
        "{% if tags %} tags:{% for t in tags %} #{{ t }}{% endfor %}{% endif %}"
    )
    with Pipeline(name="jinja") as p:
        LoadDataFromDicts(data=ROWS) >> TextGeneration(llm=llm(server), template=template)
    ds = p.run(cache_dir=tmp_path / "c", quiet=True)
    assert set(server.by_prompt) == {
        "Name a prime (for KIDS) tags: #math #fun",
        "Define entropy (for EXPERTS)",
    }
    gens = ds["text_generation"]["train"]["generation"]
    assert gens[0].endswith("Name a prime (for KIDS) tags: #math #fun"[::-1])
    with Pipeline(name="default") as p:
        LoadDataFromDicts(data=ROWS) >> TextGeneration(llm=llm(server))
    p.run(cache_dir=tmp_path / "c", quiet=True)
    assert "Name a prime" in server.by_prompt  # the default template: {{ instruction }}


@pytest.mark.parametrize(
    ("template", "needle"),
    [
        ("{instruction}", "write {{ instruction }}"),  # str.format: sent literally before
        ("Q: { instruction } for {{ level }}", "write {{ instruction }}"),
        ("{{ instruction }} to {{ audience }}", "'audience'"),  # a column nobody makes
        ("{{ instruction ", "not valid Jinja2"),
        ("{% for x in tags %}{{ x }}", "not valid Jinja2"),
    ],
)
def test_a_template_that_cannot_render_right_fails_at_build_time(
    tmp_path, server, template, needle
):
    with Pipeline(name="bad") as p:
        LoadDataFromDicts(data=ROWS) >> TextGeneration(
            name="gen", llm=llm(server), template=template
        )
    with pytest.raises(PipelineError, match="step gen") as e:
        p.run(cache_dir=tmp_path / "c", quiet=True)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert server.requests == 0


def test_a_row_without_a_template_variable_fails_its_batch(tmp_path, server):
    """Columns unknown at build time (a file): StrictUndefined stops the request."""
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"instruction": "hi"}) + "\n" + json.dumps({"other": 1}) + "\n")
    with Pipeline(name="strict") as p:
        LoadDataFromFileSystem(data_files=str(data)) >> TextGeneration(
            name="gen", llm=llm(server), template="{{ instruction }}!"
        )
    with pytest.raises((PipelineError, StepFailed), match="'instruction' is undefined"):
        p.run(cache_dir=tmp_path / "c", quiet=True)
    assert "None!" not in server.by_prompt and "!" not in server.by_prompt


def test_cas_run_param_template_is_checked_too(tmp_path, server):
    path = tmp_path / "gen.py"
    path.write_text(
        "from castore import Pipeline\n"
        "from castore.llms import OpenAILLM\n"
        "from castore.steps import LoadDataFromDicts, TextGeneration\n"
        "with Pipeline(name='gen') as pipeline:\n"
        f"    LoadDataFromDicts(data={ROWS!r}) >> TextGeneration(name='gen', llm=OpenAILLM(\n"
        f"        model='m', base_url={server.base_url!r}))\n"
    )
    r = cas_inproc(
        "run", str(path), "--param", "gen.template={instruction} please", cache_dir=tmp_path / "c"
    )
    assert r.returncode == 1 and "write {{ instruction }}" in r.stderr
    assert r.stderr.count("\n") == 1  # one line, no traceback
    r = cas_inproc(
        "run", str(path), "--param", "gen.template=Hi {{ missing }}", cache_dir=tmp_path / "c"
    )
    assert r.returncode == 1 and "'missing'" in r.stderr
    assert server.requests == 0
    r = cas_inproc(
        "run", str(path), "--param", "gen.template=Hi {{ level }}", cache_dir=tmp_path / "c"
    )
    assert r.returncode == 0, r
    assert set(server.by_prompt) == {"Hi kids", "Hi experts"}


def test_six_generations_combined_do_not_overwrite_each_other(tmp_path, server):
    """The pool pattern: each model's `generation` would have overwritten the others."""
    with Pipeline(name="pool") as p:
        load = LoadDataFromDicts(data=ROWS)
        gens = [TextGeneration(name=f"gen{i}", llm=llm(server, f"m{i}")) for i in range(6)]
        load >> gens >> CombineOutputs(name="combine")
    with pytest.raises(PipelineError, match="gen0 and gen1 both produce column 'generation'"):
        p.run(cache_dir=tmp_path / "c", quiet=True)
    assert server.requests == 0

    with Pipeline(name="pool") as p:
        load = LoadDataFromDicts(data=ROWS)
        combine = CombineOutputs(name="combine")
        for i in range(3):
            gen = TextGeneration(name=f"gen{i}", llm=llm(server, f"m{i}"))
            rename = RenameColumns(
                name=f"rename{i}", mapping={"generation": f"gen_{i}", "model_name": f"model_{i}"}
            )
            load >> gen >> rename >> combine
    rows = p.run(cache_dir=tmp_path / "c", quiet=True)["combine"]["train"].to_list()
    assert [r["model_0"] for r in rows] == ["m0", "m0"] and rows[0]["model_2"] == "m2"
    assert all(r[f"gen_{i}"].startswith(f"answer(m{i})") for r in rows for i in range(3))


@step(inputs=["x"])
def Undeclared(inputs: StepInput, value: int = 0):
    """Writes a column it does not declare: only the batch check can see the clash."""
    return [{**r, "extra": value} for r in inputs]


def test_undeclared_columns_that_disagree_fail_the_batch(tmp_path):
    with Pipeline(name="undeclared") as p:
        load = LoadDataFromDicts(data=[{"x": i} for i in range(5)])
        a, b = Undeclared(name="a", value=1), Undeclared(name="b", value=2)
        load >> [a, b] >> CombineOutputs(name="combine")
    with pytest.raises(StepFailed, match="disagree on column 'extra'"):
        p.run(cache_dir=tmp_path / "c", quiet=True)
    with Pipeline(name="agree") as p:  # equal values (one upstream column): fine
        load = LoadDataFromDicts(data=[{"x": i} for i in range(5)])
        a, b = Undeclared(name="a", value=1), Undeclared(name="b", value=1)
        load >> [a, b] >> CombineOutputs(name="combine")
    rows = p.run(cache_dir=tmp_path / "c", quiet=True)["combine"]["train"].to_list()
    assert rows == [{"x": i, "extra": 1} for i in range(5)]
