"""Live progress: one tqdm bar per step on a terminal, periodic plain lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Any


class Progress:
    """`update(step, done, total, rows, cached)` after each batch; `close()` at the end."""

    def __init__(self, steps: list[str], *, enabled: bool) -> None:
        self.bars: dict[str, Any] = {}
        self.t0 = time.monotonic()
        if not enabled or not sys.stderr.isatty():
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:  # tqdm comes with datasets; plain lines are the fallback
            return
        width = max(len(s) for s in steps)
        for i, name in enumerate(steps):
            self.bars[name] = tqdm(
                desc=name.ljust(width),
                total=None,
                unit="batch",
                position=i,
                leave=True,
                dynamic_ncols=True,
                file=sys.stderr,
            )

    @property
    def live(self) -> bool:
        return bool(self.bars)

    def update(self, step: str, done: int, total: int | None, rows: int, cached: int) -> None:
        bar = self.bars.get(step)
        if bar is None:
            return
        if total is not None and bar.total != total:
            bar.total = total
        bar.n = done
        bar.set_postfix_str(f"{rows} rows, {cached} cached", refresh=False)
        bar.refresh()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()
