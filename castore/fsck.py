"""`cas fsck`: verify every object, action entry, ref and manifest in a store."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from castore.errors import BadObject, CastoreError
from castore.hashing import hash_file_tail, validate_id
from castore.store import Store, rowpack
from castore.store import layout as L
from castore.store.extend import EXTENDS_KEY, closed, closed_over, needs_in, needs_of
from castore.store.manifests import RunManifest, StepManifest, run_closure
from castore.store.models import ActionEntry
from castore.store.parquet import PARQUET_MAGIC

if TYPE_CHECKING:
    from castore.remote import Remote

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Problem:
    kind: str  # corrupt-object | bad-action | dangling-action | bad-ref | dangling-ref | ...
    id: str
    message: str
    repaired: bool = False

    def line(self) -> str:
        fixed = " (repaired)" if self.repaired else ""
        said = f": {self.message}" if self.message else ""
        return f"{self.kind} {self.id}{said}{fixed}"


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
    """Verify the whole store. With `repair`, quarantine corrupt or malformed objects and
    drop dangling action entries and refs; nothing else is ever deleted."""
    report = FsckReport()
    corrupt = _check_objects(store, report, repair, progress)
    _check_actions(store, report, corrupt, repair)
    _check_refs(store, report, corrupt, repair)
    for fp, seg in store.iter_row_segments():
        if seg in corrupt or not store.has(seg):
            if repair:
                store.drop_row_segment(fp, seg)
            report.problems.append(
                Problem("dangling-index", f"{fp[:12]}/{seg[:12]}", "segment is missing", repair)
            )
    for fp, pack in rowpack.iter_pointers(store):
        if pack is None or pack in corrupt or not store.has(pack):
            if repair:
                rowpack.drop(store, fp)  # a pack is derived: the next run writes another
            what = "pack pointer is malformed" if pack is None else "pack is missing or damaged"
            report.problems.append(Problem("dangling-index", f"{fp[:12]}.pack", what, repair))
    report.problems += _job_problems(store)
    return report


def _check_objects(
    store: Store, report: FsckReport, repair: bool, progress: Callable[[int], None] | None
) -> set[str]:
    """Every object's digest and footer; returns the ids that cannot be read."""
    corrupt: set[str] = set()
    for oid in store.iter_oids():
        report.objects_checked += 1
        if progress:
            progress(report.objects_checked)
        problem = _object_problem(store, oid)
        if problem is None:
            continue
        corrupt.add(oid)
        if repair:
            store.quarantine(oid)
        report.problems.append(dataclasses.replace(problem, repaired=repair))
    return corrupt


def _object_problem(store: Store, oid: str) -> Problem | None:
    try:
        digest, tail = hash_file_tail(store.path_of(oid), _TAIL)
    except FileNotFoundError:
        return None  # gone since it was listed (a gc beside us)
    if digest != oid:
        return Problem("corrupt-object", oid, "digest mismatch")
    if not _names_extension(tail):
        return None
    try:
        closed(store, oid, needs_of(store, oid))
    except BadObject as e:
        # Intact bytes castore would not have written (a crafted extension footer):
        # reading them fails, so they are as good as corrupt. An object this one reads
        # may be the bad one: it is reported (and quarantined) as itself.
        return Problem("bad-object", oid, e.why) if e.oid == oid else None
    return None


# Enough for the footer of any batch object castore writes; a longer one is read whole.
_TAIL = 64 << 10


def _names_extension(tail: bytes) -> bool:
    """Whether a Parquet file ending in `tail` may hold an extension's key in its footer
    (False for a manifest, which is JSON; True when the footer is longer than `tail`)."""
    if len(tail) < 12 or tail[-4:] != PARQUET_MAGIC:
        return False
    length = int.from_bytes(tail[-8:-4], "little")
    return length + 8 > len(tail) or EXTENDS_KEY in tail[-8 - length : -8]


def _job_problems(store: Store) -> list[Problem]:
    """Batch job records (jobs/<key>.json) that cannot be read or are filed under
    another key. Never repaired: a record is what says a job was paid for."""
    from castore.batchjobs import record_files

    out = []
    for name, rec in record_files(store):
        if rec is None:
            out.append(Problem("bad-job-record", name, "unreadable"))
        elif name != f"{rec.key}.json":
            out.append(Problem("bad-job-record", name, f"holds the record of {rec.key[:12]}"))
    return out


def _check_actions(store: Store, report: FsckReport, corrupt: set[str], repair: bool) -> None:
    for key in store.iter_actions():
        report.actions_checked += 1
        try:
            raw = store.read_action(key)
            if raw is None:
                continue  # dropped since listed
            entry = ActionEntry.model_validate_json(raw)
        except (OSError, ValueError):
            if repair:
                store.delete_action(key)
            report.problems.append(Problem("bad-action", key, "unreadable entry", repair))
            continue
        gone = [o for o in (*entry.outputs, *entry.needs()) if o in corrupt or not store.has(o)]
        if gone:
            if repair:
                store.delete_action(key)
            report.problems.append(
                Problem("dangling-action", key, f"output {gone[0]} is missing", repair)
            )


def _check_refs(store: Store, report: FsckReport, corrupt: set[str], repair: bool) -> None:
    """Every file under refs/runs/: its name, its content (one run manifest id), its
    target (present, intact, a run manifest of that very name and signature) and what
    the run reaches. --repair rewinds a bad ref to the newest intact run manifest of the
    same name and signature, else removes it."""
    base = store.layout.ref_dir()
    try:
        names = sorted(os.listdir(base))
    except FileNotFoundError:
        return
    candidates: dict[tuple[str, str], str] | None = None
    for name in names:
        name_dir = os.path.join(base, name)
        try:
            L.validate_name(name)
            sigs = sorted(os.listdir(name_dir))
        except (CastoreError, NotADirectoryError) as e:
            report.refs_checked += 1
            if repair:
                _remove_path(name_dir)
            report.problems.append(Problem("bad-ref", name, str(e).split(":")[0], repair))
            continue
        for sig in sigs:
            report.refs_checked += 1
            ref = f"{name}/{sig[:12]}"
            problem = _ref_problem(store, name, sig, corrupt)
            if problem is None:
                continue
            kind, message = problem
            repaired = False
            if repair and kind != "missing-object":
                if candidates is None:
                    candidates = _good_runs(store, corrupt)
                good = candidates.get((name, sig))
                if good is not None:
                    store.set_ref(name, sig, good)
                    message += f"; rewound to run manifest {good[:12]}"
                else:
                    _remove_path(os.path.join(name_dir, sig))
                    message += "; removed (no intact run of it is left)"
                repaired = True
            report.problems.append(Problem(kind, ref, message, repaired))
        if repair:
            with contextlib.suppress(OSError):
                os.rmdir(name_dir)  # only when empty


def _ref_problem(  # noqa: PLR0911 - one return per way a ref can be wrong
    store: Store, name: str, sig: str, corrupt: set[str]
) -> tuple[str, str] | None:
    try:
        validate_id(sig)
    except CastoreError:
        return "bad-ref", "the file name is not a pipeline signature"
    try:
        oid = store.get_ref(name, sig)
    except CastoreError as e:
        return "bad-ref", str(e).split("; run `cas fsck")[0]
    if oid is None:
        return None
    if oid in corrupt or not store.has(oid):
        return "dangling-ref", f"run manifest {oid} is missing"
    try:
        run, reached = run_closure(store, oid)
    except CastoreError as e:
        return "bad-manifest", str(e)
    if run.name != name or run.signature != sig:
        return "bad-ref", f"names a run of {run.name}/{run.signature[:12]}, not of this pipeline"
    missing = sorted(o for o in reached if o in corrupt or not store.has(o))
    if missing:
        # Not repairable by deleting: the next run of the pipeline recomputes them.
        return (
            "missing-object",
            f"{len(missing)} object(s) the run references are missing, e.g. "
            f"{missing[0]}; re-running the pipeline recomputes them",
        )
    return None


def _good_runs(store: Store, corrupt: set[str]) -> dict[tuple[str, str], str]:
    """(name, signature) -> the newest run manifest whose closure is intact. Scans the
    JSON objects of the store: only --repair of a bad ref pays for it."""
    best: dict[tuple[str, str], tuple[Any, str]] = {}
    for oid in store.iter_oids():
        if oid in corrupt:
            continue
        try:
            with open(store.path_of(oid), "rb") as f:
                if f.read(1) != b"{" or store.size_of(oid) > 64 << 20:
                    continue
            run, reached = run_closure(store, oid)
        except (OSError, CastoreError):
            continue
        if any(o in corrupt or not store.has(o) for o in reached):
            continue
        when = run.ended or run.updated
        key = (run.name, run.signature)
        if key not in best or when > best[key][0]:
            best[key] = (when, oid)
    return {k: v[1] for k, v in best.items()}


def _remove_path(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


# -- on a remote ------------------------------------------------------------------------


def check_remote(remote: Remote, *, jobs: int = 8) -> FsckReport:
    """`check` for a remote (read-only): every object downloaded and verified, entries
    (present outputs, agreement with the step manifests, signatures with a team key),
    row-segment markers (their segment present) and refs (name, target, the run's
    objects). Same report type as `check`."""
    from castore.remote_layout import require_store

    require_store(remote)  # a mistyped URL is not a clean remote
    oids = remote.list_oids()
    report = FsckReport(objects_checked=len(oids))
    report.problems += _remote_object_problems(remote, oids, jobs)
    entries: dict[str, ActionEntry] = {}
    for key in sorted(remote.list_actions()):
        report.actions_checked += 1
        entry, problem = remote.check_action(key)
        if entry is None:
            report.problems.append(Problem(problem[0] if problem else "bad-action", key, ""))
        elif any(o not in oids for o in (*entry.outputs, *entry.needs())):
            report.problems.append(Problem("dangling-action", key, ""))
        else:
            entries[key] = entry
    from castore import remote_segments

    for path, seg, _mtime in remote_segments.markers(remote):  # of runs writing through
        if seg not in oids:
            fp = path.rsplit("/", 3)[-3]
            report.problems.append(
                Problem("dangling-index", f"{fp[:12]}/{seg[:12]}", "segment is missing")
            )
    bad_refs: list[tuple[str, str]] = []
    refs = remote.list_refs(bad_refs)
    report.refs_checked = len(refs)
    report.problems += [Problem("bad-ref", ref, reason) for ref, reason in bad_refs]
    for name, sig, oid in refs:
        ref = f"{name}/{sig[:12]}"
        if oid not in oids:
            report.problems.append(Problem("dangling-ref", ref, ""))
            continue
        try:
            report.problems += _check_remote_run(remote, ref, (name, sig, oid), oids, entries)
        except CastoreError as e:
            report.problems.append(Problem("bad-manifest", ref, str(e)))
    return report


def _remote_object_problems(remote: Remote, oids: set[str], jobs: int) -> list[Problem]:
    """Each object downloaded and verified, and its footer checked as `check` does."""
    from concurrent.futures import ThreadPoolExecutor

    needs: dict[str, list[str]] = {}  # of the objects that extend their input

    def problem(oid: str) -> Problem | None:
        try:
            data = remote.get_object(oid)
        except Exception as e:  # every failure is reported, none stops the check
            return Problem("corrupt-object", oid, f"{type(e).__name__}: {e}")
        if _names_extension(data[-_TAIL:]):
            try:
                needs[oid] = needs_in(oid, data)
            except BadObject as e:
                return Problem("bad-object", oid, e.why)
        return None

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        out = [p for p in pool.map(problem, sorted(oids)) if p]
    for oid, named in sorted(needs.items()):
        try:
            closed_over(oid, named, lambda n: needs.get(n, []))
        except BadObject as e:
            out.append(Problem("bad-object", oid, e.why))
    return out


def _check_remote_run(
    remote: Remote,
    ref: str,
    target: tuple[str, str, str],
    oids: set[str],
    entries: dict[str, ActionEntry],
) -> list[Problem]:
    """Problems of one remote run: a ref naming another pipeline's run, missing objects,
    action entries that disagree with the step manifests."""
    name, sig, oid = target
    run = remote.load_json(oid, RunManifest)
    if run.name != name or run.signature != sig:
        return [Problem("bad-ref", ref, f"names a run of {run.name}/{run.signature[:12]}")]
    problems = []
    for step_ref in run.steps:
        if step_ref.manifest not in oids:
            problems.append(Problem("missing-object", ref, step_ref.manifest))
            continue
        step = remote.load_json(step_ref.manifest, StepManifest)
        gone = [o for b in step.batches for o in b.outputs if o not in oids]
        if gone:
            problems.append(Problem("missing-object", ref, gone[0]))
        for b in step.batches:
            e = entries.get(b.key)
            if e is not None and not b.failed and (e.outputs, e.rows) != (b.outputs, b.rows):
                msg = f"differs from step {step.name} of {ref}"
                problems.append(Problem("mismatched-action", b.key, msg))
    return problems
