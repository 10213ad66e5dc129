"""Offline batch generation (issue 20): 10,000 rows through one TextGeneration with
`offline_batch=True` against the test server's Batch API (tests/batch_api.py), each
step a `cas run` process as a user runs it:

- cold run: batch jobs created, Batch API calls, live requests, wall time (it ends
  `waiting`);
- kill -9 inside the create call, before the job exists and after it exists but before
  its id reached castore, then the next run: jobs created in all (must be 1);
- the run after the job completed: wall time from "the provider finished" to the
  dataset, against a floor measured in the same repetition (read the job's output file
  as JSON lines and write the answers as one Parquet file with pyarrow alone);
- a re-run: jobs and requests (must be 0 and 0);
- 1 % more rows while the job runs, then the run after both jobs completed: jobs
  created (must be 2), requests in the second job (must be the new rows) and requests
  answered in all (must be the rows: none paid twice).

    python benchmarks/bench_batchjobs.py [--rows 10000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
import pyarrow as pa  # noqa: E402 - imported before the floor is timed
import pyarrow.parquet as pq  # noqa: E402
from _util import report  # noqa: E402

from tests.llm_server import LLMServer  # noqa: E402

PIPELINE = """
import os
from castore import Pipeline
from castore.llms import OpenAILLM
from castore.steps import LoadDataFromDicts, TextGeneration

N = int(os.environ["BENCH_ROWS"]) + int(os.environ.get("BENCH_EXTRA", "0"))
with Pipeline(name="offline-bench") as pipeline:
    LoadDataFromDicts(data=[{"instruction": f"question {i}"} for i in range(N)],
                      batch_size=1000) >> TextGeneration(
        llm=OpenAILLM(model="m", base_url=os.environ["CASTORE_TEST_LLM_URL"],
                      offline_batch=True, backoff=0.01))  # its default batch: one job
"""


def cas_run(cache: Path, pipeline: Path, env: dict[str, str]) -> subprocess.Popen:
    """`cas run` of the pipeline as its own process, as a user starts it."""
    argv = [sys.executable, "-m", "castore.cli", "--cache-dir", str(cache), "run", str(pipeline)]
    return subprocess.Popen(
        [*argv, "-q"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def cas(cache: Path, pipeline: Path, env: dict[str, str]) -> tuple[int, float]:
    t0 = time.perf_counter()
    code = cas_run(cache, pipeline, env).wait(timeout=600)
    return code, time.perf_counter() - t0


def floor(server: LLMServer, out: Path) -> float:
    """Read the completed job's output file and write its answers as Parquet."""
    t0 = time.perf_counter()
    job = server.batch_api.jobs()[-1]
    lines = server.batch_api.files[job["output_file_id"]].decode().splitlines()
    texts = [json.loads(x)["response"]["body"]["choices"][0]["message"]["content"] for x in lines]
    pq.write_table(pa.table({"generation": texts}), out)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="castore-bench-jobs-"))
    pipeline = work / "offline.py"
    pipeline.write_text(PIPELINE)
    figures: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        figures.setdefault(name, []).append(value)

    try:
        for _ in range(args.repeat):
            for phase in ("none", "before", "after", "grown"):
                server = LLMServer().start()
                api = server.batch_api
                env = {
                    **os.environ,
                    "PYTHONPATH": str(REPO),
                    "BENCH_ROWS": str(args.rows),
                    "CASTORE_TEST_LLM_URL": server.base_url,
                    "OPENAI_API_KEY": "sk-bench",
                }
                cache = work / f"cache-{phase}"
                shutil.rmtree(cache, ignore_errors=True)
                if phase != "none":
                    # The first run is killed inside the create call.
                    proc = cas_run(cache, pipeline, env)

                    def kill(at: str, proc=proc, phase=phase) -> None:
                        if at == phase:
                            os.kill(proc.pid, signal.SIGKILL)
                            time.sleep(0.2)

                    api.on_create = kill
                    proc.wait(timeout=600)
                    api.on_create = None
                code, cold = cas(cache, pipeline, env)
                assert code == 75, f"expected waiting, got {code}"
                calls_cold = api.calls
                if phase == "grown":  # rows added while the job runs
                    env["BENCH_EXTRA"] = str(args.rows // 100)
                    code, _ = cas(cache, pipeline, env)
                    assert code == 75, f"expected waiting, got {code}"
                    add(
                        "grown: requests in the second job",
                        api.jobs()[-1]["request_counts"]["total"],
                    )
                api.release()
                code, collect = cas(cache, pipeline, env)
                assert code == 0, f"collect failed: {code}"
                jobs, requests_live = api.creates, server.requests
                before = api.calls
                code, rerun = cas(cache, pipeline, env)
                assert code == 0
                add(f"jobs created ({phase})", jobs)
                if phase == "grown":
                    add("grown: requests answered in all jobs", api.answered)
                if phase == "none":
                    add("cold run to waiting, s", cold)
                    add("Batch API calls of the cold run", calls_cold)
                    add("collect run (job done -> dataset), s", collect)
                    add("floor: output file -> Parquet (pyarrow), s", floor(server, work / "f.pq"))
                    add("live requests", requests_live)
                    add("re-run: jobs", api.creates - jobs)
                    add("re-run: Batch API calls", api.calls - before)
                    add("re-run, s", rerun)
                server.stop()
        lines = [
            ("rows", f"{args.rows:,}, loader batches of 1,000, the LLM step's default batch"),
            ("load average", " ".join(f"{x:.2f}" for x in os.getloadavg())),
        ]
        for name, v in figures.items():
            lines.append((name, f"min {min(v):.3f}  median {statistics.median(v):.3f}"))
        c = figures["collect run (job done -> dataset), s"]
        f = figures["floor: output file -> Parquet (pyarrow), s"]
        lines.append(
            (
                "collect / floor",
                f"min/min {min(c) / min(f):.1f}  "
                f"median {statistics.median(c) / statistics.median(f):.1f}",
            )
        )
        report(lines)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
