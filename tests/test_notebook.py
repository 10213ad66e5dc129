"""Steps written in a notebook: their cells are `__main__`, a module without a file, and
the code version must follow what `process` reaches there as it does in a module (it
followed nothing: a constant or helper edited in another cell kept the key, and the
same kernel was served the old rows). Cells run in IPython's shell, in a real process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.conftest import REPO

CELLS = [
    """
    from castore import Pipeline, Step, StepInput, step
    from castore.llms import OpenAILLM
    from castore.steps import LoadDataFromDicts, TextGeneration
    FACTOR = 2
    LABELS = ["a"]
    SEEN = []
    def helper(x):
        SEEN.append(x)  # a list the run changes: the cell that made it is the key
        return x * FACTOR * len(LABELS)
    """,
    """
    @step(inputs=["x"], outputs=["y"])
    def Times(inputs: StepInput):
        return [{**r, "y": helper(r["x"])} for r in inputs]

    class Bumped(Step):
        inputs = ["x"]
        outputs = ["y"]
        def bump(self, v):
            return v + 1
        def process(self, inputs: StepInput):
            yield [{**r, "y": self.bump(r["x"])} for r in inputs]

    class Polite(TextGeneration):
        def conversation(self, row):
            return [{"role": "user", "content": row["instruction"] + " please"}]

    def go():
        with Pipeline(name="nb") as p:
            load = LoadDataFromDicts(data=[{"x": i} for i in range(4)], batch_size=4)
            load >> Times(name="t")
            load >> Bumped(name="b")
        ds = p.run(cache_dir=CACHE, quiet=True)
        llm = OpenAILLM(model="m", base_url="http://127.0.0.1:9/v1", api_key="k")
        out.append({
            "t": list(ds["t"]["train"]["y"]),
            "b": list(ds["b"]["train"]["y"]),
            "computed": [ds.run.stats[n].batches_computed for n in ("t", "b")],
            "polite": Polite(name="g", llm=llm).fingerprint(),
        })
    go()
    """,
    "FACTOR = 3\ngo()",
    'LABELS = ["a", "b"]\ngo()',
    "go()",
    # The class cell run again with another method, and another conversation.
    "class Bumped(Bumped):\n    def bump(self, v):\n        return v + 10\ngo()",
    """
    class Polite(Polite):
        def conversation(self, row):
            return [{"role": "user", "content": row["instruction"]}]
    go()
    """,
]

DRIVER = """
import json, sys
sys.path.insert(0, {repo!r})
from IPython.core.interactiveshell import InteractiveShell
shell = InteractiveShell.instance()
shell.user_ns.update(CACHE={cache!r}, out=[])
for cell in {cells!r}:
    result = shell.run_cell(cell, store_history=True)  # as a kernel runs cells
    if not result.success:
        raise SystemExit(f"cell failed: {{result.error_in_exec or result.error_before_exec!r}}")
print(json.dumps(shell.user_ns["out"]))
"""


def test_a_notebooks_cells_are_followed(tmp_path):
    cells = [textwrap.dedent(c) for c in CELLS]
    code = DRIVER.format(repo=str(REPO), cache=str(tmp_path / "cache"), cells=cells)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["t"] for r in runs] == [
        [0, 2, 4, 6],
        [0, 3, 6, 9],  # FACTOR edited: computed again (it was served [0, 2, 4, 6])
        [0, 6, 12, 18],  # a list edited
        [0, 6, 12, 18],
        [0, 6, 12, 18],
        [0, 6, 12, 18],
    ]
    assert [r["computed"][0] for r in runs] == [1, 1, 1, 0, 0, 0]
    # A method edited in the class's cell: computed again (it was served [1, 2, 3, 4])
    assert [r["b"] for r in runs] == [[1, 2, 3, 4]] * 4 + [[10, 11, 12, 13]] * 2
    assert [r["computed"][1] for r in runs] == [1, 0, 0, 0, 1, 0]
    polite = [r["polite"] for r in runs]
    assert len(set(polite[:-1])) == 1 and polite[-1] != polite[0]
