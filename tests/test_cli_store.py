from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import time

import pyarrow as pa
import pytest

from castore.store import ActionEntry, Store
from castore.store.manifests import BatchRecord, RunManifest, StepManifest, StepRef
from castore.store.models import now_utc
from tests.conftest import cas_inproc


def _fill(store: Store) -> tuple[str, str, str]:
    t = pa.table({"x": list(range(1000)), "y": [f"v{i}" for i in range(1000)]})
    oid = store.put_table(t)
    key = "1" * 64
    store.put_action(key, ActionEntry(outputs=[oid], rows=[1000]))
    step = StepManifest(
        name="s",
        step_class="m:S",
        fingerprint="3" * 64,
        signature="4" * 64,
        complete=True,
        batches=[BatchRecord(key=key, outputs=[oid], rows=[1000], cached=False)],
    )
    sid = store.put_bytes(step.model_dump_json().encode())
    run = RunManifest(
        run_id="r1",
        name="demo",
        signature="2" * 64,
        status="finished",
        started=now_utc(),
        steps=[StepRef(name="s", manifest=sid)],
        edges=[],
        leaves=["s"],
    )
    man = store.put_bytes(run.model_dump_json().encode())
    store.set_ref("demo", "2" * 64, man)
    return oid, key, man


def test_info_json(store):
    _fill(store)
    r = cas_inproc("info", "--json", cache_dir=store.root)
    assert r.returncode == 0, r
    doc = r.json()
    assert doc["objects"] == 3 and doc["actions"] == 1 and doc["refs"] == 1
    assert doc["layout_version"] == 2
    assert doc["object_bytes"] == sum(store.size_of(o) for o in store.iter_oids())


def test_info_uses_env_cache_dir(tmp_path):
    Store(tmp_path / "envstore")
    r = cas_inproc("info", "--json", env={"CASTORE_CACHE_DIR": str(tmp_path / "envstore")})
    assert r.returncode == 0, r
    assert r.json()["root"] == str(tmp_path / "envstore")


@pytest.mark.parametrize(
    "argv",
    [
        ["ls"],
        ["ls", "--json"],
        ["show", "x"],
        ["log", "x"],
        ["info"],
        ["fsck"],
        ["du"],
        ["gc", "--dry-run"],
        ["gc"],
        ["rm", "x"],
        ["explain", "x"],
        ["cat", "ab" * 32],
        ["remote", "list"],
        ["pull", "--dry-run", "somewhere"],
    ],
)
def test_commands_that_only_read_never_create_a_store(tmp_path, argv):
    """A mistyped --cache-dir must not leave a new store behind."""
    where = tmp_path / "typo"
    r = cas_inproc(*argv, cache_dir=where)
    assert not where.exists(), argv
    if argv[0] == "ls":
        assert r.returncode == 0 and (r.stdout.strip() == "[]" or "no runs" in r.stderr)
    else:
        assert r.returncode != 0 and "Traceback" not in r.stderr, r


def test_fsck_clean(store):
    _fill(store)
    r = cas_inproc("fsck", "--json", cache_dir=store.root)
    assert r.returncode == 0, r
    assert r.json()["clean"] is True and r.json()["objects_checked"] == 3


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_fsck_finds_and_repairs_corruption(store, how):
    oid, key, _ = _fill(store)
    path = store.path_of(oid)
    os.chmod(path, 0o644)
    data = bytearray(open(path, "rb").read())
    if how == "flip":
        data[100] ^= 0xFF
    else:
        del data[len(data) // 3 :]
    open(path, "wb").write(bytes(data))

    r = cas_inproc("fsck", cache_dir=store.root)
    assert r.returncode == 1, r
    assert oid in r.stdout and "corrupt-object" in r.stdout
    assert key in r.stdout and "dangling-action" in r.stdout

    r = cas_inproc("fsck", "--repair", "--json", cache_dir=store.root)
    kinds = {p["kind"]: p for p in r.json()["problems"]}
    assert kinds["corrupt-object"]["repaired"] and kinds["dangling-action"]["repaired"]
    assert not store.has(oid) and store.get_action(key) is None
    # The run that used the batch still names it: reported (not deletable), and the
    # next run of the pipeline recomputes it.
    assert not kinds["missing-object"]["repaired"] and r.returncode == 1
    r = cas_inproc("fsck", "--json", cache_dir=store.root)
    assert [p["kind"] for p in r.json()["problems"]] == ["missing-object"]
    store.put_table(pa.table({"x": list(range(1000)), "y": [f"v{i}" for i in range(1000)]}))
    assert cas_inproc("fsck", cache_dir=store.root).returncode == 0


def test_fsck_dangling_ref(store):
    _, _, man = _fill(store)
    store.delete_object(man)
    r = cas_inproc("fsck", cache_dir=store.root)
    assert r.returncode == 1 and "dangling-ref" in r.stdout
    assert cas_inproc("fsck", "--repair", cache_dir=store.root).returncode == 0
    assert store.list_refs() == []


def test_cat_json_and_parquet(store):
    oid, _, man = _fill(store)
    r = cas_inproc("cat", man[:8], cache_dir=store.root)
    assert r.returncode == 0, r
    assert r.stdout.strip() == store.get_bytes(man).decode()
    r = cas_inproc("cat", oid[:10], "--limit", "3", cache_dir=store.root)
    assert r.returncode == 0, r
    lines = r.stdout.splitlines()
    assert lines == ['{"x": 0, "y": "v0"}', '{"x": 1, "y": "v1"}', '{"x": 2, "y": "v2"}']


@pytest.mark.parametrize(
    ("arg", "msg"),
    [
        ("../../etc/passwd", "invalid id prefix"),
        ("ABC", "invalid id prefix"),
        ("abc", "invalid id prefix"),
        ("0" * 63 + "g", "invalid id prefix"),
        ("deadbeef", "no object matches"),
    ],
)
def test_cat_bad_ids_one_line(store, arg, msg):
    r = cas_inproc("cat", arg, cache_dir=store.root)
    assert r.returncode != 0
    assert msg in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_ambiguous_prefix(store):
    # Two ids sharing 8 hex chars cannot be made by hashing in a test's time budget, so
    # place two files under those names directly: resolution only looks at names.
    for tail in ("0" * 54, "f" * 54):
        shard = store.root / "objects" / "ab"
        shard.mkdir(exist_ok=True)
        (shard / ("cdef0123" + tail)).write_bytes(b"x")
    r = cas_inproc("cat", "abcdef01", cache_dir=store.root)
    assert r.returncode != 0 and "ambiguous" in r.stderr and "Traceback" not in r.stderr


def test_cache_dir_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    r = cas_inproc("info", cache_dir=f)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.startswith("Error:") or "Error" in r.stderr


@pytest.mark.parametrize("damage", ["garbage", "", "[1, 2]", '{"layout_version": "x"}'])
def test_a_damaged_store_marker_is_one_line(tmp_path, damage):
    """castore-layout.json holding something castore did not write: one line that says
    what it is and what to do (pydantic's own text spans lines and ends in a URL)."""
    cache = tmp_path / "c"
    Store(cache)
    (cache / "castore-layout.json").write_text(damage)
    for argv in (("ls",), ("gc", "--dry-run"), ("fsck",)):
        r = cas_inproc(*argv, cache_dir=cache)
        assert r.returncode != 0 and "Traceback" not in r.stderr
        errors = r.stderr.strip().splitlines()
        assert len(errors) == 1 and "castore-layout.json is damaged" in errors[0], r.stderr
        assert "use a new --cache-dir" in errors[0]


def test_version(cas):
    r = cas("--version")
    assert r.returncode == 0 and "castore, version" in r.stdout
    r2 = subprocess.run(
        [sys.executable, "-m", "castore", "--version"], capture_output=True, text=True
    )
    assert r2.stdout == r.stdout


def _can_mount() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and sys.platform.startswith("linux")


@contextlib.contextmanager
def _tmpfs(path, size: str):
    path.mkdir()
    if (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("cannot mount tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


WRITE_BIG = textwrap.dedent(
    """
    import os, resource, signal, sys
    import pyarrow as pa
    from castore.store import Store
    from castore.errors import CastoreError
    if sys.argv[2] == "rlimit":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
    s = Store(sys.argv[1])
    t = pa.table({"b": [os.urandom(1000) for _ in range(2000)]})
    try:
        s.put_table(t)
    except CastoreError as e:
        print(type(e).__name__, e)
        sys.exit(3)
    """
)


@pytest.mark.parametrize("how", ["rlimit", "tmpfs"])
def test_full_disk_clear_error_and_clean_store(tmp_path, how):
    if how == "tmpfs" and not _can_mount():
        pytest.skip("tmpfs needs root on Linux")
    with contextlib.ExitStack() as stack:
        base = stack.enter_context(_tmpfs(tmp_path / "mnt", "1m")) if how == "tmpfs" else tmp_path
        root = base / "store"
        Store(root).put_bytes(b"small and fine")
        p = subprocess.run(
            [sys.executable, "-c", WRITE_BIG, str(root), how], capture_output=True, text=True
        )
        assert p.returncode == 3, p.stderr
        assert p.stdout.startswith("StoreFull no space left writing"), p.stdout
        assert os.listdir(root / "tmp") == []
        r = cas_inproc("fsck", "--json", cache_dir=root)
        assert r.returncode == 0, r
        assert r.json()["objects_checked"] == 1


def test_read_only_cache_dir(tmp_path):
    if _can_mount():
        with _tmpfs(tmp_path / "mnt", "4m") as mnt:
            Store(mnt / "store").put_bytes(b"x")
            subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
            _assert_read_only_errors(mnt / "store")
    else:
        Store(tmp_path / "store").put_bytes(b"x")
        for d, _, _ in os.walk(tmp_path / "store"):
            os.chmod(d, 0o555)
        _assert_read_only_errors(tmp_path / "store")


def _assert_read_only_errors(root) -> None:
    code = (
        "import sys; from castore.store import Store; from castore.errors import CastoreError\n"
        "try:\n    Store(sys.argv[1]).put_bytes(b'new')\n"
        "except CastoreError as e:\n    print(type(e).__name__, e); sys.exit(3)\n"
    )
    p = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True)
    assert p.returncode == 3, p.stderr
    assert p.stdout.startswith("StoreNotWritable cannot write"), p.stdout
    r = cas_inproc("fsck", cache_dir=root)
    assert r.returncode == 0, r


def test_one_run_spec_rule_for_show_push_and_rm(tmp_path):
    """A pipeline name means its newest run in every command."""
    from tests.conftest import cas_inproc
    from tests.test_pipeline import build

    cache, remote = tmp_path / "c", tmp_path / "remote"
    build(factor=2).run(cache_dir=cache, quiet=True)
    time.sleep(0.01)
    newest = build(factor=3).run(cache_dir=cache, quiet=True)
    show = cas_inproc("show", "p", "--json", cache_dir=cache).json()
    assert show["signature"] == newest.run.signature
    pushed = cas_inproc("push", str(remote), "p", "--json", cache_dir=cache).json()
    assert pushed["refs"] == [f"p/{newest.run.signature}"]
    removed = cas_inproc("rm", "p", "--json", cache_dir=cache).json()
    assert removed["removed"] == [f"p/{newest.run.signature}"]
    r = cas_inproc("show", "ab", cache_dir=cache)
    assert r.returncode == 2 and "no run named or matching 'ab'" in r.stderr
