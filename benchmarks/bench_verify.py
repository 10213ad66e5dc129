"""What verifying cache hits costs (issue 12): a finished re-run and a read-through run on
a ~1 GB store, with and without the blake3 check of every reused object, interleaved in
one process so both see the same machine. Floors: blake3 over the same files, and a plain
read of them (page cache).

    python benchmarks/bench_verify.py [--mb 1000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))
import datasets  # noqa: F401 - imported up front: its import is not what this measures
from _util import report, timed

from castore import GeneratorStep, Pipeline
from castore.hashing import hash_file
from castore.steps import KeepColumns
from castore.store import Store

BATCH_MB = 5


class Blobs(GeneratorStep):
    """Incompressible rows, the same on every run (seeded by batch)."""

    batches: int

    def process(self, offset: int = 0):
        per_row = 50_000
        rows = BATCH_MB * (1 << 20) // per_row
        for b in range(offset // rows, self.batches):
            rng = random.Random(b)
            yield pa.table(
                {
                    "i": list(range(b * rows, (b + 1) * rows)),
                    "blob": [rng.randbytes(per_row) for _ in range(rows)],
                }
            )


def pipeline(batches: int) -> Pipeline:
    with Pipeline(name="verify-bench") as p:
        Blobs(batches=batches, batch_size=1) >> KeepColumns(columns=["i", "blob"])
    return p


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=1000, help="store size (two steps of half each)")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    batches = max(1, args.mb // 2 // BATCH_MB)
    work = Path(tempfile.mkdtemp(prefix="castore-bench-verify-"))
    try:
        cache, remote = work / "store", work / "remote"
        t_cold = timed(lambda: pipeline(batches).run(cache_dir=cache, quiet=True))
        store = Store(cache)
        files = [store.path_of(o) for o in store.iter_oids()]
        size = sum(os.path.getsize(f) for f in files)

        from castore.remote import Remote
        from castore.transfer import push

        push(store, Remote(str(remote)))

        real_reuse = Store.reuse
        unverified = Store.freshen  # what a hit did before: present and touched, not hashed

        def with_verify(on: bool) -> None:
            Store.reuse = real_reuse if on else unverified  # type: ignore[method-assign]

        def rerun() -> None:
            pipeline(batches).run(cache_dir=cache, quiet=True)

        def read_through() -> None:
            local = work / "fresh"
            shutil.rmtree(local, ignore_errors=True)
            pipeline(batches).run(cache_dir=local, quiet=True, remote=str(remote))

        def read_all() -> None:
            for f in files:
                with open(f, "rb") as fh:
                    while fh.read(1 << 22):
                        pass

        results: dict[str, list[float]] = {
            k: [] for k in ("rerun+v", "rerun-v", "rt+v", "rt-v", "blake3", "read")
        }
        for _ in range(args.repeat):
            with_verify(True)
            results["rerun+v"].append(timed(rerun))
            with_verify(False)
            results["rerun-v"].append(timed(rerun))
            with_verify(True)
            results["rt+v"].append(timed(read_through))
            with_verify(False)
            results["rt-v"].append(timed(read_through))
            results["blake3"].append(timed(lambda: [hash_file(f) for f in files]))
            results["read"].append(timed(read_all))
        with_verify(True)

        def fmt(k: str) -> str:
            v = results[k]
            return f"min {min(v):.3f} s  median {statistics.median(v):.3f} s"

        def ratio(a: str, b: str) -> str:
            return (
                f"{statistics.median(results[a]) / statistics.median(results[b]):.2f} "
                f"(min {min(results[a]) / min(results[b]):.2f})"
            )

        load = os.getloadavg()
        report(
            [
                ("store", f"{size / 1e6:.0f} MB in {len(files)} objects, cold run {t_cold:.1f} s"),
                ("load average", " ".join(f"{x:.2f}" for x in load)),
                ("floor: plain read", fmt("read")),
                ("floor: blake3 of every object", fmt("blake3")),
                ("finished re-run, verified", fmt("rerun+v")),
                ("finished re-run, not verified", fmt("rerun-v")),
                ("re-run ratio verified/not", ratio("rerun+v", "rerun-v")),
                ("read-through, verified", fmt("rt+v")),
                ("read-through, not verified", fmt("rt-v")),
                ("read-through ratio verified/not", ratio("rt+v", "rt-v")),
                (
                    "blake3 throughput",
                    f"{size / statistics.median(results['blake3']) / 1e9:.1f} GB/s",
                ),
            ]
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
