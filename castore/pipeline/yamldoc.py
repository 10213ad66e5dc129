"""The shape of a pipeline YAML (`cas run pipeline.yaml`, a stored run's recipe), checked
before any of it is used: a hand-written file with a step that is not a mapping, or a
connection without `from`, gets a line naming where and what is expected, not a Python
error about `.get`; distilabel's own pipeline.yaml gets a line saying what to run instead."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from castore.errors import ConfigError, one_line

SHAPE = (
    "expected pipeline: {name, steps: [{name, type: 'module:ClassName', params: {...}}], "
    "connections: [{from: step, to: [steps]}]}"
)


_KINDS = {int: "a number", float: "a number", bool: "a boolean", str: "a string", list: "a list"}
_KINDS[type(None)] = "empty"


class _Part(BaseModel):
    # A stored pipeline.yaml carries more (signatures, fingerprints, code digests).
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class StepDoc(_Part):
    name: str | None = None
    type: str
    file: str | None = None
    params: dict[str, Any] | None = None


class ConnectionDoc(_Part):
    from_: str = Field(alias="from")
    to: list[str] | None = None


class PipelineDoc(_Part):
    name: str
    description: str | None = None
    steps: list[StepDoc]
    connections: list[ConnectionDoc] | None = None
    routing: list[dict[str, Any]] | None = None


class Doc(_Part):
    pipeline: PipelineDoc


def check_shape(doc: Any) -> PipelineDoc:
    """`doc`'s pipeline, read by the models above; ConfigError in one line unless `doc`
    has a pipeline YAML's shape."""
    _refuse_distilabel_yaml(doc)
    try:
        return Doc.model_validate(doc).pipeline
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        if first["type"] in ("model_type", "model_attributes_type", "dict_type"):
            where = ".".join(map(str, first["loc"])) or "the document"
            got = _KINDS.get(type(first["input"]), "something else")
            raise ConfigError(f"pipeline YAML: {where} is {got}, not a mapping; {SHAPE}") from None
        raise ConfigError(f"pipeline YAML: {one_line(e)}; {SHAPE}") from None


def _refuse_distilabel_yaml(doc: Any) -> None:
    """distilabel's pipeline.yaml has another shape (and names distilabel's classes):
    say what it is and what to run instead, rather than a KeyError about its fields."""
    if not isinstance(doc, dict):
        return
    pipeline, meta = doc.get("pipeline"), doc.get("distilabel")
    info = pipeline.get("type_info") if isinstance(pipeline, dict) else None
    module = str(info.get("module", "")) if isinstance(info, dict) else ""
    if meta is None and not module.startswith("distilabel"):
        return
    version = meta.get("version", "?") if isinstance(meta, dict) else "?"
    raise ConfigError(
        f"this is a distilabel pipeline.yaml (distilabel {version}); castore does not "
        "load distilabel's serialized pipelines: run the script that built it with its "
        "imports changed to castore.distilabel (`cas run script.py`), see docs/migrating.md"
    )
