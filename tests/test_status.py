"""`cas status` / `Pipeline.plan()`: what a run would do, before it runs, writing
nothing; and the run that follows does what the preview said."""

from __future__ import annotations

import os
from pathlib import Path

from tests.conftest import cas_inproc
from tests.test_rows import base_rows, build, run, write_rows


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under the store with its size and mtime: a preview changes none."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.stat(p)
            out[p] = (st.st_size, st.st_mtime_ns)
    return out


def steps(report) -> dict:
    return {s.name: s for s in report.steps}


def test_a_finished_pipeline_is_free_and_nothing_is_written(tmp_path):
    data, cache = tmp_path / "d.jsonl", tmp_path / "c"
    write_rows(data, base_rows())
    run(build(data), cache)
    before = snapshot(cache)
    report = build(data).plan(cache_dir=cache)
    assert report.free and report.finished_run is not None
    assert all(
        s.batches_to_compute == 0 and s.batches_cached == s.batches_total for s in report.steps
    )
    assert snapshot(cache) == before


def test_a_new_batch_size_on_a_row_wise_step_costs_no_row(tmp_path):
    data, cache = tmp_path / "d.jsonl", tmp_path / "c"
    write_rows(data, base_rows())
    run(build(data), cache)
    before = snapshot(cache)
    label = steps(build(data, batch=7).plan(cache_dir=cache))["label"]
    assert snapshot(cache) == before
    assert label.batches_to_compute > 0 and label.rows_in_misses == 120
    assert label.rows_by_key == 120 and label.rows_to_compute == 0
    _, computed, _ = run(build(data, batch=7), cache)
    assert computed == label.rows_to_compute == 0  # the run did what the preview said


def test_appended_rows_with_read_inputs(tmp_path):
    """The loader's input changed: without --read-inputs every step waits on it; with
    it, the unchanged batches are known to be cached and only the new rows are work."""
    data, cache = tmp_path / "d.jsonl", tmp_path / "c"
    write_rows(data, base_rows())
    run(build(data, load_batch=25), cache)
    write_rows(data, [*base_rows(), *[{"id": 500 + i, "text": f"new {i}"} for i in range(5)]])
    before = snapshot(cache)
    plain = steps(build(data, load_batch=25).plan(cache_dir=cache))
    assert plain["filter_rows"].waits_on == ["load_data_from_file_system"]
    assert plain["load_data_from_file_system"].batches_total is None
    read = steps(build(data, load_batch=25).plan(cache_dir=cache, read_inputs=True))
    assert snapshot(cache) == before
    load = read["load_data_from_file_system"]
    assert (load.batches_cached, load.batches_to_compute, load.batches_total) == (4, 1, 5)
    assert load.rows_to_compute == 25  # rows 100-124: the last batch changed
    f = read["filter_rows"]  # batches of 50: rows 0-99 unchanged, then 100-124
    assert (f.batches_cached, f.batches_to_compute, f.rows_to_compute) == (2, 1, 25)
    assert not f.waits_on
    assert read["label"].waits_on == ["filter_rows"]


def test_cli_status_json_and_text(tmp_path):
    data, cache = tmp_path / "d.jsonl", tmp_path / "c"
    write_rows(data, base_rows())
    path = tmp_path / "p.py"
    path.write_text(
        "from tests.test_rows import build\n"
        f"pipeline = build(__import__('pathlib').Path({str(data)!r}))\n"
    )
    r = cas_inproc("status", str(path), "--json", cache_dir=cache)
    assert r.returncode == 0, r
    assert not cache.exists()  # a preview never creates a store
    doc = r.json()
    assert doc["free"] is False
    assert doc["steps"][0]["name"] == "load_data_from_file_system"
    assert all(s["batches_cached"] == 0 for s in doc["steps"])
    assert cas_inproc("run", str(path), cache_dir=cache).returncode == 0
    r = cas_inproc("status", str(path), "--param", "label.input_batch_size=9", cache_dir=cache)
    assert r.returncode == 0, r
    line = next(x for x in r.stdout.splitlines() if x.startswith("label"))
    assert line.split()[-2:] == ["0", "rows"] and " 120 " in line
    # Names are printed whole (they were cut to 24 characters): the loader's is 26.
    assert any(x.split()[0] == "load_data_from_file_system" for x in r.stdout.splitlines())
    long_name = "rows-under-a-name-of-31-letters"
    build(data, name=long_name).execute(cache_dir=cache, quiet=True)
    ls = cas_inproc("ls", cache_dir=cache).stdout.splitlines()
    assert ls[0].split()[0] == "NAME" and long_name in [x.split()[0] for x in ls[1:]]


def test_a_corrupt_segment_is_not_repaired_by_a_preview(tmp_path):
    """The preview skips a damaged segment (its rows are not counted as found) and
    leaves it where it is: quarantine and repair are for runs and fsck."""
    from castore.store import Store

    data, cache = tmp_path / "d.jsonl", tmp_path / "c"
    write_rows(data, base_rows())
    run(build(data), cache)
    store = Store(cache)
    fp, seg = next(store.iter_row_segments())
    from castore.store import rowpack

    assert rowpack.current(store, fp) is None  # 8 batches: below a pack; segments are read
    path = Path(store.path_of(seg))
    path.chmod(0o644)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    before = snapshot(cache)
    label = steps(build(data, batch=7).plan(cache_dir=cache))["label"]
    assert snapshot(cache) == before
    assert 0 < label.rows_by_key < 120


def test_an_entry_whose_object_is_gone_is_not_dropped_by_a_preview(tmp_path):
    """A run drops an entry naming a missing object; the preview only counts the batch
    as work and leaves the entry (and writes no tombstone for a packed one)."""
    from castore.store import Store

    data, cache = tmp_path / "d.jsonl", tmp_path / "c"
    write_rows(data, base_rows())
    run(build(data), cache)
    store = Store(cache)
    key = next(k for k in store.iter_actions() if store.get_action(k).info.get("step") == "label")
    victim = store.get_action(key).outputs[0]
    os.unlink(store.path_of(victim))
    before = snapshot(cache)
    label = steps(build(data, name="other").plan(cache_dir=cache))["label"]
    assert snapshot(cache) == before
    assert label.batches_to_compute >= 1
    assert store.peek_action(key) is not None


def test_status_counts_what_only_the_remote_has(tmp_path):
    """A second machine with an empty store: with --remote every batch counts as cached
    on the remote, the run then fetches them all and computes nothing; nothing is
    written by the preview, not even a store."""
    from castore.remote import Remote
    from castore.transfer import push

    data, first, second = tmp_path / "d.jsonl", tmp_path / "a", tmp_path / "b"
    write_rows(data, base_rows())
    run(build(data), first)
    from castore.store import Store

    remote = str(tmp_path / "remote")
    push(Store(first), Remote(remote))
    report = build(data).plan(cache_dir=second, remote=remote)
    assert not second.exists()
    label = steps(report)["label"]
    assert label.batches_to_compute == 0 and label.batches_on_remote == label.batches_total
    assert report.free
    _, computed, _ = run(build(data), second, remote=remote)
    assert computed == 0  # the run did what the preview said
    r = cas_inproc("status", "--help")
    assert "--remote" in r.stdout
