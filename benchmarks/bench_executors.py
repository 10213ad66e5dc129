"""A CPU-bound step (hashing 200k rows) on threads vs processes vs Ray on this machine,
plus Ray's fixed start-up cost. Floor: the same hashing in a plain loop.

    python benchmarks/bench_executors.py [--rows 200000] [--rounds 10]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import datasets  # noqa: F401 - imported up front: its import is not executor cost
import pyarrow as pa
from _util import report

from castore import GeneratorStep, Pipeline, StepInput, StepOutput, step

ROUNDS = 40


class Texts(GeneratorStep):
    n_rows: int

    def process(self, offset: int = 0):
        for start in range(offset, self.n_rows, self.batch_size):
            end = min(start + self.batch_size, self.n_rows)
            yield pa.table({"text": [f"row {i}" for i in range(start, end)]})


@step(inputs=["text"], outputs=["digest"])
def HashRows(inputs: StepInput, rounds: int = 10) -> StepOutput:
    out = []
    for row in inputs:
        h = row["text"].encode()
        for _ in range(rounds):
            h = hashlib.sha256(h).digest()
        out.append({"text": row["text"], "digest": h.hex()})
    yield out


def floor(rows: int, rounds: int) -> float:
    t0 = time.perf_counter()
    for i in range(rows):
        h = f"row {i}".encode()
        for _ in range(rounds):
            h = hashlib.sha256(h).digest()
    return time.perf_counter() - t0


def run(executor: str, rows: int, rounds: int, work: Path) -> float:
    with Pipeline(name=f"cpu-{executor}") as p:
        Texts(n_rows=rows, batch_size=5000) >> HashRows(
            rounds=rounds, input_batch_size=5000, concurrency=2
        )
    t0 = time.perf_counter()
    p.run(cache_dir=work / executor, executor=executor, quiet=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-exec-"))
    try:
        t_floor = floor(args.rows, args.rounds)
        rows = [("floor: plain loop, one core", f"{t_floor:.2f} s")]
        for executor in ("threads", "processes"):
            t = run(executor, args.rows, args.rounds, work)
            rows.append((executor, f"{t:.2f} s = {t_floor / t:.2f}x the one-core floor"))
        import ray

        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray.get(ray.remote(lambda: 1).remote())
        t_start = time.perf_counter() - t0
        t = run("ray", args.rows, args.rounds, work)
        rows.append(("ray (local, 2 CPUs)", f"{t:.2f} s = {t_floor / t:.2f}x the floor"))
        rows.append(("ray start-up (init + first task)", f"{t_start:.2f} s, paid once"))
        ray.shutdown()
        report(rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
