"""Row-level reuse (issue 14): 100,000 rows through a cheap row-wise step. Appending 1 %
of rows must compute exactly those rows, in at most 2x the time of a fully cached re-run
of the same pipeline (the floor, measured in the same run). Also: row-key cost per row,
and loading an index of 1,000,000 row keys (time and memory, in a child process).

    python benchmarks/bench_rows.py [--rows 100000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import datasets  # noqa: F401 - imported up front: its import is not what this measures
from _util import report

from castore import Pipeline, StepInput, step
from castore.steps import LoadDataFromFileSystem
from castore.store import Store

COMPUTED: list[int] = []


@step(inputs=["text"], outputs=["n"], row_wise=True)
def Cheap(inputs: StepInput):
    COMPUTED.append(len(inputs))
    return [{**r, "n": len(r["text"])} for r in inputs]


def pipeline(data: Path) -> Pipeline:
    with Pipeline(name="bench-rows") as p:
        LoadDataFromFileSystem(data_files=str(data), batch_size=5000) >> Cheap(
            input_batch_size=1000
        )
    return p


def write(path: Path, n: int) -> None:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": i, "text": f"row {i} " + "x" * (i % 50)}) + "\n")


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


INDEX_CHILD = """
import os, sys, time
import pyarrow as pa
from castore.store import Store
from castore.pipeline.rows import RowIndex, OUTPUT_META
store = Store(sys.argv[1])
fp = "ab" * 32
if not store.row_segments(fp):
    out = store.put_bytes(b"an output")
    for s in range(1000):
        keys = [os.urandom(32) for _ in range(1000)]
        t = pa.table({"row_key": pa.array(keys, pa.binary(32))}).replace_schema_metadata(
            {OUTPUT_META: out.encode()})
        store.add_row_segment(fp, store.put_table(t))
    print("built")
    sys.exit(0)
def rss_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
base = rss_kib()
t0 = time.perf_counter()
index = RowIndex.load(store, fp)
dt = time.perf_counter() - t0
print(len(index), round(dt, 3), round((rss_kib() - base) / 1024, 1))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="castore-bench-rows-"))
    try:
        data, cache = work / "data.jsonl", work / "cache"
        write(data, args.rows)
        t_cold = timed(lambda: pipeline(data).run(cache_dir=cache, quiet=True))
        extra = args.rows // 100
        write(work / "more.jsonl", args.rows + extra)
        base = work / "base"
        shutil.copytree(cache, base)
        rerun, append, computed = [], [], []
        for _ in range(args.repeat):
            rerun.append(timed(lambda: pipeline(data).run(cache_dir=cache, quiet=True)))
            shutil.rmtree(cache)
            shutil.copytree(base, cache)
            COMPUTED.clear()
            append.append(
                timed(lambda: pipeline(work / "more.jsonl").run(cache_dir=cache, quiet=True))
            )
            computed.append(sum(COMPUTED))
            shutil.rmtree(cache)
            shutil.copytree(base, cache)

        from castore.hashing import row_keys
        from castore.pipeline.rows import RowIndex

        texts = [f"row {i} " + "x" * (i % 50) for i in range(args.rows)]
        fp = pipeline(data).signatures()["cheap"]["fp"]
        t_keys = min(timed(lambda: row_keys(fp, [texts], {})) for _ in range(3))
        index = RowIndex.load(Store(base), fp)
        keys = row_keys(fp, [texts], {})
        assert all(f is not None for f in index.find(keys)), "every row is in the index"
        t_find = min(timed(lambda: index.find(keys)) for _ in range(3))

        idx_store = work / "index-store"
        env = {**os.environ}
        subprocess.run([sys.executable, "-c", INDEX_CHILD, str(idx_store)], check=True, env=env)
        loads = []
        for _ in range(args.repeat):
            out = subprocess.run(
                [sys.executable, "-c", INDEX_CHILD, str(idx_store)],
                check=True,
                capture_output=True,
                text=True,
                env=env,
            ).stdout.split()
            loads.append((int(out[0]), float(out[1]), float(out[2])))

        def mm(v: list[float], unit: str = "s", scale: float = 1.0) -> str:
            return (
                f"min {min(v) * scale:.3f} {unit}  median {statistics.median(v) * scale:.3f} {unit}"
            )

        ratio = [a / r for a, r in zip(append, rerun, strict=True)]
        report(
            [
                ("rows", f"{args.rows:,} (+{extra:,} appended), cold run {t_cold:.2f} s"),
                ("load average", " ".join(f"{x:.2f}" for x in os.getloadavg())),
                ("floor: fully cached re-run", mm(rerun)),
                ("append 1 %: run", mm(append)),
                (
                    "append 1 %: ratio to the re-run",
                    f"min {min(ratio):.2f}  median {statistics.median(ratio):.2f} (target <= 2)",
                ),
                ("append 1 %: rows computed", f"{sorted(set(computed))} (new rows: {extra})"),
                ("row keys", f"{t_keys / args.rows * 1e6:.2f} us per row"),
                ("index lookup", f"{t_find / args.rows * 1e6:.2f} us per row"),
                ("index load, 1,000,000 keys", mm([x[1] for x in loads]) + " (target <= 1 s)"),
                (
                    "index memory, 1,000,000 keys",
                    mm([x[2] for x in loads], "MiB") + " (target <= 200)",
                ),
            ]
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
