"""Shared helpers: best-of-N timing and peak RSS, so every ratio uses the same method."""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable


def best_of(
    fn: Callable[[], object], repeat: int = 7, setup: Callable[[], object] | None = None
) -> float:
    """Fastest wall time of `repeat` calls (the least noisy estimate on a shared machine);
    `setup` runs before each call, untimed."""
    best = float("inf")
    for _ in range(repeat):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def timed(fn: Callable[[], object]) -> float:
    """Wall time of one call of `fn`."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def peak_rss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1 << 20) if sys.platform == "darwin" else rss / 1024


def report(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")


def fake_run(store, name: str, seed: object, oids: list[str]) -> str:
    """A finished one-step run whose batches are `oids`, with its ref; returns its id.
    Lets a benchmark build a store of any size without running a pipeline."""
    from castore.hashing import hash_json
    from castore.store.manifests import BatchRecord, RunManifest, StepManifest, StepRef
    from castore.store.models import now_utc

    records = [
        BatchRecord(key=hash_json([seed, i]), outputs=[o], rows=[1], cached=False)
        for i, o in enumerate(oids)
    ]
    step = StepManifest(
        name="s",
        step_class="m:S",
        fingerprint=hash_json(["fp", seed]),
        signature=hash_json(["sig", seed]),
        complete=True,
        batches=records,
    )
    sid = store.put_bytes(step.model_dump_json().encode())
    sig = hash_json(["run", seed])
    run = RunManifest(
        run_id=f"r{seed}",
        name=name,
        signature=sig,
        status="finished",
        started=now_utc(),
        steps=[StepRef(name="s", manifest=sid)],
        edges=[],
        leaves=["s"],
    )
    oid = store.put_bytes(run.model_dump_json().encode())
    store.set_ref(name, sig, oid)
    return oid
