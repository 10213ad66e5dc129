"""gc of a store with 100,000 objects, half unreachable, against floors measured in the
same repetition on a twin store built alike: listing and stat-ing every object once
(os.scandir walk), and that walk plus unlinking the objects gc removes (the least any
collector must do); `cas du` and the plan (dry run) against the walk. Min / median of
--repeat, with the load average.

    python benchmarks/bench_gc.py [--objects 100000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import fake_run, report

from castore import gc
from castore.du import usage
from castore.hashing import hash_bytes
from castore.store import Store


def put_raw(store: Store, data: bytes) -> str:
    """Write an object the way put_bytes does, minus the staging (setup speed only)."""
    oid = hash_bytes(data)
    d = store.root / "objects" / oid[:2]
    d.mkdir(exist_ok=True)
    (d / oid[2:]).write_bytes(data)
    return oid


def build(store: Store, n: int) -> None:
    """n/2 batch objects referenced by 10 runs (with action entries), n/2 unreachable."""
    table_bytes = pa.BufferOutputStream()
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [1]}), table_bytes)
    base = table_bytes.getvalue().to_pybytes()
    half = n // 2
    per_run = half // 10
    old = time.time() - 7200
    for r in range(10):
        oids = [put_raw(store, base + f"{r}-{i}".encode()) for i in range(per_run)]
        fake_run(store, f"p{r % 3}", r, oids)
    for i in range(n - half):
        put_raw(store, b"garbage " + str(i).encode())
    for dirpath, _, files in os.walk(store.root / "objects"):
        for f in files:
            os.utime(os.path.join(dirpath, f), (old, old))


def floor(root: Path) -> int:
    count = 0
    for shard in os.scandir(root / "objects"):
        for e in os.scandir(shard.path):
            e.stat()
            count += 1
    return count


def floor_unlink(root: Path, oids: list[str]) -> None:
    """The walk, then unlinking `oids` by full path."""
    floor(root)
    base = root / "objects"
    for oid in oids:
        os.unlink(base / oid[:2] / oid[2:])


def mm(v: list[float]) -> str:
    return f"min {min(v):.2f} s  median {statistics.median(v):.2f} s"


def ratio(a: list[float], b: list[float]) -> str:
    return (
        f"min/min {min(a) / min(b):.1f}x  "
        f"median/median {statistics.median(a) / statistics.median(b):.1f}x"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--objects", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-gc-"))
    r: dict[str, list[float]] = {k: [] for k in ("walk", "du", "plan", "gc", "unlink")}
    try:
        for i in range(args.repeat):
            store, twin = Store(work / f"store-{i}"), Store(work / f"twin-{i}")
            build(store, args.objects)
            build(twin, args.objects)
            floor(store.root)  # warm the dentry cache for every side alike
            floor(twin.root)
            t0 = time.perf_counter()
            total = floor(store.root)
            r["walk"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            rep = usage(store)
            r["du"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            plan = gc.plan_gc(store, grace=3600, cache_ttl=0)
            r["plan"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            result = gc.collect(store, grace=3600, cache_ttl=0)
            r["gc"].append(time.perf_counter() - t0)
            removed = sorted(result.plan.objects_removed)
            t0 = time.perf_counter()
            floor_unlink(twin.root, removed)
            r["unlink"].append(time.perf_counter() - t0)
            shutil.rmtree(store.root)
            shutil.rmtree(twin.root)
        report(
            [
                ("objects", f"{total:,} ({len(plan.objects_removed):,} unreachable)"),
                ("load average", " ".join(f"{x:.2f}" for x in os.getloadavg())),
                ("floor: scandir + stat", mm(r["walk"])),
                ("floor: that + unlink what gc removes", mm(r["unlink"])),
                ("gc plan (dry run)", f"{mm(r['plan'])}  = {ratio(r['plan'], r['walk'])} walk"),
                (
                    "gc (plan + sweep)",
                    f"{mm(r['gc'])}  = {ratio(r['gc'], r['unlink'])} walk+unlink (target <= 3x)"
                    f"; {ratio(r['gc'], r['walk'])} walk; removed {len(removed):,}",
                ),
                (
                    "cas du",
                    f"{mm(r['du'])}  = {ratio(r['du'], r['walk'])} walk; "
                    f"{rep.physical:,} bytes physical",
                ),
            ]
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
