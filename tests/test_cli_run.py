from __future__ import annotations

import os
import shutil
import textwrap

import pytest

from tests.conftest import REPO, cas_inproc, start_cas

SLOW = REPO / "tests" / "pipelines" / "slow.py"
FAST = textwrap.dedent(
    """
    from castore import Pipeline, StepInput, StepOutput, step
    from castore.steps import LoadDataFromDicts

    @step(inputs=["x"], outputs=["y"])
    def AddOne(inputs: StepInput, by: int = 1) -> StepOutput:
        yield [{**r, "y": r["x"] + by} for r in inputs]

    with Pipeline(name="fast") as pipeline:
        LoadDataFromDicts(data=[{"x": i} for i in range(30)], batch_size=10) >> AddOne()
    """
)


@pytest.fixture
def fast(tmp_path):
    path = tmp_path / "fast.py"
    path.write_text(FAST)
    return path


def one_error_line(r, *needles: str) -> None:
    assert r.returncode != 0, r
    assert "Traceback" not in r.stderr, r
    lines = [line for line in r.stderr.strip().splitlines() if line.startswith("Error")]
    assert len(lines) == 1, r
    for n in needles:
        assert n in lines[0], r


def test_run_json_ls_show_log(fast, tmp_path):
    cache = tmp_path / "c"
    r = cas_inproc("run", str(fast), "--json", "--param", "add_one.by=5", cache_dir=cache)
    assert r.returncode == 0, r
    doc = r.json()
    assert doc["status"] == "finished" and doc["rows"] == {"add_one": 30}
    assert doc["steps"]["add_one"]["batches_computed"] == 1
    ls = cas_inproc("ls", "--json", cache_dir=cache).json()
    assert [(x["name"], x["status"], x["rows"]) for x in ls] == [("fast", "finished", 30)]
    for spec in ("fast", doc["signature"][:10], doc["run_id"][:10]):
        show = cas_inproc("show", spec, "--json", cache_dir=cache)
        assert show.returncode == 0, show
        steps = {s["name"]: s for s in show.json()["steps"]}
        assert steps["add_one"]["columns"] == ["x", "y"] and steps["add_one"]["rows"] == 30
    log = cas_inproc("log", "fast", cache_dir=cache)
    assert "step add_one" in log.stdout and doc["signature"][:12] in log.stdout


def test_run_pipeline_yaml_same_signature(fast, tmp_path):
    cache = tmp_path / "c"
    first = cas_inproc("run", str(fast), "--json", cache_dir=cache).json()
    yaml_path = cache / "runs" / "fast" / first["signature"] / "pipeline.yaml"
    copy = tmp_path / "copy.yaml"
    shutil.copy(yaml_path, copy)
    r = cas_inproc("run", str(copy), "--json", cache_dir=cache)
    assert r.returncode == 0, r
    assert r.json()["signature"] == first["signature"]
    assert all(s["batches_computed"] == 0 for s in r.json()["steps"].values())


def test_resume_nothing(fast, tmp_path):
    cache = tmp_path / "c"
    one_error_line(cas_inproc("resume", cache_dir=cache), "nothing to resume")
    cas_inproc("run", str(fast), cache_dir=cache)
    one_error_line(cas_inproc("resume", "fast", cache_dir=cache), "nothing to resume")
    one_error_line(cas_inproc("resume", "other", cache_dir=cache), "no run of pipeline 'other'")


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("pipeline: [unclosed", "malformed YAML in pipeline YAML"),
        (
            "pipeline:\n  name: x\n  steps:\n    - name: a\n      type: nowhere.mod:Nope\n",
            "unknown step type 'nowhere.mod:Nope'",
        ),
        (
            "pipeline:\n  name: x\n  steps:\n    - name: a\n      type: castore.steps:Nope\n",
            "unknown step type",
        ),
        ("- just\n- a list\n", "pipeline YAML: the document is a list, not a mapping"),
        # Hand-written shapes: where, and what is expected, not a Python error.
        ("pipeline:\n  steps: []\n", "pipeline YAML: pipeline.name: Field required"),
        ("pipeline:\n  name: x\n  steps: [1]\n", "pipeline.steps.0 is a number, not a mapping"),
        ("pipeline:\n  name: x\n  steps:\n    - name: a\n", "steps.0.type: Field required"),
        (
            "pipeline:\n  name: x\n  steps:\n    - {name: a, type: 'castore.steps:KeepColumns',"
            " params: [1]}\n",
            "pipeline.steps.0.params is a list, not a mapping",
        ),
        (
            "pipeline:\n  name: x\n  steps: []\n  connections: [x]\n",
            "pipeline.connections.0 is a string, not a mapping",
        ),
        ("pipeline:\n  name: x\n  steps: []\n  connections: [{to: [a]}]\n", "connections.0.from"),
    ],
)
def test_bad_yaml(tmp_path, content, needle):
    path = tmp_path / "p.yaml"
    path.write_text(content)
    one_error_line(cas_inproc("run", str(path), cache_dir=tmp_path / "c"), needle)


def test_bad_targets_and_params(fast, tmp_path):
    cache = tmp_path / "c"
    r = cas_inproc("run", str(fast), "--grace", "-1", cache_dir=cache)
    assert r.returncode == 2 and "'--grace': -1.0 is not in the range x>=0" in r.stderr
    from castore import Pipeline
    from castore.errors import ConfigError
    from castore.steps import LoadDataFromDicts

    with Pipeline(name="g") as p:
        LoadDataFromDicts(data=[{"a": 1}])
    with pytest.raises(ConfigError, match="stop_grace must be a number of seconds >= 0"):
        p.run(cache_dir=cache, stop_grace=-1)
    one_error_line(
        cas_inproc("run", str(tmp_path / "missing.py"), cache_dir=cache), "does not exist"
    )
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    one_error_line(cas_inproc("run", str(empty), cache_dir=cache), "defines 0 pipelines")
    broken = tmp_path / "broken.py"
    broken.write_text("def oops(:\n")
    one_error_line(cas_inproc("run", str(broken), cache_dir=cache), "SyntaxError")
    wrong = tmp_path / "wrong.py"  # a distilabel-only parameter: pydantic's text spans lines
    wrong.write_text(
        "from castore import Pipeline\n"
        "from castore.steps import KeepColumns, LoadDataFromDicts\n"
        "with Pipeline(name='w') as p:\n"
        "    LoadDataFromDicts(data=[{'a': 1}]) >> KeepColumns(columns=['a'], colums=1)\n"
    )
    one_error_line(
        cas_inproc("run", str(wrong), cache_dir=cache),
        "KeepColumns: colums: unknown parameter, got 1",
    )
    one_error_line(cas_inproc("run", f"{fast}:nope", cache_dir=cache), "no Pipeline named 'nope'")
    one_error_line(cas_inproc("run", "no_such_module:p", cache_dir=cache), "cannot import")
    one_error_line(
        cas_inproc("run", str(fast), "--param", "ghost.x=1", cache_dir=cache),
        "unknown step 'ghost'",
    )
    one_error_line(
        cas_inproc("run", str(fast), "--param", "add_one.nope=1", cache_dir=cache),
        "has no parameter 'nope'",
    )
    one_error_line(
        cas_inproc("run", str(fast), "--param", "add_one.by=abc", cache_dir=cache), "add_one.by"
    )
    one_error_line(
        cas_inproc("run", str(fast), "--param", "garbage", cache_dir=cache),
        "expected STEP.FIELD=VALUE",
    )


def test_cycle_via_cli(tmp_path):
    path = tmp_path / "cyc.py"
    path.write_text(
        FAST.replace(
            'LoadDataFromDicts(data=[{"x": i} for i in range(30)], batch_size=10) >> AddOne()',
            "a = AddOne(name='a'); b = AddOne(name='b'); a >> b >> a",
        )
    )
    one_error_line(cas_inproc("run", str(path), cache_dir=tmp_path / "c"), "cycle")


def test_resume_target_gone(fast, tmp_path):
    import os
    import signal
    import time

    cache = tmp_path / "c"
    slow_copy = tmp_path / "slow_copy.py"
    shutil.copy(SLOW, slow_copy)
    proc = start_cas("run", str(slow_copy), cache_dir=cache)
    deadline = time.monotonic() + 30
    while not (cache / "refs" / "runs" / "slow").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    os.unlink(slow_copy)
    one_error_line(cas_inproc("resume", cache_dir=cache), "is gone")


def test_log_of_a_killed_attempt_is_its_own_live_log(tmp_path):
    """kill -9 leaves the attempt's live log (runs/<name>/<sig>/logs/<run id>.log);
    `cas log` prints it for that attempt, before and after the resume."""
    import os
    import signal
    import time

    cache = tmp_path / "c"
    proc = start_cas("run", str(SLOW), "--param", "slow.delay=0.2", cache_dir=cache)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not list(cache.glob("runs/slow/*/logs/*.log")):
        time.sleep(0.02)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    live = list(cache.glob("runs/slow/*/logs/*.log"))
    assert len(live) == 1 and "pipeline slow signature" in live[0].read_text()
    killed = cas_inproc("log", "slow", cache_dir=cache)
    assert killed.returncode == 0 and "pipeline slow signature" in killed.stdout, killed
    assert cas_inproc("resume", "slow", cache_dir=cache).returncode == 0
    doc = cas_inproc("log", "slow", "--json", cache_dir=cache).json()
    first, last = doc["attempts"]
    assert "pipeline slow signature" in first["log"] and "run slow" not in first["log"]
    assert "run slow finished" in last["log"]
    # The finished attempt's log is placed as pipeline.log; its live file is gone.
    folder = live[0].parent.parent
    assert (folder / "pipeline.log").read_text() == last["log"]
    assert [p.name for p in (folder / "logs").iterdir()] == [live[0].name]
    assert os.path.exists(live[0])


def test_show_unknown_run(tmp_path):
    one_error_line(cas_inproc("show", "nope", cache_dir=tmp_path / "c"), "no castore store at")
    from castore.store import Store

    Store(tmp_path / "c")
    one_error_line(cas_inproc("show", "nope", cache_dir=tmp_path / "c"), "no run named")


def test_downstream_param_change_via_cli_counts(fast, tmp_path):
    cache = tmp_path / "c"
    first = cas_inproc("run", str(fast), "--json", "--quiet", cache_dir=cache).json()
    assert first["steps"]["add_one"]["batches_computed"] == 1
    second = cas_inproc("run", str(fast), "--json", "--param", "add_one.by=3", cache_dir=cache)
    doc = second.json()
    assert doc["steps"]["load_data_from_dicts"] == {
        "batches_cached": 3,
        "batches_computed": 0,
        "batches_failed": 0,
        "rows": 30,
        "rows_computed": 0,
        "rows_reused": 0,
    }
    assert doc["steps"]["add_one"]["batches_cached"] == 0
    assert doc["steps"]["add_one"]["batches_computed"] == 1
    assert doc["signature"] != first["signature"]


def test_quiet_run_prints_only_the_summary(fast, tmp_path):
    r = cas_inproc("run", str(fast), "--quiet", cache_dir=tmp_path / "c")
    assert r.returncode == 0, r
    assert "INFO" not in r.stderr and "data:" in r.stderr


def test_cat_json(fast, tmp_path):
    cache = tmp_path / "c"
    doc = cas_inproc("run", str(fast), "--json", cache_dir=cache).json()
    man = cas_inproc("cat", doc["run_id"][:12], "--json", cache_dir=cache)
    assert man.returncode == 0 and man.json()["kind"] == "run"
    step_id = man.json()["steps"][1]["manifest"]
    step = cas_inproc("cat", step_id, "--json", cache_dir=cache).json()
    batch = step["batches"][0]["outputs"][0]
    rows = cas_inproc("cat", batch, "--json", cache_dir=cache).json()
    assert rows[:2] == [{"x": 0, "y": 1}, {"x": 1, "y": 2}]


def test_resume_a_run_started_from_python(tmp_path, monkeypatch):
    from castore import Pipeline
    from castore.errors import StepFailed
    from castore.steps import LoadDataFromDicts
    from tests.pipelines.api_steps import FailIfEnv

    cache = tmp_path / "c"
    monkeypatch.setenv("CASTORE_TEST_FAIL", "1")
    with Pipeline(name="api-run") as p:
        LoadDataFromDicts(data=[{"x": i} for i in range(30)], batch_size=10) >> FailIfEnv(
            input_batch_size=10
        )
    with pytest.raises(StepFailed):
        p.run(cache_dir=cache, quiet=True)
    monkeypatch.delenv("CASTORE_TEST_FAIL")
    r = cas_inproc("resume", "api-run", "--json", cache_dir=cache, cwd=REPO)
    assert r.returncode == 0, r
    doc = r.json()
    assert doc["status"] == "finished" and doc["rows"] == {"fail_if_env": 30}
    assert doc["steps"]["load_data_from_dicts"]["batches_cached"] == 3


FLAKY = textwrap.dedent(
    """
    import os
    from castore import Pipeline, StepInput, StepOutput, step
    from castore.steps import LoadDataFromDicts

    @step(inputs=["x"], outputs=["y"], ignore_env=["FLAKY_FAIL"])  # fails, or not at all
    def AddOne(inputs: StepInput, by: int = 1, label: str = "a b") -> StepOutput:
        if os.environ.get("FLAKY_FAIL") == "1" and inputs[0]["x"] >= 10:
            raise RuntimeError("flaky")
        yield [{**r, "y": r["x"] + by} for r in inputs]

    with Pipeline(name="flaky") as pipeline:
        LoadDataFromDicts(data=[{"x": i} for i in range(30)], batch_size=10) >> AddOne(
            input_batch_size=10)
    """
)


def _hint(r) -> list[str]:
    import shlex

    line = next(x for x in r.stderr.splitlines() if x.startswith("run again"))
    return shlex.split(line.split("cached): ", 1)[1])


def test_the_run_again_hint_repeats_the_command_and_is_free(tmp_path, monkeypatch):
    """The hint is the user's own line (options, --param, --cache-dir; not --no-cache),
    and after `cas resume` the `cas run` line with the recorded parameters: following
    either computes nothing."""
    path = tmp_path / "flaky.py"
    path.write_text(FLAKY)
    cache = tmp_path / "c"
    params = ("--param", "add_one.by=3", "--param", "add_one.label=two words")
    r = cas_inproc("--cache-dir", str(cache), "run", str(path), "--no-cache", *params)
    assert r.returncode == 0, r
    hint = _hint(r)
    assert hint == ["cas", "--cache-dir", str(cache), "run", str(path), *params]
    again = cas_inproc(*hint[1:], "--json")
    assert again.returncode == 0, again
    assert all(s["batches_computed"] == 0 for s in again.json()["steps"].values())

    monkeypatch.setenv("FLAKY_FAIL", "1")
    failed = cas_inproc("--cache-dir", str(cache), "run", str(path), "--param", "add_one.by=7")
    assert failed.returncode != 0
    monkeypatch.delenv("FLAKY_FAIL")
    resumed = cas_inproc("--cache-dir", str(cache), "resume", "flaky")
    assert resumed.returncode == 0, resumed
    hint = _hint(resumed)
    assert hint[:5] == ["cas", "--cache-dir", str(cache), "run", str(path)]
    assert "add_one.by=7" in hint
    again = cas_inproc(*hint[1:], "--json")
    assert all(s["batches_computed"] == 0 for s in again.json()["steps"].values())


SKIPS = """
import os

from castore import Pipeline, step, StepInput
from castore.steps import LoadDataFromDicts

@step(inputs=["n"], outputs=["m"], ignore_env=["PICKY_FAIL"])
def Picky(inputs: StepInput):
    if os.environ.get("PICKY_FAIL") and any(r["n"] == 3 for r in inputs):
        raise ValueError("n 3 is bad")
    return [{**r, "m": r["n"] * 2} for r in inputs]

with Pipeline(name="picky") as pipeline:
    LoadDataFromDicts(data=[{"n": i} for i in range(10)]) >> Picky(
        input_batch_size=2, on_error="skip"
    )
"""


def test_a_run_with_skipped_batches_says_so_and_is_not_called_free(tmp_path, monkeypatch):
    """on_error="skip" finishes the run with None outputs for a failed batch: the summary
    names the failed batches and where the errors are, running again is not free, and
    `cas resume` takes the run up (its failed batch is work still to do)."""
    monkeypatch.setenv("PICKY_FAIL", "1")
    path = tmp_path / "picky.py"
    path.write_text(SKIPS)
    r = cas_inproc("--cache-dir", str(tmp_path / "c"), "run", str(path), "-q")
    assert r.returncode == 0, r
    lines = r.stderr.splitlines()
    assert "1 batch failed (picky: 1): their rows are kept with None outputs" in r.stderr
    assert "`cas log picky` has the errors" in r.stderr
    again = next(x for x in lines if x.startswith("run again"))
    assert "retries the failed batches" in again and "free" not in again
    log = cas_inproc("--cache-dir", str(tmp_path / "c"), "log", "picky")
    assert "ValueError: n 3 is bad" in log.stdout
    monkeypatch.delenv("PICKY_FAIL")
    resumed = cas_inproc("--cache-dir", str(tmp_path / "c"), "resume", "picky", "--json")
    assert resumed.returncode == 0, resumed
    steps = resumed.json()["steps"]["picky"]
    assert (steps["batches_computed"], steps["batches_failed"], steps["batches_cached"]) == (
        1,
        0,
        4,
    )
    done = cas_inproc("--cache-dir", str(tmp_path / "c"), "resume", "picky")
    assert done.returncode == 1 and "nothing to resume" in done.stderr


def test_a_missing_optional_dependency_names_its_extra(fast, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a)
    )
    r = cas_inproc("run", str(fast), "--executor", "ray", cache_dir=tmp_path / "c")
    assert r.returncode == 2 and "pip install 'castore[ray]'" in r.stderr, r
    assert "Traceback" not in r.stderr


def test_log_shows_every_attempt_and_every_printed_run_id_opens(tmp_path, monkeypatch):
    path = tmp_path / "flaky.py"
    path.write_text(FLAKY)
    cache = tmp_path / "c"
    monkeypatch.setenv("FLAKY_FAIL", "1")
    assert cas_inproc("run", str(path), cache_dir=cache).returncode != 0
    monkeypatch.delenv("FLAKY_FAIL")
    assert cas_inproc("resume", "flaky", cache_dir=cache).returncode == 0
    log = cas_inproc("log", "flaky", cache_dir=cache)
    assert log.returncode == 0, log
    heads = [line for line in log.stdout.splitlines() if line.startswith("== attempt")]
    assert len(heads) == 2 and "failed" in heads[0] and "finished" in heads[1]
    assert "run flaky failed" in log.stdout and "run flaky finished" in log.stdout
    doc = cas_inproc("log", "flaky", "--json", cache_dir=cache).json()
    assert [a["status"] for a in doc["attempts"]] == ["failed", "finished"]
    old = doc["attempts"][0]["run_id"]
    explained = cas_inproc("explain", "flaky", cache_dir=cache).stdout
    assert f"(run {old[:12]})" in explained  # explain names the earlier attempt ...
    show = cas_inproc("show", old[:12], cache_dir=cache)  # ... and it opens
    assert show.returncode == 0 and "failed" in show.stdout.splitlines()[0], show
    one = cas_inproc("log", old[:12], "--json", cache_dir=cache).json()
    assert [a["run_id"] for a in one["attempts"]] == [old]


def test_shell_completion_of_run_names(fast, tmp_path):
    from castore.cli import cas
    from click.shell_completion import BashComplete

    cache = tmp_path / "c"
    assert cas_inproc("run", str(fast), cache_dir=cache).returncode == 0

    def complete(*args: str, incomplete: str) -> list[str]:
        comp = BashComplete(cas, {}, "cas", "_CAS_COMPLETE")
        return [c.value for c in comp.get_completions(list(args), incomplete)]

    for command in ("show", "log", "explain", "rm", "resume", "distiset"):
        assert complete("--cache-dir", str(cache), command, incomplete="fa") == ["fast"]
    sig = cas_inproc("ls", "--json", cache_dir=cache).json()[0]["signature"]
    assert complete("--cache-dir", str(cache), "show", incomplete=sig[:3]) == [sig[:12]]
    assert complete("--cache-dir", str(tmp_path / "none"), "show", incomplete="") == []
    assert not (tmp_path / "none").exists()


def test_show_dag_draws_fan_out_and_fan_in(tmp_path):
    from castore import Pipeline
    from castore.steps import CombineOutputs, KeepColumns, LoadDataFromDicts, RenameColumns

    with Pipeline(name="shape") as p:
        load = LoadDataFromDicts(data=[{"x": i} for i in range(20)], batch_size=5)
        a = RenameColumns(name="a", mapping={"x": "xa"})
        b = KeepColumns(name="b", columns=["x"])
        load >> [a, b] >> CombineOutputs(name="both")
    p.execute(cache_dir=tmp_path / "c", quiet=True)
    r = cas_inproc("show", "shape", "--dag", cache_dir=tmp_path / "c")
    assert r.returncode == 0, r
    lines = r.stdout.splitlines()[1:-1]
    assert lines[0].startswith("● load_data_from_dicts  [0 cached, 4 computed; 20 rows]")
    assert lines[1].startswith("  └─ a  [") and "<-" not in lines[1]
    assert lines[2].startswith("  └─ b  [") and lines[2].endswith("<- load_data_from_dicts")
    assert lines[3].startswith("    └─ both  [") and lines[3].endswith("<- a, b")
    doc = cas_inproc("show", "shape", "--json", cache_dir=tmp_path / "c").json()
    assert ["a", "both"] in doc["edges"] and ["b", "both"] in doc["edges"]


def test_a_loader_that_cannot_read_its_file_fails_in_one_plain_line(tmp_path):
    """castore's own errors reach the user as they are written: no internal class name,
    the step named once."""
    data = tmp_path / "rows.jsonl"
    data.write_text('{"id": 1}\n{"id": "two"}\n')
    script = tmp_path / "load.py"
    script.write_text(
        textwrap.dedent(
            f"""
            from castore import Pipeline
            from castore.steps import LoadDataFromFileSystem

            with Pipeline(name="load") as pipeline:
                LoadDataFromFileSystem(name="load", data_files={str(data)!r})
            """
        )
    )
    r = cas_inproc("run", str(script), cache_dir=tmp_path / "c")
    one_error_line(r, "step load failed: cannot read", "rows.jsonl")
    line = next(x for x in r.stderr.splitlines() if x.startswith("Error"))
    assert "ConfigError" not in line and line.count("load:") == 0, line


def test_stray_files_and_folders_in_the_store_break_no_command(fast, tmp_path):
    """A file or folder castore did not make, in any folder of the store (a backup tool's,
    a user's), is left alone or cleaned up, never a crash: run, re-run, gc and fsck
    --repair go through, and fsck is clean after the repair."""
    cache = tmp_path / "c"
    assert cas_inproc("run", str(fast), cache_dir=cache).returncode == 0
    for folder in [p for p in cache.rglob("*") if p.is_dir()]:
        if len(folder.relative_to(cache).parts) <= 3:
            (folder / "zz-stray").write_text("not castore's\n")
            (folder / "zz-dir").mkdir()
            os.utime(folder / "zz-stray", (1, 1))
    for argv in (
        ("run", str(fast)),
        ("run", str(fast), "--no-cache"),
        ("gc", "--grace", "0", "--cache-ttl", "0"),
        ("ls",),
        ("du",),
        ("fsck", "--repair"),
        ("fsck",),
        ("run", str(fast)),
    ):
        r = cas_inproc(*argv, cache_dir=cache)
        assert r.returncode == 0, (argv, r.stderr)
        assert "unexpected" not in r.stderr, (argv, r.stderr)
