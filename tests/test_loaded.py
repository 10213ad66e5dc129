"""The code a fingerprint hashes is the code that runs (castore/loaded.py): a module file
edited in a long-lived process (a notebook kernel) without a reload must not file the
old code's rows under the new code's key, where a fresh process would be served them."""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from castore import Pipeline
from castore.errors import StaleCode
from castore.pipeline.executors import signatures_for
from castore.steps import LoadDataFromDicts
from tests.conftest import REPO

STEP = """
from castore import step, StepInput


@step(inputs=["x"], outputs=["y"])
def Times(inputs: StepInput):
    return [{**r, "y": r["x"] * FACTOR} for r in inputs]
"""

ROWS = [{"x": i} for i in range(6)]


@contextlib.contextmanager
def user_module(tmp_path, monkeypatch, source: str):
    """`source` as a user module in its own file, imported under a name no other test
    uses: (the module, its path); forgotten by sys.modules afterwards."""
    name = f"user_{uuid.uuid4().hex[:8]}"
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        yield importlib.import_module(name), path
    finally:
        sys.modules.pop(name, None)


@pytest.fixture
def module(tmp_path, monkeypatch):
    """The STEP module; returns (module, write(factor)) where write edits the file in
    place (no reload)."""
    with user_module(tmp_path, monkeypatch, STEP.replace("FACTOR", "2")) as (mod, path):

        def write(factor: int) -> None:
            path.write_text(STEP.replace("FACTOR", str(factor)))

        yield mod, write


def run(mod, cache) -> tuple[list[int], int]:
    with Pipeline(name="loaded") as p:
        LoadDataFromDicts(data=ROWS, batch_size=6) >> mod.Times(name="times")
    ds = p.run(cache_dir=cache, quiet=True)
    return list(ds["times"]["train"]["y"]), ds.run.stats["times"].batches_computed


def fresh_process(mod, cache) -> tuple[list[int], int]:
    """The same pipeline run by a new Python process, which loads the file as it is."""
    folder = str(mod.__file__.rsplit("/", 1)[0])
    code = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {folder!r})
        from castore import Pipeline
        from castore.steps import LoadDataFromDicts
        import {mod.__name__} as mod
        with Pipeline(name="loaded") as p:
            LoadDataFromDicts(data={ROWS!r}, batch_size=6) >> mod.Times(name="times")
        ds = p.run(cache_dir={str(cache)!r}, quiet=True)
        print(json.dumps([list(ds["times"]["train"]["y"]), ds.run.stats["times"].batches_computed]))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    y, computed = json.loads(out.stdout)
    return y, computed


def test_an_edit_without_a_reload_keeps_the_loaded_codes_key(module, tmp_path, caplog):
    mod, write = module
    cache = tmp_path / "cache"
    assert run(mod, cache) == ([0, 2, 4, 6, 8, 10], 1)
    write(3)  # the file now says x * 3; this process still runs x * 2
    with caplog.at_level(logging.WARNING, logger="castore"):
        assert run(mod, cache) == ([0, 2, 4, 6, 8, 10], 0)  # the loaded code, its key
    assert "changed after Times was loaded" in caplog.text
    # A new process runs the file's code: it must not be served the x * 2 rows.
    assert fresh_process(mod, cache) == ([0, 3, 6, 9, 12, 15], 1)
    # Reloaded, this process runs x * 3 too, and finds those rows.
    importlib.reload(mod)
    assert run(mod, cache) == ([0, 3, 6, 9, 12, 15], 0)


def test_a_file_edited_between_import_and_first_run_is_refused(module, tmp_path):
    mod, write = module
    write(5)  # edited after the import, before castore hashed anything of it
    with pytest.raises(StaleCode, match="was edited after this process loaded it") as e:
        run(mod, tmp_path / "cache")
    assert "\n" not in str(e.value) and "importlib.reload" in str(e.value)
    importlib.reload(mod)
    assert run(mod, tmp_path / "cache") == ([0, 5, 10, 15, 20, 25], 1)


SHAPES = """
import functools
from castore import Step, StepInput, step

LIMIT = [1, 2, 3]


def deco(f):
    @functools.wraps(f)
    def inner(*a, **k):
        return f(*a, **k)
    return inner


@deco
def helper(v):
    return v + sum(LIMIT)


class Base(Step):
    inputs = ["x"]
    outputs = ["y"]


class Child(Base):
    @staticmethod
    def bump(v):
        return helper(v)

    def process(self, inputs: StepInput):
        yield [{**r, "y": self.bump(r["x"])} for r in super().process_rows(inputs)]

    def process_rows(self, inputs):
        return list(inputs)


def make(k):
    def scale(v):
        return v * k

    @step(inputs=["x"], outputs=["y"])
    def Scaled(inputs: StepInput):
        return [{**r, "y": scale(r["x"]) + (lambda q: q)(0)} for r in inputs]

    return Scaled
"""


def test_loaded_code_that_matches_its_file_is_accepted(tmp_path, monkeypatch):
    """Files written after the process started are compared with the code loaded from
    them: closures, super(), decorators, static methods and lambdas compare equal."""
    with user_module(tmp_path, monkeypatch, SHAPES) as (mod, _):
        with Pipeline(name="shapes") as p:
            load = LoadDataFromDicts(data=ROWS, batch_size=3)
            load >> mod.Child(name="child")
            load >> mod.make(3)(name="scaled")
        sigs = p.signatures()
        assert set(sigs) == {"load_data_from_dicts", "child", "scaled"}


PYTEST_MODULE = """
from castore import Pipeline, StepInput, step
from castore.steps import LoadDataFromDicts

SEEN = []


@step(inputs=["x"], outputs=["y"])
def AddOne(inputs: StepInput):
    SEEN.extend(inputs)
    return [{**r, "y": r["x"] + 1} for r in inputs]


def test_pipeline(tmp_path):
    with Pipeline(name="p") as p:
        LoadDataFromDicts(data=[{"x": 1}]) >> AddOne()
    ds = p.run(cache_dir=tmp_path / "c", quiet=True)
    assert ds["add_one"]["train"].to_list() == [{"x": 1, "y": 2}]
"""


def test_a_test_module_pytest_rewrote_compares_equal_to_its_file(tmp_path):
    """pytest compiles test modules with their asserts rewritten: a test module saved
    just before pytest started (here: dated after it) is compared with its file compiled
    the way pytest compiles it, not plainly (which differs in every function with an
    assert, and refused the run as "edited after this process loaded it")."""
    path = tmp_path / "test_steps.py"
    path.write_text(PYTEST_MODULE)
    later = time.time() + 30
    os.utime(path, (later, later))
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout[-3000:]
    assert "1 passed" in r.stdout
    # Compared as pytest compiles it, a real edit still differs: refused.
    edited = PYTEST_MODULE.replace(
        "def test_pipeline(tmp_path):",
        "def test_pipeline(tmp_path):\n"
        "    import pathlib, pytest\n"
        "    from castore.errors import StaleCode\n"
        "    f = pathlib.Path(__file__)\n"
        "    f.write_text(f.read_text().replace('+ 1}', '+ 2}'))\n"
        "    with pytest.raises(StaleCode, match='edited after this process loaded it'):\n"
        "        test_original(tmp_path)\n"
        "\n\n"
        "def test_original(tmp_path):",
    )
    path = tmp_path / "test_edited.py"
    path.write_text(edited)
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(path), "-k", "pipe"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout[-3000:]
    assert "1 passed" in r.stdout


def test_a_function_moved_in_its_file_after_import_is_refused(module, tmp_path):
    """Same code, other lines: inspect would read the loaded function's source from the
    line it started at, now another text; refused rather than hashed."""
    mod, _ = module
    path = mod.__file__
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write("# a comment\n# another\n" + text)
    with pytest.raises(StaleCode, match="edited after this process loaded it"):
        run(mod, tmp_path / "cache")


def test_executors_that_import_files_anew_refuse_an_edited_module(tmp_path, monkeypatch):
    """Processes where fork is not available import a step's module from its file, and
    Ray workers import every module but the steps' own (shipped by value): after an edit
    without a reload they would run the edit under the loaded code's key. Refused before
    anything starts; threads run the loaded code."""
    import multiprocessing as mp

    tag = uuid.uuid4().hex[:8]
    helper, steps = tmp_path / f"helper_{tag}.py", tmp_path / f"steps_{tag}.py"
    helper.write_text("def factor():\n    return 2\n")
    steps.write_text(
        f"from castore import step, StepInput\nimport helper_{tag} as helper\n\n\n"
        '@step(inputs=["x"], outputs=["y"])\n'
        "def Times(inputs: StepInput):\n"
        '    return [{**r, "y": r["x"] * helper.factor()} for r in inputs]\n'
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module(f"steps_{tag}")
    cache = tmp_path / "cache"
    try:
        assert run(mod, cache) == ([0, 2, 4, 6, 8, 10], 1)

        def pipeline() -> Pipeline:
            with Pipeline(name="loaded") as p:
                LoadDataFromDicts(data=ROWS, batch_size=6) >> mod.Times(name="times")
            return p

        # The steps' own module edited: Ray ships the loaded one by value, spawned
        # processes would import the file.
        steps.write_text(steps.read_text().replace('r["x"] *', '1 + r["x"] *'))
        assert signatures_for(pipeline(), "ray") == pipeline().signatures()
        with monkeypatch.context() as m:
            m.setattr(mp, "get_all_start_methods", lambda: ["spawn", "forkserver"])
            with pytest.raises(StaleCode, match="processes executor's workers import it"):
                signatures_for(pipeline(), "processes")
        assert signatures_for(pipeline(), "processes") == pipeline().signatures()  # fork
        # A helper module edited: Ray workers import it from the file.
        helper.write_text("def factor():\n    return 5\n")
        with pytest.raises(StaleCode, match="ray executor's workers import it anew"):
            pipeline().run(cache_dir=cache, quiet=True, executor="ray")
        ds = pipeline().run(cache_dir=cache, quiet=True, executor="threads")
        assert list(ds["times"]["train"]["y"]) == [0, 2, 4, 6, 8, 10]  # the loaded code
        # An edit elsewhere in the file (the hashed code unchanged) is no reason to refuse.
        helper.write_text("def factor():\n    return 2\n\n\ndef unrelated():\n    return 1\n")
        assert signatures_for(pipeline(), "ray") == pipeline().signatures()
    finally:
        sys.modules.pop(f"steps_{tag}", None)
        sys.modules.pop(f"helper_{tag}", None)


HELPER = """
from castore import step, StepInput


class Fmt:
    def fmt(self, v):
        return v * FACTOR


@step(inputs=["x"], outputs=["y"])
def Times(inputs: StepInput):
    return [{**r, "y": Fmt().fmt(r["x"])} for r in inputs]
"""


def test_a_class_patched_in_place_is_a_new_version(tmp_path, monkeypatch):
    """IPython's autoreload swaps a method's code in place (same class object): castore
    hashes the class again, so the patched code gets its own key."""
    with user_module(tmp_path, monkeypatch, HELPER.replace("FACTOR", "2")) as (mod, path):
        cache = tmp_path / "cache"
        assert run(mod, cache) == ([0, 2, 4, 6, 8, 10], 1)
        path.write_text(HELPER.replace("FACTOR", "7"))
        new: dict = {}
        exec(compile(path.read_text(), str(path), "exec", dont_inherit=True), new)
        mod.Fmt.fmt.__code__ = new["Fmt"].fmt.__code__  # what autoreload does
        assert run(mod, cache) == ([0, 7, 14, 21, 28, 35], 1)


LISTED = """
from castore import step, StepInput

LABELS = ["a", "b"]


@step(inputs=["x"], outputs=["y"])
def Times(inputs: StepInput):
    return [{**r, "y": r["x"] * len(LABELS)} for r in inputs]
"""


def test_a_module_level_list_edited_after_a_run_keeps_the_loaded_key(tmp_path, monkeypatch, caplog):
    """A module-level list is keyed by the code that assigns it: edited after a run
    without a reload, the loaded list still runs and keeps its key (with the warning),
    and workers that would import the edited module are refused."""
    import multiprocessing as mp

    with user_module(tmp_path, monkeypatch, LISTED) as (mod, path):
        cache = tmp_path / "cache"
        assert run(mod, cache) == ([0, 2, 4, 6, 8, 10], 1)
        path.write_text(LISTED.replace('["a", "b"]', '["a", "b", "c"]'))
        with caplog.at_level(logging.WARNING, logger="castore"):
            assert run(mod, cache) == ([0, 2, 4, 6, 8, 10], 0)
        assert "changed after" in caplog.text
        with Pipeline(name="loaded") as p:
            LoadDataFromDicts(data=ROWS, batch_size=6) >> mod.Times(name="times")
        monkeypatch.setattr(mp, "get_all_start_methods", lambda: ["spawn", "forkserver"])
        with pytest.raises(StaleCode, match="processes executor's workers import it"):
            signatures_for(p, "processes")


CONSTANTS = """
from typing import ClassVar

from castore import Step, StepInput

LABELS = ["a", "b"]


class Times(Step):
    inputs = ["x"]
    outputs = ["y"]
    FACTOR: ClassVar[int] = 1
    WEIGHTS: ClassVar[list[int]] = [1]

    def process(self, inputs: StepInput):
        k = self.FACTOR * sum(self.WEIGHTS) * len(LABELS) // 2
        yield [{**r, "y": r["x"] * k} for r in inputs]
"""
SCALED = [0, 2, 4, 6, 8, 10]


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("WEIGHTS: ClassVar[list[int]] = [1]", "WEIGHTS: ClassVar[list[int]] = [1, 1]"),
        ('["a", "b"]', '["a", "b", "c", "d"]'),
    ],
    ids=["class-level list", "module-level list"],
)
def test_a_list_edited_between_import_and_first_run_is_refused(tmp_path, monkeypatch, old, new):
    """A list (dict, set) is keyed by the code that assigns it, which code objects do
    not show: edited before the first run without a reload, the loaded list would run
    under the edited code's key, and a fresh process would be served its rows. Compared
    with the file's literal, it is refused instead."""
    with user_module(tmp_path, monkeypatch, CONSTANTS) as (mod, path):
        path.write_text(CONSTANTS.replace(old, new))
        with pytest.raises(
            StaleCode,
            match=r"assigns (Times.WEIGHTS|LABELS) another value than the one this process runs",
        ):
            run(mod, tmp_path / "cache")
        importlib.reload(mod)
        assert run(mod, tmp_path / "cache") == (SCALED, 1)
        assert fresh_process(mod, tmp_path / "cache") == (SCALED, 0)


def test_a_class_constant_is_keyed_by_its_value(tmp_path, monkeypatch):
    """`self.FACTOR` read inside a comprehension (where Python 3.11 loads `self` from a
    cell) is part of the key, by the value that runs: edited in the file, a fresh process
    computes anew (it was served the old rows), and a process that loaded the old value
    keys what it runs."""
    with user_module(tmp_path, monkeypatch, CONSTANTS) as (mod, path):
        cache = tmp_path / "cache"
        assert run(mod, cache) == ([0, 1, 2, 3, 4, 5], 1)
        path.write_text(CONSTANTS.replace("FACTOR: ClassVar[int] = 1", "FACTOR: ClassVar[int] = 2"))
        assert fresh_process(mod, cache) == (SCALED, 1)
        assert run(mod, cache) == ([0, 1, 2, 3, 4, 5], 0)  # loaded: FACTOR is 1 here


METHOD = """
from castore import Step, StepInput


class Times(Step):
    inputs = ["x"]
    outputs = ["y"]

    def bump(self, v):
        return v * 2

    def process(self, inputs: StepInput):
        yield [{**r, "y": self.bump(r["x"])} for r in inputs]
"""


def test_a_method_called_from_a_comprehension_is_part_of_the_key(tmp_path, monkeypatch):
    """`self.bump(...)` inside a list comprehension: edited, a fresh process must compute
    anew (it was served the old rows: `self` there is a cell, not a local)."""
    with user_module(tmp_path, monkeypatch, METHOD) as (mod, path):
        cache = tmp_path / "cache"
        assert run(mod, cache) == (SCALED, 1)
        path.write_text(METHOD.replace("v * 2", "v * 3"))
        assert fresh_process(mod, cache) == ([0, 3, 6, 9, 12, 15], 1)


UNCHANGED_VALUES = """
import dataclasses
import enum
from typing import ClassVar

from castore import Step, StepInput

REGISTRY = {}
SEEN = []
SEEN.append("import")
CALLS = 0
NAN = float("nan")
WEIGHTS = {"a": 1.0, "b": (1, 2), "c": {3, 4}, "d": None}


def register(f):
    REGISTRY[f.__name__] = f
    return f


@register
def double(v):
    global CALLS
    CALLS += 1
    return v * 2


class Color(enum.Enum):
    RED = 1


@dataclasses.dataclass
class Opts:
    k: int = 1
    tags: tuple = ("a",)


class Times(Step):
    model_config = {"extra": "forbid"}
    inputs: ClassVar[list[str]] = ["x"]
    outputs = ["y"]
    SCALE: ClassVar[float] = 1.0
    MODES: ClassVar[dict] = {"fast": [1, 2]}
    if True:
        BRANCHED: ClassVar[int] = 1
    else:
        BRANCHED: ClassVar[int] = 2

    def process(self, inputs: StepInput):
        self.MODES["fast"].append(3)
        yield [
            {**r, "y": REGISTRY["double"](r["x"]) * self.SCALE * Opts().k * Color.RED.value}
            for r in inputs
            if len(SEEN) and WEIGHTS and self.BRANCHED
        ]
"""


def test_a_constant_set_at_run_time_is_keyed_by_its_value(tmp_path, monkeypatch):
    """A number set on a module at run time (a notebook's `mod.N = 3`) runs and is
    hashed as it is: no refusal, though the file (newer than the process, and compared
    for the list the step also reads) says otherwise."""
    helper = "\n\nN = 2\nLABELS = ['a']\n\n\ndef factor():\n    return N * len(LABELS)\n"
    with user_module(tmp_path, monkeypatch, STEP.replace("FACTOR", "factor()") + helper) as (
        mod,
        _,
    ):
        mod.N = 3
        assert run(mod, tmp_path / "cache") == ([0, 3, 6, 9, 12, 15], 1)


def test_values_that_match_their_file_are_accepted(tmp_path, monkeypatch):
    """No refusal for values a literal does not give as loaded, or that code changes:
    a registry filled by a decorator, a list appended to at import, a counter changed
    through `global`, an Enum member, pydantic's merged model_config, a name assigned in
    two branches, a class constant changed in place; nor for equal ones (NaN included)."""
    with user_module(tmp_path, monkeypatch, UNCHANGED_VALUES) as (mod, _):
        for _ in range(2):  # and once more after a run changed MODES and CALLS
            with Pipeline(name="values") as p:
                LoadDataFromDicts(data=ROWS, batch_size=3) >> mod.Times(name="times")
            ds = p.run(cache_dir=tmp_path / "cache", quiet=True)
            assert list(ds["times"]["train"]["y"]) == [2.0 * x for x in range(6)]
