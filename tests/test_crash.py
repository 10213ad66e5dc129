"""Real SIGINT and SIGKILL at several moments of a `cas run`, then resume: the final
dataset equals the uninterrupted run's, row for row, and paid work is not repeated."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.conftest import run_cas, start_cas
from tests.scenario import PIPELINE, SLOW_BATCHES, dataset, extended, start, wait_for

pytestmark = pytest.mark.slow


MOMENTS = [0, 5, 31, 50, 75]  # action entries present when the signal is sent


@pytest.mark.parametrize("sig", ["SIGINT", "SIGKILL"])
@pytest.mark.parametrize("moment", MOMENTS)
def test_interrupt_then_resume_equals_uninterrupted(tmp_path, reference, sig, moment):
    ref_doc, ref_rows = reference
    cache, calls = tmp_path / "cache", tmp_path / "calls.txt"
    proc = start(cache, calls)
    wait_for(cache, moment, proc)
    proc.send_signal(getattr(signal, sig))
    _, errtext = proc.communicate(timeout=60)
    if sig == "SIGINT":
        assert proc.returncode == 130, errtext
        assert "cas resume slow" in errtext
        assert "Traceback" not in errtext
    else:
        assert proc.returncode == -signal.SIGKILL

    ls = run_cas("ls", "--json", cache_dir=cache).json()
    assert ls[0]["status"] == "interrupted"

    env = {"CASTORE_TEST_CALLS": str(calls)}
    r = run_cas("resume", "slow", "--json", cache_dir=cache, env=env)
    assert r.returncode == 0, r
    doc = r.json()
    assert doc["status"] == "finished" and doc["signature"] == ref_doc["signature"]
    assert dataset(cache, doc["signature"]) == ref_rows
    assert extended(cache, doc["signature"])  # the objects of slow extend their input
    # Paid work: each batch once, plus at most the batches in flight at the kill
    # (concurrency 2).
    computed = len(calls.read_text().splitlines())
    assert SLOW_BATCHES <= computed <= SLOW_BATCHES + 2, computed
    assert run_cas("fsck", cache_dir=cache).returncode == 0

    again = run_cas("run", str(PIPELINE), "--json", cache_dir=cache, env=env)
    assert all(s["batches_computed"] == 0 for s in again.json()["steps"].values())
    assert len(calls.read_text().splitlines()) == computed


def test_second_ctrl_c_cancels_at_once(tmp_path):
    cache, calls = tmp_path / "cache", tmp_path / "calls.txt"
    proc = start(cache, calls)
    wait_for(cache, 10, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    _, errtext = proc.communicate(timeout=30)
    assert proc.returncode == 130, errtext
    assert time.monotonic() - t0 < 10
    assert run_cas("fsck", cache_dir=cache).returncode == 0
    r = run_cas("resume", "--json", cache_dir=cache)
    assert r.returncode == 0, r


def test_runtime_param_survives_resume(tmp_path):
    """distilabel 1.5.3 reverts a runtime param to its default on resume; castore
    records the parameters in the run and re-applies them."""
    cache, calls = tmp_path / "cache", tmp_path / "calls.txt"
    env = {**os.environ, "CASTORE_TEST_CALLS": str(calls)}
    proc = start_cas("run", str(PIPELINE), "--param", "slow.delay=0.05", cache_dir=cache, env=env)
    wait_for(cache, 45, proc)  # 31 generator entries, then some of `slow`
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    r = run_cas("resume", "--json", cache_dir=cache, env={"CASTORE_TEST_CALLS": str(calls)})
    assert r.returncode == 0, r
    show = run_cas("show", "slow", "--json", cache_dir=cache).json()
    slow = next(s for s in show["steps"] if s["name"] == "slow")
    # Resumed with delay=0.05: the batches done before the kill were reused.
    assert slow["batches_cached"] > 0 and slow["batches_done"] == SLOW_BATCHES
    assert len(calls.read_text().splitlines()) <= SLOW_BATCHES + 2
