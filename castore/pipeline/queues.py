"""A planned batch on its way to a worker and back, and a step's queues of them: what it
holds meanwhile (its batch lease, its claim on the rows it computes, the rows found by
key), until the scheduler settles it (castore.pipeline.schedule)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from castore.pipeline.plan import PlannedBatch
    from castore.pipeline.rows import RowPlan
    from castore.store import FileLock


@dataclass
class Pending:
    """A planned batch on its way: attempts so far, when it may run again, its lease."""

    batch: PlannedBatch
    attempt: int = 0
    not_before: float = 0.0
    lease: FileLock | None = None
    rows: RowPlan | None = None  # row-wise steps: earlier results found by row key
    claim: FileLock | None = None  # on the rows it computes, while the store is shared
    blockers: list[str] | None = None  # other runs' claims on some of those rows
    remote_blockers: list[str] | None = None  # other machines' claims (on the remote)
    computing: bool = False  # submitted, `process` not yet returned (queued or running)

    def computed(self) -> None:
        """On the worker: `process` returned (a bool store is atomic under the GIL)."""
        self.computing = False

    def unclaim(self) -> None:
        if self.claim is not None:
            self.claim.release()
            self.claim = None


@dataclass
class Queues:
    pending: deque[Pending] = field(default_factory=deque)  # planned, not yet submitted
    waiting: list[Pending] = field(default_factory=list)  # leased by another run
    inflight: int = 0  # submitted, not yet settled
    # Take the newest planned batch first: set once another machine computes rows this
    # run wanted, so the two work towards each other instead of one trailing the other
    # into every batch it claimed.
    backward: bool = False

    def next(self) -> Pending:
        return self.pending[-1] if self.backward else self.pending[0]

    def take(self) -> Pending:
        return self.pending.pop() if self.backward else self.pending.popleft()

    def put_back(self, p: Pending) -> None:
        """A batch taken that is to be taken first again."""
        if self.backward:
            self.pending.append(p)
        else:
            self.pending.appendleft(p)
