"""A step's code version follows what its `process` reaches in the user's code
(castore/fingerprint.py): each edit below changed what a step returns but not its key,
so a fresh process was served the rows of the old code. Each case is imported twice
under new names, once as written and once edited: the code versions must differ, and
a copy left as written must keep the same version (the names do not count)."""

from __future__ import annotations

import contextlib
import importlib
import json
import sys
import uuid

import pytest

from castore.llms import OpenAILLM
from castore.steps import TextGeneration
from tests.test_loaded import METHOD

URL = "http://127.0.0.1:9/v1"  # nothing is sent: only fingerprints are computed

# (step module, helper module, text edited, edited to). `{helper}` is the helper's name.
CASES = {
    "a method called inside a comprehension": (METHOD, "", "v * 2", "v * 3"),
    "a class constant read as self.NAME": (
        """
from typing import ClassVar
from castore import Step, StepInput
class Times(Step):
    inputs = ["x"]
    outputs = ["y"]
    K: ClassVar[int] = 2
    def process(self, inputs: StepInput):
        yield [{**r, "y": r["x"] * self.K} for r in inputs]
""",
        "",
        "K: ClassVar[int] = 2",
        "K: ClassVar[int] = 3",
    ),
    "a class constant read as type(self).NAME": (
        """
from typing import ClassVar
from castore import Step, StepInput
class Times(Step):
    inputs = ["x"]
    outputs = ["y"]
    K: ClassVar[int] = 2
    def process(self, inputs: StepInput):
        k = type(self).K
        yield [{**r, "y": r["x"] * k} for r in inputs]
""",
        "",
        "K: ClassVar[int] = 2",
        "K: ClassVar[int] = 3",
    ),
    "a class-level list read as self.__class__.NAME": (
        """
from typing import ClassVar
from castore import Step, StepInput
class Times(Step):
    inputs = ["x"]
    outputs = ["y"]
    KS: ClassVar[list] = [2]
    def process(self, inputs: StepInput):
        yield [{**r, "y": r["x"] * sum(self.__class__.KS)} for r in inputs]
""",
        "",
        "KS: ClassVar[list] = [2]",
        "KS: ClassVar[list] = [3]",
    ),
    "a method reached through super()": (
        """
from castore import Step, StepInput
class Base(Step):
    inputs = ["x"]
    outputs = ["y"]
    def rows(self, inputs):
        return [{**r, "y": r["x"] * 2} for r in inputs]
class Times(Base):
    def rows(self, inputs):
        return super().rows(inputs)
    def process(self, inputs: StepInput):
        yield self.rows(inputs)
""",
        "",
        '"x"] * 2',
        '"x"] * 3',
    ),
    "a helper wrapped by functools.cache": (
        """
import functools
from castore import step, StepInput
@functools.lru_cache
def factor():
    return 2
@step(inputs=["x"], outputs=["y"])
def Times(inputs: StepInput):
    return [{**r, "y": r["x"] * factor()} for r in inputs]
""",
        "",
        "return 2",
        "return 3",
    ),
    "a method of a module-level instance": (
        """
from castore import step, StepInput
class Fmt:
    def apply(self, v):
        return v * 2
FMT = Fmt()
@step(inputs=["x"], outputs=["y"])
def Times(inputs: StepInput):
    return [{**r, "y": FMT.apply(r["x"])} for r in inputs]
""",
        "",
        "v * 2",
        "v * 3",
    ),
    "the arguments of a functools.partial": (
        """
import functools
from castore import step, StepInput
def mul(v, k):
    return v * k
TIMES = functools.partial(mul, k=2)
@step(inputs=["x"], outputs=["y"])
def Times(inputs: StepInput):
    return [{**r, "y": TIMES(r["x"])} for r in inputs]
""",
        "",
        "k=2",
        "k=3",
    ),
    "a compiled pattern": (
        """
import re
from castore import step, StepInput
PAT = re.compile("aa")
@step(inputs=["x"], outputs=["y"])
def Times(inputs: StepInput):
    return [{**r, "y": len(PAT.findall(r["x"]))} for r in inputs]
""",
        "",
        're.compile("aa")',
        're.compile("a")',
    ),
    "a function held in a dict": (
        """
from castore import step, StepInput
def double(v):
    return v * 2
OPS = {"double": double}
@step(inputs=["x"], outputs=["y"])
def Times(inputs: StepInput):
    return [{**r, "y": OPS["double"](r["x"])} for r in inputs]
""",
        "",
        "v * 2",
        "v * 3",
    ),
    "a function held in a tuple": (
        """
from castore import step, StepInput
def double(v):
    return v * 2
OPS = (double,)
@step(inputs=["x"], outputs=["y"])
def Times(inputs: StepInput):
    return [{**r, "y": OPS[0](r["x"])} for r in inputs]
""",
        "",
        "v * 2",
        "v * 3",
    ),
    "a cached property": (
        """
import functools
from castore import Step, StepInput
class Times(Step):
    inputs = ["x"]
    outputs = ["y"]
    @functools.cached_property
    def k(self):
        return 2
    def process(self, inputs: StepInput):
        yield [{**r, "y": r["x"] * self.k} for r in inputs]
""",
        "",
        "return 2",
        "return 3",
    ),
    "a constant read by a helper's default argument": (
        """
from castore import step, StepInput
FACTOR = 2
def scale(v, k=FACTOR):
    return v * k
@step(inputs=["x"], outputs=["y"])
def Times(inputs: StepInput):
    return [{**r, "y": scale(r["x"])} for r in inputs]
""",
        "",
        "FACTOR = 2",
        "FACTOR = 3",
    ),
    "what load() prepares for process": (
        """
from castore import Step, StepInput
class Times(Step):
    inputs = ["x"]
    outputs = ["y"]
    def load(self):
        super().load()
        self._k = 2
    def process(self, inputs: StepInput):
        yield [{**r, "y": r["x"] * self._k} for r in inputs]
""",
        "",
        "self._k = 2",
        "self._k = 3",
    ),
    "a list a step factory closes over": (
        """
from castore import step, StepInput
def make(labels):
    @step(inputs=["x"], outputs=["y"])
    def Times(inputs: StepInput):
        return [{**r, "y": r["x"] * len(labels)} for r in inputs]
    return Times
Times = make(["a", "b"])
""",
        "",
        '["a", "b"]',
        '["a", "b", "c"]',
    ),
    "a list imported from another module": (
        """
from castore import step, StepInput
from {helper} import LABELS
@step(inputs=["x"], outputs=["y"])
def Times(inputs: StepInput):
    return [{**r, "y": r["x"] * len(LABELS)} for r in inputs]
""",
        "LABELS = [1, 2]\n",
        "[1, 2]",
        "[1, 2, 3]",
    ),
    "an object imported from another module": (
        """
from castore import step, StepInput
from {helper} import PAT
@step(inputs=["x"], outputs=["y"])
def Times(inputs: StepInput):
    return [{**r, "y": len(PAT.findall(r["x"]))} for r in inputs]
""",
        'import re\nPAT = re.compile("aa")\n',
        '"aa"',
        '"a"',
    ),
}

# Module-level values made by more than one statement, or by what a statement reads.
_MADE = """
from castore import step, StepInput
{setup}
@step(inputs=["x"], outputs=["y"])
def Times(inputs: StepInput):
    return [{{**r, "y": {expr}}} for r in inputs]
"""
for _case, (_setup, _expr, _old, _new) in {
    "a dict changed by a later statement": (
        'PARAMS = {"s": "x"}\nPARAMS["s"] = "old"\n',
        'PARAMS["s"]',
        '"old"',
        '"new"',
    ),
    "a list appended to at module level": ('L = ["a"]\nL.append("old")\n', "L[-1]", "old", "new"),
    "a list assigned in a branch": (
        'FLAG = True\nif FLAG:\n    L = ["old"]\nelse:\n    L = ["z"]\n',
        "L[0]",
        "old",
        "new",
    ),
    "the condition of the branch that assigns it": (
        'FLAG = True\nif FLAG:\n    L = ["a"]\nelse:\n    L = ["z"]\n',
        "L[0]",
        "FLAG = True",
        "FLAG = False",
    ),
    "a list assigned in a try": (
        'try:\n    L = ["old"]\nexcept Exception:\n    L = []\n',
        "L[0]",
        "old",
        "new",
    ),
    "a list unpacked from a tuple": ('A, B = ["old"], ["b"]\n', "A[0]", "old", "new"),
    "a pattern compiled from a constant": (
        'import re\nPATTERN = "old"\nPAT = re.compile(PATTERN)\n',
        "PAT.pattern",
        '"old"',
        '"new"',
    ),
    "a dict a function of yours makes": (
        'def make():\n    return {"s": "old"}\nD = make()\n',
        'D["s"]',
        "old",
        "new",
    ),
    "a dict a function sets through `global`": (
        'STATE = {"s": "x"}\ndef setup():\n    global STATE\n    STATE = {"s": "old"}\nsetup()\n',
        'STATE["s"]',
        "old",
        "new",
    ),
    "a list computed from another constant": (
        'BASE = ["old"]\nL = [x.upper() for x in BASE]\n',
        "L[0]",
        "old",
        "new",
    ),
}.items():
    CASES[_case] = (_MADE.format(setup=_setup, expr=_expr), "", _old, _new)

CASES["a class constant changed after the class"] = (
    """
from typing import ClassVar
from castore import Step, StepInput
class Times(Step):
    inputs = ["x"]
    outputs = ["y"]
    K: ClassVar[dict] = {"s": "x"}
    def process(self, inputs: StepInput):
        yield [{**r, "y": self.K["s"]} for r in inputs]
Times.K["s"] = "old"
""",
    "",
    "old",
    "new",
)

_IMPORTED = CASES["a list imported from another module"]
CASES["a list imported with from ... import *"] = (
    _IMPORTED[0].replace("import LABELS", "import *"),
    *_IMPORTED[1:],
)


@contextlib.contextmanager
def imported(tmp_path, monkeypatch, source: str):
    """`source` imported as a module of a new name, gone from sys.modules after."""
    name = f"steps_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        yield importlib.import_module(name)
    finally:
        sys.modules.pop(name, None)


def code_version(tmp_path, monkeypatch, step_source: str, helper_source: str) -> str:
    tag = uuid.uuid4().hex[:8]
    helper, name = f"helper_{tag}", f"steps_{tag}"
    (tmp_path / f"{helper}.py").write_text(helper_source)
    (tmp_path / f"{name}.py").write_text(step_source.replace("{helper}", helper))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        return importlib.import_module(name).Times(name="t").code_version()
    finally:
        sys.modules.pop(name, None)
        sys.modules.pop(helper, None)


@pytest.mark.parametrize("case", list(CASES))
def test_an_edit_of_what_process_reaches_changes_the_code_version(case, tmp_path, monkeypatch):
    step_source, helper_source, old, new = CASES[case]
    assert old in step_source + helper_source
    first = code_version(tmp_path, monkeypatch, step_source, helper_source)
    again = code_version(tmp_path, monkeypatch, step_source, helper_source)
    edited = code_version(
        tmp_path, monkeypatch, step_source.replace(old, new), helper_source.replace(old, new)
    )
    assert first == again
    assert edited != first


def test_a_module_level_logger_does_not_enter_the_code_version(tmp_path, monkeypatch):
    """A logger changes no row: steps that log keep the keys they had."""
    plain = """
from castore import step, StepInput
@step(inputs=["x"], outputs=["y"])
def Times(inputs: StepInput):
    return [{**r, "y": r["x"]} for r in inputs]
"""
    logging_ = plain.replace(
        "from castore import", "import logging\nlog = logging.getLogger('x')\nfrom castore import"
    ).replace("    return [{**r", '    log.debug("n")\n    return [{**r')
    assert code_version(tmp_path, monkeypatch, plain, "") != code_version(
        tmp_path, monkeypatch, logging_, ""
    )  # the function's text differs, of course; what it reaches does not add a part
    step = logging_.replace("logging.getLogger('x')", "logging.getLogger('y')")
    assert code_version(tmp_path, monkeypatch, logging_, "") == code_version(
        tmp_path, monkeypatch, step, ""
    )


SUBCLASSES = {
    "an override in a subclass of TextGeneration": (
        """
from castore.steps import TextGeneration
class MyGen(TextGeneration):
    def conversation(self, row):
        return [{"role": "user", "content": row["instruction"] + " please"}]
""",
        lambda m, llm: m.MyGen(name="g", llm=llm),
    ),
    "format_input of a distilabel Task subclass": (
        """
from castore.distilabel.steps.tasks import TextGeneration
class MyTask(TextGeneration):
    def format_input(self, input):
        return [{"role": "user", "content": input["instruction"] + " please"}]
""",
        lambda m, llm: m.MyTask(name="g", llm=llm),
    ),
    "a subclass of an LLM": (
        """
from castore.llms import OpenAILLM
class MyLLM(OpenAILLM):
    def chat_body(self, conversation):
        body = super().chat_body(conversation)
        body["stop"] = ["please"]
        return body
""",
        lambda m, llm: TextGeneration(name="g", llm=m.MyLLM(model="m", base_url=URL)),
    ),
}


@pytest.mark.parametrize("case", list(SUBCLASSES))
def test_a_subclass_of_a_built_in_is_part_of_the_code_version(case, tmp_path, monkeypatch):
    """castore's own `process` calls the user's overrides, or a user's LLM class: their
    code enters the fingerprint (it did not: an edited `format_input` kept the key)."""
    source, build = SUBCLASSES[case]

    def fingerprint(text: str) -> str:
        name = f"sub_{uuid.uuid4().hex[:8]}"
        (tmp_path / f"{name}.py").write_text(text)
        monkeypatch.syspath_prepend(str(tmp_path))
        try:
            module = importlib.import_module(name)
            return build(module, OpenAILLM(model="m", base_url=URL, api_key="k")).fingerprint()
        finally:
            sys.modules.pop(name, None)

    assert fingerprint(source) == fingerprint(source)
    assert fingerprint(source.replace("please", "thanks")) != fingerprint(source)


PREDICATE = """
MIN_LEN = 3


def long_enough(row):
    return len(row["t"]) >= MIN_LEN
"""


def test_a_filter_predicate_follows_what_it_reads(tmp_path, monkeypatch):
    """FilterRows(predicate=f) hashed f's own code only: a threshold constant it reads
    could change which rows pass and keep the key."""
    from castore.steps import FilterRows

    def identity(text: str) -> object:
        name = f"pred_{uuid.uuid4().hex[:8]}"
        (tmp_path / f"{name}.py").write_text(text)
        monkeypatch.syspath_prepend(str(tmp_path))
        try:
            module = importlib.import_module(name)
            return FilterRows(name="f", predicate=module.long_enough).fingerprint()
        finally:
            sys.modules.pop(name, None)

    assert identity(PREDICATE) == identity(PREDICATE)
    assert identity(PREDICATE.replace("= 3", "= 4")) != identity(PREDICATE)


def test_a_list_a_step_appends_to_is_not_its_key(tmp_path, monkeypatch):
    """A closure's list the step changes in place (a collector) is state, not
    configuration: keyed by value it would give every run another key."""
    source = """
from castore import step, StepInput
def make(seen):
    @step(inputs=["x"], outputs=["y"])
    def Times(inputs: StepInput):
        seen.extend(r["x"] for r in inputs)
        return [{**r, "y": r["x"]} for r in inputs]
    return Times
SEEN = []
Times = make(SEEN)
"""
    with imported(tmp_path, monkeypatch, source) as module:
        before = module.Times(name="t").code_version()
        module.SEEN.extend([1, 2, 3])
        assert module.Times(name="t").code_version() == before


ENV_STEP = """
import os
from os import getenv
from castore import step, StepInput

STYLE = "CASTORE_T_STYLE"


def style():
    return getenv(STYLE, "plain")

@step(inputs=["x"], outputs=["y"])
def Times(inputs: StepInput):
    k = int(os.environ.get("CASTORE_T_FACTOR", "2"))
    key = os.environ["CASTORE_T_API_KEY"]  # a credential: never hashed
    return [{**r, "y": f"{style()}:{r['x'] * k}:{len(key)}"} for r in inputs]
"""


def test_environment_variables_process_reads_are_in_the_code_version(tmp_path, monkeypatch):
    """`process` (or a helper) reading an environment variable by name: its value is
    part of the code version, as a constant's would be; a variable named like a
    credential is left out (a secret never reaches a hash)."""
    monkeypatch.setenv("CASTORE_T_API_KEY", "sk-one")
    monkeypatch.setenv("CASTORE_T_FACTOR", "2")
    first = code_version(tmp_path, monkeypatch, ENV_STEP, "")
    assert code_version(tmp_path, monkeypatch, ENV_STEP, "") == first
    monkeypatch.setenv("CASTORE_T_API_KEY", "sk-two")
    assert code_version(tmp_path, monkeypatch, ENV_STEP, "") == first
    monkeypatch.setenv("CASTORE_T_FACTOR", "3")
    factor = code_version(tmp_path, monkeypatch, ENV_STEP, "")
    assert factor != first
    monkeypatch.setenv("CASTORE_T_STYLE", "fancy")  # read by a helper, via getenv
    assert code_version(tmp_path, monkeypatch, ENV_STEP, "") not in (first, factor)
    monkeypatch.delenv("CASTORE_T_STYLE")
    assert code_version(tmp_path, monkeypatch, ENV_STEP, "") == factor
    # A variable that does not change the rows (a debug flag) can be left out.
    ignoring = ENV_STEP.replace('outputs=["y"]', 'outputs=["y"], ignore_env=["CASTORE_T_FACTOR"]')
    kept = code_version(tmp_path, monkeypatch, ignoring, "")
    monkeypatch.setenv("CASTORE_T_FACTOR", "4")
    assert code_version(tmp_path, monkeypatch, ignoring, "") == kept


@pytest.mark.parametrize(
    "define",
    [
        "@step(inputs=['x'], outputs=['y'], ignore_env='DEBUG')\ndef S(inputs): return inputs",
        "@step(inputs='x', outputs=['y'])\ndef S(inputs): return inputs",
        "@step(inputs=['x'], outputs=['y'], code_packages='openai')\ndef S(inputs): return inputs",
        "class S(Step):\n    inputs = ['x']\n    ignore_env = 'DEBUG'",
        "class S(Step):\n    outputs = 'y'",
        "class S(Step):\n    code_packages = ['openai', 3]",
    ],
)
def test_a_name_list_given_as_a_string_is_refused_in_one_line(tmp_path, define):
    """`ignore_env="DEBUG"` used to be read letter by letter (variables D, E, B, U, G
    left out of the key, DEBUG kept): an argument silently not doing what it says."""
    from castore.errors import PipelineError

    with pytest.raises(PipelineError, match=r"must (be a list of names|hold names)") as err:
        exec(f"from castore import Step, step\n{define}", {})
    assert "\n" not in str(err.value)
    # The same, spelled right, defines the step.
    fixed = define.replace("'DEBUG'", "['DEBUG']").replace("inputs='x'", "inputs=['x']")
    fixed = fixed.replace("'openai')", "['openai'])").replace("= 'y'", "= ['y']")
    fixed = fixed.replace("['openai', 3]", "['openai']")
    namespace: dict = {}
    exec(f"from castore import Step, step\n{fixed}", namespace)
    assert all(isinstance(getattr(namespace["S"], a), list) for a in ("inputs", "ignore_env"))


def test_a_changed_environment_variable_is_named_by_explain(tmp_path, monkeypatch):
    from castore import Pipeline
    from castore.steps import LoadDataFromDicts
    from tests.conftest import cas_inproc

    monkeypatch.setenv("CASTORE_T_API_KEY", "sk-one")
    cache = tmp_path / "c"
    with imported(tmp_path, monkeypatch, ENV_STEP) as module:
        for factor in ("2", "5"):
            monkeypatch.setenv("CASTORE_T_FACTOR", factor)
            with Pipeline(name="env") as p:
                LoadDataFromDicts(data=[{"x": 1}]) >> module.Times(name="times")
            ds = p.run(cache_dir=cache, quiet=True)
            assert ds["times"]["train"].to_list() == [{"x": 1, "y": f"plain:{factor}:6"}]
    text = cas_inproc("explain", "env", "times", cache_dir=cache).stdout
    assert "value of environment variable CASTORE_T_FACTOR changed" in text, text
    assert not any(b"sk-one" in f.read_bytes() for f in cache.rglob("*") if f.is_file())


FROM_FILE = """
import json
import pathlib
from castore import step, StepInput
HERE = pathlib.Path(__file__).parent
PROMPTS = json.load(open(HERE / "prompts.json"))
FEW_SHOT = [json.loads(line) for line in open(HERE / "shots.jsonl")]
COUNTS = {}
@step(inputs=["x"], outputs=["y"])
def Times(inputs: StepInput):
    COUNTS["calls"] = COUNTS.get("calls", 0) + 1  # state the run keeps: not the key
    return [{**r, "y": PROMPTS["style"] + FEW_SHOT[0]["q"]} for r in inputs]
"""


def test_a_value_made_by_a_call_is_keyed_by_its_value(tmp_path, monkeypatch):
    """Prompts loaded from a file as the module is imported: the statement never
    changes, the file does. A value made by a call is keyed by what it was when first
    hashed in the process (and a literal, a counter the run fills, by its statement)."""

    def version(style: str, q: str) -> str:
        (tmp_path / "prompts.json").write_text(json.dumps({"style": style}))
        (tmp_path / "shots.jsonl").write_text(json.dumps({"q": q}) + "\n")
        return code_version(tmp_path, monkeypatch, FROM_FILE, "")

    first = version("formal", "a?")
    assert version("formal", "a?") == first
    assert version("pirate", "a?") != first
    assert version("formal", "b?") != first
    # In one process: hashed again after the run changed its counter, the same key.
    (tmp_path / "prompts.json").write_text(json.dumps({"style": "formal"}))
    with imported(tmp_path, monkeypatch, FROM_FILE) as module:
        before = module.Times(name="t").code_version()
        module.COUNTS["calls"] = 5
        module.FEW_SHOT.append({"q": "later"})  # changed at run time: the loaded version
        assert module.Times(name="t").code_version() == before
