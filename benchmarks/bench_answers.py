"""What the LLM answers journal (castore.answers) keeps on disk while a run goes on:
10,000 rows through TextGeneration against a local OpenAI-compatible server (in its own
process, ~2 kB answers, 32 requests at once, 4 batches of 50 in flight), the journal's
peak bytes in tmp/ sampled every 10 ms, for segments of 1 MiB (the default) and 8 MiB and
without segments (one file for the whole run, as before segments: its peak is every
answer the run received, the floor it is compared with). Each a run in a new store,
interleaved, min / median of --repeat; and how fast a resume reads what is left (the
journal lines scanned per second), which is what a resume after kill -9 pays per
answer left.

    python benchmarks/bench_answers.py [--rows 10000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import datasets  # noqa: F401 - imported up front: its import is not what is measured
from _util import report

from castore import Pipeline, answers
from castore.llms import OpenAILLM
from castore.steps import LoadDataFromDicts, TextGeneration
from castore.store import Store

SERVER = (
    "import sys, time; sys.path.insert(0, sys.argv[1]); from tests.llm_server import LLMServer; "
    "s = LLMServer(latency=0.005).start(); "
    "s.reply = lambda b: 'x' * 2000 + b['messages'][-1]['content']; "
    "print(s.base_url, flush=True); time.sleep(3600)"
)
WHOLE = 1 << 62  # no segments: the journal is one file until the run ends


def journal_bytes(tmp: Path) -> int:
    total = 0
    try:
        with os.scandir(tmp) as it:
            for e in it:
                if e.name.startswith(answers.PREFIX):
                    try:
                        total += e.stat().st_size
                    except FileNotFoundError:
                        pass
    except FileNotFoundError:
        pass
    return total


def run(base_url: str, cache: Path, rows: int, segment: int) -> tuple[float, int]:
    """(wall seconds, peak journal bytes) of one run."""
    answers.SEGMENT_BYTES = segment
    llm = OpenAILLM(model="bench", base_url=base_url, max_concurrent_requests=32)
    with Pipeline(name="answers") as p:
        LoadDataFromDicts(
            data=[{"instruction": f"q {i}"} for i in range(rows)], batch_size=500
        ) >> TextGeneration(llm=llm, input_batch_size=50, concurrency=4)
    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], journal_bytes(cache / "tmp"))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    p.run(cache_dir=cache, quiet=True)
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    return wall, peak[0]


def scan_rate(work: Path, lines: int) -> float:
    """Journal lines a resume reads per second (Answers._scan, ~2 kB answers)."""
    store = Store(work / "scan")
    dead = answers.Answers(store, "dead", "s" * 64)
    answers.SEGMENT_BYTES = WHOLE
    for i in range(lines):
        key = answers.request_key("u", {"q": i})
        assert key is not None
        dead.record(key, "x" * 2000 + str(i))
    dead.close(finished=False)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        found = answers.Answers(store, "next", "s" * 64)._scan()
        best = min(best, time.perf_counter() - t0)
        assert len(found) == lines
    return lines / best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    root = str(Path(__file__).resolve().parent.parent)
    proc = subprocess.Popen([sys.executable, "-c", SERVER, root], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    base_url = proc.stdout.readline().strip()
    work = Path(tempfile.mkdtemp(prefix="bench-answers-"))
    sizes = {"one file (no segments)": WHOLE, "1 MiB segments": 1 << 20, "8 MiB": 8 << 20}
    walls: dict[str, list[float]] = {k: [] for k in sizes}
    peaks: dict[str, list[int]] = {k: [] for k in sizes}
    try:
        run(base_url, work / "warm", 200, WHOLE)  # imports, first connections
        for i in range(args.repeat):
            for name, size in sizes.items():
                wall, peak = run(base_url, work / f"{i}-{size}", args.rows, size)
                walls[name].append(wall)
                peaks[name].append(peak)
        rate = scan_rate(work, 20_000)
        floor = statistics.median(peaks["one file (no segments)"])
        lines = [("load average", " ".join(f"{x:.2f}" for x in os.getloadavg()))]
        for name in sizes:
            w, pk = walls[name], peaks[name]
            lines.append(
                (
                    f"{args.rows:,} answers, {name}",
                    f"wall min {min(w):.2f} s median {statistics.median(w):.2f} s; journal "
                    f"peak min {min(pk) / 1e6:.1f} MB median {statistics.median(pk) / 1e6:.1f} "
                    f"MB = {statistics.median(pk) / floor:.2f} of every answer's bytes",
                )
            )
        lines.append(("resume: journal lines read per second", f"{rate:,.0f} (~2 kB each)"))
        report(lines)
    finally:
        proc.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
