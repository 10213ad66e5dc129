"""A loader over a jsonl file that grew reuses the batches of the version it grew from and
parses only the rest (castore/pipeline/appends.py); every case compares the dataset with
a fresh --no-cache run of the same file in another store, and counts what was parsed."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from castore import Pipeline, StepInput, step
from castore.errors import ConfigError
from castore.pipeline import appends
from castore.pipeline.appends import FileBatches
from castore.steps import LoadDataFromFileSystem
from castore.store import Store
from tests.conftest import cas_inproc

PARSED: list[int] = []  # byte offsets the loader's parses started at


@pytest.fixture(autouse=True)
def count_parses(monkeypatch):
    real = appends._parse

    def parse(data, start, **kw):
        PARSED.append(start)
        return real(data, start, **kw)

    monkeypatch.setattr(appends, "_parse", parse)
    PARSED.clear()


@step(inputs=["text"], outputs=["n"])
def Length(inputs: StepInput):
    return [{**r, "n": len(r["text"] or "")} for r in inputs]


def rows(n: int, start: int = 0) -> list[dict]:
    return [{"id": i, "text": f"row {i} " + "y" * (i % 7)} for i in range(start, start + n)]


def write(path: Path, data: list[dict], tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in data) + tail)


def build(path: Path, batch_size: int = 10) -> Pipeline:
    with Pipeline(name="grow") as p:
        LoadDataFromFileSystem(name="load", data_files=str(path), batch_size=batch_size) >> Length(
            name="length", input_batch_size=7
        )
    return p


def run(path: Path, cache: Path, **kw) -> tuple[list[dict], dict]:
    PARSED.clear()
    ds = build(path, **{k: v for k, v in kw.items() if k == "batch_size"}).run(
        cache_dir=cache, quiet=True, use_cache=kw.get("use_cache", True)
    )
    return ds["length"]["train"].to_list(), ds.run.stats["load"].model_dump()


def fresh(path: Path, tmp_path: Path, **kw) -> list[dict]:
    return run(path, tmp_path / f"fresh-{random.random()}", use_cache=False, **kw)[0]


def loader_objects(cache: Path) -> list[str]:
    """The latest run's loader batches, by object id."""
    from castore.runs import list_runs
    from castore.store.manifests import StepManifest, load_model

    store = Store(cache)
    run = max(list_runs(store), key=lambda r: r.manifest.started)
    ref = next(r for r in run.manifest.steps if r.name == "load")
    return [o for b in load_model(store, ref.manifest, StepManifest).batches for o in b.outputs]


def test_appended_rows_are_the_only_ones_parsed(tmp_path):
    data, cache = tmp_path / "seed.jsonl", tmp_path / "c"
    write(data, rows(95))
    first, stats = run(data, cache)
    assert PARSED == [0] and stats["batches_computed"] == 10
    write(data, rows(95) + rows(12, start=95))
    out, stats = run(data, cache)
    # Batches 0-8 (90 rows) are the old file's; the parse starts at row 90.
    head = len("".join(json.dumps(r) + "\n" for r in rows(90)))
    assert PARSED == [head]
    assert stats["batches_cached"] == 9 and stats["batches_computed"] == 2
    assert out == fresh(data, tmp_path) and out[:95] == first
    # Byte for byte what parsing the whole file gives: the same objects.
    other = tmp_path / "whole"
    run(data, other, use_cache=False)
    assert loader_objects(cache) == loader_objects(other)
    # and grown again, from the record the second run left
    write(data, rows(95) + rows(12, start=95) + rows(30, start=107))
    out, stats = run(data, cache)
    assert stats["batches_cached"] == 10 and PARSED == [
        len("".join(json.dumps(r) + "\n" for r in rows(100)))
    ]
    assert out == fresh(data, tmp_path)


def test_an_edit_keeps_the_batches_before_it(tmp_path):
    data, cache = tmp_path / "seed.jsonl", tmp_path / "c"
    write(data, rows(60))
    run(data, cache)
    edited = rows(60)
    edited[33]["text"] = "changed"
    write(data, edited)
    out, stats = run(data, cache)
    assert stats["batches_cached"] == 3  # rows 0-29: checkpoints before the edit
    assert out == fresh(data, tmp_path)


@pytest.mark.parametrize(
    "extra",
    [
        [{"id": 500, "text": "new", "score": 1.5}],  # a new column
        [{"id": 500.5, "text": "new"}],  # an int column becomes double
        [{"id": 500, "text": None}],  # a null where the rest had none: same type
    ],
)
def test_appended_rows_that_change_the_schema_are_read_whole(tmp_path, extra):
    data, cache = tmp_path / "seed.jsonl", tmp_path / "c"
    write(data, rows(40))
    run(data, cache)
    write(data, rows(40) + extra)
    out, stats = run(data, cache)
    assert PARSED[-1] == 0 and stats["batches_cached"] == 0
    assert out == fresh(data, tmp_path) and len(out) == 41


def test_blank_lines_leave_no_record(tmp_path):
    """pyarrow skips blank lines, so lines are not rows: the file is read whole."""
    data, cache = tmp_path / "seed.jsonl", tmp_path / "c"
    write(data, rows(30), tail="\n\n")
    run(data, cache)
    write(data, rows(30) + rows(5, start=30), tail="\n")
    out, stats = run(data, cache)
    assert PARSED == [0] and stats["batches_cached"] == 0
    assert out == fresh(data, tmp_path)


def test_a_last_line_without_newline_is_not_reused(tmp_path):
    """A file whose last line lacks its newline may grow that line: its batch is parsed."""
    data, cache = tmp_path / "seed.jsonl", tmp_path / "c"
    text = "".join(json.dumps(r) + "\n" for r in rows(20))
    data.write_text(text + '{"id": 20, "text": "last"}')  # 21 rows, the last unterminated
    run(data, cache)
    data.write_text(text + '{"id": 20, "text": "last one"}\n')
    out, stats = run(data, cache)
    assert stats["batches_cached"] == 2 and out == fresh(data, tmp_path)
    assert out[-1]["text"] == "last one"


def test_a_record_whose_batches_are_gone_reads_it_all(tmp_path):
    data, cache = tmp_path / "seed.jsonl", tmp_path / "c"
    write(data, rows(40))
    run(data, cache)
    store = Store(cache)
    for key in list(store.iter_actions()):
        store.delete_action(key)
    write(data, rows(45))
    out, stats = run(data, cache)
    assert PARSED[-1] == 0 and stats["batches_cached"] == 0
    assert out == fresh(data, tmp_path)


def test_many_batches_keep_at_most_the_checkpoint_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(appends, "MAX_CHECKPOINTS", 8)
    data, cache = tmp_path / "seed.jsonl", tmp_path / "c"
    write(data, rows(203))
    run(data, cache, batch_size=2)
    records = [json.loads(f.read_text()) for f in (cache / "appends").iterdir()]
    assert len(records) == 1 and len(records[0]["checkpoints"]) <= 8
    assert records[0]["checkpoints"][-1][0] == 101  # the last full batch is always one
    write(data, rows(210))
    out, stats = run(data, cache, batch_size=2)
    assert stats["batches_cached"] == 101 and out == fresh(data, tmp_path, batch_size=2)


def test_a_file_that_changed_after_its_digest_is_refused(tmp_path):
    data, cache = tmp_path / "seed.jsonl", tmp_path / "c"
    write(data, rows(20))
    p = build(data)
    step_ = p.steps["load"]
    fp = step_.fingerprint()
    write(data, rows(21))
    with pytest.raises(ConfigError, match="changed while the run read it"):
        FileBatches(Store(cache), step_, fp, lambda key: None)


def test_the_reader_refuses_files_other_than_the_ones_keyed(tmp_path):
    """The step's own reader (csv, a glob, a URL) loads only what the run's fingerprint
    hashed: a file written, or a file added to the glob, between the two is refused
    instead of stored under the key of the earlier contents."""
    import fsspec

    def loaded(step_: LoadDataFromFileSystem) -> list:
        return [r for t in step_.process() for r in t.to_pylist()]

    data = tmp_path / "in.csv"
    data.write_text("id,text\n1,a\n")
    step_ = LoadDataFromFileSystem(data_files=str(data))
    step_.refresh()
    step_.fingerprint()
    assert loaded(step_) == [{"id": 1, "text": "a"}]
    data.write_text("id,text\n1,b\n")
    with pytest.raises(ConfigError, match="changed while the run read it"):
        loaded(step_)
    step_.refresh()  # a new run hashes the file as it is now
    step_.fingerprint()
    assert loaded(step_) == [{"id": 1, "text": "b"}]

    write(tmp_path / "a.jsonl", rows(2))
    globbed = LoadDataFromFileSystem(data_files=str(tmp_path / "*.jsonl"))
    globbed.refresh()
    globbed.fingerprint()
    write(tmp_path / "b.jsonl", rows(3))
    with pytest.raises(ConfigError, match="names changed after the run hashed them"):
        loaded(globbed)

    fs = fsspec.filesystem("memory")
    fs.pipe("/castore-keyed/in.jsonl", b'{"n": 1}\n')
    remote = LoadDataFromFileSystem(data_files="memory://castore-keyed/in.jsonl")
    remote.refresh()
    remote.fingerprint()
    fs.pipe("/castore-keyed/in.jsonl", b'{"n": 1}\n{"n": 2}\n')
    with pytest.raises(ConfigError, match="changed while the run read it"):
        loaded(remote)


def test_other_sources_are_read_as_before(tmp_path):
    """A glob, csv, or num_examples: no append source, the step's own reader."""
    data = tmp_path / "a.jsonl"
    write(data, rows(5))
    assert LoadDataFromFileSystem(data_files=str(data)).append_source() == str(data)
    assert LoadDataFromFileSystem(data_files=str(tmp_path / "*.jsonl")).append_source() == str(data)
    assert LoadDataFromFileSystem(data_files=str(data), num_examples=3).append_source() is None
    (tmp_path / "b.csv").write_text("id,text\n1,a\n")
    assert LoadDataFromFileSystem(data_files=str(tmp_path / "b.csv")).append_source() is None
    write(tmp_path / "b.jsonl", rows(2))
    assert LoadDataFromFileSystem(data_files=str(tmp_path / "*.jsonl")).append_source() is None


def test_gc_drops_a_record_with_its_batches(tmp_path):
    from castore.gc import collect

    data, cache = tmp_path / "seed.jsonl", tmp_path / "c"
    write(data, rows(40))
    run(data, cache)
    collect(Store(cache), grace=0)
    assert len(list((cache / "appends").iterdir())) == 1  # its run keeps the batches
    cas_inproc("rm", "grow", "--all", cache_dir=cache)
    collect(Store(cache), grace=0, cache_ttl=0)
    assert list((cache / "appends").iterdir()) == []
    write(data, rows(45))
    out, stats = run(data, cache)
    assert stats["batches_cached"] == 0 and out == fresh(data, tmp_path)


def test_a_subclass_that_reads_otherwise_keeps_its_reader(tmp_path):
    class Upper(LoadDataFromFileSystem):
        def _read(self, path):
            table = super()._read(path)
            return table.rename_columns([c.upper() for c in table.column_names])

    data = tmp_path / "a.jsonl"
    write(data, rows(5))
    assert Upper(data_files=str(data)).append_source() is None


@pytest.mark.parametrize("kind", ["disk", "hub-folder"])
def test_a_dataset_folder_written_after_it_was_hashed_is_refused(tmp_path, monkeypatch, kind):
    """A saved dataset (LoadDataFromDisk) or a local dataset folder (LoadDataFromHub) is
    keyed by its files' contents when the run starts and read when the loader runs: a
    write in between (or while it reads) would file the new rows under the old rows'
    key. The loader's batches are checked against the versions hashed before their
    entries are written."""
    import datasets

    from castore.pipeline import generators
    from castore.steps import LoadDataFromDisk, LoadDataFromHub

    folder = tmp_path / "data"

    def save(n: int) -> None:
        if kind == "disk":
            datasets.Dataset.from_list(rows(n)).save_to_disk(str(tmp_path / "tmp"))
            if folder.exists():
                for f in folder.iterdir():
                    f.unlink()
                folder.rmdir()
            (tmp_path / "tmp").rename(folder)
        else:
            folder.mkdir(exist_ok=True)
            write(folder / "rows.jsonl", rows(n))

    def pipeline() -> Pipeline:
        with Pipeline(name="folder") as p:
            if kind == "disk":
                LoadDataFromDisk(name="load", dataset_path=str(folder), batch_size=4)
            else:
                LoadDataFromHub(name="load", repo_id=str(folder), batch_size=4)
        return p

    save(10)
    real = generators.process_chunks
    writes = []

    def written_meanwhile(step_, *a):
        if not writes:  # once: after the run hashed the folder, before the loader reads
            writes.append(1)
            save(12)
        return real(step_, *a)

    monkeypatch.setattr(generators, "process_chunks", written_meanwhile)
    cache = tmp_path / "c"
    with pytest.raises(Exception, match="changed while the run read them; run again"):
        pipeline().run(cache_dir=cache, quiet=True)
    monkeypatch.setattr(generators, "process_chunks", real)
    got = pipeline().run(cache_dir=cache, quiet=True)["load"]["train"].to_list()
    assert got == rows(12)
