"""Distiset: the datasets a run produced, one `datasets.DatasetDict` per leaf step,
materialized by walking the leaf step manifests (DESIGN.md "Distiset").

A run's leaf is materialized once as an Arrow IPC file (a content-addressed object keyed
by the list of its batch objects) and opened memory-mapped, so a million-row leaf costs
no Python rows and re-opening a finished run is instant. `create_distiset(path)` reads a
folder of Parquet files instead: castore's run folders, any `data/<leaf>/` folder
and distilabel 1.5 cache folders alike.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from castore.errors import DistisetError
from castore.store.leaves import conform, leaf_arrow, unify
from castore.store.manifests import RunManifest, StepManifest, load_model
from castore.store.parquet import METADATA_COLUMN
from castore.store.runfolder import RunFolder

if TYPE_CHECKING:
    import datasets
    import pyarrow as pa

    from castore.store import Store

log = logging.getLogger(__name__)

METADATA_COLUMNS = (METADATA_COLUMN, "distilabel_metadata")
_PENDING = object()  # a leaf not made yet
PIPELINE_YAML = "pipeline.yaml"
PIPELINE_LOG = "pipeline.log"
CARD = "README.md"
DEFAULT_LEAF = "default"
DISTILABEL_CONFIGS = "distiset_configs"  # where distilabel's save_to_disk puts yaml and log


class Distiset(dict):
    """leaf step name -> `DatasetDict({"train": Dataset})`.

    `pipeline_yaml` / `log` hold the recipe and the log text (when known), and
    `pipeline_path` / `log_filename_path` where they were found; `partial` is True when
    the run did not finish (the rows of every finished batch, in plan order)."""

    partial: bool = False
    log: str | None = None
    pipeline_path: Path | None = None
    log_filename_path: Path | None = None
    run: RunManifest | None = None
    run_oid: str | None = None
    store_root: Path | None = None  # the store the run is in (from_manifest)
    # A run's leaves are made on first use (castore.Pipeline.run returns at once, and
    # only code that reads the data imports `datasets`): leaf -> its DatasetDict.
    _make: Callable[[str], Any] | None = None
    _recipe: str | None = None
    # A run's pipeline.yaml names large inline rows by store object; they are written
    # out (castore/pipeline/inline.py) on first use, so the file stands alone.
    _recipe_store: Store | None = None

    @property
    def pipeline_yaml(self) -> str | None:
        if self._recipe_store is not None and self._recipe is not None:
            from castore.pipeline.inline import expand

            self._recipe = expand(self._recipe, self._recipe_store)
        self._recipe_store = None
        return self._recipe

    @pipeline_yaml.setter
    def pipeline_yaml(self, text: str | None) -> None:
        self._recipe, self._recipe_store = text, None

    def _load(self) -> None:
        make, self._make = self._make, None
        if make is not None:
            for leaf in list(dict.keys(self)):
                if dict.__getitem__(self, leaf) is _PENDING:
                    dict.__setitem__(self, leaf, make(leaf))

    # Every way to reach a value makes the leaves first; keys, len and `in` do not.
    def __getitem__(self, key: str) -> Any:
        self._load()
        return dict.__getitem__(self, self._alias(key))

    def get(self, key: str, default: Any = None) -> Any:
        self._load()
        return dict.get(self, self._alias(key), default)

    def _alias(self, key: str) -> str:
        """distilabel names a pipeline's only leaf "default": so does castore, besides
        the leaf's own name."""
        if key == DEFAULT_LEAF and not dict.__contains__(self, key) and dict.__len__(self) == 1:
            return next(iter(dict.keys(self)))
        return key

    def items(self) -> Any:
        self._load()
        return dict.items(self)

    def values(self) -> Any:
        self._load()
        return dict.values(self)

    def __iter__(self) -> Iterator[str]:
        # Not dict's own iterator: dict(ds) and {**ds} then go through __getitem__.
        return iter(list(dict.keys(self)))

    def pop(self, key: str, *default: Any) -> Any:
        self._load()
        return dict.pop(self, key, *default)

    def popitem(self) -> tuple[str, Any]:
        self._load()
        return dict.popitem(self)

    def setdefault(self, key: str, default: Any = None) -> Any:
        self._load()
        return dict.setdefault(self, key, default)

    def copy(self) -> dict[str, Any]:
        self._load()
        return dict(self)

    def __or__(self, other: Any) -> Any:
        self._load()
        return dict.__or__(self, other)

    def __ror__(self, other: Any) -> Any:
        self._load()
        return dict.__ror__(self, other)

    def __eq__(self, other: object) -> bool:
        self._load()
        if isinstance(other, Distiset):
            other._load()
        return dict.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = None

    def __reduce_ex__(self, protocol: Any) -> Any:
        self._load()
        return super().__reduce_ex__(protocol)

    def __repr__(self) -> str:
        inner = ",\n".join(
            f"    {name}: " + repr(dd).replace("\n", "\n    ") for name, dd in self.items()
        )
        return "Distiset({\n" + inner + "\n})"

    # -- from the store ------------------------------------------------------------------

    @classmethod
    def from_run(
        cls,
        run: str,
        cache_dir: str | os.PathLike[str] | None = None,
        *,
        enable_metadata: bool = False,
    ) -> Distiset:
        """The Distiset of a run given by pipeline name (its latest run), signature
        prefix or run id prefix."""
        from castore.runs import resolve_run
        from castore.store import Store

        store = Store(cache_dir)
        info = resolve_run(store, run)
        return cls.from_manifest(store, info.oid, enable_metadata=enable_metadata)

    @classmethod
    def from_manifest(
        cls, store: Store, run_oid: str, *, enable_metadata: bool | str = False
    ) -> Distiset:
        """`enable_metadata`: keep the metadata column (a string: under that name)."""
        run = load_model(store, run_oid, RunManifest)
        out = cls()
        folder = RunFolder(store, run.name, run.signature)

        def make(leaf: str) -> Any:
            import datasets

            step = load_model(store, run.step_manifest_id(leaf), StepManifest)
            path = leaf_arrow(store, step, folder.arrow)
            ds = datasets.Dataset.from_file(str(path)) if path else _empty_dataset()
            return datasets.DatasetDict({"train": _metadata(ds, enable_metadata)})

        for leaf in run.leaves:
            dict.__setitem__(out, leaf, _PENDING)
        out._make = make
        out.partial = run.status != "finished"
        out.run, out.run_oid, out.store_root = run, run_oid, store.root
        if run.pipeline_yaml:
            out.pipeline_yaml = store.get_bytes(run.pipeline_yaml).decode()
            out._recipe_store = store
            out.pipeline_path = folder.pipeline_yaml
        if run.log:
            out.log = store.get_bytes(run.log).decode(errors="replace")
            out.log_filename_path = folder.log
        return out

    # -- saving and loading --------------------------------------------------------------

    def save_to_disk(
        self,
        path: str | os.PathLike[str],
        *,
        max_shard_size: str | int | None = None,
        num_shards: int | None = None,
        num_proc: int | None = None,
        storage_options: dict[str, Any] | None = None,
        save_card: bool = True,
        save_pipeline_config: bool = True,
        save_pipeline_log: bool = True,
    ) -> None:
        """Every leaf as a `datasets` folder, plus pipeline.yaml, pipeline.log and a
        dataset card (each can be left out, as in distilabel). `path` may be an fsspec
        URL (`memory://`, `s3://`, …); the sharding arguments go to `datasets`."""
        import fsspec

        fs, root = fsspec.core.url_to_fs(str(path), **(storage_options or {}))
        for leaf, dd in self.items():
            dd.save_to_disk(
                _join(str(path), leaf),
                max_shard_size=max_shard_size,
                num_shards=dict.fromkeys(dd, num_shards) if num_shards is not None else None,
                num_proc=num_proc,
                storage_options=storage_options,
            )
        for name, text, keep in (
            (PIPELINE_YAML, self.pipeline_yaml, save_pipeline_config),
            (PIPELINE_LOG, self.log, save_pipeline_log),
            (CARD, self.card() if save_card else None, save_card),
        ):
            if text is not None and keep:
                with fs.open(_join(root, name), "w", encoding="utf-8") as f:
                    f.write(text)
        with fs.open(_join(root, "distiset.json"), "w", encoding="utf-8") as f:
            json.dump({"leaves": list(self), "partial": self.partial}, f)

    @classmethod
    def load_from_disk(
        cls,
        path: str | os.PathLike[str],
        *,
        keep_in_memory: bool | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> Distiset:
        """A Distiset saved by castore's `save_to_disk`, or by distilabel 1.5's (its leaf
        folders, with pipeline.yaml and pipeline.log under distiset_configs/)."""
        import datasets
        import fsspec

        fs, root = fsspec.core.url_to_fs(str(path), **(storage_options or {}))
        leaves, meta, extras = _saved(fs, root, path)
        out = cls()
        for leaf in leaves:
            out[leaf] = datasets.load_from_disk(
                _join(str(path), leaf),
                keep_in_memory=keep_in_memory,
                storage_options=storage_options,
            )
        out.partial = bool(meta.get("partial"))
        for attr, name in (("pipeline_yaml", PIPELINE_YAML), ("log", PIPELINE_LOG)):
            if fs.exists(_join(extras, name)):
                with fs.open(_join(extras, name), "r", encoding="utf-8") as f:
                    setattr(out, attr, f.read())
        return out

    def train_test_split(
        self, train_size: float, shuffle: bool = True, seed: int | None = None
    ) -> Distiset:
        """Each leaf's rows split into "train" (`train_size`, a fraction) and "test", as
        distilabel's; returns this Distiset."""
        if not 0 < train_size < 1:
            raise ValueError(f"train_size must be between 0 and 1, not {train_size}")
        for leaf, dd in self.items():
            dict.__setitem__(
                self,
                leaf,
                dd["train"].train_test_split(train_size=train_size, shuffle=shuffle, seed=seed),
            )
        return self

    def export(self, path: str | os.PathLike[str], fmt: str = "parquet") -> Path:
        """Write each leaf as `<path>/<leaf>/train.<fmt>` (parquet, jsonl) or a datasets
        folder (arrow), plus pipeline.yaml, pipeline.log and README.md. Built in a
        sibling folder and renamed into place: a failure leaves nothing at `path`."""
        import shutil

        out = Path(path)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise DistisetError(f"{out} exists and is not an empty folder; choose a new one")
        tmp = out.with_name(f".{out.name}.incomplete-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            for leaf, dd in self.items():
                ds = dd["train"]
                if fmt == "arrow":
                    dd.save_to_disk(str(tmp / leaf))
                    continue
                (tmp / leaf).mkdir(parents=True)
                if fmt == "parquet":
                    ds.to_parquet(str(tmp / leaf / "train.parquet"))
                elif fmt == "jsonl":
                    ds.to_json(str(tmp / leaf / "train.jsonl"), lines=True)
                else:
                    raise DistisetError(f"unknown format {fmt!r}: use parquet, jsonl or arrow")
            for name, text in (
                (PIPELINE_YAML, self.pipeline_yaml),
                (PIPELINE_LOG, self.log),
                (CARD, self.card()),
            ):
                if text is not None:
                    (tmp / name).write_text(text, encoding="utf-8")
            if out.exists():
                out.rmdir()
            tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out

    def card(self) -> str:
        """A dataset card: what produced the data and how to reproduce it."""
        lines = [
            "---",
            "tags:",
            "- castore",
            "- synthetic",
            "---",
            "",
            "# Dataset made with castore",
            "",
        ]
        if self.run is not None:
            lines += [
                f"Pipeline `{self.run.name}`, signature `{self.run.signature}`, "
                f"status `{self.run.status}`.",
                "",
            ]
        lines += ["| subset | rows | columns |", "|---|---|---|"]
        for leaf, dd in self.items():
            ds = dd["train"]
            lines.append(f"| {leaf} | {ds.num_rows} | {', '.join(ds.column_names)} |")
        lines += [
            "",
            "## Reproduce",
            "",
            "The `pipeline.yaml` next to this card fully describes the pipeline. Its custom",
            "steps' files and its data files are named relative to the project folder the",
            "run was started in: in a checkout of that project, run",
            "",
            "```bash",
            "pip install castore",
            "cas run pipeline.yaml",
            "```",
            "",
        ]
        if self.pipeline_yaml:
            lines += ["## pipeline.yaml", "", "```yaml", self.pipeline_yaml.rstrip(), "```", ""]
        return "\n".join(lines)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool = False,
        token: str | None = None,
        generate_card: bool = True,
        include_script: bool = False,
        commit_message: str | None = None,
    ) -> None:
        """Upload each leaf as a config of `repo_id`, then the yaml, the log, the card
        (`generate_card`) and, with `include_script`, the script that is running (as
        distilabel does)."""
        from huggingface_hub import HfApi

        files = self.hub_files(generate_card=generate_card, include_script=include_script)
        for leaf, dd in self.items():
            dd.push_to_hub(
                repo_id,
                config_name=leaf,
                private=private,
                token=token,
                commit_message=commit_message,
            )
        api = HfApi(token=token)
        for name, text in files.items():
            api.upload_file(
                path_or_fileobj=text.encode("utf-8"),
                path_in_repo=name,
                repo_id=repo_id,
                repo_type="dataset",
                commit_message=commit_message or f"Upload {name}",
            )

    def hub_files(
        self, *, generate_card: bool = True, include_script: bool = False
    ) -> dict[str, str]:
        """The files `push_to_hub` uploads beside the data."""
        files = {CARD: self.card()} if generate_card else {}
        if self.pipeline_yaml:
            files[PIPELINE_YAML] = self.pipeline_yaml
        if self.log:
            files[PIPELINE_LOG] = self.log
        if include_script:
            import sys

            script = getattr(sys.modules.get("__main__"), "__file__", None)
            if not script or not os.path.isfile(script):
                raise DistisetError(
                    "push_to_hub(include_script=True): no script is running (an interactive "
                    "session?); upload it yourself"
                )
            files[os.path.basename(script)] = Path(script).read_text(encoding="utf-8")
        return files


def _saved(fs: Any, root: str, path: Any) -> tuple[list[str], dict[str, Any], str]:
    """(leaves, castore's distiset.json, the folder with pipeline.yaml and the log) of a
    saved Distiset: castore's (distiset.json) or distilabel 1.5's (distiset_configs/)."""
    try:
        with fs.open(_join(root, "distiset.json"), "r", encoding="utf-8") as f:
            meta = json.load(f)
        return list(meta["leaves"]), meta, root
    except FileNotFoundError:
        pass
    if not fs.isdir(_join(root, DISTILABEL_CONFIGS)):
        raise DistisetError(
            f"{path} is not a saved Distiset (no distiset.json, and no "
            f"{DISTILABEL_CONFIGS}/ as distilabel writes)"
        )
    leaves = sorted(
        name
        for name in (p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
        if name not in (DISTILABEL_CONFIGS, "artifacts") and fs.isdir(_join(root, name))
    )
    return leaves, {}, _join(root, DISTILABEL_CONFIGS)


def saved_leaves(path: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """The leaf names of a saved Distiset (castore's or distilabel 1.5's)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(path), **(storage_options or {}))
    return _saved(fs, root, path)[0]


def _metadata(ds: datasets.Dataset, keep: bool | str) -> datasets.Dataset:
    """Without the metadata column, or (`keep`) with it, named `keep` when a string."""
    drop = [c for c in METADATA_COLUMNS if c in ds.column_names]
    if not keep:
        return ds.remove_columns(drop) if drop else ds
    if isinstance(keep, str) and METADATA_COLUMN in ds.column_names and keep != METADATA_COLUMN:
        if keep in ds.column_names:
            raise ValueError(f"the metadata column cannot be named {keep!r}: that is a column")
        return ds.rename_column(METADATA_COLUMN, keep)
    return ds


def _empty_dataset() -> datasets.Dataset:
    import datasets
    import pyarrow as pa

    return datasets.Dataset(pa.table({}))


def _join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


# -- create_distiset from a folder ------------------------------------------------------


def create_distiset(
    data_dir: str | os.PathLike[str],
    pipeline_path: str | os.PathLike[str] | None = None,
    log_filename_path: str | os.PathLike[str] | None = None,
    enable_metadata: bool = False,
) -> Distiset:
    """A Distiset from a `data/` folder with one sub-folder of Parquet files per leaf.

    Reads castore's `runs/<name>/<sig>/data`, any `data/<leaf>/00001.parquet` folder and a
    distilabel 1.5 cache folder (`…/data/steps_outputs/<leaf>/…`) alike. pipeline.yaml and
    pipeline.log are looked for next to `data_dir` when not given; their absence is fine.
    Raises DistisetError naming the path for a missing folder, no Parquet files, leaf
    files whose schemas disagree, or a corrupt file."""
    import datasets

    data = Path(data_dir).expanduser()
    if not data.is_dir():
        raise DistisetError(f"{data} is not a folder")
    base, meta_dir = _locate(data)
    leaves = _leaf_dirs(base)
    out = Distiset()
    for name, folder in leaves:
        files = sorted(folder.glob("*.parquet"))
        if not files:
            log.warning("skipping empty leaf folder %s", folder)
            continue
        table = _read_leaf(files)
        out[name] = datasets.DatasetDict(
            {"train": _metadata(datasets.Dataset(table), enable_metadata)}
        )
    if not out:
        raise DistisetError(f"no Parquet files under {data}")
    for attr, path_attr, given, default in (
        ("pipeline_yaml", "pipeline_path", pipeline_path, PIPELINE_YAML),
        ("log", "log_filename_path", log_filename_path, PIPELINE_LOG),
    ):
        path = Path(given) if given else meta_dir / default
        if path.is_file():
            setattr(out, attr, path.read_text(encoding="utf-8", errors="replace"))
            setattr(out, path_attr, path)
        elif given:
            raise DistisetError(f"{path} does not exist")
    return out


def _locate(data: Path) -> tuple[Path, Path]:
    """(folder holding the leaf folders, folder holding pipeline.yaml/log).

    castore and plain folders: `<run>/data/<leaf>/`, yaml in `<run>/`. distilabel 1.5:
    `<…>/executions/<hash>/data/steps_outputs/<leaf>/`, yaml in `executions/<hash>/`.
    A run or execution folder itself, or the steps_outputs folder, is accepted too."""
    if (data / "steps_outputs").is_dir():
        return data / "steps_outputs", data.parent
    if data.name == "steps_outputs":
        return data, data.parent.parent
    if (data / "data").is_dir() and not any(data.glob("*/*.parquet")):
        return _locate(data / "data")
    return data, data.parent


def _leaf_dirs(base: Path) -> list[tuple[str, Path]]:
    dirs = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise DistisetError(f"{base} has no leaf folders (expected data/<leaf>/*.parquet)")
    return [(p.name, p) for p in dirs]


def _read_leaf(files: list[Path]) -> pa.Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for f in files:
        try:
            tables.append(pq.read_table(f))
        except (pa.ArrowInvalid, OSError) as e:
            raise DistisetError(f"{f} is not a readable Parquet file: {e}") from None
    try:
        schema = unify([t.schema for t in tables])
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise DistisetError(
            f"the Parquet files in {files[0].parent} disagree on their schema: {e}"
        ) from None
    try:
        return pa.concat_tables(
            [conform(t, schema) for t in tables if t.num_rows or len(tables) == 1]
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
        raise DistisetError(
            f"the Parquet files in {files[0].parent} disagree on their schema: {e}"
        ) from None


__all__ = ["Distiset", "DistisetError", "create_distiset"]
