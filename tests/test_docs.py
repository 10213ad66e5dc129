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


def test_troubleshooting_quotes_real_messages():
    """Each message the troubleshooting page quotes is raised somewhere in castore."""
    page = (REPO / "docs" / "troubleshooting.md").read_text()
    quoted = re.findall(r"^\| `([^`]+)`", page, re.M)
    source = "\n".join(p.read_text() for p in (REPO / "castore").rglob("*.py"))
    source += "\n".join(p.read_text() for p in (REPO / "cli").rglob("*.py"))
    assert len(quoted) >= 20
    for message in quoted:
        for part in re.split(r" … |…| / ", message):
            part = part.strip().strip("`")
            if part:
                assert part in source, f"{part!r} is not a castore message"
