"""What a run leaves in the store (issue 16): bytes and files per batch for pipelines of
1, 3 and 6 steps over the 20,000 rows of bench_overhead's anchor (batch 50), against
the floor of the final data written as one Parquet file (pyarrow's defaults, as in
bench_overhead; its size with castore's zstd options is shown too), with where the bytes
are: each step's batch objects (and how many extend their input), the step and run
manifests, the entry pack, the inline rows object and the rest. The same for the
prose-like rows, which compress like real prompts.

1 step is the loader alone, 3 the anchor (loader -> generate -> post), 6 the anchor with
three more steps, each adding a column. Sizes barely vary between runs (manifests and the
run log hold timings and ids): each pipeline is run twice into new stores and the
difference is shown; nothing is timed.

    python benchmarks/bench_footprint.py
"""

from __future__ import annotations

import argparse
import collections
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pyarrow as pa
import pyarrow.parquet as pq
from _util import report
from bench_overhead import BATCH, Generate, Post, anchor_rows, text_rows, tree

from castore import Pipeline, StepInput, step
from castore.runs import list_runs
from castore.steps import LoadDataFromDicts
from castore.store import Store
from castore.store.manifests import StepManifest, load_model
from castore.store.parquet import EXTENDS_KEY, write_parquet


@step(inputs=["length"], outputs=["score"])
def Score(inputs: StepInput):
    return [{**r, "score": r["length"] % 7} for r in inputs]


@step(inputs=["score"], outputs=["label"])
def Label(inputs: StepInput):
    return [{**r, "label": "long" if r["score"] > 3 else "short"} for r in inputs]


@step(inputs=["prompt"], outputs=["title"])
def Title(inputs: StepInput):
    return [{**r, "title": r["prompt"][:12].upper()} for r in inputs]


def build(rows: list[dict], n_steps: int, cache: Path) -> str:
    """Runs the pipeline of `n_steps` steps on `cache`; returns its leaf's name."""
    after = [(Generate, "generate"), (Post, "post"), (Score, "score"), (Label, "label")]
    after += [(Title, "title")]
    with Pipeline(name=f"footprint{n_steps}") as p:
        chain = [LoadDataFromDicts(name="load", data=rows, batch_size=BATCH)]
        for cls, name in after[: n_steps - 1]:
            chain.append(cls(name=name, input_batch_size=BATCH))
            chain[-2] >> chain[-1]
    p.execute(cache_dir=cache, quiet=True)
    return chain[-1].name


def final_floor(store: Store, leaf: str) -> tuple[int, int]:
    """Bytes of the run's final data (its leaf's rows) as one Parquet file: written with
    pyarrow's defaults (bench_overhead's floor, what a plain loop writes), and with
    castore's own options (zstd, no statistics or dictionaries)."""
    tables = [store.get_table(o) for b in step_manifest(store, leaf).batches for o in b.outputs]
    table = pa.concat_tables(tables)
    plain, own = pa.BufferOutputStream(), pa.BufferOutputStream()
    pq.write_table(table, plain)
    write_parquet(table, own)
    return len(plain.getvalue()), len(own.getvalue())


def step_manifest(store: Store, name: str) -> StepManifest:
    run = next(iter(list_runs(store)))
    ref = next(r for r in run.manifest.steps if r.name == name)
    return load_model(store, ref.manifest, StepManifest)


def breakdown(store: Store, root: Path) -> dict[str, tuple[int, int]]:
    """(bytes, files) per kind of what the store holds."""
    run = next(iter(list_runs(store)))
    kinds: dict[str, str] = {}  # object id -> kind
    extended = collections.Counter()
    for ref in run.manifest.steps:
        kinds[ref.manifest] = "step manifests"
        for b in load_model(store, ref.manifest, StepManifest).batches:
            for o in b.outputs:
                kinds[o] = f"objects of {ref.name}"
                meta = pq.read_schema(store.path_of(o)).metadata or {}
                extended[ref.name] += EXTENDS_KEY in meta
    kinds[run.oid] = "run manifest"
    out: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    seen: set[tuple[int, int]] = set()
    for p in root.rglob("*"):
        if not p.is_file():
            continue
        st = p.stat()
        if (st.st_dev, st.st_ino) in seen:
            continue  # a run folder's hard link to an object
        seen.add((st.st_dev, st.st_ino))
        rel = p.relative_to(root).parts
        if rel[0] == "objects":
            oid = rel[-2] + rel[-1]
            kind = kinds.get(oid) or _sniff(p)
        elif rel[0] == "runs":
            kind = f"run folder: {rel[-1]}"
        else:
            kind = f"{rel[0]}/"
        out[kind][0] += st.st_size
        out[kind][1] += 1
    for name, n in extended.items():
        if n:
            key = f"objects of {name}"
            out[f"{key} ({n} extend their input)"] = out.pop(key)
    return {k: (v[0], v[1]) for k, v in out.items()}


def _sniff(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"ARROW1"):
        return "entry pack"
    if head.startswith(b"(\xb5/\xfd"):
        return "inline rows (zstd JSON)"
    return "other objects (pipeline.yaml, run log, ...)"


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    work = Path(tempfile.mkdtemp(prefix="castore-bench-footprint-"))
    lines: list[tuple[str, str]] = []
    try:
        for label, rows in (("anchor", anchor_rows()), ("prose-like", text_rows())):
            n_batches = len(rows) // BATCH
            for n_steps in (1, 3, 6):
                sizes = []
                for rep in range(2):
                    cache = work / f"{label}-{n_steps}-{rep}"
                    leaf = build(rows, n_steps, cache)
                    sizes.append(tree(cache))
                spread = abs(sizes[0][0] - sizes[1][0])
                size, disk, paths, files = sizes[0]
                store = Store(cache)
                floor, zstd_floor = final_floor(store, leaf)
                batch_steps = n_batches * n_steps
                lines.append(
                    (
                        f"{label}, {n_steps} step{'s' * (n_steps > 1)}",
                        f"{size / 1e6:.2f} MB ({disk / 1e6:.2f} MB on disk) in {files:,} files "
                        f"({paths:,} paths) vs the final data as one Parquet {floor / 1e6:.2f} MB "
                        f"({zstd_floor / 1e6:.2f} MB with castore's options):"
                        f" {size / floor:.2f}x ({disk / floor:.2f}x on disk); per batch "
                        f"{size / n_batches / 1e3:.2f} kB, {files / n_batches:.2f} files; per "
                        f"batch and step {files / batch_steps:.2f} files (targets <= 2x, "
                        f"<= 1.1 files); a second run's store differed by {spread} B",
                    )
                )
                parts = sorted(breakdown(store, cache).items())
                for kind, (nbytes, n) in parts:
                    lines.append(
                        (
                            f"  {kind}",
                            f"{nbytes / 1e6:.3f} MB in {n:,} files = {nbytes / floor:.2f}x",
                        )
                    )
                print("\n".join(f"{k}  {v}" for k, v in lines[-1 - len(parts) :]), flush=True)
        print()
        report(lines)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
