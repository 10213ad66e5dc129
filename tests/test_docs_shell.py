"""Every ```bash block in the docs and the README, run in a sandbox.

The sandbox has what the text assumes: a copy of examples/, a `pipeline.py` named
`my-pipeline` with a `score` step and two earlier runs (RUN_A, RUN_B), a distilabel cache
folder under ~/.cache, an S3 server (moto, on 127.0.0.1) holding `my-bucket`, and, where a
page starts vLLM or llama.cpp, the tests' OpenAI-compatible server on that port instead
(no GPU or model weights here). Install lines are not executed (they would change the test
environment): the harness checks that what they install is installed. The README's test
command is what `.ci/run` runs, so CI executes it.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO
from tests.llm_server import LLMServer
from tests.remote_server import S3Server

pytestmark = pytest.mark.slow
BLOCK = re.compile(r"```bash\n(.*?)```", re.S)
PIPELINE = """
from castore import Pipeline, StepInput, StepOutput, step
from castore.steps import KeepColumns, LoadDataFromDicts


@step(inputs=["n"], outputs=["score"])
def Score(inputs: StepInput, factor: int = 2) -> StepOutput:
    yield [{**r, "score": r["n"] * factor} for r in inputs]


with Pipeline(name="my-pipeline") as pipeline:
    load = LoadDataFromDicts(data=[{"n": i} for i in range(50)], batch_size=10)
    load >> Score(name="score") >> KeepColumns(columns=["n", "score"])
"""
INSTALLS = {".": "castore", '".[test]"': "pytest", '"castore[s3]"': "s3fs", '"castore[ray]"': "ray"}
SERVERS = {"vllm": 8000, "llama-server": 8080}  # stand-ins: same API, same port


def _blocks():
    for path in sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")]):
        for i, code in enumerate(BLOCK.findall(path.read_text())):
            yield pytest.param(code, id=f"{path.name}-{i}")


def _commands(code: str) -> list[str]:
    joined = code.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line:
            out.extend(part.strip() for part in line.split("&&"))
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    base = tmp_path_factory.mktemp("docs-sandbox")
    shutil.copytree(REPO / "examples", base / "examples")
    (base / "pipeline.py").write_text(PIPELINE)
    home = base / "home"
    data = home / ".cache/distilabel/pipelines/NAME/SIG/executions/HASH/data/steps_outputs"
    (data / "text_generation_0").mkdir(parents=True)
    pq.write_table(
        pa.table({"instruction": ["q"], "generation": ["a"]}),
        data / "text_generation_0" / "00001.parquet",
    )
    (data.parent.parent / "pipeline.yaml").write_text("distilabel: {}\n")
    s3 = S3Server()
    s3.start()
    import s3fs

    s3fs.S3FileSystem(
        endpoint_url=s3.endpoint, key="testing", secret="testing-secret", skip_instance_cache=True
    ).mkdir("my-bucket")
    env = {
        **os.environ,
        **s3.env,
        "HOME": str(home),
        "CASTORE_CACHE_DIR": str(base / "cache"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    sigs = []
    for factor in (2, 3):
        r = subprocess.run(
            ["cas", "run", "pipeline.py", "--param", f"score.factor={factor}", "--json", "-q"],
            cwd=base,
            env=env,
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stderr
        import json

        sigs.append(json.loads(r.stdout)["signature"])
    yield (
        base,
        env,
        {
            "RUN_A": sigs[0][:12],
            "RUN_B": sigs[1][:12],
            "1a2b3c4d": sigs[0][:8],
            "[--json]": "--json",
        },
    )
    s3.stop()


def _install_is_satisfied(cmd: str) -> None:
    import importlib.util

    args = shlex.split(cmd)
    targets = [a for a in args[args.index("install") + 1 :] if not a.startswith("-")]
    for t in targets:
        quoted = f'"{t}"' if "[" in t else t
        if t == "vllm":
            continue  # replaced by the stand-in server
        module = INSTALLS.get(quoted) or INSTALLS.get(t)
        assert module and importlib.util.find_spec(module), f"{cmd!r}: {t} is not installed"


@pytest.mark.parametrize("code", list(_blocks()))
def test_doc_shell_block_runs(code, prepared, tmp_path):
    base, env, subs = prepared
    work = tmp_path / "sandbox"
    shutil.copytree(base, work, symlinks=True)
    env = {**env, "HOME": str(work / "home"), "CASTORE_CACHE_DIR": str(work / "cache")}
    servers, ray_started = [], False
    try:
        for cmd in _commands(code):
            for k, v in subs.items():
                cmd = cmd.replace(k, v)
            words = shlex.split(cmd)
            if "pip" in words[:3] and "install" in words:
                _install_is_satisfied(cmd)
                continue
            if words[:3] == [sys.executable.split("/")[-1], "-m", "pytest"] or cmd == (
                "python -m pytest"
            ):
                assert cmd in (REPO / ".ci" / "run").read_text()  # CI runs exactly this
                continue
            if words[0] in SERVERS:
                servers.append(LLMServer(port=SERVERS[words[0]]).start())
                continue
            if "--ray-address" in words and not ray_started:
                subprocess.run(
                    ["ray", "start", "--head", "--num-cpus", "2", "--disable-usage-stats"],
                    env=env,
                    capture_output=True,
                    check=True,
                    timeout=120,
                )
                ray_started = True
            r = subprocess.run(
                cmd,
                shell=True,
                executable=shutil.which("bash") or "/bin/sh",  # the blocks are ```bash
                cwd=work,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    finally:
        for s in servers:
            s.stop()
        if ray_started:
            subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True, timeout=120)
