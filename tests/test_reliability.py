"""No cache hit serves wrong rows, and every failure mode gets its documented answer
(issue 12: one test per finding, each failing on the code before the fix)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import textwrap
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from castore import Pipeline
from castore.errors import CastoreError, NonCanonicalValue, RemoteError, UnhashableParam
from castore.fsck import check_remote
from castore.hashing import canonical_json, hash_file
from castore.remote import Remote
from castore.steps import LoadDataFromDicts
from castore.store import Store
from castore.transfer import pull, push
from tests.conftest import cas_inproc
from tests.test_cli_store import _can_mount, _tmpfs
from tests.test_pipeline import build, counts, rows

STEPS = ("load_data_from_dicts", "upper", "score", "keep_columns")


def flip_byte(path: Path, at: int = 100) -> None:
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))


def outputs_of(store: Store, ds, name: str) -> list[str]:
    from castore.store.manifests import StepManifest, load_model

    ref = next(r for r in ds.run.steps if r.name == name)
    return [o for b in load_model(store, ref.manifest, StepManifest).batches for o in b.outputs]


def data_files_match_objects(store: Store, ds) -> None:
    """Every file of the run folder holds exactly the bytes of the object it stands for."""
    data = Path(store.layout.run_dir(ds.run.name, ds.run.signature)) / "data"
    stamp = json.loads((data / ".castore-batches.json").read_text())
    for leaf, oids in stamp["leaves"].items():
        files = sorted((data / leaf).iterdir())
        assert len(files) == len(oids)
        for f, oid in zip(files, oids, strict=True):
            assert hash_file(f) == oid, f


# -- 1. a corrupt object is never a cache hit -------------------------------------------


@pytest.mark.parametrize("how", ["flip-run-folder", "flip-object", "truncate-object"])
def test_corrupt_leaf_object_is_recomputed_not_served(store, how):
    first = build().run(cache_dir=store.root, quiet=True)
    expected = rows(first, "keep_columns")
    victim_oid = outputs_of(store, first, "keep_columns")[1]
    if how == "flip-run-folder":
        data = Path(store.layout.run_dir("p", first.run.signature)) / "data" / "keep_columns"
        flip_byte(sorted(data.iterdir())[1])
    elif how == "flip-object":
        flip_byte(Path(store.path_of(victim_oid)))
    else:
        path = Path(store.path_of(victim_oid))
        os.chmod(path, 0o644)
        os.truncate(path, path.stat().st_size // 2)
    again = build().run(cache_dir=store.root, quiet=True)
    assert rows(again, "keep_columns") == expected
    data_files_match_objects(store, again)
    # The object itself was damaged (directly, or through a hard link): only its batch is
    # computed again; a reflinked run folder file is simply placed again.
    cached, computed = counts(again, "keep_columns")
    assert computed <= 1 and cached + computed == len(outputs_of(store, again, "keep_columns"))
    for s in ("load_data_from_dicts", "upper", "score"):
        assert counts(again, s)[1] == 0, s
    r = cas_inproc("fsck", cache_dir=store.root)
    assert r.returncode == 0, r


def test_corrupt_intermediate_object_recomputes_only_its_batch(store):
    first = build().run(cache_dir=store.root, quiet=True)
    expected = rows(first, "keep_columns")
    flip_byte(Path(store.path_of(outputs_of(store, first, "upper")[2])))
    again = build().run(cache_dir=store.root, quiet=True)
    assert rows(again, "keep_columns") == expected
    assert counts(again, "upper")[1] == 1
    for s in ("load_data_from_dicts", "score", "keep_columns"):
        assert counts(again, s)[1] == 0, s
    assert len(os.listdir(store.root / "quarantine")) == 1
    assert cas_inproc("fsck", cache_dir=store.root).returncode == 0


def test_missing_intermediate_object_recomputes_only_its_batch(store, caplog):
    """An object gone (removed by hand, or collected) is not damage: its batch is
    computed again, its entry dropped, and nothing is quarantined or warned about."""
    import logging

    first = build().run(cache_dir=store.root, quiet=True)
    expected = rows(first, "keep_columns")
    gone = outputs_of(store, first, "upper")[2]
    os.unlink(store.path_of(gone))
    with caplog.at_level(logging.INFO, logger="castore"):
        again = build().run(cache_dir=store.root, quiet=True)
    assert rows(again, "keep_columns") == expected
    assert counts(again, "upper")[1] == 1
    for s in ("load_data_from_dicts", "score", "keep_columns"):
        assert counts(again, s)[1] == 0, s
    assert store.has(gone)  # made again: the same bytes
    assert not (store.root / "quarantine").exists() or not os.listdir(store.root / "quarantine")
    assert any("names a missing object" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_repaired_store_rebuilds_the_run_folder(store):
    first = build().run(cache_dir=store.root, quiet=True)
    data = Path(store.layout.run_dir("p", first.run.signature)) / "data" / "keep_columns"
    flip_byte(sorted(data.iterdir())[0])
    cas_inproc("fsck", "--repair", cache_dir=store.root)
    again = build().run(cache_dir=store.root, quiet=True)
    assert rows(again, "keep_columns") == rows(first, "keep_columns")
    data_files_match_objects(store, again)


# -- 2. canonical JSON: no two values share an encoding ---------------------------------

json_leaf = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_leaf,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=12,
)


def _same(a, b) -> bool:
    """Equal as values, types included (1 is not 1.0, True is not 1, -0.0 is not 0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a.hex() == b.hex()
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


@settings(max_examples=400, deadline=None)
@given(json_values, json_values)
def test_distinct_values_never_share_an_encoding(a, b):
    if not _same(a, b):
        assert canonical_json(a) != canonical_json(b)
    else:
        assert canonical_json(a) == canonical_json(b)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_encoding_is_independent_of_key_order(value):
    def reverse(v):
        if isinstance(v, dict):
            return {k: reverse(v[k]) for k in reversed(list(v))}
        if isinstance(v, list):
            return [reverse(x) for x in v]
        return v

    assert canonical_json(reverse(value)) == canonical_json(value)


@pytest.mark.parametrize(
    "value",
    [
        float("nan"),
        float("inf"),
        -float("inf"),
        (1, 2),
        {"a": (1,)},
        b"bytes",
        {1: "int key"},
        {"s": {1, 2}},
        "\ud800",
    ],
)
def test_values_without_a_distinct_encoding_are_refused(value):
    with pytest.raises(NonCanonicalValue):
        canonical_json(value)


def test_type_pairs_that_json_could_confuse_stay_apart():
    pairs = [(1, 1.0), (0.0, -0.0), (True, 1), (None, "null"), ("1", 1), ([], {})]
    for a, b in pairs:
        assert canonical_json(a) != canonical_json(b), (a, b)


def test_nan_in_inline_rows_is_refused_not_hashed_like_none(store):
    with Pipeline(name="nan") as p:
        LoadDataFromDicts(data=[{"x": float("nan")}])
    with pytest.raises(UnhashableParam, match="no canonical JSON form"):
        p.run(cache_dir=store.root, quiet=True)
    with Pipeline(name="none") as q:
        LoadDataFromDicts(data=[{"x": None}])
    assert q.run(cache_dir=store.root, quiet=True)["load_data_from_dicts"]["train"][0] == {
        "x": None
    }


def test_nan_in_pipeline_yaml_and_param_is_a_one_line_error(tmp_path):
    yaml_file = tmp_path / "p.yaml"
    yaml_file.write_text(
        textwrap.dedent(
            """
            pipeline:
              name: nan
              steps:
                - name: load
                  type: castore.steps.loaders:LoadDataFromDicts
                  params: {data: [{x: .nan}]}
            """
        )
    )
    r = cas_inproc("run", str(yaml_file), cache_dir=tmp_path / "c")
    assert r.returncode != 0 and "no canonical JSON form" in r.stderr, r
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    yaml_file.write_text(yaml_file.read_text().replace(".nan", "1"))
    r = cas_inproc(
        "run", str(yaml_file), "--param", "load.data=[{x: .inf}]", cache_dir=tmp_path / "c"
    )
    assert r.returncode != 0 and "no canonical JSON form" in r.stderr, r


# -- 3. damaged refs --------------------------------------------------------------------


@pytest.mark.parametrize(
    "content", [b"\xff\xfegarbage", b"0123456789abcdef", b"../../etc/passwd\n", b""]
)
def test_damaged_ref_is_found_repaired_and_never_crashes_a_run(store, content):
    first = build().run(cache_dir=store.root, quiet=True)
    build(factor=3).run(cache_dir=store.root, quiet=True)  # a second ref, left intact
    ref = Path(store.layout.ref_path("p", first.run.signature))
    good = ref.read_text().strip()
    ref.write_bytes(content)
    r = cas_inproc("fsck", cache_dir=store.root)
    assert r.returncode == 1 and "bad-ref p/" in r.stdout, r
    r = cas_inproc("fsck", "--repair", cache_dir=store.root)
    assert "rewound to run manifest" in r.stdout, r
    assert ref.read_text().strip() == good
    assert cas_inproc("fsck", cache_dir=store.root).returncode == 0
    # Without a repair, a run carries on; its seal replaces the ref.
    ref.write_bytes(content)
    again = build().run(cache_dir=store.root, quiet=True)
    assert rows(again, "keep_columns") == rows(first, "keep_columns")
    assert store.get_ref("p", first.run.signature) is not None
    assert cas_inproc("fsck", cache_dir=store.root).returncode == 0


def test_ref_naming_another_pipelines_run_is_bad(store):
    a = build().run(cache_dir=store.root, quiet=True)
    b = build(name="q").run(cache_dir=store.root, quiet=True)
    Path(store.layout.ref_path("p", a.run.signature)).write_text(
        store.get_ref("q", b.run.signature) + "\n"
    )
    r = cas_inproc("fsck", "--json", cache_dir=store.root)
    kinds = [p["kind"] for p in r.json()["problems"]]
    assert r.returncode == 1 and kinds == ["bad-ref"], r


def test_run_with_a_damaged_ref_warns_and_replaces_it(store, caplog):
    first = build().run(cache_dir=store.root, quiet=True)
    ref = Path(store.layout.ref_path("p", first.run.signature))
    ref.write_bytes(b"\x00\x01 not an id")
    again = build().run(cache_dir=store.root)
    assert rows(again, "keep_columns") == rows(first, "keep_columns")
    log = (Path(store.layout.run_dir("p", first.run.signature)) / "pipeline.log").read_text()
    assert "is damaged" in log and "this run replaces it" in log
    assert len(ref.read_text().strip()) == 64


# -- 4. remote entries are cross-checked, optionally signed ------------------------------


def _tamper_entry(remote_root: Path, store: Store, ds) -> str:
    """Rewrite the remote entry of `upper` batch 0 to name batch 1's outputs."""
    from castore.store.manifests import StepManifest, load_model

    ref = next(r for r in ds.run.steps if r.name == "upper")
    batches = load_model(store, ref.manifest, StepManifest).batches
    key = batches[0].key
    path = remote_root / "actions" / key[:2] / key[2:]
    doc = json.loads(path.read_text())
    doc["outputs"], doc["rows"] = batches[1].outputs, batches[1].rows
    os.chmod(path, 0o644)
    path.write_text(json.dumps(doc))
    return key


def test_tampered_remote_entry_is_never_served(make_store, tmp_path):
    a, b, c = make_store("a"), make_store("b"), make_store("c")
    first = build().run(cache_dir=a.root, quiet=True)
    expected = rows(first, "keep_columns")
    remote_root = tmp_path / "remote"
    push(a, Remote(str(remote_root)))
    key = _tamper_entry(remote_root, a, first)
    # fsck --remote names it
    problems = remote_problems(Remote(str(remote_root)))
    assert any(p.startswith(f"mismatched-action {key}") for p in problems), problems
    r = cas_inproc("fsck", "--remote", str(remote_root), cache_dir=c.root)
    assert r.returncode == 1 and "mismatched-action" in r.stdout
    # read-through: the batch is computed here, the dataset is right
    ds = build().run(cache_dir=c.root, quiet=True, remote=str(remote_root))
    assert rows(ds, "keep_columns") == expected
    assert counts(ds, "upper")[1] == 1
    # pull: everything else arrives, the tampered entry does not
    with pytest.raises(RemoteError, match="disagree with the step manifests"):
        pull(b, Remote(str(remote_root)))
    assert b.get_action(key) is None
    assert rows(build().run(cache_dir=b.root, quiet=True), "keep_columns") == expected


def test_signed_entries(make_store, tmp_path, monkeypatch):
    a, b, c = make_store("a"), make_store("b"), make_store("c")
    first = build().run(cache_dir=a.root, quiet=True)
    remote_root = tmp_path / "remote"
    push(a, Remote(str(remote_root)))  # no team key yet: unsigned entries
    monkeypatch.setenv("CASTORE_SIGNING_KEY", "team-secret-1")
    problems = remote_problems(Remote(str(remote_root)))
    assert problems and all(p.startswith("unsigned-action") for p in problems), problems
    ds = build().run(cache_dir=b.root, quiet=True, remote=str(remote_root))
    assert counts(ds, "upper")[1] > 0  # nothing unsigned was trusted
    push(a, Remote(str(remote_root)))  # signs them
    assert remote_problems(Remote(str(remote_root))) == []
    ds = build().run(cache_dir=c.root, quiet=True, remote=str(remote_root))
    assert all(counts(ds, s)[1] == 0 for s in STEPS)
    assert rows(ds, "keep_columns") == rows(first, "keep_columns")
    monkeypatch.setenv("CASTORE_SIGNING_KEY", "another-key")
    problems = remote_problems(Remote(str(remote_root)))
    assert problems and all(p.startswith("bad-signature") for p in problems)
    for path in remote_root.rglob("*"):
        if path.is_file():
            assert b"team-secret-1" not in path.read_bytes()


# -- 5. secrets never reach disk --------------------------------------------------------

CANARY = "sk-canary-NEVER-ON-DISK-7321"


def _assert_no_canary(*roots: Path) -> None:
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file():
                assert CANARY.encode() not in path.read_bytes(), path


@pytest.fixture
def llm_server():
    from tests.llm_server import LLMServer

    s = LLMServer().start()
    yield s
    s.stop()


def test_api_key_never_reaches_disk_however_given(tmp_path, llm_server, monkeypatch):
    from castore.llms import OpenAILLM
    from castore.steps import TextGeneration

    cache, remote_root = tmp_path / "c", tmp_path / "remote"

    def pipeline(**llm_kw) -> Pipeline:
        with Pipeline(name="secret") as p:
            LoadDataFromDicts(data=[{"instruction": f"q{i}"} for i in range(6)]) >> TextGeneration(
                name="gen",
                llm=OpenAILLM(model="m", base_url=llm_server.base_url, backoff=0.01, **llm_kw),
                input_batch_size=3,
            )
        return p

    # API
    pipeline(api_key=CANARY).run(cache_dir=cache, quiet=True, remote=str(remote_root), push=True)
    # env
    monkeypatch.setenv("OPENAI_API_KEY", CANARY)
    pipeline(generation_kwargs={"n": 1}).run(cache_dir=cache, quiet=True)
    monkeypatch.delenv("OPENAI_API_KEY")
    # --param (a whole llm mapping with the key inside)
    yaml_file = tmp_path / "p.yaml"
    yaml_file.write_text(pipeline().to_yaml())
    llm_param = (
        f"gen.llm={{model: m2, base_url: '{llm_server.base_url}', backoff: 0.01, "
        f"api_key: {CANARY}}}"
    )
    r = cas_inproc(
        "run",
        str(yaml_file),
        "--param",
        llm_param,
        "--remote",
        str(remote_root),
        "--push",
        cache_dir=cache,
    )
    assert r.returncode == 0, r
    # pipeline.yaml naming the key inline
    doc = yaml_file.read_text().replace("  model: m\n", f"  model: m3\n        api_key: {CANARY}\n")
    assert CANARY in doc
    yaml_file.write_text(doc)
    r = cas_inproc("run", str(yaml_file), cache_dir=cache)
    assert r.returncode == 0, r
    assert f"Bearer {CANARY}" in llm_server.auth_headers
    yaml_file.unlink()
    _assert_no_canary(cache, remote_root)


# -- 6. gc never fails a running write -------------------------------------------------


def test_gc_shard_sweep_against_writers(store):
    from castore.gc import _remove_empty_shards

    stop = threading.Event()
    errors: list[BaseException] = []

    def sweep() -> None:
        while not stop.is_set():
            _remove_empty_shards(store)

    t = threading.Thread(target=sweep, daemon=True)
    t.start()
    try:
        for i in range(3000):
            try:
                store.put_bytes(f"object {i}".encode())
            except CastoreError as e:  # the failure this guards against
                errors.append(e)
    finally:
        stop.set()
        t.join()
    assert errors == []
    assert sum(1 for _ in store.iter_oids()) == 3000


# -- 8. read-only store and full disk: documented exit codes ----------------------------


COMMANDS = (
    ("run", "tests/pipelines/shared.py:pipeline_a"),
    ("gc", "--yes", "--grace", "0", "--cache-ttl", "0"),
    ("rm", "shared-b"),
)


def _fill_store(cache: Path) -> None:
    from tests.pipelines.shared import make

    make("shared-b", "b").run(cache_dir=cache, quiet=True)


def test_unwritable_store_exits_3_in_run_gc_and_rm(tmp_path):
    if _can_mount():
        with _tmpfs(tmp_path / "mnt", "8m") as mnt:
            _fill_store(mnt / "c")
            subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
            _assert_exit(mnt / "c", 3, "cannot write")
        return
    cache = tmp_path / "c"
    _fill_store(cache)
    for d, _, _ in os.walk(cache):
        os.chmod(d, 0o555)
    try:
        _assert_exit(cache, 3, "cannot write")
    finally:
        for d, _, _ in os.walk(cache):
            os.chmod(d, 0o755)


def test_full_disk_exits_4_in_run_with_the_bytes(tmp_path):
    if not _can_mount():
        pytest.skip("a small tmpfs needs root on Linux")
    with _tmpfs(tmp_path / "mnt", "600k") as mnt:
        cache = mnt / "c"
        Store(cache)
        big = tmp_path / "big.py"
        big.write_text(
            "import os\nfrom castore import Pipeline\nfrom castore.steps import "
            "LoadDataFromDicts\nwith Pipeline('big') as pipeline:\n"
            "    LoadDataFromDicts(data=[{'b': os.urandom(400).hex()} for _ in range(2000)],"
            " batch_size=500)\n"
        )
        r = cas_inproc("run", str(big), cache_dir=cache)
        assert r.returncode == 4, r
        assert "no space left writing" in r.stderr and "bytes free" in r.stderr, r
        assert len(r.stderr.strip().splitlines()) <= 3 and "Traceback" not in r.stderr
        assert os.listdir(cache / "tmp") == []


def _assert_exit(cache: Path, code: int, text: str) -> None:
    for args in COMMANDS:
        r = cas_inproc(*args, cache_dir=cache)
        assert r.returncode == code, (args, r)
        assert text in r.stderr and "Traceback" not in r.stderr, (args, r)


# -- 9. YAML bombs ---------------------------------------------------------------------

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
)


def test_yaml_alias_bomb_fails_fast(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(
        BOMB + "pipeline:\n  name: bomb\n  steps:\n    - name: load\n"
        "      type: castore.steps.loaders:LoadDataFromDicts\n      params:\n        data: *i\n"
    )
    t0 = time.perf_counter()
    r = cas_inproc("run", str(bomb), cache_dir=tmp_path / "c")
    assert time.perf_counter() - t0 < 1.0
    assert r.returncode == 2 and "aliases expand to more than" in r.stderr, r
    flow = "[&a [x, x, x, x, x, x, x, x, x], " + ", ".join(
        f"&{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )
    good = tmp_path / "good.yaml"
    good.write_text(build().to_yaml())
    t0 = time.perf_counter()
    r = cas_inproc(
        "run", str(good), "--param", f"load_data_from_dicts.data={flow}]", cache_dir=tmp_path / "c"
    )
    assert time.perf_counter() - t0 < 1.0
    assert r.returncode == 2 and "aliases expand to more than" in r.stderr, r


def test_config_yaml_bomb_is_refused(tmp_path):
    store = Store(tmp_path / "c")
    Path(store.layout.config_file).write_text(BOMB + "remotes: *i\n")
    r = cas_inproc("remote", "list", cache_dir=store.root)
    assert r.returncode == 2 and "aliases expand" in r.stderr, r


# -- 10. one-line errors ----------------------------------------------------------------


def test_param_errors_are_one_line_with_the_reason(tmp_path):
    yaml_file = tmp_path / "p.yaml"
    yaml_file.write_text(build().to_yaml())
    r = cas_inproc("run", str(yaml_file), "--param", "upper.input_batch_size=zero")
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "input_batch_size" in lines[0] and "integer" in lines[0], r
    assert "errors.pydantic.dev" not in r.stderr
    doc = yaml_file.read_text().replace("input_batch_size: 40", "input_batch_size: -4", 1)
    yaml_file.write_text(doc)
    r = cas_inproc("run", str(yaml_file))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "greater than or equal to 1" in lines[0], r
    assert "errors.pydantic.dev" not in r.stderr


# -- 11. a late Ctrl+C is reported ------------------------------------------------------


def test_interrupt_after_the_last_batch_is_reported(store, monkeypatch, caplog):
    from castore.pipeline import runner

    drive = runner.Runner._drive

    def drive_then_interrupt(self):
        status = drive(self)
        os.kill(os.getpid(), signal.SIGINT)  # the run's own handler is still installed
        return status

    monkeypatch.setattr(runner.Runner, "_drive", drive_then_interrupt)
    ds = build().run(cache_dir=store.root)
    assert ds.run.status == "finished"
    log = (Path(store.layout.run_dir("p", ds.run.signature)) / "pipeline.log").read_text()
    assert "interrupt received after the last batch was done: ignored" in log


# -- 12. code fingerprints follow helpers, constants and user modules --------------------

PIPE = """
from castore import Pipeline, step
from castore.steps import LoadDataFromDicts
import helpers
from helpers import shout

LOCAL = {local!r}


def local_helper(x):
    return x + LOCAL


class Fmt:
    def render(self, s):
        return "<" + s + ">"


@step(inputs=["t"], outputs=["u"])
def Up(rows):
    return [{{**r, "u": Fmt().render(local_helper(shout(r["t"]))) + helpers.TAG}} for r in rows]


with Pipeline("fp") as pipeline:
    LoadDataFromDicts(data=[{{"t": "a"}}, {{"t": "b"}}]) >> Up()
"""

HELPERS = """
SUFFIX = {suffix!r}
TAG = "#"


def shout(s):
    return s.{case}() + SUFFIX
"""


def _fp_project(tmp_path: Path, *, local="!", suffix="-v1", case="upper", fmt=None) -> Path:
    (tmp_path / "helpers.py").write_text(HELPERS.format(suffix=suffix, case=case))
    code = PIPE.format(local=local)
    if fmt is not None:
        code = code.replace('"<" + s + ">"', fmt)
    (tmp_path / "pipe.py").write_text(code)
    return tmp_path / "pipe.py"


@pytest.mark.slow
def test_editing_what_process_reaches_recomputes(tmp_path):
    from tests.conftest import run_cas

    cache = tmp_path / "c"
    proj = tmp_path / "proj"
    proj.mkdir()

    def run(**kw) -> tuple[int, list[str]]:
        pipe = _fp_project(proj, **kw)
        r = run_cas("run", str(pipe), "--json", cache_dir=cache)
        assert r.returncode == 0, r
        doc = r.json()
        ds = Path(doc["data_dir"]) / "up"
        import pyarrow.parquet as pq

        values = [v for f in sorted(ds.iterdir()) for v in pq.read_table(f).column("u").to_pylist()]
        return doc["steps"]["up"]["batches_computed"], values

    assert run() == (1, ["<A-v1!>#", "<B-v1!>#"])
    assert run()[0] == 0
    assert run(case="lower") == (1, ["<a-v1!>#", "<b-v1!>#"])  # a helper in another module
    assert run(case="lower", suffix="-v2") == (1, ["<a-v2!>#", "<b-v2!>#"])  # its constant
    assert run(case="lower", suffix="-v2", local="?")[1] == ["<a-v2?>#", "<b-v2?>#"]
    fmt = '"[" + s + "]"'
    assert run(case="lower", suffix="-v2", local="?", fmt=fmt)[1] == ["[a-v2?]#", "[b-v2?]#"]
    r = run_cas("explain", "fp", "up", cache_dir=cache)
    assert "code of class Fmt changed" in r.stdout, r


def test_code_parts_name_what_is_reached(tmp_path, monkeypatch):
    import importlib
    import sys

    pipe = _fp_project(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for m in ("helpers", "pipe"):
        sys.modules.pop(m, None)
    mod = importlib.import_module("pipe")
    try:
        root, parts = mod.pipeline.steps["up"].code_parts()
        assert set(parts) == {
            "function shout",
            "function local_helper",
            "class Fmt",
            "constant SUFFIX",
            "constant LOCAL",
            "constant helpers.TAG",
        }
        assert root and all(len(v) == 64 for v in parts.values())
        # castore's own steps follow nothing: their keys did not change
        assert mod.pipeline.steps["load_data_from_dicts"].code_parts()[1] == {}
    finally:
        for m in ("helpers", "pipe"):
            sys.modules.pop(m, None)
    assert pipe.exists()


def test_code_packages_enter_the_code_version():
    from castore import step

    @step(inputs=["a"], outputs=["b"])
    def Plain(rows):
        return rows

    @step(inputs=["a"], outputs=["b"], code_packages=["pyarrow"])
    def Pinned(rows):
        return rows

    import pyarrow

    with Pipeline("pkgs") as p:
        plain, pinned = Plain(), Pinned()
    assert plain.code_parts()[1] == {}
    assert pinned.code_parts()[1] == {"package pyarrow": pyarrow.__version__}
    assert plain.code_version() != pinned.code_version()
    assert p is not None


def test_float_nan_constant_and_none_constant_differ():
    from castore.usercode import const_digest as _const_digest

    assert _const_digest(float("nan")) != _const_digest(None)
    assert _const_digest((1, 2)) != _const_digest([1, 2])
    assert _const_digest(1) != _const_digest(1.0)
    assert math.isnan(float("nan"))


# -- 7. process-pool workers die with their driver --------------------------------------


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_kill_9_of_a_process_pool_driver_leaves_no_worker_and_no_lock(tmp_path):
    from tests.conftest import REPO, run_cas, start_cas
    from tests.scenario import _actions

    cache = tmp_path / "c"
    env = {"CASTORE_TEST_ROWS": "2000"}
    proc = start_cas(
        "run",
        str(REPO / "tests/pipelines/cpu.py"),
        "--executor",
        "processes",
        cache_dir=cache,
        env=env,
    )
    deadline = time.monotonic() + 60
    while _actions(cache) < 8 and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    workers = _children(proc.pid)
    assert workers, "no pool worker was started"
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 5
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(_alive, workers)), "a pool worker outlived its driver"
    ls = run_cas("ls", "--json", cache_dir=cache).json()
    assert ls[0]["status"] != "running", ls
    r = run_cas("resume", "cpu", "--json", cache_dir=cache, env=env)
    assert r.returncode == 0, r
    assert r.json()["status"] == "finished"


def test_debug_shows_what_the_one_line_summarized(tmp_path):
    yaml_file = tmp_path / "p.yaml"
    yaml_file.write_text(build().to_yaml())
    r = cas_inproc("--debug", "run", str(yaml_file), "--param", "upper.input_batch_size=zero")
    assert r.returncode == 2
    assert "ValidationError" in r.stderr and "Traceback" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("Error: --param upper.input_batch_size")


def remote_problems(remote) -> list[str]:
    return [p.line() for p in check_remote(remote).problems]


def test_fsck_reports_and_repairs_a_bad_ref_name(store):
    build().run(cache_dir=store.root, quiet=True)
    bad = Path(store.layout.ref_dir()) / ".hidden"
    bad.mkdir()
    (bad / ("0" * 64)).write_text("x")
    r = cas_inproc("fsck", "--json", cache_dir=store.root)
    assert r.returncode == 1 and [p["kind"] for p in r.json()["problems"]] == ["bad-ref"]
    cas_inproc("fsck", "--repair", cache_dir=store.root)
    assert not bad.exists()
    assert cas_inproc("fsck", cache_dir=store.root).returncode == 0


def test_a_corrupt_object_is_replaced_when_the_same_bytes_are_written_again(store):
    """pipeline.yaml, manifests and outputs are often written again with the same bytes:
    a corrupt copy under that id must not be taken for the new one."""
    oid = store.put_bytes(b"pipeline: same bytes every run\n")
    flip_byte(Path(store.path_of(oid)), at=3)
    assert store.put_bytes(b"pipeline: same bytes every run\n") == oid
    assert store.verify(oid)
    first = build().run(cache_dir=store.root, quiet=True)
    yaml_oid = first.run.pipeline_yaml
    flip_byte(Path(store.path_of(yaml_oid)), at=5)
    again = build().run(cache_dir=store.root, quiet=True)
    assert again.run.pipeline_yaml == yaml_oid and store.verify(yaml_oid)
    assert cas_inproc("fsck", cache_dir=store.root).returncode == 0


def test_a_mutable_global_counts_by_its_code_not_its_value(tmp_path, monkeypatch):
    """A module-level list a step appends to (a counter, a registry) must not change the
    step's fingerprint as the run changes it; editing the list's literal must."""
    import importlib
    import sys

    def load(literal: str):
        (tmp_path / "mutmod.py").write_text(
            "from castore import step\n"
            f"SEEN = {literal}\n\n\n"
            "@step(inputs=['a'], outputs=['b'])\n"
            "def Use(rows):\n"
            "    SEEN.append(len(rows))\n"
            "    return [{**r, 'b': len(SEEN)} for r in rows]\n"
        )
        sys.modules.pop("mutmod", None)
        return importlib.import_module("mutmod")

    monkeypatch.syspath_prepend(str(tmp_path))
    mod = load("[]")
    with Pipeline("mut"):
        s = mod.Use()
    before = s.code_version()
    mod.SEEN.extend([1, 2, 3])
    assert s.code_version() == before
    mod2 = load("[0]")
    with Pipeline("mut2"):
        s2 = mod2.Use()
    assert s2.code_version() != before
    sys.modules.pop("mutmod", None)


def test_redaction_takes_secrets_not_parameters_that_look_alike():
    """`max_tokens` or `author` must survive into the run manifest: a resume that lost
    them would silently run another configuration."""
    from castore.pipeline.params import redact_parameters
    from castore.pipeline.step import REDACTED

    with Pipeline("redact") as p:
        LoadDataFromDicts(name="load", data=[{"a": 1}])
    params = {
        "load": {
            "llm": {
                "api_key": "sk-1",
                "hf_token": "hf-1",
                "generation_kwargs": {"max_tokens": 64, "author": "me"},
            },
            "client_secret": "s",
        }
    }
    got = redact_parameters(p, params)["load"]
    assert got["llm"]["api_key"] == got["llm"]["hf_token"] == got["client_secret"] == REDACTED
    assert got["llm"]["generation_kwargs"] == {"max_tokens": 64, "author": "me"}


# -- 5. entry checks: a damaged count is caught without reading footers ------------------


def _first_entry(store: Store, ds) -> tuple[str, Path]:
    from castore.store.manifests import StepManifest, load_model

    ref = next(r for r in ds.run.steps if r.name == "upper")
    key = load_model(store, ref.manifest, StepManifest).batches[0].key
    return key, Path(store.layout.action_path(key))


def test_an_entry_whose_count_changed_is_not_served(store, monkeypatch):
    first = build().run(cache_dir=store.root, quiet=True)
    for name, sig, _ in store.list_refs():
        store.delete_ref(name, sig)  # no replay of the finished run: every batch looked up
    key, path = _first_entry(store, first)
    doc = json.loads(store.read_action(key))
    assert doc["check"]  # a run's own entries carry their check
    doc["rows"] = [doc["rows"][0] - 1]  # the object is intact; the entry's count is not
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(doc))  # a loose entry shadows the packed one
    again = build().run(cache_dir=store.root, quiet=True)
    assert counts(again, "upper")[1] == 1  # that batch alone, computed again
    assert rows(again, "keep_columns") == rows(first, "keep_columns")
    # Hits on a run's own entries read no footers: their checks hold the counts.
    for name, sig, _ in store.list_refs():
        store.delete_ref(name, sig)
    from castore.pipeline import schedule

    monkeypatch.setattr(schedule, "rows_match", lambda *a: pytest.fail("footers read"))
    hits = build().run(cache_dir=store.root, quiet=True)
    assert counts(hits, "upper")[1] == 0


def test_a_check_from_a_remote_is_not_trusted(make_store, tmp_path):
    """Anyone can compute a check, so an entry taken from a remote is written without
    one, and its counts are held against the objects' footers instead."""
    a, b = make_store("a"), make_store("b")
    first = build().run(cache_dir=a.root, quiet=True)
    remote_root = tmp_path / "remote"
    push(a, Remote(str(remote_root)))
    key, _ = _first_entry(a, first)
    remote_path = remote_root / "actions" / key[:2] / key[2:]
    assert json.loads(remote_path.read_text())["check"]
    pull(b, Remote(str(remote_root)))
    assert b.peek_action(key).check is None
    ds = build().run(cache_dir=b.root, quiet=True, remote=str(remote_root))
    assert counts(ds, "upper")[1] == 0 and rows(ds, "keep_columns") == rows(first, "keep_columns")
