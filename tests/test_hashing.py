from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from castore.errors import InvalidObjectId, NonCanonicalValue
from castore.hashing import (
    Hasher,
    canonical_json,
    hash_bytes,
    hash_file,
    hash_json,
    plain_rows_json,
    validate_id,
)
from tests.test_reliability import json_leaf as plain_value

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)


@given(st.dictionaries(st.text(), json_values, max_size=6))
def test_canonical_json_ignores_key_order(d):
    reordered = dict(reversed(list(d.items())))
    assert canonical_json(d) == canonical_json(reordered)
    assert hash_json(d) == hash_json(reordered)


@given(json_values)
def test_canonical_json_round_trips(v):
    raw = canonical_json(v)
    assert json.loads(raw.decode("utf-8")) == v
    assert raw == canonical_json(json.loads(raw))


def test_canonical_json_is_compact_sorted_utf8():
    assert canonical_json({"b": 1, "a": [1, "é"]}) == '{"a":[1,"é"],"b":1}'.encode()


@pytest.mark.parametrize("bad", [math.nan, math.inf, {1: "x"}, {"a": {1, 2}}, b"bytes", object()])
def test_canonical_json_rejects_non_json(bad):
    with pytest.raises(NonCanonicalValue):
        canonical_json(bad)


def test_canonical_json_error_names_the_path():
    with pytest.raises(NonCanonicalValue, match=r"\$\.a\[1\]"):
        canonical_json({"a": [1, math.nan]})


@given(st.binary(max_size=5000), st.integers(min_value=1, max_value=700))
def test_incremental_hasher_matches_one_shot(data, chunk):
    h = Hasher()
    for i in range(0, len(data), chunk):
        h.update(data[i : i + chunk])
    assert h.hexdigest() == hash_bytes(data)
    assert h.size == len(data)


def test_large_buffers_hash_the_same_with_threads():
    data = bytes(range(256)) * (1 << 15)  # 8 MiB: the threaded path
    h = Hasher()
    h.update(data)
    assert hash_bytes(data) == h.hexdigest()


@pytest.mark.parametrize(
    "bad",
    [
        "../../etc/passwd",
        "ABC",
        "a" * 63,
        "A" * 64,
        "g" * 64,
        "a" * 65,
        "",
        None,
        123,
        "ab/" + "c" * 61,
    ],
)
def test_validate_id_refuses(bad):
    with pytest.raises(InvalidObjectId):
        validate_id(bad)


def test_validate_id_accepts_digest():
    oid = hash_bytes(b"x")
    assert validate_id(oid) == oid and len(oid) == 64


@given(st.lists(st.dictionaries(st.text(), plain_value, max_size=5), min_size=1, max_size=8))
def test_plain_rows_fast_path_is_canonical_json(rows):
    assert plain_rows_json(rows) == canonical_json(rows)


@pytest.mark.parametrize(
    "rows",
    [
        [],  # no rows: the general encoding
        [{"a": (1, 2)}],  # a tuple would dump like a list
        [{"a": [1]}],  # nested: not flat
        [{1: "a"}],  # an int key would dump as "1"
        [{"a": float("nan")}],
        [{"a": "\ud800"}],  # a lone surrogate is not UTF-8
        [["a"]],
        ({"a": 1},),
    ],
)
def test_plain_rows_fast_path_declines_what_it_cannot_keep_apart(rows):
    assert plain_rows_json(rows) is None


@pytest.mark.parametrize("size", [0, 1, 4096, (1 << 20) + 1, (1 << 22) + 7])
def test_hash_file_small_and_mapped_agree_with_hash_bytes(tmp_path, size):
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    path = tmp_path / "f"
    path.write_bytes(data)
    assert hash_file(path) == hash_bytes(data)


# Keys and entry checks write their canonical JSON directly for ids and exact ints
# (castore.hashing._key_json); anything else takes the general path. Both must give the
# bytes canonical_json gives, or every cache entry's key would change.
hex_ids = st.binary(min_size=32, max_size=32).map(bytes.hex)
not_ids = st.one_of(
    st.text(max_size=70),
    hex_ids.map(str.upper),
    hex_ids.map(lambda h: h[:-1]),
    st.integers(),
)


def _agree(reference, direct) -> None:
    """`direct` gives what `reference` gives, or both refuse the value."""
    try:
        want = reference()
    except NonCanonicalValue:
        with pytest.raises(NonCanonicalValue):
            direct()
        return
    assert direct() == want


counts = st.one_of(st.integers(), st.integers(min_value=-(2**80), max_value=2**80))
any_count = st.one_of(counts, st.booleans(), st.floats(allow_nan=False), st.none())


@given(
    fp=st.one_of(hex_ids, not_ids),
    slices=st.lists(
        st.lists(st.tuples(st.one_of(hex_ids, not_ids), any_count, any_count), max_size=4),
        max_size=3,
    ),
)
def test_action_key_is_the_hash_of_its_canonical_json(fp, slices):
    from castore.hashing import action_key

    desc = [[list(s) for s in pred] for pred in slices]
    _agree(lambda: hash_json({"fp": fp, "in": desc}), lambda: action_key(fp, slices))


@given(fp=st.one_of(hex_ids, not_ids), index=any_count)
def test_generator_key_is_the_hash_of_its_canonical_json(fp, index):
    from castore.hashing import generator_key

    _agree(lambda: hash_json({"fp": fp, "batch": index}), lambda: generator_key(fp, index))


@given(
    key=st.one_of(hex_ids, not_ids),
    outputs=st.one_of(st.lists(hex_ids, max_size=3), st.lists(not_ids, max_size=2)),
    rows=st.lists(any_count, max_size=3),
    as_tuple=st.booleans(),
)
def test_entry_check_is_the_hash_of_its_canonical_json(key, outputs, rows, as_tuple):
    import blake3

    from castore.hashing import entry_check

    if as_tuple:
        outputs = tuple(outputs)
    claims = {"key": key, "outputs": outputs, "rows": rows}
    _agree(
        lambda: blake3.blake3(canonical_json(claims)).hexdigest(),
        lambda: entry_check(key, outputs, rows),
    )


def test_the_direct_forms_are_taken_for_ids_and_ints():
    """The property tests above cover both paths; this pins that typical keys take the
    direct one (else the speed-up is silently gone)."""
    import blake3

    from castore.hashing import _key_json, action_key, entry_check

    a, b = "a" * 64, "0123456789abcdef" * 4
    slices = [[(a, 0, 50), (b, 10, 2**70)], []]
    assert _key_json(b, slices) == (f'{{"fp":"{b}","in":[[["{a}",0,50],["{b}",10,{2**70}]],[]]}}')
    want = hash_json({"fp": b, "in": [[list(s) for s in p] for p in slices]})
    assert action_key(b, slices) == want
    assert _key_json(b, [[(a, True, 1)]]) is None  # a bool is not an int here
    assert _key_json(b, [[(a.upper(), 0, 1)]]) is None
    claims = canonical_json({"key": a, "outputs": [b], "rows": [-3]})
    assert entry_check(a, [b], [-3]) == blake3.blake3(claims).hexdigest()


def test_a_spliced_encoding_hashes_as_the_whole():
    from castore.hashing import canonical_json, hash_json, hash_json_spliced

    rows = [{"b": 1, "a": 'x"y\u00e9\n'}, {"a": None, "b": 2.5}]
    doc = {"z": 1, "params": {"data": rows, "k": [1, 2]}}
    token = "castore-spliced:0123:data"
    spliced = {"z": 1, "params": {"data": token, "k": [1, 2]}}
    assert hash_json_spliced(spliced, {token: canonical_json(rows)}) == hash_json(doc)
    with pytest.raises(ValueError, match="once"):
        hash_json_spliced({"a": token, "b": token}, {token: b"1"})
