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
