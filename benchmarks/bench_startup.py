"""Start-up and no-op costs (issue 15): each command as a user runs it, in a new process,
next to `python -c pass` measured in the same run. Min and median of --repeat runs.

    python benchmarks/bench_startup.py [--repeat 7] [--distilabel-python PATH]

With --distilabel-python (the interpreter of a scratch venv with distilabel 1.5.3;
castore never depends on it), the re-run of the same-shaped 2,000-row anchor pipeline is
measured with distilabel too, interleaved with castore's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import report

REPO = Path(__file__).resolve().parents[1]

ANCHOR_ROWS = """
rows = [{"id": i, "prompt": f"prompt {i}: " + "word " * (5 + i % 7)} for i in range(2000)]
"""

STEPS = """
@step(inputs=["prompt"], outputs=["generation"])
def Generate(inputs: StepInput):
    for r in inputs:
        time.sleep(0.002)  # the stand-in for an LLM call
        r["generation"] = r["prompt"][::-1]
    yield inputs

@step(inputs=["generation"], outputs=["length"])
def Post(inputs: StepInput):
    yield [{**r, "length": len(r["generation"])} for r in inputs]
"""

CASTORE_ANCHOR = (
    """
import sys, time
from castore import Pipeline, StepInput, step
from castore.steps import LoadDataFromDicts
"""
    + ANCHOR_ROWS
    + STEPS
    + """
with Pipeline(name="anchor") as pipeline:
    LoadDataFromDicts(data=rows, batch_size=50) >> Generate(input_batch_size=50) >> Post(
        input_batch_size=50
    )

if __name__ == "__main__":
    ds = pipeline.run(cache_dir=sys.argv[1], quiet=True)
    if sys.argv[2] == "read":
        assert len(next(iter(ds.values()))["train"]) == 2000
"""
)

DISTILABEL_ANCHOR = (
    """
import sys, time
from distilabel.pipeline import Pipeline
from distilabel.steps import LoadDataFromDicts, StepInput, step
"""
    + ANCHOR_ROWS
    + STEPS
    + """
with Pipeline(name="anchor", cache_dir=sys.argv[1]) as pipeline:
    LoadDataFromDicts(data=rows, batch_size=50) >> Generate(input_batch_size=50) >> Post(
        input_batch_size=50
    )

if __name__ == "__main__":
    ds = pipeline.run(use_cache=True)
    if sys.argv[2] == "read":
        assert len(next(iter(ds.values()))["train"]) == 2000
"""
)


def cas_command() -> list[str]:
    script = Path(sys.executable).with_name("cas")
    return [str(script)] if script.exists() else [sys.executable, "-m", "castore"]


def wall(cmd: list[str], cwd: Path | None = None, env: dict | None = None) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {r.stderr.strip()[-500:]}")
    return dt


def store_with_runs(root: Path, n: int) -> None:
    """`n` finished small pipelines plus the README example, in one store."""
    from castore import Pipeline
    from castore.steps import KeepColumns, LoadDataFromDicts

    for i in range(n):
        with Pipeline(name=f"p{i:03d}") as p:
            LoadDataFromDicts(data=[{"x": j, "i": i} for j in range(10)]) >> KeepColumns(
                columns=["x"]
            )
        p.execute(cache_dir=root, quiet=True)


def mm(v: list[float]) -> str:
    return f"min {min(v):.3f} s  median {statistics.median(v):.3f} s"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--distilabel-python", default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="castore-bench-startup-"))
    try:
        cache = work / "store"
        store_with_runs(cache, args.runs)
        examples = work / "examples"
        shutil.copytree(REPO / "examples", examples)
        cas = [*cas_command(), "--cache-dir", str(cache)]
        wall([*cas, "run", "clean_reviews.py", "--quiet"], cwd=examples)
        (work / "anchor_castore.py").write_text(CASTORE_ANCHOR)
        anchor = [sys.executable, str(work / "anchor_castore.py"), str(work / "anchor-cache")]
        wall([*anchor, "read"], cwd=work)
        cases: dict[str, tuple[list[str], Path | None]] = {
            "python -c pass (floor)": ([sys.executable, "-c", "pass"], None),
            "python -c 'import castore'": ([sys.executable, "-c", "import castore"], None),
            "python -c 'import datasets' (reference)": (
                [sys.executable, "-c", "import datasets"],
                None,
            ),
            "cas --help": ([*cas, "--help"], None),
            f"cas ls ({args.runs + 1} runs)": ([*cas, "ls"], None),
            "cas show clean-reviews": ([*cas, "show", "clean-reviews"], None),
            "cas run examples/clean_reviews.py, finished": (
                [*cas, "run", "clean_reviews.py", "--quiet"],
                examples,
            ),
            "anchor re-run, pipeline.run()": ([*anchor, "noread"], None),
            "anchor re-run, pipeline.run() + read the data": ([*anchor, "read"], None),
        }
        if args.distilabel_python:
            (work / "anchor_distilabel.py").write_text(DISTILABEL_ANCHOR)
            dl = [args.distilabel_python, str(work / "anchor_distilabel.py"), str(work / "dl")]
            wall([*dl, "read"])
            cases["distilabel 1.5.3 anchor re-run + read the data"] = ([*dl, "read"], work)
        times: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(args.repeat):  # interleaved, so a busy moment hits every case
            for name, (cmd, cwd) in cases.items():
                # Away from the checkout: a castore/ folder in the working directory
                # would shadow the installed package.
                times[name].append(wall(cmd, cwd=cwd or work))
        floor = min(times["python -c pass (floor)"])
        lines = [("load average", " ".join(f"{x:.2f}" for x in os.getloadavg()))]
        lines.append(
            ("castore installed", "editable" if _editable() else "as a package (not editable)")
        )
        for name, v in times.items():
            lines.append((name, f"{mm(v)}  (min - floor {min(v) - floor:.3f} s)"))
        if args.distilabel_python:
            dl_v = times["distilabel 1.5.3 anchor re-run + read the data"]
            for name in (
                "anchor re-run, pipeline.run()",
                "anchor re-run, pipeline.run() + read the data",
            ):
                v = times[name]
                lines.append(
                    (
                        f"{name} / distilabel's",
                        f"min/min {min(v) / min(dl_v):.2f}  median/median "
                        f"{statistics.median(v) / statistics.median(dl_v):.2f} (target <= 0.25)",
                    )
                )
        report(lines)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _editable() -> bool:
    import castore

    return not any(part == "site-packages" for part in Path(castore.__file__).resolve().parts)


if __name__ == "__main__":
    main()
