"""pipeline.yaml runs elsewhere: a run's recipe names its custom steps' files and its
data files relative to the project, so `cas run pipeline.yaml` (the dataset card's
reproduce line) works in a clean copy of the project in another folder, with the first
folder gone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from castore.distiset import Distiset
from castore.errors import CastoreError
from tests.conftest import REPO, cas_inproc
from tests.test_cli_run import one_error_line

PIPELINE = textwrap.dedent(
    """
    from pathlib import Path

    from castore import Pipeline, StepInput, step
    from castore.steps import LoadDataFromFileSystem

    HERE = Path(__file__).resolve().parent

    @step(inputs=["text"], outputs=["shout"], row_wise=True)
    def Shout(inputs: StepInput):
        return [{**r, "shout": r["text"].upper() + "!"} for r in inputs]

    with Pipeline(name="portable") as pipeline:
        LoadDataFromFileSystem(
            data_files=str(HERE / "data" / "rows.jsonl"), batch_size=4
        ) >> Shout(name="shout")

    if __name__ == "__main__":
        import sys
        pipeline.run(cache_dir=sys.argv[1], quiet=True)
    """
)


def make_project(root: Path) -> Path:
    project = root / "project"
    (project / "data").mkdir(parents=True)
    (project / "pipeline.py").write_text(PIPELINE)
    rows = "".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(10))
    (project / "data" / "rows.jsonl").write_text(rows)
    return project


def recipe_and_rows(cache: Path) -> tuple[str, list[dict]]:
    ds = Distiset.from_run("portable", cache)
    return ds.pipeline_yaml or "", ds["shout"]["train"].to_list()


def reproduce_elsewhere(tmp_path: Path, first: Path, recipe: str, monkeypatch) -> list[dict]:
    """A clean copy of the project in another folder, the first one deleted, and the
    card's reproduce line run there."""
    second = tmp_path / "elsewhere" / "checkout"
    shutil.copytree(first, second)
    shutil.rmtree(first)
    (second / "pipeline.yaml").write_text(recipe)
    monkeypatch.chdir(second)
    cache = tmp_path / "second-store"
    r = cas_inproc("run", "pipeline.yaml", "--quiet", cache_dir=cache)
    assert r.returncode == 0, r
    return recipe_and_rows(cache)[1]


def cas_run_in_project(tmp_path: Path, monkeypatch) -> tuple[Path, str, list[dict]]:
    """The project made and `cas run pipeline.py` in its folder: (project, recipe, rows)."""
    project = make_project(tmp_path / "first")
    monkeypatch.chdir(project)
    cache = tmp_path / "store"
    assert cas_inproc("run", "pipeline.py", "--quiet", cache_dir=cache).returncode == 0
    return project, *recipe_and_rows(cache)


def test_cas_run_of_a_script_then_its_recipe_in_another_checkout(tmp_path, monkeypatch):
    project, recipe, rows = cas_run_in_project(tmp_path, monkeypatch)
    assert str(tmp_path) not in recipe  # no path of this machine in the recipe
    assert "file: pipeline.py" in recipe and "data_files: data/rows.jsonl" in recipe
    assert reproduce_elsewhere(tmp_path, project, recipe, monkeypatch) == rows


def test_python_script_with_steps_in_main_then_its_recipe_elsewhere(tmp_path, monkeypatch):
    project = make_project(tmp_path / "first")
    cache = tmp_path / "store"
    env_path = {"PYTHONPATH": str(REPO)}
    p = subprocess.run(
        [sys.executable, "pipeline.py", str(cache)],
        cwd=project,
        capture_output=True,
        text=True,
        env={**os.environ, **env_path},
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    recipe, rows = recipe_and_rows(cache)
    assert "type: __main__:Shout" in recipe and "file: pipeline.py" in recipe
    assert reproduce_elsewhere(tmp_path, project, recipe, monkeypatch) == rows


def test_a_recipe_run_outside_its_project_says_where_to_run_it(tmp_path, monkeypatch):
    _, recipe, _ = cas_run_in_project(tmp_path, monkeypatch)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "pipeline.yaml").write_text(recipe)
    monkeypatch.chdir(empty)
    r = cas_inproc("run", "pipeline.yaml", cache_dir=tmp_path / "other")
    one_error_line(r, "pipeline.py is not here", "folder of the project")


def test_a_library_run_resumed_from_elsewhere_finds_its_relative_data(tmp_path, monkeypatch):
    """A run started from Python stores its pipeline.yaml (paths relative to where it was
    started) and that folder; `cas resume` from any folder runs it there."""
    from castore.pipeline.pipeline import load_file_module

    project = make_project(tmp_path / "first")
    (project / "pipeline.py").write_text(
        PIPELINE.replace("row_wise=True)", 'row_wise=True, ignore_env=["SHOUT_FAIL"])').replace(
            'return [{**r, "shout"',
            'import os\n    if os.environ.get("SHOUT_FAIL"):\n'
            '        raise RuntimeError("down")\n    return [{**r, "shout"',
        )
    )
    monkeypatch.chdir(project)
    cache = tmp_path / "store"
    module = load_file_module(project / "pipeline.py", "portable_lib_run")
    monkeypatch.setenv("SHOUT_FAIL", "1")
    with pytest.raises(CastoreError, match="down"):
        module.pipeline.run(cache_dir=cache, quiet=True)
    monkeypatch.delenv("SHOUT_FAIL")
    monkeypatch.chdir(tmp_path)
    r = cas_inproc("resume", "portable", cache_dir=cache)
    assert r.returncode == 0, r
    _, rows = recipe_and_rows(cache)
    assert [r["shout"] for r in rows] == [f"ROW {i}!" for i in range(10)]
