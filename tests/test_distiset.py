from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from castore import Pipeline, Step, StepInput
from castore.distiset import Distiset, DistisetError, create_distiset
from castore.errors import StepFailed
from castore.steps import LoadDataFromDicts
from tests.conftest import cas_inproc
from tests.test_pipeline import build


def as_rows(ds: Distiset) -> dict[str, list[dict]]:
    return {leaf: dd["train"].to_list() for leaf, dd in ds.items()}


def test_run_from_run_and_create_distiset_agree(store):
    ds = build().run(cache_dir=store.root)
    by_name = Distiset.from_run("p", store.root)
    by_sig = Distiset.from_run(ds.run.signature[:10], store.root)
    run_dir = store.root / "runs" / "p" / ds.run.signature
    from_dir = create_distiset(run_dir / "data")
    assert as_rows(ds) == as_rows(by_name) == as_rows(by_sig) == as_rows(from_dir)
    assert from_dir.pipeline_yaml == ds.pipeline_yaml and "signature" in from_dir.pipeline_yaml
    assert from_dir.log_filename_path == run_dir / "pipeline.log"
    assert list(from_dir) == ["keep_columns"]  # leaf name kept, not renamed to "default"
    # Memory-mapped, not a Python list of rows.
    assert ds["keep_columns"]["train"].cache_files


def test_metadata_kept_or_dropped(store):
    class Boom(Step):
        outputs = ["y"]

        def process(self, inputs: StepInput):
            raise ValueError("model said no")

    with Pipeline(name="meta") as p:
        LoadDataFromDicts(data=[{"x": i} for i in range(4)]) >> Boom(on_error="skip")
    ds = p.run(cache_dir=store.root, quiet=True)
    assert "castore_metadata" not in ds["boom"]["train"].column_names
    kept = Distiset.from_run("meta", store.root, enable_metadata=True)
    meta = kept["boom"]["train"]["castore_metadata"]
    assert meta[0]["error"] == "ValueError: model said no"
    run_dir = store.root / "runs" / "meta" / ds.run.signature
    assert (
        "castore_metadata"
        in create_distiset(run_dir / "data", enable_metadata=True)["boom"]["train"].column_names
    )


def test_failed_run_gives_partial_distiset(store):
    class FailAt(Step):
        outputs = ["y"]

        def process(self, inputs: StepInput):
            if inputs[0]["x"] >= 30:
                raise RuntimeError("quota exceeded")
            return [{**r, "y": r["x"]} for r in inputs]

    with Pipeline(name="partial") as p:
        LoadDataFromDicts(data=[{"x": i} for i in range(50)], batch_size=10) >> FailAt(
            input_batch_size=10
        )
    with pytest.raises(StepFailed):
        p.run(cache_dir=store.root, quiet=True)
    ds = Distiset.from_run("partial", store.root)
    assert ds.partial
    assert [r["x"] for r in ds["fail_at"]["train"].to_list()] == list(range(30))


def _write_leaf(folder, tables):
    folder.mkdir(parents=True)
    for i, t in enumerate(tables, start=1):
        pq.write_table(t, folder / f"{i:05d}.parquet")


def _meta_table(start, n):
    return pa.table(
        {
            "instruction": [f"q{i}" for i in range(start, start + n)],
            "generation": [f"a{i}" for i in range(start, start + n)],
            "distilabel_metadata": [
                {"raw_output_text_generation_0": f"raw{i}"} for i in range(start, start + n)
            ],
        }
    )


@pytest.mark.parametrize("layout", ["seed", "distilabel-1.5"])
def test_distilabel_folders(tmp_path, layout, caplog):
    if layout == "seed":
        root = tmp_path / "pipelines" / "73ca3f6b7a613fb9694db7631cc038d379f1f533"
        data = root / "data"
        leaves = data
    else:
        root = tmp_path / "pipelines" / "test-pipe" / "f23b95d7" / "executions" / "a1b2c3"
        data = root / "data"
        leaves = data / "steps_outputs"
    _write_leaf(leaves / "text_generation_0", [_meta_table(0, 5), _meta_table(5, 3)])
    _write_leaf(leaves / "rename_columns", [pa.table({"x": [1, 2]})])
    (leaves / "empty_step").mkdir()
    (root / "pipeline.yaml").write_text("distilabel:\n  version: 1.5.3\n")
    (root / "pipeline.log").write_text("INFO pipeline started\n")
    with caplog.at_level(logging.WARNING):
        ds = create_distiset(data)
    assert "empty leaf folder" in caplog.text
    assert sorted(ds) == ["rename_columns", "text_generation_0"]
    gen = ds["text_generation_0"]["train"]
    assert gen.column_names == ["instruction", "generation"] and gen.num_rows == 8
    assert ds.pipeline_yaml.startswith("distilabel:") and "started" in ds.log
    with_meta = create_distiset(data, enable_metadata=True)
    assert with_meta["text_generation_0"]["train"][7]["distilabel_metadata"] == {
        "raw_output_text_generation_0": "raw7"
    }
    assert "Distiset({" in repr(ds) and "num_rows: 8" in repr(ds)


def test_yaml_and_log_absent_is_fine(tmp_path):
    _write_leaf(tmp_path / "data" / "leaf", [pa.table({"x": [1]})])
    ds = create_distiset(tmp_path / "data")
    assert ds.pipeline_yaml is None and ds.log is None


def test_save_load_round_trip_local_and_memory(store, tmp_path):
    ds = build().run(cache_dir=store.root)
    for target in (str(tmp_path / "saved"), "memory://castore-test/saved"):
        ds.save_to_disk(target)
        back = Distiset.load_from_disk(target)
        assert as_rows(back) == as_rows(ds)
        assert back.pipeline_yaml == ds.pipeline_yaml and back.log == ds.log
    card = (tmp_path / "saved" / "README.md").read_text()
    assert "cas run pipeline.yaml" in card and ds.run.signature in card
    with pytest.raises(DistisetError, match="not a saved Distiset"):
        Distiset.load_from_disk(tmp_path)


def test_push_to_hub_sends_data_yaml_log_and_card(store, monkeypatch):
    import datasets
    import huggingface_hub

    sent = []
    monkeypatch.setattr(
        datasets.DatasetDict,
        "push_to_hub",
        lambda self, repo_id, **kw: sent.append(("data", repo_id, kw["config_name"])),
    )

    class FakeApi:
        def __init__(self, token=None):
            pass

        def upload_file(self, path_or_fileobj, path_in_repo, repo_id, repo_type, commit_message):
            sent.append(("file", path_in_repo, path_or_fileobj.decode()))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    ds = build().run(cache_dir=store.root)
    ds.push_to_hub("me/dataset")
    assert ("data", "me/dataset", "keep_columns") in sent
    files = {s[1]: s[2] for s in sent if s[0] == "file"}
    assert set(files) == {"README.md", "pipeline.yaml", "pipeline.log"}
    assert files["pipeline.yaml"] == ds.pipeline_yaml


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "arrow"])
def test_cli_export_run_and_dir(store, tmp_path, fmt):
    ds = build().run(cache_dir=store.root)
    out = tmp_path / f"out-{fmt}"
    r = cas_inproc(
        "distiset", "p", "--output", str(out), "--format", fmt, "--json", cache_dir=store.root
    )
    assert r.returncode == 0, r
    assert r.json()["leaves"] == {"keep_columns": 230}
    assert (out / "pipeline.yaml").exists() and (out / "README.md").exists()
    if fmt == "jsonl":
        lines = (out / "keep_columns" / "train.jsonl").read_text().splitlines()
        assert [json.loads(x) for x in lines] == ds["keep_columns"]["train"].to_list()
    run_dir = store.root / "runs" / "p" / ds.run.signature
    out2 = tmp_path / f"dir-{fmt}"
    r = cas_inproc(
        "distiset",
        "--from-dir",
        str(run_dir / "data"),
        "-o",
        str(out2),
        "--format",
        fmt,
        cache_dir=store.root,
    )
    assert r.returncode == 0, r


def _bad(tmp_path, kind):
    data = tmp_path / "data"
    if kind == "missing":
        return tmp_path / "nope"
    if kind == "no-parquet":
        (data / "leaf").mkdir(parents=True)
        (data / "leaf" / "notes.txt").write_text("x")
    elif kind == "schema":
        _write_leaf(data / "leaf", [pa.table({"x": [1]}), pa.table({"x": ["text"]})])
    elif kind == "corrupt":
        _write_leaf(data / "leaf", [pa.table({"x": [1]})])
        (data / "leaf" / "00002.parquet").write_bytes(b"PAR1 definitely not parquet")
    return data


@pytest.mark.parametrize(
    ("kind", "needle"),
    [
        ("missing", "is not a folder"),
        ("no-parquet", "no Parquet files"),
        ("schema", "disagree on their schema"),
        ("corrupt", "00002.parquet"),
    ],
)
def test_cli_bad_folders(tmp_path, kind, needle):
    data = _bad(tmp_path, kind)
    out = tmp_path / "out"
    r = cas_inproc(
        "distiset", "--from-dir", str(data), "--output", str(out), cache_dir=tmp_path / "c"
    )
    assert r.returncode != 0 and "Traceback" not in r.stderr
    err = [x for x in r.stderr.splitlines() if x.startswith("Error")]
    assert len(err) == 1 and needle in err[0], r
    assert not out.exists()


def test_cli_export_refuses_non_empty_output(store, tmp_path):
    build().run(cache_dir=store.root)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = cas_inproc("distiset", "p", "-o", str(out), cache_dir=store.root)
    assert r.returncode != 0 and "not an empty folder" in r.stderr
    assert (out / "keep.txt").read_text() == "mine"


def test_distilabel_spellings_split_save_options_and_distilabels_folders(store, tmp_path):
    """distilabel 1.5's Distiset API on castore's: train_test_split, save_to_disk's
    options, and load_from_disk of a folder distilabel 1.5.3 saved (tests/golden)."""
    import datasets

    from castore.distiset import Distiset
    from tests.conftest import REPO

    ds = Distiset()
    ds["leaf"] = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list([{"x": i} for i in range(10)])}
    )
    ds.pipeline_yaml, ds.log = "pipeline: {}\n", "a log\n"
    assert ds["default"] is ds["leaf"]  # one leaf: also "default"
    ds.save_to_disk(tmp_path / "a", num_shards=2, save_card=False, save_pipeline_log=False)
    assert sorted(p.name for p in tmp_path.joinpath("a").iterdir()) == [
        "distiset.json",
        "leaf",
        "pipeline.yaml",
    ]
    assert len(list((tmp_path / "a" / "leaf" / "train").glob("*.arrow"))) == 2
    back = Distiset.load_from_disk(tmp_path / "a", keep_in_memory=True)
    assert back["leaf"]["train"]["x"] == list(range(10))
    split = back.train_test_split(train_size=0.8, seed=1)
    assert split is back and sorted(back["leaf"]) == ["test", "train"]
    assert (len(back["leaf"]["train"]), len(back["leaf"]["test"])) == (8, 2)
    with pytest.raises(ValueError, match="train_size"):
        back.train_test_split(train_size=1.5)
    theirs = Distiset.load_from_disk(REPO / "tests" / "golden" / "distilabel_1_5_3_distiset")
    assert list(theirs) == ["default"]
    assert theirs["default"]["train"]["instruction"] == [f"q{i}" for i in range(6)]
    assert theirs.pipeline_yaml.startswith("distilabel:") and "a log line" in theirs.log


def test_hub_files_card_and_script(store, tmp_path, monkeypatch):
    import sys
    import types

    from castore.distiset import Distiset

    ds = Distiset()
    assert "README.md" not in ds.hub_files(generate_card=False)
    script = tmp_path / "make_data.py"
    script.write_text("print('the pipeline')\n")
    main = types.ModuleType("__main__")
    main.__file__ = str(script)
    monkeypatch.setitem(sys.modules, "__main__", main)
    assert ds.hub_files(include_script=True)["make_data.py"] == "print('the pipeline')\n"
