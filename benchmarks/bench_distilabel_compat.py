"""The compat pipelines (tests/distilabel_compat/pipelines) on castore and on distilabel
1.5.3, against the same local OpenAI-compatible server with 50 ms latency: wall time of
the whole `python` process (what a user waits for) and requests, cold and re-run,
interleaved, min / median of --repeat. Every pipeline file there is run (quickstart,
several_llms, routing, resumable, step_decorator); custom_template.py is one task called
standalone, not a pipeline. The distilabel side runs the same files with
`castore.distilabel` replaced by `distilabel`, in its own venv:

    python -m venv /tmp/dlvenv && /tmp/dlvenv/bin/pip install distilabel==1.5.3 openai
    python benchmarks/bench_distilabel_compat.py --distilabel-python /tmp/dlvenv/bin/python
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import report

from tests.llm_server import LLMServer

REPO = Path(__file__).resolve().parents[1]
PIPELINES = REPO / "tests" / "distilabel_compat" / "pipelines"

# Runs one pipeline file the way its documentation runs it, with the inputs the tests use.
RUNNER = """
import runpy, sys
m = runpy.run_path(sys.argv[1])
kind, data = sys.argv[2], sys.argv[3]
if kind == "quickstart":
    import datasets
    rows = [{"instruction": f"Write a haiku about the number {i}."} for i in range(100)]
    ds = m["pipeline"].run(dataset=datasets.Dataset.from_list(rows), use_cache=True)
elif kind in ("routing", "resumable"):  # inline rows: routing, or 200 rows generated
    ds = m["pipeline"].run(use_cache=True)
elif kind == "step_decorator":  # no LLM: the engine alone (generator + a @step)
    p = m["pipeline"]
    steps = list(p.dag) if hasattr(p, "dag") else list(p.steps)  # distilabel / castore
    name = next(n for n in steps if n.startswith("generation_step"))
    ds = p.run(parameters={name: {"dummy_generation": "hi"}}, use_cache=True)
else:
    gen = {"llm": {"generation_kwargs": {"temperature": 0.7, "max_new_tokens": 64}}}
    p = m["pipeline"]
    steps = list(p.dag) if hasattr(p, "dag") else list(p.steps)  # distilabel / castore
    names = [n for n in steps if n.startswith("text_generation_with_")]
    params = {"load_dataset": {"repo_id": data, "split": "test"}, **{n: gen for n in names}}
    ds = m["pipeline"].run(parameters=params, use_cache=True)
print(sum(len(ds[k]["train"]) for k in ds))
"""


def prepare(work: Path) -> dict[str, dict[str, Path]]:
    """Each pipeline file as castore runs it and as distilabel runs it."""
    out: dict[str, dict[str, Path]] = {}
    for kind in ("quickstart", "several_llms", "routing", "resumable", "step_decorator"):
        src = (PIPELINES / f"{kind}.py").read_text()
        out[kind] = {}
        for system, text in (
            ("castore", src),
            ("distilabel", src.replace("castore.distilabel", "distilabel")),
        ):
            path = work / system / f"{kind}.py"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            out[kind][system] = path
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--distilabel-python", required=True)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="castore-bench-compat-"))
    server = LLMServer(latency=0.05).start()
    try:
        import datasets

        data = work / "instruction-dataset-mini"
        data.mkdir()
        rows = [{"prompt": f"Explain topic {i}."} for i in range(50)]
        datasets.Dataset.from_list(rows).to_json(data / "test.jsonl")
        files = prepare(work)
        pythons = {"castore": sys.executable, "distilabel": args.distilabel_python}
        times: dict[tuple[str, str, str], list[float]] = {}
        requests: dict[tuple[str, str, str], set[int]] = {}
        failures: dict[tuple[str, str, str], str] = {}
        for rep in range(args.repeat):
            for kind in files:
                for system in ("castore", "distilabel"):
                    cache = work / f"cache-{system}-{kind}-{rep}"
                    env = {
                        **os.environ,
                        "OPENAI_BASE_URL": server.base_url,
                        "OPENAI_API_KEY": "sk-test",
                        "CASTORE_CACHE_DIR": str(cache),
                        "DISTILABEL_CACHE_DIR": str(cache),
                    }
                    for phase in ("cold", "re-run"):
                        before = server.requests
                        t0 = time.perf_counter()
                        p = subprocess.run(
                            [
                                pythons[system],
                                "-c",
                                RUNNER,
                                str(files[kind][system]),
                                kind,
                                str(data),
                            ],
                            env=env,
                            capture_output=True,
                            text=True,
                            timeout=600,
                        )
                        dt = time.perf_counter() - t0
                        key = (kind, system, phase)
                        if p.returncode != 0 and system == "castore":
                            raise SystemExit(f"{system} {kind} {phase} failed:\n{p.stderr[-3000:]}")
                        if p.returncode != 0:  # a finding about distilabel, not a crash here
                            last = [x for x in p.stderr.splitlines() if "Error" in x][-1:]
                            failures[key] = f"exit {p.returncode}: {' '.join(last)[:160]}"
                            continue
                        times.setdefault(key, []).append(dt)
                        requests.setdefault(key, set()).add(server.requests - before)
                    shutil.rmtree(cache, ignore_errors=True)
        lines = [("load average", " ".join(f"{x:.2f}" for x in os.getloadavg()))]
        for kind in files:
            for phase in ("cold", "re-run"):
                c, d = times[(kind, "castore", phase)], times.get((kind, "distilabel", phase))
                if d is None:
                    lines.append(
                        (
                            f"{kind} {phase}",
                            f"castore min {min(c):.2f} / median {statistics.median(c):.2f} s, "
                            f"{sorted(requests[(kind, 'castore', phase)])} requests; distilabel "
                            f"failed every time ({failures[(kind, 'distilabel', phase)]})",
                        )
                    )
                    continue
                ratio = statistics.median(d) / statistics.median(c)
                lines.append(
                    (
                        f"{kind} {phase}",
                        f"castore min {min(c):.2f} / median {statistics.median(c):.2f} s, "
                        f"{sorted(requests[(kind, 'castore', phase)])} requests; distilabel "
                        f"min {min(d):.2f} / median {statistics.median(d):.2f} s, "
                        f"{sorted(requests[(kind, 'distilabel', phase)])} requests; "
                        f"distilabel/castore median {ratio:.2f}",
                    )
                )
        report(lines)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
