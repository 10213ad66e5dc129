"""Large inline rows (LoadDataFromDicts' data) kept as one store object that pipeline.yaml
names (castore/pipeline/inline.py): small recipes, exact identity, and the object kept,
moved and checked with the run like any other."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from castore import Pipeline, StepInput, step
from castore.errors import ConfigError, PipelineError, UnhashableParam
from castore.gc import collect
from castore.pipeline.inline import INLINE_MAX_BYTES
from castore.remote import Remote
from castore.steps import LoadDataFromDicts
from castore.store.manifests import RunManifest, load_model
from castore.transfer import pull, push
from tests.conftest import cas_inproc

ROWS = 2_000


@step(inputs=["text"], outputs=["shout"])
def Shout(inputs: StepInput):
    return [{**r, "shout": r["text"].upper()} for r in inputs]


def data(n: int = ROWS) -> list[dict]:
    return [{"id": i, "text": f"row {i} " + "word " * (i % 7), "w": i / 3} for i in range(n)]


def build(rows: list[dict], name: str = "inline") -> Pipeline:
    with Pipeline(name=name) as p:
        LoadDataFromDicts(name="load", data=rows, batch_size=100) >> Shout(name="shout")
    return p


def run_manifest(store, ds) -> RunManifest:
    return load_model(store, ds.run_oid, RunManifest)


def flip(path: Path) -> None:
    os.chmod(path, 0o644)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_large_rows_are_one_object_that_pipeline_yaml_names(store):
    rows = data()
    ds = build(rows).run(cache_dir=store.root, quiet=True)
    run = run_manifest(store, ds)
    assert len(run.inline) == 1 and store.has(run.inline[0])
    stored = store.get_bytes(run.pipeline_yaml).decode()
    assert "castore_inline" in stored and len(stored) < 8_000, len(stored)
    assert ds.pipeline_path.read_text() == stored  # the run folder's copy is the object
    # Rebuilt from the stored recipe and the store: the same pipeline, the same rows.
    again = Pipeline.from_yaml(stored, store)
    assert again.signature() == build(rows).signature()
    assert again.steps["load"].data == rows
    # A Distiset's pipeline.yaml has the rows written out: it needs no store.
    exported = ds.pipeline_yaml
    assert "castore_inline" not in exported and len(exported) > INLINE_MAX_BYTES
    assert Pipeline.from_yaml(exported).signature() == build(rows).signature()


def test_without_its_store_the_recipe_says_what_to_do(store):
    ds = build(data()).run(cache_dir=store.root, quiet=True)
    stored = store.get_bytes(run_manifest(store, ds).pipeline_yaml).decode()
    with pytest.raises(
        ConfigError, match=r"step load: its rows are kept in store object .*--cache-dir"
    ):
        Pipeline.from_yaml(stored)


def test_cas_runs_the_run_folders_pipeline_yaml(store, tmp_path):
    ds = build(data()).run(cache_dir=store.root, quiet=True)
    r = cas_inproc("run", str(ds.pipeline_path), "--json", cache_dir=store.root)
    assert r.returncode == 0, r.stderr
    # The same signature: a finished re-run, nothing computed.
    assert ds.run.signature in r.stdout
    status = cas_inproc("status", str(ds.pipeline_path), cache_dir=store.root)
    assert status.returncode == 0 and "inline" in status.stdout, status.stderr
    other = cas_inproc("run", str(ds.pipeline_path), cache_dir=tmp_path / "empty")
    assert other.returncode != 0 and "are not in store" in other.stderr, other.stderr
    assert "Traceback" not in other.stderr and len(other.stderr.strip().splitlines()) == 1


def test_identity_is_exact(store):
    rows = data()
    base = build(rows).signature()
    assert build([dict(r) for r in rows]).signature() == base  # equal rows, equal identity
    ints = [{**r, "w": float(r["id"])} for r in rows]
    floats = [{**r, "w": r["id"]} for r in rows]  # 1 vs 1.0: different values
    assert build(ints).signature() != build(floats).signature()
    nested = [{**r, "tags": [r["id"], "x"]} for r in rows]  # not flat: the general encoding
    assert build(nested).signature() not in (base, build(ints).signature())
    as_tuple = [{**r, "tags": (r["id"], "x")} for r in rows]
    # pydantic's JSON dump makes the tuple a list, as for every other param.
    assert build(as_tuple).signature() == build(nested).signature()
    with pytest.raises(UnhashableParam, match="data"):
        build([*rows, {"id": -1, "text": "", "w": float("nan")}]).signature()


@pytest.mark.parametrize(
    "rows",
    [
        data(20),  # flat: encoded as they are, spliced into the identity's encoding
        [{**r, "tags": [r["id"], "x"]} for r in data(20)],  # nested: pydantic's dump
        data(),  # large: the identity holds their digest
    ],
    ids=["flat", "nested", "large"],
)
def test_the_fingerprint_is_the_identitys_digest(rows):
    from castore.hashing import hash_json

    load = build(rows).steps["load"]
    assert load.fingerprint() == hash_json(load.identity(check=False))


def test_small_rows_stay_in_pipeline_yaml(store):
    ds = build(data(20)).run(cache_dir=store.root, quiet=True)
    run = run_manifest(store, ds)
    stored = store.get_bytes(run.pipeline_yaml).decode()
    assert run.inline == [] and "castore_inline" not in stored and "row 19" in stored


def test_rows_changed_after_the_signature_are_refused():
    rows = data()
    p = build(rows)
    sigs = p.signatures()
    load = p.steps["load"]
    assert load.inline_objects(sigs["load"]["fp"])["data"].ref.rows == ROWS
    load.data[5]["text"] = "edited"
    load.fingerprint()  # another fingerprint: the one the run recorded must be made again
    with pytest.raises(PipelineError, match="changed after the run computed"):
        load.inline_objects(sigs["load"]["fp"])


def test_gc_keeps_the_rows_while_a_ref_names_them(store):
    ds = build(data()).run(cache_dir=store.root, quiet=True)
    oid = run_manifest(store, ds).inline[0]
    collect(store, grace=0, cache_ttl=0)
    assert store.has(oid)
    r = cas_inproc("rm", "inline", cache_dir=store.root)
    assert r.returncode == 0, r.stderr
    collect(store, grace=0, cache_ttl=0)
    assert not store.has(oid)


def test_fsck_finds_damaged_rows_and_a_run_replaces_them(store):
    ds = build(data()).run(cache_dir=store.root, quiet=True)
    oid = run_manifest(store, ds).inline[0]
    flip(Path(store.path_of(oid)))
    assert cas_inproc("fsck", cache_dir=store.root).returncode != 0
    again = build(data()).run(cache_dir=store.root, quiet=True)
    assert store.verify(oid) and run_manifest(store, again).inline == [oid]
    assert cas_inproc("fsck", cache_dir=store.root).returncode == 0


def test_push_and_pull_carry_the_rows(make_store, tmp_path):
    a, b = make_store("a"), make_store("b")
    ds = build(data()).run(cache_dir=a.root, quiet=True)
    oid = run_manifest(a, ds).inline[0]
    remote = Remote(str(tmp_path / "remote"))
    push(a, remote)
    pull(b, remote)
    assert b.verify(oid)
    stored = b.get_bytes(run_manifest(b, ds).pipeline_yaml).decode()
    assert Pipeline.from_yaml(stored, b).signature() == ds.run.signature


def test_a_param_after_the_rows_is_still_checked():
    from castore.steps import LoadDataFromDicts as Loader

    class Tagged(Loader):
        tag: float = 0.0  # declared after `data`

    step = Tagged(name="t", data=data(), tag=float("nan"))  # NaN has no canonical JSON
    with pytest.raises(UnhashableParam, match="'tag'"):
        step.cache_params()


def test_explain_names_changed_rows_by_count_and_digest(store):
    build(data()).run(cache_dir=store.root, quiet=True)
    build(data(ROWS + 1)).run(cache_dir=store.root, quiet=True)
    r = cas_inproc("explain", "inline", cache_dir=store.root)
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if "param data" in x)
    assert f"<{ROWS} rows, " in line and f"<{ROWS + 1} rows, " in line, line
    assert "castore_inline" not in r.stdout and len(line) < 200
