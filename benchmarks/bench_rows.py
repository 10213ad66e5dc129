"""Row-level reuse (issue 14): 100,000 rows through a cheap row-wise step. Appending 1 %
of rows must compute exactly those rows, in at most 2x the time of a fully cached re-run
of the same pipeline (the floor, measured in the same run), both as `cas run` runs them
(Pipeline.execute) and with a Distiset (Pipeline.run), with how many of the loader's
batches of the grown file were reused (castore/pipeline/appends.py) and the ratio to a
run of the same pipeline where every batch is a hit but not replayed (what any run that
must plan costs before it reads a changed input). Also: row-key cost per row (bulk
and by the reference definition), index lookups, loading an index of 1,000,000 row keys
from segments and from a pack (time and memory, in a child process), and the cache of
the 20,000-row, 3-step anchor pipeline with its middle step batch-keyed vs row-wise (and
what storing only a row-wise step's own columns would weigh).

    python benchmarks/bench_rows.py [--rows 100000] [--repeat 5]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import datasets  # noqa: F401 - imported up front: its import is not what this measures
import pyarrow as pa
from _util import report, timed

from castore import Pipeline, StepInput, step
from castore.steps import LoadDataFromDicts, LoadDataFromFileSystem
from castore.store import Store
from castore.store.manifests import RunManifest, load_model

COMPUTED: list[int] = []
LAST_RUN: list[str] = []


@step(inputs=["text"], outputs=["n"], row_wise=True)
def Cheap(inputs: StepInput):
    COMPUTED.append(len(inputs))
    return [{**r, "n": len(r["text"])} for r in inputs]


@step(inputs=["text"], outputs=["n"])
def CheapBatches(inputs: StepInput):
    COMPUTED.append(len(inputs))
    return [{**r, "n": len(r["text"])} for r in inputs]


def pipeline(data: Path, row_wise: bool = True) -> Pipeline:
    work = Cheap if row_wise else CheapBatches
    with Pipeline(name="bench-rows") as p:
        LoadDataFromFileSystem(name="load", data_files=str(data), batch_size=5000) >> work(
            name="cheap", input_batch_size=1000
        )
    return p


def write(path: Path, n: int) -> None:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": i, "text": f"row {i} " + "x" * (i % 50)}) + "\n")


def mm(v: list[float], unit: str = "s", fmt: str = ".3f") -> str:
    return f"min {min(v):{fmt}} {unit}  median {statistics.median(v):{fmt}} {unit}"


def ratio(a: list[float], b: list[float]) -> str:
    med = statistics.median(a) / statistics.median(b)
    return f"min/min {min(a) / min(b):.2f}  median/median {med:.2f}"


INDEX_CHILD = """
import os, sys, time
import numpy, pyarrow as pa, pyarrow.ipc, pyarrow.parquet  # a run has them imported already
from castore.store import Store, rowpack
from castore.pipeline import rows
from castore.pipeline.rows import RowIndex, OUTPUT_META
store = Store(sys.argv[1])
fp = "ab" * 32
if not store.row_segments(fp):
    out = store.put_bytes(b"an output")
    for s in range(1000):
        keys = [os.urandom(32) for _ in range(1000)]
        t = pa.table({"row_key": pa.array(keys, pa.binary(32))}).replace_schema_metadata(
            {OUTPUT_META: out.encode()})
        store.add_row_segment(fp, store.put_table(t))
    RowIndex.load(store, fp)  # writes the pack
    print("built")
    sys.exit(0)
packed = sys.argv[2] == "pack"
pointer = rowpack.pointer_path(store, fp)
if not packed:
    os.rename(pointer, pointer + ".off")
    rows.PACK_AFTER = 10**9  # measure loading the segments, not writing a pack
def rss_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
base = rss_kib()
t0 = time.perf_counter()
index = RowIndex.load(store, fp)
n = len(index)
dt = time.perf_counter() - t0
if not packed:
    os.rename(pointer + ".off", pointer)
print(n, round(dt, 4), round((rss_kib() - base) / 1024, 1))
"""


def index_load(work: Path, repeat: int) -> dict[str, list[tuple[int, float, float]]]:
    idx_store = work / "index-store"
    subprocess.run([sys.executable, "-c", INDEX_CHILD, str(idx_store), "build"], check=True)
    out: dict[str, list[tuple[int, float, float]]] = {"segments": [], "pack": []}
    for _ in range(repeat):
        for kind in out:
            res = subprocess.run(
                [sys.executable, "-c", INDEX_CHILD, str(idx_store), kind],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.split()
            out[kind].append((int(res[0]), float(res[1]), float(res[2])))
    return out


@step(inputs=["prompt"], outputs=["generation"])
def Generate(inputs: StepInput):
    return [{**r, "generation": r["prompt"][::-1] + " answered"} for r in inputs]


@step(inputs=["prompt"], outputs=["generation"], row_wise=True)
def GenerateRows(inputs: StepInput):
    return [{**r, "generation": r["prompt"][::-1] + " answered"} for r in inputs]


@step(inputs=["generation"], outputs=["length"])
def Post(inputs: StepInput):
    return [{**r, "length": len(r["generation"])} for r in inputs]


def tree_size(root: Path) -> tuple[int, int]:
    files = [p for p in root.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def anchor(work: Path) -> list[tuple[str, str]]:
    """The 20,000-row, 3-step anchor (batch 50): the cache with the middle step
    batch-keyed vs row-wise, and the row-wise step's objects as stored against its own
    columns written alone."""
    import pyarrow.parquet as pq

    from castore.store.parquet import METADATA_COLUMN, write_parquet

    rows = [{"id": i, "prompt": f"prompt {i}: " + "word " * (10 + i % 20)} for i in range(20_000)]
    out = []
    for label, mid in (("batch-keyed", Generate), ("row-wise", GenerateRows)):
        cache = work / f"anchor-{label}"
        with Pipeline(name="anchor") as p:
            (
                LoadDataFromDicts(data=rows, batch_size=50)
                >> mid(name="generate", input_batch_size=50)
                >> Post(name="post", input_batch_size=50)
            )
        p.execute(cache_dir=cache, quiet=True)
        objects = tree_size(cache / "objects")
        whole = tree_size(cache)
        out.append(
            (
                f"anchor cache, {label}",
                f"{whole[0] / 1e6:.2f} MB in {whole[1]:,} files (objects {objects[0] / 1e6:.2f} MB"
                f" in {objects[1]:,})",
            )
        )
        if label == "row-wise":
            store = Store(cache)
            manifest = next(s for s in p_steps(store, "anchor") if s.name == "generate")
            full = own = 0
            for b in manifest.batches:
                for oid in b.outputs:
                    full += store.size_of(oid)
                    t = store.get_table(oid)
                    sink = pa.BufferOutputStream()
                    keep = [c for c in ("generation", METADATA_COLUMN) if c in t.column_names]
                    write_parquet(t.select(keep), sink)
                    own += len(sink.getvalue())
            final = pq.read_table(next((cache / "runs" / "anchor").glob("*/data/post")))
            sink = pa.BufferOutputStream()
            write_parquet(final, sink)
            out.append(
                (
                    "row-wise step's objects",
                    f"{full / 1e6:.2f} MB as stored (since layout 2 an object that extends its "
                    f"input holds only the columns it adds); its own columns written alone "
                    f"{own / 1e6:.2f} MB ({own / full:.0%}); final data as one Parquet "
                    f"{len(sink.getvalue()) / 1e6:.2f} MB",
                )
            )
    return out


def p_steps(store: Store, name: str):
    from castore.runs import list_runs
    from castore.store.manifests import StepManifest, load_model

    run = next(r for r in list_runs(store) if r.name == name)
    return [load_model(store, ref.manifest, StepManifest) for ref in run.manifest.steps]


def input_floor(path: Path, out: Path) -> None:
    """What any tool must do to see what an append changed: read the new input file and
    write it as Parquet in the loader's batches (here pyarrow alone, no hashing, no store)."""
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    out.mkdir(exist_ok=True)
    table = pj.read_json(path)
    for i in range(0, table.num_rows, 5000):
        pq.write_table(table.slice(i, 5000), out / f"{i}.parquet")


def append_runs(
    work: Path, repeat: int, method: str, row_wise: bool = True
) -> dict[str, list[float]]:
    """Per repetition, from the same starting cache: a fully cached re-run (the floor),
    then the run with 1 % of rows appended."""
    data, more = work / "data.jsonl", work / "more.jsonl"
    cache = work / f"cache-{method}-{row_wise}"

    def go(path: Path) -> None:
        res = getattr(pipeline(path, row_wise), method)(cache_dir=cache, quiet=True)
        LAST_RUN[:] = [res if isinstance(res, str) else res.run_oid]

    go(data)
    go(data)  # leaves it warm
    base = work / f"base-{method}-{row_wise}"
    shutil.copytree(cache, base)
    out: dict[str, list[float]] = {
        "rerun": [],
        "append": [],
        "computed": [],
        "hits": [],
        "input": [],
        "loader_reused": [],
    }
    for _ in range(repeat):
        out["rerun"].append(timed(lambda: go(data)))
        out["input"].append(timed(lambda: input_floor(more, work / "input-floor")))
        # The same pipeline with every batch a hit but no replay (its ref removed): what
        # any run that has to plan costs before it reads a changed input.
        store = Store(cache)
        for name, sig, _ in store.list_refs():
            store.delete_ref(name, sig)
        out["hits"].append(timed(lambda: go(data)))
        COMPUTED.clear()
        out["append"].append(timed(lambda: go(more)))
        out["computed"].append(sum(COMPUTED))
        stats = load_model(Store(cache), LAST_RUN[0], RunManifest).stats["load"]
        out["loader_reused"].append(stats.batches_cached)
        shutil.rmtree(cache)
        shutil.copytree(base, cache)
    return out


CONCURRENT_PIPELINE = """
import os, time
from castore import Pipeline, StepInput, step
from castore.steps import LoadDataFromFileSystem

@step(inputs=["text"], outputs=["n"], row_wise=True)
def Paid(inputs: StepInput):
    with open(os.environ["BENCH_CALLS"], "a") as f:
        for r in inputs:
            time.sleep(0.02)  # a paid call per row
            f.write(r["text"] + "\\n")
    return [{**r, "n": len(r["text"])} for r in inputs]

with Pipeline(name="bench-rows-together") as pipeline:
    LoadDataFromFileSystem(data_files=os.environ["BENCH_DATA"], batch_size=50) >> Paid(
        name="paid", input_batch_size=10, concurrency=4
    )
"""


CLI_PIPELINE = """
import os
from castore import Pipeline, StepInput, step
from castore.steps import LoadDataFromFileSystem

@step(inputs=["text"], outputs=["n"], row_wise=True)
def Cheap(inputs: StepInput):
    return [{**r, "n": len(r["text"])} for r in inputs]

with Pipeline(name="bench-rows-cli") as pipeline:
    LoadDataFromFileSystem(name="load", data_files=os.environ["BENCH_DATA"], batch_size=5000) >> (
        Cheap(name="cheap", input_batch_size=1000)
    )
"""


def cas_run(cache: Path, src: Path, *params: str) -> list[str]:
    """The command line of `cas -q run` of `src` on `cache`, with `--param`s."""
    cmd = [sys.executable, "-m", "castore.cli", "-q", "--cache-dir", str(cache), "run", str(src)]
    return cmd + [w for p in params for w in ("--param", p)]


def cli_runs(work: Path, repeat: int) -> dict[str, list[float]]:
    """The append as a user waits for it: `cas run` in a new process (imports included),
    against a fully cached re-run the same way, per repetition from the same store."""
    src, cache, base = work / "cli.py", work / "cli-cache", work / "cli-base"
    src.write_text(CLI_PIPELINE)

    def go(data: str) -> float:
        env = {**os.environ, "BENCH_DATA": str(work / data)}
        t0 = time.perf_counter()
        subprocess.run(cas_run(cache, src), env=env, check=True, capture_output=True)
        return time.perf_counter() - t0

    go("data.jsonl")
    go("data.jsonl")
    shutil.copytree(cache, base)
    out: dict[str, list[float]] = {"rerun": [], "append": []}
    for _ in range(repeat):
        out["rerun"].append(go("data.jsonl"))
        out["append"].append(go("more.jsonl"))
        shutil.rmtree(cache)
        shutil.copytree(base, cache)
    return out


def concurrent(work: Path, repeat: int, sizes: tuple[int, ...] = (7, 10, 15)) -> dict:
    """Runs of one row-wise step started together on one store with other batch sizes
    (so no batch key is shared): rows computed against the unique rows, and the wall time
    of all of them against one run alone (the floor), each from an empty store."""
    src, data = work / "together.py", work / "together.jsonl"
    src.write_text(CONCURRENT_PIPELINE)
    write(data, 300)
    out: dict[str, list] = {"alone": [], "together": [], "computed": []}
    for rep in range(repeat):
        for label, batch in (("alone", (10,)), ("together", sizes)):
            cache, calls = work / f"together-{label}-{rep}", work / f"calls-{label}-{rep}"
            env = {**os.environ, "BENCH_DATA": str(data), "BENCH_CALLS": str(calls)}
            t0 = time.perf_counter()
            procs = [
                subprocess.Popen(
                    cas_run(cache, src, f"paid.input_batch_size={n}"),
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for n in batch
            ]
            assert all(p.wait() == 0 for p in procs)
            out[label].append(time.perf_counter() - t0)
            if label == "together":
                out["computed"].append(len(calls.read_text().splitlines()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="castore-bench-rows-"))
    try:
        extra = args.rows // 100
        write(work / "data.jsonl", args.rows)
        write(work / "more.jsonl", args.rows + extra)
        t_cold = timed(
            lambda: pipeline(work / "data.jsonl").execute(cache_dir=work / "cold", quiet=True)
        )
        runs = {m: append_runs(work, args.repeat, m) for m in ("execute", "run")}
        # The same append with the step batch-keyed: batches 0-99 hit by action key (the
        # loader's batches are byte-identical), so this is what the engine costs without
        # any row-level work.
        batch_keyed = append_runs(work, args.repeat, "execute", row_wise=False)

        from castore.hashing import base_row_keys, row_keys
        from castore.pipeline.rows import RowIndex

        texts = [f"row {i} " + "x" * (i % 50) for i in range(args.rows)]
        arrow_texts = pa.array(texts)
        fp = pipeline(work / "data.jsonl").signatures()["cheap"]["fp"]
        t_ref = min(timed(lambda: row_keys(fp, [texts], {})) for _ in range(3))
        t_bulk = min(timed(lambda: base_row_keys(fp, [arrow_texts])) for _ in range(3))
        index = RowIndex.load(Store(work / "cold"), fp)
        keys = base_row_keys(fp, [arrow_texts])
        assert keys == row_keys(fp, [texts], {}), "bulk keys are the reference keys"
        assert all(f is not None for f in index.find(keys)), "every row is in the index"
        t_find = min(timed(lambda: index.find(keys)) for _ in range(3))
        loads = index_load(work, args.repeat)

        lines = [
            ("rows", f"{args.rows:,} (+{extra:,} appended), cold run {t_cold:.2f} s"),
            ("load average", " ".join(f"{x:.2f}" for x in os.getloadavg())),
        ]
        for method, label in (("execute", "cas run (execute)"), ("run", "with a Distiset (run)")):
            r = runs[method]
            lines += [
                (f"{label}: floor, fully cached re-run", mm(r["rerun"])),
                (f"{label}: every batch a hit, no replay", mm(r["hits"])),
                (f"{label}: append 1 %", mm(r["append"])),
                (f"{label}: append / re-run", ratio(r["append"], r["rerun"]) + " (target <= 2)"),
                (f"{label}: append / every batch a hit", ratio(r["append"], r["hits"])),
                (
                    f"{label}: loader batches reused (grown file)",
                    f"{sorted(set(r['loader_reused']))} of {-(-(args.rows + extra) // 5000)}",
                ),
                (f"{label}: floor, read input + write Parquet", mm(r["input"])),
                (f"{label}: append / that floor", ratio(r["append"], r["input"])),
                (f"{label}: rows computed", f"{sorted(set(r['computed']))} (new rows: {extra})"),
            ]
        lines += [
            ("cas run, step batch-keyed: append 1 %", mm(batch_keyed["append"])),
            (
                "cas run: row-wise append / batch-keyed append",
                ratio(runs["execute"]["append"], batch_keyed["append"]),
            ),
            ("row keys, bulk (engine)", f"{t_bulk / args.rows * 1e6:.2f} us per row"),
            ("row keys, reference definition", f"{t_ref / args.rows * 1e6:.2f} us per row"),
            ("index lookup", f"{t_find / args.rows * 1e6:.2f} us per row"),
        ]
        for kind in ("segments", "pack"):
            v = loads[kind]
            lines += [
                (f"index load, 1,000,000 keys, {kind}", mm([x[1] for x in v]) + " (target <= 1 s)"),
                (
                    f"index memory, 1,000,000 keys, {kind}",
                    mm([x[2] for x in v], "MiB", ".1f") + " (target <= 200)",
                ),
            ]
        cli = cli_runs(work, args.repeat)
        lines += [
            ("`cas run` (new process): fully cached re-run", mm(cli["rerun"])),
            ("`cas run` (new process): append 1 %", mm(cli["append"])),
            ("`cas run` (new process): append / re-run", ratio(cli["append"], cli["rerun"])),
        ]
        together = concurrent(work, args.repeat)
        lines += [
            (
                "3 runs at once, batch sizes 7/10/15: rows computed",
                f"{sorted(set(together['computed']))} of 300 (each row once: 300)",
            ),
            ("one run alone (the floor), 300 rows x 20 ms", mm(together["alone"])),
            ("3 runs at once, all finished", mm(together["together"])),
            ("3 runs at once / one alone", ratio(together["together"], together["alone"])),
        ]
        lines += anchor(work)
        report(lines)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
