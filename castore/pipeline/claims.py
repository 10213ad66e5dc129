"""Row claims: the rows of a row-wise step that a run computes right now, so two runs
sharing a store do not pay for one row at once when their batches of the step differ
(another batch size, an input that grew, another pipeline sharing the step).

A batch lease (neighbours.py) stops two runs computing the same batch; rows of a
row-wise step also meet in batches with other keys. So while a run shares its store,
before it computes a batch of a row-wise step it claims the keys of the rows it is about
to compute: a lock file locks/claims/<fingerprint>-<run id>-<n>, held with flock (a
killed holder's claim is dead at once) and listing the keys in its detail. The look at
the others' claims and the claim itself happen under one lock (locks/claims.lock), so
two runs cannot both see no claim and then both claim. A batch with a row claimed by
another live run claims nothing and waits until that claim is gone; a batch that got its
claim then takes the rows it now finds by key (stored by a run whose claim went before
it looked) and computes the rest. A waiting batch holds no claim, so two runs never wait
for each other; a claim is released once its batch is stored (its row-key segment
announced) or failed. A run alone on its store claims nothing.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from typing import TYPE_CHECKING

from castore.store.locks import FileLock, live_lock

if TYPE_CHECKING:
    from castore.store import Store

# The claims lock is held for a listing and a few small reads: waiting long means a
# stuck holder, and then the error names it (FileLock.acquire).
GUARD_TIMEOUT = 30.0


class RowClaims:
    """This run's claims on rows of row-wise steps, and its look at the others'."""

    def __init__(self, store: Store, run_id: str) -> None:
        self.store = store
        self.dir = store.layout.claims_dir()
        self.run_id = run_id
        self._n = itertools.count()

    def take(self, fingerprint: str, keys: list[bytes]) -> FileLock | list[str]:
        """A claim on `keys`, held until released; or, when other live runs' claims hold
        some of them, those claims' paths (wait until `held` says they are gone). The
        caller looks for rows stored meanwhile only once it holds its claim: a claim is
        released after its rows' segment is announced, so rows whose claim went before
        this look are found by then, and rows still claimed were refused here."""
        want = {k.hex() for k in keys}
        guard = FileLock(self.store.layout.lock_path("claims.lock"), "claims")
        guard.acquire(timeout=GUARD_TIMEOUT, poll=0.002)
        try:
            blockers = []
            ours = f"{fingerprint}-{self.run_id}-"
            try:
                names = os.listdir(self.dir)
            except FileNotFoundError:
                names = []
            for name in names:
                if not name.startswith(f"{fingerprint}-") or name.startswith(ours):
                    continue
                path = os.path.join(self.dir, name)
                info = live_lock(path)
                if info is None:  # its holder died: nobody computes those rows
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                elif info.kind == "unknown" or want & set(info.detail.get("keys", ())):
                    blockers.append(path)  # unreadable: held live, so assume it overlaps
            if blockers:
                return blockers
            claim = FileLock(
                os.path.join(self.dir, f"{ours}{next(self._n)}"),
                "claim",
                {"run": self.run_id, "keys": sorted(want)},
            )
            claim.acquire()  # a name no one else uses
            return claim
        finally:
            guard.release()

    @staticmethod
    def holders(paths: list[str]) -> list[str]:
        """The run ids behind these claims (their names: <fingerprint>-<run id>-<n>)."""
        return sorted({os.path.basename(p)[65:].rsplit("-", 1)[0] for p in paths})

    @staticmethod
    def held(paths: list[str]) -> bool:
        """Whether any of these claims is still held by a live run."""
        return any(live_lock(p) is not None for p in paths)
