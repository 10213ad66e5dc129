"""LLM throughput against a local OpenAI-compatible server with a fixed 50 ms latency:
1,000 rows with 32 concurrent requests vs the ideal 32 / 50 ms; and concurrency 1.

    python benchmarks/bench_llm.py [--rows 1000] [--latency 0.05] [--concurrent 32]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import datasets  # noqa: F401 - imported up front: its import is not LLM throughput
from _util import report

from castore import Pipeline
from castore.llms import OpenAILLM
from castore.steps import LoadDataFromDicts, TextGeneration


class _Remote:
    def __init__(self, base_url: str, proc) -> None:
        self.base_url = base_url
        self.proc = proc

    def stop(self) -> None:
        self.proc.kill()


def run(server: _Remote, work: Path, rows: int, concurrent: int) -> float:
    llm = OpenAILLM(model="bench", base_url=server.base_url, max_concurrent_requests=concurrent)
    with Pipeline(name=f"llm-{concurrent}") as p:
        LoadDataFromDicts(
            data=[{"instruction": f"q {i} {concurrent}"} for i in range(rows)], batch_size=100
        ) >> TextGeneration(llm=llm, input_batch_size=max(2 * concurrent, 8), concurrency=4)
    t0 = time.perf_counter()
    p.run(cache_dir=work / f"c{concurrent}", quiet=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--concurrent", type=int, default=32)
    args = ap.parse_args()
    # The server runs in its own process: in this one it would share the GIL with the
    # client and cap the rate at what one core can serve for both.
    import subprocess

    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; sys.path.insert(0, sys.argv[2]); from tests.llm_server import "
            "LLMServer; s = LLMServer(latency=float(sys.argv[1])).start(); "
            "print(s.base_url, flush=True); time.sleep(3600)",
            str(args.latency),
            str(Path(__file__).resolve().parent.parent),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    server = _Remote(proc.stdout.readline().strip(), proc)
    work = Path(tempfile.mkdtemp(prefix="bench-llm-"))
    try:
        run(server, work, 64, args.concurrent + 1)  # warm-up: imports, first connections
        t = run(server, work, args.rows, args.concurrent)
        n1 = max(20, args.rows // 20)
        t1 = run(server, work, n1, 1)
        ideal = args.concurrent / args.latency
        rate, rate1 = args.rows / t, n1 / t1
        report(
            [
                ("server", f"127.0.0.1, {args.latency * 1e3:.0f} ms per request"),
                (
                    f"{args.rows} rows, {args.concurrent} concurrent",
                    f"{t:.2f} s = {rate:.0f} req/s vs ideal {ideal:.0f}: ratio {rate / ideal:.2f} "
                    "(target >= 0.8)",
                ),
                (
                    f"{n1} rows, concurrency 1",
                    f"{t1:.2f} s = {rate1:.1f} req/s vs ideal "
                    f"{1 / args.latency:.0f}: ratio {rate1 * args.latency:.2f}",
                ),
                ("speed-up from concurrency", f"{rate / rate1:.1f}x"),
            ]
        )
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
