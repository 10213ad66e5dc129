"""Everything under runs/<name>/<sig>/: pipeline.yaml, pipeline.log, data/ (the leaf
batches as files), .arrow/ (the Distiset's memory-mapped leaves) and logs/ (the log of
each attempt while it runs). Every path comes from the store's Layout."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from castore.store import layout as L
from castore.store.exports import Placer, is_link_to, stamp
from castore.store.parquet import encode_parquet

if TYPE_CHECKING:
    from castore.store import Store
    from castore.store.manifests import BatchRecord


class RunFolder:
    def __init__(self, store: Store, name: str, sig: str) -> None:
        self.store = store
        self.root = Path(store.layout.run_dir(name, sig))
        self.pipeline_yaml = Path(store.layout.run_file(name, sig, "pipeline.yaml"))
        self.log = Path(store.layout.run_file(name, sig, "pipeline.log"))
        self.data = Path(store.layout.run_file(name, sig, "data"))
        self.arrow = Path(store.layout.run_file(name, sig, ".arrow"))
        self.logs = Path(store.layout.run_file(name, sig, "logs"))

    def create(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)

    def live_log(self, run_id: str) -> Path:
        """Where attempt `run_id` writes its log while it runs. The id comes from a
        manifest, which may have been pulled: it is checked as the run lock's is before
        it becomes a path (InvalidRefName)."""
        return self.logs / f"{L.validate_name(run_id, 'run id')}.log"

    def store_log(self, run_id: str) -> str | None:
        """Store the attempt's log as an object and place it as pipeline.log (the newest
        attempt to end is the one there); the live file goes once logging has stopped."""
        live = self.live_log(run_id)
        if not live.exists():
            return None
        oid = self.store.put_file(live)
        Placer().place(self.store.path_of(oid), str(self.log))
        return oid

    def drop_live_log(self, run_id: str) -> None:
        with contextlib.suppress(OSError):
            self.live_log(run_id).unlink()

    def place_pipeline_yaml(self, text: str) -> str:
        """Store the recipe as an object and place it as pipeline.yaml (a link to it where
        the filesystem allows: inline rows can make it megabytes, so not twice)."""
        oid = self.store.put_bytes(text.encode("utf-8"))
        Placer().place(self.store.path_of(oid), str(self.pipeline_yaml))
        return oid

    def materialize(self, records: dict[str, list[BatchRecord]], run_id: str) -> None:
        """data/<leaf>/NNNNN.parquet, one file per leaf batch object (reflinked,
        hard-linked or copied: castore/store/exports.py), built beside and renamed into
        place so a reader never sees a half-built folder. The stamp file lists the objects
        and how each file was placed; a folder whose files are all still those objects is
        kept as it is. A leaf batch found in the cache may extend its input (computed
        where the step was not a leaf; castore.store.extend): its file is written whole."""
        leaves = {x: [o for r in recs for o in r.outputs] for x, recs in records.items()}
        extended = {o for recs in records.values() for r in recs if r.extends for o in r.outputs}
        stamp_path = self.data / L.DATA_STAMP
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            doc = json.loads(stamp_path.read_text())
            if doc["leaves"] == leaves and self._intact(leaves, doc["files"]):
                return
        tmp = self.root / f"data.incomplete-{run_id[:8]}"
        shutil.rmtree(tmp, ignore_errors=True)
        placer = Placer()
        files: dict[str, list[int]] = {}
        for leaf, oids in leaves.items():
            (tmp / leaf).mkdir(parents=True, exist_ok=True)
            folder = f"{tmp}{os.sep}{leaf}{os.sep}"  # strings: a path per leaf batch
            for i, oid in enumerate(oids, start=1):
                rel, dst = f"{leaf}/{i:05d}.parquet", f"{folder}{i:05d}.parquet"
                if oid in extended:
                    data = encode_parquet(self.store.get_table(oid))
                    with open(dst, "wb") as f:
                        f.write(memoryview(data))
                    how = "write"
                else:  # tmp is new: nothing is at dst
                    how = placer.place_new(self.store.path_of(oid), dst)
                # A hard link is checked by inode (freshening the object moves its mtime);
                # a clone or copy by its own stamp.
                files[rel] = [] if how == "link" else list(stamp(dst))
        (tmp / L.DATA_STAMP).write_text(json.dumps({"leaves": leaves, "files": files}))
        old = self.root / f"data.old-{run_id[:8]}"
        if self.data.exists():
            self.data.rename(old)
        tmp.rename(self.data)
        shutil.rmtree(old, ignore_errors=True)

    def _intact(self, leaves: dict[str, list[str]], files: dict[str, list[int]]) -> bool:
        data = str(self.data)  # joined as strings: a re-run checks every file of its data/
        for leaf, oids in leaves.items():
            for i, oid in enumerate(oids, start=1):
                rel = f"{leaf}/{i:05d}.parquet"
                path, recorded = f"{data}{os.sep}{leaf}{os.sep}{i:05d}.parquet", files[rel]
                if recorded == [] and not is_link_to(path, self.store.path_of(oid)):
                    return False
                if recorded and list(stamp(path)) != recorded:
                    return False
            if len(os.listdir(self.data / leaf)) != len(oids):
                return False
        return True

    def read_log(self, run_id: str) -> str:
        """The live log of an attempt that is running or was killed before its final seal
        stored it."""
        try:
            return self.live_log(run_id).read_text(encoding="utf-8", errors="replace")
        except (FileNotFoundError, ValueError):
            return ""
