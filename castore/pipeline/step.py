"""Steps: pydantic models with a `process` method, and the `@step` decorator.

A step's *fingerprint* is its own identity: class name, code version (explicit
`cache_version`, else the AST digest of `process`), declared columns and every field that
is not runtime-only. Runtime-only fields (name, batch sizes that the input descriptor
already captures, concurrency, retries, secrets) never enter a hash.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import re
import types
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    field_validator,
    model_validator,
)

from castore import arrowfiles
from castore.errors import NonCanonicalValue, PipelineError, UnhashableParam
from castore.filereads import file_parts, install
from castore.fingerprint import code_parts, code_version, user_classes
from castore.hashing import canonical_json, hash_json_spliced
from castore.pipeline.inline import Gathered, Inline, field_identity
from castore.pipeline.names import NAME_LISTS, names_list, step_columns
from castore.pipeline.routing import sample_n_steps
from castore.usercode import is_user_module, module_of

if TYPE_CHECKING:
    from castore.llms import Prices
    from castore.pipeline.pipeline import Pipeline

StepInput = list[dict[str, Any]]
StepOutput = Iterator[list[dict[str, Any]]]
StepKind = Literal["normal", "global", "generator"]

RUNTIME: dict[str, Any] = {"castore_runtime": True}
REDACTED = "**********"  # a secret's value wherever it is recorded


# The user modules imported after castore's steps: their reads as they import. pyarrow
# opens files in C++, unseen by the audit hook: its readers are wrapped.
install()
arrowfiles.install()

# The pipeline whose `with` block is open: steps created inside it join it. Kept here, not
# in pipeline.py, so that steps do not import the pipeline module.
CURRENT_PIPELINE: contextvars.ContextVar[Pipeline | None] = contextvars.ContextVar(
    "castore_pipeline", default=None
)


def current_pipeline() -> Pipeline | None:
    return CURRENT_PIPELINE.get()


def runtime_field(default: Any = None, **kw: Any) -> Any:
    """A field that does not change outputs (e.g. concurrency): kept out of every hash."""
    return Field(default, json_schema_extra=RUNTIME, **kw)


# Fields that are identity only when set: unset, they change nothing, so the keys stay
# those of castore versions without them (no mapping; every row of a loader).
_ONLY_WHEN_SET = ("input_mappings", "output_mappings", "num_examples")


# Methods castore calls besides `process` that can change what it returns.
_HOOKS = ("load", "model_post_init")
_MAX_HELD = 1000


def _snake(name: str) -> str:
    s = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", s).lower()


class _Step(BaseModel):
    """Fields and wiring shared by every kind of step."""

    # NaN/Inf are kept as floats in JSON dumps (pydantic's default writes null), so hashing
    # refuses them instead of hashing them like None.
    model_config = ConfigDict(
        arbitrary_types_allowed=True,
        validate_assignment=True,
        extra="forbid",
        ser_json_inf_nan="constants",
    )

    kind: ClassVar[StepKind] = "normal"
    inputs: ClassVar[list[str]] = []
    outputs: ClassVar[list[str]] = []
    # Installed packages whose versions enter the code version (third-party code is not
    # followed otherwise: an upgrade must not silently re-pay LLM work).
    code_packages: ClassVar[list[str]] = []
    # Environment variables the step's code reads that do not change its rows (a debug
    # flag, a switch a test sets): left out of the code version, which keys the others.
    ignore_env: ClassVar[list[str]] = []
    # Files the step's own code reads while it computes (castore/filereads.py):
    # `code_files` (globs) key the step by their contents; `ignore_files` cannot change
    # its rows; reading any other file stops the run.
    code_files: ClassVar[list[str]] = []
    ignore_files: ClassVar[list[str]] = []
    # Row-wise (castore/pipeline/rows.py): each output row depends only on its own input
    # row's row_key_columns() and is that row plus `outputs`; rows are reused by row key.
    row_wise: ClassVar[bool] = False
    # Fields holding local paths: pipeline.yaml records them relative to the project
    # (castore/pipeline/portable.py).
    path_fields: ClassVar[tuple[str, ...]] = ()
    # Fields of rows that may be large (LoadDataFromDicts' data): above a size they are
    # hashed by digest and kept as one store object that pipeline.yaml names
    # (castore/pipeline/inline.py).
    inline_fields: ClassVar[tuple[str, ...]] = ()

    name: str | None = runtime_field(None, description="Unique name in the pipeline.")
    input_batch_size: int = runtime_field(50, ge=1, description="Rows per input batch.")
    concurrency: int = runtime_field(1, ge=1, description="Batches of this step in flight.")
    max_retries: int = runtime_field(0, ge=0, description="Retries of a failing batch.")
    retry_backoff: float = runtime_field(0.5, ge=0, description="First retry delay (s).")
    on_error: Literal["fail", "skip"] = runtime_field(
        "fail", description="'skip': failed rows get None outputs and are retried next run."
    )
    resources: dict[str, float] | None = runtime_field(
        None, description="Per-batch Ray resources, e.g. {'num_cpus': 1, 'num_gpus': 1}."
    )
    cache_version: str | None = Field(
        None, description="Set to pin the code version instead of hashing `process`."
    )
    # distilabel's mappings: they change which columns are read and written, so they are
    # identity (in the fingerprint), not runtime fields.
    input_mappings: dict[str, str] = Field(
        default_factory=dict,
        description="Read input column VALUE as this step's input KEY, e.g. "
        "{'instruction': 'prompt'}.",
    )
    output_mappings: dict[str, str] = Field(
        default_factory=dict,
        description="Write this step's output column KEY as VALUE, e.g. {'generation': 'answer'}.",
    )

    _pipeline: Pipeline | None = PrivateAttr(None)
    _loaded: bool = PrivateAttr(False)
    # Set as a run first calls `process` (not by hand): its input is as rows_per_input says.
    _in_run: bool = PrivateAttr(False)
    # A leaf of the running pipeline stores its batches whole (castore.store.extend).
    _leaf: bool = PrivateAttr(True)
    # (fingerprint, inline fields kept as objects) of the last fingerprint() call.
    _inlined: tuple[str, dict[str, Inline]] | None = PrivateAttr(None)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        for attr in NAME_LISTS:
            value = inspect.getattr_static(cls, attr, None)
            if not isinstance(value, (property, functools.cached_property)):  # distilabel's
                names_list(f"{cls.__qualname__}.{attr}", value)

    @model_validator(mode="before")
    @classmethod
    def _resources_object(cls, data: Any) -> Any:
        """`resources=` an object with `as_step_fields()` (distilabel's StepResources,
        castore.distilabel.steps): the step fields it stands for; a field also given
        with another value is an error, not a silent choice."""
        if not isinstance(data, dict) or not hasattr(data.get("resources"), "as_step_fields"):
            return data
        data = dict(data)
        for key, value in data.pop("resources").as_step_fields().items():
            if key in data and data[key] != value:
                raise ValueError(
                    f"resources sets {key}={value!r} but {key}={data[key]!r} is given too"
                )
            data[key] = value
        return data

    @field_validator("input_mappings")
    @classmethod
    def _one_column_per_input(cls, mappings: dict[str, str]) -> dict[str, str]:
        seen: dict[str, str] = {}
        for logical, actual in mappings.items():
            if actual in seen:
                raise ValueError(
                    f"input_mappings reads column {actual!r} as both {seen[actual]!r} and "
                    f"{logical!r}: a column is renamed, so it can be read as one input only"
                )
            seen[actual] = logical
        return mappings

    def __setattr__(self, name: str, value: Any) -> None:
        # distilabel's steps may set their columns per instance (in model_post_init, from
        # their fields): kept on the instance, and in its identity as any columns are.
        if name in ("inputs", "outputs") and name not in type(self).model_fields:
            if isinstance(inspect.getattr_static(type(self), name, None), property):
                raise AttributeError(f"{type(self).__name__}.{name} is a property")
            value = step_columns(f"{type(self).__name__}.{name}", value)
            object.__setattr__(self, name, value)
            return
        super().__setattr__(name, value)

    def refresh(self) -> None:
        """Called before each computation of a pipeline's signatures (as each run starts):
        forget what the last one observed outside the process (LoadDataFromHub: the
        commit a branch named; LoadDataFromFileSystem: the files' versions)."""

    def load(self) -> None:
        """Called once per process before this step's first batch there (open a client,
        load a model); subclasses that override it call super().load(), as in distilabel."""

    def unload(self) -> None:
        """Called at the end of a run in each process that loaded the step."""

    def __init__(self, /, **data: Any) -> None:
        # distilabel's `Step(pipeline=p)`: join `p` without a `with` block.
        pipeline = data.pop("pipeline", None)
        super().__init__(**data)
        if pipeline is not None and self._pipeline is None:
            pipeline.add_step(self)

    def model_post_init(self, context: Any, /) -> None:
        pipeline = current_pipeline()
        if pipeline is not None:
            pipeline.add_step(self)

    def connect(self, *steps: _Step, routing_batch_function: Any = None) -> None:
        """distilabel's spelling of `self >> [steps]`."""
        if routing_batch_function is not None:
            raise PipelineError(
                f"step {self.name}: route with `step >> sample_n_steps(n) >> [a, b]`, not "
                "connect(routing_batch_function=...)"
            )
        for other in steps:
            self._require_pipeline().connect(self, other)

    # -- wiring: a >> b, a >> [b, c], [b, c] >> d ---------------------------------------

    def __rshift__(self, other: _Step | list[_Step] | sample_n_steps) -> Any:
        if isinstance(other, sample_n_steps):
            return other._bind(self)
        targets = other if isinstance(other, list) else [other]
        for t in targets:
            self._require_pipeline().connect(self, t)
        return other

    def __rrshift__(self, other: list[_Step]) -> _Step:
        for s in other:
            self._require_pipeline().connect(s, self)
        return self

    def _require_pipeline(self) -> Pipeline:
        if self._pipeline is None:
            raise PipelineError(f"step {self.name or type(self).__name__} is not in a Pipeline")
        return self._pipeline

    # -- identity ------------------------------------------------------------------------

    @classmethod
    def default_name(cls) -> str:
        return _snake(cls.__name__)

    @classmethod
    def runtime_fields(cls) -> set[str]:
        out = set()
        for fname, f in cls.model_fields.items():
            extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
            if extra.get("castore_runtime") or is_secret(f.annotation):
                out.add(fname)
        return out

    def cache_params(self, *, check: bool = True, inline: Gathered | None = None) -> dict[str, Any]:
        """The fields that enter the fingerprint, as canonical-JSON-able values (`check`:
        each encoded once here, so a value that cannot be names its field). Large inline
        fields enter as their digest; their objects, and the others' encodings, go in
        `inline` (castore.pipeline.inline.Gathered)."""
        out: dict[str, Any] = {}
        skip = self.runtime_fields() | {"cache_version"}
        for fname in type(self).model_fields:
            if fname in skip or (fname in _ONLY_WHEN_SET and getattr(self, fname) in (None, {})):
                continue
            try:
                attr = getattr(self, fname)
                encoded = False
                if isinstance(attr, BaseModel) and hasattr(attr, "cache_identity"):
                    # Nested configs (an LLM client) say themselves what is identity.
                    value = attr.cache_identity()
                elif fname in self.inline_fields:
                    value = field_identity(self, fname, inline)  # encodes it whole
                    encoded = True
                else:
                    value = self.model_dump(mode="json", include={fname})[fname]
                if check and not encoded:
                    canonical_json(value)
            except (NonCanonicalValue, ValueError, TypeError) as e:
                raise UnhashableParam(
                    f"step {self.name}: parameter {fname!r} cannot be hashed ({e}); use JSON "
                    "values, or mark the field runtime-only if it does not change outputs"
                ) from None
            out[fname] = value
        return out

    def code_version(self) -> str:
        """`cache_version` when set, else the digest of `process` and of what it reaches
        in the user's own code (castore/fingerprint.py)."""
        if self.cache_version is not None:
            # The pin names the code; the files it reads still count.
            files = file_parts(self.name, self.code_files)
            pinned = f"v:{self.cache_version}"
            return pinned if not files else code_version(pinned, files)
        root, parts = self.code_parts()
        return code_version(root, parts)

    def code_parts(self) -> tuple[str, dict[str, str]]:
        """(digest of `process`, {"function mod.helper": digest, "constant X": ...})."""
        target = self._code_target()
        owner = None if getattr(type(self), "_func", None) is not None else type(self)
        try:
            root, parts = code_parts(
                target, owner=owner, packages=self.code_packages, classes=self._user_classes()
            )
        except (OSError, TypeError):
            raise PipelineError(
                f"step {self.name}: the source of its process() is not available (defined "
                "in a REPL?); pass cache_version='...' to name its code version"
            ) from None
        ignored = {f"environment variable {name}" for name in self.ignore_env}
        mine = {k: v for k, v in parts.items() if k not in ignored}
        return root, mine | file_parts(self.name, self.code_files)

    def _code_target(self) -> Callable[..., Any]:
        return type(self).process  # type: ignore[attr-defined]

    def _user_classes(self) -> tuple[type | types.FunctionType, ...]:
        """User code that runs without `process` naming it: a subclass of a built-in step
        (TextGeneration, a distilabel Task) whose overrides (`conversation`,
        `format_input`) castore's `process` calls, and the classes of field values (a
        subclass of an LLM), hashed whole. A user `process` reaches its own class's
        code itself (castore/fingerprint.py), apart from the hooks castore calls
        (`load`, which may set what `process` reads)."""
        out: list[type | types.FunctionType] = []
        if not is_user_module(module_of(self._code_target())):
            out += user_classes(type(self))
        elif getattr(type(self), "_func", None) is None:
            for cls in user_classes(type(self)):
                out += [f for f in map(vars(cls).get, _HOOKS) if isinstance(f, types.FunctionType)]
        for fname in type(self).model_fields:
            value = getattr(self, fname, None)
            items = list(value.values()) if isinstance(value, dict) else value
            # Models held in a list (several LLMs) are few; a long list is data (inline
            # rows), not configuration: not walked on every fingerprint.
            if not isinstance(items, (list, tuple)) or len(items) > _MAX_HELD:
                items = [value]
            for item in items:
                if isinstance(item, BaseModel):
                    out += user_classes(type(item))
        return tuple(dict.fromkeys(out))

    def identity(self, *, check: bool = True, inline: Gathered | None = None) -> dict[str, Any]:
        return {
            "class": type(self).__qualname__,
            "kind": self.kind,
            "code": self.code_version(),
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
            "params": self.cache_params(check=check, inline=inline),
            "extra": self.extra_identity(),
        }

    def required_columns(self) -> list[str]:
        """The input columns checked before any work (the declared `inputs` by default),
        as `process` sees them; not distilabel's optional ones ({column: False})."""
        return [c for c, required in self._inputs().items() if required]

    def _inputs(self) -> dict[str, bool]:
        declared: Any = self.inputs
        return dict(declared) if isinstance(declared, dict) else dict.fromkeys(declared, True)

    def input_columns(self) -> list[str]:
        """`required_columns` as they are named in the input (after `input_mappings`)."""
        return [self.input_mappings.get(c, c) for c in self.required_columns()]

    def output_columns_named(self) -> list[str]:
        """The declared `outputs` as they are written (after `output_mappings`)."""
        return [self.output_mappings.get(c, c) for c in self.outputs]

    def grouped_columns(self) -> list[str]:
        """Columns that several predecessors each write and this step takes as one list
        per row (GroupColumns), instead of a fan-in clash."""
        return []

    def optional_columns(self) -> list[str]:
        """distilabel's optional inputs, as named in the input: a row-wise step reads each
        one a batch has, and its row keys tell which it had."""
        return [self.input_mappings.get(c, c) for c, req in self._inputs().items() if not req]

    def rows_per_input(self) -> int:
        """How many times the step sees each input row, one after the other: n for a
        row-wise step answering n times per row, each answer a row with its own key."""
        return 1

    def row_key_columns(self) -> list[str]:
        """The input columns a row-wise step reads: its row keys are made of their values."""
        return self.input_columns()

    def extra_identity(self) -> Any:
        """Hook for steps whose outputs depend on more than params (e.g. file contents)."""
        return None

    def prices(self) -> Prices | None:
        """What the step's tokens cost (USD per 1M; LLM tasks: their LLM's `prices`), for
        the cost its runs spent and saved. None: not priced."""
        return None

    def fingerprint(self) -> str:
        # Encoded once: checking each field first doubled the cost of large inline data
        # (20,000 rows of LoadDataFromDicts: 35 ms of a 190 ms re-run). The same bytes
        # are hashed; only a failure goes back field by field, to name the field. Small
        # inline rows are spliced into the identity's encoding as they were encoded.
        inline = Gathered()
        try:
            fp = hash_json_spliced(self.identity(check=False, inline=inline), inline.spliced)
        except (NonCanonicalValue, ValueError, TypeError):
            self.cache_params()  # raises UnhashableParam naming the field
            raise
        self._inlined = (fp, inline.objects)
        return fp

    def inline_objects(self, fp: str) -> dict[str, Inline]:
        """The inline fields kept as objects under fingerprint `fp` (pipeline.yaml names
        them; the run stores them). From the fingerprint() that made `fp` when it was the
        last one; otherwise computed again, and rows changed since are refused."""
        if self._inlined is None or self._inlined[0] != fp:
            if self.fingerprint() != fp:
                raise PipelineError(
                    f"step {self.name}: its params changed after the run computed its "
                    "fingerprint; do not change a pipeline while it runs"
                )
        assert self._inlined is not None
        return self._inlined[1]

    def yaml_params(self, inline: dict[str, Inline] | None = None) -> dict[str, Any]:
        """Every field for pipeline.yaml, secrets redacted, inline fields kept as objects
        named by their InlineRef."""
        out: dict[str, Any] = {}
        for fname, f in type(self).model_fields.items():
            if is_secret(f.annotation):
                out[fname] = None if getattr(self, fname) is None else REDACTED
                continue
            if inline and fname in inline:
                out[fname] = inline[fname].ref
                continue
            out[fname] = self.model_dump(mode="json", include={fname}).get(fname)
        return out


def is_secret(annotation: Any) -> bool:
    if annotation is SecretStr:
        return True
    args = getattr(annotation, "__args__", ()) or ()
    return any(a is SecretStr for a in args)


class Step(_Step):
    """Takes a batch of rows, returns rows: a generator of row lists, a list or a Table."""

    kind: ClassVar[StepKind] = "normal"

    def process(self, inputs: StepInput) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


class GlobalStep(Step):
    """Gets all of its input as one batch (dedupe, sorting, global statistics)."""

    kind: ClassVar[StepKind] = "global"


class GeneratorStep(_Step):
    """Produces batches; `process(offset)` yields row lists starting at row `offset`."""

    kind: ClassVar[StepKind] = "generator"
    batch_size: int = Field(50, ge=1, description="Rows per produced batch.")

    def process(self, offset: int = 0) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def append_source(self) -> str | None:
        """A local jsonl file when the step's batches are that file's lines in order, cut
        every `batch_size` rows: a run then reuses the batches of an earlier version of
        the file that this one extends, and parses only the rest. None by default."""
        return None

    def check_source(self) -> None:
        """Called after each batch is stored, before its entry is written: raise when
        what the step reads has changed since the run's fingerprint hashed it (the batch
        may hold the new data, which must not be filed under the old data's key)."""


class BatchIncomplete(Exception):
    """Raised by `process` when some rows failed (an LLM call that kept failing): the
    rows are kept, but the batch must not be cached, so the next run retries it. With
    on_error="fail" the batch fails instead. `failed` (row positions) lets a row-wise
    step keep the rows that succeeded as row results: the retry pays only for the rest."""

    def __init__(self, rows: Any, errors: list[str], failed: list[int] | None = None) -> None:
        self.rows = rows
        self.errors = errors
        self.failed = failed
        super().__init__(f"{len(errors)} row(s) failed, e.g. {errors[0] if errors else '?'}")


_KINDS: dict[str, type[_Step]] = {"normal": Step, "global": GlobalStep, "generator": GeneratorStep}


def step(
    inputs: list[str] | None = None,
    outputs: list[str] | None = None,
    step_type: StepKind = "normal",
    code_packages: list[str] | None = None,
    row_wise: bool = False,
    *,
    ignore_env: list[str] | None = None,
    code_files: list[str] | None = None,
    ignore_files: list[str] | None = None,
) -> Callable[[Callable[..., Any]], type[_Step]]:
    """Make a step class from a function.

    The function receives the input rows (or, for generators, the row offset) and the
    step's params as keyword arguments; its AST digest, with what it reaches in your own
    code and the versions of `code_packages`, is the step's code version.
    """
    if step_type not in _KINDS:
        raise PipelineError(f"step_type must be one of {sorted(_KINDS)}, not {step_type!r}")
    base = _KINDS[step_type]

    def decorate(func: Callable[..., Any]) -> type[_Step]:
        sig = inspect.signature(func)
        extra_params = list(sig.parameters)[1:]
        annotations: dict[str, Any] = {}
        namespace: dict[str, Any] = {
            "__module__": func.__module__,
            "__qualname__": func.__qualname__,
            "__doc__": func.__doc__,
            "inputs": names_list("@step inputs", inputs),
            "outputs": names_list("@step outputs", outputs),
            "code_packages": names_list("@step code_packages", code_packages),
            "ignore_env": names_list("@step ignore_env", ignore_env),
            "code_files": names_list("@step code_files", code_files),
            "ignore_files": names_list("@step ignore_files", ignore_files),
            "row_wise": row_wise,
            "_func": staticmethod(func),
        }
        for pname in extra_params:
            p = sig.parameters[pname]
            ann = p.annotation if p.annotation is not inspect.Parameter.empty else Any
            annotations[pname] = ann
            namespace[pname] = None if p.default is inspect.Parameter.empty else p.default
        namespace["__annotations__"] = annotations

        def process(self: _Step, first: Any = 0) -> Any:
            kwargs = {p: getattr(self, p) for p in extra_params}
            return func(first, **kwargs)

        def _code_target(self: _Step) -> Callable[..., Any]:
            return func

        namespace["process"] = process
        namespace["_code_target"] = _code_target
        cls = type(func.__name__, (base,), namespace)
        return cls

    return decorate
