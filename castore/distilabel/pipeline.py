"""`distilabel.pipeline` on castore: Pipeline with distilabel's signature and defaults,
and the routing function `sample_n_steps`."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from castore.distilabel._compat import unknown
from castore.errors import ConfigError
from castore.pipeline.pipeline import Pipeline as _Pipeline
from castore.pipeline.step import _Step, sample_n_steps

if TYPE_CHECKING:
    from castore.distiset import Distiset

DEFAULT_NAME = "default-pipeline"  # distilabel's is "__default_pipeline_name__"
METADATA_NAME = "distilabel_metadata"


class Pipeline(_Pipeline):
    """distilabel's `Pipeline(name=None, description=None, cache_dir=None,
    enable_metadata=False, requirements=None)` on castore.

    Steps without a name are named as distilabel names them (`text_generation_0`), so
    `parameters={"text_generation_0": ...}` written for distilabel still applies.
    `requirements` are checked before the run (a missing or too old one is an error);
    `enable_metadata` keeps the per-row metadata column as `distilabel_metadata`."""

    def __init__(
        self,
        name: str | None = None,
        description: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        enable_metadata: bool = False,
        requirements: list[str] | None = None,
    ) -> None:
        super().__init__(name or DEFAULT_NAME, description=description, cache_dir=cache_dir)
        self.enable_metadata = enable_metadata
        self.requirements = list(requirements or [])
        self._counters: dict[str, int] = {}
        self._fed: Any = None  # the loader run(dataset=...) added

    def add_step(self, step: _Step) -> None:
        if step.name is None:
            base = step.default_name()
            i = self._counters.get(base, 0)
            while f"{base}_{i}" in self.steps:
                i += 1
            self._counters[base] = i + 1
            step.name = f"{base}_{i}"
        super().add_step(step)

    def run(
        self,
        parameters: dict[str, dict[str, Any]] | None = None,
        *,
        load_groups: Any = None,
        use_cache: bool = True,
        storage_parameters: dict[str, Any] | None = None,
        use_fs_to_pass_data: bool = False,
        dataset: Any = None,
        dataset_batch_size: int = 50,
        logging_handlers: Any = None,
        **options: Any,
    ) -> Distiset:
        """distilabel's `run`: `dataset` (a `datasets.Dataset`, a pandas DataFrame or a
        list of dicts) feeds the steps that have no input. castore keeps batches in its
        store, so storage_parameters / use_fs_to_pass_data / load_groups do not apply:
        passing one is an error rather than an ignored argument."""
        for arg, value, why in (
            ("load_groups", load_groups, "castore schedules every step at once"),
            ("storage_parameters", storage_parameters, "batches live in castore's store"),
            ("use_fs_to_pass_data", use_fs_to_pass_data, "batches always pass via the store"),
            ("logging_handlers", logging_handlers, "use the logging module's own handlers"),
        ):
            if value:
                raise ConfigError(f"Pipeline.run({arg}=...) is not supported: {why}")
        check_requirements(self.requirements)
        if dataset is not None:
            self._feed(dataset, dataset_batch_size)
        ds = super().run(parameters, use_cache=use_cache, **options)
        if not self.enable_metadata or ds.store_root is None or ds.run_oid is None:
            return ds
        from castore.store import Store

        # The same run, its leaves made with the metadata column (they are made on first
        # use, so nothing was built twice).
        store = Store(ds.store_root, create=False)
        return type(ds).from_manifest(store, ds.run_oid, enable_metadata=METADATA_NAME)

    def _feed(self, dataset: Any, batch_size: int) -> None:
        from castore.pipeline.step import GeneratorStep
        from castore.steps import LoadDataFromDicts

        rows = _rows_of(dataset)
        if self._fed is not None:  # an earlier run(dataset=...) added the loader
            self._fed.data, self._fed.batch_size = rows, batch_size
            return
        roots = [
            s
            for n, s in self.steps.items()
            if not isinstance(s, GeneratorStep) and not self.predecessors(n)
        ]
        if not roots:
            raise ConfigError(
                "Pipeline.run(dataset=...) feeds the steps that have no input, and every "
                "step here has one: drop dataset= or the loader"
            )
        with self:
            loader = LoadDataFromDicts(data=rows, batch_size=batch_size)  # type: ignore[call-arg]
            for s in roots:
                loader >> s
        self._fed = loader


def _rows_of(dataset: Any) -> list[dict[str, Any]]:
    if isinstance(dataset, list):
        return dataset
    if hasattr(dataset, "to_list"):  # datasets.Dataset
        return list(dataset.to_list())
    if hasattr(dataset, "to_dict"):  # pandas.DataFrame
        return list(dataset.to_dict(orient="records"))
    raise ConfigError(
        f"Pipeline.run(dataset=...) takes a datasets.Dataset, a pandas DataFrame or a list of "
        f"dicts, not {type(dataset).__name__}"
    )


def check_requirements(requirements: list[str]) -> None:
    """Every requirement installed, at a version it allows (as distilabel checks)."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import InvalidRequirement, Requirement

    missing = []
    for text in requirements:
        try:
            req = Requirement(text)
        except InvalidRequirement as e:
            raise ConfigError(f"requirement {text!r}: {e}") from None
        try:
            have = version(req.name)
        except PackageNotFoundError:
            missing.append(text)
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            missing.append(f"{text} (installed: {have})")
    if missing:
        raise ConfigError(
            "the pipeline's requirements are not met: " + "; ".join(missing) + " (pip install them)"
        )


__all__ = ["Pipeline", "sample_n_steps"]
__getattr__ = unknown(__name__)
