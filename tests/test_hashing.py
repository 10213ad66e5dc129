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
