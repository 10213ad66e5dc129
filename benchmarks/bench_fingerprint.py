"""What following a step's code costs (issue 12): the code version of a step whose
`process` reaches every function, class and constant of a generated 2,000-line user
module, against a floor of one `ast.parse` of that module, in the same run.

    python benchmarks/bench_fingerprint.py [--lines 2000] [--repeat 7]
"""

from __future__ import annotations

import argparse
import ast
import importlib
import linecache
import os
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import report


def make_module(lines: int) -> str:
    """Helpers h0..hN, each calling the next and reading a constant; a class every 10."""
    parts = ['"""Generated user module."""\n']
    i = 0
    while sum(p.count("\n") for p in parts) < lines:
        parts.append(
            textwrap.dedent(
                f"""
                C{i} = {{"name": "c{i}", "weights": [{i}, {i + 1}, {i + 2}]}}


                def h{i}(x):
                    # a comment that does not count
                    y = x + len(C{i}["weights"])
                    if y % 3 == 0:
                        y = y * 2
                    return NEXT_{i}(y)
                """
            )
        )
        if i % 10 == 0:
            parts.append(
                textwrap.dedent(
                    f"""
                    class K{i}:
                        def run(self, x):
                            return self.step(x) + 1

                        def step(self, x):
                            return x * {i}
                    """
                )
            )
        i += 1
    text = "".join(parts)
    for j in range(i):
        target = f"h{j + 1}" if j + 1 < i else "_last"
        text = text.replace(f"NEXT_{j}(", f"{target}(")
    text += "\n\ndef _last(x):\n    return x\n\n\ndef entry(x):\n    return h0(x) + K0().run(x)\n"
    return text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="castore-bench-fp-"))
    source = make_module(args.lines)
    (work / "usermod.py").write_text(source)
    (work / "usersteps.py").write_text(
        "from castore import step\nimport usermod\n\n\n"
        "@step(inputs=['x'], outputs=['y'])\ndef Use(rows):\n"
        "    return [{**r, 'y': usermod.entry(r['x'])} for r in rows]\n"
    )
    sys.path.insert(0, str(work))
    from castore import Pipeline, loaded

    mod = importlib.import_module("usersteps")
    with Pipeline("bench-fp"):
        s = mod.Use()

    def cold(edited: bool = False) -> float:
        """Nothing remembered; the module's files older than the process (as after an
        import), or (`edited`) newer: then castore compiles them and compares the code
        objects with the loaded ones (castore/loaded.py)."""
        stamp = time.time() if edited else time.time() - 86400
        for name in ("usermod.py", "usersteps.py"):
            os.utime(work / name, (stamp, stamp))
        loaded._taken.clear()
        loaded._compiled.clear()
        linecache.clearcache()
        t0 = time.perf_counter()
        s.code_version()
        return time.perf_counter() - t0

    def warm() -> float:
        t0 = time.perf_counter()
        s.code_version()
        return time.perf_counter() - t0

    def floor() -> float:
        t0 = time.perf_counter()
        ast.parse(Path(work / "usermod.py").read_text())
        return time.perf_counter() - t0

    res: dict[str, list[float]] = {"cold": [], "edited": [], "warm": [], "floor": []}
    for _ in range(args.repeat):
        res["floor"].append(floor())
        res["edited"].append(cold(edited=True))
        res["cold"].append(cold())
        res["warm"].append(warm())
    _, parts = s.code_parts()
    funcs = sum(k.startswith("function ") for k in parts)
    classes = sum(k.startswith("class ") for k in parts)
    consts = sum(k.startswith("constant ") for k in parts)

    def fmt(k: str) -> str:
        v = res[k]
        return f"min {min(v) * 1000:.1f} ms  median {statistics.median(v) * 1000:.1f} ms"

    report(
        [
            ("user module", f"{source.count(chr(10))} lines"),
            ("reached", f"{funcs} functions, {classes} classes, {consts} constants"),
            ("load average", " ".join(f"{x:.2f}" for x in os.getloadavg())),
            ("floor: ast.parse of the module", fmt("floor")),
            ("code version, cold (no caches)", fmt("cold")),
            ("code version, cold, files newer than the process", fmt("edited")),
            ("code version, warm (same process)", fmt("warm")),
            (
                "ratio cold / floor",
                f"{statistics.median(res['cold']) / statistics.median(res['floor']):.1f} "
                f"(min {min(res['cold']) / min(res['floor']):.1f})",
            ),
        ]
    )


if __name__ == "__main__":
    main()
