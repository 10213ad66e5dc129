"""Live progress: one tqdm bar per step on a terminal, periodic plain lines otherwise."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

# While bars are live, console log lines go through this (tqdm.write: clear the bars,
# print the line, draw them again) instead of being printed over the bars.
console_write: Callable[[str], None] | None = None

NAME_WIDTH = 20
# Fits 80 columns: name, a 10-cell bar, batches, rows and cached, elapsed.
BAR_FORMAT = "{desc} |{bar:10}| {n_fmt}/{total_fmt}{postfix} [{elapsed}]"


class Progress:
    """`update(step, done, total, rows, cached)` after each batch; `close()` at the end."""

    def __init__(self, steps: list[str], *, enabled: bool) -> None:
        global console_write
        self.bars: dict[str, Any] = {}
        self.t0 = time.monotonic()
        if not enabled or not sys.stderr.isatty():
            return
        from tqdm import tqdm

        width = min(max(len(s) for s in steps), NAME_WIDTH)
        for i, name in enumerate(steps):
            short = name if len(name) <= width else name[: width - 1] + "…"
            self.bars[name] = tqdm(
                desc=short.ljust(width),
                total=None,
                unit="batch",
                position=i,
                leave=True,
                dynamic_ncols=True,
                bar_format=BAR_FORMAT,
                file=sys.stderr,
            )
        console_write = lambda line: tqdm.write(line, file=sys.stderr)  # noqa: E731

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
        bar.set_postfix_str(f"{rows} rows {cached} cached", refresh=False)
        bar.refresh()

    def close(self) -> None:
        global console_write
        console_write = None
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()
