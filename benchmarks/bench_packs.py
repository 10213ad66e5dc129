"""Entry-pack lookups as a store gathers packs (one per finished run until gc, or until a
run's end merges them): the cost of a miss and a hit with 0, 32 and 300 packs of 400
entries, against a miss in a store without packs (the loose file's open, measured in the
same repetition), the first lookup's load, and merging the packs into one against
reading their bytes. min / median of --repeat, with the load average.

    python benchmarks/bench_packs.py [--repeat 5]

To measure an older castore with this same file: PYTHONPATH=<its checkout> python ...
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import report, timed

import castore
from castore.store import Store, actionpack

PER_PACK, LOOKUPS = 400, 1200


def entry(rng: random.Random) -> bytes:
    """An entry as a run writes one: one output object, its row count, a check."""
    oid = rng.randbytes(32).hex()
    body = {"schema_version": 1, "outputs": [oid], "rows": [50], "check": rng.randbytes(32).hex()}
    return json.dumps(body, separators=(",", ":")).encode()


def seed(root: Path, packs: int) -> list[str]:
    """A store with `packs` packs; returns some of their keys."""
    rng = random.Random(packs)
    store = Store(root)
    keys: list[str] = []
    for _ in range(packs):
        entries = {rng.randbytes(32).hex(): entry(rng) for _ in range(PER_PACK)}
        actionpack.write_pack(store, entries)
        keys += list(entries)[:4]
    return keys


def per_lookup(store: Store, keys: list[str]) -> float:
    t0 = time.perf_counter()
    for k in keys:
        store.read_action(k)
    return (time.perf_counter() - t0) / len(keys)


def mm(v: list[float], scale: float = 1e6, unit: str = "us") -> str:
    return f"min {min(v) * scale:.1f} {unit}  median {statistics.median(v) * scale:.1f} {unit}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="castore-bench-packs-"))
    counts = (0, 32, 300)
    try:
        hits = {n: seed(work / f"seed-{n}", n) for n in counts}
        # A folder changed under 3 s ago is listed on every miss (a change in the same
        # clock tick would not show in its stamp): measure a store at rest, as after a run.
        time.sleep(3.2)
        rng = random.Random(1)
        misses = [rng.randbytes(32).hex() for _ in range(LOOKUPS)]
        res: dict[str, list[float]] = {}

        def add(name: str, value: float) -> None:
            res.setdefault(name, []).append(value)

        for _ in range(args.repeat):
            for n in counts:
                # As a new process loads them (castore reads a pack once per process).
                getattr(actionpack, "_DECODED", {}).clear()
                store = Store(work / f"seed-{n}")
                add(f"load {n}", timed(lambda s=store: s.read_action(misses[0])))
                add(f"miss {n}", per_lookup(store, misses))
                if hits[n]:
                    add(f"hit {n}", per_lookup(store, hits[n] * 3))
            merge = getattr(actionpack, "merge", None)  # not in castore before it merged
            if merge is not None:
                copy = work / "merge"
                shutil.rmtree(copy, ignore_errors=True)
                shutil.copytree(work / "seed-300", copy)
                paths = [Store(copy).path_of(o) for o in actionpack.markers(Store(copy))]
                add("read 300", timed(lambda p=paths: [Path(x).read_bytes() for x in p]))
                store = Store(copy)
                add("merge 300", timed(lambda m=merge, s=store: m(s)))
        floor = res["miss 0"]
        lines = [
            ("castore", castore.__file__),
            ("load average", " ".join(f"{x:.2f}" for x in os.getloadavg())),
            ("miss, no packs (floor: the loose file's open)", mm(floor)),
        ]
        for n in counts[1:]:
            miss = res[f"miss {n}"]
            med = statistics.median(miss) / statistics.median(floor)
            x = f"{min(miss) / min(floor):.2f} / {med:.2f}"
            lines += [
                (f"{n} packs: first lookup (loads them)", mm(res[f"load {n}"], 1e3, "ms")),
                (f"{n} packs: miss", f"{mm(miss)}  = {x} x floor"),
                (f"{n} packs: hit", mm(res[f"hit {n}"])),
            ]
        if "merge 300" in res:
            x = statistics.median(res["merge 300"]) / statistics.median(res["read 300"])
            lines += [
                ("300 packs: read their bytes (floor)", mm(res["read 300"], 1e3, "ms")),
                (
                    "300 packs: merged into one",
                    f"{mm(res['merge 300'], 1e3, 'ms')}  = {x:.1f} x floor (medians)",
                ),
            ]
        report(lines)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
