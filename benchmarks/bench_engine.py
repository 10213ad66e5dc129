"""Engine overhead, I/O-bound throughput, re-run cost and memory, as ratios against
floors measured in the same run.

    python benchmarks/bench_engine.py [--repeat 5] [--skip-memory]   # min / median of --repeat
    python benchmarks/bench_engine.py --memory-child ROWS   # (internal) one memory run
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

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
import datasets  # noqa: F401 - imported up front: its ~0.5 s import is not engine overhead
from _util import peak_rss_mib, report, timed

from castore import GeneratorStep, Pipeline, StepInput, StepOutput, step
from castore.steps import LoadDataFromDicts


@step(inputs=["x"], outputs=["y"])
def Trivial(inputs: StepInput) -> StepOutput:
    yield [{**r, "y": r["x"] + 1} for r in inputs]


@step(inputs=["x"], outputs=["y"])
def Sleepy(inputs: StepInput, delay: float = 0.02) -> StepOutput:
    time.sleep(delay)  # one simulated LLM call per batch
    yield [{**r, "y": r["x"] + 1} for r in inputs]


class Counter(GeneratorStep):
    """Rows made on the fly, so a million-row run holds no input list in memory."""

    n_rows: int

    def process(self, offset: int = 0):
        for start in range(offset, self.n_rows, self.batch_size):
            end = min(start + self.batch_size, self.n_rows)
            yield pa.table({"x": pa.array(range(start, end), pa.int64())})


def mm(v: list[float], scale: float = 1e3, unit: str = "ms") -> str:
    return f"min {min(v) * scale:.1f} {unit}  median {statistics.median(v) * scale:.1f} {unit}"


def overhead(work: Path, repeat: int) -> list[tuple[str, str]]:
    rows, batch = 20_000, 50
    data = [{"x": i} for i in range(rows)]

    def floor() -> None:
        out = []
        for start in range(0, rows, batch):
            out.extend({**r, "y": r["x"] + 1} for r in data[start : start + batch])
        pq.write_table(pa.Table.from_pylist(out), work / "floor.parquet")

    t_floor, t_cas = [], []
    for i in range(repeat):
        t_floor.append(timed(floor))
        with Pipeline(name="overhead") as p:
            LoadDataFromDicts(data=data, batch_size=batch) >> Trivial(input_batch_size=batch)
        t_cas.append(timed(lambda p=p, i=i: p.run(cache_dir=work / f"overhead-{i}", quiet=True)))
    batches = rows // batch
    per_batch = [(c - f) / batches for c, f in zip(t_cas, t_floor, strict=True)]
    return [
        ("overhead: floor (loop + one Parquet)", mm(t_floor)),
        ("overhead: castore (400 gen + 400 step batches)", mm(t_cas)),
        ("overhead: per step batch", mm(per_batch) + " (target <= 2 ms)"),
    ]


def _steady_rate(store_root: Path, step_name: str) -> float:
    """Batches per second of one step between its first and last finished batch, from
    the action entries' timestamps (start-up and materialization excluded)."""
    from castore.store import Store

    store = Store(store_root)
    times = sorted(
        store.get_action(k).created.timestamp()
        for k in store.iter_actions()
        if store.get_action(k).info.get("step") == step_name
    )
    return (len(times) - 1) / (times[-1] - times[0])


def io_bound(work: Path, repeat: int) -> list[tuple[str, str]]:
    """Per repetition, in a new store: the single-batch rate, the cold run at concurrency
    8, then the finished pipeline run again (the first re-run, and four more)."""
    rows, batch, conc, delay = 2_000, 10, 8, 0.02
    data = [{"x": i} for i in range(rows)]

    def make(n_rows: int, concurrency: int) -> Pipeline:
        with Pipeline(name=f"io{n_rows}-{concurrency}") as p:
            LoadDataFromDicts(data=data[:n_rows], batch_size=100) >> Sleepy(
                input_batch_size=batch, concurrency=concurrency, delay=delay
            )
        return p

    r: dict[str, list[float]] = {k: [] for k in ("single", "steady", "cold", "first", "later")}
    computed = 0
    for i in range(repeat):
        make(300, 1).run(cache_dir=work / f"io1-{i}", quiet=True)
        r["single"].append(_steady_rate(work / f"io1-{i}", "sleepy"))
        cache = work / f"io-{i}"
        r["cold"].append(
            timed(lambda cache=cache: make(rows, conc).run(cache_dir=cache, quiet=True))
        )
        r["steady"].append(_steady_rate(cache, "sleepy"))
        for j in range(5):
            t0 = time.perf_counter()
            ds = make(rows, conc).run(cache_dir=cache, quiet=True)
            r["first" if j == 0 else "later"].append(time.perf_counter() - t0)
            computed += sum(s.batches_computed for s in ds.run.stats.values())
    single = statistics.median(r["single"])
    ideal = (rows / batch) / (conc * single)
    steady = [s / (conc * single) for s in r["steady"]]

    def share(v: list[float]) -> str:
        return (
            f"{mm(v)}; min/min {min(v) / min(r['cold']):.1%}  median/median "
            f"{statistics.median(v) / statistics.median(r['cold']):.1%} of cold (target <= 2 %)"
        )

    return [
        (
            "io-bound: single-batch rate (concurrency 1)",
            f"median {single:.1f} batches/s (pure sleep would be {1 / delay:.0f})",
        ),
        (
            "io-bound: steady rate at concurrency 8 / 8 x single",
            f"min {min(steady):.2f}  median {statistics.median(steady):.2f} (target >= 0.8)",
        ),
        (
            "io-bound: whole run incl. start-up/finish",
            f"{mm(r['cold'])} vs ideal {ideal * 1e3:.0f} ms: ideal / median "
            f"{ideal / statistics.median(r['cold']):.2f}",
        ),
        ("re-run of the finished pipeline, first after cold", share(r["first"])),
        ("re-run of the finished pipeline, 2nd to 5th", share(r["later"])),
        ("re-runs: batches computed", str(computed)),
    ]


def memory_child(rows: int, work: Path) -> None:
    with Pipeline(name=f"mem{rows}") as p:
        Counter(n_rows=rows, batch_size=500) >> Trivial(input_batch_size=500)
    p.run(cache_dir=work, quiet=True)
    print(json.dumps({"rows": rows, "peak_rss_mib": peak_rss_mib()}))


def memory(work: Path) -> list[tuple[str, str]]:
    peaks = {}
    for rows in (100_000, 1_000_000):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--memory-child",
                str(rows),
                "--work",
                str(work / f"mem{rows}"),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        peaks[rows] = json.loads(out.strip().splitlines()[-1])["peak_rss_mib"]
    ratio = peaks[1_000_000] / peaks[100_000]
    return [
        ("memory: peak RSS 100k rows", f"{peaks[100_000]:.0f} MiB"),
        (
            "memory: peak RSS 1M rows",
            f"{peaks[1_000_000]:.0f} MiB  ratio {ratio:.2f} (target <= 1.5)",
        ),
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--memory-child", type=int)
    ap.add_argument("--work")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, Path(args.work))
        return
    work = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    try:
        rows = [("load average", " ".join(f"{x:.2f}" for x in os.getloadavg()))]
        rows += overhead(work, args.repeat)
        rows += io_bound(work, args.repeat)
        if not args.skip_memory:
            rows += memory(work)
        report(rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
