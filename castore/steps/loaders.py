"""Generator steps that load data: from dicts, from files (any fsspec URL), from a dataset."""

from __future__ import annotations

import glob
import logging
import os
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, PrivateAttr

from castore.errors import ConfigError
from castore.hashing import Hasher, local_digest, local_stamp, stamped_digest
from castore.pipeline.step import GeneratorStep, runtime_field

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger("castore")


def _slices(
    table: pa.Table, offset: int, size: int, limit: int | None = None
) -> Iterator[pa.Table]:
    if limit is not None:
        table = table.slice(0, limit)
    for start in range(offset, table.num_rows, size):
        yield table.slice(start, size)


def _required(step: GeneratorStep, field: str) -> Any:
    """A field that may be set at run time (as distilabel allows), but must be by then."""
    value = getattr(step, field)
    if value is None:
        raise ConfigError(
            f"step {step.name}: {field} is not set; pass it to the step, in "
            f"run(parameters={{{step.name!r}: {{{field!r}: ...}}}}) or as "
            f"--param {step.name}.{field}=..."
        )
    return value


_NUM_EXAMPLES = "At most this many rows (the first ones)."


def _remote_stamp(path: str) -> tuple[Any, ...]:
    """What a remote file's listing says of its version (ETag or modification time, and
    size), as far as the backend tells."""
    import fsspec

    fs, _, (p,) = fsspec.get_fs_token_paths(path)
    info = fs.info(p)
    keys = ("ETag", "etag", "LastModified", "mtime", "last_modified", "blob_id", "size")
    return tuple(str(info.get(k)) for k in keys)


def _folder_stamps(root: str) -> dict[str, tuple[int, ...]]:
    """relative path -> local_stamp of every file under `root`."""
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)
    return {os.path.relpath(p, root): local_stamp(p) for p in files}


class _FolderLoader(GeneratorStep):
    """A loader whose data may be a local folder (a saved dataset), keyed by its files'
    contents; the batches must be read from the versions that were hashed."""

    # (folder, stamps of its files) this run's fingerprint hashed.
    _folder_keyed: tuple[str, dict[str, tuple[int, ...]]] | None = PrivateAttr(None)

    def refresh(self) -> None:
        self._folder_keyed = None

    def _folder_identity(self, root: str) -> list[list[str]]:
        """[relative path, blake3] of every file under `root` (hashed once per version of
        each file in a process), and their versions remembered for check_source."""
        stamps = _folder_stamps(root)
        if self._folder_keyed is None:
            self._folder_keyed = (root, stamps)
        return [[rel, stamped_digest(os.path.join(root, rel), st)] for rel, st in stamps.items()]

    def check_source(self) -> None:
        if self._folder_keyed is None:
            return
        root, stamps = self._folder_keyed
        try:
            now = _folder_stamps(root)
        except OSError:
            now = {}
        if now != stamps:
            raise ConfigError(
                f"step {self.name}: the files of {root} changed while the run read them; run again"
            )


class LoadDataFromDicts(GeneratorStep):
    """Rows given inline; they are part of the step's fingerprint. Above 64 KiB of JSON
    they are stored once as an object that pipeline.yaml names (castore/pipeline/inline.py)."""

    inline_fields: ClassVar[tuple[str, ...]] = ("data",)
    data: list[dict[str, Any]] = Field(description="The rows.")

    def process(self, offset: int = 0) -> Iterator[list[dict[str, Any]]]:
        for start in range(offset, len(self.data), self.batch_size):
            yield self.data[start : start + self.batch_size]

    def columns_after(self, _available: Any) -> set[str] | None:
        return {k for row in self.data for k in row} if self.data else None


FileFormat = Literal["auto", "jsonl", "json", "csv", "parquet"]


class LoadDataFromFileSystem(GeneratorStep):
    """jsonl, json, csv or parquet from a local path, glob or fsspec URL. The files'
    contents enter the fingerprint: an edited file invalidates, an untouched one does not."""

    # The path is not hashed (the files' contents are): the same data under another home
    # directory or on another machine keeps its cache.
    path_fields: ClassVar[tuple[str, ...]] = ("data_files",)
    data_files: str | None = runtime_field(None, description="A path, a glob, or an fsspec URL.")
    format: FileFormat = "auto"
    num_examples: int | None = Field(None, ge=0, description=_NUM_EXAMPLES)

    def _paths(self) -> list[str]:
        data_files: str = _required(self, "data_files")
        if "://" in data_files:
            import fsspec

            fs, _, paths = fsspec.get_fs_token_paths(data_files)
            return self._as_keyed([fs.unstrip_protocol(p) for p in sorted(paths)])
        path = os.path.expanduser(data_files)
        paths = sorted(glob.glob(path)) if any(c in path for c in "*?[") else [path]
        if not paths or not all(os.path.isfile(p) for p in paths):
            raise ConfigError(f"step {self.name}: no data file at {self.data_files}")
        return self._as_keyed(paths)

    def _format(self, path: str) -> str:
        if self.format != "auto":
            return self.format
        ext = path.rsplit(".", 1)[-1].lower()
        fmt = {
            "jsonl": "jsonl",
            "ndjson": "jsonl",
            "json": "json",
            "csv": "csv",
            "parquet": "parquet",
            "pq": "parquet",
        }.get(ext)
        if fmt is None:
            raise ConfigError(f"step {self.name}: cannot tell the format of {path}; set format=")
        return fmt

    # The files this run's fingerprint hashed, and their versions then: what `process`
    # reads must be them (a file written between the two would be stored under the key
    # of its earlier contents).
    _keyed: dict[str, tuple[Any, ...]] | None = PrivateAttr(None)

    def refresh(self) -> None:
        self._keyed = None

    def extra_identity(self) -> Any:
        out = []
        stamps: dict[str, tuple[Any, ...]] = {}
        for path in self._paths():
            if "://" not in path:
                stamps[path] = local_stamp(path)
                out.append(local_digest(path))
                continue
            import fsspec

            stamps[path] = _remote_stamp(path)
            h = Hasher()
            with fsspec.open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            out.append(h.hexdigest())
        if self._keyed is None:
            self._keyed = stamps
        return {"files": out}

    # Not in `process` (whose text is this built-in step's code version, and so its key).
    def _as_keyed(self, paths: list[str]) -> list[str]:
        """`paths`, refused when this run's fingerprint hashed other files (one added to,
        or gone from, the glob since)."""
        if self._keyed is not None and list(self._keyed) != paths:
            raise ConfigError(
                f"step {self.name}: the files {self.data_files} names changed after the run "
                "hashed them; run again"
            )
        return paths

    def _still_keyed(self, path: str) -> None:
        """After `path` is read: refused when it is not the version the run hashed."""
        if self._keyed is None:
            return
        now = _remote_stamp(path) if "://" in path else local_stamp(path)
        if now != self._keyed.get(path):
            raise ConfigError(f"step {self.name}: {path} changed while the run read it; run again")

    def append_source(self) -> str | None:
        """The one local jsonl file this step reads whole, in order: a run can then reuse
        the batches of an earlier version of the file that this one extends
        (castore/pipeline/appends.py). None for globs, URLs, other formats and
        `num_examples`, and for a subclass that reads otherwise (its own `process` or
        `_read`: this path would bypass it)."""
        cls = type(self)
        if cls.process is not LoadDataFromFileSystem.process or cls._read is not (
            LoadDataFromFileSystem._read
        ):
            return None
        if self.num_examples is not None:
            return None
        paths = self._paths()
        if len(paths) != 1 or "://" in paths[0] or self._format(paths[0]) != "jsonl":
            return None
        return paths[0]

    def _read(self, path: str) -> pa.Table:
        import fsspec
        import pyarrow as pa
        import pyarrow.csv as pcsv
        import pyarrow.json as pjson
        import pyarrow.parquet as pq

        fmt = self._format(path)
        with fsspec.open(path, "rb") as f:
            if fmt == "parquet":
                table = pq.read_table(f)
            elif fmt == "csv":
                table = pcsv.read_csv(f)
            elif fmt == "jsonl":
                table = pjson.read_json(f)
            else:
                import json

                data = json.load(f)
                table = pa.Table.from_pylist([data] if isinstance(data, dict) else data)
        self._still_keyed(path)  # after the read: a write during it shows too
        return table

    def process(self, offset: int = 0) -> Iterator[pa.Table]:
        import pyarrow as pa

        tables = []
        for path in self._paths():
            try:
                tables.append(self._read(path))
            except (pa.ArrowInvalid, ValueError) as e:
                raise ConfigError(f"step {self.name}: cannot read {path}: {e}") from None
        table = pa.concat_tables(tables, promote_options="permissive")
        yield from _slices(table, offset, self.batch_size, self.num_examples)


_COMMIT = re.compile(r"[0-9a-f]{40}")


class LoadDataFromHub(_FolderLoader):
    """`datasets.load_dataset(repo_id, name=config, split=split)`; a local dataset folder
    works offline, and its files' contents enter the fingerprint.

    A hub dataset is keyed and loaded at one commit: `revision` (a branch, a tag, or
    main when unset) is resolved to the commit it names when each run starts, so a
    dataset that changed on the hub is loaded again instead of served from the cache.
    Offline (HF_HUB_OFFLINE=1) the commit is the one in the local Hugging Face cache."""

    repo_id: str | None = runtime_field(None, description="Hub id or local dataset folder.")
    split: str = "train"
    config: str | None = None
    # Not hashed itself: the commit it names is (a branch and its commit share a cache).
    revision: str | None = runtime_field(
        None, description="Branch, tag or commit (main when unset); its commit is hashed."
    )
    num_examples: int | None = Field(None, ge=0, description=_NUM_EXAMPLES)
    # ((repo_id, revision, config), commit) of this run: `process` loads what was keyed.
    _pinned: tuple[tuple[str, str | None, str | None], str] | None = PrivateAttr(None)

    def refresh(self) -> None:
        super().refresh()
        self._pinned = None

    def extra_identity(self) -> Any:
        repo_id: str = _required(self, "repo_id")
        if os.path.isdir(repo_id):
            return {"local": self._folder_identity(repo_id)}
        return {"hub": repo_id, "commit": self._commit(repo_id)}  # repo_id is hashed here

    def _commit(self, repo_id: str) -> str:
        asked = (repo_id, self.revision, self.config)
        if self._pinned is None or self._pinned[0] != asked:
            self._pinned = (asked, self._resolve(repo_id))
        return self._pinned[1]

    def _resolve(self, repo_id: str) -> str:
        """The commit `revision` names now: given, asked of the hub, or offline the
        commit of the copy `datasets` has cached (what it would load)."""
        from huggingface_hub import HfApi, constants, errors

        named = f"{self.revision or 'main'!r} of hub dataset {repo_id}"
        pinned = self.revision is not None and _COMMIT.fullmatch(self.revision)
        if constants.is_offline_mode():
            commit = self._builder(repo_id, self.revision).hash
            if not isinstance(commit, str) or not _COMMIT.fullmatch(commit):
                raise ConfigError(
                    f"step {self.name}: offline, and {named} is not in the local "
                    "Hugging Face cache; run once online, or pin revision='<commit>'"
                )
            if pinned and commit != self.revision:
                # datasets offline loads its newest cached copy, whatever was asked
                raise ConfigError(
                    f"step {self.name}: offline, and the cached copy of {repo_id} is commit "
                    f"{commit}, not {self.revision}; go online once, or pin the cached one"
                )
            if not pinned:
                log.warning(
                    "step %s: offline (HF_HUB_OFFLINE): %s is keyed and loaded at its "
                    "cached commit %s",
                    self.name,
                    repo_id,
                    commit[:12],
                )
            return commit
        if pinned:
            return str(self.revision)
        try:
            sha = HfApi().dataset_info(repo_id, revision=self.revision, timeout=30).sha
        except errors.RevisionNotFoundError:
            raise ConfigError(
                f"step {self.name}: hub dataset {repo_id} has no revision {self.revision!r}"
            ) from None
        except (errors.RepositoryNotFoundError, errors.DisabledRepoError):
            raise ConfigError(
                f"step {self.name}: no hub dataset {repo_id} (or it is private or gated: "
                "set HF_TOKEN to a token that can read it)"
            ) from None
        # Connection, timeout, server error: huggingface_hub's HTTP errors (its HTTP
        # library's base class; OSError where it uses requests).
        except (OSError, getattr(errors, "HTTPError", OSError)) as e:
            raise ConfigError(
                f"step {self.name}: cannot reach the hub to resolve {named} "
                f"({type(e).__name__}); retry, set HF_HUB_OFFLINE=1 to use the cached "
                "copy, or pin revision='<commit>'"
            ) from None
        if not isinstance(sha, str) or not _COMMIT.fullmatch(sha):
            raise ConfigError(f"step {self.name}: the hub gave no commit for {named}")
        return sha

    def _builder(self, repo_id: str, revision: str | None) -> Any:
        import datasets

        try:
            return datasets.load_dataset_builder(repo_id, name=self.config, revision=revision)
        except (OSError, ValueError) as e:  # datasets' not-found errors are OSErrors
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"step {self.name}: cannot load {repo_id}: {why}") from None

    def process(self, offset: int = 0) -> Iterator[pa.Table]:
        repo_id: str = _required(self, "repo_id")
        if os.path.isdir(repo_id):
            import datasets

            ds = datasets.load_dataset(repo_id, name=self.config, split=self.split)
        else:
            commit = self._commit(repo_id)
            builder = self._builder(repo_id, commit)
            # datasets falls back to its newest cached copy, whatever revision was
            # asked, when the hub cannot be reached: rows of another commit than the key's.
            if builder.hash != commit:
                raise ConfigError(
                    f"step {self.name}: {repo_id} at commit {commit[:12]} is not what "
                    f"datasets can load (its cached copy is commit {str(builder.hash)[:12]});"
                    " go online once to download it, or pin revision= to the cached commit"
                )
            builder.download_and_prepare()
            ds = builder.as_dataset(split=self.split)
        yield from _slices(ds.data.table, offset, self.batch_size, self.num_examples)


class LoadDataFromDisk(_FolderLoader):
    """A dataset saved with `save_to_disk` (a `Dataset` or `DatasetDict` folder), or with
    `is_distiset` a saved Distiset (castore's or distilabel 1.5's), leaf `config` (the
    only leaf when unset). Its files' contents enter the fingerprint."""

    path_fields: ClassVar[tuple[str, ...]] = ("dataset_path",)
    dataset_path: str | None = runtime_field(None, description="The saved folder.")
    split: str | None = None
    config: str | None = None
    is_distiset: bool = False
    num_examples: int | None = Field(None, ge=0, description=_NUM_EXAMPLES)

    def _folder(self) -> str:
        path: str = os.path.expanduser(_required(self, "dataset_path"))
        if not os.path.isdir(path):
            raise ConfigError(f"step {self.name}: no saved dataset folder at {path}")
        if not self.is_distiset:
            if self.config is not None:
                raise ConfigError(
                    f"step {self.name}: config= names a Distiset leaf; set is_distiset=True"
                )
            return path
        if self.config is not None:
            return os.path.join(path, self.config)
        from castore.distiset import saved_leaves

        leaves = saved_leaves(path)
        if len(leaves) != 1:
            raise ConfigError(
                f"step {self.name}: the Distiset at {path} has leaves {sorted(leaves)}; "
                "set config= to one of them"
            )
        return os.path.join(path, leaves[0])

    def extra_identity(self) -> Any:
        return {"local": self._folder_identity(self._folder())}

    def process(self, offset: int = 0) -> Iterator[pa.Table]:
        import datasets

        folder = self._folder()
        try:
            ds = datasets.load_from_disk(folder)
        except FileNotFoundError as e:
            raise ConfigError(f"step {self.name}: {folder} is not a saved dataset: {e}") from None
        if isinstance(ds, datasets.DatasetDict):
            split = self.split or ("train" if "train" in ds else None)
            if split not in ds:
                raise ConfigError(
                    f"step {self.name}: {folder} has splits {sorted(ds)}; set split= to one"
                )
            ds = ds[split]
        elif self.split is not None:
            raise ConfigError(
                f"step {self.name}: {folder} is one Dataset, without splits; drop split="
            )
        yield from _slices(ds.data.table, offset, self.batch_size, self.num_examples)
