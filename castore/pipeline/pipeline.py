"""Pipeline: the DAG of steps, its Merkle signatures, pipeline.yaml, and `run()`."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, Unpack

import yaml
from pydantic import BaseModel, ValidationError

from castore._version import __version__
from castore.errors import ConfigError, PipelineError, one_line
from castore.fingerprint import one_code_version
from castore.hashing import hash_json
from castore.pipeline.inline import InlineRef, resolve_params
from castore.pipeline.params import merged_model, redact_parameters, strip_redacted
from castore.pipeline.rows import check_row_wise
from castore.pipeline.step import (
    CURRENT_PIPELINE,
    GeneratorStep,
    GlobalStep,
    _Step,
)
from castore.pipeline.yamldoc import check_shape
from castore.store.layout import validate_name

if TYPE_CHECKING:
    from castore.distiset import Distiset
    from castore.store import Store
    from castore.store.manifests import Target


class Pipeline:
    """A named DAG of steps. Use as a context manager; steps made inside join it."""

    def __init__(
        self,
        name: str,
        description: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.name = validate_name(name, "pipeline name")
        self.description = description
        self.cache_dir = cache_dir
        self.steps: dict[str, _Step] = {}
        self.edges: list[tuple[str, str]] = []
        # step -> (n, successors): each of its batches goes to n of those successors.
        self.routes: dict[str, tuple[int, list[str]]] = {}
        self._token: Any = None

    def __enter__(self) -> Pipeline:
        self._token = CURRENT_PIPELINE.set(self)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            CURRENT_PIPELINE.reset(self._token)
            self._token = None

    def __repr__(self) -> str:
        return f"Pipeline(name={self.name!r}, steps={list(self.steps)})"

    # -- building ------------------------------------------------------------------------

    def add_step(self, step: _Step) -> None:
        """Join `step` to this pipeline (steps call it when created in its `with` block)."""
        if step.name is None:
            base = step.default_name()
            name, i = base, 1
            while name in self.steps:
                name, i = f"{base}_{i}", i + 1
            step.name = name
        validate_name(step.name, "step name")
        if step.name in self.steps:
            raise PipelineError(f"pipeline {self.name}: two steps are named {step.name!r}")
        self.steps[step.name] = step
        step._pipeline = self

    def connect(self, a: _Step, b: _Step) -> None:
        for s in (a, b):
            if s._pipeline is not self:
                raise PipelineError(f"step {s.name} belongs to another pipeline")
        if isinstance(b, GeneratorStep):
            raise PipelineError(f"{a.name} >> {b.name}: a generator step takes no input")
        edge, a._leaf = (a.name, b.name), False  # a leaf's objects stay whole (store/extend)
        if edge not in self.edges:
            self.edges.append(edge)  # type: ignore[arg-type]

    def route(self, source: _Step, targets: list[_Step], n: int) -> None:
        """Send each batch of `source` to `n` of `targets`, chosen from its action key."""
        if n < 1 or n > len(targets):
            raise PipelineError(
                f"routing from {source.name}: n={n} must be between 1 and {len(targets)}"
            )
        for t in targets:
            self.connect(source, t)
        assert source.name is not None  # named when it joined the pipeline
        self.routes[source.name] = (n, sorted(str(t.name) for t in targets))

    def predecessors(self, name: str) -> list[str]:
        return [a for a, b in self.edges if b == name]

    def successors(self, name: str) -> list[str]:
        return [b for a, b in self.edges if a == name]

    def leaves(self) -> list[str]:
        return [n for n in self.topological() if not self.successors(n)]

    def topological(self) -> list[str]:
        """Steps in dependency order (stable: insertion order among ready steps)."""
        indeg = {n: len(self.predecessors(n)) for n in self.steps}
        order: list[str] = []
        ready = [n for n in self.steps if indeg[n] == 0]
        while ready:
            n = ready.pop(0)
            order.append(n)
            for s in self.successors(n):
                indeg[s] -= 1
                if indeg[s] == 0:
                    ready.append(s)
        if len(order) != len(self.steps):
            cyc = sorted(n for n in self.steps if n not in order)
            raise PipelineError(f"pipeline {self.name} has a cycle through {', '.join(cyc)}")
        return order

    def validate(self) -> None:
        """Build-time checks: no cycle, inputs wired, declared input columns produced."""
        if not self.steps:
            raise PipelineError(f"pipeline {self.name} has no steps")
        order = self.topological()
        produced: dict[str, set[str] | None] = {}
        # column -> the step that wrote it, per step, where the columns are known
        origins: dict[str, dict[str, str] | None] = {}
        for n in order:
            step = self.steps[n]
            check_row_wise(step)
            preds = self.predecessors(n)
            if isinstance(step, GeneratorStep):
                produced[n] = self._columns_after(step, None) or (
                    set(step.output_columns_named()) if step.outputs else None
                )
                cols = produced[n]
                origins[n] = dict.fromkeys(cols, n) if cols else None
                continue
            if not preds:
                raise PipelineError(f"step {n} has no input: connect a step to it with >>")
            available: set[str] | None = set()
            for p in preds:
                cols = produced[p]
                available = None if cols is None or available is None else available | cols
            if available is not None:
                for col in step.input_columns():
                    if col not in available:
                        raise PipelineError(
                            f"step {n} needs input column {col!r}, which no predecessor "
                            f"({', '.join(preds)}) produces"
                        )
            produced[n] = self._columns_after(step, available)
            origins[n] = _origins(n, step, preds, origins, produced[n])

    @staticmethod
    def _columns_after(step: _Step, available: set[str] | None) -> set[str] | None:
        hook = getattr(step, "columns_after", None)
        if hook is not None:
            cols = hook(available)
            if cols is None or not step.output_mappings:
                return cols
            return {step.output_mappings.get(c, c) for c in cols}
        if available is None:
            return None
        return available | set(step.output_columns_named())

    # -- identity ------------------------------------------------------------------------

    def signatures(self) -> dict[str, dict[str, str]]:
        """Per step: fingerprint and Merkle signature (fingerprint + predecessors' sigs).
        Each call looks at the steps' inputs anew (`Step.refresh`): a run computes them
        once as it starts, and loads what they name."""
        for step in self.steps.values():
            step.refresh()
        out: dict[str, dict[str, str]] = {}
        for n in self.topological():
            step = self.steps[n]
            fp = step.fingerprint()
            preds = self.predecessors(n)
            plan: dict[str, Any] = {"fp": fp, "preds": [out[p]["sig"] for p in preds]}
            routes = {p: list(self.routes[p]) for p in preds if p in self.routes}
            if routes:
                plan["routes"] = routes
            if not isinstance(step, (GeneratorStep, GlobalStep)):
                plan["input_batch_size"] = step.input_batch_size
            out[n] = {"fp": fp, "sig": hash_json(plan)}
        return out

    def store_inline(self, store: Store, sigs: dict[str, dict[str, str]]) -> list[str]:
        """Store the rows this pipeline's steps keep as objects under the fingerprints in
        `sigs` (castore/pipeline/inline.py), before pipeline.yaml names them; their ids."""
        return [
            store.put_bytes(obj.packed)
            for n in self.topological()
            for obj in self.steps[n].inline_objects(sigs[n]["fp"]).values()
        ]

    def signature(self, sigs: dict[str, dict[str, str]] | None = None) -> str:
        sigs = sigs or self.signatures()
        doc: dict[str, Any] = {
            "steps": {n: s["sig"] for n, s in sigs.items()},
            "edges": [list(e) for e in sorted(self.edges)],
        }
        if self.routes:
            doc["routes"] = {k: list(v) for k, v in sorted(self.routes.items())}
        return hash_json(doc)

    # -- pipeline.yaml -------------------------------------------------------------------

    def to_dict(self, sigs: dict[str, dict[str, str]] | None = None) -> dict[str, Any]:
        from castore.pipeline.portable import portable_params, project_root, relative, step_file

        sigs = sigs or self.signatures()
        project = project_root()
        steps = []
        for n in self.topological():
            step = self.steps[n]
            cls = type(step)
            entry: dict[str, Any] = {
                "name": n,
                "type": f"{cls.__module__}:{cls.__qualname__}",
                "params": portable_params(
                    step, step.yaml_params(step.inline_objects(sigs[n]["fp"])), project
                ),
                "fingerprint": sigs[n]["fp"],
                "signature": sigs[n]["sig"],
                # What `cas explain` compares: the code version and what else the step
                # hashes (file contents), apart from params.
                "code": step.code_version(),
                "extra": hash_json(step.extra_identity()),
            }
            if step.cache_version is None:
                # What `cas explain` names when the code version changes: `process` itself
                # and each helper, class, constant or package it reaches.
                root, parts = step.code_parts()
                entry["code_parts"] = {"process": root[:16]} | {k: v[:16] for k, v in parts.items()}
            source = step_file(cls)
            if source:
                entry["file"] = relative(source, project)
            steps.append(entry)
        return {
            "castore_version": __version__,
            "pipeline": {
                "name": self.name,
                "description": self.description,
                "signature": self.signature(sigs),
                "steps": steps,
                "connections": [{"from": n, "to": self.successors(n)} for n in self.topological()],
                "routing": [
                    {"from": src, "sample": k, "to": targets}
                    for src, (k, targets) in self.routes.items()
                ],
            },
        }

    def to_yaml(self, sigs: dict[str, dict[str, str]] | None = None) -> str:
        doc = self.to_dict(sigs)
        # Large values (inline rows of LoadDataFromDicts) are written as JSON flow
        # collections, which are valid YAML: PyYAML's Python representer takes ~1 s for
        # 20k rows, json.dumps ~20 ms.
        big: dict[str, str] = {}
        for i, entry in enumerate(doc["pipeline"]["steps"]):
            for k, v in entry["params"].items():
                if isinstance(v, InlineRef):
                    dumped = v.flow()  # one line that castore.pipeline.inline.expand finds
                elif isinstance(v, (list, dict)) and len(v) > 100:
                    dumped = json.dumps(v, ensure_ascii=False, allow_nan=False)
                else:
                    continue
                token = f"__castore_json_{i}_{k}__"
                big[token] = dumped
                entry["params"][k] = token
        dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
        text = yaml.dump(doc, Dumper=dumper, sort_keys=False, allow_unicode=True, width=100)
        for token, dumped in big.items():
            text = text.replace(token, dumped, 1)
        return text

    @classmethod
    def from_yaml(
        cls, path_or_text: str | os.PathLike[str], store: Store | None = None
    ) -> Pipeline:
        """Rebuild a pipeline from pipeline.yaml; it has the same signature. `store`:
        where rows that pipeline.yaml keeps as objects are read from (a run's own
        pipeline.yaml; a Distiset's has them written out)."""
        text = str(path_or_text)
        if "\n" not in text and Path(text).exists():
            text = Path(text).read_text(encoding="utf-8")
        from castore.yamlio import load_yaml

        return cls.from_dict(load_yaml(text, "pipeline YAML"), store)

    @classmethod
    def from_dict(cls, doc: Any, store: Store | None = None) -> Pipeline:
        p = check_shape(doc)
        pipeline = cls(name=p.name, description=p.description)
        with pipeline:
            for s in p.steps:
                step_cls = load_step_class(s.type, s.file)
                params = strip_redacted(s.params or {})
                resolve_params(step_cls.inline_fields, params, store, f"step {s.name}")
                if s.name and not params.get("name"):
                    params["name"] = s.name  # the entry's name when params leave it out
                try:
                    step_cls(**params)
                except ValidationError as e:
                    raise ConfigError(f"step {s.name}: {one_line(e)}") from e
                except ValueError as e:
                    raise ConfigError(f"step {s.name}: invalid params: {e}") from None
        for c in p.connections or []:
            for t in c.to or []:
                if c.from_ not in pipeline.steps or t not in pipeline.steps:
                    raise ConfigError(f"connection {c.from_} -> {t} names an unknown step")
                pipeline.connect(pipeline.steps[c.from_], pipeline.steps[t])
        for r in p.routing or []:
            try:
                targets = [pipeline.steps[t] for t in r["to"]]
                pipeline.route(pipeline.steps[r["from"]], targets, int(r["sample"]))
            except (KeyError, TypeError, ValueError) as e:
                raise ConfigError(f"bad routing entry {r!r}: {e}") from None
        return pipeline

    # -- running -------------------------------------------------------------------------

    def apply_parameters(self, parameters: dict[str, dict[str, Any]] | None) -> None:
        """Set step fields by name; unknown steps or fields are a clear error. Values
        recorded as redacted (a secret, on resume) are left out: the step reads its
        secret from the environment again."""
        for sname, fields in (strip_redacted(parameters) or {}).items():
            if sname not in self.steps:
                raise ConfigError(
                    f"parameters name unknown step {sname!r}; steps: {', '.join(self.steps)}"
                )
            step = self.steps[sname]
            for fname, value in fields.items():
                if fname not in type(step).model_fields or fname == "name":
                    raise ConfigError(f"step {sname} has no parameter {fname!r}")
                try:
                    current = getattr(step, fname)
                    if isinstance(current, BaseModel) and isinstance(value, dict):
                        value = merged_model(current, value, f"{sname}.{fname}")
                    setattr(step, fname, value)
                except ValidationError as e:
                    raise ConfigError(f"--param {sname}.{fname}: {one_line(e)}") from e
                except ValueError as e:
                    raise ConfigError(f"--param {sname}.{fname}: {e}") from None

    def run(
        self, parameters: dict[str, dict[str, Any]] | None = None, **options: Unpack[RunOptions]
    ) -> Distiset:
        """Run (or resume, or re-materialize) the pipeline; returns its Distiset.

        Every batch whose action key is in the store is reused; only misses are computed.
        `options` are RunOptions: use_cache, cache_dir, executor ("threads", "processes",
        "ray"), quiet, target, stop_grace, remote, push, ray_address, ray_storage.
        With `remote` (a configured name, URL or path), a local miss is looked up on the
        remote (read-through); with `push`, new batches are uploaded as they are made.
        With executor="ray" and ray_storage="remote", Ray workers get their input rows
        from the driver and write outputs to the remote, which the driver reads through:
        for clusters whose nodes do not share the store's filesystem.
        Raises RunInterrupted on Ctrl+C/SIGTERM (finished batches stay stored),
        RunWaiting (a RunInterrupted) when batches wait for provider batch jobs
        (offline LLM steps: run again later to collect them), and StepFailed when a batch
        fails with on_error='fail'. While it runs it handles SIGINT and SIGTERM (in the
        main thread) and the thread switch interval is 0.5 ms: both restored after."""
        with one_code_version():
            _, ds = self._runner(parameters, options).run(distiset=True)
        assert ds is not None
        return ds

    def dry_run(
        self,
        parameters: dict[str, dict[str, Any]] | None = None,
        batch_size: int = 1,
        **options: Unpack[RunOptions],
    ) -> Distiset:
        """Run the first `batch_size` rows of every generator through every step, as a
        pipeline of its own named "<name>-dry-run" in the same store; returns its Distiset.
        What it computes is cached like any run's work, so row-wise steps (LLM tasks) do
        not pay again for those rows in the full run (castore/pipeline/dryrun.py)."""
        from castore.pipeline.dryrun import dry_pipeline

        self.apply_parameters(parameters)
        self.validate()
        return dry_pipeline(self, batch_size).run(**options)

    def execute(
        self, parameters: dict[str, dict[str, Any]] | None = None, **options: Unpack[RunOptions]
    ) -> str:
        """`run` without building a Distiset (nor importing `datasets`): returns the id
        of the run manifest (`castore.RunSummary.load(store, id)` summarizes it)."""
        with one_code_version():
            oid, _ = self._runner(parameters, options).run(distiset=False)
        return oid

    def plan(
        self,
        parameters: dict[str, dict[str, Any]] | None = None,
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        read_inputs: bool = False,
        remote: str | None = None,
    ) -> Any:
        """What `run` would do, without running or writing anything: per step, batches
        cached (here, or only on `remote`: a configured name or a URL), to compute, or
        waiting on upstream work, rows found by row key, and estimates from the latest
        run (castore.pipeline.status.PlanStatus). With `read_inputs`, loaders whose input
        changed are run in memory (writing nothing) so the steps after them can be
        planned too."""
        from castore.config import remote_url
        from castore.errors import StoreNotFound
        from castore.pipeline.status import plan_status
        from castore.remote import Remote
        from castore.store import Store

        self.apply_parameters(parameters)
        try:
            store = Store(cache_dir, create=False)
        except StoreNotFound:
            store = None  # nothing is cached anywhere yet
        remote_obj = Remote(remote_url(store, remote)) if remote is not None else None
        with one_code_version():
            return plan_status(self, store, read_inputs=read_inputs, remote=remote_obj)

    def _runner(self, parameters: dict[str, dict[str, Any]] | None, o: RunOptions) -> Any:
        from castore.pipeline.runner import Runner
        from castore.store import Store
        from castore.store.manifests import Target

        unknown = sorted(set(o) - set(RunOptions.__annotations__))
        if unknown:  # an option silently ignored would be a run that is not the one asked
            raise TypeError(f"unknown run option(s): {', '.join(unknown)}")
        self.apply_parameters(parameters)
        self.validate()
        cache_dir = o.get("cache_dir")
        store = Store(cache_dir if cache_dir is not None else self.cache_dir)
        remote, push = o.get("remote"), o.get("push", False)
        remote_obj = None
        if remote is not None or push:
            from castore.config import remote_url
            from castore.remote import Remote

            remote_obj = Remote(remote_url(store, remote))
        return Runner(
            self,
            store,
            parameters=redact_parameters(self, parameters or {}),
            use_cache=o.get("use_cache", True),
            executor=o.get("executor", "threads"),
            quiet=o.get("quiet", False),
            # A library run's stored pipeline.yaml names paths relative to where it was
            # started: resume goes back there.
            target=o.get("target") or Target(kind="api", cwd=os.getcwd()),
            stop_grace=_grace(o.get("stop_grace", 30.0)),
            remote=remote_obj,
            push=push,
            ray_address=o.get("ray_address"),
            ray_storage=o.get("ray_storage", "store"),
        )


class RunOptions(TypedDict, total=False):
    """Keyword options of Pipeline.run and Pipeline.execute (defaults in brackets)."""

    use_cache: bool  # reuse stored batches [True]
    cache_dir: str | os.PathLike[str] | None  # the store [the pipeline's, else default]
    executor: str  # "threads" | "processes" | "ray" ["threads"]
    quiet: bool  # no console log or progress [False]
    target: Target | None  # what `cas resume` re-invokes [the stored pipeline.yaml]
    stop_grace: float  # seconds to wait for in-flight batches after Ctrl+C [30]
    remote: str | None  # read-through remote: a name, URL or path [None]
    push: bool  # write-through to the remote [False]
    ray_address: str | None  # Ray cluster [a local one]
    ray_storage: str  # "store" | "remote": where Ray workers write ["store"]


def _grace(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ConfigError(f"stop_grace must be a number of seconds >= 0, got {value!r}")
    return float(value)


def load_step_class(type_path: str, file: str | None = None) -> type[_Step]:
    """Import `module:qualname`, loading `file` first when the module is a script."""
    if ":" not in type_path:
        raise ConfigError(f"unknown step type {type_path!r}: expected 'module:ClassName'")
    module_name, qualname = type_path.split(":", 1)
    if module_name == "__main__" and file:  # a `python script.py` run's own steps
        module_name = f"castore_main_{Path(file).stem}"
    try:
        module = sys.modules.get(module_name) or importlib.import_module(module_name)
    except ImportError:
        if not file:
            raise ConfigError(
                f"unknown step type {type_path!r}: cannot import {module_name}"
            ) from None
        if not Path(file).is_file():
            raise ConfigError(
                f"step type {type_path!r}: its file {file} is not here; run the pipeline "
                "from the folder of the project that made it (its paths are relative to it)"
            ) from None
        module = load_file_module(file, module_name)
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if not (isinstance(obj, type) and issubclass(obj, _Step)):
        raise ConfigError(f"unknown step type {type_path!r}: not a castore step class")
    return obj


def load_file_module(path: str | os.PathLike[str], module_name: str | None = None) -> Any:
    """Import a Python file as a module (its `if __name__ == '__main__'` block stays off)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ConfigError(f"{path} does not exist")
    name = module_name or f"castore_target_{path.stem}_{hash_json(str(path))[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot load {path} as Python")
    module = importlib.util.module_from_spec(spec)
    module.__castore_source__ = str(path)  # type: ignore[attr-defined]
    sys.modules[name] = module
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def pipelines_in(module: Any) -> Iterator[tuple[str, Pipeline]]:
    for attr, value in vars(module).items():
        if isinstance(value, Pipeline):
            yield attr, value


def _origins(
    name: str,
    step: _Step,
    preds: list[str],
    origins: dict[str, dict[str, str] | None],
    columns: set[str] | None,
) -> dict[str, str] | None:
    """Which step wrote each of `name`'s output columns. Fan-in merges rows by column
    name, so two predecessors carrying a column written by different steps would have
    one overwrite the other: refused here, at build time (a column passed through both
    branches from one step is the same values, and fine)."""
    seen: dict[str, tuple[str, str]] = {}  # column -> (predecessor, origin)
    grouped = set(step.grouped_columns())
    for p in preds:
        known = origins[p]
        if known is None:
            return None
        for col, origin in sorted(known.items()):
            if col in grouped:
                continue  # one list per row, a value per predecessor: no clash
            if col in seen and seen[col][1] != origin:
                other = seen[col][0]
                raise PipelineError(
                    f"step {name}: its predecessors {other} and {p} both produce column "
                    f"{col!r} (written by {seen[col][1]} and {origin}); merged by name, one "
                    f"would overwrite the other: rename it on one side, e.g. {p} >> "
                    f"RenameColumns(mapping={{{col!r}: '{col}_{p}'}}) >> {name}"
                )
            seen[col] = (p, origin)
    if columns is None:
        return None
    own = set(step.output_columns_named())
    return {c: name if c in own or c not in seen else seen[c][1] for c in columns}
