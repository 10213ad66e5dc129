"""Materializing a 1,000,000-row leaf (2,000 batch objects): Distiset.from_run vs
datasets.Dataset.from_parquet over the same files. Each side runs in its own process so
peak RSS is its own.

    python benchmarks/bench_distiset.py [--rows 1000000] [--batch 500]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import peak_rss_mib, report


def child(mode: str, work: Path, rows: int, batch: int) -> None:
    import datasets
    from bench_engine import Counter

    from castore import Pipeline
    from castore.distiset import Distiset

    if mode == "build":
        with Pipeline(name="big") as p:
            Counter(n_rows=rows, batch_size=batch)
        t0 = time.perf_counter()
        p.run(cache_dir=work / "store", quiet=True)
        seconds = time.perf_counter() - t0
        # The run already materialized its leaf; drop that so "first" measures it.
        from castore.store import Store

        store = Store(work / "store")
        for key in list(store.iter_actions()):
            entry = store.get_action(key)
            if entry and entry.info.get("kind") == "leaf-arrow":
                store.delete_object(entry.outputs[0])
                store.delete_action(key)
        for link in (work / "store" / "runs").rglob(".arrow"):
            shutil.rmtree(link)
        print(json.dumps({"seconds": seconds}))
        return
    t0 = time.perf_counter()
    if mode == "castore":
        ds = Distiset.from_run("big", work / "store")["counter"]["train"]
    else:
        files = sorted(str(f) for f in (work / "store" / "runs" / "big").glob("*/data/counter/*"))
        ds = datasets.Dataset.from_parquet(files, cache_dir=str(work / f"hf-{time.time_ns()}"))
    n = ds.num_rows
    total = sum(ds.data.column("x").to_numpy())  # touch every row
    print(
        json.dumps(
            {
                "seconds": time.perf_counter() - t0,
                "rows": n,
                "sum": int(total),
                "peak_rss_mib": peak_rss_mib(),
            }
        )
    )


def run_child(mode: str, work: Path, rows: int, batch: int) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            mode,
            "--work",
            str(work),
            "--rows",
            str(rows),
            "--batch",
            str(batch),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--child")
    ap.add_argument("--work")
    args = ap.parse_args()
    if args.child:
        child(args.child, Path(args.work), args.rows, args.batch)
        return
    work = Path(tempfile.mkdtemp(prefix="bench-distiset-"))
    try:
        run_child("build", work, args.rows, args.batch)
        first = run_child("castore", work, args.rows, args.batch)  # writes the leaf Arrow
        again = run_child("castore", work, args.rows, args.batch)  # memory-maps it
        floor = run_child("from_parquet", work, args.rows, args.batch)
        assert first["sum"] == floor["sum"] == again["sum"] and first["rows"] == args.rows
        batches = args.rows // args.batch
        report(
            [
                ("leaf", f"{args.rows:,} rows in {batches:,} batch objects"),
                (
                    "datasets.Dataset.from_parquet",
                    f"{floor['seconds']:.2f} s, peak RSS {floor['peak_rss_mib']:.0f} MiB",
                ),
                (
                    "Distiset.from_run, first",
                    f"{first['seconds']:.2f} s  ratio "
                    f"{floor['seconds'] / first['seconds']:.2f} (target >= 1.0), peak RSS "
                    f"{first['peak_rss_mib']:.0f} MiB",
                ),
                (
                    "Distiset.from_run, again",
                    f"{again['seconds']:.3f} s  ratio "
                    f"{floor['seconds'] / again['seconds']:.1f}, peak RSS "
                    f"{again['peak_rss_mib']:.0f} MiB",
                ),
            ]
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
