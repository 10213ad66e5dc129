from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from castore.store import Store, extend

REPO = Path(__file__).resolve().parent.parent
MIN_BASE_BYTES = extend.MIN_BASE_BYTES  # castore's own, before `isolation` lowers it


@pytest.fixture(autouse=True)
def isolation(tmp_path_factory, monkeypatch):
    """No test touches ~/.cache: the default store is a fresh tmp dir."""
    cache = tmp_path_factory.mktemp("default-cache") / "castore"
    monkeypatch.setenv("CASTORE_CACHE_DIR", str(cache))
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "120")
    monkeypatch.delenv("CASTORE_FSYNC", raising=False)
    monkeypatch.delenv("CASTORE_REMOTE", raising=False)
    # Test rows are tiny: without this no batch would extend its input (castore/store/
    # extend.py), and every store path would be tested with whole objects only.
    monkeypatch.setattr("castore.store.extend.MIN_BASE_BYTES", 0)
    return cache


@pytest.fixture
def server():
    """The OpenAI-compatible test server on 127.0.0.1 (tests/llm_server.py)."""
    from tests.llm_server import LLMServer

    s = LLMServer().start()
    yield s
    s.stop()


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "store")


def store_calls(monkeypatch, method: str) -> list[str]:
    """The object ids `Store.<method>` (get_table, get_bytes, ...) is called with from now
    on, in order: what a test counts to show an object was or was not read."""
    calls: list[str] = []
    real = getattr(Store, method)

    def counted(self, oid, **kw):
        calls.append(oid)
        return real(self, oid, **kw)

    monkeypatch.setattr(Store, method, counted)
    return calls


@pytest.fixture
def make_store(tmp_path):
    def make(name: str = "s", **kw) -> Store:
        return Store(tmp_path / name, **kw)

    return make


class CasResult:
    def __init__(self, proc: subprocess.CompletedProcess):
        self.returncode = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr

    def json(self):
        return json.loads(self.stdout)

    def __repr__(self) -> str:
        out, err = self.stdout[-2000:], self.stderr[-2000:]
        return f"<cas rc={self.returncode} stdout={out!r} stderr={err!r}>"


def cas_command(args: tuple[str, ...], cache_dir: Path | str | None) -> list[str]:
    """python -m castore.cli [--cache-dir D] [group options] COMMAND ARGS."""
    cmd = [sys.executable, "-m", "castore.cli"]
    if cache_dir is not None:
        cmd += ["--cache-dir", str(cache_dir)]
    # Group options (-v, -q, --debug) go before the command.
    while args and args[0] in ("-v", "-vv", "-q", "--debug"):
        cmd.append(args[0])
        args = args[1:]
    return cmd + list(args)


def run_cas(
    *args: str,
    cache_dir: Path | str | None = None,
    env: dict | None = None,
    timeout: float = 120,
    cwd: Path | str | None = None,
) -> CasResult:
    """`cas` as a real subprocess (python -m castore.cli), waited for."""
    proc = subprocess.run(
        cas_command(args, cache_dir),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )
    return CasResult(proc)


def start_cas(
    *args: str, cache_dir: Path | str | None = None, env: dict | None = None
) -> subprocess.Popen:
    """`cas` as a real subprocess left running, for signals and concurrency tests."""
    return subprocess.Popen(
        cas_command(args, cache_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def cas():
    return run_cas


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """The slow pipeline run once without interruption: (json summary, rows)."""
    from tests.scenario import PIPELINE, dataset

    cache = tmp_path_factory.mktemp("reference")
    r = run_cas("run", str(PIPELINE), "--json", cache_dir=cache)
    assert r.returncode == 0, r
    doc = r.json()
    return doc, dataset(cache, doc["signature"])


def cas_inproc(
    *args: str,
    cache_dir: Path | str | None = None,
    env: dict | None = None,
    cwd: Path | str | None = None,
    timeout: float | None = None,  # accepted for symmetry with run_cas; nothing to time out
) -> CasResult:
    """`cas` in this process through click's CliRunner (for tests that need no signal):
    the real entry point, so exit codes and messages are the ones users see. Like a new
    process, it loads pipeline files afresh and leaves the working directory as it was."""
    from castore.cli import main
    from click.testing import CliRunner

    argv = cas_command(args, cache_dir)[3:]  # drop "python -m castore.cli"
    for name in [m for m in sys.modules if m.startswith("castore_target_")]:
        del sys.modules[name]
    runner = CliRunner(catch_exceptions=False)
    old_cwd = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with runner.isolation(env=env) as (out, err, _):
            try:
                main(argv)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            stdout, stderr = out.getvalue().decode(), err.getvalue().decode()
    finally:
        os.chdir(old_cwd)
        import gc

        gc.unfreeze()  # main() freezes the heap for a fast process exit; not this one
    return CasResult(subprocess.CompletedProcess(argv, code, stdout, stderr))
