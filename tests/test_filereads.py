"""Files a step reads while it computes (castore/filereads.py): `code_files`
key the step by their contents, `ignore_files` are left out, and any other file the
step's code reads stops the run before a row made from it is stored. Each scenario
edits the file and runs again, comparing with a run that uses no cache."""

from __future__ import annotations

import importlib
import os
import re

import pytest

from castore import Pipeline
from castore.errors import PipelineError, StepFailed
from castore.steps import LoadDataFromDicts
from tests.conftest import cas_inproc
from tests.test_follow import imported

ROWS = [{"x": i} for i in range(6)]

STEPS = """
import json
import pathlib
import jinja2
from castore import Step, StepInput, step

ENV = jinja2.Environment(loader=jinja2.FileSystemLoader("templates"))


@step(inputs=["x"], outputs=["y"]{decorator})
def Prefixed(inputs: StepInput):
    prefix = pathlib.Path("prompt.txt").read_text().strip()
    with open("calls.log", "a") as f:  # a write: not an input
        f.write("x" * len(inputs) + "\\n")
    return [{{**r, "y": f"{{prefix}}:{{r['x']}}"}} for r in inputs]


class Shots(Step):
    inputs = ["x"]
    outputs = ["y"]
{class_attrs}
    def load(self) -> None:
        super().load()
        self._shots = json.load(open("shots.json"))  # read once, in load()

    def process(self, inputs: StepInput):
        template = ENV.get_template("t.j2")  # a library reading a file of the project
        yield [{{**r, "y": template.render(x=r["x"], s=self._shots["s"])}} for r in inputs]
"""


def steps_module(tmp_path, monkeypatch, decorator: str = "", class_attrs: str = ""):
    source = STEPS.format(decorator=decorator, class_attrs=class_attrs or "    pass")
    return imported(tmp_path, monkeypatch, source)


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompt.txt").write_text("hello\n")
    (tmp_path / "shots.json").write_text('{"s": "one"}')
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "t.j2").write_text("{{ s }}-{{ x }}")
    return tmp_path


def run(step_cls, cache, **kw):
    with Pipeline(name=f"reads-{step_cls.__name__.lower()}") as p:
        LoadDataFromDicts(data=ROWS, batch_size=3) >> step_cls(name="s", input_batch_size=2)
    return p.run(cache_dir=cache, quiet=True, **kw)["s"]["train"].to_list()


def calls(project) -> int:
    log = project / "calls.log"
    return sum(len(line) for line in log.read_text().split()) if log.exists() else 0


def test_an_undeclared_file_read_in_process_stops_the_run_and_caches_nothing(project, monkeypatch):
    with steps_module(project, monkeypatch) as mod:
        with pytest.raises(StepFailed) as err:
            run(mod.Prefixed, project / "c")
    msg = str(err.value)
    assert "\n" not in msg
    assert "step s read prompt.txt while computing" in msg and "code_files" in msg
    # Declared, the same store computes every row: nothing of the refused run was cached.
    before = calls(project)
    with steps_module(project, monkeypatch, decorator=', code_files=["prompt.txt"]') as mod:
        rows = run(mod.Prefixed, project / "c")
    assert rows == [{"x": i, "y": f"hello:{i}"} for i in range(6)]
    assert calls(project) - before == 6


def test_code_files_key_the_step_by_their_contents(project, monkeypatch):
    cache = project / "c"
    with steps_module(project, monkeypatch, decorator=', code_files=["*.txt"]') as mod:
        first = run(mod.Prefixed, cache)
        n = calls(project)
        assert run(mod.Prefixed, cache) == first and calls(project) == n  # all cached
        (project / "prompt.txt").write_text("bye\n")
        edited = run(mod.Prefixed, cache)
        assert calls(project) == n + 6  # every row again: each read the edited prompt
        assert edited == run(mod.Prefixed, project / "fresh", use_cache=False)
        assert edited == [{"x": i, "y": f"bye:{i}"} for i in range(6)]
    text = cas_inproc("explain", "reads-prefixed", "s", cache_dir=cache).stdout
    assert "contents of file prompt.txt changed" in text, text


def test_files_read_in_load_and_by_a_library_are_the_steps_inputs(project, monkeypatch):
    """shots.json is read in load(), the template by jinja2 for process: each is refused
    until declared, then keys the step."""
    cache = project / "c"
    with steps_module(project, monkeypatch) as mod:
        with pytest.raises(StepFailed, match=r"read shots\.json while computing"):
            run(mod.Shots, cache)
    attrs = '    code_files = ["shots.json"]'
    with steps_module(project, monkeypatch, class_attrs=attrs) as mod:
        with pytest.raises(StepFailed, match=r"read templates/t\.j2 while computing"):
            run(mod.Shots, cache)
    attrs = '    code_files = ["shots.json", "templates/**/*.j2"]'
    with steps_module(project, monkeypatch, class_attrs=attrs) as mod:
        assert run(mod.Shots, cache)[0] == {"x": 0, "y": "one-0"}
        (project / "templates" / "t.j2").write_text("{{ s }}+{{ x }}")
        assert run(mod.Shots, cache)[0] == {"x": 0, "y": "one+0"}
        (project / "shots.json").write_text('{"s": "two"}')
        edited = run(mod.Shots, cache)
        assert edited[0] == {"x": 0, "y": "two+0"}
        assert edited == run(mod.Shots, project / "fresh", use_cache=False)


def test_ignored_files_are_read_and_left_out_of_the_key(project, monkeypatch):
    attrs = '    code_files = ["templates/t.j2"]\n    ignore_files = ["shots.json"]'
    with steps_module(project, monkeypatch, class_attrs=attrs) as mod:
        first = run(mod.Shots, project / "c")
        version = mod.Shots(name="s").code_version()
        (project / "shots.json").write_text('{"s": "two"}')
        assert mod.Shots(name="s").code_version() == version
        assert run(mod.Shots, project / "c") == first  # as declared: the cached rows


def test_a_code_files_pattern_matching_nothing_is_refused_in_one_line(project, monkeypatch):
    with steps_module(project, monkeypatch, decorator=', code_files=["promt.txt"]') as mod:
        with pytest.raises(PipelineError, match=r"code_files pattern 'promt\.txt' matches no"):
            run(mod.Prefixed, project / "c")
        (project / "run.py").write_text(
            f"from castore import Pipeline\nfrom castore.steps import LoadDataFromDicts\n"
            f"from {mod.__name__} import Prefixed\n"
            "with Pipeline(name='cli') as p:\n"
            "    LoadDataFromDicts(data=[{'x': 1}]) >> Prefixed(name='s')\n"
        )
        res = cas_inproc("run", str(project / "run.py"), cache_dir=project / "c2")
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and "matches no file" in lines[0], res
    assert "Traceback" not in res.stderr + res.stdout


def test_the_check_holds_in_worker_processes(project, monkeypatch):
    with steps_module(project, monkeypatch) as mod:
        with pytest.raises(StepFailed, match=r"read prompt\.txt while computing"):
            run(mod.Prefixed, project / "c", executor="processes")


SCRATCH = """
import tempfile
from castore import StepInput, step


@step(inputs=["x"], outputs=["y"])
def Scratch(inputs: StepInput):
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("made here")
    with open(f.name) as back:  # its own output, read back: not an input
        text = back.read()
    return [{**r, "y": text} for r in inputs]
"""


def test_a_file_the_step_wrote_itself_may_be_read_back(project, monkeypatch):
    with imported(project, monkeypatch, SCRATCH) as mod:
        rows = run(mod.Scratch, project / "c")
    assert rows == [{"x": i, "y": "made here"} for i in range(6)]


AT_IMPORT = """
import re
import jinja2
from castore import StepInput, step

ENV = jinja2.Environment(loader=jinja2.FileSystemLoader("templates"))
TEMPLATE = ENV.get_template("t.j2")  # read by jinja2 as the module is imported
PATTERN = re.compile(open("pattern.txt").read().strip())  # read by the module's own code


@step(inputs=["x"], outputs=["y"])
def Rendered(inputs: StepInput):
    return [
        {**r, "y": TEMPLATE.render(s="t", x=r["x"]) + str(bool(PATTERN.match(str(r["x"]))))}
        for r in inputs
    ]
"""


def at_import_module(project, monkeypatch):
    return imported(project, monkeypatch, AT_IMPORT)


def test_objects_made_from_files_as_a_module_is_imported_follow_their_contents(
    project, monkeypatch
):
    """A template loaded at module level has no value to hash: the files its statement
    read as the module was imported key it, with the contents they had then."""
    (project / "pattern.txt").write_text("[0-2]")
    cache = project / "c"
    with at_import_module(project, monkeypatch) as mod:
        first = run(mod.Rendered, cache)
        assert first[0] == {"x": 0, "y": "t-0True"}
        version = mod.Rendered(name="s").code_version()
    with at_import_module(project, monkeypatch) as mod:  # imported again, nothing edited
        assert mod.Rendered(name="s").code_version() == version
    for path, text in (("templates/t.j2", "{{ x }}/{{ s }}"), ("pattern.txt", "[3-5]")):
        (project / path).write_text(text)
        with at_import_module(project, monkeypatch) as mod:
            assert mod.Rendered(name="s").code_version() != version
            version = mod.Rendered(name="s").code_version()
            edited = run(mod.Rendered, cache)
            assert edited == run(mod.Rendered, project / "fresh", use_cache=False)
    assert edited[0] == {"x": 0, "y": "0/tFalse"} and edited[3] == {"x": 3, "y": "3/tTrue"}
    text = cas_inproc("explain", "reads-rendered", "s", cache_dir=cache).stdout
    assert "TEMPLATE changed" in text or "PATTERN changed" in text, text


def test_a_file_read_at_import_and_edited_since_is_refused(project, monkeypatch):
    """The object in memory was made from the old contents: keying it by the new ones
    would store old rows under the new key."""
    (project / "pattern.txt").write_text("[0-2]")
    with at_import_module(project, monkeypatch) as mod:
        (project / "templates" / "t.j2").write_text("edited {{ x }}")
        with pytest.raises(PipelineError, match=r"t\.j2 was read as the module was imported"):
            mod.Rendered(name="s").code_version()
        importlib.reload(mod)  # what the message says: the module now holds the edit
        assert run(mod.Rendered, project / "c")[0] == {"x": 0, "y": "edited 0True"}


SYSTEM_READS = """
import inspect
import mimetypes
import traceback
import zoneinfo
from castore import StepInput, step


def helper():
    return 1


@step(inputs=["x"], outputs=["y"])
def Sys(inputs: StepInput):
    try:
        raise ValueError("x")
    except ValueError:
        lines = traceback.format_exc().count("\\n")  # reads this file's source lines
    zone = zoneinfo.ZoneInfo("Europe/Paris").key  # the C zoneinfo reads the system's tzdata
    kind = mimetypes.guess_type("a.json")[0]  # reads the system's MIME types
    return [{**r, "y": f"{lines > 0}{len(inspect.getsource(helper))}{zone}{kind}"} for r in inputs]
"""


def test_the_interpreters_and_the_systems_own_files_are_not_the_steps_inputs(project, monkeypatch):
    """Source lines for a traceback or inspect, time zones, MIME types: read for the
    interpreter, they are no reason to stop a run."""
    import linecache

    with imported(project, monkeypatch, SYSTEM_READS) as mod:
        linecache.clearcache()  # the traceback reads the module's file again
        rows = run(mod.Sys, project / "c")
    assert rows[0]["y"].startswith("True") and "Europe/Paris" in rows[0]["y"]


def test_a_system_path_linking_elsewhere_stays_the_systems(tmp_path, monkeypatch):
    """macOS: /usr/share/zoneinfo links into /private/var/db; the path opened decides."""
    from castore import filereads

    system, data, work = tmp_path / "system", tmp_path / "elsewhere", tmp_path / "work"
    for d in (system, data, work):
        d.mkdir()
    (data / "Paris").write_text("tz")
    (system / "Paris").symlink_to(data / "Paris")
    monkeypatch.setattr(filereads, "_SYSTEM_DIRS", (f"{system}/",))
    monkeypatch.chdir(work)
    link = str(system / "Paris")
    assert not filereads._may_be_input(link, str(data / "Paris"), by_library=False)
    # opened directly, the same file is the user's
    assert filereads._may_be_input(str(data / "Paris"), str(data / "Paris"), by_library=False)


SQLITE = """
import sqlite3
from castore import StepInput, step

# A module-level connection: the queries run later, in C, so its import is what is keyed.
CONN = sqlite3.connect("labels.db", check_same_thread=False)


def label(db, x):
    return db.execute("select name from labels where id = ?", (x,)).fetchone()[0]


@step(inputs=["x"], outputs=["y"]DECORATOR)
def Looked(inputs: StepInput):
    db = sqlite3.connect("labels.db")
    try:
        return [{**r, "y": label(db, r["x"])} for r in inputs]
    finally:
        db.close()


@step(inputs=["x"], outputs=["y"])
def AtImport(inputs: StepInput):
    return [{**r, "y": label(CONN, r["x"])} for r in inputs]


@step(inputs=["x"], outputs=["y"])
def OwnDb(inputs: StepInput):
    db = sqlite3.connect("scratch.db")  # made by the step: its own, not an input
    try:
        db.execute("create table if not exists seen (x)")
        db.executemany("insert into seen values (?)", [(r["x"],) for r in inputs])
        db.commit()
        return [{**r, "y": str(r["x"])} for r in inputs]
    finally:
        db.close()
"""


def write_labels(project, name: str) -> None:
    import sqlite3

    db = sqlite3.connect(project / "labels.db")
    with db:
        db.execute("create table if not exists labels (id integer primary key, name text)")
        db.executemany(
            "insert or replace into labels values (?, ?)", [(r["x"], name) for r in ROWS]
        )
    db.close()


def follows_edit(project, monkeypatch, source, step, write, refused=None):
    """Run `step` of module `source` (its input says "one"), edit the input ("two"):
    the next run gives "two", as a run without the cache does. With `refused` (a
    pattern), the same process refuses to run (what it made at import is stale), and a
    new import, as a new process would make, gives "two"."""
    cache = project / "c"
    with imported(project, monkeypatch, source) as mod:
        assert run(getattr(mod, step), cache)[0] == {"x": 0, "y": "one"}
        write(project, "two")
        if refused is not None:
            with pytest.raises(PipelineError, match=refused):
                run(getattr(mod, step), cache)
    with imported(project, monkeypatch, source) as mod:
        edited = run(getattr(mod, step), cache)
        assert edited == run(getattr(mod, step), project / "fresh", use_cache=False)
        assert edited[0] == {"x": 0, "y": "two"}


def test_a_sqlite_database_the_step_queries_is_one_of_its_inputs(project, monkeypatch):
    """sqlite3 reads its file in C: the connect (an audit event) stands for the read."""
    write_labels(project, "one")
    with imported(project, monkeypatch, SQLITE.replace("DECORATOR", "")) as mod:
        with pytest.raises(StepFailed, match=r"step s read labels\.db while computing"):
            run(mod.Looked, project / "c")
        assert run(mod.OwnDb, project / "c") == [{"x": i, "y": str(i)} for i in range(6)]
    declared = SQLITE.replace("DECORATOR", ', code_files=["labels.db"]')
    follows_edit(project, monkeypatch, declared, "Looked", write_labels)


def test_sqlite_database_names_map_to_the_files_they_open():
    from castore.filereads import _sqlite_path

    assert _sqlite_path("labels.db") == "labels.db"
    assert _sqlite_path("file:data/labels.db?mode=ro") == "data/labels.db"
    assert _sqlite_path("file:my%20labels.db") == "my labels.db"
    for memory in (":memory:", "", "file::memory:?cache=shared", "file:x?mode=memory", 3):
        assert _sqlite_path(memory) is None


def test_the_files_a_step_wrote_are_remembered_up_to_a_bound(tmp_path, monkeypatch):
    """A step writing a new scratch file per batch must not grow the set forever: the
    oldest go first, and writing a file again makes it the newest."""
    from castore import filereads

    monkeypatch.setattr(filereads, "_written", {})
    monkeypatch.setattr(filereads, "_WRITTEN_MAX", 2)
    paths = [tmp_path / f"scratch-{i}.txt" for i in range(3)]
    for p in paths:
        p.write_text("made here")
    filereads._wrote(str(paths[0]))
    filereads._wrote(str(paths[1]))
    filereads._wrote(str(paths[0]))  # again: now the newest
    filereads._wrote(str(paths[2]))
    may = lambda p: filereads._may_be_input(str(p), str(p), by_library=False)  # noqa: E731
    assert [may(p) for p in paths] == [False, True, False]


ARROW = """
import pathlib

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from castore import StepInput, step

# Opened at import by pyarrow (C++, no Python open) and read in `process`: an object
# with no value to hash, keyed by the file's contents at import.
LABELS = ds.dataset("at_import.parquet")


@step(inputs=["x"], outputs=["y"]DECORATOR)
def Pandas(inputs: StepInput):
    t = pd.read_parquet("labels.parquet")  # pandas hands the path to pyarrow
    names = dict(zip(t["id"], t["name"]))
    return [{**r, "y": names[r["x"]]} for r in inputs]


@step(inputs=["x"], outputs=["y"])
def Uri(inputs: StepInput):
    t = pq.read_table(pathlib.Path("labels.parquet").absolute().as_uri())  # file://...
    names = dict(zip(*t.to_pydict().values()))
    return [{**r, "y": names[r["x"]]} for r in inputs]


@step(inputs=["x"], outputs=["y"])
def Csv(inputs: StepInput):
    names = pcsv.read_csv("labels.csv").to_pydict()["name"]
    return [{**r, "y": names[r["x"]]} for r in inputs]


@step(inputs=["x"], outputs=["y"])
def Scratch(inputs: StepInput):
    # written by pyarrow, then read back: the step's own file, and a folder of them
    pq.write_table(pa.table({"x": [r["x"] for r in inputs]}), "scratch.parquet")
    pq.write_to_dataset(pa.table({"x": [r["x"] for r in inputs]}), "scratch_dir")
    back = pq.read_table("scratch.parquet").num_rows + pq.read_table("scratch_dir").num_rows
    return [{**r, "y": str(back)} for r in inputs]


@step(inputs=["x"], outputs=["y"])
def AtImport(inputs: StepInput):
    names = dict(zip(*LABELS.to_table().to_pydict().values()))
    return [{**r, "y": names[r["x"]]} for r in inputs]
"""


def write_arrow_labels(project, name: str) -> None:
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    table = pa.table({"id": [r["x"] for r in ROWS], "name": [name] * len(ROWS)})
    pq.write_table(table, project / "labels.parquet")
    pq.write_table(table, project / "at_import.parquet")
    pcsv.write_csv(table, project / "labels.csv")


def test_files_pyarrow_reads_are_the_steps_inputs(project, monkeypatch):
    """pyarrow opens files in C++, unseen by the audit hook: pandas.read_parquet and
    pyarrow.csv.read_csv are refused unless declared, then keyed by the file's contents;
    what the step wrote with pyarrow may be read back."""
    write_arrow_labels(project, "one")
    with imported(project, monkeypatch, ARROW.replace("DECORATOR", "")) as mod:
        refused = [(mod.Pandas, "labels.parquet"), (mod.Uri, "labels.parquet")]
        for step_cls, name in [*refused, (mod.Csv, "labels.csv")]:
            with pytest.raises(StepFailed, match=rf"step s read \S*{name} while computing"):
                run(step_cls, project / "c")
        assert run(mod.Scratch, project / "c")[0]["y"] == "4"
    declared = ARROW.replace("DECORATOR", ', code_files=["labels.parquet"]')
    follows_edit(project, monkeypatch, declared, "Pandas", write_arrow_labels)


@pytest.mark.parametrize(
    ("source", "write", "path"),
    [(SQLITE, write_labels, "labels.db"), (ARROW, write_arrow_labels, "at_import.parquet")],
    ids=["sqlite-connection", "pyarrow-dataset"],
)
def test_an_object_made_at_import_from_a_file_is_keyed_by_its_contents(
    project, monkeypatch, source, write, path
):
    """A module-level SQLite connection or pyarrow dataset, queried in `process`: the
    file is read in C, and the object has no value to hash."""
    write(project, "one")
    refused = rf"{re.escape(path)} was read as the module was imported"
    follows_edit(project, monkeypatch, source.replace("DECORATOR", ""), "AtImport", write, refused)


def test_a_pyarrow_write_into_a_folder_owns_only_the_files_it_made(tmp_path, monkeypatch):
    """write_dataset into a folder that holds an input: the files it added are the
    step's own (read back freely), the input stays an input."""
    import types

    import pyarrow as pa
    import pyarrow.dataset as ds

    from castore import filereads

    monkeypatch.setattr(filereads, "_written", {})
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "input.csv").write_text("a\n1\n")
    filereads._local.watch = types.SimpleNamespace(busy=False)
    try:
        ds.write_dataset(
            pa.table({"a": [1]}),
            str(folder),
            format="parquet",
            existing_data_behavior="overwrite_or_ignore",
        )
    finally:
        filereads._local.watch = None
    made = {p for p in map(str, folder.iterdir()) if p.endswith(".parquet")}
    assert made and set(filereads._written) == {os.path.realpath(p) for p in made}


def test_wrapped_pyarrow_functions_pickle_by_reference():
    """multiprocessing pickles a function by its module and name: a wrapped reader must
    still be found there (`pool.map(pcsv.read_csv, paths)`)."""
    import pickle

    import pyarrow.csv as pcsv
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    import castore.pipeline.step  # noqa: F401 - installs the wrappers

    for fn in (pcsv.read_csv, pcsv.write_csv, ds.dataset, pq.read_table, pq.ParquetFile):
        assert pickle.loads(pickle.dumps(fn)) is fn
    assert getattr(pcsv.read_csv, "_castore_wrapped", False)
