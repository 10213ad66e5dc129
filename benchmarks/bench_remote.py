"""Push and pull of 2,000 objects (~200 MB) to an S3-compatible server on 127.0.0.1, vs
the floor of fsspec put/get of the same files with the same parallelism, measured in the
same repetition; and a no-op push. Min / median of --repeat, with the load average.

    python benchmarks/bench_remote.py [--objects 2000] [--size 100000] [--jobs 8] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _util import fake_run, report, timed

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
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a log line per request
    server = S3Server()
    server.start()
    os.environ.update(server.env)
    import fsspec.config

    fsspec.config.conf["s3"] = {"endpoint_url": server.endpoint}
    work = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    r: dict[str, list[float]] = {k: [] for k in ("put", "get", "push", "noop", "pull")}
    try:
        store = Store(work / "a")
        oids = build(store, args.objects, args.size)
        mb = args.objects * args.size / 1e6
        local = [store.path_of(o) for o in oids]
        for i in range(args.repeat):
            # Floor: the same files through fsspec, same parallelism, to another bucket.
            floor_url = server.new_bucket()
            fs = Remote(floor_url).fs
            remote_paths = [f"{floor_url[5:]}/floor/{o}" for o in oids]
            r["put"].append(
                timed(lambda fs=fs, to=remote_paths: fs.put(local, to, batch_size=args.jobs))
            )
            dl = work / f"dl-{i}"
            dl.mkdir()
            targets = [str(dl / o) for o in oids]
            r["get"].append(
                timed(
                    lambda fs=fs, src=remote_paths, to=targets: fs.get(
                        src, to, batch_size=args.jobs
                    )
                )
            )
            remote = Remote(server.new_bucket())
            res = noop = got = None

            def do_push(remote=remote) -> None:
                nonlocal res
                res = push(store, remote, jobs=args.jobs)

            def do_noop(remote=remote) -> None:
                nonlocal noop
                noop = push(store, remote, jobs=args.jobs)

            b = Store(work / f"b-{i}")

            def do_pull(remote=remote, b=b) -> None:
                nonlocal got
                got = pull(b, remote, jobs=args.jobs)

            r["push"].append(timed(do_push))
            r["noop"].append(timed(do_noop))
            r["pull"].append(timed(do_pull))
            assert res and noop and got
            assert res.objects >= args.objects and noop.objects == 0
            assert got.objects >= args.objects
            shutil.rmtree(dl)
            shutil.rmtree(b.root)

        def mm(v: list[float]) -> str:
            return (
                f"min {min(v):.2f} s  median {statistics.median(v):.2f} s "
                f"({mb / statistics.median(v):.0f} MB/s)"
            )

        def ratio(floor: list[float], ours: list[float]) -> str:
            return (
                f"floor/castore min/min {min(floor) / min(ours):.2f}  median/median "
                f"{statistics.median(floor) / statistics.median(ours):.2f}"
            )

        report(
            [
                ("objects", f"{args.objects:,} x {args.size:,} B = {mb:.0f} MB, {args.jobs} jobs"),
                ("load average", " ".join(f"{x:.2f}" for x in os.getloadavg())),
                ("floor fsspec put", mm(r["put"])),
                ("cas push", f"{mm(r['push'])}  {ratio(r['put'], r['push'])} (target >= 0.8)"),
                ("floor fsspec get", mm(r["get"])),
                (
                    "cas pull (verified)",
                    f"{mm(r['pull'])}  {ratio(r['get'], r['pull'])} (target >= 0.9)",
                ),
                ("no-op push", mm(r["noop"]) + " (target <= 5 s)"),
            ]
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
        server.stop()


if __name__ == "__main__":
    main()
