"""Step and run manifests: JSON objects in objects/ that tie a run to its batches.

The graph gc, fsck, push/pull and Distiset walk: ref → run manifest → step manifests →
batch objects (and the pipeline.yaml / pipeline.log objects).
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from castore._version import __version__
from castore.errors import StoreError
from castore.store.models import Oid, now_utc

if TYPE_CHECKING:
    from castore.store.store import Store

M = TypeVar("M", bound=BaseModel)
RunStatus = Literal["running", "interrupted", "failed", "finished", "waiting"]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BatchRecord(_Model):
    """One planned batch of a step, in plan order."""

    key: Oid
    outputs: list[Oid]
    rows: list[int]
    cached: bool
    # What computing this batch cost when it was computed (also on a hit: then it is
    # what the cache saved).
    seconds: float = 0.0
    tokens: int = 0
    cost_usd: float = 0.0  # tokens at the step's LLM `prices` (0 without prices)
    failed: bool = False  # kept with on_error="skip": not cached, recomputed next run
    # Row-wise steps: the segment object mapping each output row's row key to it, and
    # how many of the rows were taken from earlier results by row key.
    row_index: Oid | None = None
    rows_reused: int = 0
    # The outputs extend their input (castore.store.extend). What they read with them is
    # the outputs of the run's earlier steps, which every walk of a run reaches anyway;
    # the objects are named in the entry (`info.needs`), for what walks entries alone.
    extends: bool = False

    @model_serializer(mode="wrap")
    def _lean(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Fields at their default are left out: a step manifest names every batch, and
        these were a quarter of its bytes (bench_overhead); reading fills them back."""
        data: dict[str, Any] = handler(self)
        for name in _LEAN:
            if data.get(name) == _DEFAULTS[name]:
                data.pop(name, None)
        return data


_LEAN = ("tokens", "cost_usd", "failed", "row_index", "rows_reused", "extends")
_DEFAULTS = {name: BatchRecord.model_fields[name].get_default() for name in _LEAN}


class StepManifest(_Model):
    schema_version: Literal[1] = 1
    kind: Literal["step"] = "step"
    name: str
    step_class: str
    fingerprint: Oid
    signature: Oid
    complete: bool
    batches: list[BatchRecord]
    columns: list[tuple[str, str]] = Field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(sum(b.rows) for b in self.batches)


class StepStats(_Model):
    batches_total: int | None = None
    batches_cached: int = 0
    batches_computed: int = 0
    batches_failed: int = 0
    rows: int = 0
    rows_cached: int = 0
    rows_computed: int = 0
    compute_seconds: float = 0.0
    seconds_saved: float = 0.0
    tokens_spent: int = 0
    tokens_saved: int = 0
    rows_reused: int = 0  # rows of computed batches taken from earlier results by row key
    # The tokens at the step's LLM `prices` (USD; 0 when it has none).
    cost_spent_usd: float = 0.0
    cost_saved_usd: float = 0.0


class Target(_Model):
    """What `cas resume` re-invokes: a file, a module attribute or a pipeline.yaml."""

    kind: Literal["file", "module", "yaml", "api"]
    path: str | None = None
    attr: str | None = None
    cwd: str | None = None


class StepRef(_Model):
    name: str
    manifest: Oid


class RunManifest(_Model):
    schema_version: Literal[1] = 1
    kind: Literal["run"] = "run"
    run_id: str
    name: str
    signature: Oid
    status: RunStatus
    started: datetime
    updated: datetime = Field(default_factory=now_utc)
    ended: datetime | None = None
    steps: list[StepRef]
    edges: list[tuple[str, str]]
    leaves: list[str]
    parameters: dict[str, dict[str, Any]] = Field(default_factory=dict)
    target: Target | None = None
    use_cache: bool = True
    pipeline_yaml: Oid | None = None
    # Rows pipeline.yaml keeps as objects (castore/pipeline/inline.py): part of the recipe.
    inline: list[Oid] = Field(default_factory=list)
    log: Oid | None = None
    stats: dict[str, StepStats] = Field(default_factory=dict)
    error: str | None = None
    # The run manifest this pipeline's ref named before this run (for `cas explain`);
    # not part of the run's closure, so gc does not keep old runs alive through it.
    previous: Oid | None = None
    castore_version: str = __version__

    def files(self) -> list[str]:
        """The objects of the run itself, besides its steps': pipeline.yaml, the rows it
        names, the log."""
        return [o for o in (self.pipeline_yaml, *self.inline, self.log) if o]

    def step_manifest_id(self, name: str) -> str:
        for ref in self.steps:
            if ref.name == name:
                return ref.manifest
        raise StoreError(f"run {self.run_id} has no step {name!r}")


def load_model(store: Store, oid: str, model: type[M]) -> M:
    """Read a JSON object (digest verified first) into `model`."""
    raw = store.get_bytes(oid)
    try:
        return model.model_validate_json(raw)
    except ValueError as e:
        first = str(e).splitlines()[0]
        raise StoreError(f"object {oid} is not a valid {model.__name__}: {first}") from None


class ManifestLoader(Protocol):
    """Reads a JSON object as a model: a local store's load_model or Remote.load_json."""

    def __call__(self, oid: str, model: type[M], /) -> M: ...


def manifest_closure(load: ManifestLoader, run_oid: str) -> tuple[RunManifest, set[str]]:
    """A run manifest and every object id it reaches (itself included), reading
    manifests through `load` (a local store's or a remote's)."""
    run = load(run_oid, RunManifest)
    reached = {run_oid}
    reached.update(run.files())
    for ref in run.steps:
        reached.add(ref.manifest)
        step = load(ref.manifest, StepManifest)
        for b in step.batches:
            reached.update(b.outputs)
            if b.row_index:
                reached.add(b.row_index)
    return run, reached


def run_closure(store: Store, run_oid: str) -> tuple[RunManifest, set[str]]:
    """`manifest_closure` of a run in a local store."""
    return manifest_closure(lambda oid, model: load_model(store, oid, model), run_oid)
