"""Push and pull of 2,000 objects (~200 MB) to an S3-compatible server on 127.0.0.1, vs
the floor of fsspec put/get of the same files with the same parallelism; and a no-op push.

    python benchmarks/bench_remote.py [--objects 2000] [--size 100000] [--jobs 8]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _util import fake_run, report

from castore.remote import Remote
from castore.store import Store
from castore.transfer import pull, push
from tests.remote_server import S3Server


def build(store: Store, n: int, size: int) -> list[str]:
    oids = [store.put_bytes(os.urandom(size)) for _ in range(n)]
    fake_run(store, "bench", "bench", oids)
    return oids


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--objects", type=int, default=2000)
    ap.add_argument("--size", type=int, default=100_000)
    ap.add_argument("--jobs", type=int, default=8)
    args = ap.parse_args()
    server = S3Server()
    server.start()
    os.environ.update(server.env)
    import fsspec.config

    fsspec.config.conf["s3"] = {"endpoint_url": server.endpoint}
    work = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    try:
        store = Store(work / "a")
        oids = build(store, args.objects, args.size)
        mb = args.objects * args.size / 1e6
        # Floor: the same files through fsspec, same parallelism, to another bucket.
        floor_url = server.new_bucket()
        fs = Remote(floor_url).fs
        local = [store.path_of(o) for o in oids]
        remote_paths = [f"{floor_url[5:]}/floor/{o}" for o in oids]
        t0 = time.perf_counter()
        fs.put(local, remote_paths, batch_size=args.jobs)
        t_put = time.perf_counter() - t0
        dl = work / "dl"
        dl.mkdir()
        t0 = time.perf_counter()
        fs.get(remote_paths, [str(dl / o) for o in oids], batch_size=args.jobs)
        t_get = time.perf_counter() - t0

        remote = Remote(server.new_bucket())
        t0 = time.perf_counter()
        res = push(store, remote, jobs=args.jobs)
        t_push = time.perf_counter() - t0
        t0 = time.perf_counter()
        noop = push(store, remote, jobs=args.jobs)
        t_noop = time.perf_counter() - t0
        b = Store(work / "b")
        t0 = time.perf_counter()
        got = pull(b, remote, jobs=args.jobs)
        t_pull = time.perf_counter() - t0
        assert res.objects >= args.objects and noop.objects == 0 and got.objects >= args.objects
        report(
            [
                ("objects", f"{args.objects:,} x {args.size:,} B = {mb:.0f} MB, {args.jobs} jobs"),
                ("floor fsspec put", f"{t_put:.2f} s ({mb / t_put:.0f} MB/s)"),
                (
                    "cas push",
                    f"{t_push:.2f} s ({mb / t_push:.0f} MB/s)  ratio {t_put / t_push:.2f} "
                    "(target >= 0.8)",
                ),
                ("floor fsspec get", f"{t_get:.2f} s ({mb / t_get:.0f} MB/s)"),
                (
                    "cas pull (verified)",
                    f"{t_pull:.2f} s ({mb / t_pull:.0f} MB/s)  ratio "
                    f"{t_get / t_pull:.2f} (target >= 0.8)",
                ),
                ("no-op push", f"{t_noop:.2f} s (target <= 5 s)"),
            ]
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
        server.stop()


if __name__ == "__main__":
    main()
