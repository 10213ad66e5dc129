"""Pipelines that scenario tests run through `cas` as real subprocesses."""

from __future__ import annotations

import os


def record_call(batch_id: object) -> None:
    """Append `<pid> <batch_id>` to $CASTORE_TEST_CALLS: the tests count paid work."""
    calls = os.environ.get("CASTORE_TEST_CALLS")
    if calls:
        with open(calls, "a") as f:
            f.write(f"{os.getpid()} {batch_id}\n")


def fail_if_env(inputs: list[dict]) -> list[dict]:
    """For resume tests of library runs: fails while $CASTORE_TEST_FAIL is set."""
    if os.environ.get("CASTORE_TEST_FAIL"):
        raise RuntimeError("failing on purpose")
    return [{**r, "ok": True} for r in inputs]
