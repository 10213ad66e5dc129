"""Row claims across machines (castore/remote_locks.py RemoteClaims, docs/remotes.md
"Several machines on one remote"): machines writing through to one remote whose batches
of a row-wise step differ pay for each row once; the claims, segment markers and their
gc; a killed holder's claims expire."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path

from castore import remote_segments
from castore.hashing import hash_bytes
from castore.remote import Remote
from castore.remote_gc import collect_remote
from castore.remote_locks import Heartbeat, RemoteClaims, read_lock
from tests.conftest import cas_inproc, start_cas
from tests.test_remote import remote_problems, remote_url, s3  # noqa: F401 - fixtures
from tests.test_team import calls, s3_url  # noqa: F401 - fixture

ROWWISE = Path(__file__).parent / "pipelines" / "rowwise.py"


def start_machine(tmp_path: Path, url: str, name: str, size: int, **env: str):
    """A machine (its own store) running tests/pipelines/rowwise.py over 300 rows with
    this batch size, writing through to `url`; rows it computes go to tmp_path/calls."""
    data = tmp_path / "data.jsonl"
    if not data.exists():
        rows = (json.dumps({"id": i, "text": f"row {i}"}) + "\n" for i in range(300))
        data.write_text("".join(rows))
    # 60 ms a row: above the remote's lease threshold even for a batch of one row.
    env = {
        "CASTORE_TEST_DATA": str(data),
        "CASTORE_TEST_CALLS": str(tmp_path / "calls"),
        "CASTORE_TEST_ROW_SECONDS": "0.06",
        **env,
    }
    args = ("run", str(ROWWISE), "--remote", url, "--push", "--json")
    size_arg = ("--param", f"answer.input_batch_size={size}")
    return start_cas(*args, *size_arg, cache_dir=tmp_path / name, env=env)


def rowwise_machines(tmp_path: Path, url: str, sizes: tuple[int, ...]) -> list[str]:
    """Machines started together with these batch sizes: the rows they computed, each
    run checked finished and whole."""
    procs = [start_machine(tmp_path, url, f"m{i}", n) for i, n in enumerate(sizes)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert json.loads(out)["rows"]["keep_columns"] == 300
    return [line.split(" ", 1)[1] for line in calls(tmp_path / "calls")]


def test_machines_whose_batches_differ_pay_each_row_once(tmp_path, s3_url):  # noqa: F811
    """Two machines run one row-wise step with batch sizes 7 and 10: no batch key is
    shared, so only row claims on the remote keep a row from being paid for twice."""
    computed = rowwise_machines(tmp_path, s3_url, (7, 10))
    twice = len(computed) - len(set(computed))
    assert twice == 0, f"{twice} rows computed twice"
    assert set(computed) == {f"row {i}" for i in range(300)}
    remote = Remote(s3_url)
    assert remote_problems(remote) == []
    claims = remote.layout.join(remote.layout.dir("locks"), "claims")
    assert not remote.fs.find(claims)  # every claim let go
    # Every batch the step computed announced its segment while the runs were going.
    markers = [p for p in remote.fs.find(remote.layout.dir("index"))]
    assert len(markers) == 43 + 30, len(markers)


def test_a_killed_machines_claims_expire_and_its_rows_are_made_once(tmp_path, s3_url):  # noqa: F811
    """kill -9 of a machine holding row claims: the other waits for those rows only
    until the claims expire (TTL 3 s here), then computes them; no row is paid twice
    beyond those the dead one had claimed, and the dataset is the one a lone machine
    makes."""
    ttl = {"CASTORE_REMOTE_LOCK_TTL": "3"}
    a = start_machine(tmp_path, s3_url, "a", 7, **ttl)
    deadline = time.monotonic() + 60
    while len(calls(tmp_path / "calls")) < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    b = start_machine(tmp_path, s3_url, "b", 10, **ttl)
    time.sleep(1.5)
    remote = Remote(s3_url)
    claims = remote.layout.join(remote.layout.dir("locks"), "claims")
    infos = [read_lock(remote, p) for p in remote.fs.find(claims)]  # None: let go since
    held = {k for info in infos if info is not None for k in info["keys"]}
    a.send_signal(signal.SIGKILL)
    a.communicate(timeout=30)
    out, err = b.communicate(timeout=300)
    assert b.returncode == 0, err
    assert json.loads(out)["rows"]["keep_columns"] == 300
    computed = [line.split(" ", 1)[1] for line in calls(tmp_path / "calls")]
    assert set(computed) == {f"row {i}" for i in range(300)}
    twice = len(computed) - len(set(computed))
    assert twice <= len(held) + 4 * 7, (twice, len(held))  # + a's batches being claimed
    alone = cas_inproc(
        "run",
        str(ROWWISE),
        "--json",
        cache_dir=tmp_path / "alone",
        env={"CASTORE_TEST_DATA": str(tmp_path / "data.jsonl")},
    )
    assert alone.returncode == 0
    assert rows_of(tmp_path / "b") == rows_of(tmp_path / "alone")


def rows_of(store_root: Path) -> list[dict]:
    from castore.distiset import Distiset

    rows = Distiset.from_run("rowwise", store_root)["keep_columns"]["train"].to_list()
    return sorted(rows, key=lambda r: r["id"])


def test_claims_overlap_refuse_and_rank(remote_url):  # noqa: F811
    remote = Remote(remote_url)
    hb = Heartbeat(remote, 60.0)
    a, b = RemoteClaims(remote, hb), RemoteClaims(remote, hb)
    fp = "ab" * 32
    k1, k2, k3 = (bytes([n]) * 32 for n in (1, 2, 3))
    mine = a.take(fp, [k1, k2], "01" * 32)
    assert isinstance(mine, str)
    blockers = b.take(fp, [k2, k3], "02" * 32)
    assert blockers == [mine] or [os.path.basename(p) for p in blockers] == [os.path.basename(mine)]
    assert [os.path.basename(p) for p in b.live(fp)] == [os.path.basename(mine)]
    assert isinstance(b.take(fp, [k3], "03" * 32), str)  # no overlap: claimed
    # Of two machines that meet, exactly one turns around.
    theirs = a.take(fp, [k3], "04" * 32)
    assert isinstance(theirs, list)
    assert a.outranked(theirs) != b.outranked(blockers)
    a.release(mine)
    assert b.live(fp) == []
    assert isinstance(b.take(fp, [k2], "05" * 32), str)
    hb.close()


def test_an_expired_claim_blocks_nothing(remote_url, monkeypatch):  # noqa: F811
    remote = Remote(remote_url)
    fp = "cd" * 32
    key = bytes(range(32))
    dead = RemoteClaims(remote, Heartbeat(remote, 1.0))
    assert isinstance(dead.take(fp, [key], "01" * 32), str)  # and never refreshed
    dead.heartbeat.close()
    time.sleep(1.2)
    other = RemoteClaims(remote, Heartbeat(remote, 1.0))
    assert isinstance(other.take(fp, [key], "02" * 32), str)


def _segment(remote: Remote, text: str) -> str:
    data = text.encode()
    seg = hash_bytes(data)
    remote.write(remote.layout.object_path(seg), data)
    return seg


def listed(remote: Remote, fp: str, since: float | None = None, seen=None) -> list[str]:
    """The segments a machine that last looked at `since` (default: an hour ago) finds."""
    since = time.time() - 3600 if since is None else since
    return remote_segments.announced(remote, fp, since, set() if seen is None else seen)


def test_segment_markers_with_a_team_key(remote_url, monkeypatch, caplog):  # noqa: F811
    fp = "ef" * 32
    monkeypatch.setenv("CASTORE_SIGNING_KEY", "team secret")
    remote = Remote(remote_url)
    good, forged = _segment(remote, "good"), _segment(remote, "forged")
    remote_segments.announce(remote, fp, good)
    no_mac = remote_segments.marker_path(remote, fp, forged, time.time())
    remote.write(no_mac, b"")  # not the team's
    seen: set[str] = set()
    with caplog.at_level(logging.WARNING):
        assert listed(remote, fp, seen=seen) == [good]
        assert listed(remote, fp, seen=seen) == [good]
    assert sum("not announced with the team key" in r.message for r in caplog.records) == 1
    assert listed(remote, fp, seen={good, forged}) == []
    monkeypatch.delenv("CASTORE_SIGNING_KEY")
    assert listed(Remote(remote_url), fp) == sorted([good, forged])  # no key: both


def test_a_look_at_markers_lists_only_the_recent_ones(remote_url):  # noqa: F811
    """A claim lists the marker folders since it last looked, not the step's history."""
    remote = Remote(remote_url)
    fp = "12" * 32
    old, new = _segment(remote, "two hours ago"), _segment(remote, "now")
    remote.write(remote_segments.marker_path(remote, fp, old, time.time() - 7200), b"")
    remote_segments.announce(remote, fp, new)
    assert listed(remote, fp, since=time.time() - 5) == [new]
    assert listed(remote, fp, since=time.time() - 3 * 3600) == sorted([old, new])
    # The first look goes back to the oldest live writer's start (none here: now).
    assert remote_segments.live_since(remote) >= time.time() - 5


def test_gc_keeps_young_markers_segments_and_drops_stale_markers(remote_url):  # noqa: F811
    remote = Remote(remote_url)
    fp = "0a" * 32
    seg = _segment(remote, "rows of a crashed run")
    remote_segments.announce(remote, fp, seg)
    remote_segments.announce(remote, fp, "77" * 32)  # its segment is not there
    dead_claim = remote.layout.join(remote.layout.dir("locks"), "claims", fp, "x-0.json")
    remote.write(dead_claim, json.dumps({"kind": "claim", "time": 0, "keys": []}).encode())
    problems = remote_problems(remote)
    assert len(problems) == 1 and "dangling-index" in problems[0], problems
    young = collect_remote(remote, grace=0, cache_ttl=86400).plan
    assert seg not in young.objects_removed
    assert [p.rsplit("/", 1)[-1] for p in young.markers_dropped] == ["77" * 32]
    assert listed(remote, fp) == [seg]
    assert not remote.fs.exists(dead_claim)
    old = collect_remote(remote, grace=0, cache_ttl=0).plan  # every marker is old now
    assert seg in old.objects_removed
    assert [p.rsplit("/", 1)[-1] for p in old.markers_dropped] == [seg]
    assert listed(remote, fp) == []
    assert remote_problems(remote) == []
