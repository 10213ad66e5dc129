"""Store throughput as ratios against raw pyarrow / raw reads measured in the same run.

python benchmarks/bench_store.py [--rows 100000]
"""

from __future__ import annotations

import argparse
import random
import shutil
import string
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import best_of, report

from castore.hashing import hash_bytes
from castore.store import Store
from castore.store.parquet import WRITE_OPTIONS


def make_table(rows: int) -> pa.Table:
    rng = random.Random(0)
    alphabet = string.ascii_letters + " "
    pool_a = ["".join(rng.choices(alphabet, k=200)) for _ in range(1000)]
    pool_b = ["".join(rng.choices(alphabet, k=500)) for _ in range(1000)]
    return pa.table(
        {
            "instruction": [pool_a[rng.randrange(1000)] + str(i) for i in range(rows)],
            "response": [pool_b[rng.randrange(1000)] + str(i) for i in range(rows)],
        }
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    args = ap.parse_args()
    table = make_table(args.rows)
    work = Path(tempfile.mkdtemp(prefix="bench-store-"))
    try:
        raw_path = work / "raw.parquet"

        def raw_write() -> None:
            pq.write_table(table, raw_path, **WRITE_OPTIONS)

        def unlink_raw() -> None:
            raw_path.unlink(missing_ok=True)

        def timed_put(fsync: bool) -> float:
            store = Store(work / f"put-{fsync}", fsync=fsync)

            def clear() -> None:
                # Every round really writes: an existing object would be skipped.
                for oid in list(store.iter_oids()):
                    store.delete_object(oid)

            return best_of(lambda: store.put_table(table), setup=clear)

        t_raw = best_of(raw_write, setup=unlink_raw)
        t_put = timed_put(False)
        t_put_fsync = timed_put(True)
        raw_write()
        store = Store(work / "read")
        oid = store.put_table(table)
        t_raw_read = best_of(lambda: pq.read_table(raw_path))
        t_get = best_of(lambda: store.get_table(oid))
        t_get_nv = best_of(lambda: store.get_table(oid, verify=False))
        data = raw_path.read_bytes()
        size = len(data)
        t_read = best_of(lambda: raw_path.read_bytes())
        t_hash = best_of(lambda: hash_bytes(data))
        mb = size / 1e6
        report(
            [
                ("rows / object size", f"{args.rows:,} rows, {mb:.1f} MB Parquet"),
                ("raw pq.write_table", f"{t_raw * 1e3:.1f} ms"),
                ("put_table (no fsync)", f"{t_put * 1e3:.1f} ms  ratio {t_raw / t_put:.2f}"),
                (
                    "put_table (fsync)",
                    f"{t_put_fsync * 1e3:.1f} ms  ratio {t_raw / t_put_fsync:.2f}"
                    f"  fsync cost +{(t_put_fsync - t_put) * 1e3:.1f} ms",
                ),
                ("raw pq.read_table", f"{t_raw_read * 1e3:.1f} ms"),
                ("get_table verify", f"{t_get * 1e3:.1f} ms  ratio {t_raw_read / t_get:.2f}"),
                (
                    "get_table no verify",
                    f"{t_get_nv * 1e3:.1f} ms  ratio {t_raw_read / t_get_nv:.2f}",
                ),
                ("page-cache read", f"{mb / t_read:.0f} MB/s"),
                ("blake3 hash", f"{mb / t_hash:.0f} MB/s  ratio {t_read / t_hash:.2f}"),
            ]
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
