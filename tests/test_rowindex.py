"""The row-key index behind row-level reuse: bulk keys equal the reference definition,
hits are keyed from their segments only when a miss needs it, and packs (a step's
segments merged into one object) serve exactly what the segments would, stay derived
data for gc and fsck, and are rebuilt when missing or damaged."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from castore.hashing import base_row_keys, occurrence_key, row_keys
from castore.pipeline import rows as rows_mod
from castore.pipeline.rows import RowIndex
from castore.runs import list_runs
from castore.store import Store, rowpack
from castore.store.manifests import StepManifest, load_model
from tests.conftest import cas_inproc, store_calls
from tests.test_rows import build, run, write_rows

FP = "cd" * 32


def stream_keys(columns: list[pa.Array]) -> list[bytes]:
    seen: dict[bytes, int] = {}
    out = []
    for b in base_row_keys(FP, columns):
        n = seen.get(b, 0)
        seen[b] = n + 1
        out.append(occurrence_key(b, n))
    return out


scalars = st.one_of(
    st.none(),
    st.text(max_size=8),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True),
    st.booleans(),
)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(["str", "int", "float", "bool", "list", "struct"]), st.data())
def test_bulk_row_keys_are_the_reference_keys(kind, data):
    """The engine's bulk keys (per column, from Arrow) equal row_keys, the definition,
    for every type: the same rows give the same keys whichever path computed them."""
    n = data.draw(st.integers(0, 12))
    elem = {
        "str": st.one_of(st.none(), st.text(max_size=8)),
        "int": st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)),
        "float": st.one_of(st.none(), st.floats(allow_nan=True)),
        "bool": st.one_of(st.none(), st.booleans()),
        "list": st.one_of(st.none(), st.lists(st.integers(0, 3), max_size=3)),
        "struct": st.one_of(st.none(), st.fixed_dictionaries({"a": st.integers(0, 3)})),
    }[kind]
    values = data.draw(st.lists(elem, min_size=n, max_size=n))
    other = pa.array(data.draw(st.lists(st.text(max_size=3), min_size=n, max_size=n)))
    col = pa.array(values) if values else pa.array([], pa.string())
    assert stream_keys([col]) == row_keys(FP, [col.to_pylist()], {})
    assert stream_keys([col, other]) == row_keys(FP, [col.to_pylist(), other.to_pylist()], {})


def run_segments(cache: Path, name: str = "rows", step: str = "label") -> list[str]:
    store = Store(cache)
    info = next(r for r in list_runs(store) if r.name == name)
    ref = next(s for s in info.manifest.steps if s.name == step)
    man = load_model(store, ref.manifest, StepManifest)
    return [b.row_index for b in man.batches if b.row_index]


def keys_of(cache: Path, segments: list[str]) -> list[bytes]:
    store = Store(cache)
    return [k for s in segments for k in store.get_table(s).column("row_key").to_pylist()]


def test_hits_count_their_rows_in_the_stream_from_their_segments(tmp_path):
    """Equal prompts spread over cached and new batches: the new ones are new samples,
    and every row's key is the one a fresh run of the same input gives it."""
    path = tmp_path / "dup.jsonl"
    texts = ["same", "other", "same", "third", "same", "other"] * 4
    write_rows(path, [{"id": i, "text": t} for i, t in enumerate(texts)])
    cache = tmp_path / "c"
    assert run(build(path, batch=4, load_batch=6), cache)[1] == 24
    more = [*texts, "same", "new", "other"]
    write_rows(path, [{"id": i, "text": t} for i, t in enumerate(more)])
    rows, computed, _ = run(build(path, batch=4, load_batch=6), cache)
    assert computed == 3  # the 13th "same", the 9th "other" and "new"
    fresh = tmp_path / "fresh"
    want, _, _ = run(build(path, batch=4, load_batch=6), fresh, use_cache=False)
    assert rows == want
    got_keys = keys_of(cache, run_segments(cache))
    assert got_keys == keys_of(fresh, run_segments(fresh))
    assert len(set(got_keys)) == len(more)  # equal prompts keep separate keys


def test_an_append_reads_no_segment_of_the_batches_it_reuses(tmp_path, monkeypatch):
    """With a pack, a run whose new rows are new everywhere reads one index object: no
    segment of its cached batches, none of the pack's."""
    monkeypatch.setattr(rows_mod, "PACK_AFTER", 2)
    data = tmp_path / "d.jsonl"
    base = [{"id": i, "text": f"row {i}"} for i in range(200)]
    write_rows(data, base)
    cache = tmp_path / "c"
    run(build(data, batch=10), cache)
    store = Store(cache)
    segments = {seg for _, seg in store.iter_row_segments()}
    assert rowpack.current(store, next(store.iter_row_segments())[0]) is not None
    read = store_calls(monkeypatch, "get_table")
    write_rows(data, [*base, {"id": 999, "text": "brand new"}])
    assert run(build(data, batch=10), cache)[1] == 1
    assert not segments & set(read)


def _segments_only(store: Store, fp: str) -> RowIndex:
    """An index loaded from the segments alone (the pointer moved aside meanwhile)."""
    path = Path(rowpack.pointer_path(store, fp))
    path.rename(path.with_suffix(".off"))
    try:
        return RowIndex.load(store, fp)
    finally:
        path.with_suffix(".off").rename(path)


def test_a_pack_finds_what_the_segments_find_and_nothing_stale(tmp_path, monkeypatch):
    data = tmp_path / "d.jsonl"
    write_rows(data, [{"id": i, "text": f"row {i}"} for i in range(300)])
    cache = tmp_path / "c"
    run(build(data, batch=10), cache)  # 30 segments: the run packs them
    store = Store(cache)
    fp, _ = next(store.iter_row_segments())
    segments = run_segments(cache)
    keys = keys_of(cache, segments)
    first = rowpack.current(store, fp)
    assert first is not None and sorted(rowpack.covered(store, first) or []) == sorted(segments)
    monkeypatch.setattr(rows_mod, "PACK_AFTER", 10**9)
    from_pack = RowIndex.load(store, fp).find(keys)
    assert all(f is not None for f in from_pack)
    assert from_pack == _segments_only(store, fp).find(keys)
    # A segment whose marker is gone (gc or fsck dropped it): its rows are not served
    # from the pack either.
    gone = segments[3]
    store.drop_row_segment(fp, gone)
    gone_keys = set(keys_of(cache, [gone]))
    found = RowIndex.load(store, fp).find(keys)
    assert [f is None for f in found] == [k in gone_keys for k in keys]
    assert rowpack.current(store, fp) == first  # 10 of 300 stale: not worth a new pack


def labelled(tmp_path: Path, n: int) -> tuple[Path, Path, Store, str]:
    """n rows through the row-wise step in batches of 10: (data file, cache, store, step
    fingerprint)."""
    data = tmp_path / "d.jsonl"
    write_rows(data, [{"id": i, "text": f"row {i}"} for i in range(n)])
    cache = tmp_path / "c"
    run(build(data, batch=10), cache)
    store = Store(cache)
    fp, _ = next(store.iter_row_segments())
    return data, cache, store, fp


def packed(tmp_path: Path) -> tuple[Path, Path, Store, str, str]:
    """200 rows in 20 batches: the run packs their segments. (data file, cache, store,
    step fingerprint, pack id)"""
    data, cache, store, fp = labelled(tmp_path, 200)
    pack = rowpack.current(store, fp)
    assert pack is not None
    return data, cache, store, fp, pack


def test_a_missing_or_damaged_pack_is_rebuilt_from_the_segments(tmp_path):
    _, cache, store, fp, pack = packed(tmp_path)
    keys = keys_of(cache, run_segments(cache))
    obj = Path(store.path_of(pack))
    obj.chmod(0o644)
    obj.write_bytes(obj.read_bytes()[:-9] + b"corrupted")
    assert all(f is not None for f in RowIndex.load(store, fp).find(keys))
    assert any(q.name.startswith(pack) for q in (cache / "quarantine").iterdir())
    rebuilt = rowpack.current(store, fp)
    assert rebuilt == pack and store.verify(rebuilt)  # written again: same content, same id
    Path(rowpack.pointer_path(store, fp)).write_text("ab" * 32)  # names nothing
    assert all(f is not None for f in RowIndex.load(store, fp).find(keys))
    assert rowpack.current(store, fp) == pack


def test_gc_keeps_a_pack_while_it_keeps_its_segments_and_fsck_checks_it(tmp_path):
    data, cache, store, fp, pack = packed(tmp_path)
    gc = ("gc", "--grace", "0", "--cache-ttl", "0")
    assert cas_inproc(*gc, cache_dir=cache).returncode == 0
    assert store.has(pack) and rowpack.current(store, fp) == pack  # the ref keeps it all
    assert cas_inproc("fsck", cache_dir=cache).returncode == 0

    Path(rowpack.pointer_path(store, fp)).write_text("not an id")
    r = cas_inproc("fsck", cache_dir=cache)
    assert r.returncode == 1 and "dangling-index" in r.stdout and ".pack" in r.stdout, r.stdout
    assert cas_inproc("fsck", "--repair", cache_dir=cache).returncode in (0, 1)
    assert cas_inproc("fsck", cache_dir=cache).returncode == 0
    assert rowpack.current(store, fp) is None
    run(build(data, batch=7), cache)  # 29 more segments (rows reused by key): a new pack
    second = rowpack.current(store, fp)
    live = {seg for _, seg in store.iter_row_segments()}
    assert second is not None and set(rowpack.covered(store, second) or []) == live

    assert cas_inproc("rm", "--all", "rows", cache_dir=cache).returncode == 0
    assert cas_inproc(*gc, cache_dir=cache).returncode == 0
    assert not list(store.iter_row_segments())
    assert not store.has(pack) and not store.has(second)
    assert rowpack.current(store, fp) is None
    assert cas_inproc("fsck", cache_dir=cache).returncode == 0


def test_random_appends_and_reorders_match_a_fresh_run(tmp_path):
    """Several edits in a row on one store (appends with repeats, shuffles, new batch
    sizes): each run's dataset equals a fresh run's and computes only unseen rows."""
    rng = random.Random(7)
    data, cache = tmp_path / "d.jsonl", tmp_path / "c"
    pool = [f"prompt {i % 23}" for i in range(60)]
    texts: list[str] = []
    seen: dict[str, int] = {}
    for round_ in range(5):
        texts += [rng.choice(pool) for _ in range(rng.randint(5, 40))]
        if round_ == 3:
            rng.shuffle(texts)
        write_rows(data, [{"id": i, "text": t} for i, t in enumerate(texts)])
        batch = rng.choice([3, 8, 16])
        rows, computed, _ = run(build(data, batch=batch), cache)
        counts: dict[str, int] = {}
        for t in texts:
            counts[t] = counts.get(t, 0) + 1
        new = sum(max(0, n - seen.get(t, 0)) for t, n in counts.items())
        assert computed == new, (round_, computed, new)
        seen = {t: max(n, seen.get(t, 0)) for t, n in counts.items()}
        want, _, _ = run(build(data, batch=batch), tmp_path / f"f{round_}", use_cache=False)
        assert rows == want
        assert json.dumps(rows)  # plain data


def test_a_loaded_index_takes_in_segments_announced_since(tmp_path):
    """What a run waiting on another run's row claim relies on: after `refresh`, rows
    stored since the load are found where a fresh load finds them."""
    data, cache, store, fp = labelled(tmp_path, 40)
    index = RowIndex.load(store, fp)
    write_rows(data, [{"id": i, "text": f"row {i}"} for i in range(70)])
    run(build(data, batch=10), cache)  # another "run": 3 new segments
    keys = keys_of(cache, run_segments(cache))
    before = index.find(keys)
    assert sum(f is None for f in before) == 30
    index.refresh()
    found, fresh = index.find(keys), RowIndex.load(store, fp).find(keys)
    assert all(f is not None for f in found) and all(f is not None for f in fresh)

    def row(at) -> dict:
        return store.get_table(at[0]).slice(at[1], 1).to_pylist()[0]

    # Equal rows may sit in two objects (the same batch over other input objects), so
    # the place may differ; the row found is the same.
    assert [row(a) for a in found] == [row(b) for b in fresh]
