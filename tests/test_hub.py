"""LoadDataFromHub keys a hub dataset by the commit its revision names when the run
starts, and loads that commit: a dataset updated on the hub is never served from the
cache of its older commit. Against a local hub (tests/hub_server.py), through `cas run`
in real processes (HF_ENDPOINT is read when huggingface_hub is imported)."""

from __future__ import annotations

import json
import textwrap

import pyarrow.parquet as pq
import pytest

from tests.conftest import run_cas
from tests.hub_server import HubServer
from tests.test_cli_run import one_error_line

PIPELINE = textwrap.dedent(
    """
    import os
    from castore import Pipeline, StepInput, StepOutput, step
    from castore.steps import LoadDataFromHub

    @step(inputs=["text"], outputs=["loud"], row_wise=True, ignore_env=["SHOUT_COUNT"])
    def Shout(inputs: StepInput) -> StepOutput:
        with open(os.environ["SHOUT_COUNT"], "a") as f:
            f.write("x" * len(inputs))
        yield [{**r, "loud": r["text"].upper()} for r in inputs]

    with Pipeline(name="hub") as pipeline:
        LoadDataFromHub(name="load", repo_id="org/data", batch_size=4) >> Shout()
    """
)


def lines(texts: list[str]) -> dict[str, bytes]:
    body = "".join(json.dumps({"text": t}) + "\n" for t in texts)
    return {"data/train.jsonl": body.encode()}


@pytest.fixture
def hub():
    server = HubServer().start()
    yield server
    server.stop()


@pytest.fixture
def setup(tmp_path, hub):
    path = tmp_path / "hub_pipeline.py"
    path.write_text(PIPELINE)
    counter = tmp_path / "computed"
    env = {
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf"),
        "SHOUT_COUNT": str(counter),
        "HF_HUB_OFFLINE": "0",
    }

    def run(*args: str, **extra: str):
        r = run_cas(
            "run", str(path), "--json", *args, cache_dir=tmp_path / "store", env=env | extra
        )
        computed = counter.read_text().count("x") if counter.exists() else 0
        counter.unlink(missing_ok=True)
        return r, computed

    return run


def shouted(r) -> list[tuple[str, str]]:
    assert r.returncode == 0, r
    table = pq.ParquetDataset(f"{r.json()['data_dir']}/shout").read()
    return sorted(zip(table["text"].to_pylist(), table["loud"].to_pylist(), strict=True))


def expected(texts: list[str]) -> list[tuple[str, str]]:
    return sorted((t, t.upper()) for t in texts)


def test_a_new_commit_on_the_branch_is_loaded_and_a_pinned_commit_shares_the_cache(hub, setup):
    first = [f"t{i}" for i in range(6)]
    a = hub.commit("org/data", lines(first))
    r, computed = setup()
    assert shouted(r) == expected(first) and computed == 6
    r, computed = setup()
    assert shouted(r) == expected(first) and computed == 0
    assert r.json()["steps"]["load"]["batches_computed"] == 0

    # The branch moves on: the loader loads the new commit (keyed by name alone, the
    # cache served the 6 old rows), and the row-wise step pays only for the new rows.
    second = [*first, "t6", "t7"]
    b = hub.commit("org/data", lines(second))
    r, computed = setup()
    assert shouted(r) == expected(second)
    assert computed == 2
    assert r.json()["steps"]["load"]["batches_computed"] == 2

    # A commit pinned by its id is the run that named it through the branch: all cached.
    r, computed = setup("--param", f"load.revision={a}")
    assert shouted(r) == expected(first) and computed == 0
    assert r.json()["steps"]["load"]["batches_computed"] == 0
    r, computed = setup("--param", f"load.revision={b}")
    assert shouted(r) == expected(second) and computed == 0
    r, computed = setup("--param", "load.revision=nope")
    one_error_line(r, "has no revision 'nope'")


def test_offline_keys_the_cached_commit_and_refuses_another(hub, setup):
    texts = ["a", "b", "c"]
    hub.commit("org/data", lines(texts))
    r, computed = setup()
    assert shouted(r) == expected(texts) and computed == 3
    # A commit the machine never downloaded: offline, datasets would load the cached one.
    newer = hub.commit("org/data", lines(["z"]))
    r, computed = setup(HF_HUB_OFFLINE="1")
    assert shouted(r) == expected(texts) and computed == 0
    assert "offline (HF_HUB_OFFLINE)" in r.stderr and "cached commit" in r.stderr
    r, computed = setup("--param", f"load.revision={newer}", HF_HUB_OFFLINE="1")
    one_error_line(r, "offline", f"not {newer}")
    assert computed == 0


def test_a_hub_that_cannot_answer_stops_the_run_in_one_line(hub, setup):
    r, _ = setup("--param", "load.repo_id=org/nope")
    one_error_line(r, "no hub dataset org/nope", "HF_TOKEN")
    hub.stop()
    r, _ = setup()
    one_error_line(r, "cannot reach the hub", "HF_HUB_OFFLINE=1")
