"""Why a step recomputed, and what changed between two runs.

Everything comes from manifests: a run's step manifests (batch keys and output ids, what
was cached), its stored pipeline.yaml (params, fingerprints, code versions) and the run
it is compared with (by default the run this pipeline's ref named before it, else the
newest earlier run of the same pipeline name).
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from pydantic import BaseModel, Field

from castore.errors import CastoreError, ConfigError
from castore.hashing import canonical_json, hash_json
from castore.runs import RunInfo, list_runs, resolve_run
from castore.store import Store
from castore.store.manifests import RunManifest, StepManifest, load_model
from castore.yamlio import load_yaml


class StepExplanation(BaseModel):
    step: str
    status: str  # cached | computed | mixed | empty
    batches_cached: int
    batches_computed: int
    batches_failed: int
    rows_computed: int = 0
    rows_reused: int = 0  # rows of computed batches found by row key (row-wise steps)
    reasons: list[str] = Field(default_factory=list)
    changed_params: dict[str, list[Any]] = Field(default_factory=dict)  # name -> [old, new]


class ExplainReport(BaseModel):
    run: str
    against: str | None
    steps: list[StepExplanation]


class LeafDiff(BaseModel):
    leaf: str
    identical: bool  # equal batch ids: equal data, nothing read
    rows_a: int
    rows_b: int
    rows_added: int = 0
    rows_removed: int = 0
    added: list[dict[str, Any]] = Field(default_factory=list)  # up to 100 examples
    removed: list[dict[str, Any]] = Field(default_factory=list)


class DiffReport(BaseModel):
    a: str
    b: str
    steps_added: list[str]
    steps_removed: list[str]
    steps_changed: dict[str, list[str]]
    leaves: list[LeafDiff]


class _Run:
    """A run with what explain and diff read: manifests and the parsed pipeline.yaml."""

    def __init__(self, store: Store, oid: str) -> None:
        self.oid = oid
        self.m = load_model(store, oid, RunManifest)
        self.steps = {r.name: load_model(store, r.manifest, StepManifest) for r in self.m.steps}
        raw = store.get_bytes(self.m.pipeline_yaml) if self.m.pipeline_yaml else b""
        doc = load_yaml(raw, "stored pipeline.yaml") if raw else {}
        self.yaml = {s["name"]: s for s in (doc or {}).get("pipeline", {}).get("steps", [])}

    @property
    def label(self) -> str:
        return f"{self.m.name}/{self.m.signature[:12]} (run {self.oid[:12]})"

    def preds(self, step: str) -> list[str]:
        return [a for a, b in self.m.edges if b == step]

    def outputs(self, step: str) -> list[str]:
        s = self.steps.get(step)
        return [o for b in s.batches for o in b.outputs] if s else []


def _short(value: Any) -> Any:
    """Large values (inline rows) are shown by digest, not printed whole; rows that
    pipeline.yaml keeps as an object (castore/pipeline/inline.py) alike, by the same
    digest (of their canonical JSON)."""
    if isinstance(value, dict) and "castore_inline" in value:
        digest = str(value.get("blake3"))[:12]
        return f"<{value.get('rows')} rows, {value.get('bytes')} bytes, blake3 {digest}>"
    raw = canonical_json(value) if value is not None else b"null"
    if len(raw) <= 200:
        return value
    rows = f"{len(value)} rows, " if isinstance(value, list) else ""
    return f"<{rows}{len(raw)} bytes, blake3 {hash_json(value)[:12]}>"


def own_changes(a: dict[str, Any] | None, b: dict[str, Any]) -> tuple[list[str], dict]:
    """What changed in a step itself between two pipeline.yaml entries."""
    if a is None:
        return ["new step (not in the earlier run)"], {}
    reasons: list[str] = []
    params: dict[str, list[Any]] = {}
    # The module part may differ for the same class (a script run as __main__ or by
    # `cas run`); the fingerprint only hashes the qualified name, and so does this.
    ta, tb = (str(x.get("type", "")).rpartition(":")[2] for x in (a, b))
    if ta != tb:
        reasons.append(f"step type changed: {ta} → {tb}")
    pa, pb = a.get("params") or {}, b.get("params") or {}
    for k in sorted(set(pa) | set(pb)):
        if k != "name" and pa.get(k) != pb.get(k):
            params[k] = [_short(pa.get(k)), _short(pb.get(k))]
            reasons.append(f"param {k}: {params[k][0]!r} → {params[k][1]!r}")
    if a.get("code") != b.get("code") and "cache_version" not in params:
        reasons.extend(_code_changes(a.get("code_parts"), b.get("code_parts")))
    if a.get("extra") != b.get("extra"):
        reasons.append(
            "its input changed (the contents of the files it reads, or the commit of the "
            "hub dataset it loads)"
        )
    return reasons, params


def _code_changes(a: Any, b: Any) -> list[str]:
    """Which part of a step's code changed: `process`, or a helper, class, constant or
    package it reaches (pipeline.yaml's code_parts)."""
    if not isinstance(a, dict) or not isinstance(b, dict):
        return ["code of `process` changed"]
    out = []
    for label in sorted(set(a) | set(b)):
        if a.get(label) == b.get(label):
            continue
        what = "`process`" if label == "process" else label
        if label not in a:
            out.append(f"code: now reaches {what}")
        elif label not in b:
            out.append(f"code: no longer reaches {what}")
        elif label.startswith("environment variable "):
            out.append(f"value of {label} changed")
        elif label.startswith("file "):
            out.append(f"contents of {label} changed")
        else:
            out.append(f"code of {what} changed")
    return out or ["code of `process` changed"]


def _previous(store: Store, run: _Run, against: str | None) -> _Run | None:
    if against is not None:
        return _Run(store, resolve_run(store, against).oid)
    if run.m.previous and store.has(run.m.previous):
        return _Run(store, run.m.previous)
    earlier = [
        r
        for r in list_runs(store)
        if r.name == run.m.name and r.oid != run.oid and r.manifest.updated < run.m.started
    ]
    return _Run(store, earlier[0].oid) if earlier else None


def explain(
    store: Store, run: str, step: str | None = None, against: str | None = None
) -> ExplainReport:
    """For each step of `run` (a name, signature prefix or run id prefix), whether its
    batches were cached or computed and, for computed ones, why."""
    info: RunInfo = resolve_run(store, run)
    cur = _Run(store, info.oid)
    prev = _previous(store, cur, against)
    names = [r.name for r in cur.m.steps]
    if step is not None and step not in names:
        raise ConfigError(f"run {info.name} has no step {step!r}; steps: {', '.join(names)}")
    own: dict[str, list[str]] = {}
    out = []
    for name in names:
        changes, params = own_changes(prev.yaml.get(name) if prev else None, cur.yaml.get(name, {}))
        own[name] = changes if prev else []
        st = cur.m.stats.get(name)
        cached = st.batches_cached if st else 0
        computed = st.batches_computed if st else 0
        failed = st.batches_failed if st else 0
        status = (
            "empty"
            if not cached + computed + failed
            else "cached"
            if not computed + failed
            else "computed"
            if not cached
            else "mixed"
        )
        reasons = [] if status in ("cached", "empty") else _why(cur, prev, name, own, changes)
        if name == step or step is None:
            out.append(
                StepExplanation(
                    step=name,
                    status=status,
                    batches_cached=cached,
                    batches_computed=computed,
                    batches_failed=failed,
                    rows_computed=st.rows_computed if st else 0,
                    rows_reused=st.rows_reused if st else 0,
                    reasons=reasons,
                    changed_params=params,
                )
            )
    return ExplainReport(run=cur.label, against=prev.label if prev else None, steps=out)


def _why(
    cur: _Run, prev: _Run | None, name: str, own: dict[str, list[str]], changes: list[str]
) -> list[str]:
    if not cur.m.use_cache:
        return ["--no-cache / use_cache=False: every batch was recomputed"]
    if prev is None:
        return ["no earlier run of this pipeline to reuse"]
    if changes:
        return list(changes)
    # An earlier run that stopped (Ctrl+C, kill, a failure) left its steps unfinished:
    # the batches after where it stopped are new work, not a change upstream.
    stopped = prev.m.status != "finished"

    def unfinished(step: str) -> bool:
        m = prev.steps.get(step)
        return stopped and (m is None or not m.complete)

    reasons = []
    for p in cur.preds(name):
        old, new = prev.outputs(p), cur.outputs(p)
        if new == old or (unfinished(p) and new[: len(old)] == old):
            continue
        root = _root_cause(cur, p, own)
        because = f" (because {root} changed)" if root and root != p else ""
        reasons.append(f"upstream step {p}'s output changed{because}")
    if reasons:
        return reasons
    return _batch_reasons(cur, prev, name, unfinished(name))


def _batch_reasons(cur: _Run, prev: _Run, name: str, unfinished: bool) -> list[str]:
    """Why each computed batch of `name` was not a hit, counted by reason."""
    before = {b.key: b for b in prev.steps[name].batches} if name in prev.steps else {}
    not_reached = (
        f"not reached by the earlier run, which stopped ({prev.m.status}) before this step finished"
    )
    counts: Counter[str] = Counter()
    for b in cur.steps[name].batches:
        if b.cached:
            continue
        old = before.get(b.key)
        if old is None:
            counts[
                not_reached if unfinished else "its input batches are new (not computed before)"
            ] += 1
        elif old.failed:
            counts["a batch that failed before was retried"] += 1
        else:
            counts["an object it needed was missing or corrupt, so it was recomputed"] += 1
        if b.failed:
            counts["a batch failed again (kept with on_error='skip', not cached)"] += 1
    return [f"{why} ({n} batch{'es' if n > 1 else ''})" for why, n in counts.items()]


def _root_cause(run: _Run, step: str, own: dict[str, list[str]]) -> str | None:
    """The nearest step at or above `step` that changed itself."""
    seen, todo = set(), [step]
    while todo:
        s = todo.pop(0)
        if s in seen:
            continue
        seen.add(s)
        if own.get(s):
            return s
        todo.extend(run.preds(s))
    return None


def diff(store: Store, a: str, b: str) -> DiffReport:
    """Two runs side by side: steps added, removed, changed (with param diffs), and per
    leaf the rows added and removed: equal batch ids are equal data and are not read."""
    ra, rb = _Run(store, resolve_run(store, a).oid), _Run(store, resolve_run(store, b).oid)
    sa, sb = set(ra.yaml), set(rb.yaml)
    changed = {}
    for s in sorted(sa & sb):
        reasons, _ = own_changes(ra.yaml[s], rb.yaml[s])
        if reasons:
            changed[s] = reasons
    leaves = []
    for leaf in rb.m.leaves:
        if leaf not in ra.steps:
            continue
        oa, ob = ra.outputs(leaf), rb.outputs(leaf)
        rows_a, rows_b = ra.steps[leaf].rows, rb.steps[leaf].rows
        if oa == ob:
            leaves.append(LeafDiff(leaf=leaf, identical=True, rows_a=rows_a, rows_b=rows_b))
            continue
        leaves.append(_row_diff(store, leaf, oa, ob, rows_a=rows_a, rows_b=rows_b))
    return DiffReport(
        a=ra.label,
        b=rb.label,
        steps_added=sorted(sb - sa),
        steps_removed=sorted(sa - sb),
        steps_changed=changed,
        leaves=leaves,
    )


def _rows(store: Store, oids: list[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for oid in oids:
        out.extend(store.get_table(oid).to_pylist())
    return out


def _row_diff(
    store: Store, leaf: str, oa: list[str], ob: list[str], *, rows_a: int, rows_b: int
) -> LeafDiff:
    """Rows as multisets: only the batches that differ are read."""
    common = set(oa) & set(ob)
    try:
        left = _rows(store, [o for o in oa if o not in common])
        right = _rows(store, [o for o in ob if o not in common])
    except CastoreError as e:
        raise CastoreError(f"cannot compare {leaf}: {e}") from None

    def key(r: dict[str, Any]) -> str:
        return json.dumps(r, sort_keys=True, default=str)

    ca, cb = Counter(map(key, left)), Counter(map(key, right))
    removed, added = ca - cb, cb - ca
    return LeafDiff(
        leaf=leaf,
        identical=False,
        rows_a=rows_a,
        rows_b=rows_b,
        rows_added=sum(added.values()),
        rows_removed=sum(removed.values()),
        added=[json.loads(k) for k in list(added.elements())[:100]],
        removed=[json.loads(k) for k in list(removed.elements())[:100]],
    )
