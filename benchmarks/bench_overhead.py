"""Per-batch overhead and I/O-bound concurrency (issue 16), each against a floor measured
in the same repetition, interleaved, min / median of --repeat:

- cold at 2 ms of work per row: 2,000 rows, the same three steps with the middle one
  sleeping 2 ms per row (the stand-in for an LLM call); floor: the plain loop with the
  same sleeps.
- anchor at 0 ms of work: 20,000 rows, LoadDataFromDicts -> a step that adds a column ->
  a cheap post step, batch 50 (400 batches per step, 1,200 in all); floor: a plain loop
  doing the same work and writing one Parquet file.
- I/O-bound: 2,000 rows, batch 10, a step sleeping 20 ms per batch with concurrency 8;
  floor: the same 200 sleeps on a plain thread pool of 8.
- leases taken (a run alone on its store should take none) and the store's bytes and
  files per batch and step after the anchor run, against the final data as one Parquet;
  the same for the anchor with prompts that compress like prose (once).
- peak RSS of the cold anchor run in a fresh process, against the plain loop's.
- the anchor run again on its store (a finished run, replayed) against its cold run.
- once more with its ref removed (every batch planned and found, not replayed).

    python benchmarks/bench_overhead.py [--repeat 5]

To measure an older castore with this same file: PYTHONPATH=<its checkout> python ...
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pyarrow as pa
import pyarrow.parquet as pq
from _util import report, timed

import castore
from castore import Pipeline, StepInput, step
from castore.steps import LoadDataFromDicts
from castore.store import Store

ROWS, BATCH = 20_000, 50
SLOW_ROWS, SLOW_DELAY = 2_000, 0.002
IO_ROWS, IO_BATCH, IO_CONC, IO_DELAY = 2_000, 10, 8, 0.02


@step(inputs=["prompt"], outputs=["generation"])
def Generate(inputs: StepInput):
    return [{**r, "generation": r["prompt"][::-1]} for r in inputs]


@step(inputs=["prompt"], outputs=["generation"])
def SlowGenerate(inputs: StepInput):
    out = []
    for r in inputs:
        time.sleep(SLOW_DELAY)  # one simulated LLM call per row
        out.append({**r, "generation": r["prompt"][::-1]})
    return out


@step(inputs=["generation"], outputs=["length"])
def Post(inputs: StepInput):
    return [{**r, "length": len(r["generation"])} for r in inputs]


@step(inputs=["x"], outputs=["y"])
def Sleepy(inputs: StepInput):
    time.sleep(IO_DELAY)  # one simulated LLM call per batch
    return [{**r, "y": r["x"] + 1} for r in inputs]


def anchor_rows() -> list[dict]:
    return [{"id": i, "prompt": f"prompt {i}: " + "word " * (10 + i % 20)} for i in range(ROWS)]


def text_rows() -> list[dict]:
    """The anchor's rows with prompts that compress like prose: 40-79 words drawn from
    5,000 made-up words by a Zipf law (the anchor's "word word ..." rows compress 9x as
    one Parquet file, so there every per-batch and per-run cost weighs more)."""
    rng = random.Random(7)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["".join(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(5000)]
    weights = [1 / (rank + 1) for rank in range(len(vocab))]
    return [
        {"id": i, "prompt": " ".join(rng.choices(vocab, weights, k=40 + i % 40))}
        for i in range(ROWS)
    ]


def anchor_floor(rows: list[dict], out: Path, delay: float = 0.0) -> None:
    done = []
    for start in range(0, len(rows), BATCH):
        gen = []
        for r in rows[start : start + BATCH]:
            if delay:
                time.sleep(delay)
            gen.append({**r, "generation": r["prompt"][::-1]})
        done.extend({**r, "length": len(r["generation"])} for r in gen)
    pq.write_table(pa.Table.from_pylist(done), out)


def anchor(rows: list[dict], cache: Path, slow: bool = False) -> None:
    middle = SlowGenerate if slow else Generate
    with Pipeline(name="anchor") as p:
        (
            LoadDataFromDicts(data=rows, batch_size=BATCH)
            >> middle(name="generate", input_batch_size=BATCH)
            >> Post(name="post", input_batch_size=BATCH)
        )
    p.execute(cache_dir=cache, quiet=True)


def io_floor() -> None:
    with ThreadPoolExecutor(IO_CONC) as pool:
        list(pool.map(lambda _: time.sleep(IO_DELAY), range(IO_ROWS // IO_BATCH)))


def io_run(cache: Path) -> None:
    with Pipeline(name="io") as p:
        LoadDataFromDicts(data=[{"x": i} for i in range(IO_ROWS)], batch_size=100) >> Sleepy(
            name="sleepy", input_batch_size=IO_BATCH, concurrency=IO_CONC
        )
    p.execute(cache_dir=cache, quiet=True)


def mm(v: list[float]) -> str:
    return f"min {min(v):.3f} s  median {statistics.median(v):.3f} s"


def ratio(a: list[float], b: list[float]) -> str:
    med = statistics.median(a) / statistics.median(b)
    return f"min/min {min(a) / min(b):.2f}  median/median {med:.2f}"


def tree(root: Path) -> tuple[int, int, int, int]:
    """(bytes, bytes on disk, paths, files): a hard link is a path, not a file or bytes."""
    paths = [p for p in root.rglob("*") if p.is_file()]
    inodes = {(s.st_dev, s.st_ino): s for s in (p.stat() for p in paths)}
    return (
        sum(s.st_size for s in inodes.values()),
        sum(s.st_blocks * 512 for s in inodes.values()),
        len(paths),
        len(inodes),
    )


MEMORY_CHILD = """
import resource, sys, tempfile
from pathlib import Path
sys.path.insert(0, sys.argv[2])
if sys.argv[1] == "floor":  # the loop and what it imports (pyarrow), nothing of castore's
    import pyarrow as pa, pyarrow.parquet as pq
    rows = [{"id": i, "prompt": f"prompt {i}: " + "word " * (10 + i % 20)} for i in range(20_000)]
    done = []
    for start in range(0, len(rows), 50):
        gen = [{**r, "generation": r["prompt"][::-1]} for r in rows[start : start + 50]]
        done.extend({**r, "length": len(r["generation"])} for r in gen)
    pq.write_table(pa.Table.from_pylist(done), Path(tempfile.mkdtemp()) / "floor.parquet")
else:  # castore imports what it needs (not `datasets`: a run does not)
    import bench_overhead as b
    b.anchor(b.anchor_rows(), Path(tempfile.mkdtemp()) / "cache")
# VmHWM is this process's own peak (a new address space at exec); ru_maxrss is not: Linux
# keeps it across execve, so it would report the parent's size when the parent is larger.
try:
    with open("/proc/self/status") as f:
        print(next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024)
except OSError:
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def peak_mib(kind: str) -> float:
    """Peak RSS of the cold anchor run (or its floor) in a fresh process, MiB."""
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, kind, str(Path(__file__).resolve().parent)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return float(out.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    import datasets  # noqa: F401 - imported up front: its import is not what the timings measure

    work = Path(tempfile.mkdtemp(prefix="castore-bench-overhead-"))
    leases = [0]
    real_lease = Store.lease

    def counting_lease(self, *a, **k):
        leases[0] += 1
        return real_lease(self, *a, **k)

    Store.lease = counting_lease  # type: ignore[method-assign]
    try:
        rows = anchor_rows()
        slow_rows = rows[:SLOW_ROWS]
        r: dict[str, list[float]] = {
            k: []
            for k in (
                *("floor", "cas", "rerun", "hits", "io_floor", "io"),
                *("mem_floor", "mem", "sf", "slow"),
            )
        }
        for i in range(args.repeat):
            r["mem_floor"].append(peak_mib("floor"))
            r["mem"].append(peak_mib("castore"))
            r["floor"].append(timed(lambda: anchor_floor(rows, work / "floor.parquet")))
            leases[0] = 0
            r["cas"].append(timed(lambda i=i: anchor(rows, work / f"anchor-{i}")))
            # The same pipeline again on its store: a finished run, replayed whole.
            r["rerun"].append(timed(lambda i=i: anchor(rows, work / f"anchor-{i}")))
            # Again with its ref removed: no replay, every batch planned and found (what a
            # resume or a run after an upstream change that kept the objects costs).
            if i == 0:  # the store as cold run + replay left it
                footprint = tree(work / f"anchor-{i}")
            store = Store(work / f"anchor-{i}")
            for name, sig, _ in store.list_refs():
                store.delete_ref(name, sig)
            r["hits"].append(timed(lambda i=i: anchor(rows, work / f"anchor-{i}")))
            anchor_leases = leases[0]
            r["sf"].append(timed(lambda: anchor_floor(slow_rows, work / "sf.parquet", SLOW_DELAY)))
            r["slow"].append(timed(lambda i=i: anchor(slow_rows, work / f"slow-{i}", slow=True)))
            r["io_floor"].append(timed(io_floor))
            r["io"].append(timed(lambda i=i: io_run(work / f"io-{i}")))
        batch_steps = 3 * ROWS // BATCH
        prose = text_rows()
        anchor(prose, work / "prose")
        anchor_floor(prose, work / "prose.parquet")
        prose_size, prose_disk, _, _ = tree(work / "prose")
        prose_floor = (work / "prose.parquet").stat().st_size
        size, disk, paths, files = footprint
        floor_size = (work / "floor.parquet").stat().st_size
        per_batch = [(c - f) / batch_steps * 1e3 for c, f in zip(r["cas"], r["floor"], strict=True)]
        report(
            [
                ("castore", f"{castore.__file__}"),
                ("load average", " ".join(f"{x:.2f}" for x in os.getloadavg())),
                ("cold 2,000 rows x 2 ms: floor (loop + one Parquet)", mm(r["sf"])),
                ("cold 2,000 rows x 2 ms: castore", mm(r["slow"])),
                (
                    "cold 2,000 rows x 2 ms: castore / floor",
                    ratio(r["slow"], r["sf"]) + " (target <= 1.05)",
                ),
                ("anchor 0 ms: floor (loop + one Parquet)", mm(r["floor"])),
                ("anchor 0 ms: castore (1,200 batch-steps)", mm(r["cas"])),
                ("anchor 0 ms: castore / floor", ratio(r["cas"], r["floor"]) + " (target <= 2.5)"),
                (
                    "anchor re-run (finished, replayed) / cold",
                    f"{mm(r['rerun'])}; min/min {min(r['rerun']) / min(r['cas']):.1%}  median/"
                    f"median {statistics.median(r['rerun']) / statistics.median(r['cas']):.1%}"
                    " (target <= 2 %)",
                ),
                (
                    "anchor every batch a hit (not replayed) / cold",
                    f"{mm(r['hits'])}; min/min {min(r['hits']) / min(r['cas']):.1%}  median/"
                    f"median {statistics.median(r['hits']) / statistics.median(r['cas']):.1%}",
                ),
                (
                    "anchor 0 ms: per batch and step",
                    f"min {min(per_batch):.2f} ms  median {statistics.median(per_batch):.2f} ms"
                    " (target <= 1)",
                ),
                ("anchor 0 ms: leases taken (run alone)", str(anchor_leases)),
                (
                    "anchor store (cold run + replay)",
                    f"{size / 1e6:.2f} MB ({disk / 1e6:.2f} MB on disk) vs the final data as one "
                    f"Parquet {floor_size / 1e6:.2f} MB: {size / floor_size:.2f}x "
                    f"({disk / floor_size:.2f}x on disk), {files:,} files = "
                    f"{files / batch_steps:.2f} per batch and step (target <= 1.1); "
                    f"{paths:,} paths with the run folder's hard links",
                ),
                (
                    "anchor store, prose-like prompts (one cold run)",
                    f"{prose_size / 1e6:.2f} MB ({prose_disk / 1e6:.2f} MB on disk) vs the final "
                    f"data as one Parquet {prose_floor / 1e6:.2f} MB: "
                    f"{prose_size / prose_floor:.2f}x ({prose_disk / prose_floor:.2f}x on disk)"
                    " (target <= 2)",
                ),
                (
                    "anchor peak RSS: floor / castore",
                    f"{statistics.median(r['mem_floor']):.0f} / {statistics.median(r['mem']):.0f}"
                    f" MiB (medians; castore min {min(r['mem']):.0f}) = "
                    f"{statistics.median(r['mem']) / statistics.median(r['mem_floor']):.2f}"
                    " (target <= 1.2)",
                ),
                ("io-bound: floor (thread pool of 8)", mm(r["io_floor"])),
                ("io-bound: castore, concurrency 8", mm(r["io"])),
                (
                    "io-bound: floor / castore",
                    f"min/min {min(r['io_floor']) / min(r['io']):.2f}  median/median "
                    f"{statistics.median(r['io_floor']) / statistics.median(r['io']):.2f}"
                    " (target >= 0.9)",
                ),
            ]
        )
    finally:
        Store.lease = real_lease  # type: ignore[method-assign]
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
