"""Randomized torture (seeded, slow, run in CI): kill -9 at random moments of a fan-out +
fan-in + global-step pipeline, and random damage to the store between runs. Every run
either finishes with exactly the uninterrupted dataset or fails with a one-line error;
no run ever serves a wrong row."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, cas_inproc, run_cas, start_cas

PIPELINE = REPO / "tests" / "pipelines" / "torture.py"
SEED = int(os.environ.get("CASTORE_TORTURE_SEED", "20261126"))
KILLS = int(os.environ.get("CASTORE_TORTURE_KILLS", "30"))
DAMAGES = int(os.environ.get("CASTORE_TORTURE_DAMAGES", "24"))


def dataset(data_dir: str) -> list[dict]:
    files = sorted((Path(data_dir) / "keep_columns").iterdir())
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pylist()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[list[dict], float]:
    cache = tmp_path_factory.mktemp("torture-ref")
    t0 = time.monotonic()
    r = run_cas("run", str(PIPELINE), "--json", cache_dir=cache)
    assert r.returncode == 0, r
    return dataset(r.json()["data_dir"]), time.monotonic() - t0


def fsck_clean(cache: Path) -> None:
    if not (cache / "castore-layout.json").exists():
        # Killed before the run created its store (or mid-creation): there is nothing to
        # check, and fsck never creates a store. The next run creates it.
        r = cas_inproc("fsck", cache_dir=cache)
        assert r.returncode == 1 and "no castore store at" in r.stderr, r
        return
    r = cas_inproc("fsck", "--json", cache_dir=cache)
    assert r.returncode == 0, r


@pytest.mark.slow
def test_random_kill_9_then_resume_equals_uninterrupted(tmp_path, reference):
    """KILLS kill -9 in all: trials of three kills in a row on one store (each run resumes
    the last), then an uninterrupted run whose dataset must equal the reference."""
    expected, seconds = reference
    rng = random.Random(SEED)
    kills = 0
    for trial in range(KILLS // 3):
        cache = tmp_path / f"c{trial}"
        for _ in range(3):
            proc = start_cas("run", str(PIPELINE), cache_dir=cache)
            time.sleep(rng.uniform(0.2, 0.8 * seconds))
            if proc.poll() is None:
                proc.kill()
                kills += 1
            proc.communicate(timeout=60)
            fsck_clean(cache)
        r = run_cas("run", str(PIPELINE), "--json", cache_dir=cache)
        assert r.returncode == 0, r
        assert dataset(r.json()["data_dir"]) == expected, f"trial {trial}"
        fsck_clean(cache)
    assert kills >= KILLS * 3 // 4, f"only {kills} of {KILLS} kills landed mid-run"


def _damage(cache: Path, rng: random.Random) -> str:
    """One random damage: a flipped byte or truncation in an object (batches and
    manifests are objects), a flipped byte in an action entry, or a garbage ref."""
    kind = rng.choice(["flip-object", "truncate-object", "flip-entry", "ref"])
    if kind == "ref":
        refs = sorted((cache / "refs" / "runs").rglob("*"))
        target = rng.choice([p for p in refs if p.is_file()])
        target.write_bytes(rng.choice([b"", b"\xff\x00junk", b"../../etc/passwd", b"12345678"]))
        return f"{kind} {target.name[:12]}"

    def files(base: Path) -> list[Path]:
        return sorted(p for p in base.rglob("*") if p.is_file() and p.stat().st_size > 0)

    # Entries may all be packed (the pack is an object; its marker is empty): then an
    # object is flipped instead.
    entries = files(cache / "actions") if kind == "flip-entry" else []
    kind = kind if entries or kind != "flip-entry" else "flip-object"
    target = rng.choice(entries or files(cache / "objects"))
    os.chmod(target, 0o644)
    data = bytearray(target.read_bytes())
    if kind == "truncate-object":
        target.write_bytes(bytes(data[: rng.randrange(len(data))]))
    else:
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
        target.write_bytes(bytes(data))
    return f"{kind} {target.parent.name}{target.name[:10]}"


@pytest.mark.slow
def test_random_damage_never_serves_a_wrong_row(tmp_path, reference):
    expected, _ = reference
    rng = random.Random(SEED + 1)
    cache = tmp_path / "c"
    r = run_cas("run", str(PIPELINE), cache_dir=cache)
    assert r.returncode == 0, r
    outcomes = {"recomputed or reused": 0, "one-line error": 0}
    for _ in range(DAMAGES):
        what = _damage(cache, rng)
        r = cas_inproc("run", str(PIPELINE), "--json", cache_dir=cache)
        if r.returncode == 0:
            assert dataset(json.loads(r.stdout)["data_dir"]) == expected, what
            outcomes["recomputed or reused"] += 1
        else:
            errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
            assert len(errors) == 1 and "Traceback" not in r.stderr, (what, r)
            outcomes["one-line error"] += 1
            cas_inproc("fsck", "--repair", cache_dir=cache)
            r = cas_inproc("run", str(PIPELINE), "--json", cache_dir=cache)
            assert r.returncode == 0, (what, r)
            assert dataset(json.loads(r.stdout)["data_dir"]) == expected, what
        cas_inproc("fsck", "--repair", cache_dir=cache)
        fsck_clean(cache)
    assert sum(outcomes.values()) == DAMAGES
