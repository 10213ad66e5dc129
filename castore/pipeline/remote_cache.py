"""Read-through and write-through with a remote during a run.

A local miss asks the remote's action entries (listed once at the start) and fetches the
outputs, verified, on a hit. With `push`, every new batch is uploaded as it is produced,
and the run's manifests and ref at the end. The remote being unreachable or slow
degrades to local-only with a warning: it never fails a run.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from functools import partial
from typing import Any

from castore.errors import CorruptObject
from castore.store import Store
from castore.store.models import ActionEntry

log = logging.getLogger("castore.run")


class RemoteCache:
    def __init__(self, store: Store, remote: Any, *, push: bool, timeout: float = 15.0) -> None:
        self.store = store
        self.remote = remote
        self.push_enabled = push
        self.timeout = timeout
        self.active = True
        self.hits = 0
        self.uploaded = 0
        self.keys: set[str] = self._call(remote.list_actions, "list action entries") or set()
        # What the remote's own (content-addressed) step manifests say each key produced:
        # an entry rewritten to name other objects disagrees with them and is not used.
        self.recorded: dict[str, tuple[list[str], list[int]]] = {}
        self.segments: dict[str, list[str]] = {}  # step fingerprint -> row-key segments
        if self.keys:
            found = self._call(remote.manifest_index, "read run manifests")
            if found is not None:
                self.recorded, self.segments = found
        self._uploads: queue.Queue[tuple[str, list[str]] | None] = queue.Queue()
        self._uploader: threading.Thread | None = None
        if push and self.active:
            self._uploader = threading.Thread(
                target=self._upload_loop, daemon=True, name="castore-push"
            )
            self._uploader.start()
        if self.active:
            log.info(
                "remote %s: %d action entries available for read-through%s",
                remote.url,
                len(self.keys),
                "; writing through" if push else "",
            )

    def _call(self, fn: Callable[[], Any], what: str) -> Any:
        """Run a remote call with a timeout, in a daemon thread so a hung remote can
        neither stall the run nor keep the process alive at exit."""
        if not self.active:
            return None
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["value"] = fn()
            except BaseException as e:
                box["error"] = e

        t = threading.Thread(target=target, daemon=True, name="castore-remote")
        t.start()
        t.join(self.timeout)
        if t.is_alive() or isinstance(box.get("error"), Exception):
            err = box.get("error")
            if isinstance(err, CorruptObject):
                raise err
            reason = (
                f"no answer in {self.timeout:.0f}s"
                if t.is_alive()
                else (f"{type(err).__name__}: {err}")
            )
            log.warning(
                "remote %s unavailable (%s: %s); continuing with the local store only",
                self.remote.url,
                what,
                reason,
            )
            self.active = False
            return None
        return box.get("value")

    def lookup(self, key: str) -> ActionEntry | None:
        """An entry from the remote, its objects fetched and verified into the store."""
        if not self.active or key not in self.keys:
            return None
        entry = self._call(lambda: self.remote.get_action(key), "read an action entry")
        if entry is None:
            return None
        if key in self.recorded and (list(entry.outputs), list(entry.rows)) != self.recorded[key]:
            log.warning(
                "remote %s: action entry %s disagrees with the step manifest that references "
                "it (tampered?); computing the batch here instead",
                self.remote.url,
                key[:12],
            )
            return None
        if not all(self.fetch(o) for o in entry.outputs) or not self.active:
            return None  # a corrupt or unreachable output: the batch is computed here
        self.store.put_action(key, entry)
        self.hits += 1
        return entry

    def fetch(self, oid: str) -> bool:
        """Read an object through (verified on the way in); False when it cannot be had
        (a corrupt download is named in a warning and stored nowhere)."""
        from castore.remote import fetch_object

        if self.store.has(oid):
            return True
        try:
            self._call(partial(fetch_object, self.store, self.remote, oid), "fetch an object")
        except CorruptObject as e:
            log.warning("remote %s: %s; computing here instead", self.remote.url, e)
            return False
        return self.store.has(oid)

    def fetch_segments(self, fingerprint: str) -> None:
        """The remote's row-key segments of a step, fetched and announced locally, so its
        rows are found by row key (their objects are fetched when used)."""
        for seg in self.segments.get(fingerprint, []):
            if self.active and not self.store.has(seg) and self.fetch(seg):
                self.store.add_row_segment(fingerprint, seg)

    def upload(self, key: str, outputs: list[str]) -> None:
        if self._uploader is not None and self.active:
            self._uploads.put((key, outputs))

    def _upload_loop(self) -> None:
        while (item := self._uploads.get()) is not None:
            key, outputs = item
            if not self.active:
                continue
            try:
                for oid in outputs:
                    self.remote.put_object(self.store, oid)
                entry = self.store.get_action(key)
                if entry is not None:
                    self.remote.put_action(key, entry)
                self.uploaded += 1
            except Exception as e:
                log.warning(
                    "remote %s: write-through failed (%s); continuing locally", self.remote.url, e
                )
                self.active = False

    def finish(self, sig: str) -> None:
        """Drain uploads, then push the run's manifests and ref."""
        if self._uploader is None:
            return
        self._uploads.put(None)
        self._uploader.join(self.timeout * 4)
        if not self.active:
            return
        from castore.transfer import push

        result = self._call(lambda: push(self.store, self.remote, [sig]), "push the run")
        if result is not None:
            log.info(
                "remote %s: pushed %d batches as they were made, then the run's manifests and ref",
                self.remote.url,
                self.uploaded,
            )
