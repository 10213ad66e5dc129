"""Objects that extend their input (castore/store/extend.py): a column-adding step stores
its own columns and names the input rows it extends; every reader gets the whole table."""

from __future__ import annotations

import glob
import json
import os

import pyarrow.parquet as pq
import pytest

from castore import Pipeline, StepInput, StepOutput, gc, step
from castore.errors import CorruptObject, UnknownObject
from castore.steps import LoadDataFromDicts
from castore.store import Store
from castore.store.extend import EXTENDS_KEY
from castore.store.manifests import RunManifest, StepManifest, load_model
from tests.conftest import cas_inproc
from tests.test_pipeline import ROWS, Score, Upper, build, counts, rows


@step(inputs=["instruction"], outputs=["instruction"])
def Shout(inputs: StepInput) -> StepOutput:
    """Rewrites an input column in place (and keeps the others)."""
    yield [{**r, "instruction": r["instruction"] + "!"} for r in inputs]


def manifests(store: Store, ds) -> dict[str, StepManifest]:
    run = load_model(store, ds.run_oid, RunManifest)
    return {r.name: load_model(store, r.manifest, StepManifest) for r in run.steps}


def stored_columns(store: Store, oid: str) -> list[str]:
    return pq.read_schema(store.path_of(oid)).names


def needs(store: Store, of: str, footer: bool = False) -> list[str]:
    """What an action key's entry says its outputs extend, or (`footer`) what object
    `of`'s own footer says."""
    if footer:
        return json.loads(pq.read_schema(store.path_of(of)).metadata[EXTENDS_KEY])["needs"]
    entry = store.get_action(of)
    assert entry is not None
    return entry.needs()


def whole(store: Store, man: StepManifest) -> list[dict]:
    return [r for b in man.batches for o in b.outputs for r in store.get_table(o).to_pylist()]


def chain(name: str = "c") -> Pipeline:
    with Pipeline(name=name) as p:
        load = LoadDataFromDicts(data=ROWS, batch_size=25)
        load >> Upper(input_batch_size=40) >> Score(input_batch_size=30)
    return p


def test_column_adding_steps_store_only_their_columns(make_store):
    a, b = make_store("a"), make_store("b")
    ds = build().run(cache_dir=a.root, quiet=True)
    fresh = build().run(cache_dir=b.root, quiet=True, use_cache=False)
    assert rows(ds, "keep_columns") == rows(fresh, "keep_columns")
    mans = manifests(a, ds)
    for name, own in (("upper", ["response"]), ("score", ["score"])):
        for rec in mans[name].batches:
            assert [stored_columns(a, o) for o in rec.outputs] == [own]
            assert rec.extends, name  # data/ writes such a leaf batch whole
    # Score extends upper, which extends the loader: it needs both, transitively.
    loader = {o for rec in mans["load_data_from_dicts"].batches for o in rec.outputs}
    upper = {o for rec in mans["upper"].batches for o in rec.outputs}
    needed = {o for rec in mans["score"].batches for o in needs(a, rec.key)}
    assert needed == loader | upper
    # A leaf stays whole: the run folder's data/ files are its objects.
    for rec in mans["keep_columns"].batches:
        assert stored_columns(a, rec.outputs[0]) == ["instruction", "response", "score"]
    # Read back, an extension is the whole table, as the no-cache run's non-leaf steps
    # (stored whole there: nothing is cached, so nothing extends) would give it.
    fresh_mans = manifests(b, fresh)
    for name in ("upper", "score"):
        assert whole(a, mans[name]) == whole(b, fresh_mans[name])
        assert whole(a, mans[name])[0].keys() >= {"instruction", "n", "response"}
    # The entries say it too, and the footer names the input rows.
    entry = a.get_action(mans["score"].batches[0].key)
    assert entry is not None and entry.needs() == needs(a, entry.outputs[0], footer=True)
    assert entry.schema_version == 2  # a castore that knows only 1 refuses it: a miss
    r = cas_inproc("cat", entry.outputs[0], "--json", cache_dir=a.root)
    assert r.returncode == 0 and r.json() == a.get_table(entry.outputs[0]).to_pylist()
    assert set(r.json()[0]) == {"instruction", "n", "response", "score"}
    footer = json.loads(pq.read_schema(a.path_of(entry.outputs[0])).metadata[EXTENDS_KEY])
    assert footer["columns"] == ["instruction", "n", "response", "score"]
    assert {o for o, _, _ in footer["base"]} <= upper


def test_a_changed_input_column_is_stored(make_store):
    a, b = make_store("a"), make_store("b")

    def longer() -> Pipeline:
        with Pipeline(name="longer") as p:
            load = LoadDataFromDicts(data=ROWS, batch_size=25)
            load >> Shout(input_batch_size=40) >> Upper(input_batch_size=30)
        return p

    ds = longer().run(cache_dir=a.root, quiet=True)
    fresh = longer().run(cache_dir=b.root, quiet=True, use_cache=False)
    assert rows(ds, "upper") == rows(fresh, "upper")
    assert rows(ds, "upper")[0] == {"instruction": "q0!", "n": 0, "response": "Q0!"}
    for rec in manifests(a, ds)["shout"].batches:
        assert stored_columns(a, rec.outputs[0]) == ["instruction"]


def test_a_leaf_hit_that_extends_is_written_whole_to_data(make_store):
    """upper extends its input where it was computed (not a leaf); a pipeline ending at
    upper reuses those batches, and its data/ files still hold every column."""
    a, b = make_store("a"), make_store("b")
    chain().run(cache_dir=a.root, quiet=True)

    def short() -> Pipeline:
        with Pipeline(name="short") as p:
            LoadDataFromDicts(data=ROWS, batch_size=25) >> Upper(input_batch_size=40)
        return p

    ds = short().run(cache_dir=a.root, quiet=True)
    assert counts(ds, "upper")[1] == 0
    assert rows(ds, "upper") == rows(short().run(cache_dir=b.root, quiet=True), "upper")
    files = sorted(glob.glob(str(a.root / "runs" / "short" / "*" / "data" / "upper" / "*.parquet")))
    assert files and all(pq.read_schema(f).names == ["instruction", "n", "response"] for f in files)
    # The folder is kept as it is on a re-run (its stamp matches).
    again = short().run(cache_dir=a.root, quiet=True)
    assert rows(again, "upper") == rows(ds, "upper")


def test_gc_keeps_what_a_kept_entry_extends(store):
    """An entry kept by the cache-ttl alone keeps the objects its outputs extend, even
    when the entries that made those are gone: a later run's hit reads whole rows."""
    ds = build().run(cache_dir=store.root, quiet=True)
    mans, expected = manifests(store, ds), rows(ds, "keep_columns")
    for name, sig, _ in store.list_refs():
        store.delete_ref(name, sig)
    for step_name in ("load_data_from_dicts", "upper"):
        for rec in mans[step_name].batches:
            store.delete_action(rec.key)
    gc.collect(store, grace=0)  # entries are young: the cache-ttl keeps them
    needed = {o for rec in mans["score"].batches for o in needs(store, rec.key)}
    assert needed and all(store.has(o) for o in needed)
    assert cas_inproc("fsck", cache_dir=store.root).returncode == 0
    again = build().run(cache_dir=store.root, quiet=True)
    assert counts(again, "score")[1] == 0
    assert rows(again, "keep_columns") == expected


def test_a_missing_or_damaged_base_is_never_other_rows(store):
    ds = build().run(cache_dir=store.root, quiet=True)
    mans = manifests(store, ds)
    rec = mans["score"].batches[0]
    upper_oid = next(o for o in needs(store, rec.key) if o in mans["upper"].batches[0].outputs)
    loader_oid = next(o for o in needs(store, rec.key) if o != upper_oid)
    import os

    path = store.path_of(loader_oid)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(10)
        f.write(b"\x00\x01\x02")
    with pytest.raises(CorruptObject):
        store.get_table(rec.outputs[0])
    assert not store.has(loader_oid)  # quarantined
    with pytest.raises(UnknownObject, match=f"{upper_oid} extends object {loader_oid}"):
        store.get_table(rec.outputs[0])
    # fsck names the entries that can no longer be read whole; a re-run recomputes the
    # loader batch (same rows, same object) and serves every step's rows right.
    r = cas_inproc("fsck", cache_dir=store.root)
    assert r.returncode != 0 and "dangling-action" in r.stdout
    again = build().run(cache_dir=store.root, quiet=True)
    assert rows(again, "keep_columns") == rows(ds, "keep_columns")
    assert store.has(loader_oid)


def test_layout_1_store_is_upgraded(tmp_path):
    s = Store(tmp_path / "s")
    layout = s.root / "castore-layout.json"
    doc = json.loads(layout.read_text())
    layout.write_text(json.dumps({**doc, "layout_version": 1}))
    Store(tmp_path / "s")
    assert json.loads(layout.read_text())["layout_version"] == 2


def test_small_inputs_stay_whole(make_store, monkeypatch):
    """Below MIN_BASE_BYTES of input a batch is stored whole (the extension's footer
    would outweigh the bytes saved); short prompts above it (bench_overhead's anchor has
    ~4.6 kB per 50-row input) and long ones extend."""
    from castore.store import extend
    from tests.conftest import MIN_BASE_BYTES

    monkeypatch.setattr(extend, "MIN_BASE_BYTES", MIN_BASE_BYTES)
    a = make_store("a")
    mans = manifests(a, build().run(cache_dir=a.root, quiet=True))
    assert all(not rec.extends for rec in mans["upper"].batches)
    assert stored_columns(a, mans["upper"].batches[0].outputs[0]) == [
        "instruction",
        "n",
        "response",
    ]
    for label, words in (("short", 12), ("long", 250)):
        prompts = [{"instruction": f"q{i} " + "word " * words, "n": i} for i in range(80)]
        b = make_store(label)
        mans = manifests(b, build(data=prompts).run(cache_dir=b.root, quiet=True))
        assert all(rec.extends for rec in mans["upper"].batches), label
        assert all(stored_columns(b, r.outputs[0]) == ["response"] for r in mans["upper"].batches)


def test_rows_reused_from_an_extension_whose_base_is_gone_are_computed_again(make_store):
    """A row-wise step's rows are found by key in an object that extends an input no
    longer in the store (another loader batch size, its old objects removed): the rows
    are computed again, not read half."""
    calls: list[str] = []

    @step(inputs=["instruction"], outputs=["answer"], row_wise=True)
    def Answer(inputs: StepInput) -> StepOutput:
        calls.extend(r["instruction"] for r in inputs)
        yield [{**r, "answer": r["instruction"][::-1]} for r in inputs]

    def pipeline(load_batch: int) -> Pipeline:
        with Pipeline(name=f"rows-{load_batch}") as p:
            load = LoadDataFromDicts(data=ROWS, batch_size=load_batch)
            load >> Answer(input_batch_size=40) >> Score(input_batch_size=30)
        return p

    a = make_store("a")
    first = pipeline(25).run(cache_dir=a.root, quiet=True)
    assert len(calls) == len(ROWS)
    mans = manifests(a, first)
    assert all(rec.extends for rec in mans["answer"].batches)
    loader = mans["load_data_from_dicts"].batches[0].outputs[0]
    os.chmod(a.path_of(loader), 0o644)
    os.unlink(a.path_of(loader))  # what answer's first batch extends
    calls.clear()
    again = pipeline(50).run(cache_dir=a.root, quiet=True)  # other loader objects
    assert 0 < len(calls) < len(ROWS)  # the rows whose objects are whole again are reused
    fresh = pipeline(50).run(cache_dir=make_store("b").root, quiet=True, use_cache=False)
    assert rows(again, "score") == rows(fresh, "score")


def test_footers_castore_does_not_write_are_refused_in_one_line(store, tmp_path):
    """Intact objects with a crafted footer (bytes someone with write access to a remote
    could serve through a trusted entry) fail to read with one line naming the object,
    never as other rows or a recursion error; fsck finds them and --repair quarantines."""
    import pyarrow as pa

    from castore.errors import BadObject
    from castore.store.extend import MAX_NEEDS
    from castore.store.parquet import encode_parquet

    base = store.put_table(pa.table({"x": [1, 2]}))

    def put(footer: bytes, rows: int = 2) -> str:
        own = pa.table({"y": list(range(rows))})
        return store.put_encoded(encode_parquet(own, {EXTENDS_KEY: footer}))

    def footer(bases: list[str], needs: list[str]) -> bytes:
        doc = {"base": [[b, 0, 2] for b in bases], "columns": ["x", "y"], "needs": needs}
        return json.dumps(doc).encode()

    malformed = put(b'{"base": "nope"}')
    too_many = put(footer([base], [base] + [f"{i:064x}" for i in range(MAX_NEEDS)]))
    unlisted = put(footer([base], []))
    over_malformed = put(footer([malformed], [malformed]))  # its own footer is castore's
    chain = [base]
    for _ in range(MAX_NEEDS + 2):  # each names only its own base: deeper than castore writes
        chain.append(put(footer(chain[-1:], chain[-1:])))
    assert store.get_table(put(footer([base], [base]))).column_names == ["x", "y"]
    for oid, said in [
        (malformed, "malformed castore_extends footer"),
        (too_many, "footer castore does not write"),
        (unlisted, "footer castore does not write"),
        (chain[-1], f"does not list in its footer what object {chain[-2]}"),
    ]:
        with pytest.raises(BadObject, match=f"object {oid} .*{said}.*cas fsck --repair") as e:
            store.get_table(oid)
        assert "\n" not in str(e.value)

    r = cas_inproc("fsck", cache_dir=store.root)
    assert r.returncode != 0
    found = {
        ln.split()[1].rstrip(":") for ln in r.stdout.splitlines() if ln.startswith("bad-object")
    }
    assert found == {malformed, too_many, unlisted, *chain[2:]}  # chain[1] is well formed
    with pytest.raises(BadObject, match=f"object {malformed} has a malformed"):
        store.get_table(over_malformed)  # what it reads is named, not it
    # The same objects on a remote: `fsck --remote` finds the same ones.
    from castore.fsck import check_remote
    from castore.remote import Remote

    remote = Remote(str(tmp_path / "remote"))
    for oid in store.iter_oids():
        remote.put_object(store, oid)
    on_remote = {p.id for p in check_remote(remote).problems if p.kind == "bad-object"}
    assert on_remote == found
    r = cas_inproc("cat", chain[-1], cache_dir=store.root)
    assert r.returncode != 0 and "does not list" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = cas_inproc("fsck", "--repair", cache_dir=store.root)
    assert not any(map(store.has, found)) and store.has(base) and store.has(chain[1])
    assert cas_inproc("fsck", cache_dir=store.root).returncode == 0


@step(inputs=["instruction"], outputs=["tag"])
def Tagged(inputs: StepInput) -> StepOutput:
    """Returns a Table with schema metadata, and a field metadata on an input column."""
    import pyarrow as pa

    t = pa.Table.from_pylist([{**r, "tag": r["instruction"][-1]} for r in inputs])
    at = t.schema.get_field_index("n")
    t = t.cast(t.schema.set(at, t.schema.field("n").with_metadata({b"unit": b"count"})))
    yield t.replace_schema_metadata({b"origin": b"tagged"})


def test_an_extension_reads_back_with_the_schema_the_step_returned(make_store):
    """Schema metadata and field metadata are part of what a step returned: a column whose
    field changed is stored (reading takes a kept column's field from the base), and the
    output's schema metadata comes back without the footer's key."""
    import pyarrow as pa

    from castore.store.parquet import as_read, encode_parquet

    a, b = make_store("a"), make_store("b")

    def tagged() -> Pipeline:
        with Pipeline(name="tagged") as p:
            (
                LoadDataFromDicts(data=ROWS, batch_size=25)
                >> Tagged(input_batch_size=40)
                >> Upper(input_batch_size=30)
            )
        return p

    ds = tagged().run(cache_dir=a.root, quiet=True)
    fresh = tagged().run(cache_dir=b.root, quiet=True, use_cache=False)
    assert rows(ds, "upper") == rows(fresh, "upper")
    got, want = manifests(a, ds)["tagged"], manifests(b, fresh)["tagged"]
    for mine, theirs in zip(got.batches, want.batches, strict=True):
        assert stored_columns(a, mine.outputs[0]) == ["n", "tag"]  # n's field changed
        read, whole_ = a.get_table(mine.outputs[0]), b.get_table(theirs.outputs[0])
        assert read.equals(whole_) and read.schema.equals(whole_.schema, check_metadata=True)
        assert read.schema.metadata == {b"origin": b"tagged"}
        assert read.schema.field("n").metadata == {b"unit": b"count"}
    # Kept in memory for the next step as reading gives it: the footer's key goes, the
    # output's metadata stays.
    own = pa.table({"y": [1]}).replace_schema_metadata({b"origin": b"x"})
    buf = encode_parquet(own, {EXTENDS_KEY: b"{}"})
    kept = as_read(own, buf, footer=True)
    assert kept is not None and kept.schema.metadata == {b"origin": b"x"}
