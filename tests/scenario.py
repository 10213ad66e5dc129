"""The slow pipeline scenario shared by the crash and concurrency tests."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, start_cas

PIPELINE = REPO / "tests" / "pipelines" / "slow.py"
SLOW_BATCHES = 40  # 600 rows / 15


def dataset(cache: Path, sig: str) -> list[dict]:
    data = cache / "runs" / "slow" / sig / "data" / "keep_columns"
    files = sorted(data.iterdir())
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pylist()


def extended(cache: Path, sig: str) -> bool:
    """Whether the run's batches of `slow` are stored as objects that extend their input
    (castore/store/extend.py)."""
    from castore.store import Store
    from castore.store.manifests import RunManifest, StepManifest, load_model

    store = Store(cache)
    run = load_model(store, store.get_ref("slow", sig) or "", RunManifest)
    step = load_model(store, run.step_manifest_id("slow"), StepManifest)
    return all(b.extends for b in step.batches)


def _actions(cache: Path) -> int:
    """Action entries written so far: loose files, and the lines of run journals (a run
    alone on its store appends its entries there)."""
    base = cache / "actions"
    if not base.exists():
        return 0
    loose = sum(len(os.listdir(base / d)) for d in os.listdir(base) if len(d) == 2)
    journal = base / "journal"
    lines = sum(p.read_bytes().count(b"\n") for p in journal.iterdir()) if journal.exists() else 0
    return loose + lines


def _has_ref(cache: Path) -> bool:
    return (cache / "refs" / "runs" / "slow").exists()


def start(cache: Path, calls: Path) -> subprocess.Popen:
    return start_cas("run", str(PIPELINE), cache_dir=cache, env={"CASTORE_TEST_CALLS": str(calls)})


def wait_for(cache: Path, actions: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _has_ref(cache) and _actions(cache) >= actions:
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended before the moment: {proc.communicate()}")
        time.sleep(0.01)
    pytest.fail("moment never came")
