"""What a terminal shows during a run, through a real pseudo-terminal 80 columns wide:
log lines are printed between the progress bars, never over them, and bar lines fit."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.conftest import REPO, cas_command

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run_in_pty(args: list[str], env: dict[str, str], columns: int = 80) -> str:
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert proc.wait(timeout=60) == 0, out.decode(errors="replace")
    return out.decode(errors="replace")


@pytest.mark.slow
def test_log_lines_go_between_the_bars_and_bars_fit_80_columns(tmp_path):
    env = {**os.environ, "CASTORE_TEST_FLAG": str(tmp_path / "flag"), "COLUMNS": "80"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cmd = cas_command(("run", str(REPO / "tests" / "pipelines" / "retrying.py")), tmp_path / "c")
    text = ANSI.sub("", run_in_pty(cmd, env))
    segments = [seg for line in text.split("\n") for seg in line.split("\r")]
    warnings = [s for s in segments if "WARNING" in s]
    assert warnings, text
    # The whole warning on its own line, from its timestamp to its end: nothing of a
    # bar before it or after it.
    assert any(
        re.fullmatch(
            r"\[[0-9 :-]+\] WARNING step a_step_with_a_name_longer_than_twenty_"
            r"characters batch \d+ failed \(a transient failure on "
            r"purpose\); retry 1/2 in 0\.1s\s*",
            s,
        )
        for s in warnings
    ), warnings
    bars = [s for s in segments if "batches" not in s and "|" in s and "cached" in s]
    assert bars, text
    assert max(len(s.rstrip()) for s in bars) <= 80, max(bars, key=len)
