"""Several machines on one remote (an S3-compatible server on 127.0.0.1; a "machine" is a
`cas` process with a store of its own), min / median of --repeat, with the load average.

Part 1: N machines start one pipeline (40 batches of a 0.1 s step) with `--remote --push`
at once (and 2 machines 3 s apart): batches computed vs unique batches, wall time vs one
machine alone (the floor).

Part 1b (--rowwise): machines whose batches of a row-wise step differ (batch sizes 7,
10, 13, ...) start it at once (and 2 machines 3 s apart) over 300 rows of 60 ms each:
rows computed vs unique rows (no batch key is shared: only row claims keep a row from
being paid twice), wall time vs one machine alone with batch size 7.

Part 2: a remote holding E entries (synthetic ones, each naming one object) plus a real
run of 100 batches of a 50 ms step: `--remote` overhead of a run whose batches are all
local (floor: the same run without --remote), read-through of the 100 batches into an
empty store (floor: computing them locally), push of one new run, `gc --remote
--dry-run` (floor: s3fs listing actions/ and objects/, one after the other and at once, in
a process of its own), the client's CPU per key listing objects/ (castore's scan against
s3fs's find: on a real S3 the client's parse, not the server, bounds a listing), and the
gc's memory per entry.

Part 2m: remotes of M entries (6,000 and 60,000 by default): peak RSS of `gc --remote
--dry-run` on each, and its growth per entry (target <= 200 B), as is and with the two
buffers that stop growing at some size set small (what the growth is beyond it).

Part 3: a remote holding R runs (synthetic run and step manifests, 3 steps of 20 batches
each, and their refs) plus the real 100-batch run: read-through of it into an empty store
(the first look at the remote reads the refs and the manifests the cross-check needs),
and again into a store that has looked before (castore/remote_index.py remembers what it
read, so only what changed is read). Floor: computing the 100 batches locally. And
`gc --remote --dry-run`, which must read every run's manifests (16 at a time).

    python benchmarks/bench_team.py [--machines 1,2,5,10] [--rowwise 2,3]
        [--entries 2000,20000] [--memory-entries 6000,60000] [--runs 500] [--repeat 5]
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _util import report

from castore import remote_packs
from castore.hashing import hash_bytes, hash_json
from castore.remote import Remote
from castore.store.models import ActionEntry
from tests.remote_server import S3Server

PIPELINE = """
import os, time
from castore import Pipeline, StepInput, StepOutput, step
from castore.steps import LoadDataFromDicts

@step(inputs=["i"], outputs=["y"])
def Paid(inputs: StepInput, delay: float = {delay}) -> StepOutput:
    time.sleep(delay)
    with open(os.environ["BENCH_CALLS"], "a") as f:
        f.write(f"{{inputs[0]['i']}}\\n")
    yield [{{**r, "y": r["i"] * 2}} for r in inputs]

with Pipeline(name="{name}") as pipeline:
    load = LoadDataFromDicts(data=[{{"i": i}} for i in range({rows})], batch_size=50)
    load >> Paid(input_batch_size={batch}, concurrency={concurrency})
"""


ROWWISE = """
import os, time
from castore import Pipeline, StepInput, StepOutput, step
from castore.steps import LoadDataFromDicts

@step(inputs=["i"], outputs=["y"], row_wise=True)
def Answer(inputs: StepInput) -> StepOutput:
    time.sleep(0.06 * len(inputs))
    with open(os.environ["BENCH_CALLS"], "a") as f:
        f.write("".join(f"{{r['i']}}\\n" for r in inputs))
    yield [{{**r, "y": r["i"] * 2}} for r in inputs]

with Pipeline(name="{name}") as pipeline:
    load = LoadDataFromDicts(data=[{{"i": i}} for i in range(300)], batch_size=50)
    load >> Answer(input_batch_size={batch}, concurrency=2)
"""


def write_pipeline(work: Path, name: str, template: str = PIPELINE, **kw: object) -> Path:
    path = work / f"{name}.py"
    path.write_text(template.format(name=name, **kw))
    return path


def cas(*args: str, cache: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "castore.cli", *args, "--cache-dir", str(cache)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_ok(p: subprocess.Popen[str]) -> None:
    _out, err = p.communicate(timeout=900)
    if p.returncode != 0:
        raise SystemExit(f"cas failed ({p.returncode}): {err[-2000:]}")


def timed_cas(*args: str, cache: Path, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    wait_ok(cas(*args, cache=cache, env=env))
    return time.perf_counter() - t0


def mm(v: list[float], unit: str = "s") -> str:
    return f"min {min(v):.2f} {unit}  median {statistics.median(v):.2f} {unit}"


def team_run(
    server: S3Server, work: Path, pipelines: list[Path], env: dict[str, str], apart: float
) -> tuple[list[str], float]:
    """Machines (a `cas run --remote --push` each, with a store of its own) running these
    pipeline files on a fresh bucket, started at once or `apart` seconds apart: the lines
    their paid steps wrote, and the wall time of all of them."""
    url = server.new_bucket()
    calls = work / f"calls-{time.monotonic_ns()}"
    env = {**env, "BENCH_CALLS": str(calls)}
    t0 = time.perf_counter()
    procs = []
    for i, pipeline in enumerate(pipelines):
        if i and apart:
            time.sleep(apart)
        cache = work / f"m{i}-{time.monotonic_ns()}"
        procs.append(cas("run", str(pipeline), "--remote", url, "--push", cache=cache, env=env))
    for p in procs:
        wait_ok(p)
    return calls.read_text().splitlines(), time.perf_counter() - t0


def machines(server: S3Server, work: Path, n: int, apart: float, env: dict[str, str]):
    """(batches computed, wall seconds) of n machines sharing a fresh bucket."""
    pipeline = write_pipeline(work, "team", delay=0.1, rows=600, batch=15, concurrency=2)
    made, wall = team_run(server, work, [pipeline] * n, env, apart)
    return len(made), wall


def rowwise_machines(
    server: S3Server, work: Path, sizes: list[int], env: dict[str, str], apart: float = 0.0
) -> tuple[int, int, float]:
    """(rows computed, unique rows, wall seconds) of machines running one row-wise step
    with these batch sizes on a fresh bucket, started at once or `apart` seconds apart."""
    pipelines = [write_pipeline(work, f"rows{n}", ROWWISE, batch=n) for n in sizes]
    made, wall = team_run(server, work, pipelines, env, apart)
    return len(made), len(set(made)), wall


def fill(remote: Remote, n: int) -> None:
    """n entries, each naming one small object: what a remote of n batches lists. The
    objects and entries go straight into the server's storage (it runs in this process:
    the same keys, bytes and ETags as PUT requests give; 20,000 in 2.5 s, not 199 s);
    their packs are written through the remote."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]

    def put(path: str, data: bytes) -> None:
        bucket, key = path.split("/", 1)
        backend.put_object(bucket, key, data)

    def one(i: int) -> tuple[str, bytes]:
        data = f"object {i}".encode()
        oid = hash_bytes(data)
        put(remote.layout.object_path(oid), data)
        entry = ActionEntry(outputs=[oid], rows=[1], info={"step": "filler"})
        key = hash_json(["filler", i])
        raw = remote.entry_bytes(key, entry)
        put(remote.layout.action_path(key), raw)
        return key, raw

    written = dict(map(one, range(n)))
    # As the pushes that brought them would have: their entries packed too, 1,000 a push.
    keys = sorted(written)
    for i in range(0, n, 1000):
        remote_packs.write(remote, {k: written[k] for k in keys[i : i + 1000]})


def fill_runs(remote: Remote, n: int) -> None:
    """n runs, as pushes would leave them: 3 step manifests of 20 batches each, the run
    manifest, its ref."""
    import datetime as dt

    from castore.store.manifests import BatchRecord, RunManifest, StepManifest, StepRef

    def put(model) -> str:
        data = model.model_dump_json().encode()
        oid = hash_bytes(data)
        remote.write(remote.layout.object_path(oid), data)
        return oid

    def one(i: int) -> None:
        steps = []
        for s in range(3):
            batches = [
                BatchRecord(
                    key=hash_json(["run", i, s, b]),
                    outputs=[hash_json(["out", i, s, b])],
                    rows=[50],
                    cached=False,
                )
                for b in range(20)
            ]
            manifest = StepManifest(
                name=f"step{s}",
                step_class="Filler",
                fingerprint=hash_json(["fp", i, s]),
                signature=hash_json(["sig", i, s]),
                complete=True,
                batches=batches,
            )
            steps.append(StepRef(name=f"step{s}", manifest=put(manifest)))
        sig = hash_json(["run", i])
        run = RunManifest(
            run_id=f"filler-{i}",
            name=f"filler{i}",
            signature=sig,
            status="finished",
            started=dt.datetime.now(dt.UTC),
            steps=steps,
            edges=[("step0", "step1"), ("step1", "step2")],
            leaves=["step2"],
        )
        remote.set_ref(f"filler{i}", sig, put(run))

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(one, range(n)))


LIST_CHILD = """
import sys, time
from concurrent.futures import ThreadPoolExecutor
import s3fs
fs = s3fs.S3FileSystem(skip_instance_cache=True)
root, together = sys.argv[1], sys.argv[2] == "together"
t0 = time.perf_counter()
with ThreadPoolExecutor(2 if together else 1) as pool:
    list(pool.map(lambda kind: fs.find(f"{root}/{kind}", detail=True), ["actions", "objects"]))
print(time.perf_counter() - t0)
"""


def list_floor(url: str, env: dict[str, str], together: bool) -> float:
    """The two listings any gc of this remote needs, through s3fs alone, in a process of
    their own as the gc is (the server's thread shares this one's GIL): one after the
    other, or at once (as gc --remote lists them)."""
    mode = "together" if together else "serial"
    return float(child(LIST_CHILD, env, url[len("s3://") :], mode))


SCAN_CHILD = """
import sys, time
root, how = sys.argv[1], sys.argv[2]
if how == "s3fs":
    import s3fs
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.find(root + "/refs")  # the client made, as castore's is below
    listing = lambda: len(fs.find(root + "/objects", detail=True))
else:
    from castore.remote import Remote
    remote = Remote("s3://" + root)
    list(remote.scan("refs"))
    listing = lambda: sum(1 for _ in remote.scan("objects"))
t0, c0 = time.perf_counter(), time.process_time()
n = listing()
print(time.perf_counter() - t0, time.process_time() - c0, n)
"""


def scan_cost(url: str, env: dict[str, str], how: str) -> tuple[float, float, int]:
    """(wall s, client CPU s, keys) of listing objects/ in a process of its own: through
    s3fs's find (the floor) or castore's Remote.scan (pages as they come, timestamps
    parsed by the standard library: castore.remote.parse_timestamp)."""
    wall, cpu, n = child(SCAN_CHILD, env, url[len("s3://") :], how).split()
    return float(wall), float(cpu), int(n)


Scans = dict[str, list[tuple[float, float, int]]]


def add_scan_costs(url: str, env: dict[str, str], scans: Scans) -> None:
    for how in scans:
        scans[how].append(scan_cost(url, env, how))


def scan_rows(label: str, scans: Scans) -> list[tuple[str, str]]:
    keys = scans["s3fs"][0][2]
    cpu = {h: [c / max(n, 1) * 1e6 for _, c, n in v] for h, v in scans.items()}
    wall = {h: [w for w, _, _ in v] for h, v in scans.items()}
    ratio = statistics.median(cpu["castore"]) / statistics.median(cpu["s3fs"])
    return [
        (
            f"{label}: list objects/ ({keys:,} keys), client CPU per key",
            f"s3fs find {mm(cpu['s3fs'], 'us')}; castore scan {mm(cpu['castore'], 'us')}"
            f" = {ratio:.2f}x",
        ),
        (
            f"{label}: list objects/, wall",
            f"s3fs find {mm(wall['s3fs'])}; castore scan {mm(wall['castore'])}",
        ),
    ]


def memory_rows(
    server: S3Server, sizes: list[int], env: dict[str, str], repeat: int
) -> list[tuple[str, str]]:
    """Peak RSS of `gc --remote --dry-run` on remotes of each size (interleaved, `repeat`
    times), and its growth per entry between the smallest and the largest: what a remote
    of millions of entries costs beyond the process's fixed ~130 MiB."""
    if not sizes:
        return []
    urls = {}
    for n in sizes:
        urls[n] = server.new_bucket()
        fill(Remote(urls[n]), n)
    rows = []
    lo, hi = min(sizes), max(sizes)
    # "capped": the two buffers that stop growing at a size (the objects' listing, at most
    # 256 pages ahead: 12 MB from 256,000 objects; the marking's chunk of 65,536 outputs)
    # set small, so the growth measured here is the one that goes on to 10^6 entries.
    for how in ("as is", "capped"):
        peaks: dict[int, list[float]] = {n: [] for n in sizes}
        for _ in range(repeat):
            for n in sizes:
                peaks[n].append(peak_mib(urls[n], env, capped=how == "capped"))
        rows += [(f"M={n:,} ({how}): gc dry-run peak RSS", mm(peaks[n], "MiB")) for n in sizes]
        if hi > lo:
            per = [(b - a) * 2**20 / (hi - lo) for a, b in zip(peaks[lo], peaks[hi], strict=True)]
            mid = (statistics.median(peaks[hi]) - statistics.median(peaks[lo])) * 2**20 / (hi - lo)
            rows.append(
                (
                    f"gc dry-run peak RSS per entry ({how}), {lo:,} -> {hi:,}",
                    f"median of peaks {mid:.0f} B (pairs: min {min(per):.0f} max {max(per):.0f} B;"
                    " target <= 200 B)",
                )
            )
    print("\n".join(f"{k}  {v}" for k, v in rows), flush=True)
    return rows


def peak_mib(
    url: str, env: dict[str, str], listing_only: bool = False, capped: bool = False
) -> float:
    """Peak RSS of a process running gc --remote --dry-run (`capped`: with its bounded
    buffers small, see memory_rows), or only its two listings."""
    if listing_only:
        work = (
            "import s3fs\nfs = s3fs.S3FileSystem()\n"
            f"a = fs.find({url[5:] + '/actions'!r}, detail=True)\n"
            f"b = fs.find({url[5:] + '/objects'!r}, detail=True)\n"
        )
    else:
        work = (
            "from castore.remote import Remote\nfrom castore import remote_gc\n"
            + ("remote_gc._ObjectPages.AHEAD = 4\nremote_gc._CHUNK = 4096\n" if capped else "")
            + f"remote_gc.collect_remote(Remote({url!r}), dry_run=True)\n"
        )
    code = work + "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])\n"
    return int(child(code, env)) / 1024


def child(code: str, env: dict[str, str], *args: str) -> str:
    """The stripped stdout of `python -c code args` in a process of its own; its stderr
    ends the benchmark when it fails."""
    out = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True
    )
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    return out.stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--machines", default="1,2,5,10")
    ap.add_argument("--rowwise", default="2,3")
    ap.add_argument("--entries", default="2000,20000")
    ap.add_argument("--runs", type=int, default=500)
    ap.add_argument("--memory-entries", default="6000,60000")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = S3Server()
    server.start()
    os.environ.update(server.env)
    import fsspec.config

    fsspec.config.conf["s3"] = {"endpoint_url": server.endpoint}
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    work = Path(tempfile.mkdtemp(prefix="bench-team-"))
    rows: list[tuple[str, str]] = [
        ("load average (start)", " ".join(f"{x:.2f}" for x in os.getloadavg()))
    ]
    try:
        # -- part 1 ----------------------------------------------------------------------
        cases = [(int(n), 0.0) for n in args.machines.split(",") if n]
        cases += [(2, 3.0)] if cases else []  # --machines "": part 2 only
        walls: dict[tuple[int, float], list[float]] = {}
        for n, apart in cases:
            paid, walls[(n, apart)] = [], []
            for _ in range(args.repeat):
                computed, wall = machines(server, work, n, apart, env)
                paid.append(computed / 40)
                walls[(n, apart)].append(wall)
            label = f"{n} machines" + (f", {apart:.0f} s apart" if apart else " at once")
            alone = statistics.median(walls[(1, 0.0)])
            rows.append(
                (
                    label,
                    f"computed / unique batches min {min(paid):.2f} median "
                    f"{statistics.median(paid):.2f} max {max(paid):.2f}; wall "
                    f"{mm(walls[(n, apart)])} = "
                    f"{statistics.median(walls[(n, apart)]) / alone:.2f}x one machine",
                )
            )
            print(rows[-1][0], rows[-1][1], flush=True)
        # -- part 1b ---------------------------------------------------------------------
        counts = [int(n) for n in args.rowwise.split(",") if n]
        alone_rows: list[float] = []
        row_cases = [(n, 0.0) for n in [1, *counts]] + [(2, 3.0)] if counts else []
        for n, apart in row_cases:
            made, walls_n = [], []
            for _ in range(args.repeat):
                sizes = [7 + 3 * i for i in range(n)]  # 7, 10, 13, ...
                computed, unique, wall = rowwise_machines(server, work, sizes, env, apart)
                made.append(computed / unique)
                walls_n.append(wall)
            if n == 1:
                alone_rows = walls_n
            when = f", {apart:.0f} s apart" if apart else ""
            rows.append(
                (
                    f"row-wise, {n} machine{'s' * (n > 1)}{when} (batch sizes differ)",
                    f"computed / unique rows min {min(made):.2f} median "
                    f"{statistics.median(made):.2f} max {max(made):.2f}; wall {mm(walls_n)} = "
                    f"{statistics.median(walls_n) / statistics.median(alone_rows):.2f}x one alone",
                )
            )
            print(rows[-1][0], rows[-1][1], flush=True)
        # -- part 2 ----------------------------------------------------------------------
        peaks: dict[int, float] = {}
        floors: dict[int, float] = {}
        for n_entries in (int(e) for e in args.entries.split(",") if e):
            url = server.new_bucket()
            remote = Remote(url)
            t0 = time.perf_counter()
            fill(remote, n_entries)
            filled = time.perf_counter() - t0
            pipeline = write_pipeline(
                work, f"hundred{n_entries}", delay=0.05, rows=1000, batch=10, concurrency=1
            )
            benv = {**env, "BENCH_CALLS": str(work / "calls-hundred")}
            origin = work / f"origin-{n_entries}"
            timed_cas("run", str(pipeline), cache=origin, env=benv)
            t_push = [timed_cas("push", url, cache=origin, env=benv)]
            local, through, cold, read, gc_dry, listing, at_once = [], [], [], [], [], [], []
            scans: Scans = {"s3fs": [], "castore": []}
            for i in range(args.repeat):
                local.append(timed_cas("run", str(pipeline), cache=origin, env=benv))
                through.append(
                    timed_cas("run", str(pipeline), "--remote", url, cache=origin, env=benv)
                )
                fresh = work / f"fresh-{n_entries}-{i}"
                cold.append(timed_cas("run", str(pipeline), cache=fresh, env=benv))
                empty = work / f"empty-{n_entries}-{i}"
                t = timed_cas(
                    "run", str(pipeline), "--remote", url, "--json", cache=empty, env=benv
                )
                read.append(t)
                gc_dry.append(timed_cas("gc", "--remote", url, "--dry-run", cache=origin, env=benv))
                listing.append(list_floor(url, env, together=False))
                at_once.append(list_floor(url, env, together=True))
                add_scan_costs(url, env, scans)
                shutil.rmtree(fresh)
                shutil.rmtree(empty)
            peaks[n_entries] = peak_mib(url, env)
            floors[n_entries] = peak_mib(url, env, listing_only=True)
            over = [t - f for t, f in zip(sorted(through), sorted(local), strict=True)]
            rows += [
                (f"E={n_entries:,}: fill", f"{filled:.1f} s (not a figure)"),
                (f"E={n_entries:,}: all-local run", f"{mm(local)} (floor)"),
                (
                    f"E={n_entries:,}: same with --remote",
                    f"{mm(through)}; added min {min(over):.2f} s median "
                    f"{statistics.median(over):.2f} s (target <= 0.5 s)",
                ),
                (f"E={n_entries:,}: compute 100 batches x 50 ms locally", f"{mm(cold)} (floor)"),
                (
                    f"E={n_entries:,}: read-through of them",
                    f"{mm(read)} = {statistics.median(read) / statistics.median(cold):.2f}x "
                    "the floor (target <= 1)",
                ),
                (f"E={n_entries:,}: push of one new run (once)", f"{t_push[0]:.2f} s"),
                (f"E={n_entries:,}: floor: list entries, then objects (s3fs find)", mm(listing)),
                (f"E={n_entries:,}: floor: list entries and objects at once", mm(at_once)),
                (
                    f"E={n_entries:,}: gc --remote --dry-run",
                    f"{mm(gc_dry)} = {statistics.median(gc_dry) / statistics.median(at_once):.2f}x "
                    "the listings at once (target <= 10 s)",
                ),
                *scan_rows(f"E={n_entries:,}", scans),
                (
                    f"E={n_entries:,}: gc dry-run peak RSS",
                    f"{peaks[n_entries]:.0f} MiB (s3fs's two whole listings alone: "
                    f"{floors[n_entries]:.0f} MiB)",
                ),
            ]
            print("\n".join(f"{k}  {v}" for k, v in rows[-12:]), flush=True)
        # -- part 2m: memory per entry -------------------------------------------------
        sizes = [int(e) for e in args.memory_entries.split(",") if e]
        rows += memory_rows(server, sizes, env, args.repeat)
        # -- part 3 ----------------------------------------------------------------------
        if args.runs:
            url = server.new_bucket()
            remote = Remote(url)
            t0 = time.perf_counter()
            fill_runs(remote, args.runs)
            filled = time.perf_counter() - t0
            pipeline = write_pipeline(
                work, "hundred-runs", delay=0.05, rows=1000, batch=10, concurrency=1
            )
            benv = {**env, "BENCH_CALLS": str(work / "calls-runs")}
            origin = work / "origin-runs"
            timed_cas("run", str(pipeline), cache=origin, env=benv)
            timed_cas("push", url, cache=origin, env=benv)
            cold, first, later, gc_runs = [], [], [], []
            for i in range(args.repeat):
                fresh = work / f"fresh-runs-{i}"
                cold.append(timed_cas("run", str(pipeline), cache=fresh, env=benv))
                shutil.rmtree(fresh)
                empty = work / f"empty-runs-{i}"
                args_through = ("run", str(pipeline), "--remote", url)
                first.append(timed_cas(*args_through, cache=empty, env=benv))
                # The same store later: its batches gone (as if gc took them), what it
                # remembers of the remote kept.
                for kind in ("objects", "actions", "refs", "runs", "index"):
                    shutil.rmtree(empty / kind, ignore_errors=True)
                later.append(timed_cas(*args_through, cache=empty, env=benv))
                shutil.rmtree(empty)
                gc_dry = ("gc", "--remote", url, "--dry-run")
                gc_runs.append(timed_cas(*gc_dry, cache=origin, env=benv))
            floor = statistics.median(cold)
            rows += [
                (f"R={args.runs:,} runs: fill", f"{filled:.1f} s (not a figure)"),
                (f"R={args.runs:,}: compute 100 batches x 50 ms locally", f"{mm(cold)} (floor)"),
                (
                    f"R={args.runs:,}: read-through, first look at the remote",
                    f"{mm(first)} = {statistics.median(first) / floor:.2f}x the floor",
                ),
                (
                    f"R={args.runs:,}: read-through, a store that looked before",
                    f"{mm(later)} = {statistics.median(later) / floor:.2f}x the floor",
                ),
            ]
            rows.append(
                (f"R={args.runs:,}: gc --remote --dry-run (reads every manifest)", mm(gc_runs))
            )
            print("\n".join(f"{k}  {v}" for k, v in rows[-5:]), flush=True)
        if len(peaks) >= 2:
            (e1, m1), (e2, m2) = sorted(peaks.items())[0], sorted(peaks.items())[-1]
            f1, f2 = floors[e1], floors[e2]
            rows.append(
                (
                    "s3fs's two whole listings alone, per entry (what gc held before it read "
                    "pages)",
                    f"{(f2 - f1) * (1 << 20) / (e2 - e1):.0f} B",
                )
            )
            rows.append(
                (
                    "gc memory per entry",
                    f"{(m2 - m1) * (1 << 20) / (e2 - e1):.0f} B (target <= 200 B)",
                )
            )
        rows.append(("load average (end)", " ".join(f"{x:.2f}" for x in os.getloadavg())))
        print()
        report(rows)
        print(json.dumps({"done": True}))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        server.stop()


if __name__ == "__main__":
    main()
