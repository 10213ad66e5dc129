"""What each command loads, checked on sys.modules in a fresh interpreter (a subprocess:
the only way to see a first import). Times are measured in benchmarks/bench_startup.py,
never here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, cas_inproc

HEAVY = {"pyarrow", "pandas", "datasets", "aiohttp", "fsspec", "ray"}
DATA_STACK = {"datasets", "pandas", "ray"}

PROBE = """
import json, os, sys, threading
started = []
_start = threading.Thread.start
def start(self):
    started.append(self.name)
    return _start(self)
threading.Thread.start = start
argv = json.loads(os.environ["PROBE_ARGV"])
if argv == ["import"]:
    import castore
else:
    from castore.cli import main
    try:
        main(argv)
    except SystemExit as e:
        code = e.code
    else:
        code = 0
    assert code in (0, None), code
with open(os.environ["PROBE_OUT"], "w") as f:
    json.dump({"modules": sorted({m.split(".")[0] for m in sys.modules}), "threads": started}, f)
"""


def probe(tmp_path: Path, *argv: str, cwd: Path | None = None) -> tuple[set[str], list[str]]:
    out = tmp_path / "probe.json"
    env = {**os.environ, "PROBE_ARGV": json.dumps(list(argv)), "PROBE_OUT": str(out)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    r = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, cwd=cwd, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    return set(doc["modules"]), doc["threads"]


def test_import_castore_and_help_load_no_data_stack(tmp_path):
    for argv in (["import"], ["--help"], ["run", "--help"]):
        modules, threads = probe(tmp_path, *argv)
        assert not modules & HEAVY, (argv, modules & HEAVY)
        assert threads == []


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """The README example, run once to the end."""
    tmp = tmp_path_factory.mktemp("startup")
    work, cache = tmp / "examples", tmp / "c"
    import shutil

    shutil.copytree(REPO / "examples", work)
    r = cas_inproc("run", "clean_reviews.py", "--quiet", cache_dir=cache, cwd=work)
    assert r.returncode == 0, r
    return work, cache


@pytest.mark.parametrize(
    "argv",
    [
        ["ls"],
        ["show", "clean-reviews"],
        ["log", "clean-reviews"],
        ["explain", "clean-reviews"],
        ["du"],
        ["gc", "--dry-run"],
    ],
)
def test_reading_commands_load_no_datasets_pandas_or_ray(tmp_path, finished, argv):
    _, cache = finished
    modules, _ = probe(tmp_path, "--cache-dir", str(cache), *argv)
    assert not modules & DATA_STACK, (argv, modules & DATA_STACK)


def test_a_finished_run_replays_from_manifests_only(tmp_path, finished):
    """No Distiset, datasets, pandas or pyarrow; no worker thread; the intact run folder
    is left as it is."""
    work, cache = finished
    data = next((cache / "runs" / "clean-reviews").glob("*/data"))
    before = {p: p.stat().st_ino for p in data.rglob("*")}
    modules, threads = probe(
        tmp_path, "--cache-dir", str(cache), "run", "clean_reviews.py", "--quiet", cwd=work
    )
    # asyncio: the batch jobs' machinery, which a run that asks none never imports.
    loaded = modules & (DATA_STACK | {"pyarrow", "aiohttp", "fsspec", "asyncio"})
    assert not loaded, loaded
    assert threads == []
    assert {p: p.stat().st_ino for p in data.rglob("*")} == before


LIBRARY_RUN = """
import json, os, sys
from castore import Pipeline
from castore.steps import LoadDataFromDicts, KeepColumns
with Pipeline(name="lib") as p:
    LoadDataFromDicts(data=[{"x": i, "y": -i} for i in range(50)], batch_size=10) >> KeepColumns(
        columns=["x"])
ds = p.run(cache_dir=os.environ["PROBE_CACHE"], quiet=True)
before = "datasets" in sys.modules
keys = list(ds)
rows = ds["keep_columns"]["train"].num_rows
print(json.dumps({"before": before, "keys": keys, "rows": rows,
                  "after": "datasets" in sys.modules}))
"""


def test_pipeline_run_returns_a_distiset_that_loads_datasets_on_first_use(tmp_path):
    env = {**os.environ, "PROBE_CACHE": str(tmp_path / "c")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    for _ in range(2):  # cold, then a finished re-run
        r = subprocess.run(
            [sys.executable, "-c", LIBRARY_RUN], env=env, capture_output=True, text=True
        )
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        assert doc == {"before": False, "keys": ["keep_columns"], "rows": 50, "after": True}


def test_a_lazy_distiset_is_a_plain_dict_of_its_leaves(tmp_path):
    from castore import Distiset, Pipeline
    from castore.steps import KeepColumns, LoadDataFromDicts

    with Pipeline(name="lazy") as p:
        load = LoadDataFromDicts(data=[{"x": i, "y": i} for i in range(20)], batch_size=5)
        load >> KeepColumns(name="a", columns=["x"])
        load >> KeepColumns(name="b", columns=["y"])
    ds = p.run(cache_dir=tmp_path / "c", quiet=True)
    assert sorted(ds) == ["a", "b"] and len(ds) == 2 and "a" in ds
    assert (ds | {})["a"]["train"].num_rows == 20 and ({} | ds)["b"]["train"].num_rows == 20
    plain = dict(ds)
    assert plain["a"]["train"].column_names == ["x"] and {**ds}.keys() == plain.keys()
    again = Distiset.from_run("lazy", tmp_path / "c")
    assert again != {} and again == {k: v for k, v in again.items()}
    assert again["b"]["train"]["y"] == ds["b"]["train"]["y"] == list(range(20))
    assert "b:" in repr(again)


def test_without_fcntl_import_works_and_the_store_says_posix_only(tmp_path):
    """Windows has no fcntl: importing castore must work, and the first store operation
    says what is supported, in one line (exit 1), not a traceback."""
    script = (
        "import sys; sys.modules['fcntl'] = None\n"
        "import castore\n"
        "from castore import Pipeline\n"
        "from castore.cli import main\n"
        f"main(['--cache-dir', {str(tmp_path / 's')!r}, 'ls'])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == [
        "Error: castore's store needs Linux or macOS (its locks are POSIX flock(2) locks); "
        "on Windows, use WSL"
    ]


def test_a_computing_run_leaves_pandas_unimported(tmp_path):
    """pyarrow would import pandas (~0.2 s) on castore's first conversion of the rows a step
    returns (castore/arrowpandas.py): a cold run of the README example does without it."""
    work = tmp_path / "examples"
    import shutil

    shutil.copytree(REPO / "examples", work)
    modules, _ = probe(
        tmp_path, "--cache-dir", str(tmp_path / "c"), "run", "clean_reviews.py", "-q", cwd=work
    )
    assert "pyarrow" in modules and "pandas" not in modules


ROW_WISE = """
import os
from castore import Pipeline, StepInput, step
from castore.steps import LoadDataFromDicts

@step(inputs=["text"], outputs=["n"], row_wise=True)
def Count(inputs: StepInput):
    return [{**r, "n": len(r["text"])} for r in inputs]

with Pipeline(name="rw") as pipeline:
    LoadDataFromDicts(data=[{"text": "x" * i} for i in range(60)], batch_size=20) >> Count(
        input_batch_size=int(os.environ["BATCH"]))
"""


def test_rows_reused_by_row_key_leave_pandas_unimported(tmp_path, monkeypatch):
    """Another batch size: every row comes from the row index, no step computes, and the
    batches are assembled from reused rows (not through calls.to_table): no pandas either."""
    (tmp_path / "rw.py").write_text(ROW_WISE)
    cache = str(tmp_path / "c")
    monkeypatch.setenv("BATCH", "10")
    probe(tmp_path, "--cache-dir", cache, "run", "rw.py", "-q", cwd=tmp_path)
    monkeypatch.setenv("BATCH", "7")
    modules, _ = probe(tmp_path, "--cache-dir", cache, "run", "rw.py", "-q", cwd=tmp_path)
    from castore.runs import list_runs
    from castore.store import Store
    from castore.store.manifests import StepManifest, load_model

    store = Store(cache)
    run = next(r for r in list_runs(store) if r.name == "rw")
    count = load_model(store, run.manifest.steps[-1].manifest, StepManifest)
    assert len(count.batches) == 9 and sum(b.rows_reused for b in count.batches) == 60
    assert "pyarrow" in modules and "pandas" not in modules


PANDAS_AFTER = """
import json, os, sys
import pyarrow as pa
from castore import Pipeline, StepInput, step
from castore.steps import LoadDataFromDicts

@step(inputs=["x"], outputs=["y"])
def Double(inputs: StepInput):
    if os.environ.get("STEP_IMPORTS_PANDAS") and inputs[0]["x"] >= 10:
        import pandas as pd  # a step's own pandas, in a later batch
        assert pa.array(pd.Series(pd.Categorical(["a", "b"]))).type.id == pa.dictionary(
            pa.int8(), pa.string()).id
    return [{**r, "y": 2 * r["x"]} for r in inputs]

with Pipeline(name="p") as p:
    LoadDataFromDicts(data=[{"x": i} for i in range(30)], batch_size=10) >> Double(
        input_batch_size=10)
p.execute(cache_dir=os.environ["PROBE_CACHE"], quiet=True)
before = "pandas" in sys.modules
import pandas as pd
cat = pa.array(pd.Series(pd.Categorical(["a", "b", "a"])))
when = pa.array(pd.Series(pd.to_datetime(["2020-01-01"]).tz_localize("UTC")))
back = pa.table({"a": [1, 2]}).to_pandas()
print(json.dumps({"before": before, "cat": str(cat.type), "when": str(when.type),
                  "back": list(back["a"]), "loader": type(pd.__loader__).__name__}))
"""


@pytest.mark.parametrize("in_step", [False, True])
def test_pandas_imported_after_castore_converted_rows_converts_as_usual(tmp_path, in_step):
    """Once pandas is imported (by the user, or by a step in a later batch), pyarrow treats
    pandas objects exactly as when castore leaves its shim alone: categoricals as dictionary
    arrays, tz-aware times with their zone, to_pandas working."""
    import pyarrow as pa

    pd = pytest.importorskip("pandas")

    env = {**os.environ, "PROBE_CACHE": str(tmp_path / "c")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if in_step:
        env["STEP_IMPORTS_PANDAS"] = "1"
    script = tmp_path / "pandas_after.py"  # a file: a step's code is hashed from its source
    script.write_text(PANDAS_AFTER)
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    expect_cat = pa.array(pd.Series(pd.Categorical(["a", "b", "a"]))).type
    expect_when = pa.array(pd.Series(pd.to_datetime(["2020-01-01"]).tz_localize("UTC"))).type
    assert doc == {
        "before": in_step,
        "cat": str(expect_cat),
        "when": str(expect_when),
        "back": [1, 2],
        "loader": "SourceFileLoader",
    }
    assert str(expect_cat).startswith("dictionary")  # what a wrong shim would lose
