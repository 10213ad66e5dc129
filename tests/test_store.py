from __future__ import annotations

import multiprocessing as mp
import os
import stat

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from castore.errors import (
    CorruptObject,
    InvalidObjectId,
    InvalidRefName,
    LayoutVersionError,
    StoreError,
    StoreNotWritable,
    UnknownObject,
)
from castore.hashing import hash_bytes
from castore.runs import resolve
from castore.store import ActionEntry, Store


def table(n: int = 100, seed: int = 0) -> pa.Table:
    return pa.table({"i": list(range(seed, seed + n)), "s": [f"row {i}" for i in range(n)]})


def test_bytes_round_trip(store):
    oid = store.put_bytes(b"hello")
    assert oid == hash_bytes(b"hello")
    assert store.get_bytes(oid) == b"hello"
    assert store.has(oid)
    assert list(store.iter_oids()) == [oid]


def test_file_round_trip(store, tmp_path):
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(3 * (1 << 20) + 17))
    oid = store.put_file(src)
    assert oid == hash_bytes(src.read_bytes())
    assert store.get_bytes(oid) == src.read_bytes()


def test_table_round_trip_and_same_table_same_id(store):
    t = table()
    a = store.put_table(t)
    b = store.put_table(table())
    assert a == b
    assert store.get_table(a).equals(t)
    assert len(list(store.iter_oids())) == 1


# Each column: (type, two values); every type castore's batches can hold, so that each
# reads back the same whether or not the object carries Arrow's schema.
_TYPES = {
    "bool": (pa.bool_(), [True, None]),
    "int8": (pa.int8(), [-1, None]),
    "uint64": (pa.uint64(), [2**63 + 5, None]),
    "f32": (pa.float32(), [1.5, None]),
    "f64": (pa.float64(), [1.5, None]),
    "str": (pa.string(), ["é", None]),
    "bin": (pa.binary(), [b"\x00", None]),
    "date": (pa.date32(), [19000, None]),
    "ts": (pa.timestamp("us"), [1, None]),
    "ts_utc": (pa.timestamp("ns", tz="UTC"), [1, None]),
    "null": (pa.null(), [None, None]),
    "list": (pa.list_(pa.int64()), [[1, None], None]),
    "struct": (pa.struct([("a", pa.int64()), ("b", pa.list_(pa.string()))]), [{"a": 1}, None]),
    "required": (pa.int64(), [1, 2]),
    # These need the stored schema to read back as they were written.
    "large_str": (pa.large_string(), ["a", None]),
    "large_list": (pa.large_list(pa.int64()), [[1], None]),
    "dict": (pa.dictionary(pa.int32(), pa.string()), ["a", None]),
    "ts_paris": (pa.timestamp("us", tz="Europe/Paris"), [1, None]),
    "duration": (pa.duration("s"), [1, None]),
    "fixed": (pa.list_(pa.int64(), 2), [[1, 2], None]),
    "list_of_large": (pa.list_(pa.large_string()), [["a"], None]),
}


@pytest.mark.parametrize("name", sorted(_TYPES))
def test_batch_objects_read_back_their_types_with_or_without_arrow_schema(name):
    """Batch objects carry Arrow's schema only where Parquet alone would read back
    another type; either way the table reads back equal, types and metadata included."""
    import pyarrow.parquet as pq

    from castore.store.parquet import WRITE_OPTIONS, encode_parquet, needs_schema, read_parquet

    t, values = _TYPES[name]
    field = pa.field("c", t, nullable=name != "required")
    table = pa.table({"c": pa.array(values, type=t)}, schema=pa.schema([field]))
    buf = encode_parquet(table)
    back = read_parquet(buf)
    assert back.schema == table.schema  # == ignores a list's item name, as reads do
    assert back.equals(table)
    stored = b"ARROW:schema" in (pq.read_metadata(pa.BufferReader(buf)).metadata or {})
    assert stored == needs_schema(table.schema)
    # The schema is left out exactly where writing it changes nothing that is read back.
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, store_schema=False, **WRITE_OPTIONS)
    bare = read_parquet(sink.getvalue())
    assert (bare.schema == table.schema and bare.equals(table)) == (not stored)


def test_schema_and_field_metadata_keep_the_stored_schema():
    from castore.store.parquet import encode_parquet, needs_schema, read_parquet

    plain = pa.table({"a": [1], "b": ["x"]})
    assert not needs_schema(plain.schema)
    for table in (
        plain.replace_schema_metadata({"huggingface": "{}"}),
        plain.cast(pa.schema([("a", pa.int64()), pa.field("b", pa.string(), metadata={"k": "v"})])),
    ):
        assert needs_schema(table.schema)
        back = read_parquet(encode_parquet(table))
        assert back.schema.equals(table.schema, check_metadata=True)


def test_objects_are_read_only_and_not_rewritten(store):
    oid = store.put_bytes(b"first")
    path = store.path_of(oid)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o444
    before = os.stat(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns - 10**9))
    store.put_bytes(b"first")
    after = os.stat(path)
    assert after.st_ino == before.st_ino  # the same file: not rewritten
    assert after.st_mtime_ns >= before.st_mtime_ns  # but freshened, for gc's grace period
    assert open(path, "rb").read() == b"first"
    assert os.listdir(store.root / "tmp") == []


@settings(max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2000))
def test_put_get_property(store, data):
    oid = store.put_bytes(data)
    assert store.get_bytes(oid) == data
    assert store.put_bytes(data) == oid


def _put_same(root: str, n: int, barrier) -> str:
    s = Store(root)
    barrier.wait()
    oid = s.put_table(table(5000))
    s.put_action("a" * 64, ActionEntry(outputs=[oid], rows=[5000]))
    return oid


def test_two_processes_put_the_same_object_and_entry(tmp_path):
    root = str(tmp_path / "s")
    Store(root)
    ctx = mp.get_context("spawn")
    with ctx.Manager() as m:
        barrier = m.Barrier(2)
        with ctx.Pool(2) as pool:
            oids = pool.starmap(_put_same, [(root, 0, barrier), (root, 1, barrier)])
    s = Store(root)
    assert oids[0] == oids[1]
    assert list(s.iter_oids()) == [oids[0]]
    assert s.verify(oids[0])
    assert s.get_action("a" * 64).outputs == [oids[0]]
    assert os.listdir(tmp_path / "s" / "tmp") == []


def _corrupt(store: Store, oid: str, how: str) -> None:
    path = store.path_of(oid)
    os.chmod(path, 0o644)
    data = bytearray(open(path, "rb").read())
    if how == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[: len(data) // 2]
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_corruption_detected_and_quarantined(store, how):
    oid = store.put_table(table())
    _corrupt(store, oid, how)
    with pytest.raises(CorruptObject, match=oid):
        store.get_table(oid)
    assert not store.has(oid)  # quarantined: treated as missing
    assert len(os.listdir(store.root / "quarantine")) == 1
    assert store.put_table(table()) == oid  # recomputed object lands again
    assert store.get_table(oid).equals(table())


def test_verify_false_skips_digest(store):
    oid = store.put_bytes(b"abc")
    _corrupt(store, oid, "flip")
    assert store.get_bytes(oid, verify=False) != b"abc"


def test_action_entries(store):
    oid = store.put_table(table())
    key = hash_bytes(b"key")
    store.put_action(key, ActionEntry(outputs=[oid], rows=[100]))
    entry = store.get_action(key)
    assert entry.outputs == [oid] and entry.rows == [100]
    assert entry.schema_version == 1


def test_action_entry_requires_its_objects(store):
    with pytest.raises(StoreError, match="not in the store"):
        store.put_action(hash_bytes(b"k"), ActionEntry(outputs=[hash_bytes(b"nope")], rows=[1]))
    assert list(store.iter_actions()) == []


def test_action_entry_dropped_when_object_missing(store):
    oid = store.put_table(table())
    key = hash_bytes(b"key")
    store.put_action(key, ActionEntry(outputs=[oid], rows=[100]))
    store.delete_object(oid)
    assert store.get_action(key) is None
    assert list(store.iter_actions()) == []


def test_refs(store):
    oid = store.put_bytes(b"{}")
    sig = hash_bytes(b"sig")
    store.set_ref("demo", sig, oid)
    assert store.get_ref("demo", sig) == oid
    assert store.list_refs() == [("demo", sig, oid)]
    assert store.delete_ref("demo", sig)
    assert store.list_refs() == []
    assert store.get_ref("demo", sig) is None


@pytest.mark.parametrize("name", ["a/b", "..", "a..b", "x\x00y", "tab\tname", "", ".hidden"])
def test_bad_ref_names_refused(store, name):
    with pytest.raises(InvalidRefName):
        store.set_ref(name, hash_bytes(b"s"), store.put_bytes(b"x"))


@pytest.mark.parametrize("oid", ["../../etc/passwd", "ABC", "a" * 63])
def test_bad_ids_refused_everywhere(store, oid):
    for call in (store.get_bytes, store.has, store.path_of, store.get_action):
        with pytest.raises(InvalidObjectId):
            call(oid)


def test_prefix_resolution(store):
    oid = store.put_bytes(b"prefix me")
    assert resolve(store, oid[:8]) == oid
    with pytest.raises(UnknownObject):
        resolve(store, "0" * 8 if not oid.startswith("00000000") else "f" * 8)
    with pytest.raises(InvalidObjectId):
        resolve(store, oid[:7])


def test_layout_version_refused(tmp_path):
    s = Store(tmp_path / "s")
    (s.root / "castore-layout.json").write_text(
        '{"schema_version":1,"layout_version":99,'
        '"created":"2026-01-01T00:00:00Z",'
        '"castore_version":"9"}'
    )
    with pytest.raises(LayoutVersionError, match="layout version 99"):
        Store(tmp_path / "s")


def test_non_store_folder_refused(tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not a castore store"):
        Store(tmp_path / "home")


def test_file_where_folder_should_be(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        Store(tmp_path / "f")
    s = Store(tmp_path / "s")
    os.rmdir(s.root / "objects")
    (s.root / "objects").write_text("oops")
    with pytest.raises(StoreError, match="is a file"):
        Store(tmp_path / "s")


def test_read_only_store(store):
    oid = store.put_bytes(b"x")
    ro = Store(store.root, read_only=True)
    assert ro.get_bytes(oid) == b"x"
    with pytest.raises(StoreNotWritable):
        ro.put_bytes(b"y")


def test_fsync_option_writes_the_same(tmp_path):
    s = Store(tmp_path / "s", fsync=True)
    oid = s.put_table(table())
    assert s.get_table(oid).equals(table())


def _open_new(root: str, barrier) -> str:
    barrier.wait()
    return Store(root).put_bytes(b"first object")


def test_two_processes_create_the_store_at_once(tmp_path):
    root = str(tmp_path / "fresh")
    ctx = mp.get_context("spawn")
    with ctx.Manager() as m:
        barrier = m.Barrier(4)
        with ctx.Pool(4) as pool:
            oids = pool.starmap(_open_new, [(root, barrier)] * 4)
    assert len(set(oids)) == 1
    assert sorted(p.name for p in (tmp_path / "fresh").iterdir() if p.is_file()) == [
        "castore-layout.json"
    ]


def test_run_folder_pipeline_yaml_is_the_stored_object_not_a_second_copy(store, tmp_path):
    """Inline rows can make pipeline.yaml megabytes: the run folder places the stored
    object (reflink, else hard link, else copy), as it does the data files."""
    from castore.store.exports import Placer
    from castore.store.runfolder import RunFolder

    folder = RunFolder(store, "p", "ab" * 32)
    folder.create()
    text = "pipeline:\n  name: p\n  steps: []\n"
    oid = folder.place_pipeline_yaml(text)
    assert folder.pipeline_yaml.read_text() == text == store.get_bytes(oid).decode()
    probe = Placer()
    (tmp_path / "src").write_bytes(b"x")
    probe.place(str(tmp_path / "src"), str(tmp_path / "dst"))
    if probe.methods["link"]:  # this filesystem links rather than clones
        assert os.path.samefile(folder.pipeline_yaml, store.path_of(oid))
    # A second attempt of the run replaces it in place.
    oid2 = folder.place_pipeline_yaml(text + "# again\n")
    assert folder.pipeline_yaml.read_text().endswith("# again\n") and oid2 != oid
    # Placing the same object again (every re-run does) leaves no temp file beside it:
    # rename(2) is a no-op when both names already link one inode.
    assert folder.place_pipeline_yaml(text + "# again\n") == oid2
    assert sorted(p.name for p in folder.pipeline_yaml.parent.iterdir() if p.is_file()) == [
        "pipeline.yaml"
    ]
