"""gc of a store with 100,000 objects, half unreachable, vs the floor of listing and
stat-ing those files once (os.scandir walk); and `cas du` on the same store.

    python benchmarks/bench_gc.py [--objects 100000]
"""

from __future__ import annotations

import argparse
import os
import shutil
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--objects", type=int, default=100_000)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-gc-"))
    try:
        store = Store(work / "store")
        build(store, args.objects)
        floor(store.root)  # warm the dentry cache for both sides alike
        t0 = time.perf_counter()
        total = floor(store.root)
        t_floor = time.perf_counter() - t0
        t0 = time.perf_counter()
        rep = usage(store)
        t_du = time.perf_counter() - t0
        t0 = time.perf_counter()
        plan = gc.plan_gc(store, grace=3600, cache_ttl=0)
        t_plan = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = gc.collect(store, grace=3600, cache_ttl=0)
        t_gc = time.perf_counter() - t0
        report(
            [
                ("objects", f"{total:,} ({len(plan.objects_removed):,} unreachable)"),
                ("floor: scandir + stat", f"{t_floor:.2f} s"),
                ("gc plan (dry run)", f"{t_plan:.2f} s  = {t_plan / t_floor:.1f}x floor"),
                (
                    "gc (plan + sweep)",
                    f"{t_gc:.2f} s  = {t_gc / t_floor:.1f}x floor (target <= 3x); "
                    f"removed {len(result.plan.objects_removed):,}",
                ),
                (
                    "cas du",
                    f"{t_du:.2f} s  = {t_du / t_floor:.1f}x floor; {rep.physical:,} bytes physical",
                ),
            ]
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
