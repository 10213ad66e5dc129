"""distilabel's StepResources: replicas become concurrency; Ray resources are reserved on
Ray and refused elsewhere (never ignored); a conflicting concurrency is an error."""

from __future__ import annotations

import pytest

from castore.errors import PipelineError
from castore.pipeline.executors import ray_options


def build(resources):
    from castore.distilabel.pipeline import Pipeline
    from castore.distilabel.steps import KeepColumns, LoadDataFromDicts

    with Pipeline(name="res") as p:
        LoadDataFromDicts(data=[{"a": i, "b": 0} for i in range(20)]) >> KeepColumns(
            columns=["a"], resources=resources, input_batch_size=5
        )
    return p


def test_replicas_are_concurrency(tmp_path):
    from castore.distilabel.steps import StepResources

    p = build(StepResources(replicas=3))
    assert p.steps["keep_columns_0"].concurrency == 3
    ds = p.run(cache_dir=str(tmp_path / "c"))
    assert ds["default"]["train"]["a"] == list(range(20))


def test_ray_resources_without_ray_are_refused_not_ignored(tmp_path):
    from castore.distilabel.steps import StepResources

    for resources in (StepResources(gpus=1), {"num_gpus": 1}):
        with pytest.raises(PipelineError, match=r"keep_columns_0: resources=.* on Ray only"):
            build(resources).run(cache_dir=str(tmp_path / "c"))
    assert not (tmp_path / "c" / "runs" / "res").exists()  # refused before anything ran


def test_a_conflicting_concurrency_is_an_error():
    from castore.distilabel.steps import KeepColumns, StepResources

    with pytest.raises(ValueError, match="resources sets concurrency=3 but concurrency=2"):
        KeepColumns(columns=["a"], concurrency=2, resources=StepResources(replicas=3))


def test_ray_options():
    from castore.distilabel.steps import StepResources

    fields = StepResources(cpus=2, gpus=0.5, memory=2**30, resources={"tpu": 1}).as_step_fields()
    assert ray_options(fields["resources"]) == {
        "num_cpus": 2,
        "num_gpus": 0.5,
        "memory": 2**30,
        "resources": {"tpu": 1},
    }
    assert ray_options(None) == {}
