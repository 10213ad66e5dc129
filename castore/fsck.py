"""`cas fsck`: verify every object, action entry, ref and manifest in a store."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from castore.errors import CastoreError
from castore.store import Store
from castore.store.manifests import run_closure
from castore.store.models import ActionEntry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Problem:
    kind: str  # corrupt-object | bad-action | dangling-action | bad-ref | dangling-ref | ...
    id: str
    message: str
    repaired: bool = False

    def line(self) -> str:
        fixed = " (repaired)" if self.repaired else ""
        return f"{self.kind} {self.id}: {self.message}{fixed}"


@dataclass
class FsckReport:
    objects_checked: int = 0
    actions_checked: int = 0
    refs_checked: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.problems


def check(
    store: Store,
    *,
    repair: bool = False,
    progress: Callable[[int], None] | None = None,
) -> FsckReport:
    """Verify the whole store. With `repair`, quarantine corrupt objects and drop dangling
    action entries and refs; nothing else is ever deleted."""
    report = FsckReport()
    corrupt: set[str] = set()
    for oid in store.iter_oids():
        report.objects_checked += 1
        if progress:
            progress(report.objects_checked)
        if not store.verify(oid):
            corrupt.add(oid)
            if repair:
                store.quarantine(oid)
            report.problems.append(
                Problem("corrupt-object", oid, "digest mismatch", repaired=repair)
            )
    _check_actions(store, report, corrupt, repair)
    _check_refs(store, report, corrupt, repair)
    return report


def _check_actions(store: Store, report: FsckReport, corrupt: set[str], repair: bool) -> None:
    for key in store.iter_actions():
        report.actions_checked += 1
        try:
            with open(store.layout.action_path(key), "rb") as f:
                entry = ActionEntry.model_validate_json(f.read())
        except (OSError, ValueError):
            if repair:
                store.delete_action(key)
            report.problems.append(Problem("bad-action", key, "unreadable entry", repair))
            continue
        gone = [o for o in entry.outputs if o in corrupt or not store.has(o)]
        if gone:
            if repair:
                store.delete_action(key)
            report.problems.append(
                Problem("dangling-action", key, f"output {gone[0]} is missing", repair)
            )


def _check_refs(store: Store, report: FsckReport, corrupt: set[str], repair: bool) -> None:
    for name, sig, oid in store.list_refs():
        report.refs_checked += 1
        ref = f"{name}/{sig[:12]}"
        if oid in corrupt or not store.has(oid):
            if repair:
                store.delete_ref(name, sig)
            report.problems.append(
                Problem("dangling-ref", ref, f"run manifest {oid} is missing", repair)
            )
            continue
        try:
            _run, reached = run_closure(store, oid)
        except CastoreError as e:
            report.problems.append(Problem("bad-manifest", ref, str(e)))
            continue
        missing = sorted(o for o in reached if o in corrupt or not store.has(o))
        if missing:
            # Not repairable by deleting: the next run of the pipeline recomputes them.
            report.problems.append(
                Problem(
                    "missing-object",
                    ref,
                    f"{len(missing)} object(s) the run references are missing, e.g. "
                    f"{missing[0]}; re-running the pipeline recomputes them",
                )
            )
