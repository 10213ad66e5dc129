"""Every ```python block in docs/ and the README runs, as a user would paste it."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def _blocks():
    for path in sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")]):
        for i, code in enumerate(BLOCK.findall(path.read_text())):
            yield pytest.param(code, id=f"{path.name}-{i}")


@pytest.mark.parametrize("code", list(_blocks()))
def test_doc_code_block_runs(code, tmp_path):
    script = tmp_path / "block.py"
    script.write_text(code)
    p = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert p.returncode == 0, p.stderr[-3000:]
