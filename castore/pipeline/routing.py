"""Routing between steps: each batch of a step goes to some of its successors."""

from __future__ import annotations

from typing import TYPE_CHECKING

from castore.errors import PipelineError

if TYPE_CHECKING:
    from castore.pipeline.step import _Step


class sample_n_steps:
    """Routing: `a >> sample_n_steps(1) >> [b, c]` sends each batch of `a` to one of
    b, c, chosen at random seeded from the batch's action key (so reruns choose alike)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._source: _Step | None = None

    def _bind(self, source: _Step) -> sample_n_steps:
        bound = sample_n_steps(self.n)
        bound._source = source
        return bound

    def __rshift__(self, targets: list[_Step]) -> list[_Step]:
        if self._source is None:
            raise PipelineError("use routing as: step >> sample_n_steps(n) >> [a, b]")
        if not isinstance(targets, list) or not targets:
            raise PipelineError("sample_n_steps(n) routes to a list of steps")
        self._source._require_pipeline().route(self._source, targets, self.n)
        return targets
